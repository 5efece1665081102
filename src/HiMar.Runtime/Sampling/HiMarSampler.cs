using HiMar.Model;
using HiMar.Runtime.Native;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Sampling;

/// <summary>How classifier-free guidance grows over the generation steps.</summary>
public enum CfgSchedule
{
    /// <summary>1 + (scale - 1) x (share of tokens known after the step).</summary>
    Linear,

    /// <summary>The full scale at every step.</summary>
    Constant,
}

/// <summary>Settings of one sampling run. Guidance 1.0 turns it off for that phase.</summary>
public sealed record SamplerOptions
{
    /// <summary>Phase-1 steps over the pivots; null for the reference's 4 x cond_scale.</summary>
    public int? Phase1Steps { get; init; }

    /// <summary>Phase-2 steps over the dense tokens (`num_iter`, 4 in the paper).</summary>
    public int Phase2Steps { get; init; } = 4;

    /// <summary>Phase-2 guidance scale (`cfg`, DiT head).</summary>
    public double Cfg { get; init; } = 1.0;

    /// <summary>Phase-1 guidance scale (`re_cfg`, MLP head).</summary>
    public double ReCfg { get; init; } = 1.0;

    /// <summary>The schedule of the phase-2 guidance scale (and of phase 1 unless <see cref="ReCfgSchedule"/> is set).</summary>
    public CfgSchedule Schedule { get; init; } = CfgSchedule.Linear;

    /// <summary>The schedule of the phase-1 guidance scale; null for the same as <see cref="Schedule"/> (the reference).</summary>
    public CfgSchedule? ReCfgSchedule { get; init; }

    /// <summary>Sampling temperature (multiplies each step's noise).</summary>
    public double Temperature { get; init; } = 1.0;

    /// <summary>Respacing of the MLP head's diffusion; null for the model's (`num_sampling_steps`).</summary>
    public string? MlpHeadSteps { get; init; }

    /// <summary>Respacing of the Transformer head's diffusion; null for the model's (250 in the reference).</summary>
    public string? DitHeadSteps { get; init; }

    /// <summary>
    /// Clamp each predicted x0 to [-1, 1] (guided-diffusion's `clip_denoised`). Off as in the reference, whose VAE
    /// latents are unbounded; on for pixel-space tokens (the fashion preset), where it keeps the first, very
    /// large respaced steps from amplifying small noise-prediction errors.
    /// </summary>
    public bool ClipDenoised { get; init; }

    /// <summary>Keep every step's tokens in <see cref="SampleResult.Intermediates"/>.</summary>
    public bool KeepIntermediates { get; init; }

    /// <summary>
    /// Called after every generation step of either phase with that step's token grids (for live displays such as
    /// `himar serve`). The tensors live only during the call: copy or decode what you keep. An exception thrown here
    /// (an <see cref="OperationCanceledException"/>, say) ends the run.
    /// </summary>
    public Action<SamplerStep>? OnStep { get; init; }

    /// <summary>
    /// The precision of the networks' products (backbone, both heads, VAE decoder). The diffusion arithmetic
    /// (schedules, posterior means, x_t updates, the guidance combination), the noise and the tokens between steps
    /// stay in the model's own dtype (fp32) in either precision.
    /// </summary>
    public Precision Precision { get; init; } = Precision.Fp32;

    /// <summary>A copy computing in <paramref name="precision"/>.</summary>
    public SamplerOptions WithPrecision(Precision precision) => this with { Precision = precision };
}

/// <summary>Reports and defaults of sampler settings.</summary>
public static class SamplerSettings
{
    /// <summary>
    /// Every setting of a run as JSON (the model's defaults filled in), for benchmark and evaluation reports; a model
    /// without pivots (plain MAR) runs no phase 1, so its phase-1 steps are 0 whatever was asked.
    /// </summary>
    public static System.Text.Json.Nodes.JsonObject Describe(SamplerOptions o, HiMarConfig c) => new()
    {
        ["cfg"] = o.Cfg,
        ["re_cfg"] = o.ReCfg,
        ["cfg_schedule"] = o.Schedule.ToString().ToLowerInvariant(),
        ["re_cfg_schedule"] = (o.ReCfgSchedule ?? o.Schedule).ToString().ToLowerInvariant(),
        ["temperature"] = o.Temperature,
        ["phase1_steps"] = c.PivotTokens == 0 ? 0 : o.Phase1Steps ?? c.Phase1Steps,
        ["num_iter"] = o.Phase2Steps,
        ["mlp_head_steps"] = o.MlpHeadSteps ?? c.MlpHead.SamplingSteps,
        ["dit_head_steps"] = o.DitHeadSteps ?? c.TransformerHead.SamplingSteps,
        ["clip_denoised"] = o.ClipDenoised,
        ["precision"] = o.Precision == Precision.Bf16 ? "bf16" : "fp32",
    };

    /// <summary>
    /// A model folder's recommended settings (its sampling.json: cfg, re_cfg, temperature, num_iter, mlp_head_steps,
    /// dit_head_steps, clip_denoised),
    /// as numbers by name (true/false as 1/0); empty when the folder has none.
    /// </summary>
    public static IReadOnlyDictionary<string, double> Defaults(string modelDir)
    {
        var path = Path.Combine(modelDir, "sampling.json");
        var result = new Dictionary<string, double>();
        if (!File.Exists(path))
            return result;
        var json = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(path))?.AsObject()
            ?? throw new InvalidDataException($"{path}: empty.");
        foreach (var (key, value) in json)
            result[key] = value?.GetValueKind() switch
            {
                System.Text.Json.JsonValueKind.True => 1,
                System.Text.Json.JsonValueKind.False => 0,
                System.Text.Json.JsonValueKind.Number => value.GetValue<double>(),
                _ => throw new InvalidDataException($"{path}: '{key}' is not a number or a boolean."),
            };
        return result;
    }
}

/// <summary>Where the sampler is, for progress displays.</summary>
/// <param name="Phase">1 (pivots) or 2 (dense tokens).</param>
/// <param name="Step">The generation step within the phase (0-based).</param>
/// <param name="Steps">Generation steps in the phase.</param>
/// <param name="DiffusionStep">Diffusion steps done within this generation step.</param>
/// <param name="DiffusionSteps">Diffusion steps per generation step.</param>
public readonly record struct SamplerProgress(int Phase, int Step, int Steps, int DiffusionStep, int DiffusionSteps)
{
    /// <summary>The part (0..1) of one sampler run done: the generation steps of both phases counted alike, each
    /// split evenly by its diffusion steps. <paramref name="phase1Steps"/> is 0 for a model without pivots.</summary>
    public double FractionOfRun(int phase1Steps, int phase2Steps)
    {
        var total = phase1Steps + phase2Steps;
        if (total <= 0)
            return 1.0;
        var before = Phase == 2 ? phase1Steps : 0;
        var within = DiffusionSteps > 0 ? (double)DiffusionStep / DiffusionSteps : 1.0;
        return Math.Clamp((before + Step + within) / total, 0.0, 1.0);
    }

    /// <summary>The images of a sampler batch of <paramref name="batch"/> images to count as done: the batch's share of
    /// the run done, rounded down (the whole batch once its last diffusion step is taken).</summary>
    public int ImagesDone(int batch, int phase1Steps, int phase2Steps) =>
        (int)Math.Floor(batch * FractionOfRun(phase1Steps, phase2Steps) + 1e-9);
}

/// <summary>One generation step as it happened.</summary>
/// <param name="Phase">1 (pivots) or 2 (dense tokens).</param>
/// <param name="Step">The generation step within the phase (0-based).</param>
/// <param name="Steps">Generation steps in the phase.</param>
/// <param name="Pivots">The pivot grid after the step (B, C, s, s); pivots not yet decided are zero.</param>
/// <param name="Dense">The dense grid after the step (B, C, g, g); zero in phase 1.</param>
/// <param name="Decided">The tokens of this phase's grid decided at this step (B, s, s) or (B, g, g), bool.</param>
/// <param name="Known">The tokens of this phase's grid decided at this step or before (same shape), bool.</param>
public sealed record SamplerStep(int Phase, int Step, int Steps, Tensor Pivots, Tensor Dense, Tensor Decided, Tensor Known) : IDisposable
{
    /// <summary>Disposes every tensor.</summary>
    public void Dispose()
    {
        Pivots.Dispose();
        Dense.Dispose();
        Decided.Dispose();
        Known.Dispose();
    }

    /// <summary>Keeps every tensor alive past the current dispose scope.</summary>
    internal SamplerStep MoveToOuterDisposeScope()
    {
        Pivots.MoveToOuterDisposeScope();
        Dense.MoveToOuterDisposeScope();
        Decided.MoveToOuterDisposeScope();
        Known.MoveToOuterDisposeScope();
        return this;
    }
}

/// <summary>The tokens of one run. The caller owns (and disposes) the tensors.</summary>
/// <param name="Pivots">Pivot latents (B, C, s, s).</param>
/// <param name="Dense">Dense latents (B, C, g, g).</param>
/// <param name="Intermediates">With <see cref="SamplerOptions.KeepIntermediates"/>: every step of both phases, in order.</param>
public sealed record SampleResult(Tensor Pivots, Tensor Dense, IReadOnlyList<SamplerStep> Intermediates) : IDisposable
{
    /// <summary>Disposes every tensor.</summary>
    public void Dispose()
    {
        Pivots.Dispose();
        Dense.Dispose();
        foreach (var step in Intermediates)
            step.Dispose();
    }
}

/// <summary>
/// Classifier-free guidance of one phase, in one place: on when the scale is not 1; the batch doubling
/// [conditional | unconditional] of every input; the condition embedding beside the null embedding; the scale at a
/// step (constant, or MAR's linear schedule over the tokens already known); the conditional half of a doubled result.
/// </summary>
/// <param name="Scale">The guidance scale (1 = off).</param>
/// <param name="Schedule">Constant or linear in the known tokens.</param>
/// <param name="Condition">The condition's embedding (B, E) or (B, L, E).</param>
/// <param name="Null">The null embedding of the same shape.</param>
readonly record struct Guidance(double Scale, CfgSchedule Schedule, Tensor Condition, Tensor Null)
{
    /// <summary>Whether guidance is on: every input is doubled and the heads combine the two halves.</summary>
    public bool On => Scale != 1.0;

    /// <summary>(B, ...) -> (2B, ...) with the second half a copy, when guidance is on; the tensor itself otherwise.</summary>
    public Tensor Double(Tensor t) => On ? torch.cat([t, t], 0) : t;

    /// <summary>The encoder's condition: [condition | null] when guidance is on, the condition otherwise.</summary>
    public Tensor Embedding => On ? torch.cat([Condition, Null], 0) : Condition;

    /// <summary>The scale at a step that leaves <paramref name="maskLength"/> of <paramref name="tokens"/> masked.</summary>
    public double At(int tokens, float maskLength) =>
        Schedule == CfgSchedule.Linear ? Masking.LinearCfg(Scale, tokens, maskLength) : Scale;

    /// <summary>The conditional (first) half of a doubled result; the result itself when guidance is off.</summary>
    public Tensor ConditionalHalf(Tensor t) => On ? t.narrow(0, 0, t.shape[0] / 2) : t;
}

/// <summary>
/// The two-phase masked sampler of Hi-MAR (reference `HiMAR.sample_tokens`): phase 1 generates the pivots in a
/// random order with the MLP head, recording each pivot's decoder state at the step it is predicted; phase 2
/// generates the dense tokens conditioned on those states, the Transformer head regenerating the whole grid at
/// each step with the known tokens re-noised from the loop's start noise. Each step runs in its own dispose
/// scope; the model is used in evaluation mode without gradients.
/// The ablation variants of Table 5 sample with the same loops: without pivots phase 1 is skipped (plain MAR
/// when the MLP head also serves phase 2); low-res pivots enter phase 2 as the sampled pivot latents; an MLP
/// phase-2 head draws only the tokens chosen at each step, row by row, as MAR does.
/// </summary>
public static class HiMarSampler
{
    /// <summary>Generates tokens for <paramref name="labels"/> (B,) (the null class `ClassCount` for unconditional rows).</summary>
    public static SampleResult Sample(HiMAR model, Tensor labels, INoiseSource noise, SamplerOptions options, Action<SamplerProgress>? progress = null) =>
        Sample(model, Condition.NewLabels(labels), noise, options, progress);

    /// <summary>Generates tokens for a condition: class labels, or captions (built-in word ids or an external
    /// encoder's context); guidance contrasts it with the model's null embedding (null class or null context).</summary>
    public static SampleResult Sample(HiMAR model, Condition condition, INoiseSource noise, SamplerOptions options, Action<SamplerProgress>? progress = null)
    {
        var wasTraining = model.training;
        model.eval();
        try
        {
            using var noGrad = torch.no_grad();
            // bf16 copies of the weights for this run, made before (and outliving) the run's dispose scope.
            using var precision = MixedPrecision.ForInference(model, options.Precision);
            using var outer = torch.NewDisposeScope();
            var result = Run(model, condition, noise, options, progress);
            result.Pivots.MoveToOuterDisposeScope();
            result.Dense.MoveToOuterDisposeScope();
            foreach (var step in result.Intermediates)
                step.MoveToOuterDisposeScope();
            return result;
        }
        finally
        {
            if (wasTraining)
                model.train();
        }
    }

    static GaussianDiffusion Diffusion(GaussianDiffusion modelDiffusion, string? respacing, HiMarConfig cfg) =>
        respacing == null
            ? modelDiffusion
            : new GaussianDiffusion(ScheduleModule.Create(cfg.Training.NoiseSchedule, cfg.Training.DiffusionSteps, respacing), modelDiffusion.VarianceKind);

    static SampleResult Run(HiMAR model, Condition condition, INoiseSource noise, SamplerOptions o, Action<SamplerProgress>? progress)
    {
        var cfg = model.Config;
        var dev = model.Device;
        var dtype = model.DType;
        long b = condition.Rows, s = cfg.PivotTokens, n = cfg.DenseTokens, l = cfg.SeqLen;
        long c = cfg.TokenEmbedDim, cd = cfg.Pivots.Channels, d = cfg.Backbone.DecoderWidth, side = cfg.Pivots.GridSide, g = cfg.SeqH;
        var steps1 = o.Phase1Steps ?? cfg.Phase1Steps;
        var steps2 = o.Phase2Steps;
        if (steps1 < 1 || steps2 < 1)
            throw new ArgumentException("each phase needs at least one step");
        var ditHead = cfg.Phase2Head == Phase2Head.Transformer;
        var mlpDiffusion = s > 0 || !ditHead ? Diffusion(model.DiffLoss.GenDiffusion, o.MlpHeadSteps, cfg) : null;
        var ditDiffusion = ditHead ? Diffusion(model.CondDiffLoss.GenDiffusion, o.DitHeadSteps, cfg) : null;
        var intermediates = new List<SamplerStep>();

        var conditionEmb = model.ConditionEmbedding(OnDevice(condition, dev)); // (B, E) or (B, L, E)
        var nullEmb = model.NullEmbedding(b);
        var guidance1 = new Guidance(o.ReCfg, o.ReCfgSchedule ?? o.Schedule, conditionEmb, nullEmb);
        var guidance2 = new Guidance(o.Cfg, o.Schedule, conditionEmb, nullEmb);
        var orders = noise.Orders(s, n, dev);
        var mask = torch.ones(b, l, dtype: dtype, device: dev);
        var tokens = torch.zeros(b, n, c, dtype: dtype, device: dev);
        var pivots = torch.zeros(b, s, cd, dtype: dtype, device: dev);
        var pivotStates = torch.zeros(b, s, d, dtype: dtype, device: dev);

        // Phase 1: the pivots (none for plain MAR).
        for (var step = 0; s > 0 && step < steps1; step++)
        {
            using var scope = torch.NewDisposeScope();
            using var gcPause = GcPause.Begin(); // libtorch reads TorchSharp's temporary Scalars: no collection mid-call
            var m = guidance1.Double(mask);
            var z = model.Decoder(model.EncoderPhase1(guidance1.Double(tokens), m, guidance1.Embedding, guidance1.Double(pivots)), m, 0); // (B', L, D)
            var remaining = (int)mask[0].narrow(0, 0, s).sum().item<float>();
            var len = Masking.NextMaskLength((int)s, step, steps1, remaining);
            var maskNext = Masking.MaskByOrder((long)len, orders, l, dtype);
            maskNext.narrow(1, s, n).fill_(1.0);
            // The pivots predicted now: the last step takes every remaining one.
            var pivMask = mask.narrow(1, 0, s).to(ScalarType.Bool);
            var toPred = step == steps1 - 1 ? pivMask : pivMask.logical_xor(maskNext.narrow(1, 0, s).to(ScalarType.Bool)); // (B, S)
            var k = toPred[0].sum().item<long>();
            var zPiv = z.narrow(1, 0, s).narrow(0, 0, b); // conditional half (B, S, D)
            var toPred3 = toPred.unsqueeze(-1);
            var newStates = torch.where(toPred3, zPiv, pivotStates);
            var zSel = z.narrow(1, 0, s).masked_select(guidance1.Double(toPred).unsqueeze(-1)).reshape(-1, d); // (n', D), sample-major
            var sampled = SampleMlpHead(model.DiffLoss.Net, mlpDiffusion!, zSel, guidance1, guidance1.At((int)s, len), o.Temperature, o.ClipDenoised, k, c, noise, progress, 1, step, steps1, dev);
            var newPivots = pivots.masked_scatter(toPred.unsqueeze(-1), guidance1.ConditionalHalf(sampled));
            Replace(ref pivotStates, newStates);
            Replace(ref pivots, newPivots);
            Replace(ref mask, maskNext);
            if (o.KeepIntermediates || o.OnStep != null)
            {
                // (B, S) -> (B, s, s): the pivots chosen now, and every pivot chosen so far.
                var known = pivMask.logical_not().logical_or(toPred);
                Report(o, intermediates, new SamplerStep(1, step, steps1, ToGrid(pivots, side), ToGrid(tokens, g), toPred.reshape(b, side, side), known.reshape(b, side, side)));
            }
        }

        var pivotGrid = s > 0 ? ToGrid(pivots, side) : torch.zeros(b, c, 0, 0, dtype: dtype, device: dev);

        // Phase 2: the dense tokens, conditioned on the pivots' decoder states (both halves use the conditional ones),
        // or on the sampled pivot latents (low-res pivots), or on nothing (plain MAR).
        mask.narrow(1, 0, s).fill_(0.0);
        var pivotStates2 = guidance2.Double(pivotStates);
        for (var step = 0; step < steps2; step++)
        {
            using var scope = torch.NewDisposeScope();
            using var gcPause = GcPause.Begin(); // libtorch reads TorchSharp's temporary Scalars: no collection mid-call
            var tok = guidance2.Double(tokens);
            var m = guidance2.Double(mask);
            var bb = m.shape[0];
            var z = model.Decoder(model.EncoderPhase2(tok, m, guidance2.Embedding, guidance2.Double(pivots), pivotStates2), m, 1); // (B', L, D)
            var remaining = (int)mask[0].sum().item<float>();
            var len = Masking.NextMaskLength((int)n, step, steps2, remaining);
            var maskNext = Masking.MaskByOrder((long)len, orders.narrow(1, s, n), l, dtype);
            var unknown = m.narrow(1, s, n).to(ScalarType.Bool); // (B', N): unknown before this step
            var scale = guidance2.At((int)n, len);
            Tensor newTokens;
            if (ditHead)
            {
                var thisMask = unknown.reshape(bb, g, g);
                var thisTok = tok.reshape(bb, g, g, c).permute(0, 3, 1, 2); // (B', C, g, g)
                var zImg = z.narrow(1, s, n).reshape(bb, g, g, d).permute(0, 3, 1, 2); // (B', D, g, g)
                var outImg = SampleDitHead(model.CondDiffLoss.Net, ditDiffusion!, zImg, guidance2, scale, o.Temperature, o.ClipDenoised, thisMask, thisTok, noise, progress, step, steps2, dev);
                var flat = outImg.narrow(0, 0, b).permute(0, 2, 3, 1).reshape(b, n, c); // (B, N, C)
                // Every position unknown before the step takes its new value.
                newTokens = torch.where(unknown.narrow(0, 0, b).unsqueeze(-1), flat, tokens);
            }
            else
            {
                // MAR: the MLP head draws the tokens leaving the mask now (every remaining one at the last step).
                var unknownB = unknown.narrow(0, 0, b);
                var toPred = step == steps2 - 1 ? unknownB : unknownB.logical_xor(maskNext.narrow(1, s, n).to(ScalarType.Bool)); // (B, N)
                var k = toPred[0].sum().item<long>();
                var zSel = z.narrow(1, s, n).masked_select(guidance2.Double(toPred).unsqueeze(-1)).reshape(-1, d); // (n', D), sample-major
                var sampled = SampleMlpHead(model.DiffLoss.Net, mlpDiffusion!, zSel, guidance2, scale, o.Temperature, o.ClipDenoised, k, c, noise, progress, 2, step, steps2, dev);
                newTokens = tokens.masked_scatter(toPred.unsqueeze(-1), guidance2.ConditionalHalf(sampled));
            }
            Replace(ref tokens, newTokens);
            if (o.KeepIntermediates || o.OnStep != null)
            {
                // (B, N) -> (B, g, g): the dense tokens leaving the mask now (every remaining one at the last step).
                var unknownB = unknown.narrow(0, 0, b);
                var decided = step == steps2 - 1 ? unknownB : unknownB.logical_and(maskNext.narrow(1, s, n).to(ScalarType.Bool).logical_not());
                var known = unknownB.logical_not().logical_or(decided);
                Report(o, intermediates, new SamplerStep(2, step, steps2, pivotGrid.clone(), ToGrid(tokens, g), decided.reshape(b, g, g), known.reshape(b, g, g)));
            }
            Replace(ref mask, maskNext);
        }

        return new SampleResult(pivotGrid, ToGrid(tokens, g), intermediates);
    }

    static Condition OnDevice(Condition c, Device dev) => c switch
    {
        Condition.Labels l => Condition.NewLabels(l.labels.to(dev)),
        Condition.Tokens t => Condition.NewTokens(t.ids.to(dev)),
        Condition.Context x => Condition.NewContext(x.context.to(dev)),
        _ => throw new ArgumentException("unknown condition"),
    };

    /// <summary>Hands a step to the caller's callback, and keeps it (past the step's scope) when asked to.</summary>
    static void Report(SamplerOptions o, List<SamplerStep> intermediates, SamplerStep step)
    {
        o.OnStep?.Invoke(step);
        if (o.KeepIntermediates)
            intermediates.Add(step.MoveToOuterDisposeScope());
    }

    /// <summary>Swaps in a tensor computed inside a step's scope, keeping it alive past that scope.</summary>
    static void Replace(ref Tensor state, Tensor next)
    {
        next.MoveToOuterDisposeScope();
        state.Dispose();
        state = next;
    }

    /// <summary>(B, side*side, C) -> (B, C, side, side).</summary>
    static Tensor ToGrid(Tensor t, long side) => t.reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2).contiguous();

    /// <summary>One MLP-head loop (reference `DiffLoss.sample` + `p_sample_loop`) over the selected rows.</summary>
    static Tensor SampleMlpHead(SimpleMLPAdaLN net, GaussianDiffusion diffusion, Tensor z, Guidance guidance, double scale, double temperature, bool clip, long perImage, long c, INoiseSource noise, Action<SamplerProgress>? progress, int phase, int step, int steps, Device dev)
    {
        var rows = z.shape[0];
        var (initRole, stepRole) = phase == 1 ? (NoiseRole.Phase1Init, NoiseRole.Phase1Step) : (NoiseRole.Phase2Init, NoiseRole.Phase2Step);
        var start = noise.Draw(initRole, 1, perImage, [c], dev).to(z.dtype);
        var x = guidance.Double(start);
        var total = diffusion.NumTimesteps;
        for (var i = total - 1; i >= 0; i--)
        {
            using var inner = torch.NewDisposeScope();
            var t = torch.full([rows], i, dtype: ScalarType.Int64, device: dev);
            var tm = diffusion.MapTimesteps(t);
            var output = guidance.On ? net.ForwardWithCfg(x, tm, z, scale) : net.call(x, tm, z);
            var ps = diffusion.PMeanVariance(output, x, t, clip);
            var eps = noise.Draw(stepRole, guidance.On ? 2 : 1, perImage, [c], dev).to(z.dtype);
            var next = diffusion.PSample(ps, t, eps, temperature).MoveToOuterDisposeScope();
            x.Dispose();
            x = next;
            progress?.Invoke(new SamplerProgress(phase, step, steps, total - i, total));
        }
        return x;
    }

    /// <summary>One Transformer-head loop: the whole grid each diffusion step, known tokens replaced by
    /// q_sample(tokens, t, start noise) before every call.</summary>
    static Tensor SampleDitHead(DiT net, GaussianDiffusion diffusion, Tensor z, Guidance guidance, double scale, double temperature, bool clip, Tensor unknown, Tensor known, INoiseSource noise, Action<SamplerProgress>? progress, int step, int steps, Device dev)
    {
        var bb = z.shape[0];
        var shape = new[] { known.shape[1], known.shape[2], known.shape[3] };
        var start = noise.Draw(NoiseRole.Phase2Init, 1, 1, shape, dev).to(z.dtype);
        var init = guidance.Double(start);
        var img = init.clone();
        var unknown4 = unknown.unsqueeze(1);
        var total = diffusion.NumTimesteps;
        for (var i = total - 1; i >= 0; i--)
        {
            using var inner = torch.NewDisposeScope();
            var t = torch.full([bb], i, dtype: ScalarType.Int64, device: dev);
            var xKnown = diffusion.QSample(known, t, init);
            var x = torch.where(unknown4, img, xKnown);
            var tm = diffusion.MapTimesteps(t);
            var output = guidance.On ? net.ForwardWithCfg(x, tm, z, scale) : net.call(x, tm, z);
            var ps = diffusion.PMeanVariance(output, x, t, clip);
            var eps = noise.Draw(NoiseRole.Phase2Step, guidance.On ? 2 : 1, 1, shape, dev).to(z.dtype);
            var next = diffusion.PSample(ps, t, eps, temperature).MoveToOuterDisposeScope();
            img.Dispose();
            img = next;
            progress?.Invoke(new SamplerProgress(2, step, steps, total - i, total));
        }
        return img;
    }
}
