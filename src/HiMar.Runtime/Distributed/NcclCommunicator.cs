using System.Runtime.InteropServices;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Distributed;

/// <summary>
/// NCCL collectives on CUDA tensors, one GPU per rank: thin bindings to libnccl.so.2 (<c>ncclGetUniqueId</c>,
/// <c>ncclCommInitRank</c>, <c>ncclAllReduce</c>, <c>ncclBcast</c>, <c>ncclCommDestroy</c>), loaded at run time.
/// Rank 0 makes the communicator's unique id and MPI broadcasts it; each rank first makes GPU
/// <c>localRank % devices</c> current through the CUDA driver API (libcuda.so.1), since NCCL binds a communicator
/// to the current device. Operations are queued on the legacy default stream (stream 0), the stream libtorch
/// uses by default, so they are ordered with the tensor work around them. Host buffers, CPU tensors, barriers
/// and broadcasts of host bytes go through the MPI communicator.
/// UNTESTED: written against NCCL 2's documented C API, compiled, but never run (this project's machines have no
/// GPU). Try it with <c>mpirun -np 2 himar bench allreduce --backend nccl --device cuda</c> before relying on it.
/// </summary>
public sealed unsafe class NcclCommunicator : ICommunicator
{
    const int NcclFloat32 = 7, NcclFloat64 = 8, NcclSum = 0;

    [StructLayout(LayoutKind.Sequential)]
    struct NcclUniqueId
    {
        public fixed byte Internal[128]; // NCCL_UNIQUE_ID_BYTES
    }

    readonly MpiCommunicator mpi;
    readonly IntPtr comm;
    readonly delegate* unmanaged<IntPtr, IntPtr, nuint, int, int, IntPtr, IntPtr, int> allReduce;
    readonly delegate* unmanaged<IntPtr, nuint, int, int, IntPtr, IntPtr, int> bcast;
    readonly delegate* unmanaged<IntPtr, int> destroy;
    readonly delegate* unmanaged<int, byte*> errorString;
    bool disposed;

    /// <summary>Makes the NCCL communicator of <paramref name="mpi"/>'s ranks on GPU <paramref name="localRank"/>
    /// modulo the device count (collective: every rank must call it).</summary>
    public NcclCommunicator(MpiCommunicator mpi, int localRank)
    {
        this.mpi = mpi;
        var lib = Load(["libnccl.so.2", "libnccl.so"], "NCCL (libnccl.so.2)");
        IntPtr F(string name) => NativeLibrary.TryGetExport(lib, name, out var p) ? p : throw new MpiException($"libnccl does not export {name}.");
        var getUniqueId = (delegate* unmanaged<NcclUniqueId*, int>)F("ncclGetUniqueId");
        var initRank = (delegate* unmanaged<IntPtr*, int, NcclUniqueId, int, int>)F("ncclCommInitRank");
        allReduce = (delegate* unmanaged<IntPtr, IntPtr, nuint, int, int, IntPtr, IntPtr, int>)F("ncclAllReduce");
        bcast = (delegate* unmanaged<IntPtr, nuint, int, int, IntPtr, IntPtr, int>)F("ncclBcast");
        destroy = (delegate* unmanaged<IntPtr, int>)F("ncclCommDestroy");
        errorString = (delegate* unmanaged<int, byte*>)F("ncclGetErrorString");
        Device = MakeDeviceCurrent(localRank);
        var id = default(NcclUniqueId);
        if (mpi.Rank == 0)
            Check(getUniqueId(&id), "ncclGetUniqueId");
        mpi.Broadcast(new Span<byte>(&id, sizeof(NcclUniqueId)), 0);
        IntPtr c;
        Check(initRank(&c, mpi.Size, id, mpi.Rank), "ncclCommInitRank");
        comm = c;
    }

    /// <summary>The CUDA device index this rank uses.</summary>
    public int Device { get; }

    /// <inheritdoc/>
    public int Rank => mpi.Rank;

    /// <inheritdoc/>
    public int Size => mpi.Size;

    /// <inheritdoc/>
    public string Backend => "nccl";

    static IntPtr Load(string[] names, string what)
    {
        foreach (var name in names)
            if (NativeLibrary.TryLoad(name, out var h))
                return h;
        throw new MpiException($"{what} could not be loaded (tried {string.Join(", ", names)}).");
    }

    /// <summary>cuInit, then the primary context of device localRank % count made current on this thread.</summary>
    static int MakeDeviceCurrent(int localRank)
    {
        var cuda = Load(["libcuda.so.1", "libcuda.so"], "the CUDA driver (libcuda.so.1)");
        IntPtr F(string name) => NativeLibrary.TryGetExport(cuda, name, out var p) ? p : throw new MpiException($"libcuda does not export {name}.");
        var init = (delegate* unmanaged<uint, int>)F("cuInit");
        var count = (delegate* unmanaged<int*, int>)F("cuDeviceGetCount");
        var get = (delegate* unmanaged<int*, int, int>)F("cuDeviceGet");
        var retain = (delegate* unmanaged<IntPtr*, int, int>)F("cuDevicePrimaryCtxRetain");
        var setCurrent = (delegate* unmanaged<IntPtr, int>)F("cuCtxSetCurrent");
        void Cu(int rc, string call)
        {
            if (rc != 0)
                throw new MpiException($"{call} failed with CUDA driver error {rc}.");
        }
        Cu(init(0), "cuInit");
        int n;
        Cu(count(&n), "cuDeviceGetCount");
        if (n == 0)
            throw new MpiException("the NCCL backend needs a CUDA device; none was found.");
        var ordinal = localRank % n;
        int device;
        Cu(get(&device, ordinal), "cuDeviceGet");
        IntPtr ctx;
        Cu(retain(&ctx, device), "cuDevicePrimaryCtxRetain");
        Cu(setCurrent(ctx), "cuCtxSetCurrent");
        return ordinal;
    }

    void Check(int rc, string what)
    {
        if (rc != 0)
            throw new MpiException($"{what} failed: {Marshal.PtrToStringUTF8((IntPtr)errorString(rc))} (NCCL result {rc}).");
    }

    /// <inheritdoc/>
    public void AllReduceSum(Span<float> values) => mpi.AllReduceSum(values);

    /// <inheritdoc/>
    public void AllReduceSum(Span<double> values) => mpi.AllReduceSum(values);

    /// <inheritdoc/>
    public void AllReduceSum(Tensor tensor)
    {
        if (tensor.device_type != DeviceType.CUDA)
        {
            mpi.AllReduceSum(tensor);
            return;
        }
        var type = TensorMemory.FloatWidth(tensor.dtype) == 4 ? NcclFloat32 : NcclFloat64;
        var p = TensorMemory.DataPointer(tensor);
        Check(allReduce(p, p, (nuint)tensor.numel(), type, NcclSum, comm, IntPtr.Zero), "ncclAllReduce");
    }

    /// <inheritdoc/>
    public void Broadcast(Span<byte> data, int root) => mpi.Broadcast(data, root);

    /// <inheritdoc/>
    public void Broadcast(Tensor tensor, int root)
    {
        if (tensor.device_type != DeviceType.CUDA)
        {
            mpi.Broadcast(tensor, root);
            return;
        }
        var bytes = (nuint)(tensor.numel() * tensor.element_size());
        Check(bcast(TensorMemory.DataPointer(tensor), bytes, 0 /* ncclInt8: bytes */, root, comm, IntPtr.Zero), "ncclBcast");
    }

    /// <inheritdoc/>
    public void Barrier()
    {
        if (torch.cuda.is_available())
            torch.cuda.synchronize();
        mpi.Barrier();
    }

    /// <inheritdoc/>
    public void IdleBarrier()
    {
        if (torch.cuda.is_available())
            torch.cuda.synchronize();
        mpi.IdleBarrier();
    }

    /// <summary>Destroys the NCCL communicator (MPI stays up for <see cref="Communicators.Finish"/>).</summary>
    public void Dispose()
    {
        if (disposed)
            return;
        disposed = true;
        destroy(comm);
    }
}
