using System.Diagnostics;
using System.Text.Json.Nodes;
using HiMar.Model;
using HiMar.Runtime.Checkpoints;
using TorchSharp;

namespace HiMar.Runtime.Sampling;

/// <summary>`himar bench sample`: seconds per image and achieved GFLOP/s of the sampler at given settings.</summary>
public static class SampleBenchmark
{
    /// <summary>
    /// A model to time: a preset name or config file (random weights: timing does not depend on the values), or
    /// an imported folder, a `.pth` checkpoint or a parity fixture folder (its weights).
    /// </summary>
    public static HiMAR LoadForTiming(string model)
    {
        if (HiMarConfigModule.TryPreset(model) != null || model.EndsWith(".json", StringComparison.OrdinalIgnoreCase))
        {
            var m = new HiMAR(ModelConfigs.Resolve(model));
            m.eval();
            return m;
        }
        return ReferenceImport.LoadModel(model);
    }

    /// <summary>Runs one warm-up and <paramref name="repeat"/> timed runs of <paramref name="images"/> images; returns the report.</summary>
    public static JsonObject Run(HiMAR model, string modelName, SamplerOptions options, int images, int repeat, long seed = 0)
    {
        var labels = Enumerable.Range(0, images).Select(i => (long)(i % model.Config.Backbone.ClassCount)).ToArray();
        double Once(int run)
        {
            // Class models sample classes 0, 1, ...; text models a random caption (words or context) per image.
            torch.manual_seed(seed);
            using var condition = model.Config.Text.Conditioning == Conditioning.Text
                ? Condition.Random(model.Config, images)
                : Condition.NewLabels(torch.tensor(labels));
            using var noise = new SeededNoise(seed + run, 0, images);
            var sw = Stopwatch.StartNew();
            using var r = HiMarSampler.Sample(model, condition, noise, options);
            return sw.Elapsed.TotalSeconds;
        }
        var warmup = Once(-1);
        var times = Enumerable.Range(0, Math.Max(1, repeat)).Select(Once).OrderBy(t => t).ToArray();
        var median = times[times.Length / 2];
        var flops = SamplerFlops.Count(model.Config, options, images);
        return new JsonObject
        {
            ["benchmark"] = "sample",
            ["model"] = modelName,
            ["parameters"] = Weights.ParameterCount(model),
            ["images"] = images,
            ["seconds_per_image"] = median / images,
            ["seconds_median"] = median,
            ["seconds_min"] = times[0],
            ["seconds_warmup"] = warmup,
            ["runs"] = times.Length,
            ["gflop_per_image"] = flops / images / 1e9,
            ["gflops"] = flops / median / 1e9,
            ["settings"] = SamplerSettings.Describe(options, model.Config),
            ["device"] = model.Device.ToString(),
            ["threads"] = torch.get_num_threads(),
        };
    }
}
