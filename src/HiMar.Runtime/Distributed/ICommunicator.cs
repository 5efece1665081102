using System.Runtime.InteropServices;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Distributed;

/// <summary>
/// The collective operations of a data-parallel job: every process (rank 0..Size-1) calls each operation in
/// the same order with buffers of the same length, and each call returns when this rank's part is done.
/// Implemented by <see cref="SingleProcess"/> (Size 1, no library), <see cref="MpiCommunicator"/> (Open MPI's
/// libmpi) and <see cref="NcclCommunicator"/> (libnccl on CUDA tensors; untested here).
/// </summary>
public interface ICommunicator : IDisposable
{
    /// <summary>This process's index, 0..Size-1.</summary>
    int Rank { get; }

    /// <summary>The number of processes.</summary>
    int Size { get; }

    /// <summary>`single`, `mpi` or `nccl`.</summary>
    string Backend { get; }

    /// <summary>Sums <paramref name="values"/> over all ranks, in place (host memory).</summary>
    void AllReduceSum(Span<float> values);

    /// <summary>Sums <paramref name="values"/> over all ranks, in place (host memory).</summary>
    void AllReduceSum(Span<double> values);

    /// <summary>Sums a contiguous float32 or float64 tensor over all ranks, in place.</summary>
    void AllReduceSum(Tensor tensor);

    /// <summary>Copies <paramref name="data"/> from rank <paramref name="root"/> to every rank (host memory).</summary>
    void Broadcast(Span<byte> data, int root);

    /// <summary>Copies a contiguous tensor from rank <paramref name="root"/> to every rank, in place.</summary>
    void Broadcast(Tensor tensor, int root);

    /// <summary>Returns on each rank once every rank has called it.</summary>
    void Barrier();

    /// <summary>A barrier for long waits: it sleeps instead of spinning, leaving the core to the ranks still working
    /// (MPI's own barrier polls at full speed); ranks leave it a few milliseconds apart, so do not time from it.</summary>
    void IdleBarrier();
}

/// <summary>Averages, typed broadcasts and whole-module broadcasts built on <see cref="ICommunicator"/>.</summary>
public static class CommunicatorExtensions
{
    /// <summary>Whether this is rank 0, the rank that logs and writes checkpoints.</summary>
    public static bool IsRoot(this ICommunicator c) => c.Rank == 0;

    /// <summary>The mean of <paramref name="values"/> over all ranks, in place.</summary>
    public static void AllReduceAverage(this ICommunicator c, Span<double> values)
    {
        if (c.Size == 1)
            return;
        c.AllReduceSum(values);
        foreach (ref var v in values)
            v /= c.Size;
    }

    /// <summary>The mean of <paramref name="values"/> over all ranks, in place.</summary>
    public static void AllReduceAverage(this ICommunicator c, Span<float> values)
    {
        if (c.Size == 1)
            return;
        c.AllReduceSum(values);
        foreach (ref var v in values)
            v /= c.Size;
    }

    /// <summary>The mean of a contiguous floating-point tensor over all ranks, in place.</summary>
    public static void AllReduceAverage(this ICommunicator c, Tensor tensor)
    {
        if (c.Size == 1)
            return;
        c.AllReduceSum(tensor);
        using var noGrad = torch.no_grad();
        tensor.div_(c.Size);
    }

    /// <summary>Copies <paramref name="values"/> from rank <paramref name="root"/> to every rank.</summary>
    public static void Broadcast(this ICommunicator c, Span<double> values, int root) => c.Broadcast(MemoryMarshal.AsBytes(values), root);

    /// <summary>Copies <paramref name="values"/> from rank <paramref name="root"/> to every rank.</summary>
    public static void Broadcast(this ICommunicator c, Span<long> values, int root) => c.Broadcast(MemoryMarshal.AsBytes(values), root);

    /// <summary>Rank <paramref name="root"/>'s byte array on every rank (other ranks may pass anything, null included).</summary>
    public static byte[] BroadcastBytes(this ICommunicator c, byte[]? data, int root)
    {
        if (c.Size == 1)
            return data ?? [];
        Span<long> length = [c.Rank == root ? (data ?? []).Length : 0];
        c.Broadcast(length, root);
        var buffer = c.Rank == root ? data ?? [] : new byte[length[0]];
        c.Broadcast(buffer, root);
        return buffer;
    }

    /// <summary>Copies every parameter and buffer of <paramref name="module"/> from rank <paramref name="root"/> to
    /// every rank, in registration order (so all ranks start from the same weights).</summary>
    public static void BroadcastModule(this ICommunicator c, nn.Module module, int root = 0)
    {
        if (c.Size == 1)
            return;
        using var noGrad = torch.no_grad();
        foreach (var (_, p) in module.named_parameters())
            BroadcastInPlace(c, p, root);
        foreach (var (_, b) in module.named_buffers())
            BroadcastInPlace(c, b, root);
    }

    /// <summary>Broadcasts a tensor that may not be contiguous, through a contiguous copy when it has to.</summary>
    public static void BroadcastInPlace(this ICommunicator c, Tensor tensor, int root)
    {
        if (tensor.is_contiguous())
        {
            c.Broadcast(tensor, root);
            return;
        }
        using var copy = tensor.contiguous();
        c.Broadcast(copy, root);
        using var noGrad = torch.no_grad();
        tensor.copy_(copy);
    }
}

/// <summary>The one-process job: every collective is the identity, and no MPI library is loaded.</summary>
public sealed class SingleProcess : ICommunicator
{
    /// <summary>The shared instance.</summary>
    public static readonly SingleProcess Instance = new();

    /// <inheritdoc/>
    public int Rank => 0;

    /// <inheritdoc/>
    public int Size => 1;

    /// <inheritdoc/>
    public string Backend => "single";

    /// <inheritdoc/>
    public void AllReduceSum(Span<float> values)
    {
    }

    /// <inheritdoc/>
    public void AllReduceSum(Span<double> values)
    {
    }

    /// <inheritdoc/>
    public void AllReduceSum(Tensor tensor)
    {
    }

    /// <inheritdoc/>
    public void Broadcast(Span<byte> data, int root)
    {
    }

    /// <inheritdoc/>
    public void Broadcast(Tensor tensor, int root)
    {
    }

    /// <inheritdoc/>
    public void Barrier()
    {
    }

    /// <inheritdoc/>
    public void IdleBarrier()
    {
    }

    /// <summary>Nothing to release.</summary>
    public void Dispose()
    {
    }
}
