using HiMar.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Checkpoints;

/// <summary>Model weights as safetensors files, by reference state_dict names.</summary>
public static class ModelFiles
{
    /// <summary>
    /// Loads a safetensors file into a module (any dtype in the file is cast to the module's). Strict by default:
    /// one <see cref="WeightMismatchException"/>, prefixed with the file name, lists every missing, unexpected and
    /// mismatched key. Weights holding NaN or infinity are refused (see <see cref="FiniteWeights"/>) unless
    /// <paramref name="allowNonFinite"/>, which reports them to <paramref name="warn"/>. Returns the keys a non-strict
    /// load skipped.
    /// </summary>
    public static IReadOnlyList<string> Load(nn.Module module, string path, bool strict = true, bool allowNonFinite = false, Action<string>? warn = null)
    {
        var tensors = SafeTensors.Load(path);
        try
        {
            FiniteWeights.Require(tensors, path, allowNonFinite, warn);
            return Weights.Load(module, tensors, strict).ToList();
        }
        catch (WeightMismatchException e)
        {
            throw new CheckpointFormatException($"{path}: {e.Message}", e);
        }
        finally
        {
            foreach (var t in tensors.Values)
                t.Dispose();
        }
    }

    /// <summary>Saves a module's state_dict as safetensors (atomically), in its own dtype or cast to <paramref name="dtype"/>.</summary>
    public static void Save(nn.Module module, string path, ScalarType? dtype = null, IReadOnlyDictionary<string, string>? metadata = null)
    {
        using var scope = torch.NewDisposeScope();
        var state = Weights.StateDict(module).ToDictionary(kv => kv.Key, kv => dtype is { } d && kv.Value.is_floating_point() ? kv.Value.to(d) : kv.Value);
        SafeTensors.Save(path, state, metadata);
    }
}
