using HiMar.Model;
using HiMar.Runtime.Data;
using static TorchSharp.torch;

namespace HiMar.Runtime.Text;

/// <summary>
/// The captions of a data set's examples (several per image, as COCO's five), as the condition of a training
/// batch. The trainer draws one caption per example and step.
/// </summary>
public interface ICaptionSource
{
    /// <summary>Examples (equal to the image data's count).</summary>
    int Count { get; }

    /// <summary>Captions of example <paramref name="example"/> (at least one).</summary>
    int CaptionsOf(int example);

    /// <summary>The text of a caption, when the source keeps it (precomputed embeddings may not).</summary>
    string? Text(int example, int caption);

    /// <summary>The condition of a batch: caption <paramref name="captions"/>[i] of example <paramref name="examples"/>[i].</summary>
    Condition Batch(HiMAR model, IReadOnlyList<int> examples, IReadOnlyList<int> captions);

    /// <summary>The empty caption's context (1, L, D) of an external encoder (the model's fixed null context), or null.</summary>
    Tensor? EmptyContext { get; }

    /// <summary>Throws a clear error when the source cannot condition <paramref name="config"/>.</summary>
    void CheckFits(HiMarConfig config);
}

/// <summary>Captions as text, encoded each step: word ids for a built-in encoder, or an external encoder's context.</summary>
public sealed class CaptionTexts(IReadOnlyList<IReadOnlyList<string>> captions, ITextEncoder? encoder = null) : ICaptionSource
{
    /// <inheritdoc/>
    public int Count => captions.Count;

    /// <summary>The captions of every example.</summary>
    public IReadOnlyList<IReadOnlyList<string>> Captions => captions;

    /// <inheritdoc/>
    public int CaptionsOf(int example) => captions[example].Count;

    /// <inheritdoc/>
    public string? Text(int example, int caption) => captions[example][caption];

    /// <inheritdoc/>
    public Condition Batch(HiMAR model, IReadOnlyList<int> examples, IReadOnlyList<int> chosen) =>
        Prompts.Encode(model, examples.Select((e, i) => captions[e][chosen[i]]).ToList(), encoder);

    /// <inheritdoc/>
    public Tensor? EmptyContext => encoder?.EncodeEmpty();

    /// <inheritdoc/>
    public void CheckFits(HiMarConfig config)
    {
        if (config.Text.Conditioning != Conditioning.Text)
            throw new ArgumentException("captions given, but the model is conditioned on class labels (conditioning: class)");
        if (config.Text.Encoder == TextEncoderKind.External && encoder == null)
            throw new ArgumentException("the model reads an external encoder's context: precompute it with `himar embed-captions` and train with --embeddings");
        if (config.Text.Encoder == TextEncoderKind.Builtin)
        {
            // Every caption must be readable before the first step, not at step 40,000.
            for (var e = 0; e < captions.Count; e++)
                foreach (var c in captions[e])
                {
                    var r = WordVocabulary.TryEncode(config.Text.Vocabulary, config.ContextLength, c);
                    if (r.IsError)
                        throw new PromptException($"caption {e}: {r.ErrorValue}");
                }
        }
    }

    /// <summary>COCO captions in the order of a data set's image keys (a latent cache's `files`); an image without
    /// captions is an error naming it and <paramref name="captionsFile"/>.</summary>
    public static CaptionTexts ForKeys(CocoCaptions coco, IReadOnlyList<string> keys, string captionsFile)
    {
        var byFile = new Dictionary<string, IReadOnlyList<string>>(StringComparer.Ordinal);
        for (var i = 0; i < coco.Files.Count; i++)
            byFile[coco.Files[i]] = coco.Captions[i];
        return new(keys.Select(k => byFile.TryGetValue(k, out var c) ? c : throw new InvalidDataException($"{captionsFile}: no captions for the image '{k}' of the training data.")).ToList());
    }

    /// <summary>The image keys of Fashion-MNIST's training examples ("train/0", "train/1", ...), as in caption embeddings.</summary>
    public static IReadOnlyList<string> FashionMnistKeys(int count) => Enumerable.Range(0, count).Select(i => $"train/{i}").ToList();

    /// <summary>Fashion-MNIST captions from the labels and the training templates: five per image.</summary>
    public static CaptionTexts FashionMnist(IReadOnlyList<long> labels) =>
        new(labels.Select((l, i) => (IReadOnlyList<string>)FashionCaptions.ForImage(i, (int)l)).ToList());
}
