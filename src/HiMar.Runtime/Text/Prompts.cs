using HiMar.Model;
using static TorchSharp.torch;

namespace HiMar.Runtime.Text;

/// <summary>A caption the model cannot read (an unknown word, too many words, a missing text encoder).</summary>
public sealed class PromptException(string message) : ArgumentException(message);

/// <summary>Turns captions into the condition a text model takes.</summary>
public static class Prompts
{
    /// <summary>
    /// Checks captions a person typed (`--prompt`): a caption that is empty, or has no word the built-in encoder
    /// reads, would silently sample the null condition, so it is refused with the way to ask for that on purpose.
    /// Errors quote at most <see cref="WordVocabulary.QuotedLength"/> characters, control characters escaped.
    /// </summary>
    public static void CheckGiven(IReadOnlyList<string> prompts, HiMarConfig config)
    {
        foreach (var p in prompts)
        {
            var empty = string.IsNullOrWhiteSpace(p)
                || (config.Text.Conditioning == Conditioning.Text && config.Text.Encoder == TextEncoderKind.Builtin && WordVocabulary.Words(p).Length == 0);
            if (empty)
                throw new PromptException($"--prompt {WordVocabulary.Quote(p)}: the caption has no words, which would sample the null condition (no caption) without saying so; to sample it on purpose, use --unconditional instead.");
        }
    }

    /// <summary>
    /// The condition of <paramref name="captions"/> for <paramref name="model"/>: word ids for the built-in encoder
    /// (every word must be in its vocabulary), or the context of <paramref name="encoder"/> for an external one.
    /// The empty string is the unconditional caption.
    /// </summary>
    public static Condition Encode(HiMAR model, IReadOnlyList<string> captions, ITextEncoder? encoder = null)
    {
        var c = model.Config;
        if (c.Text.Conditioning != Conditioning.Text)
            throw new PromptException("this model is conditioned on class labels, not captions (use --classes)");
        if (c.Text.Encoder == TextEncoderKind.Builtin)
        {
            var ids = new long[captions.Count * c.ContextLength];
            for (var i = 0; i < captions.Count; i++)
            {
                var r = WordVocabulary.TryEncode(c.Text.Vocabulary, c.ContextLength, captions[i]);
                if (r.IsError)
                    throw new PromptException(r.ErrorValue);
                r.ResultValue.CopyTo(ids, i * c.ContextLength);
            }
            return Condition.NewTokens(tensor(ids, [captions.Count, c.ContextLength], device: model.Device));
        }
        if (encoder == null)
            throw new PromptException($"this model reads an external text encoder's {c.ContextLength} x {c.Text.ExternalWidth} context; give the encoder (--text-encoder DIR: a CLIP text-model folder, or the himar model whose built-in encoder made the embeddings)");
        if (encoder.ContextLength != c.ContextLength || encoder.Width != c.Text.ExternalWidth)
            throw new PromptException($"the text encoder gives {encoder.ContextLength} x {encoder.Width} context, the model reads {c.ContextLength} x {c.Text.ExternalWidth}");
        var ctx = encoder.Encode(captions);
        return Condition.NewContext(ctx.to(model.DType, model.Device));
    }
}
