using System.Diagnostics;
using System.Text.Json.Nodes;
using HiMar.Model;
using HiMar.Runtime.Checkpoints;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Training;

/// <summary>
/// `himar bench train`: seconds per training step (forward and backward of both phases' losses, gradient
/// clipping, AdamW and EMA) for a configuration and batch size, on random tokens (as from a latent cache).
/// </summary>
public static class TrainBenchmark
{
    /// <summary>Times <paramref name="steps"/> steps after <paramref name="warmup"/> untimed ones; returns the JSON report.</summary>
    public static JsonObject Run(HiMarConfig config, string name, int batch, int steps = 3, int warmup = 1, long seed = 0)
    {
        torch.manual_seed(seed);
        using var model = new HiMAR(config);
        Init.HiMar(model);
        using var shadow = new HiMAR(config);
        var ema = new Ema(model, shadow, 0.9999);
        ema.Reset();
        using var optimizer = new NamedAdamW(model, 0.02);
        model.train();
        var times = new List<double>();
        for (var i = 0; i < warmup + Math.Max(1, steps); i++)
        {
            using var scope = torch.NewDisposeScope();
            var tokens = torch.randn(batch, config.DenseTokens, config.TokenEmbedDim);
            var pivots = torch.randn(batch, config.PivotTokens, config.CondDim);
            var labels = torch.randint(0, config.ClassNum, [batch]);
            var sw = Stopwatch.StartNew();
            optimizer.ZeroGrad();
            var losses = model.TrainingLosses(tokens, pivots, labels, config.StepWarmup);
            losses.Total.backward();
            torch.nn.utils.clip_grad_norm_(optimizer.Parameters, 3.0);
            optimizer.Step(1e-4);
            ema.Update();
            if (i >= warmup)
                times.Add(sw.Elapsed.TotalSeconds);
        }
        times.Sort();
        var median = times[times.Count / 2];
        return new JsonObject
        {
            ["benchmark"] = "train",
            ["model"] = name,
            ["parameters"] = Weights.ParameterCount(model),
            ["batch"] = batch,
            ["seconds_per_step"] = median,
            ["seconds_min"] = times[0],
            ["images_per_second"] = batch / median,
            ["steps_timed"] = times.Count,
            ["diffusion_batch_mul"] = config.DiffusionBatchMul,
            ["dtype"] = "float32",
            ["threads"] = torch.get_num_threads(),
        };
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
