using HiMar.Model;
using HiMar.Runtime.Catalog;

namespace HiMar.Runtime.Sampling;

/// <summary>
/// The sampler settings a run starts from before any flag: a model's recommended ones (its folder's sampling.json
/// over the sampler's own defaults), or the fixed settings of a benchmark or the ablation. <see cref="SamplerFlags"/>
/// lays what a person gave over them; this is the one place the two meet.
/// </summary>
public sealed record SamplerDefaults
{
    /// <summary>Phase-2 guidance (`cfg`); 1 = off.</summary>
    public double Cfg { get; init; } = 1.0;

    /// <summary>Phase-1 guidance (`re_cfg`); 1 = off.</summary>
    public double ReCfg { get; init; } = 1.0;

    /// <summary>Sampling temperature.</summary>
    public double Temperature { get; init; } = 1.0;

    /// <summary>Phase-2 steps (`num_iter`).</summary>
    public int Phase2Steps { get; init; } = 4;

    /// <summary>Clamp predicted x0 to [-1, 1].</summary>
    public bool ClipDenoised { get; init; }

    /// <summary>MLP-head respacing; null for the model's own (`num_sampling_steps`).</summary>
    public string? MlpHeadSteps { get; init; }

    /// <summary>Transformer-head respacing; null for the model's own.</summary>
    public string? DitHeadSteps { get; init; }

    /// <summary>Where these came from, for messages and reports ("models/fashion/sampling.json", "built-in").</summary>
    public string Source { get; init; } = "built-in";

    /// <summary>The sampler's own defaults: no guidance, temperature 1, 4 phase-2 steps, the model's respacings.</summary>
    public static readonly SamplerDefaults BuiltIn = new();

    /// <summary>`himar bench sample`: the reference's ImageNet evaluation guidance with 10-step DDIM heads.</summary>
    public static readonly SamplerDefaults Benchmark = new() { Cfg = 2.5, ReCfg = 2.7, MlpHeadSteps = "ddim10", DitHeadSteps = "ddim10", Source = "the benchmark's settings" };

    /// <summary>`himar ablation`: the shipped fashion model's guidance and temperature with 25-step heads, clipped.</summary>
    public static readonly SamplerDefaults Ablation = new() { Cfg = 3.0, ReCfg = 3.0, Temperature = 0.9, MlpHeadSteps = "25", DitHeadSteps = "25", ClipDenoised = true, Source = "the ablation's settings" };

    /// <summary>A copy that clamps predicted x0 (what `himar eval` of a pixel-space model always does).</summary>
    public SamplerDefaults Clipped() => this with { ClipDenoised = true };

    /// <summary>
    /// A model's defaults: its folder's sampling.json (cfg, re_cfg, temperature, num_iter, clip_denoised, and the heads'
    /// steps mlp_head_steps and dit_head_steps) over
    /// <see cref="BuiltIn"/>; clipping defaults to on for pixel-space models (<see cref="ModelTraits.UsesPixelPatches"/>).
    /// <paramref name="modelPath"/> may be a file (a .pth) or a folder without sampling.json: then only the built-in ones apply.
    /// </summary>
    public static SamplerDefaults ForModel(string modelPath, HiMarConfig config)
    {
        var json = Directory.Exists(modelPath) ? SamplerSettings.Defaults(modelPath) : new Dictionary<string, double>();
        double Get(string key, double fallback) => json.TryGetValue(key, out var v) ? v : fallback;
        // Head steps: a whole number of evenly respaced steps (the respacing "N"), else the model's own.
        string? Steps(string key) => json.TryGetValue(key, out var v)
            ? v >= 1 && v <= 1000 && v == Math.Floor(v)
                ? ((int)v).ToString(System.Globalization.CultureInfo.InvariantCulture)
                : throw new BadInputException($"{Path.Combine(modelPath, "sampling.json")}: '{key}' must be a whole number of steps from 1 to 1000, not {v}.")
            : null;
        return new SamplerDefaults
        {
            Cfg = Get("cfg", BuiltIn.Cfg),
            ReCfg = Get("re_cfg", BuiltIn.ReCfg),
            Temperature = Get("temperature", BuiltIn.Temperature),
            Phase2Steps = (int)Get("num_iter", BuiltIn.Phase2Steps),
            ClipDenoised = Get("clip_denoised", ModelTraits.UsesPixelPatches(config) ? 1.0 : 0.0) != 0.0,
            MlpHeadSteps = Steps("mlp_head_steps"),
            DitHeadSteps = Steps("dit_head_steps"),
            Source = json.Count > 0 ? Path.Combine(modelPath, "sampling.json") : "built-in",
        };
    }
}

/// <summary>
/// The sampler settings a person gave (each null when not given), laid over <see cref="SamplerDefaults"/> by
/// <see cref="Over"/>: the flag -> options mapping of `himar sample`, `eval`, `bench sample` and `ablation`.
/// </summary>
public sealed record SamplerFlags
{
    /// <summary>`--cfg`.</summary>
    public double? Cfg { get; init; }

    /// <summary>`--re-cfg`.</summary>
    public double? ReCfg { get; init; }

    /// <summary>`--temperature`.</summary>
    public double? Temperature { get; init; }

    /// <summary>`--num-iter`.</summary>
    public int? Phase2Steps { get; init; }

    /// <summary>`--phase1-steps`; null keeps the model's (4 x the pivot grid side).</summary>
    public int? Phase1Steps { get; init; }

    /// <summary>`--mlp-steps`.</summary>
    public string? MlpHeadSteps { get; init; }

    /// <summary>`--dit-steps`.</summary>
    public string? DitHeadSteps { get; init; }

    /// <summary>`--clip`: clamp predicted x0 even where the defaults do not.</summary>
    public bool Clip { get; init; }

    /// <summary>`--guidance`: full (null), no-phase2 (phase 2 unguided) or off.</summary>
    public string? Guidance { get; init; }

    /// <summary>`--schedule`: linear (null) or constant.</summary>
    public string? Schedule { get; init; }

    /// <summary>`--re-schedule`: the phase-1 schedule; null for the same as <see cref="Schedule"/>.</summary>
    public string? ReSchedule { get; init; }

    /// <summary>The precision decided for the device (`--precision`).</summary>
    public Precision Precision { get; init; } = Precision.Fp32;

    /// <summary>The options to sample with: every flag given, else its default. Bad values are a <see cref="BadInputException"/> naming the flag.</summary>
    public SamplerOptions Over(SamplerDefaults defaults)
    {
        var cfg = Cfg ?? defaults.Cfg;
        var reCfg = ReCfg ?? defaults.ReCfg;
        (cfg, reCfg) = (Guidance ?? "full").Trim().ToLowerInvariant() switch
        {
            "full" => (cfg, reCfg),
            "no-phase2" => (1.0, reCfg),
            "off" => (1.0, 1.0),
            _ => throw new BadInputException($"--guidance must be full, no-phase2 or off, not '{Guidance}'"),
        };
        return new SamplerOptions
        {
            Cfg = cfg,
            ReCfg = reCfg,
            Temperature = Temperature ?? defaults.Temperature,
            ClipDenoised = Clip || defaults.ClipDenoised,
            Phase2Steps = Phase2Steps ?? defaults.Phase2Steps,
            Phase1Steps = Phase1Steps,
            MlpHeadSteps = MlpHeadSteps ?? defaults.MlpHeadSteps,
            DitHeadSteps = DitHeadSteps ?? defaults.DitHeadSteps,
            Schedule = ParseSchedule("--schedule", Schedule) ?? CfgSchedule.Linear,
            ReCfgSchedule = ParseSchedule("--re-schedule", ReSchedule),
            Precision = Precision,
        };
    }

    static CfgSchedule? ParseSchedule(string flag, string? text) =>
        text?.Trim().ToLowerInvariant() switch
        {
            null => null,
            "linear" => CfgSchedule.Linear,
            "constant" => CfgSchedule.Constant,
            _ => throw new BadInputException($"{flag} must be linear or constant, not '{text}'"),
        };
}
