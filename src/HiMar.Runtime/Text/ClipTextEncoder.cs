using System.Text.Json;
using System.Text.Json.Nodes;
using HiMar.Model;
using HiMar.Runtime.Checkpoints;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Text;

/// <summary>
/// CLIP's text tower as an <see cref="ITextEncoder"/>: captions through <see cref="ClipTokenizer"/> and
/// <see cref="ClipTextModel"/>; the context is the last hidden state (B, 77, D), as Stable Diffusion-style models use it.
/// Loads HF's layout as published (openai/clip-vit-large-patch14: `model.safetensors`, `vocab.json`, `merges.txt`),
/// supplied by the user; nothing is downloaded.
/// </summary>
public sealed class ClipTextEncoder : ITextEncoder
{
    /// <summary>The weights file of an HF model folder.</summary>
    public const string WeightsFile = "model.safetensors";

    /// <summary>The HF configuration file, read (if present) for what the shapes do not tell: heads, activation, eps.</summary>
    public const string ConfigFile = "config.json";

    readonly Device device;

    /// <summary>An encoder of a model and a tokenizer whose ids fit the model's vocabulary and positions.</summary>
    public ClipTextEncoder(ClipTextModel model, ClipTokenizer tokenizer)
    {
        var config = model.Config;
        if (tokenizer.ContextLength > config.ContextLength)
            throw new ArgumentException($"the tokenizer makes {tokenizer.ContextLength} ids per caption; the model has {config.ContextLength} positions");
        var maxId = tokenizer.Vocabulary.Values.Append(tokenizer.PadId).Max();
        if (maxId >= config.VocabSize)
            throw new ArgumentException($"the tokenizer's ids reach {maxId}; the model embeds {config.VocabSize} tokens");
        Model = model;
        Tokenizer = tokenizer;
        device = model.parameters().First().device;
        model.eval();
    }

    /// <summary>The text tower.</summary>
    public ClipTextModel Model { get; }

    /// <summary>The tokenizer.</summary>
    public ClipTokenizer Tokenizer { get; }

    /// <inheritdoc/>
    public int ContextLength => Tokenizer.ContextLength;

    /// <inheritdoc/>
    public int Width => (int)Model.Config.Width;

    /// <summary>
    /// Loads a CLIP text encoder. <paramref name="path"/> is a folder holding `model.safetensors` or a safetensors
    /// file; the tokenizer files (<see cref="ClipTokenizer.FromFolder"/>) are read from <paramref name="tokenizerFolder"/>,
    /// by default the weights' folder. Only `text_model.*` tensors (and `text_projection.weight` when the model has a
    /// projection) are read, so a full CLIP checkpoint's vision tower is ignored; HF's old `position_ids` buffer is
    /// skipped. Without <paramref name="config"/> the configuration is read off the shapes, with heads, activation
    /// and eps from `config.json` beside the weights (its `text_config` for a full CLIP) or OpenAI's defaults
    /// (width / 64 heads, quick_gelu, 1e-5). Loading is strict: a missing or mismatched key raises
    /// <see cref="CheckpointFormatException"/> naming the file and every key.
    /// </summary>
    public static ClipTextEncoder Load(string path, string? tokenizerFolder = null, ClipTextConfig? config = null, Device? device = null, ScalarType? dtype = null)
    {
        var file = Directory.Exists(path) ? Path.Combine(path, WeightsFile) : path;
        if (!File.Exists(file))
            throw new CheckpointFormatException($"{file}: not found. Supply the CLIP text weights (HF openai/clip-vit-large-patch14 {WeightsFile}); nothing is downloaded.");
        var folder = Path.GetDirectoryName(Path.GetFullPath(file)) ?? ".";
        var weights = SafeTensors.Load(file, IsTextKey, out _);
        try
        {
            if (!weights.Keys.Any(k => k.StartsWith("text_model.", StringComparison.Ordinal)))
                throw new CheckpointFormatException($"{file}: no CLIP text tower (no text_model.* tensors).");
            ClipTextConfig cfg;
            try
            {
                cfg = config ?? InferConfig(weights, Path.Combine(folder, ConfigFile));
            }
            catch (WeightMismatchException e)
            {
                throw new CheckpointFormatException($"{file}: {e.Message}", e);
            }
            if (cfg.ProjectionDim == 0 && weights.Remove("text_projection.weight", out var projection))
                projection.Dispose();
            var tokenizer = ClipTokenizer.FromFolder(tokenizerFolder ?? folder, (int)cfg.ContextLength);
            var model = new ClipTextModel(cfg);
            try
            {
                Weights.Load(model, weights, true);
            }
            catch (WeightMismatchException e)
            {
                model.Dispose();
                throw new CheckpointFormatException($"{file}: {e.Message}", e);
            }
            if (dtype is { } d)
                model.to(d);
            if (device is not null)
                model.to(device);
            return new ClipTextEncoder(model, tokenizer);
        }
        finally
        {
            foreach (var t in weights.Values)
                t.Dispose();
        }
    }

    static bool IsTextKey(string key) =>
        key == "text_projection.weight"
        || key.StartsWith("text_model.", StringComparison.Ordinal) && !key.EndsWith(".position_ids", StringComparison.Ordinal);

    // Shapes from the weights; heads, activation and eps from config.json (HF `CLIPTextConfig` or a full
    // `CLIPConfig`'s `text_config`) where present, else OpenAI's values.
    static ClipTextConfig InferConfig(Dictionary<string, Tensor> weights, string configPath)
    {
        long heads = 0;
        var quickGelu = true;
        var eps = 1e-5;
        if (File.Exists(configPath))
        {
            try
            {
                var root = JsonNode.Parse(File.ReadAllText(configPath))?.AsObject();
                var text = root?["text_config"]?.AsObject() ?? root;
                if (text?["num_attention_heads"] is { } h)
                    heads = h.GetValue<long>();
                if (text?["hidden_act"] is { } act)
                    quickGelu = act.GetValue<string>() switch
                    {
                        "quick_gelu" => true,
                        "gelu" => false,
                        var other => throw new CheckpointFormatException($"{configPath}: hidden_act '{other}' is not supported (quick_gelu or gelu)."),
                    };
                if (text?["layer_norm_eps"] is { } e)
                    eps = e.GetValue<double>();
            }
            catch (Exception e) when (e is JsonException or InvalidOperationException or FormatException)
            {
                throw new CheckpointFormatException($"{configPath}: not a readable CLIP configuration ({e.Message}).", e);
            }
        }
        var shapes = weights.ToDictionary(kv => kv.Key, kv => kv.Value.shape);
        return ClipText.ConfigFromShapes(shapes, heads, quickGelu, eps);
    }

    /// <summary>The last hidden states (B, L, D) and the pooled states at the end tokens (B, D) of B captions.</summary>
    public (Tensor Hidden, Tensor Pooled) EncodeWithPooled(IReadOnlyList<string> captions)
    {
        using var scope = torch.NewDisposeScope();
        using var noGrad = torch.no_grad();
        var ids = Tokenizer.Encode(captions).to(device);
        var hidden = Model.call(ids);
        var pooled = Model.Pool(hidden, ids);
        return (hidden.MoveToOuterDisposeScope(), pooled.MoveToOuterDisposeScope());
    }

    /// <inheritdoc/>
    public Tensor Encode(IReadOnlyList<string> captions)
    {
        var (hidden, pooled) = EncodeWithPooled(captions);
        pooled.Dispose();
        return hidden;
    }

    /// <inheritdoc/>
    public Tensor EncodeEmpty() => Encode([""]);

    /// <inheritdoc/>
    public void Dispose() => Model.Dispose();
}
