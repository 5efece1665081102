using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace HiMar.Runtime.Training;

/// <summary>
/// AdamW (decoupled weight decay, PyTorch's update rule) over named parameters, with its moments keyed by
/// parameter name so they save to and load from safetensors. Written here rather than using TorchSharp's
/// AdamW, whose state is keyed by native handles and saved only in TorchSharp's own binary format.
/// Groups as the reference's `add_weight_decay`: no decay for 1-D tensors, biases and both diffusion heads.
/// </summary>
public sealed class NamedAdamW : IDisposable
{
    readonly List<(string Name, Parameter Param, double Decay)> parameters = [];
    readonly Dictionary<string, (Tensor M, Tensor V)> moments = [];

    /// <summary>Creates the optimiser over the trainable parameters of a module.</summary>
    public NamedAdamW(nn.Module module, double weightDecay, double beta1 = 0.9, double beta2 = 0.95, double eps = 1e-8)
    {
        Beta1 = beta1;
        Beta2 = beta2;
        Eps = eps;
        foreach (var (name, p) in module.named_parameters())
        {
            if (!p.requires_grad)
                continue;
            var noDecay = p.dim() == 1 || name.EndsWith(".bias", StringComparison.Ordinal) || name.Contains("diffloss", StringComparison.Ordinal);
            parameters.Add((name, p, noDecay ? 0.0 : weightDecay));
            moments[name] = (torch.zeros_like(p).DetachFromDisposeScope(), torch.zeros_like(p).DetachFromDisposeScope());
        }
    }

    /// <summary>First-moment decay.</summary>
    public double Beta1 { get; }

    /// <summary>Second-moment decay.</summary>
    public double Beta2 { get; }

    /// <summary>Denominator epsilon.</summary>
    public double Eps { get; }

    /// <summary>Updates taken so far (bias correction uses it).</summary>
    public long Steps { get; set; }

    /// <summary>The optimised parameters, in registration order.</summary>
    public IEnumerable<Parameter> Parameters => parameters.Select(p => p.Param);

    /// <summary>Clears every gradient.</summary>
    public void ZeroGrad()
    {
        foreach (var (_, p, _) in parameters)
            p.grad?.zero_();
    }

    /// <summary>One update at learning rate <paramref name="lr"/>.</summary>
    public void Step(double lr)
    {
        Steps++;
        var bc1 = 1 - Math.Pow(Beta1, Steps);
        var bc2 = 1 - Math.Pow(Beta2, Steps);
        using var noGrad = torch.no_grad();
        // The scalars are made once per step and held until it ends. A double passed where TorchSharp wants a Scalar
        // becomes a temporary that nothing keeps alive during the native call: a training run once died in
        // `mul_` with libtorch's "Unknown scalar type", the mark of a Scalar freed by the finalizer mid-call.
        using var beta1 = Beta1.ToScalar();
        using var beta2 = Beta2.ToScalar();
        using var oneMinusBeta1 = (1 - Beta1).ToScalar();
        using var oneMinusBeta2 = (1 - Beta2).ToScalar();
        using var rootBc2 = Math.Sqrt(bc2).ToScalar();
        using var eps = Eps.ToScalar();
        using var stepSize = (-lr / bc1).ToScalar();
        foreach (var (name, p, decay) in parameters)
        {
            var g = p.grad;
            if (g is null)
                continue;
            var (m, v) = moments[name];
            if (decay > 0)
            {
                using var shrink = (1 - lr * decay).ToScalar();
                p.mul_(shrink);
            }
            m.mul_(beta1).add_(g, alpha: oneMinusBeta1);
            v.mul_(beta2).addcmul_(g, g, value: oneMinusBeta2);
            using var root = v.sqrt();
            using var denom = root.div_(rootBc2).add_(eps);
            p.addcdiv_(m, denom, value: stepSize);
        }
    }

    /// <summary>The moments as `NAME.exp_avg` / `NAME.exp_avg_sq` tensors (owned by the optimiser).</summary>
    public Dictionary<string, Tensor> State()
    {
        var d = new Dictionary<string, Tensor>();
        foreach (var (name, (m, v)) in moments)
        {
            d[name + ".exp_avg"] = m;
            d[name + ".exp_avg_sq"] = v;
        }
        return d;
    }

    /// <summary>Restores moments saved by <see cref="State"/>; every parameter must be present with its shape.</summary>
    public void LoadState(IReadOnlyDictionary<string, Tensor> state, long steps, string what)
    {
        using var noGrad = torch.no_grad();
        foreach (var (name, (m, v)) in moments)
        {
            if (!state.TryGetValue(name + ".exp_avg", out var sm) || !state.TryGetValue(name + ".exp_avg_sq", out var sv))
                throw new InvalidDataException($"{what}: no optimizer moments for '{name}'.");
            if (!sm.shape.SequenceEqual(m.shape))
                throw new InvalidDataException($"{what}: optimizer moments for '{name}' have another shape.");
            m.copy_(sm);
            v.copy_(sv);
        }
        Steps = steps;
    }

    /// <summary>Disposes the moments.</summary>
    public void Dispose()
    {
        foreach (var (m, v) in moments.Values)
        {
            m.Dispose();
            v.Dispose();
        }
    }
}

/// <summary>
/// Exponential moving average of a model's parameters, kept in a second model of the same shape (keyed by name),
/// bias-corrected as Adam corrects its moments: after t updates the shadow is
/// (1 - r) sum_k r^(t-k) theta_k / (1 - r^t), a normalised average of the trained weights that carries no trace of
/// the initial weights. (The reference's plain EMA from the initial weights keeps r^t of them: 5% after 3000
/// steps at r = 0.999, which visibly dims a short run's samples; at the reference's 0.9999 and 10^5+ steps the two
/// agree.) Written as one update of the corrected value: shadow += (theta - shadow) (1 - r) / (1 - r^(t+1)).
/// </summary>
public sealed class Ema(nn.Module model, nn.Module shadow, double rate)
{
    /// <summary>The averaged model.</summary>
    public nn.Module Shadow => shadow;

    /// <summary>Updates applied so far (restored from a checkpoint's optimizer step count on resume).</summary>
    public long Updates { get; set; }

    /// <summary>Copies the model into the shadow (at the start of training).</summary>
    public void Reset()
    {
        using var noGrad = torch.no_grad();
        var target = shadow.named_parameters().ToDictionary(x => x.name, x => x.parameter);
        foreach (var (name, p) in model.named_parameters())
            target[name].copy_(p);
        Updates = 0;
    }

    /// <summary>One bias-corrected update toward the model's current parameters (frozen ones too, as the reference).</summary>
    public void Update()
    {
        var weight = (1 - rate) / (1 - Math.Pow(rate, Updates + 1));
        Updates++;
        using var noGrad = torch.no_grad();
        using var alpha = weight.ToScalar(); // held through the native calls (a temporary may be freed mid-call)
        var target = shadow.named_parameters().ToDictionary(x => x.name, x => x.parameter);
        foreach (var (name, p) in model.named_parameters())
        {
            using var delta = p - target[name];
            target[name].add_(delta, alpha: alpha);
        }
    }
}
