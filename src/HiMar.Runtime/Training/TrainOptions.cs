using System.Text.Json;
using System.Text.Json.Serialization;
using HiMar.Model;

namespace HiMar.Runtime.Training;

/// <summary>Settings of a training run (the model's own settings live in its <see cref="HiMarConfig"/>).</summary>
public sealed record TrainOptions
{
    /// <summary>Images per optimiser step (per micro-batch when accumulating), per process: the global batch is
    /// this times <see cref="WorldSize"/>.</summary>
    public int BatchSize { get; init; } = 64;

    /// <summary>Processes training together (data-parallel ranks); the trainer sets it from its communicator.</summary>
    public int WorldSize { get; init; } = 1;

    /// <summary>Micro-batches per optimiser step.</summary>
    public int Accumulation { get; init; } = 1;

    /// <summary>Base learning rate: lr = base x effective batch / 256 (the reference's `blr`).</summary>
    public double BaseLr { get; init; } = 1e-4;

    /// <summary>Linear warm-up length in optimiser steps.</summary>
    public int WarmupSteps { get; init; }

    /// <summary>`constant` (the reference default) or `cosine` after the warm-up.</summary>
    public string LrSchedule { get; init; } = "constant";

    /// <summary>The floor of the cosine schedule.</summary>
    public double MinLr { get; init; }

    /// <summary>AdamW weight decay (not applied to 1-D tensors, biases or the diffusion heads).</summary>
    public double WeightDecay { get; init; } = 0.02;

    /// <summary>Global gradient-norm clip.</summary>
    public double GradClip { get; init; } = 3.0;

    /// <summary>EMA rate per step.</summary>
    public double EmaRate { get; init; } = 0.9999;

    /// <summary>Optimiser steps to run in total (a resumed run continues up to this).</summary>
    public int Steps { get; init; } = 1000;

    /// <summary>Run seed: data order, flips, masks, noise.</summary>
    public long Seed { get; init; } = 1;

    /// <summary>Random horizontal flips.</summary>
    public bool Flip { get; init; } = true;

    /// <summary>Checkpoint every this many steps (and at the end).</summary>
    public int CheckpointEvery { get; init; } = 500;

    /// <summary>Checkpoints kept besides `best`.</summary>
    public int KeepLast { get; init; } = 3;

    /// <summary>A PNG grid of EMA samples every this many steps (0: never).</summary>
    public int SampleEvery { get; init; }

    /// <summary>Metrics line every this many steps.</summary>
    public int LogEvery { get; init; } = 10;

    /// <summary>A model folder, training checkpoint folder or `.pth` whose weights (EMA weights where it has them)
    /// start a fresh run instead of the seeded initialisation: fine-tuning. The optimiser state, step count and EMA
    /// start afresh; a resumed run ignores it.</summary>
    public string? InitFrom { get; init; }

    /// <summary>The run folder: checkpoints/, samples/, metrics.jsonl, loss.png.</summary>
    public required string OutDir { get; init; }

    /// <summary>
    /// The precision of the forward and backward products (Linear, attention, convolutions). The master weights,
    /// AdamW moments, EMA, gradient clipping, the all-reduce and the loss reductions stay fp32, and checkpoints are
    /// fp32 safetensors, so a run resumes exactly in either precision.
    /// </summary>
    public Precision Precision { get; init; } = Precision.Fp32;

    /// <summary>A copy keeping <paramref name="keep"/> checkpoints.</summary>
    public TrainOptions WithKeep(int keep) => this with { KeepLast = keep };

    /// <summary>A copy starting from the weights of <paramref name="path"/> (see <see cref="InitFrom"/>).</summary>
    public TrainOptions WithInit(string path) => this with { InitFrom = path };

    /// <summary>A copy training in <paramref name="precision"/>.</summary>
    public TrainOptions WithPrecision(Precision precision) => this with { Precision = precision };

    /// <summary>A copy checkpointing every <paramref name="steps"/> steps.</summary>
    public TrainOptions WithCheckpointEvery(int steps) => this with { CheckpointEvery = steps };

    /// <summary>Images per micro-batch over all processes.</summary>
    public int GlobalBatch => BatchSize * WorldSize;

    /// <summary>The learning rate at the end of the warm-up (the effective batch counts every process).</summary>
    public double PeakLr => BaseLr * GlobalBatch * Accumulation / 256.0;

    /// <summary>The learning rate of optimiser step <paramref name="step"/> (0-based).</summary>
    public double LrAt(int step)
    {
        if (step < WarmupSteps)
            return PeakLr * (step + 1) / WarmupSteps;
        if (LrSchedule == "cosine" && Steps > WarmupSteps)
            return MinLr + (PeakLr - MinLr) * 0.5 * (1 + Math.Cos(Math.PI * (step - WarmupSteps) / (Steps - WarmupSteps)));
        return PeakLr;
    }
}

/// <summary>What one logged step looked like.</summary>
/// <param name="Step">Optimiser steps done.</param>
/// <param name="Epoch">Fractional epoch.</param>
/// <param name="Loss">Combined loss (mean over the logging window).</param>
/// <param name="Phase1">Phase-1 (pivot) loss, unweighted (mean over the logging window).</param>
/// <param name="Phase2">Phase-2 (dense-token) loss, unweighted (mean over the logging window).</param>
/// <param name="Lr">Learning rate.</param>
/// <param name="GradNorm">Gradient norm before clipping.</param>
/// <param name="ImagesPerSecond">Throughput over the window.</param>
public readonly record struct TrainProgress(int Step, double Epoch, double Loss, double Phase1, double Phase2, double Lr, double GradNorm,
    [property: JsonPropertyName("images_per_s")] double ImagesPerSecond)
{
    /// <summary>How a progress is written as a line of metrics.jsonl: snake_case names in declaration order
    /// (step, epoch, loss, phase1, phase2, lr, grad_norm, images_per_s).</summary>
    public static readonly JsonSerializerOptions MetricsLine = new() { PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower };
}

/// <summary>Training stopped on a non-finite loss or gradient; the message names the term and the first module.</summary>
public sealed class NonFiniteException(string message) : NumericalException(message);
