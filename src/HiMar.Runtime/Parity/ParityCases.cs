using HiMar.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Parity;

/// <summary>The evaluators of each parity case kind: inputs from the fixture, outputs from our implementation.</summary>
public static class ParityCases
{
    /// <summary>`diffusion_schedule`: the float64 arrays of a (respaced) cosine schedule.</summary>
    public static Dictionary<string, Tensor> Schedule(ParityFixture fixture, ParityCase c)
    {
        var s = ScheduleModule.Create(c.Text("noise_schedule", "cosine"), c.Int("diffusion_steps", 1000), c.Text("respacing"));
        return new()
        {
            ["betas"] = torch.tensor(s.Betas, ScalarType.Float64),
            ["alphas_cumprod"] = torch.tensor(s.AlphasCumprod, ScalarType.Float64),
            ["posterior_log_variance_clipped"] = torch.tensor(s.PosteriorLogVarianceClipped, ScalarType.Float64),
            ["timestep_map"] = torch.tensor(s.TimestepMap),
        };
    }

    static double Scalar(ParityFixture f, ParityCase c, string name) => f.Tensor(c, name).to(ScalarType.Float64).item<double>();

    /// <summary>`mlp_head_forward`: the phase-1 MLP head on (x, t, c).</summary>
    public static Dictionary<string, Tensor> MlpHeadForward(ParityFixture f, ParityCase c)
    {
        using var _ = torch.no_grad();
        return new() { ["out"] = f.Model.DiffLoss.Net.call(f.Tensor(c, "x"), f.Tensor(c, "t"), f.Tensor(c, "c")) };
    }

    /// <summary>`mlp_head_forward_cfg`: its guided form.</summary>
    public static Dictionary<string, Tensor> MlpHeadForwardCfg(ParityFixture f, ParityCase c)
    {
        using var _ = torch.no_grad();
        return new() { ["out"] = f.Model.DiffLoss.Net.ForwardWithCfg(f.Tensor(c, "x"), f.Tensor(c, "t"), f.Tensor(c, "c"), Scalar(f, c, "cfg_scale")) };
    }

    /// <summary>`dit_head_forward`: the phase-2 Transformer head on (x, t, z).</summary>
    public static Dictionary<string, Tensor> DitHeadForward(ParityFixture f, ParityCase c)
    {
        using var _ = torch.no_grad();
        return new() { ["out"] = f.Model.CondDiffLoss.Net.call(f.Tensor(c, "x"), f.Tensor(c, "t"), f.Tensor(c, "z")) };
    }

    /// <summary>`dit_head_forward_cfg`: its guided form.</summary>
    public static Dictionary<string, Tensor> DitHeadForwardCfg(ParityFixture f, ParityCase c)
    {
        using var _ = torch.no_grad();
        return new() { ["out"] = f.Model.CondDiffLoss.Net.ForwardWithCfg(f.Tensor(c, "x"), f.Tensor(c, "t"), f.Tensor(c, "z"), Scalar(f, c, "cfg_scale")) };
    }

    /// <summary>`mlp_head_training_loss`: per-row mse, vb and their sum for given noise and steps.</summary>
    public static Dictionary<string, Tensor> MlpHeadTrainingLoss(ParityFixture f, ParityCase c)
    {
        using var _ = torch.no_grad();
        var l = f.Model.DiffLoss.Losses(f.Tensor(c, "target"), f.Tensor(c, "z"), f.Tensor(c, "t"), f.Tensor(c, "noise"));
        return new() { ["loss"] = l.Loss, ["mse"] = l.Mse, ["vb"] = l.Vb };
    }

    /// <summary>`dit_head_training_loss`: per-sample epsilon MSE over every token.</summary>
    public static Dictionary<string, Tensor> DitHeadTrainingLoss(ParityFixture f, ParityCase c)
    {
        using var _ = torch.no_grad();
        return new() { ["loss"] = f.Model.CondDiffLoss.Losses(f.Tensor(c, "target"), f.Tensor(c, "z"), f.Tensor(c, "t"), f.Tensor(c, "noise"), null!) };
    }

    /// <summary>`backbone_phase1`: encoder and decoder of phase 1 (phase index 0).</summary>
    public static Dictionary<string, Tensor> BackbonePhase1(ParityFixture f, ParityCase c)
    {
        using var _ = torch.no_grad();
        var m = f.Model;
        var mask = f.Tensor(c, "mask");
        var enc = m.EncoderPhase1(f.Tensor(c, "tokens"), mask, m.ClassEmbedding(f.Tensor(c, "labels")), f.Tensor(c, "cond"));
        return new() { ["encoder_out"] = enc, ["decoder_out"] = m.Decoder(enc, mask, 0) };
    }

    /// <summary>`backbone_phase2`: encoder and decoder of phase 2 (phase index 1), pivot states from the fixture's small_z.</summary>
    public static Dictionary<string, Tensor> BackbonePhase2(ParityFixture f, ParityCase c)
    {
        using var _ = torch.no_grad();
        var m = f.Model;
        var mask = f.Tensor(c, "mask");
        var enc = m.EncoderPhase2(f.Tensor(c, "tokens"), mask, m.ClassEmbedding(f.Tensor(c, "labels")), f.Tensor(c, "cond"), f.Tensor(c, "small_z"));
        return new() { ["encoder_out"] = enc, ["decoder_out"] = m.Decoder(enc, mask, 1) };
    }

    /// <summary>`parameter`: a named entry of the loaded model's state_dict.</summary>
    public static Dictionary<string, Tensor> Parameter(ParityFixture f, ParityCase c)
    {
        var state = HiMar.Model.Weights.StateDict(f.Model);
        if (!state.TryGetValue(c.Name, out var value))
            throw new KeyNotFoundException($"the model has no parameter '{c.Name}'");
        return new() { ["value"] = value.detach().clone() };
    }
}

/// <summary>The `sample_tokens` evaluator: the whole two-phase sampler, replaying recorded orders and noise.</summary>
public static class SamplerParityCases
{
    /// <summary>Runs <see cref="Sampling.HiMarSampler"/> with the case's settings and a replay of its noise.</summary>
    public static Dictionary<string, Tensor> SampleTokens(ParityFixture f, ParityCase c)
    {
        var roles = (c.Spec["noise_roles"]?.AsArray() ?? []).Select(r => r!.GetValue<string>()).ToList();
        var recorded = roles.Select((role, i) => (role, f.Tensor(c, $"noise_{i:D5}"))).ToList();
        var replay = new Sampling.ReplayNoise(f.Tensor(c, "orders"), recorded);
        double Value(string name) => f.Tensor(c, name).to(ScalarType.Float64).item<double>();
        var options = new Sampling.SamplerOptions
        {
            Phase1Steps = c.Int("phase1_steps", f.Config.Phase1Steps),
            Phase2Steps = c.Int("num_iter", 4),
            Cfg = Value("cfg"),
            ReCfg = Value("re_cfg"),
            Temperature = Value("temperature"),
            Schedule = c.Text("cfg_schedule", "linear") == "constant" ? Sampling.CfgSchedule.Constant : Sampling.CfgSchedule.Linear,
            MlpHeadSteps = c.Text("mlp_head_sampling_steps") is { Length: > 0 } m ? m : null,
            DitHeadSteps = c.Text("dit_head_sampling_steps") is { Length: > 0 } dd ? dd : null,
            Precision = f.Precision,
        };
        var result = Sampling.HiMarSampler.Sample(f.Model, f.Tensor(c, "labels"), replay, options);
        var skippedTail = roles.Skip(replay.Position).Count(r => r != "p2_unused");
        if (skippedTail > 0)
            throw new InvalidOperationException($"the sampler used {replay.Position} of {roles.Count} recorded draws");
        return new() { ["small_tokens"] = result.Pivots, ["big_tokens"] = result.Dense };
    }
}
