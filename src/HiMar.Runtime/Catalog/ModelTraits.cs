using System.Globalization;
using HiMar.Model;
using HiMar.Runtime.Data;

namespace HiMar.Runtime.Catalog;

/// <summary>
/// What a model configuration implies outside the network: which tokenizer turns its tokens into images, whether it
/// is a Fashion-MNIST model (10 classes of 28x28 images as 4x4 pixel patches) and what its classes are called. The
/// rules live here once, for the CLI, the server, the evaluation and scripts alike.
/// </summary>
public static class ModelTraits
{
    /// <summary>True when the tokens are 4x4 pixel patches of a 32x32 image (the fashion presets) rather than VAE latents.</summary>
    public static bool UsesPixelPatches(HiMarConfig config) => config.Backbone.ImageSize == 32 && config.Backbone.VaeStride == 4;

    /// <summary>True for a Fashion-MNIST model: pixel patches and 10 classes.</summary>
    public static bool IsFashionMnist(HiMarConfig config) => UsesPixelPatches(config) && config.Backbone.ClassCount == 10;

    /// <summary>The tokenizer a model brings itself (pixel patches), or null when it needs a VAE.</summary>
    public static ITokenizer? BuiltinTokenizer(HiMarConfig config) => UsesPixelPatches(config) ? PixelPatchTokenizer.Fashion : null;

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
