using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using HiMar.Model;
using HiMar.Runtime.Checkpoints;
using HiMar.Runtime.Data;
using HiMar.Runtime.Sampling;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Training;

/// <summary>Settings of a training run (the model's own settings live in its <see cref="HiMarConfig"/>).</summary>
public sealed record TrainOptions
{
    /// <summary>Images per optimiser step (per micro-batch when accumulating).</summary>
    public int BatchSize { get; init; } = 64;

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

    /// <summary>The run folder: checkpoints/, samples/, metrics.jsonl, loss.png.</summary>
    public required string OutDir { get; init; }

    /// <summary>A copy keeping <paramref name="keep"/> checkpoints.</summary>
    public TrainOptions WithKeep(int keep) => this with { KeepLast = keep };

    /// <summary>A copy checkpointing every <paramref name="steps"/> steps.</summary>
    public TrainOptions WithCheckpointEvery(int steps) => this with { CheckpointEvery = steps };

    /// <summary>The learning rate at the end of the warm-up.</summary>
    public double PeakLr => BaseLr * BatchSize * Accumulation / 256.0;

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
/// <param name="Phase1">Weighted phase-1 loss.</param>
/// <param name="Phase2">Weighted phase-2 loss.</param>
/// <param name="Lr">Learning rate.</param>
/// <param name="GradNorm">Gradient norm before clipping.</param>
/// <param name="ImagesPerSecond">Throughput over the window.</param>
public readonly record struct TrainProgress(int Step, double Epoch, double Loss, double Phase1, double Phase2, double Lr, double GradNorm, double ImagesPerSecond);

/// <summary>Training stopped on a non-finite loss or gradient; the message names the term and the first module.</summary>
public sealed class NonFiniteException(string message) : Exception(message);

/// <summary>
/// The training loop: AdamW, warm-up and constant or cosine learning rate, gradient clipping, EMA, gradient
/// accumulation, the model's masking and loss, atomic checkpoints with exact resume, a NaN/Inf guard, a JSONL
/// metrics log, EMA sample grids and a loss curve.
/// </summary>
public sealed class Trainer : IDisposable
{
    readonly HiMAR model;
    readonly HiMAR ema;
    readonly NamedAdamW optimizer;
    readonly Ema average;
    readonly ITokenSource data;
    readonly ITokenizer? tokenizer;
    readonly TrainOptions options;
    int step;
    double bestLoss = double.PositiveInfinity;
    readonly List<(int Step, double Loss)> curve = [];

    /// <summary>Training on images through a tokenizer (which also decodes the sample previews).</summary>
    public Trainer(HiMarConfig config, IImageDataset data, ITokenizer tokenizer, TrainOptions options, bool resume = false)
        : this(config, new TokenizedImages(data, tokenizer), tokenizer, options, resume)
    {
    }

    /// <summary>A fresh run (weights initialised from the seed), or a resumed one when the run folder has checkpoints
    /// and <paramref name="resume"/> is set. <paramref name="decoder"/> turns sample previews into pictures (none: no previews).</summary>
    public Trainer(HiMarConfig config, ITokenSource data, ITokenizer? decoder, TrainOptions options, bool resume = false)
    {
        var tokenizer = decoder;
        this.data = data;
        this.tokenizer = tokenizer;
        this.options = options;
        data.CheckFits(config);
        if (data.ClassCount > config.ClassNum)
            throw new ArgumentException($"the data has {data.ClassCount} classes, the model {config.ClassNum}");
        torch.manual_seed(options.Seed);
        model = new HiMAR(config);
        Init.HiMar(model);
        ema = new HiMAR(config);
        average = new Ema(model, ema, options.EmaRate);
        average.Reset();
        ema.eval();
        optimizer = new NamedAdamW(model, options.WeightDecay);
        Directory.CreateDirectory(options.OutDir);
        if (resume)
        {
            var latest = Checkpoint.Latest(CheckpointsDir);
            if (latest != null)
                Restore(latest);
        }
    }

    /// <summary>The model being trained.</summary>
    public HiMAR Model => model;

    /// <summary>The EMA model.</summary>
    public HiMAR EmaModel => ema;

    /// <summary>Optimiser steps done.</summary>
    public int Step => step;

    /// <summary>Where checkpoints go.</summary>
    public string CheckpointsDir => Path.Combine(options.OutDir, "checkpoints");

    int StepsPerEpoch => Math.Max(1, data.Count / (options.BatchSize * options.Accumulation));

    /// <summary>Images and flips of micro-batch <paramref name="micro"/> of step <paramref name="s"/>: a seeded permutation per epoch, so any step is reproducible.</summary>
    (int[] Indices, bool[] Flips) BatchAt(int s, int micro)
    {
        var perEpoch = StepsPerEpoch;
        var epoch = s / perEpoch;
        var rng = new Random(Mix(options.Seed, epoch, 0x5EED));
        var order = Enumerable.Range(0, data.Count).ToArray();
        rng.Shuffle(order);
        var start = ((s % perEpoch) * options.Accumulation + micro) * options.BatchSize;
        var idx = order.Skip(start).Take(options.BatchSize).ToArray();
        var flipRng = new Random(Mix(options.Seed, s * 131L + micro, 0xF11B));
        var flips = idx.Select(_ => options.Flip && flipRng.Next(2) == 1).ToArray();
        return (idx, flips);
    }

    // HashCode is randomised per process; this mix is the same in every run, so resumed runs see the same data.
    static int Mix(long seed, long a, long b) => (int)(SeededNoise.ImageSeed(seed, a * 1_000_003L + b) & 0x7fffffff);

    /// <summary>Runs until <see cref="TrainOptions.Steps"/> (or <paramref name="maxSteps"/> more steps), reporting every <see cref="TrainOptions.LogEvery"/> steps.</summary>
    public void Run(Action<TrainProgress>? progress = null, int? maxSteps = null, CancellationToken cancel = default)
    {
        var stopAt = Math.Min(options.Steps, maxSteps is { } m ? step + m : int.MaxValue);
        model.train();
        var metricsPath = Path.Combine(options.OutDir, "metrics.jsonl");
        var window = new List<(double L, double P1, double P2, double G)>();
        var sw = Stopwatch.StartNew();
        var windowImages = 0;
        while (step < stopAt && !cancel.IsCancellationRequested)
        {
            var (loss, p1, p2, gnorm) = TrainStep();
            step++;
            window.Add((loss, p1, p2, gnorm));
            windowImages += options.BatchSize * options.Accumulation;
            if (step % options.LogEvery == 0 || step == options.Steps)
            {
                var p = new TrainProgress(step, (double)step / StepsPerEpoch, window.Average(w => w.L), window.Average(w => w.P1),
                    window.Average(w => w.P2), options.LrAt(step - 1), window.Average(w => w.G), windowImages / Math.Max(1e-9, sw.Elapsed.TotalSeconds));
                curve.Add((step, p.Loss));
                File.AppendAllText(metricsPath, JsonSerializer.Serialize(new
                {
                    step = p.Step,
                    epoch = p.Epoch,
                    loss = p.Loss,
                    phase1 = p.Phase1,
                    phase2 = p.Phase2,
                    lr = p.Lr,
                    grad_norm = p.GradNorm,
                    images_per_s = p.ImagesPerSecond,
                }) + "\n");
                progress?.Invoke(p);
                window.Clear();
                windowImages = 0;
                sw.Restart();
            }
            if (step % options.CheckpointEvery == 0 || step == options.Steps)
                SaveCheckpoint();
            if (options.SampleEvery > 0 && step % options.SampleEvery == 0 && tokenizer != null)
                SamplePreview(Path.Combine(options.OutDir, "samples", $"step-{step:D8}.png"));
        }
        if (curve.Count > 1)
            LossCurve.Save(curve, Path.Combine(options.OutDir, "loss.png"));
    }

    (double Loss, double P1, double P2, double GradNorm) TrainStep()
    {
        using var scope = torch.NewDisposeScope();
        optimizer.ZeroGrad();
        double loss = 0, p1 = 0, p2 = 0;
        for (var micro = 0; micro < options.Accumulation; micro++)
        {
            var (idx, flips) = BatchAt(step, micro);
            var (tokens, pivots) = data.Batch(idx, flips);
            var labels = torch.tensor(idx.Select(i => data.Labels[i]).ToArray());
            var epoch = (double)step / StepsPerEpoch;
            var losses = model.TrainingLosses(tokens, pivots, labels, epoch);
            double l1 = losses.Phase1.item<float>(), l2 = losses.Phase2.item<float>(), total = losses.Total.item<float>();
            if (!double.IsFinite(total))
                throw new NonFiniteException(
                    $"step {step + 1}: the {(double.IsFinite(l1) ? "phase-2" : "phase-1")} loss is not finite ({l1}, {l2}); the last good checkpoint is kept in {CheckpointsDir}.");
            (losses.Total / options.Accumulation).backward();
            loss += total / options.Accumulation;
            p1 += l1 / options.Accumulation;
            p2 += l2 / options.Accumulation;
        }
        var norm = torch.nn.utils.clip_grad_norm_(optimizer.Parameters, options.GradClip);
        if (!double.IsFinite(norm))
        {
            var first = model.named_parameters().FirstOrDefault(x => x.parameter.grad is { } g && !g.isfinite().all().item<bool>()).name ?? "?";
            throw new NonFiniteException($"step {step + 1}: a gradient is not finite, first in '{first}'; the last good checkpoint is kept in {CheckpointsDir}.");
        }
        optimizer.Step(options.LrAt(step));
        average.Update();
        return (loss, p1, p2, norm);
    }

    /// <summary>Writes a checkpoint of the current step (and `best` when the recent loss is the lowest yet).</summary>
    public void SaveCheckpoint()
    {
        var recent = curve.Count > 0 ? curve[^1].Loss : double.PositiveInfinity;
        var state = new JsonObject
        {
            ["step"] = step,
            ["epoch"] = (double)step / StepsPerEpoch,
            ["optimizer_steps"] = optimizer.Steps,
            ["recent_loss"] = double.IsFinite(recent) ? recent : null,
            ["best_loss"] = double.IsFinite(bestLoss) ? bestLoss : null,
            ["rng_state"] = Convert.ToBase64String(RngState()),
            ["seed"] = options.Seed,
            ["data_position"] = new JsonObject { ["epoch"] = step / StepsPerEpoch, ["step_in_epoch"] = step % StepsPerEpoch },
            ["options"] = JsonSerializer.SerializeToNode(options),
        };
        var dir = Checkpoint.Write(CheckpointsDir, $"step-{step:D8}", model, ema, optimizer, state);
        Checkpoint.Prune(CheckpointsDir, options.KeepLast);
        if (recent < bestLoss)
        {
            bestLoss = recent;
            Checkpoint.CopyAs(dir, CheckpointsDir, "best");
        }
    }

    static byte[] RngState()
    {
        using var s = torch.get_rng_state();
        return s.bytes.ToArray();
    }

    void Restore(string dir)
    {
        var stateJson = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, Checkpoint.StateFile)))!.AsObject();
        ModelFiles.Load(model, Path.Combine(dir, Checkpoint.ModelFile));
        ModelFiles.Load(ema, Path.Combine(dir, Checkpoint.EmaFile));
        var opt = SafeTensors.Load(Path.Combine(dir, Checkpoint.OptimizerFile));
        try
        {
            optimizer.LoadState(opt, stateJson["optimizer_steps"]!.GetValue<long>(), Path.Combine(dir, Checkpoint.OptimizerFile));
        }
        finally
        {
            foreach (var t in opt.Values)
                t.Dispose();
        }
        step = stateJson["step"]!.GetValue<int>();
        average.Updates = optimizer.Steps;
        bestLoss = stateJson["best_loss"]?.GetValue<double>() ?? double.PositiveInfinity;
        var rng = Convert.FromBase64String(stateJson["rng_state"]!.GetValue<string>());
        using var rngTensor = torch.tensor(rng);
        torch.set_rng_state(rngTensor);
    }

    /// <summary>Samples one image per class with the EMA model and writes a labelled grid.</summary>
    public void SamplePreview(string path, int perClass = 1)
    {
        var labels = Enumerable.Range(0, model.Config.ClassNum).SelectMany(c => Enumerable.Repeat((long)c, perClass)).ToArray();
        var rng = torch.get_rng_state();
        try
        {
            using var l = torch.tensor(labels);
            using var noise = new SeededNoise(options.Seed, 0, labels.Length);
            // Pixel-space tokens are bounded: clamp predicted x0 as guided diffusion does for pixels.
            using var r = HiMarSampler.Sample(ema, l, noise, new SamplerOptions { ClipDenoised = tokenizer is PixelPatchTokenizer });
            using var images = (tokenizer ?? throw new InvalidOperationException("previews need a tokenizer to decode")).Decode(r.BigTokens);
            var tiles = Imaging.Images.FromTensor(images).Select(img => Imaging.Images.Resize(img, 56)).ToList();
            using var grid = Imaging.Images.Grid(tiles, labels.Select(x => $"class {x}").ToList(), model.Config.ClassNum);
            Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath(path))!);
            Imaging.Images.SavePng(grid, path);
            foreach (var tile in tiles)
                tile.Dispose();
        }
        finally
        {
            // Previews must not change the training's random stream (resume stays exact).
            torch.set_rng_state(rng);
            rng.Dispose();
            model.train();
        }
    }

    /// <summary>Disposes the models and the optimiser.</summary>
    public void Dispose()
    {
        optimizer.Dispose();
        model.Dispose();
        ema.Dispose();
    }
}
