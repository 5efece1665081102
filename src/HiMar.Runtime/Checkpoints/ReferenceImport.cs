using System.Text.Json;
using System.Text.Json.Nodes;
using HiMar.Model;
using HiMar.Runtime.Parity;
using static TorchSharp.torch;

namespace HiMar.Runtime.Checkpoints;

/// <summary>What a checkpoint holds.</summary>
public enum CheckpointKind
{
    /// <summary>A Hi-MAR model (reference keys such as `encoder_blocks.0.attn.qkv.weight`).</summary>
    HiMar,

    /// <summary>A KL autoencoder (`encoder.conv_in.weight`, `quant_conv.weight`, ...).</summary>
    Vae,
}

/// <summary>
/// Imports the reference's checkpoints: `checkpoint-last.pth` (model or EMA weights, config from `args` and the
/// tensor shapes) and MAR's `vae.ckpt`, into a folder of safetensors plus a config JSON that loads instantly.
/// </summary>
public static class ReferenceImport
{
    /// <summary>The file names of an imported folder.</summary>
    public const string WeightsFile = "weights.safetensors", ConfigFile = "config.json";

    static int Count(IReadOnlyDictionary<string, Tensor> s, string prefix) =>
        s.Keys.Where(k => k.StartsWith(prefix, StringComparison.Ordinal))
            .Select(k => k[prefix.Length..].Split('.')[0])
            .Where(x => int.TryParse(x, out _)).Distinct().Count();

    static long Dim(IReadOnlyDictionary<string, Tensor> s, string key, int dim, string what) =>
        s.TryGetValue(key, out var t) && t.dim() > dim ? t.shape[dim] : throw new CheckpointFormatException($"{what}: no '{key}' to infer the configuration from (not a Hi-MAR checkpoint?).");

    /// <summary>Which kind of weights a state dict holds, or an error naming the file.</summary>
    public static CheckpointKind Detect(IReadOnlyDictionary<string, Tensor> state, string what)
    {
        if (state.ContainsKey("encoder.conv_in.weight") && state.ContainsKey("quant_conv.weight"))
            return CheckpointKind.Vae;
        if (state.ContainsKey("fake_latent") && state.ContainsKey("mask_token"))
            return CheckpointKind.HiMar;
        throw new CheckpointFormatException($"{what}: neither a Hi-MAR nor a KL autoencoder state dict (first keys: {string.Join(", ", state.Keys.Take(4))}).");
    }

    /// <summary>
    /// The Hi-MAR configuration of a state dict: architecture sizes from the tensor shapes, head counts and the
    /// remaining settings from <paramref name="args"/> (the checkpoint's argparse Namespace) over the preset it
    /// names (Hi-MAR-B when none).
    /// </summary>
    public static HiMarConfig InferConfig(IReadOnlyDictionary<string, object>? args, IReadOnlyDictionary<string, Tensor> s, string what)
    {
        var a = args == null ? [] : new Dictionary<string, object>(args);
        var baseConfig = a.TryGetValue("model", out var name) && name is string n && HiMarConfigModule.TryPreset(n) is { } p ? p.Value : HiMarConfigModule.Base;
        long e = Dim(s, "fake_latent", 1, what), l2 = Dim(s, "mask_token", 1, what);
        long l = l2 / 2, pivots = s.TryGetValue("cond_tokens", out var ct) ? ct.shape[1] : 0;
        long c = Dim(s, "z_proj.weight", 1, what);
        a["encoder_embed_dim"] = e;
        a["decoder_embed_dim"] = Dim(s, "decoder_embed.weight", 0, what);
        a["encoder_depth"] = (long)Count(s, "encoder_blocks.");
        a["decoder_depth"] = (long)Count(s, "decoder_blocks.");
        a["class_num"] = Dim(s, "class_emb.weight", 0, what);
        a["buffer_size"] = (Dim(s, "encoder_pos_embed_learned", 1, what) - l2) / 2;
        a["vae_embed_dim"] = c; // patch_size 1: token channels are the latent channels
        a["patch_size"] = 1L;
        if (pivots > 0)
        {
            a["cond_scale"] = (long)Math.Round(Math.Sqrt(pivots));
            a["cond_dim"] = ct!.shape[2];
        }
        var dense = l - pivots;
        var side = (long)Math.Round(Math.Sqrt(dense));
        var vaeStride = a.TryGetValue("vae_stride", out var vs) ? Convert.ToInt64(vs) : baseConfig.Backbone.VaeStride;
        a["img_size"] = side * vaeStride;
        a["mlp_ratio"] = (double)Dim(s, "encoder_blocks.0.mlp.fc1.weight", 0, what) / e;
        if (s.ContainsKey("diffloss.net.input_proj.weight"))
        {
            a["diffloss_w"] = Dim(s, "diffloss.net.input_proj.weight", 0, what);
            a["diffloss_d"] = (long)Count(s, "diffloss.net.res_blocks.");
        }
        if (s.ContainsKey("cond_diffloss.net.x_embedder.proj.weight"))
        {
            var g = Dim(s, "cond_diffloss.net.x_embedder.proj.weight", 0, what);
            a["gdm_w"] = g;
            a["gdm_d"] = (long)Count(s, "cond_diffloss.net.blocks.");
            a["ratio"] = (double)Dim(s, "cond_diffloss.net.blocks.0.mlp.fc1.weight", 0, what) / g;
        }
        // Ablation variants show in the keys: no pivot tokens (plain MAR), no Transformer head (MLP phase 2).
        if (pivots == 0 && !a.ContainsKey("pivots"))
            a["pivots"] = "none";
        if (!s.ContainsKey("cond_diffloss.net.x_embedder.proj.weight") && !a.ContainsKey("phase2_head"))
            a["phase2_head"] = "mlp";
        // Head counts cannot be read off shapes: from args, else the reference preset of that width (B/L/H).
        var byWidth = new[] { HiMarConfigModule.Base, HiMarConfigModule.Large, HiMarConfigModule.Huge }.FirstOrDefault(x => x.Backbone.EncoderWidth == e);
        if (!a.ContainsKey("encoder_num_heads") && byWidth != null)
            a["encoder_num_heads"] = (long)byWidth.Backbone.EncoderHeads;
        if (!a.ContainsKey("decoder_num_heads") && byWidth != null)
            a["decoder_num_heads"] = (long)byWidth.Backbone.DecoderHeads;
        var config = ConfigCodec.FromReferenceArgs(baseConfig, a);
        var problems = ConfigCodec.Validate(config);
        if (!problems.IsEmpty)
        {
            var hint = a.ContainsKey("encoder_num_heads") && a.ContainsKey("head") ? ""
                : " (head counts cannot be read from tensor shapes: give them in a config.json beside the file, e.g. {\"encoder_num_heads\": 16, \"decoder_num_heads\": 16, \"head\": 8})";
            throw new CheckpointFormatException($"{what}: the inferred configuration is inconsistent: {string.Join("; ", problems)}{hint}.");
        }
        return config;
    }

    /// <summary>The KL autoencoder configuration of a state dict (KL-16 layout; widths and levels from the shapes).</summary>
    public static VaeConfig InferVaeConfig(IReadOnlyDictionary<string, Tensor> s, string what)
    {
        long ch = Dim(s, "encoder.conv_in.weight", 0, what);
        var levels = Count(s, "encoder.down.");
        var mult = Enumerable.Range(0, levels).Select(i => (int)(Dim(s, $"encoder.down.{i}.block.0.conv1.weight", 0, what) / ch)).ToArray();
        var blocks = Count(s, "encoder.down.0.block.");
        var z = Dim(s, "post_quant_conv.weight", 0, what);
        var kl = VaeConfigModule.Kl16;
        var attn = Enumerable.Range(0, levels).Where(i => s.Keys.Any(k => k.StartsWith($"encoder.down.{i}.attn.", StringComparison.Ordinal)))
            .Select(i => kl.Resolution >> i).ToArray();
        return new VaeConfig((int)z, (int)ch, mult, blocks, kl.Resolution, (int)Dim(s, "encoder.conv_in.weight", 1, what),
            (int)Dim(s, "decoder.conv_out.weight", 0, what), attn, (int)z, true, kl.ScaleFactor);
    }

    static JsonObject VaeToJson(VaeConfig v) => new()
    {
        ["kind"] = "vae",
        ["embed_dim"] = v.EmbedDim,
        ["ch"] = v.Ch,
        ["ch_mult"] = new JsonArray(v.ChMult.Select(x => (JsonNode)x).ToArray()),
        ["num_res_blocks"] = v.NumResBlocks,
        ["resolution"] = v.Resolution,
        ["in_channels"] = v.InChannels,
        ["out_ch"] = v.OutCh,
        ["attn_resolutions"] = new JsonArray(v.AttnResolutions.Select(x => (JsonNode)x).ToArray()),
        ["z_channels"] = v.ZChannels,
        ["double_z"] = v.DoubleZ,
        ["scale_factor"] = v.ScaleFactor,
    };

    /// <summary>Checks keys and shapes of a state dict against a configuration, on the meta device (no memory).</summary>
    static void CheckFits(Func<nn.Module> build, IReadOnlyDictionary<string, Tensor> state, string what)
    {
        using var meta = Anatomy.OnMeta(Microsoft.FSharp.Core.FuncConvert.FromFunc(build));
        try
        {
            Weights.RequireFit(Weights.StateDict(meta), state);
        }
        catch (WeightMismatchException e)
        {
            throw new CheckpointFormatException($"{what}: {e.Message}", e);
        }
    }

    /// <summary>
    /// Imports a reference checkpoint (`.pth`) or a safetensors state dict into <paramref name="outDir"/>:
    /// weights.safetensors and config.json. Takes `model_ema` unless <paramref name="useEma"/> is false. Everything
    /// is checked before anything is written; the folder appears whole (written beside it, then renamed).
    /// </summary>
    public static (CheckpointKind Kind, string Summary) Import(string source, string outDir, bool useEma = true)
    {
        if (!File.Exists(source))
            throw new CheckpointFormatException($"{source}: no such file.");
        Dictionary<string, Tensor> state;
        IReadOnlyDictionary<string, object>? args = null;
        TorchCheckpoint? ckpt = null;
        try
        {
            if (source.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase))
            {
                state = SafeTensors.Load(source);
                args = ArgsBeside(source);
            }
            else
            {
                ckpt = TorchCheckpoint.Read(source);
                args = ckpt.Args();
                var root = ckpt.Root as Dictionary<string, object?>;
                var key = root != null && root.ContainsKey("model_ema") && useEma ? "model_ema" : "model";
                state = ckpt.StateDict(key);
            }
            var kind = Detect(state, source);
            JsonObject config;
            if (kind == CheckpointKind.HiMar)
            {
                var c = InferConfig(args, state, source);
                CheckFits(() => new HiMAR(c), state, source);
                config = ConfigCodec.ToJson(c);
            }
            else
            {
                var v = InferVaeConfig(state, source);
                CheckFits(() => new AutoencoderKL(v), state, source);
                config = VaeToJson(v);
            }
            var full = Path.GetFullPath(outDir);
            var staging = full.TrimEnd('/') + $".importing-{Guid.NewGuid():N}";
            Directory.CreateDirectory(staging);
            try
            {
                SafeTensors.Save(Path.Combine(staging, WeightsFile), state, new Dictionary<string, string> { ["source"] = Path.GetFileName(source) });
                AtomicFile.WriteText(Path.Combine(staging, ConfigFile), config.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
                if (Directory.Exists(full))
                {
                    foreach (var f in new[] { WeightsFile, ConfigFile })
                        File.Move(Path.Combine(staging, f), Path.Combine(full, f), overwrite: true);
                    Directory.Delete(staging, true);
                }
                else
                    Directory.Move(staging, full);
            }
            catch
            {
                if (Directory.Exists(staging))
                    Directory.Delete(staging, true);
                throw;
            }
            var count = state.Values.Sum(t => t.numel());
            return (kind, $"{state.Count} tensors, {count:N0} parameters");
        }
        finally
        {
            if (ckpt != null)
                ckpt.Dispose();
        }
    }

    /// <summary>Reference arguments from a config.json or parity manifest.json beside a bare state dict, if any.</summary>
    static Dictionary<string, object>? ArgsBeside(string file)
    {
        var dir = Path.GetDirectoryName(Path.GetFullPath(file)) ?? ".";
        foreach (var name in new[] { ConfigFile, "manifest.json" })
        {
            var p = Path.Combine(dir, name);
            if (!File.Exists(p))
                continue;
            var root = ReadConfig(dir, name);
            var argsNode = root["model_config"] as JsonObject ?? root;
            // A VAE's config.json describes the autoencoder; any other must hold known, typed reference arguments.
            if (!(root["kind"] is JsonValue kind && kind.GetValueKind() == JsonValueKind.String && kind.GetValue<string>() == "vae"))
                ModelConfigs.CheckArguments(argsNode, p);
            return ReferenceArgs.FromJson(argsNode);
        }
        return null;
    }

    /// <summary>Reads an imported folder's config.json as a Hi-MAR or VAE configuration.</summary>
    static JsonObject ReadConfig(string dir, string name = ConfigFile)
    {
        var path = Path.Combine(dir, name);
        if (!File.Exists(path))
            throw new CheckpointFormatException($"{path}: no such file (import the checkpoint with `himar import` first).");
        try
        {
            return JsonNode.Parse(File.ReadAllText(path)) as JsonObject ?? throw new CheckpointFormatException($"{path}: not a JSON object of settings.");
        }
        catch (JsonException e)
        {
            throw new CheckpointFormatException($"{path}: not valid JSON ({e.Message.Split('\n')[0]}).", e);
        }
    }

    /// <summary>A Hi-MAR model from an imported folder, a `.pth` checkpoint (EMA weights) or a parity fixture folder, in
    /// evaluation mode. Weights holding NaN or infinity are refused unless <paramref name="allowNonFinite"/>, which
    /// reports them to <paramref name="warn"/>.</summary>
    public static HiMAR LoadModel(string path, bool useEma = true, bool allowNonFinite = false, Action<string>? warn = null)
    {
        if (File.Exists(path))
        {
            using var ckpt = TorchCheckpoint.Read(path);
            var root = ckpt.Root as Dictionary<string, object?>;
            var state = ckpt.StateDict(root != null && root.ContainsKey("model_ema") && useEma ? "model_ema" : "model");
            var config = InferConfig(ckpt.Args(), state, path);
            FiniteWeights.Require(state, path, allowNonFinite, warn);
            var m = new HiMAR(config);
            Weights.Load(m, state, true);
            m.eval();
            return m;
        }
        HiMarConfig c;
        var manifest = Path.Combine(path, "manifest.json");
        // A training checkpoint folder is checked against its manifest first (a truncated or half-pruned one fails).
        var trainingCheckpoint = Training.Checkpoint.IsCheckpointFolder(path);
        if (trainingCheckpoint)
            Training.Checkpoint.Verify(path);
        if (File.Exists(manifest) && !trainingCheckpoint)
            c = ModelConfigs.Resolve(manifest);
        else
            c = ModelConfigs.FromJson(ReadConfig(path), Path.Combine(path, ConfigFile));
        var model = new HiMAR(c);
        // A training checkpoint folder holds EMA weights beside the raw ones: sample with those by default.
        var ema = Path.Combine(path, "ema.safetensors");
        ModelFiles.Load(model, useEma && File.Exists(ema) ? ema : Path.Combine(path, WeightsFile), true, allowNonFinite, warn);
        model.eval();
        return model;
    }

    /// <summary>A KL autoencoder from an imported folder, MAR's `vae.ckpt`, or a safetensors file of its weights, in
    /// evaluation mode. Weights holding NaN or infinity are refused unless <paramref name="allowNonFinite"/>, which
    /// reports them to <paramref name="warn"/>.</summary>
    public static AutoencoderKL LoadVae(string path, bool allowNonFinite = false, Action<string>? warn = null)
    {
        Dictionary<string, Tensor> state;
        TorchCheckpoint? ckpt = null;
        try
        {
            if (Directory.Exists(path))
                state = SafeTensors.Load(Path.Combine(path, File.Exists(Path.Combine(path, WeightsFile)) ? WeightsFile : "vae-weights.safetensors"));
            else if (path.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase))
                state = SafeTensors.Load(path);
            else
            {
                ckpt = TorchCheckpoint.Read(path);
                state = ckpt.StateDict("model");
            }
            if (Detect(state, path) != CheckpointKind.Vae)
                throw new CheckpointFormatException($"{path}: holds a Hi-MAR model, not a VAE.");
            FiniteWeights.Require(state, path, allowNonFinite, warn);
            var vae = new AutoencoderKL(InferVaeConfig(state, path));
            Weights.Load(vae, state, true);
            vae.eval();
            return vae;
        }
        finally
        {
            ckpt?.Dispose();
        }
    }
}
