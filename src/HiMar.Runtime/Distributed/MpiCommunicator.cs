using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Distributed;

/// <summary>
/// The processes of <c>MPI_COMM_WORLD</c> (one per <c>mpirun</c> slot, on one machine or many), through Open MPI.
/// MPI is initialised once per process (<see cref="World"/>) at <c>MPI_THREAD_SERIALIZED</c> and finalised by
/// <see cref="Communicators.Finish"/>; host buffers and CPU tensors are reduced in place, tensors on other devices
/// through a CPU copy. Calls longer than MPI's int count are split.
/// </summary>
public sealed unsafe class MpiCommunicator : ICommunicator
{
    static readonly object Gate = new();
    static MpiCommunicator? world;
    const int Chunk = 1 << 30; // elements per MPI call (MPI counts are int)

    readonly MpiLibrary mpi;

    MpiCommunicator(MpiLibrary mpi, int threadLevel)
    {
        this.mpi = mpi;
        ThreadLevel = threadLevel;
        Rank = mpi.CommRank(mpi.CommWorld);
        Size = mpi.CommSize(mpi.CommWorld);
    }

    /// <summary>The world communicator, initialising MPI on first use.</summary>
    public static MpiCommunicator World
    {
        get
        {
            lock (Gate)
            {
                if (world == null)
                {
                    var lib = MpiLibrary.Load();
                    if (lib.IsFinalized())
                        throw new MpiException("MPI was already finalised in this process.");
                    var level = lib.IsInitialized() ? MpiLibrary.ThreadSerialized : lib.InitThread(MpiLibrary.ThreadSerialized);
                    world = new MpiCommunicator(lib, level);
                }
                return world;
            }
        }
    }

    /// <summary>Whether <see cref="World"/> has initialised MPI in this process.</summary>
    public static bool Started
    {
        get
        {
            lock (Gate)
                return world != null;
        }
    }

    /// <summary>The loaded library.</summary>
    public MpiLibrary Library => mpi;

    /// <summary>The thread level MPI provided (<see cref="MpiLibrary.ThreadSerialized"/> was asked for).</summary>
    public int ThreadLevel { get; }

    /// <inheritdoc/>
    public int Rank { get; }

    /// <inheritdoc/>
    public int Size { get; }

    /// <inheritdoc/>
    public string Backend => "mpi";

    /// <inheritdoc/>
    public void AllReduceSum(Span<float> values)
    {
        fixed (float* p = values)
            AllReduce((IntPtr)p, values.Length, mpi.Float, sizeof(float));
    }

    /// <inheritdoc/>
    public void AllReduceSum(Span<double> values)
    {
        fixed (double* p = values)
            AllReduce((IntPtr)p, values.Length, mpi.Double, sizeof(double));
    }

    /// <inheritdoc/>
    public void AllReduceSum(Tensor tensor)
    {
        var width = TensorMemory.FloatWidth(tensor.dtype);
        var type = width == 4 ? mpi.Float : mpi.Double;
        if (tensor.device_type == DeviceType.CPU && tensor.is_contiguous())
        {
            AllReduce(TensorMemory.DataPointer(tensor), tensor.numel(), type, width);
            return;
        }
        using var host = tensor.to(DeviceType.CPU).contiguous();
        AllReduce(TensorMemory.DataPointer(host), host.numel(), type, width);
        using var noGrad = torch.no_grad();
        tensor.copy_(host);
    }

    void AllReduce(IntPtr data, long count, IntPtr type, int width)
    {
        for (long done = 0; done < count; done += Chunk)
        {
            var n = (int)Math.Min(Chunk, count - done);
            mpi.Allreduce(MpiLibrary.InPlace, data + (nint)(done * width), n, type, mpi.OpSum, mpi.CommWorld);
        }
    }

    /// <inheritdoc/>
    public void Broadcast(Span<byte> data, int root)
    {
        fixed (byte* p = data)
            Bcast((IntPtr)p, data.Length, root);
    }

    /// <inheritdoc/>
    public void Broadcast(Tensor tensor, int root)
    {
        if (tensor.device_type == DeviceType.CPU && tensor.is_contiguous())
        {
            Bcast(TensorMemory.DataPointer(tensor), tensor.numel() * tensor.element_size(), root);
            return;
        }
        using var host = tensor.to(DeviceType.CPU).contiguous();
        Bcast(TensorMemory.DataPointer(host), host.numel() * host.element_size(), root);
        using var noGrad = torch.no_grad();
        tensor.copy_(host);
    }

    void Bcast(IntPtr data, long bytes, int root)
    {
        for (long done = 0; done < bytes; done += Chunk)
            mpi.Bcast(data + (nint)done, (int)Math.Min(Chunk, bytes - done), mpi.Byte, root, mpi.CommWorld);
    }

    /// <inheritdoc/>
    public void Barrier() => mpi.Barrier(mpi.CommWorld);

    /// <inheritdoc/>
    public void IdleBarrier() => mpi.SleepingBarrier(mpi.CommWorld, TimeSpan.FromMilliseconds(5));

    /// <summary>Ends every process of the job with <paramref name="code"/> (after a failure on this rank, so
    /// the others do not wait forever in a collective).</summary>
    public void Abort(int code) => mpi.Abort(mpi.CommWorld, code);

    /// <summary>Finalises MPI (process-wide: see <see cref="Communicators.Finish"/>).</summary>
    internal void FinalizeWorld()
    {
        if (!mpi.IsFinalized())
            mpi.FinalizeMpi();
    }

    /// <summary>Nothing: the world lives until <see cref="Communicators.Finish"/>.</summary>
    public void Dispose()
    {
    }
}
