using HiMar.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Parity;

/// <summary>How one parity case ended.</summary>
public enum ParityStatus
{
    /// <summary>Every output within tolerance.</summary>
    Pass,

    /// <summary>An output outside tolerance, or the computation failed.</summary>
    Fail,

    /// <summary>A case kind this build does not check yet.</summary>
    Pending,
}

/// <summary>The result of one case: the worst output (largest error relative to its allowance).</summary>
/// <param name="Name">Case name.</param>
/// <param name="Kind">Case kind.</param>
/// <param name="Status">Pass, fail or pending.</param>
/// <param name="WorstError">max |actual - expected| of the worst output.</param>
/// <param name="Allowed">atol + rtol * max |expected| of that output.</param>
/// <param name="Detail">The worst output's name, or why the case failed or is pending.</param>
public sealed record ParityResult(string Name, string Kind, ParityStatus Status, double WorstError, double Allowed, string Detail);

/// <summary>Computes each fixture case with our implementation and compares it with the reference's outputs.</summary>
public static class ParityRunner
{
    /// <summary>Computes a case's outputs; the returned tensors are owned by the caller.</summary>
    public delegate Dictionary<string, Tensor> CaseEvaluator(ParityFixture fixture, ParityCase c);

    /// <summary>The evaluators by case kind. Kinds not listed are reported as pending.</summary>
    public static readonly Dictionary<string, CaseEvaluator> Evaluators = new()
    {
        ["diffusion_schedule"] = ParityCases.Schedule,
        ["mlp_head_forward"] = ParityCases.MlpHeadForward,
        ["mlp_head_forward_cfg"] = ParityCases.MlpHeadForwardCfg,
        ["dit_head_forward"] = ParityCases.DitHeadForward,
        ["dit_head_forward_cfg"] = ParityCases.DitHeadForwardCfg,
        ["mlp_head_training_loss"] = ParityCases.MlpHeadTrainingLoss,
        ["dit_head_training_loss"] = ParityCases.DitHeadTrainingLoss,
        ["backbone_phase1"] = ParityCases.BackbonePhase1,
        ["backbone_phase2"] = ParityCases.BackbonePhase2,
        ["parameter"] = ParityCases.Parameter,
        ["sample_tokens"] = SamplerParityCases.SampleTokens,
        ["vae_encode"] = VaeParityCases.Encode,
        ["vae_decode"] = VaeParityCases.Decode,
    };

    /// <summary>
    /// The relative allowance of a bf16 run: 2^-5 = 3.1% of the output's largest magnitude. One bf16 rounding is at
    /// most 2^-9 relative (8 significant bits); the fixtures' outputs pass through up to ~16 chained products
    /// (backbone blocks, head blocks, up to 40 respaced head steps in a sample), whose rounding errors add up like a
    /// random walk (about 4 x 2^-9 = 2^-7 after 16) and are amplified by LayerNorms and by the diffusion updates'
    /// 1/sqrt(alpha) factors; 2^-5 leaves a factor 4 for that amplification. fp32 runs keep the fixture's tolerance.
    /// </summary>
    public const double Bf16Rtol = 1.0 / 32;

    /// <summary>max |a - e| and the allowance atol + rtol * max |e|, compared in float64.</summary>
    public static (double Error, double Allowed) Compare(Tensor actual, Tensor expected, double atol, double rtol)
    {
        using var scope = torch.NewDisposeScope();
        if (!actual.shape.SequenceEqual(expected.shape))
            throw new InvalidDataException($"shape [{string.Join(", ", actual.shape)}] where the reference has [{string.Join(", ", expected.shape)}]");
        var a = actual.detach().cpu().to(ScalarType.Float64);
        var e = expected.detach().cpu().to(ScalarType.Float64);
        var err = e.numel() == 0 ? 0.0 : (a - e).abs().max().item<double>();
        if (double.IsNaN(err) || a.isnan().any().item<bool>())
            err = double.PositiveInfinity;
        var scale = e.numel() == 0 ? 0.0 : e.abs().max().item<double>();
        return (err, atol + rtol * scale);
    }

    /// <summary>Runs one case.</summary>
    public static ParityResult Run(ParityFixture fixture, ParityCase c)
    {
        if (!Evaluators.TryGetValue(c.Kind, out var evaluate))
            return new ParityResult(c.Name, c.Kind, ParityStatus.Pending, double.NaN, double.NaN, "not checked by this build");
        try
        {
            // Weights and case tensors belong to the fixture: load them before this case's scope opens.
            var usesModel = c.Kind != "diffusion_schedule" && !c.Kind.StartsWith("vae_", StringComparison.Ordinal);
            // Products in the fixture's precision (bf16 copies of the weights made before the case's scope).
            using var mixed = usesModel ? MixedPrecision.ForInference(fixture.Model, fixture.Precision) : null;
            using var scope = torch.NewDisposeScope();
            var outputs = evaluate(fixture, c);
            double worstRatio = -1, worstErr = 0, worstAllowed = 0;
            var worstName = "";
            foreach (var name in c.Outputs)
            {
                if (!outputs.TryGetValue(name, out var actual))
                    return new ParityResult(c.Name, c.Kind, ParityStatus.Fail, double.NaN, double.NaN, $"output '{name}' was not computed");
                var (err, allowed) = Compare(actual, fixture.Tensor(c, name), c.Atol,
                    fixture.Precision == Precision.Bf16 ? Math.Max(c.Rtol, Bf16Rtol) : c.Rtol);
                var ratio = allowed > 0 ? err / allowed : (err > 0 ? double.PositiveInfinity : 0);
                if (ratio > worstRatio)
                    (worstRatio, worstErr, worstAllowed, worstName) = (ratio, err, allowed, name);
            }
            var pass = worstErr <= worstAllowed;
            return new ParityResult(c.Name, c.Kind, pass ? ParityStatus.Pass : ParityStatus.Fail, worstErr, worstAllowed, worstName);
        }
        catch (Exception e) when (e is InvalidDataException or ArgumentException or InvalidOperationException or System.Runtime.InteropServices.ExternalException or KeyNotFoundException or WeightMismatchException or Checkpoints.CheckpointFormatException)
        {
            return new ParityResult(c.Name, c.Kind, ParityStatus.Fail, double.NaN, double.NaN, e.Message.Split('\n')[0]);
        }
    }

    /// <summary>Runs every case of a fixture folder, in manifest order.</summary>
    public static IEnumerable<ParityResult> RunAll(ParityFixture fixture)
    {
        foreach (var c in fixture.Cases)
            yield return Run(fixture, c);
    }
}
