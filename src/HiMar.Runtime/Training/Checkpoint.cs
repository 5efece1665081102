using System.Text.Json;
using System.Text.Json.Nodes;
using HiMar.Model;
using HiMar.Runtime.Checkpoints;

namespace HiMar.Runtime.Training;

/// <summary>
/// Our training checkpoints: a folder per step with the raw weights, the EMA weights and the optimizer moments
/// as safetensors, config.json (the model's reference arguments), state.json (step, epoch, RNG state, data
/// position, options) and, written last, manifest.json (the size and SHA-256 of every other file). Each folder is
/// written beside its final name (`.step-N.*.tmp`) and renamed, and an old folder is renamed aside before it is
/// deleted, so a run killed at any moment leaves only whole checkpoints and dot-named debris, which the next run
/// removes. `himar sample --checkpoint` and `--resume` verify a folder against its manifest before they use it.
/// </summary>
public static partial class Checkpoint
{
    /// <summary>File names inside a checkpoint folder.</summary>
    public const string ModelFile = ReferenceImport.WeightsFile, EmaFile = "ema.safetensors", OptimizerFile = "optimizer.safetensors",
        StateFile = "state.json", ConfigFile = ReferenceImport.ConfigFile, ManifestFile = "manifest.json";

    /// <summary>The `kind` of a checkpoint manifest (a parity fixture's manifest.json has none).</summary>
    public const string ManifestKind = "himar-checkpoint";

    static readonly string[] Files = [ModelFile, EmaFile, OptimizerFile, ConfigFile, StateFile];

    /// <summary>Writes checkpoint <paramref name="name"/> under <paramref name="root"/>; returns its folder. A failure
    /// to write (disk full, permissions) is a <see cref="StorageException"/> that leaves the other checkpoints as they were.</summary>
    public static string Write(string root, string name, HiMAR model, HiMAR ema, NamedAdamW optimizer, JsonObject state)
    {
        var final = Path.Combine(root, name);
        var staging = Path.Combine(root, $".{name}.{Guid.NewGuid():N}.tmp");
        try
        {
            Directory.CreateDirectory(root);
            Directory.CreateDirectory(staging);
            ModelFiles.Save(model, Path.Combine(staging, ModelFile));
            ModelFiles.Save(ema, Path.Combine(staging, EmaFile));
            SafeTensors.Save(Path.Combine(staging, OptimizerFile), optimizer.State());
            var indented = new JsonSerializerOptions { WriteIndented = true };
            AtomicFile.WriteText(Path.Combine(staging, ConfigFile), ConfigCodec.ToJson(model.Config).ToJsonString(indented));
            AtomicFile.WriteText(Path.Combine(staging, StateFile), state.ToJsonString(indented));
            WriteManifest(staging);
            Replace(staging, final);
            return final;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw WriteFailure(final, root, e);
        }
        finally
        {
            DeleteQuietly(staging);
        }
    }

    static StorageException WriteFailure(string final, string root, Exception e)
    {
        var reason = e is IOException io && Failures.IsDiskFull(io) ? "no space left on the device" : e.Message.Split('\n')[0];
        return new StorageException($"{final}: the checkpoint could not be written ({reason}); the earlier checkpoints in {root} are intact.", e);
    }

    /// <summary>Writes manifest.json into a finished checkpoint folder: the size and SHA-256 of every other file.</summary>
    public static void WriteManifest(string dir)
    {
        var files = new JsonObject();
        foreach (var file in Directory.GetFiles(dir).Where(f => Path.GetFileName(f) != ManifestFile).OrderBy(f => f, StringComparer.Ordinal))
            files[Path.GetFileName(file)] = new JsonObject { ["bytes"] = new FileInfo(file).Length, ["sha256"] = Sha256(file) };
        var manifest = new JsonObject { ["kind"] = ManifestKind, ["files"] = files };
        AtomicFile.WriteText(Path.Combine(dir, ManifestFile), manifest.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
    }

    static string Sha256(string file)
    {
        using var stream = File.OpenRead(file);
        return Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(stream));
    }

    /// <summary>True for a folder written as a training checkpoint (state.json, a checkpoint manifest, or a
    /// `step-N` name), which must verify before it is used.</summary>
    public static bool IsCheckpointFolder(string dir)
    {
        if (!Directory.Exists(dir))
            return false;
        if (File.Exists(Path.Combine(dir, StateFile)) || IsStepName(Path.GetFileName(Path.TrimEndingDirectorySeparator(dir))))
            return true;
        var manifest = Path.Combine(dir, ManifestFile);
        if (!File.Exists(manifest) || new FileInfo(manifest).Length > 1 << 20)
            return false;
        try
        {
            return JsonNode.Parse(File.ReadAllText(manifest)) is JsonObject o && o["kind"] is JsonValue k
                && k.GetValueKind() == JsonValueKind.String && k.GetValue<string>() == ManifestKind;
        }
        catch (JsonException)
        {
            return false;
        }
    }

    static bool IsStepName(string name) =>
        name.StartsWith("step-", StringComparison.Ordinal) && name.Length > 5 && name[5..].All(char.IsAsciiDigit);

    /// <summary>
    /// Checks a checkpoint folder: every file its manifest lists exists with the listed size and SHA-256, and the
    /// files a checkpoint needs are listed. A folder written before manifests must at least hold every file.
    /// Throws a <see cref="CheckpointFormatException"/> naming the first bad file.
    /// </summary>
    public static void Verify(string dir)
    {
        var manifestPath = Path.Combine(dir, ManifestFile);
        if (!File.Exists(manifestPath))
        {
            var missing = Files.Where(f => !File.Exists(Path.Combine(dir, f))).ToList();
            if (missing.Count > 0)
                throw new CheckpointFormatException($"{dir}: an incomplete checkpoint (no {string.Join(", ", missing)}; a run was killed while writing or pruning it).");
            return;
        }
        JsonObject files;
        try
        {
            files = (JsonNode.Parse(File.ReadAllText(manifestPath)) as JsonObject)?["files"] as JsonObject
                ?? throw new CheckpointFormatException($"{manifestPath}: no 'files' object.");
        }
        catch (JsonException e)
        {
            throw new CheckpointFormatException($"{manifestPath}: not valid JSON ({e.Message.Split('\n')[0]}).", e);
        }
        foreach (var required in Files)
            if (!files.ContainsKey(required))
                throw new CheckpointFormatException($"{manifestPath}: does not list {required}.");
        foreach (var (name, entry) in files)
        {
            var file = Path.Combine(dir, name);
            if (!File.Exists(file))
                throw new CheckpointFormatException($"{file}: missing (the manifest lists it).");
            long bytes;
            string? sha;
            try
            {
                bytes = entry?["bytes"]?.GetValue<long>() ?? -1;
                sha = entry?["sha256"]?.GetValue<string>();
            }
            catch (Exception e) when (e is InvalidOperationException or FormatException)
            {
                throw new CheckpointFormatException($"{manifestPath}: the entry of {name} is not {{bytes, sha256}}.", e);
            }
            var length = new FileInfo(file).Length;
            if (length != bytes)
                throw new CheckpointFormatException($"{file}: {length} bytes, the manifest says {bytes} (truncated or changed).");
            if (!string.Equals(Sha256(file), sha, StringComparison.OrdinalIgnoreCase))
                throw new CheckpointFormatException($"{file}: its SHA-256 differs from the manifest's (the file is corrupt).");
        }
    }

    /// <summary>The step checkpoints under a root that hold a state.json, oldest first.</summary>
    public static IReadOnlyList<string> Steps(string root) =>
        Directory.Exists(root)
            ? Directory.GetDirectories(root, "step-*").Where(d => IsStepName(Path.GetFileName(d)) && File.Exists(Path.Combine(d, StateFile))).OrderBy(d => d, StringComparer.Ordinal).ToList()
            : [];

    /// <summary>The newest whole checkpoint, or null.</summary>
    public static string? Latest(string root) => Steps(root).LastOrDefault();

    /// <summary>
    /// Removes what killed runs leave under a checkpoint root (and the run folder above it): dot-named `.tmp`
    /// staging folders and files, and `step-N` folders without state.json (half pruned). Returns what it removed.
    /// </summary>
    public static IReadOnlyList<string> RemoveDebris(string root)
    {
        var removed = new List<string>();
        if (!Directory.Exists(root))
            return removed;
        foreach (var d in Directory.GetDirectories(root))
        {
            var name = Path.GetFileName(d);
            var staging = IsDebrisName(name);
            var halfPruned = IsStepName(name) && !File.Exists(Path.Combine(d, StateFile));
            if (staging || halfPruned)
            {
                Directory.Delete(d, true);
                removed.Add(name);
            }
        }
        foreach (var dir in new[] { root, Path.GetDirectoryName(Path.GetFullPath(root)) })
            if (dir != null && Directory.Exists(dir))
                foreach (var f in Directory.GetFiles(dir, ".*.tmp").Where(f => IsDebrisName(Path.GetFileName(f))))
                {
                    File.Delete(f);
                    removed.Add(Path.GetFileName(f));
                }
        return removed;
    }

    /// <summary>The names this class and <see cref="AtomicFile"/> give work in progress: `.NAME.GUID.tmp`, `.NAME.GUID.old.tmp`.</summary>
    static bool IsDebrisName(string name) => DebrisName().IsMatch(name);

    [System.Text.RegularExpressions.GeneratedRegex(@"^\..+\.[0-9a-f]{32}(\.old)?\.tmp$")]
    private static partial System.Text.RegularExpressions.Regex DebrisName();

    /// <summary>Deletes all but the newest <paramref name="keep"/> step checkpoints (each renamed aside first, so a
    /// kill mid-deletion leaves debris, never a half-deleted checkpoint under its own name).</summary>
    public static void Prune(string root, int keep)
    {
        var all = Steps(root);
        foreach (var d in all.Take(Math.Max(0, all.Count - Math.Max(1, keep))))
            DeleteAside(d);
    }

    /// <summary>Copies a checkpoint folder to root/<paramref name="name"/>, atomically.</summary>
    public static void CopyAs(string source, string root, string name)
    {
        var staging = Path.Combine(root, $".{name}.{Guid.NewGuid():N}.tmp");
        var final = Path.Combine(root, name);
        try
        {
            Directory.CreateDirectory(staging);
            foreach (var f in Directory.GetFiles(source))
                File.Copy(f, Path.Combine(staging, Path.GetFileName(f)));
            Replace(staging, final);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw WriteFailure(final, root, e);
        }
        finally
        {
            DeleteQuietly(staging);
        }
    }

    /// <summary>Renames a finished staging folder to its final name, moving an existing folder of that name aside first.</summary>
    static void Replace(string staging, string final)
    {
        if (Directory.Exists(final))
            DeleteAside(final);
        Directory.Move(staging, final);
    }

    static void DeleteAside(string dir)
    {
        var parent = Path.GetDirectoryName(Path.GetFullPath(dir)) ?? ".";
        var aside = Path.Combine(parent, $".{Path.GetFileName(dir)}.{Guid.NewGuid():N}.old.tmp");
        Directory.Move(dir, aside);
        Directory.Delete(aside, true);
    }

    static void DeleteQuietly(string dir)
    {
        try
        {
            if (Directory.Exists(dir))
                Directory.Delete(dir, true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // Left for the next run's RemoveDebris; the original failure is the one to report.
        }
    }
}
