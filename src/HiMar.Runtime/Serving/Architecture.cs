using HiMar.Model;
using HiMar.Runtime.Data;

namespace HiMar.Runtime.Serving;

/// <summary>One part of a loaded model, for teaching displays (`himar serve`, the notebook).</summary>
/// <param name="Key">A short identifier (encoder, decoder, scale-aware, mlp-head, transformer-head, text-encoder, tokenizer).</param>
/// <param name="Title">The part's name in the docs' words.</param>
/// <param name="Parameters">Its parameters in the loaded model.</param>
/// <param name="Summary">What it does, in one line.</param>
/// <param name="Doc">Its section of docs/architecture.md, as a link fragment (the heading's slug, e.g. "#mlp-head").</param>
public sealed record ArchitecturePart(string Key, string Title, long Parameters, string Summary, string Doc);

/// <summary>Groups a model's parameters by the architecture's parts.</summary>
public static class Architecture
{
    static readonly (string Key, string Title, string Summary)[] Parts =
    [
        ("text-encoder", "Text encoder", "Reads the caption's words into the context that the encoder's buffer tokens carry."),
        ("encoder", "Encoder", "Sees the condition (class or caption) in its buffer tokens and the tokens known so far; unknown tokens are left out."),
        ("decoder", "Decoder", "Puts mask tokens back at the unknown positions and gives every position a state z that conditions the heads."),
        ("scale-aware", "Scale-aware blocks", "Each block's adaLN scale and shift differ by phase, so one backbone serves the pivots and the dense tokens."),
        ("mlp-head", "MLP head", "Phase 1: a small diffusion MLP draws each pivot from noise, conditioned on that pivot's z alone."),
        ("transformer-head", "Transformer head", "Phase 2: a small DiT denoises the whole dense grid at once, conditioned on every token's z."),
        ("tokenizer", "VAE", "Turns tokens into pixels: a KL autoencoder, or for Fashion-MNIST plain 4x4 pixel patches with no weights."),
    ];

    /// <summary>The part a parameter (state-dict name) belongs to.</summary>
    public static string PartOf(string name)
    {
        var leaf = name[(name.LastIndexOf('.') + 1)..];
        if (leaf is "adaLN_scale" or "adaLN_shift" || name.StartsWith("encoder_blocks_ada.", StringComparison.Ordinal) || name.StartsWith("decoder_blocks_ada.", StringComparison.Ordinal))
            return "scale-aware";
        if (name.StartsWith("cond_diffloss.", StringComparison.Ordinal))
            return "transformer-head";
        if (name.StartsWith("diffloss.", StringComparison.Ordinal))
            return "mlp-head";
        if (name.StartsWith("text_encoder.", StringComparison.Ordinal))
            return "text-encoder";
        if (name.StartsWith("decoder", StringComparison.Ordinal) || name is "mask_token" or "diffusion_pos_embed_learned")
            return "decoder";
        return "encoder";
    }

    /// <summary>The parts of <paramref name="model"/> with their parameter counts, in the order a token meets them;
    /// parts the model lacks (a text encoder, a phase-2 head) are left out; the tokenizer is always listed.</summary>
    public static IReadOnlyList<ArchitecturePart> Describe(HiMAR model, ITokenizer tokenizer)
    {
        var counts = Parts.ToDictionary(p => p.Key, _ => 0L);
        foreach (var (name, p) in model.named_parameters())
            counts[PartOf(name)] += p.numel();
        counts["tokenizer"] = tokenizer is VaeTokenizer v ? v.Vae.parameters().Sum(p => p.numel()) : 0;
        return Parts
            .Where(p => p.Key == "tokenizer" || counts[p.Key] > 0)
            .Select(p => new ArchitecturePart(p.Key, p.Title, counts[p.Key], p.Summary, "#" + p.Title.ToLowerInvariant().Replace(' ', '-')))
            .ToList();
    }
}
