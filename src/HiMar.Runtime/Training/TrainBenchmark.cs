using System.Diagnostics;
using System.Text.Json.Nodes;
using HiMar.Model;
using HiMar.Runtime.Checkpoints;
using HiMar.Runtime.Distributed;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Training;

/// <summary>
/// `himar bench train`: seconds per training step (forward and backward of both phases' losses, gradient
/// clipping, AdamW and EMA) for a configuration and batch size, on random tokens (as from a latent cache).
/// Under MPI (N ranks) it also measures data-parallel scaling at a fixed per-rank batch: rank 0 first times steps
/// alone (the others wait), then every rank times steps with the bucketed gradient all-reduce, and the report
/// gives both step times, the all-reduce's share and the scaling efficiency t(1 rank) / t(N ranks).
/// </summary>
public static class TrainBenchmark
{
    /// <summary>Times <paramref name="steps"/> steps after <paramref name="warmup"/> untimed ones; returns the JSON
    /// report (collective when <paramref name="communicator"/> has several ranks).</summary>
    public static JsonObject Run(HiMarConfig config, string name, int batch, int steps = 3, int warmup = 1, long seed = 0, ICommunicator? communicator = null,
        Precision precision = Precision.Fp32)
    {
        var comm = communicator ?? SingleProcess.Instance;
        torch.manual_seed(seed);
        using var model = new HiMAR(config);
        Init.HiMar(model);
        using var shadow = new HiMAR(config);
        var ema = new Ema(model, shadow, 0.9999);
        ema.Reset();
        using var optimizer = new NamedAdamW(model, 0.02);
        using var buckets = new GradientBuckets(optimizer.Parameters, comm);
        model.train();

        (double Step, double AllReduce, double Min) Time(bool together)
        {
            var times = new List<(double Step, double AllReduce)>();
            for (var i = 0; i < warmup + Math.Max(1, steps); i++)
            {
                using var scope = torch.NewDisposeScope();
                var tokens = torch.randn(batch, config.DenseTokens, config.TokenEmbedDim);
                var pivots = torch.randn(batch, config.PivotTokens, config.Pivots.Channels);
                var condition = Condition.Random(config, batch);
                var sw = Stopwatch.StartNew();
                optimizer.ZeroGrad();
                using (var mixed = MixedPrecision.ForTraining(model, precision))
                {
                    var losses = model.TrainingLosses(tokens, pivots, condition, config.Training.PivotConditionWarmupEpochs);
                    losses.Total.backward();
                }
                var reduceStart = sw.Elapsed.TotalSeconds;
                if (together)
                    buckets.AllReduceAverage();
                var reduce = sw.Elapsed.TotalSeconds - reduceStart;
                torch.nn.utils.clip_grad_norm_(optimizer.Parameters, 3.0);
                optimizer.Step(1e-4);
                if (comm.IsRoot())
                    ema.Update();
                if (i >= warmup)
                    times.Add((sw.Elapsed.TotalSeconds, reduce));
            }
            var sorted = times.OrderBy(t => t.Step).ToList();
            var median = sorted[sorted.Count / 2];
            return (median.Step, median.AllReduce, sorted[0].Step);
        }

        var report = new JsonObject
        {
            ["benchmark"] = "train",
            ["model"] = name,
            ["parameters"] = Weights.ParameterCount(model),
            ["batch"] = batch,
        };
        if (comm.Size == 1)
        {
            var t = Time(false);
            report["seconds_per_step"] = t.Step;
            report["seconds_min"] = t.Min;
            report["images_per_second"] = batch / t.Step;
        }
        else
        {
            Span<double> alone = [0];
            if (comm.IsRoot())
                alone[0] = Time(false).Step;
            // The other ranks sleep meanwhile: a spinning barrier would take a core from rank 0's baseline.
            comm.IdleBarrier();
            comm.Broadcast(alone, 0);
            var t = Time(true);
            Span<double> slowest = [t.Step, t.AllReduce];
            AllReduceBenchmark.Max(comm, slowest);
            report["ranks"] = comm.Size;
            report["backend"] = comm.Backend;
            report["global_batch"] = batch * comm.Size;
            report["seconds_per_step_1_rank"] = alone[0];
            report["seconds_per_step"] = slowest[0];
            report["allreduce_seconds_per_step"] = slowest[1];
            report["allreduce_buckets"] = buckets.Count;
            report["allreduce_bytes"] = buckets.Bytes;
            report["images_per_second_1_rank"] = batch / alone[0];
            report["images_per_second"] = batch * comm.Size / slowest[0];
            report["scaling_efficiency"] = alone[0] / slowest[0];
        }
        report["steps_timed"] = Math.Max(1, steps);
        report["diffusion_batch_mul"] = config.Training.DiffusionBatchMul;
        report["precision"] = Native.Precisions.Name(precision);
        report["weights_dtype"] = "float32";
        report["threads"] = torch.get_num_threads();
        return report;
    }

    /// <summary>A configuration by preset name, config JSON, parity fixture folder or imported folder.</summary>
    public static HiMarConfig ConfigOf(string model)
    {
        if (Directory.Exists(model))
        {
            var manifest = Path.Combine(model, "manifest.json");
            return ModelConfigs.Resolve(File.Exists(manifest) ? manifest : Path.Combine(model, ReferenceImport.ConfigFile));
        }
        return ModelConfigs.Resolve(model);
    }
}
