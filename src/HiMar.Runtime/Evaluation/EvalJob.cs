using System.Security.Cryptography;
using System.Text.Json;
using System.Text.Json.Nodes;
using HiMar.Model;
using HiMar.Runtime.Checkpoints;
using HiMar.Runtime.Data;
using HiMar.Runtime.Sampling;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.PixelFormats;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Evaluation;

/// <summary>What `himar eval` measured, with every setting that produced the numbers.</summary>
/// <param name="Report">The JSON written to eval.json.</param>
/// <param name="Reused">Images found on disk from an earlier run and not sampled again.</param>
public sealed record EvalResult(JsonObject Report, int Reused);

/// <summary>
/// Evaluates a Fashion-MNIST model: N class-balanced samples (seeded; images already in the output folder are
/// reused, so an interrupted evaluation resumes), then FD-FMNIST against the training set's statistics and the
/// classifier's accuracy on the intended classes. A text model is prompted with captions from the held-out
/// templates (<see cref="FashionCaptions.HeldOutTemplates"/>: the training words in phrasings never trained on),
/// image i asking for class i mod 10, so its accuracy measures whether it draws what the caption names.
/// </summary>
public static class EvalJob
{
    /// <summary>A short content hash of a file or of every file of a folder (weights identify the checkpoint).</summary>
    public static string Hash(string path)
    {
        using var sha = SHA256.Create();
        var files = Directory.Exists(path) ? Directory.GetFiles(path, "*.safetensors").OrderBy(f => f, StringComparer.Ordinal).ToArray() : [path];
        foreach (var f in files)
        {
            var bytes = File.ReadAllBytes(f);
            sha.TransformBlock(bytes, 0, bytes.Length, null, 0);
        }
        sha.TransformFinalBlock([], 0, 0);
        return Convert.ToHexString(sha.Hash!).ToLowerInvariant()[..16];
    }

    /// <summary>The held-out prompt of evaluation image <paramref name="i"/>: class i mod 10, then every template
    /// and phrase in turn.</summary>
    public static string HeldOutPrompt(int i, int classes = 10) => Prompt(FashionCaptions.HeldOutTemplates, i, classes);

    /// <summary>The prompt of evaluation image <paramref name="i"/> under <paramref name="templates"/>.</summary>
    public static string Prompt(string[] templates, int i, int classes = 10)
    {
        var label = i % classes;
        var phrases = FashionCaptions.ClassPhrases[label];
        var round = i / classes;
        return FashionCaptions.Fill(templates[round % templates.Length], phrases[round / templates.Length % phrases.Length]);
    }

    static Tensor ReadGrey(string path)
    {
        using var img = Imaging.ImageFiles.Load<L8>(path);
        var data = new byte[img.Width * img.Height];
        img.CopyPixelDataTo(data);
        using var t = torch.tensor(data, [1, 1, img.Height, img.Width]);
        return t.to(ScalarType.Float32) / 127.5 - 1.0;
    }

    /// <summary>Runs the evaluation into <paramref name="outDir"/> (images/ and eval.json); <paramref name="tokenizer"/>
    /// decodes the tokens (default: Fashion-MNIST's pixel patches).</summary>
    public static EvalResult Run(HiMAR model, string checkpoint, bool ema, FashionClassifier classifier, string statsPath, int count, SamplerOptions options,
        long seed, string outDir, int batch = 50, Action<int, int>? progress = null, ITextEncoder? textEncoder = null, bool trainingTemplates = false,
        ITokenizer? tokenizer = null)
    {
        var text = model.Config.Text.Conditioning == Conditioning.Text;
        var classes = text ? FashionCaptions.ClassPhrases.Length : model.Config.Backbone.ClassCount;
        var labels = Enumerable.Range(0, count).Select(i => (long)(i % classes)).ToArray();
        var templates = trainingTemplates ? FashionCaptions.TrainTemplates : FashionCaptions.HeldOutTemplates;
        var templateName = trainingTemplates ? "training templates" : "held-out templates";
        var prompts = text ? Enumerable.Range(0, count).Select(i => Prompt(templates, i, classes)).ToArray() : null;
        var imagesDir = Path.Combine(outDir, "images");
        Directory.CreateDirectory(outDir);
        // Images on disk are only reused when they come from the same checkpoint, weights, seed and settings.
        var identity = new JsonObject
        {
            ["checkpoint_hash"] = Hash(checkpoint),
            ["weights"] = ema ? "ema" : "model",
            ["seed"] = seed,
            ["settings"] = SamplerSettings.Describe(options, model.Config),
            ["prompts"] = text ? templateName : null,
        }.ToJsonString(new JsonSerializerOptions { WriteIndented = true });
        var identityPath = Path.Combine(outDir, "sampling.json");
        if (File.Exists(identityPath) && Directory.Exists(imagesDir) && Directory.EnumerateFiles(imagesDir, "*.png").Any())
        {
            var previous = File.ReadAllText(identityPath);
            if (previous != identity)
                throw new InvalidDataException(
                    $"{outDir}: holds images sampled with other settings or weights (see its sampling.json); remove the folder or choose another output folder.");
        }
        AtomicFile.WriteText(identityPath, identity);
        Directory.CreateDirectory(imagesDir);
        string PathOf(int i) => Path.Combine(imagesDir, $"{i:D5}-class{labels[i]}.png");
        tokenizer ??= PixelPatchTokenizer.Fashion;
        var missing = Enumerable.Range(0, count).Where(i => !File.Exists(PathOf(i))).ToList();
        var reused = count - missing.Count;
        var done = reused;
        // Progress moves within a batch too: the sampler's steps scaled to the batch's images.
        var phase1Steps = model.Config.PivotTokens > 0 ? options.Phase1Steps ?? model.Config.Phase1Steps : 0;
        // Sample the missing images in runs of consecutive indices, so image i's noise is the same as in a full run.
        foreach (var run in missing.Select((i, k) => (i, k)).GroupBy(x => x.i - x.k).Select(g => g.Select(x => x.i).ToList()))
            for (var start = 0; start < run.Count; start += batch)
            {
                var idx = run.Skip(start).Take(batch).ToList();
                using var scope = torch.NewDisposeScope();
                using var noise = new SeededNoise(seed, idx[0], idx.Count);
                using var condition = text
                    ? Text.Prompts.Encode(model, idx.Select(i => prompts![i]).ToList(), textEncoder)
                    : Condition.NewLabels(torch.tensor(idx.Select(i => labels[i]).ToArray()));
                var before = done;
                using var r = HiMarSampler.Sample(model, condition, noise, options,
                    p => progress?.Invoke(before + p.ImagesDone(idx.Count, phase1Steps, options.Phase2Steps), count));
                var pictures = Imaging.Images.FromTensor(tokenizer.Decode(r.Dense));
                for (var k = 0; k < idx.Count; k++)
                {
                    Imaging.Images.SavePng(pictures[k], PathOf(idx[k]));
                    pictures[k].Dispose();
                }
                done += idx.Count;
                progress?.Invoke(done, count);
            }
        using var evalScope = torch.NewDisposeScope();
        var images = torch.cat(Enumerable.Range(0, count).Select(i => ReadGrey(PathOf(i))).ToArray());
        var (features, probs) = ClassifierRuns.Apply(classifier, images);
        using var gen = FeatureStats.Of(features);
        using var train = Metrics.ReadNpz(statsPath);
        var fd = Metrics.FrechetDistance(gen, train);
        var correct = probs.argmax(1).eq(torch.tensor(labels)).to(ScalarType.Float64);
        var acc = correct.mean().item<double>();
        var hits = correct.data<double>().ToArray();
        var perClass = new JsonObject();
        for (var c = 0; c < classes; c++)
        {
            var rows = Enumerable.Range(0, count).Where(i => labels[i] == c).ToList();
            if (rows.Count > 0)
                perClass[Catalog.ModelTraits.LabelText(model.Config, c)] = rows.Average(i => hits[i]);
        }
        var report = new JsonObject
        {
            ["metrics"] = new JsonObject { ["fd_fmnist"] = fd, ["class_accuracy"] = acc },
            ["class_accuracy_per_class"] = perClass,
            ["conditioning"] = text ? "text" : "class",
            ["prompts"] = text ? templateName : null,
            ["prompt_templates"] = text ? new JsonArray(templates.Select(t => (JsonNode)JsonValue.Create(t)).ToArray()) : null,
            ["example_prompts"] = text ? new JsonArray(prompts!.Take(Math.Min(count, 20)).Select(p => (JsonNode)JsonValue.Create(p)).ToArray()) : null,
            ["images"] = count,
            ["checkpoint"] = checkpoint,
            ["checkpoint_hash"] = Hash(checkpoint),
            ["weights"] = ema ? "ema" : "model",
            ["seed"] = seed,
            ["settings"] = SamplerSettings.Describe(options, model.Config),
            ["feature_network"] = "FashionClassifier (models/fashion-classifier)",
            ["reference_statistics"] = statsPath,
        };
        AtomicFile.WriteText(Path.Combine(outDir, "eval.json"), report.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        return new EvalResult(report, reused);
    }
}
