using HiMar.Model;
using HiMar.Runtime.Catalog;

namespace HiMar.Runtime.Sampling;

/// <summary>What a person asked to sample (`himar sample`'s --classes, -n, --per-class, --prompt, --unconditional), each null or empty when not given.</summary>
public sealed record SampleAsk
{
    /// <summary>Comma-separated classes: numbers, or names for models that name their classes.</summary>
    public string? Classes { get; init; }

    /// <summary>Random classes (from the seed) instead of <see cref="Classes"/>; with a text model, images per caption.</summary>
    public int? N { get; init; }

    /// <summary>Images per class.</summary>
    public int? PerClass { get; init; }

    /// <summary>Captions (text models).</summary>
    public IReadOnlyList<string> Prompts { get; init; } = [];

    /// <summary>Sample the null condition on purpose.</summary>
    public bool Unconditional { get; init; }

    /// <summary>A shipped model (`--preset`): every class, six images each, or one caption per class for a text model.</summary>
    public bool Shipped { get; init; }

    /// <summary>The run seed (also picks the random classes of <see cref="N"/>).</summary>
    public long Seed { get; init; }
}

/// <summary>The condition of every image of a run, in output order, and the grid's columns.</summary>
/// <param name="Labels">One class label per image (class models; empty for text models).</param>
/// <param name="Prompts">One caption per image (text models; null for class models).</param>
/// <param name="Columns">Grid columns; 0 for a square-ish grid.</param>
public sealed record SampleConditions(IReadOnlyList<long> Labels, IReadOnlyList<string>? Prompts, int Columns)
{
    /// <summary>Images in the run.</summary>
    public int Count => Prompts?.Count ?? Labels.Count;

    /// <summary>
    /// What to sample for <paramref name="ask"/> on a model of <paramref name="config"/>: the one place that checks
    /// the request against the model (captions for text models, classes for class models, --unconditional alone)
    /// and fills in the defaults. Every problem is a <see cref="BadInputException"/> naming the flag.
    /// </summary>
    public static SampleConditions Resolve(HiMarConfig config, SampleAsk ask)
    {
        var classNum = config.Backbone.ClassCount;
        var text = config.Text.Conditioning == Conditioning.Text;
        if (ask.Unconditional && (ask.Prompts.Count > 0 || ask.Classes != null))
            throw new BadInputException("--unconditional samples the null condition: give it without --prompt or --classes");
        Text.Prompts.CheckGiven(ask.Prompts, config);
        if (!text && ask.Prompts.Count > 0)
            throw new BadInputException("this model is conditioned on class labels, not captions: use --classes or --n");
        if (text)
        {
            IReadOnlyList<string> given = ask.Unconditional ? [""]
                : ask.Prompts.Count > 0 ? ask.Prompts
                // A shipped Fashion-MNIST text model without a prompt shows every class ("a t-shirt", "a pair of trousers", ...).
                : ask.Shipped && classNum == 10 ? FashionCaptions.ClassPhrases.Select(p => FashionCaptions.Fill("{a} {x}", p[0])).ToList()
                : throw new BadInputException("this is a text-to-image model: give a caption with --prompt \"...\"");
            var perPrompt = ask.N ?? (ask.Unconditional ? 1 : ask.Shipped && ask.Prompts.Count == 0 ? 6 : ask.Shipped ? 8 : 1);
            return new SampleConditions([], given.SelectMany(p => Enumerable.Repeat(p, perPrompt)).ToList(), Math.Min(perPrompt, 8));
        }
        var perClass = ask.PerClass ?? (ask.Shipped && !ask.Unconditional ? 6 : 1);
        long[] classes;
        if (ask.Unconditional)
            classes = Enumerable.Repeat((long)classNum, ask.N ?? 1).ToArray();
        else if (ask.Classes != null)
            classes = ModelTraits.ParseClasses(config, ask.Classes);
        else if (ask.N is { } n)
        {
            var rng = new Random((int)ask.Seed);
            classes = Enumerable.Range(0, n).Select(_ => (long)rng.Next(classNum)).ToArray();
        }
        else
            classes = Enumerable.Range(0, ask.Shipped ? classNum : Math.Min(4, classNum)).Select(c => (long)c).ToArray();
        var labels = classes.SelectMany(c => Enumerable.Repeat(c, perClass)).ToList();
        return new SampleConditions(labels, null, ask.Shipped ? perClass : 0);
    }
}
