using System.Globalization;
using HiMar.Model;
using HiMar.Runtime.Checkpoints;
using HiMar.Runtime.Data;
using HiMar.Runtime.Imaging;
using HiMar.Runtime.Sampling;
using SixLabors.ImageSharp;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Serving;

/// <summary>The settings of one generation, checked against the model's limits.</summary>
public sealed record GenerateSettings
{
    /// <summary>The class label (class models).</summary>
    public long Label { get; init; }

    /// <summary>The caption (text models).</summary>
    public string? Prompt { get; init; }

    /// <summary>Phase-1 guidance (pivots, `re_cfg`); 1 is off.</summary>
    public double Guidance1 { get; init; }

    /// <summary>Phase-2 guidance (dense tokens, `cfg`); 1 is off.</summary>
    public double Guidance2 { get; init; }

    /// <summary>Sampling temperature.</summary>
    public double Temperature { get; init; }

    /// <summary>Phase-1 generation steps.</summary>
    public int Steps1 { get; init; }

    /// <summary>Phase-2 generation steps.</summary>
    public int Steps2 { get; init; }

    /// <summary>Diffusion steps of either head per generation step (an even respacing of the training schedule).</summary>
    public int HeadSteps { get; init; }

    /// <summary>The run seed.</summary>
    public long Seed { get; init; }
}

/// <summary>One step's picture for a live display: the grid of that step's phase, decoded, and its tokens.</summary>
/// <param name="Phase">1 (pivots) or 2 (dense tokens).</param>
/// <param name="Step">The step within the phase (0-based).</param>
/// <param name="Steps">Steps in the phase.</param>
/// <param name="Png">The decoded grid as a PNG.</param>
/// <param name="Grid">The token grid's side.</param>
/// <param name="Offset">Where the first token starts, in pixels of the PNG (may be negative: cropped padding).</param>
/// <param name="Cell">A token's side in pixels of the PNG.</param>
/// <param name="Decided">Tokens decided at this step (row-major indices).</param>
/// <param name="Known">Tokens decided at this step or before.</param>
public sealed record StepFrame(int Phase, int Step, int Steps, byte[] Png, int Grid, double Offset, double Cell, int[] Decided, int[] Known);

/// <summary>A finished generation: the image and how long it took.</summary>
/// <param name="Png">The final image as a PNG.</param>
/// <param name="Seconds">Sampling and decoding time.</param>
public sealed record GenerateResult(byte[] Png, double Seconds);

/// <summary>A model loaded for `himar serve`: weights, tokenizer, sampling defaults, limits, its queue and its parts.</summary>
public sealed class ServedModel : IDisposable
{
    /// <summary>The most phase-2 steps a request may ask for (every step is a decoded frame); 32 lets `fashion-mar` be
    /// served with its sampling.json's 32 steps.</summary>
    public const int MaxSteps2 = 32;

    /// <summary>The most diffusion steps per head call a request may ask for.</summary>
    public const int MaxHeadSteps = 100;

    /// <summary>The largest guidance scale a request may ask for.</summary>
    public const double MaxGuidance = 10.0;

    /// <summary>The largest temperature a request may ask for.</summary>
    public const double MaxTemperature = 2.0;

    /// <summary>The longest prompt, in characters.</summary>
    public const int MaxPromptLength = 200;

    /// <summary>The request parameters <see cref="Parse"/> reads (and `model`, which picks the model).</summary>
    public static readonly IReadOnlyList<string> Parameters = ["model", "class", "prompt", "guidance1", "guidance2", "temperature", "steps1", "steps2", "head_steps", "seed"];

    readonly ITextEncoder? textEncoder;
    readonly IReadOnlyDictionary<string, double> defaults;

    ServedModel(string name, HiMAR model, ITokenizer tokenizer, ITextEncoder? textEncoder, IReadOnlyDictionary<string, double> defaults, int waiting)
    {
        Name = name;
        Model = model;
        Tokenizer = tokenizer;
        this.textEncoder = textEncoder;
        this.defaults = defaults;
        Queue = new GenerationQueue(waiting);
        var c = model.Config;
        PixelModel = Catalog.ModelTraits.UsesPixelPatches(c);
        ClassNames = c.Text.Conditioning == Conditioning.Text ? []
            : Enumerable.Range(0, c.Backbone.ClassCount).Select(i => Catalog.ModelTraits.LabelText(c, i)).ToList();
        Parts = Architecture.Describe(model, tokenizer);
    }

    /// <summary>The name requests pick it by.</summary>
    public string Name { get; }

    /// <summary>The model, in evaluation mode on its device.</summary>
    public HiMAR Model { get; }

    /// <summary>Its tokenizer (VAE or pixel patches).</summary>
    public ITokenizer Tokenizer { get; }

    /// <summary>Its queue: one generation at a time.</summary>
    public GenerationQueue Queue { get; }

    /// <summary>A pixel-space model (the fashion presets' 4x4 patches).</summary>
    public bool PixelModel { get; }

    /// <summary>True for a text-to-image model.</summary>
    public bool IsText => Model.Config.Text.Conditioning == Conditioning.Text;

    /// <summary>The class names (class models), in label order.</summary>
    public IReadOnlyList<string> ClassNames { get; }

    /// <summary>The words a built-in text encoder knows (empty otherwise: any caption goes to the external encoder).</summary>
    public IReadOnlyList<string> Vocabulary => IsText ? Model.Config.Text.Vocabulary : [];

    /// <summary>Prompts to offer: one per Fashion-MNIST class for the shipped text model.</summary>
    public IReadOnlyList<string> ExamplePrompts =>
        IsText && Model.Config.Backbone.ClassCount == 10 && Vocabulary.Count > 0
            ? FashionCaptions.ClassPhrases.Select(p => FashionCaptions.Fill("{a} {x}", p[0])).ToList()
            : [];

    /// <summary>The model's parts with their parameter counts.</summary>
    public IReadOnlyList<ArchitecturePart> Parts { get; }

    /// <summary>The most phase-1 steps: one pivot each.</summary>
    public int MaxSteps1 => Math.Max(1, Model.Config.PivotTokens);

    /// <summary>The settings a request starts from: the model folder's sampling.json, else the sampler's defaults;
    /// head steps 20 (a quarter of a second per image for the fashion presets).</summary>
    public GenerateSettings Defaults => new()
    {
        Label = 0,
        Prompt = IsText ? ExamplePrompts.FirstOrDefault() ?? "" : null,
        Guidance1 = Default("re_cfg", 1.0),
        Guidance2 = Default("cfg", 1.0),
        Temperature = Default("temperature", 1.0),
        Steps1 = Math.Min(MaxSteps1, Model.Config.Phase1Steps),
        Steps2 = Math.Min(MaxSteps2, (int)Default("num_iter", 4)),
        HeadSteps = 20,
        Seed = 0,
    };

    double Default(string key, double fallback) => defaults.TryGetValue(key, out var v) ? v : fallback;

    /// <summary>
    /// Loads a model for serving: <paramref name="checkpoint"/> as `himar sample --checkpoint` takes it; a VAE for
    /// latent models (pixel-space models need none); an external text encoder for text models that need one.
    /// </summary>
    public static ServedModel Load(string name, string checkpoint, string? vae, string? textEncoder, Device device, bool useEma = true, int waiting = 2)
    {
        var model = ReferenceImport.LoadModel(checkpoint, useEma);
        try
        {
            model.to(device);
            model.eval();
            var tokenizer = Catalog.ModelTraits.Tokenizer(model.Config, checkpoint, vae, device: device)
                ?? throw new BadInputException($"{checkpoint}: this model's tokens are VAE latents; give the VAE with --vae.");
            ITextEncoder? encoder = null;
            if (textEncoder != null)
            {
                if (model.Config.Text.Conditioning != Conditioning.Text)
                    throw new BadInputException($"--text-encoder: {checkpoint} is conditioned on class labels, not captions.");
                encoder = Text.TextEncoders.Load(textEncoder, device);
            }
            else if (model.Config.Text.Conditioning == Conditioning.Text && model.Config.Text.Encoder != TextEncoderKind.Builtin)
                throw new BadInputException($"{checkpoint}: this text model reads an external encoder's context; give it with --text-encoder.");
            var defaults = Directory.Exists(checkpoint) ? SamplerSettings.Defaults(checkpoint) : new Dictionary<string, double>();
            return new ServedModel(name, model, tokenizer, encoder, defaults, waiting);
        }
        catch
        {
            model.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Reads and checks a request's settings (parameters as named in <see cref="Parameters"/>; a missing one takes
    /// its default). Throws <see cref="BadInputException"/> with one line naming the parameter and the problem.
    /// </summary>
    public GenerateSettings Parse(IReadOnlyDictionary<string, string> query)
    {
        foreach (var key in query.Keys)
            if (!Parameters.Contains(key))
                throw new BadInputException($"unknown parameter '{Clip(key)}' (known: {string.Join(", ", Parameters)}).");
        var d = Defaults;
        string? Get(string key) => query.TryGetValue(key, out var v) && v.Length > 0 ? v : null;

        double Number(string key, double fallback, double min, double max, bool minOpen = false)
        {
            var text = Get(key);
            if (text == null)
                return fallback;
            if (!double.TryParse(text, NumberStyles.Float, CultureInfo.InvariantCulture, out var v) || !double.IsFinite(v))
                throw new BadInputException($"{key}: '{Clip(text)}' is not a finite number.");
            if (minOpen ? v <= min : v < min)
                throw new BadInputException($"{key}: {v.ToString(CultureInfo.InvariantCulture)} is too small; it must be {(minOpen ? "above" : "at least")} {min.ToString(CultureInfo.InvariantCulture)}.");
            if (v > max)
                throw new BadInputException($"{key}: {v.ToString(CultureInfo.InvariantCulture)} is above the cap of {max.ToString(CultureInfo.InvariantCulture)}.");
            return v;
        }

        long Integer(string key, long fallback, long min, long max, string why)
        {
            var text = Get(key);
            if (text == null)
                return fallback;
            if (!long.TryParse(text, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out var v))
                throw new BadInputException($"{key}: '{Clip(text)}' is not a whole number.");
            if (v < min)
                throw new BadInputException($"{key}: {v} is too small; it must be at least {min}.");
            if (v > max)
                throw new BadInputException($"{key}: {v} is above the cap of {max}{why}.");
            return v;
        }

        var settings = new GenerateSettings
        {
            Guidance1 = Number("guidance1", d.Guidance1, 1.0, MaxGuidance),
            Guidance2 = Number("guidance2", d.Guidance2, 1.0, MaxGuidance),
            Temperature = Number("temperature", d.Temperature, 0.0, MaxTemperature, minOpen: true),
            Steps1 = (int)Integer("steps1", d.Steps1, 1, MaxSteps1, $" (one pivot per step: the model has {MaxSteps1} pivots)"),
            Steps2 = (int)Integer("steps2", d.Steps2, 1, Math.Min(MaxSteps2, Model.Config.DenseTokens), ""),
            HeadSteps = (int)Integer("head_steps", d.HeadSteps, 1, Math.Min(MaxHeadSteps, Model.Config.Training.DiffusionSteps), ""),
            Seed = Integer("seed", d.Seed, 0, int.MaxValue, ""),
        };
        if (IsText)
        {
            if (Get("class") != null)
                throw new BadInputException($"class: the model '{Name}' reads captions; give a prompt instead.");
            var prompt = Get("prompt") ?? throw new BadInputException($"prompt: the model '{Name}' needs a caption, e.g. \"{d.Prompt}\".");
            if (prompt.Length > MaxPromptLength)
                throw new BadInputException($"prompt: {prompt.Length} characters is above the cap of {MaxPromptLength}.");
            if (prompt.Any(char.IsControl))
                throw new BadInputException("prompt: control characters (line breaks, tabs) are not allowed.");
            if (WordVocabulary.Words(prompt).Length == 0)
                throw new BadInputException("prompt: it has no words.");
            if (Vocabulary.Count > 0)
            {
                var r = WordVocabulary.TryEncode(Model.Config.Text.Vocabulary, Model.Config.ContextLength, prompt);
                if (r.IsError)
                    throw new BadInputException("prompt: " + r.ErrorValue);
            }
            return settings with { Prompt = prompt };
        }
        if (Get("prompt") != null)
            throw new BadInputException($"prompt: the model '{Name}' is conditioned on class labels; pick a class instead.");
        var cls = Get("class");
        if (cls == null)
            return settings with { Label = d.Label };
        var named = ClassNames.Select((n, i) => (n, i)).FirstOrDefault(x => string.Equals(x.n, cls.Trim(), StringComparison.OrdinalIgnoreCase));
        if (named.n != null)
            return settings with { Label = named.i };
        if (long.TryParse(cls, NumberStyles.None, CultureInfo.InvariantCulture, out var label) && label < Model.Config.Backbone.ClassCount)
            return settings with { Label = label };
        throw new BadInputException($"class: '{Clip(cls)}' is not a class of this model (0..{Model.Config.Backbone.ClassCount - 1}{(PixelModel && ClassNames.Count == 10 ? ", or a name such as " + ClassNames[7] : "")}).");
    }

    /// <summary>A value quoted in a message: at most 40 characters, control characters shown as '?'.</summary>
    static string Clip(string text)
    {
        var clean = new string(text.Take(40).Select(c => char.IsControl(c) ? '?' : c).ToArray());
        return text.Length > 40 ? clean + "..." : clean;
    }

    /// <summary>
    /// Generates one image with the two-phase sampler, handing every step's decoded frame to
    /// <paramref name="onFrame"/> as it happens. Cancelling <paramref name="token"/> stops the run at the next
    /// diffusion step (an <see cref="OperationCanceledException"/>). Call it from one thread at a time (the queue).
    /// </summary>
    public GenerateResult Generate(GenerateSettings settings, Action<StepFrame> onFrame, CancellationToken token)
    {
        token.ThrowIfCancellationRequested();
        var sw = System.Diagnostics.Stopwatch.StartNew();
        var respacing = settings.HeadSteps.ToString(CultureInfo.InvariantCulture);
        var options = new SamplerOptions
        {
            Cfg = settings.Guidance2,
            ReCfg = settings.Guidance1,
            Temperature = settings.Temperature,
            Phase1Steps = settings.Steps1,
            Phase2Steps = settings.Steps2,
            MlpHeadSteps = respacing,
            DitHeadSteps = respacing,
            ClipDenoised = Default("clip_denoised", PixelModel ? 1.0 : 0.0) != 0.0,
            OnStep = step =>
            {
                token.ThrowIfCancellationRequested();
                onFrame(Frame(step));
            },
        };
        using var scope = torch.NewDisposeScope();
        using var noise = new SeededNoise(settings.Seed, 0, 1);
        using var condition = IsText
            ? Text.Prompts.Encode(Model, [settings.Prompt ?? ""], textEncoder)
            : Condition.NewLabels(torch.tensor(new[] { settings.Label }, device: Model.Device));
        using var result = HiMarSampler.Sample(Model, condition, noise, options, _ => token.ThrowIfCancellationRequested());
        var png = Png(Tokenizer.Decode(result.Dense));
        return new GenerateResult(png, sw.Elapsed.TotalSeconds);
    }

    StepFrame Frame(SamplerStep step)
    {
        using var scope = torch.NewDisposeScope();
        var grid = step.Phase == 1 ? step.Pivots : step.Dense;
        var decoded = Tokenizer.Decode(grid);
        var side = (int)decoded.shape[3];
        var g = (int)step.Decided.shape[1];
        var (offset, cell) = Tokenizer.TokenCells(g, side);
        static int[] Indices(Tensor mask) =>
            mask[0].flatten().cpu().data<bool>().ToArray().Select((on, i) => on ? i : -1).Where(i => i >= 0).ToArray();
        return new StepFrame(step.Phase, step.Step, step.Steps, Png(decoded), g, offset, cell, Indices(step.Decided), Indices(step.Known));
    }

    static byte[] Png(Tensor images)
    {
        var decoded = Images.FromTensor(images);
        try
        {
            using var stream = new MemoryStream();
            decoded[0].SaveAsPng(stream);
            return stream.ToArray();
        }
        finally
        {
            foreach (var image in decoded)
                image.Dispose();
        }
    }

    /// <summary>Frees the model, the VAE and the text encoder.</summary>
    public void Dispose()
    {
        Model.Dispose();
        if (Tokenizer is VaeTokenizer v)
            v.Vae.Dispose();
        textEncoder?.Dispose();
    }
}
