namespace HiMar.Runtime.Catalog;

/// <summary>
/// The models shipped with himar: folders under models/ beside the application (config.json, weights.safetensors,
/// sampling.json), found by name (`fashion`, `fashion-text`). The Fashion-MNIST classifier that `himar eval` scores
/// with lives there too but is not a generative model, so it is not listed.
/// </summary>
public static class ShippedModels
{
    /// <summary>The folder name of the Fashion-MNIST classifier used for FD-FMNIST and class accuracy.</summary>
    public const string ClassifierName = "fashion-classifier";

    /// <summary>The folder holding the shipped models (models/ beside the application).</summary>
    public static string Root => Path.Combine(AppContext.BaseDirectory, "models");

    /// <summary>The Fashion-MNIST classifier's folder (weights and train-stats.npz).</summary>
    public static string ClassifierDir => Path.Combine(Root, ClassifierName);

    /// <summary>The names of the shipped generative models, sorted (empty when none are installed).</summary>
    public static IReadOnlyList<string> Names()
    {
        if (!Directory.Exists(Root))
            return [];
        return Directory.GetDirectories(Root)
            .Select(Path.GetFileName)
            .OfType<string>()
            .Where(n => n != ClassifierName && File.Exists(Path.Combine(Root, n, "config.json")))
            .Order(StringComparer.Ordinal)
            .ToList();
    }

    /// <summary>The folder of the shipped model <paramref name="name"/> (case-insensitive), or null when there is none.</summary>
    public static string? TryFind(string name)
    {
        var key = name.Trim().ToLowerInvariant();
        return Names().Contains(key) ? Path.Combine(Root, key) : null;
    }

    /// <summary>
    /// The folder of the shipped model <paramref name="name"/>; an unknown name is a <see cref="BadInputException"/>
    /// naming <paramref name="flag"/> and the shipped models.
    /// </summary>
    public static string Find(string name, string flag = "--preset") =>
        TryFind(name) ?? throw new BadInputException($"{flag}: no shipped model '{name}' (shipped: {string.Join(", ", Names())})");

    /// <summary>The shipped model <paramref name="nameOrPath"/> names, else the path itself (a folder or file of the user's).</summary>
    public static string FindOrPath(string nameOrPath) =>
        !nameOrPath.Contains('/') && !nameOrPath.Contains('\\') && TryFind(nameOrPath) is { } dir ? dir : nameOrPath;
}
