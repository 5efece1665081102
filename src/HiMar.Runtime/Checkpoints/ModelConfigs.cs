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
        var argsNode = root["model_config"]?.AsObject() ?? root;
        var args = ReferenceArgs.FromJson(argsNode);
        foreach (var key in new[] { "dit_head_sampling_steps" })
            if (root[key] is JsonValue v && v.GetValueKind() == JsonValueKind.String)
                args[key] = v.GetValue<string>();
        var baseName = (argsNode["model"] ?? root["model"])?.GetValue<string>();
        var baseConfig = baseName == null ? null : HiMarConfigModule.TryPreset(baseName);
        HiMarConfig config;
        try
        {
            config = HiMarConfigModule.FromReferenceArgs(baseConfig?.Value ?? HiMarConfigModule.Base, args);
        }
        catch (ArgumentException e)
        {
            throw new CheckpointFormatException($"{nameOrFile}: {e.Message}", e);
        }
        var problems = HiMarConfigModule.Validate(config);
        if (!problems.IsEmpty)
            throw new CheckpointFormatException($"{nameOrFile}: {string.Join("; ", problems)}.");
        return config;
    }
}
