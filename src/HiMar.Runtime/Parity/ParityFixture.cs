using System.Text.Json.Nodes;
using HiMar.Model;
using HiMar.Runtime.Checkpoints;
using static TorchSharp.torch;

namespace HiMar.Runtime.Parity;

/// <summary>One case of a parity fixture's manifest: inputs and expected outputs under `NAME/tensor` keys.</summary>
/// <param name="Name">The case name (the key prefix in cases.safetensors).</param>
/// <param name="Kind">What it checks (`diffusion_schedule`, `mlp_head_forward`, ...).</param>
/// <param name="Inputs">Input tensor names.</param>
/// <param name="Outputs">Expected output tensor names.</param>
/// <param name="Atol">Absolute tolerance.</param>
/// <param name="Rtol">Tolerance relative to the largest expected magnitude.</param>
/// <param name="Spec">The whole manifest entry, for kind-specific fields.</param>
public sealed record ParityCase(
    string Name,
    string Kind,
    IReadOnlyList<string> Inputs,
    IReadOnlyList<string> Outputs,
    double Atol,
    double Rtol,
    JsonObject Spec)
{
    /// <summary>A string field of the case, or the fallback.</summary>
    public string Text(string field, string fallback = "") => Spec[field]?.GetValue<string>() ?? fallback;

    /// <summary>An integer field of the case, or the fallback.</summary>
    public int Int(string field, int fallback = 0) => Spec[field]?.GetValue<int>() ?? fallback;
}

/// <summary>
/// A parity fixture folder (see shared/fixtures/parity/README.md): the manifest, the reference model
/// configuration and weights, and the case tensors. Tensors load lazily and are disposed with the fixture.
/// </summary>
public sealed class ParityFixture : IDisposable
{
    readonly Dictionary<string, Dictionary<string, Tensor>> files = [];

    ParityFixture(string dir, JsonObject manifest, IReadOnlyList<ParityCase> cases)
    {
        Directory = dir;
        Manifest = manifest;
        Cases = cases;
    }

    /// <summary>The folder.</summary>
    public string Directory { get; }

    /// <summary>manifest.json as parsed.</summary>
    public JsonObject Manifest { get; }

    /// <summary>The reference `HiMAR(...)` arguments.</summary>
    public JsonObject ModelConfig => Manifest["model_config"]?.AsObject() ?? throw new InvalidDataException($"{ManifestPath}: no model_config.");

    /// <summary>The KL autoencoder's arguments, if the fixture has one.</summary>
    public JsonObject? VaeConfig => Manifest["vae_config"]?.AsObject();

    /// <summary>The cases, in manifest order.</summary>
    public IReadOnlyList<ParityCase> Cases { get; }

    /// <summary>The precision the cases compute their products in: fp32 (the parity check), or bf16 to measure
    /// mixed precision's error against the same reference outputs (`himar verify-parity --bf16`).</summary>
    public Precision Precision { get; set; } = Precision.Fp32;

    string ManifestPath => Path.Combine(Directory, "manifest.json");

    /// <summary>Reads a fixture folder's manifest; a missing or malformed one gives a message naming the file.</summary>
    public static ParityFixture Open(string dir)
    {
        var path = Path.Combine(dir, "manifest.json");
        if (!File.Exists(path))
            throw new FileNotFoundException($"{path}: no such file (a parity fixture folder holds manifest.json).", path);
        JsonObject manifest;
        try
        {
            manifest = JsonNode.Parse(File.ReadAllText(path))?.AsObject() ?? throw new InvalidDataException($"{path}: empty manifest.");
        }
        catch (System.Text.Json.JsonException e)
        {
            throw new InvalidDataException($"{path}: not valid JSON ({e.Message}).", e);
        }
        var cases = new List<ParityCase>();
        // `vae_cases` have no kind: their names (vae_encode, vae_decode) say what they check.
        foreach (var node in (manifest["cases"]?.AsArray() ?? []).Concat(manifest["vae_cases"]?.AsArray() ?? []))
        {
            var c = node!.AsObject();
            var name = c["name"]?.GetValue<string>() ?? throw new InvalidDataException($"{path}: a case has no name.");
            cases.Add(new ParityCase(
                name,
                c["kind"]?.GetValue<string>() ?? name,
                (c["inputs"]?.AsArray() ?? []).Select(x => x!.GetValue<string>()).ToList(),
                (c["outputs"]?.AsArray() ?? []).Select(x => x!.GetValue<string>()).ToList(),
                c["atol"]?.GetValue<double>() ?? 0,
                c["rtol"]?.GetValue<double>() ?? 0,
                c));
        }
        return new ParityFixture(dir, manifest, cases);
    }

    /// <summary>All tensors of one safetensors file of the folder (cached).</summary>
    public Dictionary<string, Tensor> Load(string name)
    {
        if (!files.TryGetValue(name, out var t))
        {
            t = SafeTensors.Load(Path.Combine(Directory, name));
            // The fixture owns these for its lifetime, whatever dispose scope the first reader runs in.
            foreach (var v in t.Values)
                v.DetachFromDisposeScope();
            files[name] = t;
        }
        return t;
    }

    /// <summary>The model state_dict (weights.safetensors).</summary>
    public Dictionary<string, Tensor> Weights => Load("weights.safetensors");

    /// <summary>A case tensor, `CASE/NAME` in cases.safetensors (or vae-cases.safetensors).</summary>
    public Tensor Tensor(ParityCase c, string name)
    {
        var key = $"{c.Name}/{name}";
        if (Load("cases.safetensors").TryGetValue(key, out var t))
            return t;
        if (System.IO.File.Exists(Path.Combine(Directory, "vae-cases.safetensors")) && Load("vae-cases.safetensors").TryGetValue(key, out t))
            return t;
        throw new InvalidDataException($"{Directory}: case tensor '{key}' is missing.");
    }

    HiMAR? model;

    /// <summary>The fixture's configuration as ours: the manifest's `model_config` over the Hi-MAR-B preset,
    /// with the top-level `dit_head_sampling_steps` when present.</summary>
    public HiMarConfig Config
    {
        get
        {
            Checkpoints.ModelConfigs.CheckArguments(ModelConfig, ManifestPath);
            var args = ReferenceArgs.FromJson(ModelConfig);
            if (Manifest["dit_head_sampling_steps"] is { } dit)
                args["dit_head_sampling_steps"] = dit.GetValue<string>();
            return ConfigCodec.FromReferenceArgs(HiMarConfigModule.Base, args);
        }
    }

    /// <summary>The model of this fixture in evaluation mode, with weights.safetensors loaded strictly.
    /// Built on first use; call it outside any dispose scope (the runner does).</summary>
    public HiMAR Model
    {
        get
        {
            if (model == null)
            {
                var m = new HiMAR(Config);
                HiMar.Model.Weights.Load(m, Weights, strict: true);
                m.eval();
                model = m;
            }
            return model;
        }
    }

    /// <summary>Disposes every loaded tensor.</summary>
    public void Dispose()
    {
        model?.Dispose();
        model = null;
        foreach (var f in files.Values)
            foreach (var t in f.Values)
                t.Dispose();
        files.Clear();
    }
}
