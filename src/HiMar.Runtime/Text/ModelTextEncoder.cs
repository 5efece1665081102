using HiMar.Model;
using HiMar.Runtime.Checkpoints;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Text;

/// <summary>The built-in text encoder of a trained text model, behind <see cref="ITextEncoder"/> (for
/// `himar embed-captions` and scripts). Captions must use the model's vocabulary.</summary>
public sealed class ModelTextEncoder : ITextEncoder
{
    readonly HiMAR model;
    readonly bool owned;

    /// <summary>Wraps a model with a built-in encoder; <paramref name="owned"/> disposes it with this.</summary>
    public ModelTextEncoder(HiMAR model, bool owned = false)
    {
        if (model.Config.Text.Conditioning != Conditioning.Text || model.Config.Text.Encoder != TextEncoderKind.Builtin)
            throw new ArgumentException("the model has no built-in text encoder");
        this.model = model;
        this.owned = owned;
    }

    /// <inheritdoc/>
    public int ContextLength => model.Config.ContextLength;

    /// <inheritdoc/>
    public int Width => model.Config.Text.Width;

    /// <inheritdoc/>
    public Tensor Encode(IReadOnlyList<string> captions)
    {
        using var noGrad = torch.no_grad();
        using var condition = Prompts.Encode(model, captions);
        return model.TextEncoder.call(condition.Tensor);
    }

    /// <inheritdoc/>
    public Tensor EncodeEmpty() => Encode([""]);

    /// <inheritdoc/>
    public void Dispose()
    {
        if (owned)
            model.Dispose();
    }
}

/// <summary>Loads any text encoder the project supports.</summary>
public static class TextEncoders
{
    /// <summary>
    /// A CLIP text-model folder (model.safetensors with vocab.json and merges.txt), or a himar text model with a
    /// built-in encoder (a model folder or checkpoint whose config.json says `"text_encoder": "builtin"`).
    /// </summary>
    public static ITextEncoder Load(string path, Device? device = null)
    {
        var config = Path.Combine(path, ReferenceImport.ConfigFile);
        if (Directory.Exists(path) && File.Exists(config) && SaysBuiltinEncoder(config))
        {
            var m = ReferenceImport.LoadModel(path);
            if (device != null)
                m.to(device);
            return new ModelTextEncoder(m, owned: true);
        }
        return ClipTextEncoder.Load(path, device: device);
    }

    /// <summary>True when a config.json is a himar text model's with the built-in encoder (a CLIP config is not;
    /// the model's config is checked in full when it loads).</summary>
    static bool SaysBuiltinEncoder(string config)
    {
        try
        {
            return System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(config)) is System.Text.Json.Nodes.JsonObject o
                && o["text_encoder"] is System.Text.Json.Nodes.JsonValue v && v.GetValueKind() == System.Text.Json.JsonValueKind.String
                && v.GetValue<string>() == AblationNames.NameOf(AblationNames.TextEncoders, TextEncoderKind.Builtin);
        }
        catch (System.Text.Json.JsonException)
        {
            return false;
        }
    }
}
