using System.Text.Json.Nodes;

namespace HiMar.Runtime.Training;

/// <summary>
/// The loss `best` is judged on: an exponential moving average of every optimiser step's loss (the all-reduced
/// combined loss, averaged over the step's micro-batches), s_n = d s_(n-1) + (1 - d) loss_n with d =
/// <see cref="Decay"/>, divided by 1 - d^n so the first steps are not pulled towards 0 (Adam's bias correction).
/// With d = 0.98 the last ~50 steps carry 64% of the weight: one noisy batch moves it by 2%.
/// </summary>
public sealed class SmoothedLoss
{
    /// <summary>The decay per step.</summary>
    public const double Decay = 0.98;

    double average;
    long steps;

    /// <summary>Steps averaged so far.</summary>
    public long Steps => steps;

    /// <summary>The bias-corrected average; +infinity before the first step.</summary>
    public double Value => steps == 0 ? double.PositiveInfinity : average / (1 - Math.Pow(Decay, steps));

    /// <summary>Adds one step's loss.</summary>
    public void Add(double loss)
    {
        average = Decay * average + (1 - Decay) * loss;
        steps++;
    }

    /// <summary>The state as a checkpoint keeps it (the raw average and the step count, so a resume continues exactly).</summary>
    public JsonObject ToJson() => new() { ["average"] = average, ["steps"] = steps, ["decay"] = Decay };

    /// <summary>Restores <see cref="ToJson"/>'s state; a checkpoint without one (written before it existed) starts afresh.</summary>
    public void Load(JsonNode? state)
    {
        (average, steps) = state is JsonObject o && o["average"] is { } a && o["steps"] is { } n ? (a.GetValue<double>(), n.GetValue<long>()) : (0.0, 0L);
    }

    /// <summary>The raw state as two numbers (for broadcasting to other ranks).</summary>
    internal (double Average, long Steps) Raw
    {
        get => (average, steps);
        set => (average, steps) = value;
    }
}
