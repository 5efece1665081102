using HiMar.Model;
using HiMar.Runtime.Data;
using HiMar.Runtime.Imaging;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.PixelFormats;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Sampling;

/// <summary>What to generate and where to put it.</summary>
public sealed record SampleRequest
{
    /// <summary>One class label per image, in output order (class models).</summary>
    public IReadOnlyList<long> Labels { get; init; } = [];

    /// <summary>One caption per image, in output order (text models); "" is the unconditional caption.</summary>
    public IReadOnlyList<string>? Prompts { get; init; }

    /// <summary>The external text encoder of a text model that has no built-in one.</summary>
    public ITextEncoder? TextEncoder { get; init; }

    /// <summary>Images requested.</summary>
    public int Count => Prompts?.Count ?? Labels.Count;

    /// <summary>The run seed: image i always gets the same noise and order for a given seed.</summary>
    public long Seed { get; init; }

    /// <summary>Images per sampler batch.</summary>
    public int BatchSize { get; init; } = 8;

    /// <summary>The output folder (created if needed).</summary>
    public required string OutDir { get; init; }

    /// <summary>Write only the labelled grid, to this PNG path (no per-image files).</summary>
    public string? GridPath { get; init; }

    /// <summary>Grid columns; 0 for a square-ish grid.</summary>
    public int Columns { get; init; }

    /// <summary>Optional caption per class label (e.g. Fashion-MNIST's class names).</summary>
    public IReadOnlyList<string>? ClassNames { get; init; }

    /// <summary>Also write, per image, a strip of the decoded pivots and the image after every dense step.</summary>
    public bool Explain { get; init; }

    /// <summary>Sampler settings.</summary>
    public SamplerOptions Options { get; init; } = new();
}

/// <summary>The files a run wrote.</summary>
/// <param name="Images">One PNG per image.</param>
/// <param name="Grid">The labelled grid.</param>
/// <param name="Explanations">With `Explain`: one strip per image.</param>
/// <param name="Seconds">Sampling and decoding time.</param>
public sealed record SampleOutput(IReadOnlyList<string> Images, string Grid, IReadOnlyList<string> Explanations, double Seconds);

/// <summary>Samples tokens in batches, decodes them with the tokenizer (VAE or pixel patches) and writes PNG files and a labelled grid.</summary>
public static class SampleJob
{
    /// <summary>The most images one request makes: every tile of the grid is held in memory until it is drawn.</summary>
    public const int MaxImages = 10000;

    /// <summary>Runs the request. <paramref name="progress"/> gets (images done, counting a batch's share as its steps
    /// are taken; sampler progress).</summary>
    public static SampleOutput Run(HiMAR model, ITokenizer vae, SampleRequest request, Action<int, SamplerProgress>? progress = null)
    {
        var text = model.Config.Text.Conditioning == Conditioning.Text;
        if (text && request.Prompts == null)
            throw new Text.PromptException("this is a text-to-image model: give prompts (--prompt)");
        if (!text && request.Prompts != null)
            throw new Text.PromptException("this model is conditioned on class labels, not captions (use --classes)");
        if (request.Count == 0)
            throw new BadInputException("nothing to sample: no labels or prompts");
        if (request.Count > MaxImages)
            throw new BadInputException($"{request.Count} images requested; one run makes at most {MaxImages} (split it into runs with other --seed values).");
        if (request.BatchSize < 1)
            throw new BadInputException($"--batch: {request.BatchSize} images per batch; give at least 1.");
        foreach (var l in request.Labels)
            if (l < 0 || l > model.Config.Backbone.ClassCount)
                throw new ArgumentException($"class {l} is outside 0..{model.Config.Backbone.ClassCount - 1} (and {model.Config.Backbone.ClassCount} for unconditional)");
        // The whole request's condition, made (and every prompt checked) once, before any work; batches take rows of it.
        using var all = text
            ? Text.Prompts.Encode(model, request.Prompts!, request.TextEncoder)
            : Condition.NewLabels(torch.tensor(request.Labels.ToArray(), device: model.Device));
        var sw = System.Diagnostics.Stopwatch.StartNew();
        var imagesDir = Path.Combine(request.OutDir, "images");
        if (request.GridPath == null)
            Directory.CreateDirectory(imagesDir);
        var explainDir = Path.Combine(request.OutDir, "explain");
        if (request.Explain)
            Directory.CreateDirectory(explainDir);
        var paths = new List<string>();
        var explanations = new List<string>();
        var tiles = new List<Image<Rgb24>>();
        var options = request.Options with { KeepIntermediates = request.Explain };
        try
        {
            // Images count as done within a batch too: the sampler's steps scaled to the batch's images.
            var phase1Steps = model.Config.PivotTokens > 0 ? options.Phase1Steps ?? model.Config.Phase1Steps : 0;
            for (var start = 0; start < request.Count; start += request.BatchSize)
            {
                var count = Math.Min(request.BatchSize, request.Count - start);
                using var scope = torch.NewDisposeScope();
                using var noise = new SeededNoise(request.Seed, start, count);
                var condition = all.Narrow(start, count);
                var done = start;
                using var result = HiMarSampler.Sample(model, condition, noise, options,
                    p => progress?.Invoke(done + p.ImagesDone(count, phase1Steps, options.Phase2Steps), p));
                var images = Images.FromTensor(vae.Decode(result.Dense, options.Precision));
                for (var i = 0; i < count; i++)
                {
                    var index = start + i;
                    if (request.GridPath == null)
                    {
                        var path = Path.Combine(imagesDir, $"{index:D4}-{FileLabel(request, index)}.png");
                        Images.SavePng(images[i], path);
                        paths.Add(path);
                    }
                    if (images[i].Width < 96)
                    {
                        tiles.Add(Images.Resize(images[i], 96));
                        images[i].Dispose();
                    }
                    else
                        tiles.Add(images[i]);
                }
                if (request.Explain)
                    explanations.AddRange(Explain(vae, result, request, start, count, Math.Max(96, (int)result.Dense.shape[2] * 16)));
                progress?.Invoke(start + count, default);
            }
            var named = request.ClassNames is { Count: > 0 };
            string Name(long l) => named && l < request.ClassNames!.Count ? request.ClassNames[(int)l] : $"class {l}";
            var captions = text ? request.Prompts!.Select(p => p.Length == 0 ? "uncond" : p).ToList() : request.Labels.Select((l, i) => l == model.Config.Backbone.ClassCount ? $"{i} uncond" : named ? Name(l) : $"{i} {Name(l)}").ToList();
            var columns = request.Columns > 0 ? request.Columns : (int)Math.Ceiling(Math.Sqrt(tiles.Count));
            using var grid = Images.Grid(tiles, captions, columns);
            var gridPath = request.GridPath ?? Path.Combine(request.OutDir, "grid.png");
            Images.SavePng(grid, gridPath);
            return new SampleOutput(paths, gridPath, explanations, sw.Elapsed.TotalSeconds);
        }
        finally
        {
            foreach (var t in tiles)
                t.Dispose();
        }
    }

    /// <summary>A file-name fragment of a prompt: lower-case letters and digits joined by hyphens, at most 40 characters.</summary>
    /// <summary>
    /// An image's file name label, in the grid's words: the caption's words, the class name where the model names
    /// its classes (`sneaker`, `t-shirt-top`), else `classN`; `uncond` for the null condition.
    /// </summary>
    static string FileLabel(SampleRequest request, int index)
    {
        if (request.Prompts != null)
            return Slug(request.Prompts[index]);
        var label = request.Labels[index];
        if (request.ClassNames is not { Count: > 0 } names)
            return $"class{label}";
        return label >= 0 && label < names.Count ? Slug(names[(int)label].Replace('/', ' ')) : label == names.Count ? "uncond" : $"class{label}";
    }

    static string Slug(string prompt)
    {
        var words = WordVocabulary.Words(prompt);
        var slug = string.Join("-", words.Select(w => new string(w.Where(char.IsAsciiLetterOrDigit).ToArray())).Where(w => w.Length > 0));
        return slug.Length == 0 ? "uncond" : slug[..Math.Min(40, slug.Length)];
    }

    /// <summary>The colour that marks the tokens decided at a step in explanation strips and in `himar serve`.</summary>
    public static readonly Rgb24 DecidedColor = new(255, 120, 0);

    /// <summary>
    /// Per image, the run step by step: rows with the pivot grid after every phase-1 step, then rows with the image
    /// after every phase-2 step, each with the tokens decided at that step outlined.
    /// </summary>
    static IEnumerable<string> Explain(ITokenizer vae, SampleResult result, SampleRequest request, int start, int count, int side)
    {
        var precision = request.Options.Precision;
        var steps = result.Intermediates;
        // Each step's grid of its own phase, decoded: the pivots in phase 1, the dense tokens in phase 2.
        var decoded = steps.Select(st => Images.FromTensor(vae.Decode(st.Phase == 1 ? st.Pivots : st.Dense, precision))).ToList();
        var decided = steps.Select(st => st.Decided.cpu().data<bool>().ToArray()).ToList(); // (B * g * g) each
        var phase1 = steps.Count(st => st.Phase == 1);
        // At most 16 tiles a row (phase 1 of the reference's 4 x cond_scale steps wraps); phase 2 starts a new row.
        var columns = Math.Min(16, Math.Max(phase1, steps.Count - phase1));
        var phase1Cells = (phase1 + columns - 1) / columns * columns;
        try
        {
            for (var i = 0; i < count; i++)
            {
                var tiles = new List<Image<Rgb24>>();
                var captions = new List<string>();
                try
                {
                    for (var k = 0; k < steps.Count; k++)
                    {
                        var st = steps[k];
                        if (st.Phase == 2 && k == phase1)
                            for (var pad = phase1; pad < phase1Cells; pad++) // finish the phase-1 rows with blanks
                            {
                                tiles.Add(new Image<Rgb24>(side, side, new Rgb24(255, 255, 255)));
                                captions.Add("");
                            }
                        var image = decoded[k][i];
                        var grid = (int)st.Decided.shape[1];
                        var (offset, cell) = vae.TokenCells(grid, image.Width);
                        var tile = Images.Resize(image, side);
                        Images.OutlineTokens(tile, decided[k].AsSpan(i * grid * grid, grid * grid), grid, offset, cell, (double)side / image.Width, DecidedColor);
                        tiles.Add(tile);
                        captions.Add(st.Phase == 1 ? $"pivots {st.Step + 1}" : $"dense {st.Step + 1}");
                    }
                    using var strip = Images.Grid(tiles, captions, columns);
                    var path = Path.Combine(request.OutDir, "explain", $"{start + i:D4}.png");
                    Images.SavePng(strip, path);
                    yield return path;
                }
                finally
                {
                    foreach (var t in tiles)
                        t.Dispose();
                }
            }
        }
        finally
        {
            foreach (var img in decoded.SelectMany(d => d))
                img.Dispose();
        }
    }
}
