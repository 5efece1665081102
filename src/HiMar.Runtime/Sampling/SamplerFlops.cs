using HiMar.Model;

namespace HiMar.Runtime.Sampling;

/// <summary>
/// Counts the floating-point operations (2 per multiply-add) of the matrix work of one sampling run, by replaying
/// the sampler's deterministic schedule (mask lengths, guidance doubling) over the model's shapes: linear layers,
/// attention products, both diffusion heads. Elementwise work is left out. Used by `himar bench` for GFLOP/s.
/// </summary>
public static class SamplerFlops
{
    static double Block(double width, double tokens, double mlpRatio) =>
        2 * tokens * width * width * (4 + 2 * mlpRatio) + 4 * tokens * tokens * width;

    static double Backbone(HiMarConfig c, double batch, double encoderTokens, bool phase2)
    {
        double e = c.Backbone.EncoderWidth, d = c.Backbone.DecoderWidth, s = c.PivotTokens, n = c.DenseTokens, l = c.SeqLen, buf = c.Backbone.BufferSize;
        var inputs = 2 * n * c.TokenEmbedDim * e + 2 * s * (phase2 ? d : c.Pivots.Channels) * e;
        var encoder = c.Backbone.EncoderDepth * Block(e, encoderTokens, c.Backbone.MlpRatio);
        var decoder = 2 * encoderTokens * e * d + c.Backbone.DecoderDepth * Block(d, buf + l, c.Backbone.MlpRatio);
        return batch * (inputs + encoder + decoder);
    }

    static double MlpHeadRow(HiMarConfig c)
    {
        double w = c.MlpHead.Width, cc = c.TokenEmbedDim, d = c.Backbone.DecoderWidth;
        return 2 * 256 * w + 2 * w * w + 2 * d * w + 2 * cc * w + c.MlpHead.Depth * 10 * w * w + 4 * w * w + 4 * w * cc;
    }

    static double DitImage(HiMarConfig c)
    {
        double g = c.TransformerHead.Width, t = c.DenseTokens, cc = c.TokenEmbedDim, d = c.Backbone.DecoderWidth;
        var perBlock = Block(g, t, c.TransformerHead.MlpRatio) + 2 * t * g * 6 * g;
        return 2 * t * cc * g + 2 * t * d * g + 2 * 256 * g + 2 * g * g + c.TransformerHead.Depth * perBlock + 4 * t * g * g + 2 * t * g * cc;
    }

    /// <summary>Total FLOPs of sampling <paramref name="images"/> images with these options.</summary>
    public static double Count(HiMarConfig c, SamplerOptions o, int images)
    {
        var mlpSteps = ScheduleModule.SpaceTimesteps(c.Training.DiffusionSteps, o.MlpHeadSteps ?? c.MlpHead.SamplingSteps).Length;
        var ditSteps = ScheduleModule.SpaceTimesteps(c.Training.DiffusionSteps, o.DitHeadSteps ?? c.TransformerHead.SamplingSteps).Length;
        int s = c.PivotTokens, n = c.DenseTokens;
        double total = 0;
        var b1 = images * (o.ReCfg != 1.0 ? 2.0 : 1.0);
        var steps1 = o.Phase1Steps ?? c.Phase1Steps;
        var remaining = s;
        for (var step = 0; step < steps1; step++)
        {
            var len = step == steps1 - 1 ? 0 : (int)Masking.NextMaskLength(s, step, steps1, remaining);
            total += Backbone(c, b1, c.Backbone.BufferSize + (s - remaining), false);
            total += b1 * (remaining - len) * mlpSteps * MlpHeadRow(c);
            remaining = len;
        }
        var b2 = images * (o.Cfg != 1.0 ? 2.0 : 1.0);
        remaining = n;
        for (var step = 0; step < o.Phase2Steps; step++)
        {
            var len = step == o.Phase2Steps - 1 ? 0 : (int)Masking.NextMaskLength(n, step, o.Phase2Steps, remaining);
            total += Backbone(c, b2, c.Backbone.BufferSize + s + (n - remaining), true);
            total += b2 * ditSteps * DitImage(c);
            remaining = len;
        }
        return total;
    }
}
