using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace HiMar.Runtime.Distributed;

/// <summary>
/// Averages gradients over the ranks as PyTorch's DistributedDataParallel does, in buckets: the parameters, in
/// registration order, are grouped into buckets of at most <see cref="DefaultBucketBytes"/> (a parameter larger
/// than that is a bucket of its own); each step every bucket's gradients are copied into one contiguous buffer of
/// the bucket's dtype and device, summed over the ranks with one all-reduce, divided by the rank count and copied
/// back. A few large collectives instead of one per tensor keep the latency cost per step small. A parameter
/// without a gradient this step contributes zeros and keeps no gradient (every rank runs the same graph, so
/// ranks agree on which ones). With one rank nothing is copied at all.
/// </summary>
public sealed class GradientBuckets : IDisposable
{
    /// <summary>25 MiB, DistributedDataParallel's default bucket size.</summary>
    public const long DefaultBucketBytes = 25L * 1024 * 1024;

    readonly ICommunicator comm;
    readonly List<(Tensor Flat, List<(Parameter Param, long Offset, long Count)> Members)> buckets = [];

    /// <summary>Plans the buckets of <paramref name="parameters"/> (those that require gradients).</summary>
    public GradientBuckets(IEnumerable<Parameter> parameters, ICommunicator comm, long bucketBytes = DefaultBucketBytes)
    {
        this.comm = comm;
        if (comm.Size == 1)
            return;
        var current = new List<(Parameter, long, long)>();
        long elements = 0, bytes = 0;
        Parameter? first = null;
        void Close()
        {
            if (current.Count == 0 || first is null)
                return;
            var flat = torch.zeros(elements, dtype: first.dtype, device: first.device).DetachFromDisposeScope();
            buckets.Add((flat, [.. current]));
            current.Clear();
            elements = bytes = 0;
            first = null;
        }
        foreach (var p in parameters.Where(p => p.requires_grad))
        {
            TensorMemory.FloatWidth(p.dtype);
            var size = p.numel() * p.element_size();
            if (current.Count > 0 && (bytes + size > bucketBytes || p.dtype != first!.dtype || p.device_type != first.device_type || p.device_index != first.device_index))
                Close();
            first ??= p;
            current.Add((p, elements, p.numel()));
            elements += p.numel();
            bytes += size;
        }
        Close();
    }

    /// <summary>The number of buckets (0 with one rank).</summary>
    public int Count => buckets.Count;

    /// <summary>The bytes all-reduced per step.</summary>
    public long Bytes => buckets.Sum(b => b.Flat.numel() * b.Flat.element_size());

    /// <summary>Replaces every gradient with its mean over the ranks (one all-reduce per bucket).</summary>
    public void AllReduceAverage()
    {
        if (comm.Size == 1)
            return;
        using var noGrad = torch.no_grad();
        foreach (var (flat, members) in buckets)
        {
            foreach (var (p, offset, count) in members)
            {
                using var slot = flat.narrow(0, offset, count);
                using var g = p.grad;
                if (g is null)
                {
                    slot.zero_();
                    continue;
                }
                using var gv = g.reshape(-1);
                slot.copy_(gv);
            }
            comm.AllReduceSum(flat);
            flat.div_(comm.Size);
            foreach (var (p, offset, count) in members)
            {
                using var g = p.grad;
                if (g is null)
                    continue;
                using var slot = flat.narrow(0, offset, count);
                using var view = slot.view_as(g);
                g.copy_(view);
            }
        }
    }

    /// <summary>Frees the bucket buffers.</summary>
    public void Dispose()
    {
        foreach (var (flat, _) in buckets)
            flat.Dispose();
        buckets.Clear();
    }
}
