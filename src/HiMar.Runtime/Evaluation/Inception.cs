using System.Text.Json;
using System.Text.Json.Nodes;
using HiMar.Model;
using HiMar.Runtime.Checkpoints;
using HiMar.Runtime.Native;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.PixelFormats;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Evaluation;

/// <summary>
/// The FID Inception network's weights: pytorch-fid's <c>pt_inception-2015-12-05-6726825d.pth</c> as published (a
/// legacy-format <c>torch.save</c> of the state dict, PyTorch 1.1 era, 566 tensors with the BatchNorm
/// <c>num_batches_tracked</c> counters) or the same state dict as safetensors.
/// </summary>
public static class InceptionWeights
{
    const string Counter = ".num_batches_tracked";

    /// <summary>
    /// Builds the network (<paramref name="inputSize"/> 299 for comparable numbers), loads the weights strictly and
    /// returns it in eval mode. BatchNorm step counters are optional either way, as in PyTorch: a file without them
    /// loads (they are only training state), and so does a file with them into a model without. Any problem is one
    /// <see cref="CheckpointFormatException"/> naming the file.
    /// </summary>
    public static InceptionV3 Load(string path, long inputSize = 299)
    {
        var model = new InceptionV3(inputSize);
        try
        {
            LoadInto(model, path);
        }
        catch
        {
            model.Dispose();
            throw;
        }
        model.eval();
        return model;
    }

    /// <summary>Loads weights from <paramref name="path"/> (safetensors or <c>torch.save</c>) into a model.</summary>
    public static void LoadInto(InceptionV3 model, string path)
    {
        TorchCheckpoint? checkpoint = null;
        Dictionary<string, Tensor> file;
        if (IsSafeTensors(path))
            file = SafeTensors.Load(path);
        else
        {
            checkpoint = TorchCheckpoint.Read(path);
            file = checkpoint.StateDict("state_dict");
        }
        var filled = new List<Tensor>();
        try
        {
            var own = Weights.StateDict(model);
            var weights = new Dictionary<string, Tensor>(file);
            foreach (var (key, t) in own)
                if (key.EndsWith(Counter, StringComparison.Ordinal) && !weights.ContainsKey(key))
                {
                    var zero = torch.zeros_like(t, device: torch.CPU);
                    filled.Add(zero);
                    weights[key] = zero;
                }
            foreach (var key in weights.Keys.Where(k => k.EndsWith(Counter, StringComparison.Ordinal) && !own.ContainsKey(k)).ToList())
                weights.Remove(key);
            Weights.Load(model, weights, true);
        }
        catch (WeightMismatchException e)
        {
            throw new CheckpointFormatException($"{path}: {e.Message}", e);
        }
        finally
        {
            foreach (var t in filled)
                t.Dispose();
            if (checkpoint is null)
                foreach (var t in file.Values)
                    t.Dispose();
            checkpoint?.Dispose();
        }
    }

    /// <summary>A safetensors file starts with its header length (8 bytes) and the header's opening brace.</summary>
    static bool IsSafeTensors(string path)
    {
        try
        {
            using var s = File.OpenRead(path);
            Span<byte> head = stackalloc byte[9];
            return s.Read(head) == 9 && head[8] == (byte)'{';
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new CheckpointFormatException($"{path}: cannot be read ({e.Message}).", e);
        }
    }
}

/// <summary>Inception outputs of a set of images: pool3 features (n, 2048) and the logits of the Inception Score
/// (n, 1008), float32 on the CPU.</summary>
/// <param name="Features">The 2048-d pool3 features (FID, precision/recall).</param>
/// <param name="Logits">Features times <c>fc.weight</c>, no bias (the Inception Score's classes).</param>
public sealed record InceptionOutputs(Tensor Features, Tensor Logits) : IDisposable
{
    /// <summary>The number of images.</summary>
    public int Count => (int)Features.shape[0];

    /// <summary>Disposes both tensors.</summary>
    public void Dispose()
    {
        Features.Dispose();
        Logits.Dispose();
    }
}

/// <summary>
/// Runs the FID Inception network over images as pytorch-fid does: each image RGB in [0, 1] (grey and alpha
/// images converted, as PIL's <c>convert('RGB')</c>), resized bilinearly to the network's input size by the network,
/// in batches that each run inside a dispose scope.
/// </summary>
public static class InceptionFeatures
{
    /// <summary>The image files read from a folder (the formats pytorch-fid lists that ImageSharp decodes, and GIF/TGA).</summary>
    public static readonly IReadOnlyList<string> Extensions = [".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tga", ".tif", ".tiff", ".webp"];

    /// <summary>The images directly in <paramref name="dir"/> (not in subfolders), in ordinal name order.</summary>
    public static IReadOnlyList<string> ListImages(string dir)
    {
        if (!Directory.Exists(dir))
            throw new DirectoryNotFoundException($"{dir}: no such folder of images.");
        var files = Directory.GetFiles(dir)
            .Where(f => Extensions.Contains(Path.GetExtension(f).ToLowerInvariant()))
            .OrderBy(f => f, StringComparer.Ordinal)
            .ToList();
        if (files.Count == 0)
            throw new InvalidDataException($"{dir}: no images ({string.Join(", ", Extensions)}).");
        return files;
    }

    /// <summary>One image file as (1, 3, H, W) float32 RGB in [0, 1]; an unreadable file, or one over
    /// <see cref="Imaging.ImageFiles.MaxPixels"/> pixels, is a <see cref="BadInputException"/> naming it.</summary>
    public static Tensor ReadImage(string path)
    {
        using (var image = Imaging.ImageFiles.Load<Rgb24>(path))
        {
            var data = new byte[image.Width * image.Height * 3];
            image.CopyPixelDataTo(data);
            using var hwc = torch.tensor(data, [image.Height, image.Width, 3]);
            // (H, W, 3) bytes -> (1, 3, H, W) in [0, 1]
            using var chw = hwc.permute(2, 0, 1).unsqueeze(0);
            using var f = chw.to(ScalarType.Float32);
            return f / 255.0;
        }
    }

    /// <summary>Outputs for every image of a folder (see <see cref="ListImages"/>); <paramref name="progress"/> gets
    /// (done, total) after each batch.</summary>
    public static InceptionOutputs FromFolder(InceptionV3 model, string dir, int batch = 50, Action<int, int>? progress = null)
    {
        var files = ListImages(dir);
        return Run(model, files.Count, (start, count) =>
        {
            // Each image is resized on its own, so images of different sizes batch together.
            var images = files.Skip(start).Take(count).Select(f =>
            {
                using var image = ReadImage(f);
                return InceptionV3.Resize(image, model.InputSize);
            }).ToArray();
            var joined = torch.cat(images, 0);
            foreach (var t in images)
                t.Dispose();
            return joined;
        }, batch, progress);
    }

    /// <summary>Outputs for images (n, 3, H, W) RGB in [0, 1].</summary>
    public static InceptionOutputs FromTensor(InceptionV3 model, Tensor images, int batch = 50, Action<int, int>? progress = null) =>
        Run(model, (int)images.shape[0], (start, count) => images.narrow(0, start, count), batch, progress);

    static InceptionOutputs Run(InceptionV3 model, int total, Func<int, int, Tensor> slice, int batch, Action<int, int>? progress)
    {
        if (batch < 1)
            throw new ArgumentException($"the batch size must be positive (got {batch}).");
        var device = model.parameters().First().device;
        using var noGrad = torch.no_grad();
        var features = new List<Tensor>();
        var logits = new List<Tensor>();
        try
        {
            for (var start = 0; start < total; start += batch)
            {
                using var scope = torch.NewDisposeScope();
                using var gcPause = GcPause.Begin(); // libtorch reads TorchSharp's temporary Scalars: no collection mid-call
                var count = Math.Min(batch, total - start);
                var x = slice(start, count).to(ScalarType.Float32).to(device);
                var f = model.Features(x);
                features.Add(f.cpu().MoveToOuterDisposeScope());
                logits.Add(model.ScoreLogits(f).cpu().MoveToOuterDisposeScope());
                progress?.Invoke(start + count, total);
            }
            return new InceptionOutputs(torch.cat(features, 0), torch.cat(logits, 0));
        }
        finally
        {
            foreach (var t in features.Concat(logits))
                t.Dispose();
        }
    }
}

/// <summary>What an ImageNet-metrics evaluation measured, as written to eval.json.</summary>
/// <param name="Report">The JSON report.</param>
public sealed record ImageNetEvalResult(JsonObject Report);

/// <summary>
/// The ImageNet metrics of a folder of generated images, computed as the standard tools compute them: FID of the
/// pool3 features against reference statistics (an <c>.npz</c> with <c>mu</c>, <c>sigma</c>) or reference images;
/// the Inception Score over 10 splits from the bias-free logits of all 1008 classes; improved precision/recall
/// with k = 3 on the pool3 features, which needs the reference images (statistics hold no individual features).
/// </summary>
public static class ImageNetEval
{
    /// <summary>The Inception Score's splits.</summary>
    public const int Splits = 10;

    /// <summary>The neighbourhood size of precision/recall.</summary>
    public const int NearestK = 3;

    /// <summary>Reference statistics of an image folder, written as an <c>.npz</c> (float64 <c>mu</c>, <c>sigma</c>).</summary>
    public static FeatureStats WriteStats(InceptionV3 model, string imagesDir, string outPath, int batch = 50, Action<int, int>? progress = null)
    {
        using var outputs = InceptionFeatures.FromFolder(model, imagesDir, batch, progress);
        var stats = FeatureStats.Of(outputs.Features);
        Metrics.WriteNpz(stats, outPath);
        return stats;
    }

    /// <summary>
    /// Scores <paramref name="imagesDir"/> against <paramref name="refStats"/> or <paramref name="refImages"/> (exactly
    /// one), writes <c>eval.json</c> in <paramref name="outDir"/> and returns the report. <paramref name="progress"/>
    /// gets (what, done, total) for each set of images run through the network.
    /// </summary>
    public static ImageNetEvalResult Run(InceptionV3 model, string weightsPath, string imagesDir, string? refStats, string? refImages, string outDir,
        int batch = 50, Action<string, int, int>? progress = null)
    {
        if ((refStats is null) == (refImages is null))
            throw new ArgumentException("give reference statistics (.npz) or reference images, exactly one.");
        using var scope = torch.NewDisposeScope();
        // Read the reference statistics before the long run, so a bad file fails at once.
        var refFromFile = refStats is null ? null : Metrics.ReadNpz(refStats);
        var generated = InceptionFeatures.FromFolder(model, imagesDir, batch, (d, t) => progress?.Invoke("generated images", d, t));
        var genStats = FeatureStats.Of(generated.Features);
        InceptionOutputs? reference = null;
        FeatureStats refStatsValue;
        if (refFromFile is not null)
        {
            var dims = genStats.Mu.shape[0];
            if (refFromFile.Mu.shape is not [var d] || d != dims || refFromFile.Sigma.shape is not [var r, var c] || r != dims || c != dims)
                throw new InvalidDataException(
                    $"{refStats}: statistics of shape mu [{string.Join(", ", refFromFile.Mu.shape)}], sigma [{string.Join(", ", refFromFile.Sigma.shape)}], but the Inception pool features are {dims}-d.");
            refStatsValue = refFromFile;
        }
        else
        {
            reference = InceptionFeatures.FromFolder(model, refImages!, batch, (d, t) => progress?.Invoke("reference images", d, t));
            refStatsValue = FeatureStats.Of(reference.Features);
        }
        var fid = Metrics.FrechetDistance(genStats, refStatsValue);
        var splits = Math.Min(Splits, generated.Count);
        var probabilities = torch.nn.functional.softmax(generated.Logits.to(ScalarType.Float64), 1);
        var (isMean, isStd) = Metrics.InceptionScore(probabilities, splits);
        JsonNode? precision = null, recall = null;
        if (reference is not null && reference.Count > NearestK && generated.Count > NearestK)
        {
            var (p, r) = Metrics.PrecisionRecall(reference.Features, generated.Features, NearestK);
            (precision, recall) = (p, r);
        }
        var report = new JsonObject
        {
            ["metrics"] = new JsonObject
            {
                ["fid"] = fid,
                ["inception_score"] = isMean,
                ["inception_score_std"] = isStd,
                ["precision"] = precision,
                ["recall"] = recall,
            },
            ["images"] = generated.Count,
            ["images_dir"] = imagesDir,
            ["reference"] = refStats is not null
                ? new JsonObject { ["statistics"] = refStats }
                : new JsonObject { ["images_dir"] = refImages, ["images"] = reference!.Count },
            ["feature_network"] = "FID InceptionV3 (pytorch-fid port of the TensorFlow graph of 2015-12-05)",
            ["inception_weights"] = weightsPath,
            ["inception_weights_hash"] = EvalJob.Hash(weightsPath),
            ["settings"] = new JsonObject
            {
                ["input"] = "RGB in [0, 1], mapped to [-1, 1] (pytorch-fid)",
                ["resize"] = $"bilinear to {model.InputSize}x{model.InputSize}, align_corners=False, no antialiasing (pytorch-fid)",
                ["is_splits"] = splits,
                ["is_logits"] = "pool3 features times fc.weight, no bias, all 1008 classes (torch-fidelity, guided-diffusion)",
                ["pr_k"] = NearestK,
                ["pr_note"] = reference is null ? "precision/recall need reference images, not statistics" : null,
            },
        };
        Directory.CreateDirectory(outDir);
        AtomicFile.WriteText(Path.Combine(outDir, "eval.json"), report.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        generated.Dispose();
        reference?.Dispose();
        return new ImageNetEvalResult(report);
    }
}
