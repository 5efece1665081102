using System.Security.Cryptography;
using System.Text.Json;
using System.Text.Json.Nodes;
using HiMar.Model;
using HiMar.Runtime.Checkpoints;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Data;

/// <summary>Training batches as tokens: dense tokens (B, N, C) and pivots (B, S, C) with their labels.</summary>
public interface ITokenSource
{
    /// <summary>Number of examples.</summary>
    int Count { get; }

    /// <summary>Class label of each example.</summary>
    IReadOnlyList<long> Labels { get; }

    /// <summary>Number of classes.</summary>
    int ClassCount { get; }

    /// <summary>The tokens of the examples at <paramref name="indices"/>, mirrored where <paramref name="flips"/> says.</summary>
    (Tensor Tokens, Tensor Pivots) Batch(IReadOnlyList<int> indices, IReadOnlyList<bool> flips);

    /// <summary>As <see cref="Batch(IReadOnlyList{int}, IReadOnlyList{bool})"/> for one process's rows of a global
    /// batch: sampling noise, if any, is drawn for every row of the global batch and narrowed to
    /// <paramref name="rows"/> (data-parallel training). Deterministic sources ignore the window.</summary>
    (Tensor Tokens, Tensor Pivots) Batch(IReadOnlyList<int> indices, IReadOnlyList<bool> flips, RowWindow rows) => Batch(indices, flips);

    /// <summary>Throws <see cref="InvalidDataException"/> with a clear message if the tokens cannot feed this model.</summary>
    void CheckFits(HiMarConfig config);
}

/// <summary>Images tokenized on the fly (the pixel-patch tokenizer, or a VAE without a cache).</summary>
public sealed class TokenizedImages(IImageDataset images, ITokenizer tokenizer) : ITokenSource
{
    /// <inheritdoc/>
    public int Count => images.Count;

    /// <inheritdoc/>
    public IReadOnlyList<long> Labels => images.Labels;

    /// <inheritdoc/>
    public int ClassCount => images.ClassCount;

    /// <inheritdoc/>
    public (Tensor Tokens, Tensor Pivots) Batch(IReadOnlyList<int> indices, IReadOnlyList<bool> flips) =>
        Batch(indices, flips, RowWindow.Whole(indices.Count));

    /// <inheritdoc/>
    public (Tensor Tokens, Tensor Pivots) Batch(IReadOnlyList<int> indices, IReadOnlyList<bool> flips, RowWindow rows)
    {
        using var scope = torch.NewDisposeScope();
        var (t, p) = tokenizer.Encode(images.Batch(indices, flips), rows);
        return (t.MoveToOuterDisposeScope(), p.MoveToOuterDisposeScope());
    }

    /// <inheritdoc/>
    public void CheckFits(HiMarConfig config)
    {
        if (images.ClassCount > config.Backbone.ClassCount)
            throw new InvalidDataException($"the data has {images.ClassCount} classes, the model {config.Backbone.ClassCount}.");
    }
}

/// <summary>
/// A latent cache written by `himar cache`: for every image and its mirror, the VAE posterior moments at the image
/// size and at half size (the pivots), in safetensors shards, with a manifest (count, sizes, channels, the VAE's
/// hash, classes, skipped files). Training samples latents from the moments as the reference does.
/// </summary>
public sealed class LatentCache : ITokenSource, IDisposable
{
    /// <summary>The manifest's file name.</summary>
    public const string ManifestFile = "cache.json";

    readonly Tensor dense, denseFlip, pivots, pivotsFlip; // (count, 2C, h, w) moments
    readonly long[] labels;

    LatentCache(JsonObject manifest, Tensor dense, Tensor denseFlip, Tensor pivots, Tensor pivotsFlip, long[] labels, string dir)
    {
        Manifest = manifest;
        (this.dense, this.denseFlip, this.pivots, this.pivotsFlip, this.labels) = (dense, denseFlip, pivots, pivotsFlip, labels);
        Directory = dir;
    }

    /// <summary>The manifest.</summary>
    public JsonObject Manifest { get; }

    /// <summary>The cache folder.</summary>
    public string Directory { get; }

    /// <summary>Each example's image path relative to the image folder (caches made before this was kept have none).</summary>
    public IReadOnlyList<string>? Files => Manifest["files"]?.AsArray().Select(f => f!.GetValue<string>()).ToList();

    /// <summary>The latent scale factor applied to samples.</summary>
    public double ScaleFactor => Manifest["scale_factor"]!.GetValue<double>();

    /// <inheritdoc/>
    public int Count => labels.Length;

    /// <inheritdoc/>
    public IReadOnlyList<long> Labels => labels;

    /// <inheritdoc/>
    public int ClassCount => Manifest["classes"]!.AsArray().Count;

    /// <summary>A hash of a VAE's weights (SHA-256 of its safetensors bytes in key order), stored in the manifest.</summary>
    public static string VaeHash(AutoencoderKL vae)
    {
        using var sha = SHA256.Create();
        foreach (var (k, t) in Weights.StateDict(vae).OrderBy(kv => kv.Key, StringComparer.Ordinal))
        {
            sha.TransformBlock(System.Text.Encoding.UTF8.GetBytes(k), 0, k.Length, null, 0);
            using var c = t.detach().cpu().contiguous();
            var b = c.bytes.ToArray();
            sha.TransformBlock(b, 0, b.Length, null, 0);
        }
        sha.TransformFinalBlock([], 0, 0);
        return Convert.ToHexString(sha.Hash!).ToLowerInvariant()[..16];
    }

    /// <summary>Encodes an image folder into a cache (nothing is left half-written: the folder appears whole).
    /// Unreadable images are skipped, named through <paramref name="warn"/>, and listed in the manifest.</summary>
    public static JsonObject Build(ImageFolder folder, AutoencoderKL vae, string outDir, int batchSize = 8, Action<int, int>? progress = null, Action<string>? warn = null)
    {
        var full = Path.GetFullPath(outDir);
        var staging = full.TrimEnd('/') + $".caching-{Guid.NewGuid():N}";
        System.IO.Directory.CreateDirectory(staging);
        try
        {
            var kept = new List<int>();
            var parts = new List<Tensor>[4] { [], [], [], [] };
            using var noGrad = torch.no_grad();
            for (var start = 0; start < folder.Count; start += batchSize)
            {
                var idx = Enumerable.Range(start, Math.Min(batchSize, folder.Count - start)).ToList();
                var ok = idx.Where(i => folder.TryLoad(i, out _, warn)).ToList();
                kept.AddRange(ok);
                if (ok.Count > 0)
                {
                    using var scope = torch.NewDisposeScope();
                    foreach (var (flip, slot) in new[] { (false, 0), (true, 1) })
                    {
                        var images = folder.Batch(ok, ok.Select(_ => flip).ToList());
                        var small = torch.nn.functional.interpolate(images, [images.shape[2] / 2, images.shape[3] / 2], mode: InterpolationMode.Bicubic, align_corners: false);
                        parts[slot].Add(vae.Encode(images).MoveToOuterDisposeScope().DetachFromDisposeScope());
                        parts[slot + 2].Add(vae.Encode(small).MoveToOuterDisposeScope().DetachFromDisposeScope());
                    }
                }
                progress?.Invoke(Math.Min(start + batchSize, folder.Count), folder.Count);
            }
            if (kept.Count == 0)
                throw new InvalidDataException($"{folder.Root}: no readable image.");
            var names = new[] { "dense", "dense_flip", "pivots", "pivots_flip" };
            var tensors = new Dictionary<string, Tensor>();
            for (var i = 0; i < 4; i++)
                tensors[names[i]] = torch.cat(parts[i], 0);
            tensors["labels"] = torch.tensor(kept.Select(i => folder.Labels[i]).ToArray());
            SafeTensors.Save(Path.Combine(staging, "shard-00000.safetensors"), tensors);
            var manifest = new JsonObject
            {
                ["count"] = kept.Count,
                ["image_size"] = folder.ImageSize,
                ["pivot_size"] = folder.ImageSize / 2,
                ["latent_channels"] = vae.Config.EmbedDim,
                ["dense_grid"] = tensors["dense"].shape[2],
                ["pivot_grid"] = tensors["pivots"].shape[2],
                ["scale_factor"] = vae.Config.ScaleFactor,
                ["vae_hash"] = VaeHash(vae),
                ["classes"] = new JsonArray(folder.Classes.Select(c => (JsonNode)c).ToArray()),
                ["shards"] = new JsonArray("shard-00000.safetensors"),
                ["skipped"] = new JsonArray(folder.Skipped.Select(c => (JsonNode)c).ToArray()),
                // Each example's image, so captions and caption embeddings can be matched to it.
                ["files"] = new JsonArray(kept.Select(i => (JsonNode)JsonValue.Create(folder.Key(i))).ToArray()),
            };
            foreach (var t in tensors.Values)
                t.Dispose();
            foreach (var l in parts)
                foreach (var t in l)
                    t.Dispose();
            AtomicFile.WriteText(Path.Combine(staging, ManifestFile), manifest.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
            if (System.IO.Directory.Exists(full))
                System.IO.Directory.Delete(full, true);
            System.IO.Directory.Move(staging, full);
            return manifest;
        }
        finally
        {
            if (System.IO.Directory.Exists(staging))
                System.IO.Directory.Delete(staging, true);
        }
    }

    /// <summary>Opens a cache; a missing or malformed manifest or shard names the file.</summary>
    public static LatentCache Open(string dir)
    {
        var path = Path.Combine(dir, ManifestFile);
        if (!File.Exists(path))
            throw new InvalidDataException($"{path}: no such file (make a cache with `himar cache`).");
        var manifest = JsonNode.Parse(File.ReadAllText(path))?.AsObject() ?? throw new InvalidDataException($"{path}: empty.");
        var shard = SafeTensors.Load(Path.Combine(dir, manifest["shards"]![0]!.GetValue<string>()));
        foreach (var t in shard.Values)
            t.DetachFromDisposeScope();
        return new LatentCache(manifest, shard["dense"], shard["dense_flip"], shard["pivots"], shard["pivots_flip"], shard["labels"].data<long>().ToArray(), dir);
    }

    /// <inheritdoc/>
    public void CheckFits(HiMarConfig config)
    {
        var where = Path.Combine(Directory, ManifestFile);
        var problems = new List<string>();
        var channels = Manifest["latent_channels"]!.GetValue<int>();
        if (channels != config.TokenEmbedDim)
            problems.Add($"latents have {channels} channels, the model's tokens {config.TokenEmbedDim}");
        var grid = Manifest["dense_grid"]!.GetValue<int>();
        if (grid != config.SeqH)
            problems.Add($"the dense grid is {grid}x{grid}, the model's {config.SeqH}x{config.SeqH} (img_size {config.Backbone.ImageSize} / vae_stride {config.Backbone.VaeStride})");
        var pgrid = Manifest["pivot_grid"]!.GetValue<int>();
        if (pgrid != config.Pivots.GridSide)
            problems.Add($"the pivot grid is {pgrid}x{pgrid}, the model's cond_scale is {config.Pivots.GridSide}");
        if (ClassCount > config.Backbone.ClassCount)
            problems.Add($"{ClassCount} classes, the model has {config.Backbone.ClassCount}");
        if (problems.Count > 0)
            throw new InvalidDataException($"{where}: this cache does not match the model: {string.Join("; ", problems)}.");
    }

    /// <summary>Refuses a cache made with other VAE weights than <paramref name="vae"/>.</summary>
    public void CheckVae(AutoencoderKL vae)
    {
        var hash = VaeHash(vae);
        if (Manifest["vae_hash"]?.GetValue<string>() != hash)
            throw new InvalidDataException($"{Path.Combine(Directory, ManifestFile)}: made with another VAE (hash {Manifest["vae_hash"]}, this one {hash}).");
    }

    /// <inheritdoc/>
    public (Tensor Tokens, Tensor Pivots) Batch(IReadOnlyList<int> indices, IReadOnlyList<bool> flips) =>
        Batch(indices, flips, RowWindow.Whole(indices.Count));

    /// <inheritdoc/>
    public (Tensor Tokens, Tensor Pivots) Batch(IReadOnlyList<int> indices, IReadOnlyList<bool> flips, RowWindow rows)
    {
        using var scope = torch.NewDisposeScope();
        Tensor Pick(Tensor plain, Tensor flipped)
        {
            var idx = torch.tensor(indices.Select(i => (long)i).ToArray());
            var mask = torch.tensor(flips.ToArray()).reshape(-1, 1, 1, 1);
            var moments = torch.where(mask, flipped.index_select(0, idx), plain.index_select(0, idx));
            using var posterior = new DiagonalGaussianDistribution(moments);
            var mean = posterior.Mean;
            var noise = rows.Draw(mean.shape[0], mean.shape[1..], shape => torch.randn(shape, dtype: mean.dtype, device: mean.device));
            var z = posterior.Sample(noise) * ScaleFactor;
            return z.flatten(2).transpose(1, 2); // (B, C, h, w) -> (B, h w, C)
        }
        return (Pick(dense, denseFlip).MoveToOuterDisposeScope(), Pick(pivots, pivotsFlip).MoveToOuterDisposeScope());
    }

    /// <summary>Disposes the moments.</summary>
    public void Dispose()
    {
        foreach (var t in new[] { dense, denseFlip, pivots, pivotsFlip })
            t.Dispose();
    }
}
