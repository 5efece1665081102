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
}
