using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using HiMar.Model;
using HiMar.Runtime.Checkpoints;
using HiMar.Runtime.Data;
using HiMar.Runtime.Imaging;
using HiMar.Runtime.Sampling;
using HiMar.Runtime.Training;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.PixelFormats;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Evaluation;

/// <summary>One row of the paper's Table 5: a name, a label for tables and charts, and the model it trains.</summary>
public sealed record AblationVariant(string Key, string Label, HiMarConfig Config);

/// <summary>Everything an ablation run depends on (all of it goes into results.json).</summary>
public sealed record AblationPlan
{
    /// <summary>The full Hi-MAR model; the other variants switch parts of it off.</summary>
    public required HiMarConfig Base { get; init; }

    /// <summary>The run folder: one sub-folder per variant and seed, results.json/.md and the charts.</summary>
    public required string OutDir { get; init; }

    /// <summary>The Fashion-MNIST IDX folder (training set for training, test set for the floor).</summary>
    public string DataDir { get; init; } = IdxDataset.FashionMnistDir;

    /// <summary>The feature network's folder (weights.safetensors, train-stats.npz).</summary>
    public required string ClassifierDir { get; init; }

    /// <summary>Optimiser steps of every run (the equal budget).</summary>
    public int Steps { get; init; } = 1200;

    /// <summary>Images per step of every run.</summary>
    public int Batch { get; init; } = 32;

    /// <summary>Base learning rate (lr = blr x batch / 256).</summary>
    public double BaseLr { get; init; } = 8e-3;

    /// <summary>Linear learning-rate warm-up.</summary>
    public int Warmup { get; init; } = 50;

    /// <summary>EMA rate: short runs need a short average (0.995 spans about 200 steps).</summary>
    public double Ema { get; init; } = 0.995;

    /// <summary>Training seeds (each variant trains once per seed).</summary>
    public IReadOnlyList<long> Seeds { get; init; } = [1, 2, 3];

    /// <summary>Class-balanced samples per evaluation (every variant, seed and sweep point).</summary>
    public int Samples { get; init; } = 250;

    /// <summary>Phase-1 steps of the first sweep (phase 2 at the sampling default).</summary>
    public IReadOnlyList<int> Phase1Sweep { get; init; } = [1, 2, 4, 8, 16];

    /// <summary>Phase-2 steps of the second sweep (phase 1 at its default, 4 x cond_scale).</summary>
    public IReadOnlyList<int> Phase2Sweep { get; init; } = [1, 2, 4, 8];

    /// <summary>Keys of the variants to run; null for all five.</summary>
    public IReadOnlyList<string>? Only { get; init; }

    /// <summary>Sampler settings of every evaluation (the sweeps change the step counts only).</summary>
    public required SamplerOptions Sampling { get; init; }

    /// <summary>Images per sampler batch.</summary>
    public int SampleBatch { get; init; } = 50;
}

/// <summary>Where an ablation run is: a description and the share of the work done (0..1).</summary>
public readonly record struct AblationProgress(string Stage, double Done);

/// <summary>
/// The paper's Table 5 at small scale on Fashion-MNIST: five variants from plain MAR to Hi-MAR, each trained with
/// the same steps, batch and seeds, evaluated by FD-FMNIST and class accuracy; then the step sweeps of Figure 4
/// (FD-FMNIST against phase-1 and against phase-2 steps) on the Hi-MAR runs. Every stage resumes: finished
/// training runs and images on disk are reused, so the command can be interrupted and run again.
/// </summary>
public static class Ablation
{
    /// <summary>The five rows of Table 5, built from the full model's config.</summary>
    public static IReadOnlyList<AblationVariant> Variants(HiMarConfig full) =>
    [
        new("mar", "MAR (no pivots)", HiMarConfigModule.WithAblation(PivotSource.NoPivots, Phase2Head.Mlp, false, full)),
        new("low-res", "+ pivots: low-res tokens", HiMarConfigModule.WithAblation(PivotSource.LowResTokens, Phase2Head.Mlp, false, full)),
        new("cond-tokens", "+ pivots: conditional tokens", HiMarConfigModule.WithAblation(PivotSource.ConditionalTokens, Phase2Head.Mlp, false, full)),
        new("transformer-head", "+ Transformer head", HiMarConfigModule.WithAblation(PivotSource.ConditionalTokens, Phase2Head.Transformer, false, full)),
        new("hi-mar", "+ scale-aware blocks (Hi-MAR)", HiMarConfigModule.WithAblation(PivotSource.ConditionalTokens, Phase2Head.Transformer, true, full)),
    ];

    /// <summary>Sample mean and standard deviation (n - 1; 0 for one value).</summary>
    public static (double Mean, double Std) MeanStd(IReadOnlyList<double> xs)
    {
        if (xs.Count == 0)
            return (double.NaN, double.NaN);
        var mean = xs.Average();
        var std = xs.Count > 1 ? Math.Sqrt(xs.Sum(x => (x - mean) * (x - mean)) / (xs.Count - 1)) : 0.0;
        return (mean, std);
    }

    /// <summary>FD-FMNIST of the first <paramref name="count"/> real test images against the training statistics: the floor at that N.</summary>
    public static double Floor(FashionClassifier classifier, IImageDataset test, string statsPath, int count)
    {
        using var scope = torch.NewDisposeScope();
        var n = Math.Min(count, test.Count);
        var images = test.Batch(Enumerable.Range(0, n).ToArray(), new bool[n]);
        var (features, _) = ClassifierRuns.Apply(classifier, images);
        using var stats = FeatureStats.Of(features);
        using var train = Metrics.ReadNpz(statsPath);
        return Metrics.FrechetDistance(stats, train);
    }

    /// <summary>Runs (or resumes) the whole plan; returns the report also written to results.json.</summary>
    public static JsonObject Run(AblationPlan plan, Action<AblationProgress>? progress = null)
    {
        var variants = Variants(plan.Base).Where(v => plan.Only == null || plan.Only.Contains(v.Key)).ToList();
        if (variants.Count == 0)
            throw new ArgumentException($"no such variant: {string.Join(", ", plan.Only ?? [])} (known: {string.Join(", ", Variants(plan.Base).Select(v => v.Key))})");
        Directory.CreateDirectory(plan.OutDir);
        var statsPath = Path.Combine(plan.ClassifierDir, "train-stats.npz");
        using var classifier = ClassifierRuns.Load(plan.ClassifierDir, plan.Base.Backbone.ClassCount);
        var data = IdxDataset.FashionMnist(plan.DataDir);
        var floor = Floor(classifier, IdxDataset.FashionMnist(plan.DataDir, train: false), statsPath, plan.Samples);

        // Work units for the progress bar: a training step costs about two sampled images.
        var sweepPoints = plan.Phase1Sweep.Count + plan.Phase2Sweep.Count;
        double total = variants.Count * plan.Seeds.Count * (2.0 * plan.Steps + plan.Samples)
            + (variants.Any(v => v.Key == "hi-mar") ? plan.Seeds.Count * sweepPoints * plan.Samples : 0);
        double done = 0;
        void Report(string stage, double extra) => progress?.Invoke(new AblationProgress(stage, Math.Min(1.0, (done + extra) / total)));

        var rows = new JsonArray();
        var sweeps = new Dictionary<string, Dictionary<int, List<double>>> { ["phase1"] = [], ["phase2"] = [] };
        foreach (var v in variants)
        {
            var runs = new JsonArray();
            var (_, parameters) = Anatomy.ParameterCounts(v.Config);
            foreach (var seed in plan.Seeds)
            {
                var dir = Path.Combine(plan.OutDir, v.Key, $"seed-{seed}");
                var tag = $"{v.Key} seed {seed}";
                var train = TrainRun(plan, v.Config, data, seed, dir, p => Report($"{tag}: training, step {p.Step}/{plan.Steps}, loss {p.Loss:0.000}", 2.0 * p.Step));
                done += 2.0 * plan.Steps;
                var ckpt = Checkpoint.Latest(Path.Combine(dir, "checkpoints"))
                    ?? throw new InvalidOperationException($"{dir}: training left no checkpoint");
                using var model = ReferenceImport.LoadModel(ckpt, useEma: true);
                var main = Evaluate(model, ckpt, classifier, statsPath, plan, plan.Sampling, Path.Combine(dir, "eval"),
                    (d, n) => Report($"{tag}: sampling {d}/{n}", d));
                done += plan.Samples;
                if (seed == plan.Seeds[0])
                    SaveSampleGrid(Path.Combine(dir, "eval", "images"), Path.Combine(plan.OutDir, $"samples-{v.Key}.png"), plan.Base.Backbone.ClassCount);
                runs.Add(new JsonObject
                {
                    ["seed"] = seed,
                    ["fd_fmnist"] = main.Fd,
                    ["class_accuracy"] = main.Accuracy,
                    ["final_loss"] = train.FinalLoss,
                    ["train_seconds"] = train.Seconds,
                    ["checkpoint"] = ckpt,
                });
                if (v.Key != "hi-mar")
                    continue;
                var defaultPhase1 = plan.Sampling.Phase1Steps ?? v.Config.Phase1Steps;
                foreach (var (sweep, values) in new[] { ("phase1", plan.Phase1Sweep), ("phase2", plan.Phase2Sweep) })
                    foreach (var steps in values)
                    {
                        var options = sweep == "phase1" ? plan.Sampling with { Phase1Steps = steps } : plan.Sampling with { Phase2Steps = steps };
                        var isDefault = (options.Phase1Steps ?? v.Config.Phase1Steps) == defaultPhase1 && options.Phase2Steps == plan.Sampling.Phase2Steps;
                        var point = isDefault ? main : Evaluate(model, ckpt, classifier, statsPath, plan, options, Path.Combine(dir, "sweep", $"{sweep}-{steps}"),
                            (d, n) => Report($"{tag}: {sweep} sweep, {steps} steps, sampling {d}/{n}", d));
                        done += plan.Samples;
                        if (!sweeps[sweep].TryGetValue(steps, out var list))
                            sweeps[sweep][steps] = list = [];
                        list.Add(point.Fd);
                    }
            }
            var fds = runs.Select(r => r!["fd_fmnist"]!.GetValue<double>()).ToList();
            var accs = runs.Select(r => r!["class_accuracy"]!.GetValue<double>()).ToList();
            var (fdMean, fdStd) = MeanStd(fds);
            var (accMean, accStd) = MeanStd(accs);
            rows.Add(new JsonObject
            {
                ["key"] = v.Key,
                ["label"] = v.Label,
                ["parameters"] = parameters,
                ["pivots"] = AblationNames.NameOf(AblationNames.Pivots, v.Config.Pivots.Source),
                ["phase2_head"] = AblationNames.NameOf(AblationNames.Phase2Heads, v.Config.Phase2Head),
                ["scale_aware"] = v.Config.Backbone.ScaleAware,
                ["fd_fmnist_mean"] = fdMean,
                ["fd_fmnist_std"] = fdStd,
                ["class_accuracy_mean"] = accMean,
                ["class_accuracy_std"] = accStd,
                ["runs"] = runs,
            });
        }

        var report = new JsonObject
        {
            ["plan"] = new JsonObject
            {
                ["model"] = ConfigCodec.ToJson(plan.Base),
                ["steps"] = plan.Steps,
                ["batch"] = plan.Batch,
                ["blr"] = plan.BaseLr,
                ["warmup"] = plan.Warmup,
                ["ema"] = plan.Ema,
                ["seeds"] = new JsonArray(plan.Seeds.Select(s => (JsonNode)s).ToArray()),
                ["samples"] = plan.Samples,
                ["sampling"] = SamplerSettings.Describe(plan.Sampling, plan.Base),
                ["data"] = plan.DataDir,
                ["feature_network"] = plan.ClassifierDir,
            },
            ["floor_fd_fmnist"] = floor,
            ["variants"] = rows,
            ["sweeps"] = new JsonObject
            {
                ["phase1"] = SweepJson(sweeps["phase1"]),
                ["phase2"] = SweepJson(sweeps["phase2"]),
            },
        };
        AtomicFile.WriteText(Path.Combine(plan.OutDir, "results.json"), report.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        AtomicFile.WriteText(Path.Combine(plan.OutDir, "results.md"), Markdown(report));
        Plot(report, plan.OutDir);
        progress?.Invoke(new AblationProgress("done", 1.0));
        return report;
    }

    static JsonArray SweepJson(Dictionary<int, List<double>> points) =>
        new(points.OrderBy(p => p.Key).Select(p =>
        {
            var (mean, std) = MeanStd(p.Value);
            return (JsonNode)new JsonObject
            {
                ["steps"] = p.Key,
                ["fd_fmnist"] = new JsonArray(p.Value.Select(x => (JsonNode)x).ToArray()),
                ["mean"] = mean,
                ["std"] = std,
            };
        }).ToArray());

    sealed record TrainSummary(double FinalLoss, double Seconds);

    /// <summary>Trains one variant and seed into <paramref name="dir"/>, or resumes it, or finds it finished.</summary>
    static TrainSummary TrainRun(AblationPlan plan, HiMarConfig config, IImageDataset data, long seed, string dir, Action<TrainProgress> progress)
    {
        var summaryPath = Path.Combine(dir, "train.json");
        var options = new TrainOptions
        {
            OutDir = dir,
            Steps = plan.Steps,
            BatchSize = plan.Batch,
            BaseLr = plan.BaseLr,
            WarmupSteps = plan.Warmup,
            EmaRate = plan.Ema,
            Seed = seed,
            CheckpointEvery = Math.Max(50, plan.Steps / 4),
            KeepLast = 1,
            SampleEvery = 0,
            LogEvery = 10,
            // One precision for the whole ablation: the sampling settings' (fp32 unless asked otherwise).
            Precision = plan.Sampling.Precision,
        };
        double seconds = 0;
        if (File.Exists(summaryPath))
            seconds = JsonNode.Parse(File.ReadAllText(summaryPath))?["train_seconds"]?.GetValue<double>() ?? 0;
        var resume = Checkpoint.Latest(Path.Combine(dir, "checkpoints")) != null;
        using (var trainer = new Trainer(config, data, PixelPatchTokenizer.Fashion, options, resume))
        {
            if (trainer.Step < plan.Steps)
            {
                var sw = Stopwatch.StartNew();
                trainer.Run(progress);
                seconds += sw.Elapsed.TotalSeconds;
            }
        }
        // The final loss: the mean of the last 50 steps' logged losses.
        var losses = File.ReadLines(Path.Combine(dir, "metrics.jsonl"))
            .Select(l => JsonNode.Parse(l)!)
            .Select(j => (Step: j["step"]!.GetValue<int>(), Loss: j["loss"]!.GetValue<double>()))
            .Where(x => x.Step > plan.Steps - 50)
            .Select(x => x.Loss)
            .ToList();
        var final = losses.Count > 0 ? losses.Average() : double.NaN;
        AtomicFile.WriteText(summaryPath, new JsonObject { ["train_seconds"] = seconds, ["final_loss"] = final }.ToJsonString());
        return new TrainSummary(final, seconds);
    }

    sealed record Score(double Fd, double Accuracy);

    static Score Evaluate(HiMAR model, string ckpt, FashionClassifier classifier, string statsPath, AblationPlan plan, SamplerOptions options, string outDir, Action<int, int> progress)
    {
        var r = EvalJob.Run(model, ckpt, true, classifier, statsPath, plan.Samples, options, 0, outDir, plan.SampleBatch, progress);
        var m = r.Report["metrics"]!;
        return new Score(m["fd_fmnist"]!.GetValue<double>(), m["class_accuracy"]!.GetValue<double>());
    }

    /// <summary>The first two images of every class from an evaluation folder, as one labelled grid.</summary>
    static void SaveSampleGrid(string imagesDir, string path, int classes)
    {
        var files = Directory.GetFiles(imagesDir, "*.png").OrderBy(f => f, StringComparer.Ordinal).Take(2 * classes).ToList();
        var tiles = files.Select(f =>
        {
            using var image = Image.Load<Rgb24>(f);
            return Images.Resize(image, 56);
        }).ToList();
        try
        {
            using var grid = Images.Grid(tiles, null, classes);
            Images.SavePng(grid, path);
        }
        finally
        {
            foreach (var t in tiles)
                t.Dispose();
        }
    }

    static string F(double x, string format = "0.00") => double.IsFinite(x) ? x.ToString(format, CultureInfo.InvariantCulture) : "-";

    /// <summary>The ablation and sweep tables as Markdown.</summary>
    public static string Markdown(JsonObject report)
    {
        var sb = new StringBuilder();
        var plan = report["plan"]!;
        var seeds = plan["seeds"]!.AsArray().Count;
        sb.AppendLine($"Equal budget: {plan["steps"]} steps of {plan["batch"]} images, {seeds} seeds per row, {plan["samples"]} class-balanced samples per evaluation.");
        sb.AppendLine($"FD-FMNIST floor (the first {plan["samples"]} real test images against the training set): {F(report["floor_fd_fmnist"]!.GetValue<double>())}.");
        sb.AppendLine();
        sb.AppendLine("| variant | parameters | FD-FMNIST (mean ± std) | class accuracy | per seed FD |");
        sb.AppendLine("|---|---:|---:|---:|---|");
        foreach (var row in report["variants"]!.AsArray())
        {
            var runs = row!["runs"]!.AsArray().Select(r => F(r!["fd_fmnist"]!.GetValue<double>())).ToList();
            sb.AppendLine($"| {row["label"]} | {row["parameters"]!.GetValue<long>():N0} | {F(row["fd_fmnist_mean"]!.GetValue<double>())} ± {F(row["fd_fmnist_std"]!.GetValue<double>())} " +
                $"| {F(100 * row["class_accuracy_mean"]!.GetValue<double>(), "0.0")}% ± {F(100 * row["class_accuracy_std"]!.GetValue<double>(), "0.0")} | {string.Join(", ", runs)} |");
        }
        foreach (var (sweep, title) in new[] { ("phase1", "phase-1 steps (phase 2 fixed)"), ("phase2", "phase-2 steps (phase 1 fixed)") })
        {
            var points = report["sweeps"]![sweep]!.AsArray();
            if (points.Count == 0)
                continue;
            sb.AppendLine();
            sb.AppendLine($"| Hi-MAR, {title} | FD-FMNIST (mean ± std) | per seed |");
            sb.AppendLine("|---:|---:|---|");
            foreach (var p in points)
                sb.AppendLine($"| {p!["steps"]} | {F(p["mean"]!.GetValue<double>())} ± {F(p["std"]!.GetValue<double>())} | {string.Join(", ", p["fd_fmnist"]!.AsArray().Select(x => F(x!.GetValue<double>())))} |");
        }
        return sb.ToString();
    }

    /// <summary>ablation.png, sweep-phase1.png and sweep-phase2.png from a report.</summary>
    public static void Plot(JsonObject report, string outDir)
    {
        var floor = report["floor_fd_fmnist"]!.GetValue<double>();
        var rows = report["variants"]!.AsArray().Select((r, i) => (i, r!)).ToList();
        var blue = new Rgb24(31, 90, 200);
        Charts.Save(Path.Combine(outDir, "ablation.png"), "Table 5 on Fashion-MNIST (lower is better)", "FD-FMNIST (mean ± std over seeds)",
            [new ChartSeries("FD-FMNIST", blue, rows.Select(x => ((double)x.i, x.Item2["fd_fmnist_mean"]!.GetValue<double>(), x.Item2["fd_fmnist_std"]!.GetValue<double>())).ToList(), false)],
            rows.Select(x => ((double)x.i, x.Item2["key"]!.GetValue<string>())).ToList(), floor, xLabel: "variant");
        foreach (var (sweep, title) in new[] { ("phase1", "FD-FMNIST against phase-1 steps"), ("phase2", "FD-FMNIST against phase-2 steps") })
        {
            var points = report["sweeps"]![sweep]!.AsArray().Select(p => (Steps: p!["steps"]!.GetValue<int>(), Mean: p["mean"]!.GetValue<double>(), Std: p["std"]!.GetValue<double>())).ToList();
            if (points.Count == 0)
                continue;
            Charts.Save(Path.Combine(outDir, $"sweep-{sweep}.png"), title, "FD-FMNIST (mean ± std over seeds)",
                [new ChartSeries("Hi-MAR", blue, points.Select(p => (Math.Log2(p.Steps), p.Mean, p.Std)).ToList(), true)],
                points.Select(p => (Math.Log2(p.Steps), p.Steps.ToString(CultureInfo.InvariantCulture))).ToList(), floor,
                xLabel: $"{(sweep == "phase1" ? "phase-1" : "phase-2")} steps (log scale)");
        }
    }
}
