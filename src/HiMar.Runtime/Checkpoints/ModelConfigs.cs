using System.Text.Json;
using System.Text.Json.Nodes;
using HiMar.Model;
using HiMar.Runtime.Parity;

namespace HiMar.Runtime.Checkpoints;

/// <summary>Finds a model configuration by preset name or from a JSON file of reference arguments.</summary>
public static class ModelConfigs
{
    /// <summary>
    /// `hi-mar-b`, `hi-mar-l`, `hi-mar-h` (also `b`, `himar_base`, ...), or a JSON file: either the reference
    /// `HiMAR(...)` keyword arguments, or an object holding them under `model_config` (a parity manifest). The
    /// file's `model` field, when it names a preset, is the base for absent fields; Hi-MAR-B otherwise.
    /// </summary>
    public static HiMarConfig Resolve(string nameOrFile)
    {
        var preset = HiMarConfigModule.TryPreset(nameOrFile);
        if (preset != null)
            return preset.Value;
        if (!File.Exists(nameOrFile))
            throw new CheckpointFormatException(
                $"{nameOrFile}: neither a preset ({string.Join(", ", HiMarConfigModule.Presets.Select(p => p.Item1))}) nor an existing config file.");
        JsonObject root;
        try
        {
            root = JsonNode.Parse(File.ReadAllText(nameOrFile))?.AsObject()
                ?? throw new CheckpointFormatException($"{nameOrFile}: the config file is empty.");
        }
        catch (Exception e) when (e is JsonException or InvalidOperationException)
        {
            throw new CheckpointFormatException($"{nameOrFile}: not a JSON object of model settings ({e.Message}).", e);
        }
        // A training checkpoint's manifest.json lists its files; the model's settings are in config.json beside it.
        if (root["kind"] is JsonValue kind && kind.GetValueKind() == JsonValueKind.String && kind.GetValue<string>() == Training.Checkpoint.ManifestKind)
            return Resolve(Path.Combine(Path.GetDirectoryName(Path.GetFullPath(nameOrFile)) ?? ".", ReferenceImport.ConfigFile));
        return FromJson(root, nameOrFile);
    }

    /// <summary>
    /// A configuration from a parsed config file: the reference arguments (at the top, or under `model_config` in a
    /// parity manifest) over the preset named by `model` (Hi-MAR-B otherwise). Every key must be known, of the exact
    /// JSON type (<see cref="CheckArguments"/>), and the result must pass <see cref="ConfigCodec.Validate"/>;
    /// the first problems found are named in one <see cref="CheckpointFormatException"/> about <paramref name="what"/>.
    /// </summary>
    public static HiMarConfig FromJson(JsonObject root, string what)
    {
        if (root["kind"] is JsonValue kind && kind.GetValueKind() == JsonValueKind.String && kind.GetValue<string>() == "vae")
            throw new CheckpointFormatException($"{what}: describes a KL autoencoder, not a Hi-MAR model.");
        var argsNode = root["model_config"] as JsonObject ?? root;
        CheckArguments(argsNode, what);
        var args = ReferenceArgs.FromJson(argsNode);
        // A parity manifest keeps the Transformer head's respacing beside model_config.
        if (!ReferenceEquals(argsNode, root) && root["dit_head_sampling_steps"] is JsonValue v && v.GetValueKind() == JsonValueKind.String)
            args["dit_head_sampling_steps"] = v.GetValue<string>();
        var baseName = argsNode["model"] is JsonValue m && m.GetValueKind() == JsonValueKind.String ? m.GetValue<string>()
            : root["model"] is JsonValue r && r.GetValueKind() == JsonValueKind.String ? r.GetValue<string>() : null;
        var baseConfig = baseName == null ? null : HiMarConfigModule.TryPreset(baseName);
        if (baseName != null && baseConfig == null)
            throw new CheckpointFormatException($"{what}: model '{Failures.OneLine(baseName)}' is not a preset ({string.Join(", ", HiMarConfigModule.Presets.Select(p => p.Item1))}).");
        HiMarConfig config;
        try
        {
            config = ConfigCodec.FromReferenceArgs(baseConfig?.Value ?? HiMarConfigModule.Base, args);
        }
        catch (ArgumentException e)
        {
            throw new CheckpointFormatException($"{what}: {e.Message}.", e);
        }
        var problems = ConfigCodec.Validate(config);
        if (!problems.IsEmpty)
            throw new CheckpointFormatException($"{what}: {string.Join("; ", problems.Take(4))}{(problems.Length > 4 ? $"; and {problems.Length - 4} more" : "")}.");
        return config;
    }

    /// <summary>
    /// Checks the keys and JSON types of reference arguments: unknown keys (with the nearest known one when it is
    /// a likely typo), null values, text where a number belongs, 128.5 or 1e30 where a whole number belongs.
    /// </summary>
    public static void CheckArguments(JsonObject args, string what)
    {
        var problems = new List<string>();
        foreach (var (key, node) in args)
        {
            if (!ConfigCodec.ArgumentKinds.TryGetValue(key, out var kind))
            {
                var near = Nearest(key, ConfigCodec.ArgumentKinds.Keys);
                problems.Add(near == null ? $"unknown key '{Failures.OneLine(key)}'" : $"unknown key '{Failures.OneLine(key)}' (did you mean '{near}'?)");
                continue;
            }
            if (node == null)
            {
                problems.Add($"'{key}' is null (give {Expected(kind)}, or leave the key out for the preset's value)");
                continue;
            }
            var valueKind = node.GetValueKind();
            var ok = kind switch
            {
                ArgumentKind.WholeNumber => valueKind == JsonValueKind.Number && Whole(node, out _),
                ArgumentKind.Number => valueKind == JsonValueKind.Number && double.IsFinite(NumberOf(node)),
                ArgumentKind.Text => valueKind == JsonValueKind.String,
                ArgumentKind.Boolean => valueKind is JsonValueKind.True or JsonValueKind.False,
                _ => node is JsonArray a && a.All(x => x is JsonValue w && w.GetValueKind() == JsonValueKind.String),
            };
            if (!ok)
            {
                var shown = Shown(node);
                problems.Add(kind == ArgumentKind.WholeNumber && valueKind == JsonValueKind.Number && !Whole(node, out var inRange) && inRange
                    ? $"'{key}' must be a whole number, not {shown}"
                    : kind == ArgumentKind.WholeNumber && valueKind == JsonValueKind.Number
                        ? $"'{key}' is {shown}, out of range"
                        : $"'{key}' must be {Expected(kind)}, not {shown}");
            }
        }
        if (problems.Count > 0)
            throw new CheckpointFormatException($"{what}: {string.Join("; ", problems.Take(4))}{(problems.Count > 4 ? $"; and {problems.Count - 4} more" : "")}.");
    }

    static string Expected(ArgumentKind kind) => kind switch
    {
        ArgumentKind.WholeNumber => "a whole number",
        ArgumentKind.Number => "a number",
        ArgumentKind.Text => "a string",
        ArgumentKind.Boolean => "true or false",
        _ => "a list of strings",
    };

    /// <summary>True when a JSON number is integral and fits an int; <paramref name="inRange"/> says whether it fits.</summary>
    static bool Whole(JsonNode node, out bool inRange)
    {
        var x = NumberOf(node);
        inRange = double.IsFinite(x) && x >= int.MinValue && x <= int.MaxValue;
        return inRange && Math.Floor(x) == x;
    }

    /// <summary>A JSON number's value, from its text (parsed and in-memory values alike; 1e400 is infinite).</summary>
    static double NumberOf(JsonNode node) =>
        double.Parse(node.ToJsonString(), System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture);

    /// <summary>A JSON value as it reads in a message: at most 40 characters, control characters escaped.</summary>
    static string Shown(JsonNode node)
    {
        var json = Failures.OneLine(node.ToJsonString());
        var kind = node.GetValueKind() switch
        {
            JsonValueKind.String => "the string ",
            JsonValueKind.Array => "the list ",
            JsonValueKind.Object => "the object ",
            _ => "",
        };
        return kind + (json.Length > 40 ? json[..40] + "..." : json);
    }

    /// <summary>The known key nearest to <paramref name="key"/> in edit distance, when it is a likely typo (at most
    /// 2 edits, and fewer than half the key's length).</summary>
    public static string? Nearest(string key, IEnumerable<string> known)
    {
        var best = known.Select(k => (Key: k, Distance: Levenshtein(key.ToLowerInvariant(), k))).OrderBy(x => x.Distance).ThenBy(x => x.Key, StringComparer.Ordinal).FirstOrDefault();
        return best.Key != null && best.Distance <= Math.Min(3, Math.Max(1, key.Length / 3)) ? best.Key : null;
    }

    /// <summary>The edit distance of two strings (insertions, deletions, substitutions).</summary>
    public static int Levenshtein(string a, string b)
    {
        var previous = Enumerable.Range(0, b.Length + 1).ToArray();
        var current = new int[b.Length + 1];
        for (var i = 1; i <= a.Length; i++)
        {
            current[0] = i;
            for (var j = 1; j <= b.Length; j++)
                current[j] = Math.Min(Math.Min(current[j - 1] + 1, previous[j] + 1), previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1));
            (previous, current) = (current, previous);
        }
        return previous[b.Length];
    }
}
