using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Checkpoints;

/// <summary>
/// Refuses weights that hold NaN or infinity where a model is loaded to sample, evaluate or resume training: such a
/// model runs without complaint and produces black or garbage images with exit code 0. The refusal is a
/// <see cref="CheckpointFormatException"/> naming the file and the first few offending tensors; the command line's
/// <c>--allow-nonfinite</c> (sample, eval) turns it into a warning.
/// </summary>
public static class FiniteWeights
{
    /// <summary>How many offending tensor names a message lists.</summary>
    public const int Shown = 5;

    /// <summary>The names of the floating-point tensors holding NaN or infinity, in the given order.</summary>
    public static IReadOnlyList<string> NonFinite(IEnumerable<KeyValuePair<string, Tensor>> tensors)
    {
        var bad = new List<string>();
        foreach (var (name, t) in tensors)
        {
            if (!t.is_floating_point() || t.numel() == 0)
                continue;
            using var finite = torch.isfinite(t).all();
            if (!finite.item<bool>())
                bad.Add(name);
        }
        return bad;
    }

    /// <summary>
    /// Refuses <paramref name="tensors"/> (read from <paramref name="what"/>) when any holds NaN or infinity; with
    /// <paramref name="allow"/>, reports them to <paramref name="warn"/> instead.
    /// </summary>
    public static void Require(IEnumerable<KeyValuePair<string, Tensor>> tensors, string what, bool allow = false, Action<string>? warn = null)
    {
        var bad = NonFinite(tensors);
        if (bad.Count == 0)
            return;
        var names = string.Join(", ", bad.Take(Shown)) + (bad.Count > Shown ? $" and {bad.Count - Shown} more" : "");
        var tensorsHold = bad.Count == 1 ? "tensor holds" : "tensors hold";
        if (!allow)
            throw new CheckpointFormatException(
                $"{what}: {bad.Count} {tensorsHold} NaN or infinity ({names}); such weights sample black or garbage images (sample and eval take --allow-nonfinite to load them anyway).");
        warn?.Invoke($"{what}: {bad.Count} {tensorsHold} NaN or infinity ({names}); loading them anyway (--allow-nonfinite).");
    }
}
