using System.Runtime.InteropServices;
using static TorchSharp.torch;

namespace HiMar.Runtime.Distributed;

/// <summary>The address of a tensor's first element, for handing tensor memory to MPI or NCCL without a copy.</summary>
public static partial class TensorMemory
{
    // TorchSharp's own glue library (loaded with TorchSharp): `tensor->data_ptr()`, storage offset included.
    [LibraryImport("LibTorchSharp")]
    private static partial IntPtr THSTensor_data(IntPtr handle);

    /// <summary>The data pointer of a contiguous tensor (CPU or device memory, as the tensor lives).</summary>
    public static IntPtr DataPointer(Tensor tensor)
    {
        if (!tensor.is_contiguous())
            throw new ArgumentException("collectives need contiguous tensors", nameof(tensor));
        var p = THSTensor_data(tensor.Handle);
        if (p == IntPtr.Zero && tensor.numel() > 0)
            throw new InvalidOperationException("TorchSharp returned no data pointer for a tensor");
        return p;
    }

    /// <summary>Bytes per element of a floating-point dtype the collectives reduce.</summary>
    public static int FloatWidth(ScalarType dtype) => dtype switch
    {
        ScalarType.Float32 => 4,
        ScalarType.Float64 => 8,
        _ => throw new ArgumentException($"all-reduce supports float32 and float64 tensors, not {dtype}"),
    };
}
