using HiMar.Model;
using HiMar.Runtime.Catalog;
using HiMar.Runtime.Checkpoints;
using HiMar.Runtime.Data;
using HiMar.Runtime.Distributed;
using HiMar.Runtime.Text;

namespace HiMar.Runtime.Training;

/// <summary>Where a training run's images and captions come from (each null when not given).</summary>
public sealed record TrainingData
{
    /// <summary>The Fashion-MNIST IDX folder (used when there is no <see cref="CacheDir"/>).</summary>
    public string DataDir { get; init; } = IdxDataset.FashionMnistDir;

    /// <summary>A latent cache made by `himar cache` (then <see cref="VaePath"/> is needed).</summary>
    public string? CacheDir { get; init; }

    /// <summary>The VAE the cache was made with (previews and the hash check).</summary>
    public string? VaePath { get; init; }

    /// <summary>Text models with the built-in encoder on a cache: the COCO captions JSON of its images.</summary>
    public string? CaptionsFile { get; init; }

    /// <summary>Text models with an external encoder: caption embeddings from `himar embed-captions`.</summary>
    public string? EmbeddingsDir { get; init; }
}

/// <summary>
/// Builds a training run's data pipeline for a configuration: Fashion-MNIST IDX files through the pixel-patch
/// tokenizer, or a latent cache with its VAE; captions made from the labels, read from a COCO file or from
/// precomputed embeddings. Every mismatch is a <see cref="BadInputException"/> naming the flag.
/// </summary>
public static class TrainingSetup
{
    /// <summary>What a data-parallel run of <paramref name="config"/> over <paramref name="ranks"/> processes should be
    /// warned of, or null: dropout masks come from the generator every rank shares, so ranks draw the same masks and
    /// the run no longer equals one process on the global batch.</summary>
    public static string? DataParallelWarning(HiMarConfig config, int ranks) =>
        ranks > 1 && (config.Backbone.AttentionDropout > 0.0 || config.Backbone.ProjectionDropout > 0.0)
            ? "dropout masks are drawn per rank from the shared generator (ranks share masks); the N-rank run no longer equals one process of the global batch exactly"
            : null;

    /// <summary>A trainer for <paramref name="config"/> on <paramref name="data"/>, resumed from the run folder when <paramref name="resume"/>.</summary>
    public static Trainer Create(HiMarConfig config, TrainingData data, TrainOptions options, bool resume, ICommunicator communicator)
    {
        if (data.CacheDir == null && !ModelTraits.UsesPixelPatches(config) && !(ModelTraits.IsFashionMnist(config) && data.VaePath != null))
            throw new BadInputException("IDX data trains with the pixel-patch tokenizer (img_size 32, vae_stride 4, as the fashion preset) or, for a latent Fashion-MNIST config, with --vae (an autoencoder from `himar train-vae`); for other configs make a latent cache with `himar cache` and pass --cache and --vae");
        return data.CacheDir is { } dir
            ? OnCache(config, dir, data, options, resume, communicator)
            : OnIdx(config, data, options, resume, communicator);
    }

    static Trainer OnCache(HiMarConfig config, string dir, TrainingData data, TrainOptions options, bool resume, ICommunicator communicator)
    {
        var latents = LatentCache.Open(dir);
        var vae = ReferenceImport.LoadVae(data.VaePath ?? throw new BadInputException("--cache needs --vae"));
        latents.CheckVae(vae);
        IReadOnlyList<string> Keys() => latents.Files
            ?? throw new BadInputException($"{dir}: this cache does not list its images (made by an older himar); rebuild it to train on captions");
        ICaptionSource? captions = (data.CaptionsFile, data.EmbeddingsDir) switch
        {
            ({ }, { }) => throw new BadInputException("give --captions or --embeddings, not both"),
            ({ } file, null) => CaptionTexts.ForKeys(CocoCaptions.Load(file), Keys(), file),
            (null, { } emb) => CaptionEmbeddings.Open(emb, Keys()),
            _ => null,
        };
        return new Trainer(config, latents, new VaeTokenizer(vae), options, resume, communicator, captions);
    }

    static Trainer OnIdx(HiMarConfig config, TrainingData data, TrainOptions options, bool resume, ICommunicator communicator)
    {
        var images = IdxDataset.FashionMnist(data.DataDir);
        // Text models on Fashion-MNIST read captions made from the labels ("a photo of a sneaker").
        ICaptionSource? captions = data.EmbeddingsDir is { } emb
            ? CaptionEmbeddings.Open(emb, CaptionTexts.FashionMnistKeys(images.Count))
            : config.Text.Conditioning == Conditioning.Text ? CaptionTexts.FashionMnist(images.Labels) : null;
        var tokenizer = data.VaePath != null ? LatentTokenizer(config, data, options) : PixelPatchTokenizer.Fashion;
        return new Trainer(config, images, tokenizer, options, resume, communicator, captions);
    }

    /// <summary>Latent tokens of Fashion-MNIST through an autoencoder encoded on the fly; the autoencoder is copied into
    /// the run folder (<see cref="ModelTraits.BundledVaeFile"/>) so that its checkpoints sample and evaluate without
    /// --vae.</summary>
    public static ITokenizer LatentTokenizer(HiMarConfig config, TrainingData data, TrainOptions options)
    {
        var vaePath = data.VaePath ?? throw new BadInputException("--vae: training on Fashion-MNIST latents needs the autoencoder.");
        var tokenizer = ModelTraits.Tokenizer(config, null, vaePath)!;
        var file = Directory.Exists(vaePath) ? Path.Combine(vaePath, "weights.safetensors") : vaePath;
        if (!file.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase) || !File.Exists(file))
            throw new BadInputException($"--vae: {vaePath}: training on Fashion-MNIST latents takes an autoencoder folder or .safetensors file from `himar train-vae` or `himar import`.");
        Directory.CreateDirectory(options.OutDir);
        var bundled = Path.Combine(options.OutDir, ModelTraits.BundledVaeFile);
        if (File.Exists(bundled))
        {
            if (!File.ReadAllBytes(bundled).AsSpan().SequenceEqual(File.ReadAllBytes(file)))
                throw new BadInputException($"--vae: {vaePath} is not the autoencoder this run was trained with ({bundled}); a run keeps one tokenizer.");
        }
        else
            AtomicFile.Write(bundled, s => { using var src = File.OpenRead(file); src.CopyTo(s); });
        return tokenizer;
    }
}
