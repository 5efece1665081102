using System.Globalization;
using HiMar.Model;
using HiMar.Runtime.Checkpoints;
using HiMar.Runtime.Data;
using TorchSharp;

namespace HiMar.Runtime.Catalog;

/// <summary>
/// What a model configuration implies outside the network: which tokenizer turns its tokens into images, whether it
/// is a Fashion-MNIST model (10 classes of 28x28 images as 4x4 pixel patches) and what its classes are called. The
/// rules live here once, for the CLI, the server, the evaluation and scripts alike.
/// </summary>
public static class ModelTraits
{
    /// <summary>True when the tokens are 4x4 pixel patches of a 32x32 image (the fashion presets: 16 values per token)
    /// rather than VAE latents.</summary>
    public static bool UsesPixelPatches(HiMarConfig config) =>
        config.Backbone.ImageSize == 32 && config.Backbone.VaeStride == 4 && config.TokenEmbedDim == 16;

    /// <summary>True for a Fashion-MNIST model: 28x28 images padded to 32 (pixel patches or the latents of a stride-4
    /// autoencoder) and 10 classes.</summary>
    public static bool IsFashionMnist(HiMarConfig config) =>
        config.Backbone.ImageSize == 32 && config.Backbone.VaeStride == 4 && config.Backbone.ClassCount == 10;

    /// <summary>The tokenizer a model brings itself (pixel patches), or null when it needs a VAE.</summary>
    public static ITokenizer? BuiltinTokenizer(HiMarConfig config) => UsesPixelPatches(config) ? PixelPatchTokenizer.Fashion : null;

    /// <summary>The file name of the autoencoder a latent model carries beside its weights (or in its run folder).</summary>
    public const string BundledVaeFile = "vae.safetensors";

    /// <summary>The autoencoder a model carries: <see cref="BundledVaeFile"/> in its folder, or for a training
    /// checkpoint (run/checkpoints/step-N) in the run folder; null when there is none.</summary>
    public static string? BundledVae(string? modelPath)
    {
        if (modelPath == null)
            return null;
        var dir = Directory.Exists(modelPath) ? modelPath : Path.GetDirectoryName(Path.GetFullPath(modelPath));
        for (var up = 0; up < 3 && dir != null; up++, dir = Path.GetDirectoryName(dir))
            if (File.Exists(Path.Combine(dir, BundledVaeFile)))
                return Path.Combine(dir, BundledVaeFile);
        return null;
    }

    /// <summary>The tokenizer of a model through an autoencoder: a Fashion-MNIST model's 28x28 images are padded to its
    /// image size first (<see cref="PaddedTokenizer"/>).</summary>
    public static ITokenizer VaeTokenizerFor(HiMarConfig config, AutoencoderKL vae) =>
        IsFashionMnist(config) ? new PaddedTokenizer(new VaeTokenizer(vae), 28, config.Backbone.ImageSize) : new VaeTokenizer(vae);

    /// <summary>
    /// The tokenizer of a model: the autoencoder at <paramref name="vaePath"/> when given, else the one the model
    /// carries (<see cref="BundledVae"/>), else its pixel patches; null when it needs a VAE and has none.
    /// </summary>
    public static ITokenizer? Tokenizer(HiMarConfig config, string? modelPath, string? vaePath = null, bool allowNonFinite = false,
        Action<string>? warn = null, TorchSharp.torch.Device? device = null)
    {
        var path = vaePath ?? (UsesPixelPatches(config) ? null : BundledVae(modelPath));
        if (path == null)
            return BuiltinTokenizer(config);
        var vae = ReferenceImport.LoadVae(path, allowNonFinite, warn);
        if (device != null)
            vae.to(device);
        if (vae.Config.EmbedDim != config.Backbone.LatentChannels)
            throw new BadInputException($"{path}: the autoencoder has {vae.Config.EmbedDim} latent channels; the model's tokens have {config.Backbone.LatentChannels} (vae_embed_dim).");
        return VaeTokenizerFor(config, vae);
    }

    /// <summary>The class names in label order (Fashion-MNIST's for a Fashion-MNIST model); empty when unnamed.</summary>
    public static IReadOnlyList<string> ClassNames(HiMarConfig config) =>
        config.Text.Conditioning != Conditioning.Text && IsFashionMnist(config) ? IdxDataset.FashionClasses : [];

    /// <summary>How a label is shown in grids and messages: its name ("sneaker") when the model names its classes, else "class 7".</summary>
    public static string LabelText(HiMarConfig config, long label)
    {
        var names = ClassNames(config);
        return label >= 0 && label < names.Count ? names[(int)label] : $"class {label}";
    }

    /// <summary>
    /// One class given by a person: a label number, or a class name in any case (`sneaker`, `Ankle boot`,
    /// `ankle-boot`, and either half of `t-shirt/top`); null when it is neither.
    /// </summary>
    public static long? TryParseClass(HiMarConfig config, string text)
    {
        var t = text.Trim();
        if (long.TryParse(t, NumberStyles.None, CultureInfo.InvariantCulture, out var label))
            return label < config.Backbone.ClassCount ? label : null;
        var key = Normalize(t);
        if (key.Length == 0)
            return null;
        var names = ClassNames(config);
        for (var i = 0; i < names.Count; i++)
            if (Normalize(names[i]) == key || names[i].Split('/').Any(part => Normalize(part) == key))
                return i;
        return null;
    }

    /// <summary>
    /// A comma-separated list of classes (<see cref="TryParseClass"/>); an unknown one is a
    /// <see cref="BadInputException"/> naming <paramref name="flag"/> and listing the valid classes.
    /// </summary>
    public static long[] ParseClasses(HiMarConfig config, string text, string flag = "--classes") =>
        text.Split(',', StringSplitOptions.RemoveEmptyEntries)
            .Select(c => TryParseClass(config, c) ?? throw new BadInputException($"{flag}: '{c.Trim()}' is not a class of this model; give {ValidClasses(config)}."))
            .ToArray();

    /// <summary>The classes a person may give, for messages: "0..9 or a name: t-shirt/top, trouser, ...".</summary>
    public static string ValidClasses(HiMarConfig config)
    {
        var names = ClassNames(config);
        var numbers = $"a number 0..{config.Backbone.ClassCount - 1}";
        return names.Count == 0 ? numbers : $"{numbers} or a name: {string.Join(", ", names)}";
    }

    static string Normalize(string name) => name.Trim().ToLowerInvariant().Replace('_', ' ').Replace('-', ' ').Replace("  ", " ");
}
