using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using HiMar.Model;
using HiMar.Runtime.Checkpoints;
using HiMar.Runtime.Data;
using HiMar.Runtime.Distributed;
using HiMar.Runtime.Native;
using HiMar.Runtime.Sampling;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Training;

/// <summary>
/// The training loop: AdamW, warm-up and constant or cosine learning rate, gradient clipping, EMA, gradient
/// accumulation, the model's masking and loss, atomic checkpoints with exact resume, a NaN/Inf guard, a JSONL
/// metrics log, EMA sample grids and a loss curve.
/// Data-parallel over a <see cref="ICommunicator"/> of N ranks: every rank starts from rank 0's weights, takes
/// its slice of each global batch of N x <see cref="TrainOptions.BatchSize"/> images (one seeded order per epoch,
/// the same on every rank), draws the batch's randomness for the global batch and keeps its rows
/// (<see cref="RowWindow"/>), and averages gradients with bucketed all-reduces before clipping, so N ranks of
/// batch B follow the same trajectory as one process of batch N B. Losses are averaged over the ranks before they
/// are logged or checked; rank 0 alone keeps the EMA and writes checkpoints, metrics, previews and the curve.
/// </summary>
public sealed partial class Trainer : IDisposable
{
    readonly HiMAR model;
    readonly HiMAR ema;
    readonly NamedAdamW optimizer;
    readonly Ema average;
    readonly ITokenSource data;
    readonly Text.ICaptionSource? captions;
    readonly ITokenizer? tokenizer;
    readonly TrainOptions options;
    readonly ICommunicator comm;
    readonly GradientBuckets buckets;
    int step;
    int dataEpoch; // the data position: the epoch's order and the images of it consumed so far
    int dataOffset;
    (int Epoch, int[] Order)? order;
    double bestLoss = double.PositiveInfinity;
    readonly SmoothedLoss smoothed = new();
    readonly List<LossPoint> curve = [];

    /// <summary>Training on images through a tokenizer (which also decodes the sample previews).</summary>
    public Trainer(HiMarConfig config, IImageDataset data, ITokenizer tokenizer, TrainOptions options, bool resume = false, ICommunicator? communicator = null, Text.ICaptionSource? captions = null)
        : this(config, new TokenizedImages(data, tokenizer), tokenizer, options, resume, communicator, captions)
    {
    }

    /// <summary>A fresh run (weights initialised from the seed), or a resumed one when the run folder has checkpoints
    /// and <paramref name="resume"/> is set. <paramref name="decoder"/> turns sample previews into pictures (none: no previews).
    /// With a <paramref name="communicator"/> of several ranks every rank constructs its trainer (collectively):
    /// rank 0 reads the checkpoint and its weights, moments, position and random state are broadcast.
    /// Text models take their condition from <paramref name="captions"/> (one caption drawn per example and step).</summary>
    public Trainer(HiMarConfig config, ITokenSource data, ITokenizer? decoder, TrainOptions options, bool resume = false, ICommunicator? communicator = null, Text.ICaptionSource? captions = null)
    {
        var tokenizer = decoder;
        comm = communicator ?? SingleProcess.Instance;
        options = options with { WorldSize = comm.Size };
        this.data = data;
        this.tokenizer = tokenizer;
        this.options = options;
        data.CheckFits(config);
        this.captions = captions;
        if (config.Text.Conditioning == Conditioning.Text)
        {
            if (captions == null)
                throw new ArgumentException("a text-to-image model trains on captions: give a caption source");
            if (captions.Count != data.Count)
                throw new ArgumentException($"{captions.Count} examples have captions, the data has {data.Count}");
            captions.CheckFits(config);
        }
        else if (captions != null)
            throw new ArgumentException("captions given, but the model is conditioned on class labels (conditioning: class)");
        else if (data.ClassCount > config.Backbone.ClassCount)
            throw new ArgumentException($"the data has {data.ClassCount} classes, the model {config.Backbone.ClassCount}");
        if (comm.Size > 1 && data.Count < ImagesPerStep)
            throw new ArgumentException($"the data has {data.Count} examples, fewer than one global step of {ImagesPerStep} ({comm.Size} ranks x batch {options.BatchSize} x {options.Accumulation} micro-batches)");
        torch.manual_seed(options.Seed);
        model = new HiMAR(config);
        Init.HiMar(model);
        // Fine-tuning: checked and loaded before anything is written (a resumed checkpoint overwrites it below).
        if (comm.IsRoot() && options.InitFrom is { } init)
            InitialiseFrom(init);
        ema = new HiMAR(config);
        average = new Ema(model, ema, options.EmaRate);
        ema.eval();
        optimizer = new NamedAdamW(model, options.WeightDecay);
        buckets = new GradientBuckets(optimizer.Parameters, comm);
        if (comm.IsRoot())
            Directory.CreateDirectory(options.OutDir);
        if (config.Text.Conditioning == Conditioning.Text && config.Text.Encoder == TextEncoderKind.External && config.Text.NullContext == NullContextKind.Empty)
        {
            using var empty = captions!.EmptyContext
                ?? throw new ArgumentException("the caption source has no empty-caption context, which this model's null context needs");
            model.SetEmptyContext(empty);
        }
        string? latest = null;
        if (comm.IsRoot())
        {
            RemovedDebris = Checkpoint.RemoveDebris(CheckpointsDir);
            if (resume)
                latest = RestoreNewestValid();
        }
        if (latest == null)
            average.Reset();
        if (comm.IsRoot())
            TrimMetrics();
        if (comm.Size > 1)
            ShareState(latest != null);
    }

    /// <summary>The checkpoints a resume skipped, newest first, each "step-N: why" (empty when the newest verified).</summary>
    public IReadOnlyList<string> SkippedCheckpoints { get; private set; } = [];

    /// <summary>What the start removed of killed runs' debris (staging folders, half-pruned checkpoints).</summary>
    public IReadOnlyList<string> RemovedDebris { get; private set; } = [];

    /// <summary>The model being trained.</summary>
    public HiMAR Model => model;

    /// <summary>The EMA model.</summary>
    public HiMAR EmaModel => ema;

    /// <summary>Optimiser steps done.</summary>
    public int Step => step;

    /// <summary>Where checkpoints go.</summary>
    public string CheckpointsDir => Path.Combine(options.OutDir, "checkpoints");

    /// <summary>The communicator (rank and size of this process).</summary>
    public ICommunicator Communicator => comm;

    /// <summary>The options in force (<see cref="TrainOptions.WorldSize"/> set from the communicator).</summary>
    public TrainOptions Options => options;

    int ImagesPerStep => options.GlobalBatch * options.Accumulation;

    int StepsPerEpoch => Math.Max(1, data.Count / ImagesPerStep);

    /// <summary>The fractional epoch of the data position (step / steps-per-epoch while the global batch stays the same).</summary>
    double EpochProgress => (double)(dataEpoch * StepsPerEpoch + dataOffset / ImagesPerStep) / StepsPerEpoch;

    int[] EpochOrder(int epoch)
    {
        if (order is { } o && o.Epoch == epoch)
            return o.Order;
        var rng = new Random(Mix(options.Seed, epoch, 0x5EED));
        var perm = Enumerable.Range(0, data.Count).ToArray();
        rng.Shuffle(perm);
        order = (epoch, perm);
        return perm;
    }

    /// <summary>
    /// This rank's images and flips of micro-batch <paramref name="micro"/> of step <paramref name="s"/>, and their
    /// rows in the global micro-batch: a seeded permutation per epoch (the same on every rank) read from the data
    /// position in global micro-batches, of which rank r takes rows [r B, (r + 1) B) (as PyTorch's
    /// DistributedSampler, in contiguous slices); the flips are drawn for the whole global micro-batch.
    /// </summary>
    (int[] Indices, bool[] Flips, RowWindow Rows) BatchAt(int s, int micro)
    {
        var perm = EpochOrder(dataEpoch);
        var global = perm.Skip(dataOffset + micro * options.GlobalBatch).Take(options.GlobalBatch).ToArray();
        var flipRng = new Random(Mix(options.Seed, s * 131L + micro, 0xF11B));
        var flips = global.Select(_ => options.Flip && flipRng.Next(2) == 1).ToArray();
        var start = Math.Min(global.Length, comm.Rank * options.BatchSize);
        var count = Math.Min(options.BatchSize, global.Length - start);
        return (global[start..(start + count)], flips[start..(start + count)], new RowWindow(start, count, global.Length));
    }

    /// <summary>Moves the data position past one step's images; a step that would not fit starts the next epoch.</summary>
    void Advance()
    {
        dataOffset += ImagesPerStep;
        if (dataOffset + ImagesPerStep > data.Count)
        {
            dataEpoch++;
            dataOffset = 0;
        }
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
            smoothed.Add(loss);
            Advance();
            window.Add((loss, p1, p2, gnorm));
            windowImages += ImagesPerStep;
            if (step % options.LogEvery == 0 || step == options.Steps)
            {
                var p = new TrainProgress(step, EpochProgress, window.Average(w => w.L), window.Average(w => w.P1),
                    window.Average(w => w.P2), options.LrAt(step - 1), window.Average(w => w.G), windowImages / Math.Max(1e-9, sw.Elapsed.TotalSeconds));
                curve.Add(new LossPoint(step, p.Loss, p.Phase1, p.Phase2));
                if (comm.IsRoot())
                    File.AppendAllText(metricsPath, JsonSerializer.Serialize(p, TrainProgress.MetricsLine) + "\n");
                if (comm.IsRoot())
                    progress?.Invoke(p);
                window.Clear();
                windowImages = 0;
                sw.Restart();
            }
            if (step % options.CheckpointEvery == 0 || step == options.Steps)
                SaveCheckpoint();
            if (options.SampleEvery > 0 && step % options.SampleEvery == 0 && tokenizer != null && comm.IsRoot())
                SamplePreview(Path.Combine(options.OutDir, "samples", $"step-{step:D8}.png"));
        }
        if (curve.Count > 1 && comm.IsRoot())
            LossCurve.Save(curve, Path.Combine(options.OutDir, "loss.png"));
    }

    (double Loss, double P1, double P2, double GradNorm) TrainStep()
    {
        using var scope = torch.NewDisposeScope();
        using var gcPause = GcPause.Begin(); // libtorch reads TorchSharp's temporary Scalars: no collection mid-call
        // Products in the run's precision for this step's forward and backward; the parameters stay fp32.
        using var mixed = MixedPrecision.ForTraining(model, options.Precision);
        optimizer.ZeroGrad();
        double loss = 0, p1 = 0, p2 = 0;
        for (var micro = 0; micro < options.Accumulation; micro++)
        {
            var (idx, flips, rows) = BatchAt(step, micro);
            var (tokens, pivots) = data.Batch(idx, flips, rows);
            using var condition = ConditionOf(idx, step, micro, rows);
            var losses = model.TrainingLosses(tokens, pivots, condition, EpochProgress, rows);
            // Every rank checks the same all-reduced values, so a non-finite loss on one rank stops them all.
            Span<double> values = [losses.Phase1.item<float>(), losses.Phase2.item<float>(), losses.Total.item<float>()];
            comm.AllReduceAverage(values);
            double l1 = values[0], l2 = values[1], total = values[2];
            if (!double.IsFinite(total))
                throw new NonFiniteException(
                    $"step {step + 1}: the {(double.IsFinite(l1) ? "phase-2" : "phase-1")} loss is not finite ({l1}, {l2}); the last good checkpoint is kept in {CheckpointsDir}.");
            (losses.Total / options.Accumulation).backward();
            loss += total / options.Accumulation;
            p1 += l1 / options.Accumulation;
            p2 += l2 / options.Accumulation;
        }
        buckets.AllReduceAverage();
        var norm = torch.nn.utils.clip_grad_norm_(optimizer.Parameters, options.GradClip);
        if (!double.IsFinite(norm))
        {
            var first = model.named_parameters().FirstOrDefault(x => x.parameter.grad is { } g && !g.isfinite().all().item<bool>()).name ?? "?";
            throw new NonFiniteException($"step {step + 1}: a gradient is not finite, first in '{first}'; the last good checkpoint is kept in {CheckpointsDir}.");
        }
        optimizer.Step(options.LrAt(step));
        if (comm.IsRoot())
            average.Update();
        return (loss, p1, p2, norm);
    }

    /// <summary>The batch's labels, or for text models one caption per example, drawn for the whole global
    /// micro-batch (so every rank agrees) from the run seed, step and micro-batch.</summary>
    Condition ConditionOf(int[] idx, int s, int micro, RowWindow rows)
    {
        if (captions == null)
            return Condition.NewLabels(torch.tensor(idx.Select(i => data.Labels[i]).ToArray()));
        var rng = new Random(Mix(options.Seed, s * 131L + micro, 0xCA9));
        var draws = Enumerable.Range(0, (int)rows.Total).Select(_ => rng.NextDouble()).ToArray();
        var chosen = idx.Select((e, i) => (int)(draws[rows.Offset + i] * captions.CaptionsOf(e))).ToArray();
        return captions.Batch(model, idx, chosen);
    }


    /// <summary>Samples one image per class (text models: the shortest caption of the first example of each label,
    /// then of the next examples) with the EMA model and writes a labelled grid.</summary>
    public void SamplePreview(string path, int perClass = 1)
    {
        var labels = Enumerable.Range(0, model.Config.Backbone.ClassCount).SelectMany(c => Enumerable.Repeat((long)c, perClass)).ToArray();
        var rng = torch.get_rng_state();
        try
        {
            var count = captions == null ? labels.Length : Math.Min(10 * perClass, captions.Count);
            int[] examples = [];
            if (captions != null)
            {
                // One garment per class on Fashion-MNIST; data sets with one label fill up with the next examples.
                var dataLabels = data.Labels;
                var firstOfLabel = Enumerable.Range(0, data.Count).GroupBy(i => dataLabels[i]).Select(g => g.First()).Take(count);
                examples = firstOfLabel.Concat(Enumerable.Range(0, data.Count)).Distinct().Take(count).ToArray();
            }
            using var condition = captions == null
                ? Condition.NewLabels(torch.tensor(labels))
                : captions.Batch(ema, examples, examples.Select(Shortest).ToArray());
            var names = captions == null
                ? labels.Select(x => Catalog.ModelTraits.LabelText(model.Config, x)).ToList()
                : examples.Select(e => captions.Text(e, Shortest(e)) ?? $"example {e}").ToList();
            using var noise = new SeededNoise(options.Seed, 0, count);
            // Pixel-space tokens are bounded: clamp predicted x0 as guided diffusion does for pixels.
            using var r = HiMarSampler.Sample(ema, condition, noise, new SamplerOptions { ClipDenoised = tokenizer is PixelPatchTokenizer, Precision = options.Precision });
            using var images = (tokenizer ?? throw new InvalidOperationException("previews need a tokenizer to decode")).Decode(r.Dense, options.Precision);
            // Captions need wider tiles than class numbers to be legible.
            var side = captions == null ? 56 : 84;
            var tiles = Imaging.Images.FromTensor(images).Select(img => Imaging.Images.Resize(img, side)).ToList();
            using var grid = Imaging.Images.Grid(tiles, names, Math.Min(10, count));
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

    /// <summary>The example's shortest caption (the most legible under a preview tile); 0 when the texts are unknown.</summary>
    int Shortest(int example) =>
        Enumerable.Range(0, captions!.CaptionsOf(example)).OrderBy(k => captions.Text(example, k)?.Length ?? 0).First();

    /// <summary>Disposes the models and the optimiser.</summary>
    public void Dispose()
    {
        buckets.Dispose();
        optimizer.Dispose();
        model.Dispose();
        ema.Dispose();
    }
}
