using System.Runtime.InteropServices;

namespace HiMar.Runtime.Native;

/// <summary>
/// Switches libtorch's oneDNN (mkldnn) convolutions off for a scope, through libtorch's own global switch
/// (`at::Context::setUserEnabledMkldnn`, the switch behind Python's `torch.backends.mkldnn.flags`).
/// <para>
/// Why: libtorch 2.10's oneDNN convolution backward on CPU returns NaN input gradients, now and then, for
/// convolutions with few output channels when it runs on more than one thread: on this project's 2-core AMD EPYC
/// (avx512_bf16), a 32 -> 1 channel 3x3 convolution over 8 x 32 x 32 images gave a non-finite input gradient in 3 to 8
/// of 100 backward passes in fp32 and in 84 of 100 in bf16; one thread, or oneDNN off, gave none. The autoencoder's
/// last convolution has one output channel, so one such pass in a training run turned every weight into NaN.
/// Trainers of convolutional models run their backward pass inside this scope: the forward pass keeps oneDNN (it was
/// never wrong), the backward pass takes ATen's own kernels (slower: a 64 -> 64 channel backward took 1.8x as long
/// in fp32 and 2.5x in bf16 here, but correct). TorchSharp does not expose the switch, hence the exported symbols.
/// </para>
/// </summary>
public static class OneDnn
{
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    delegate IntPtr GlobalContextFn();

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    delegate void SetEnabledFn(IntPtr context, byte enabled);

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    delegate byte GetEnabledFn(IntPtr context);

    static readonly object Gate = new();
    static bool resolved;
    static IntPtr context;
    static SetEnabledFn? set;
    static GetEnabledFn? get;
    static int depth;
    static bool before;

    static bool Resolve()
    {
        if (resolved)
            return set != null;
        resolved = true;
        TorchNative.EnsureLoaded();
        if (!TorchNative.TryLoadLibTorchPart("libtorch_cpu.so", TorchNative.FindGlueLibrary(), out var lib)
            || !NativeLibrary.TryGetExport(lib, "_ZN2at13globalContextEv", out var ctxFn)
            || !NativeLibrary.TryGetExport(lib, "_ZN2at7Context20setUserEnabledMkldnnEb", out var setFn)
            || !NativeLibrary.TryGetExport(lib, "_ZNK2at7Context17userEnabledMkldnnEv", out var getFn))
            return false;
        context = Marshal.GetDelegateForFunctionPointer<GlobalContextFn>(ctxFn)();
        set = Marshal.GetDelegateForFunctionPointer<SetEnabledFn>(setFn);
        get = Marshal.GetDelegateForFunctionPointer<GetEnabledFn>(getFn);
        return true;
    }

    /// <summary>Whether this libtorch exports the switch (false: <see cref="Off"/> changes nothing).</summary>
    public static bool Available
    {
        get
        {
            lock (Gate)
                return Resolve();
        }
    }

    /// <summary>Whether libtorch may use oneDNN for convolutions now (true where the switch is not available).</summary>
    public static bool Enabled
    {
        get
        {
            lock (Gate)
                return !Resolve() || get!(context) != 0;
        }
    }

    /// <summary>
    /// oneDNN off until the returned scope is disposed; scopes nest (and may overlap across threads): the switch
    /// goes back to what it was when the last open scope closes.
    /// </summary>
    public static IDisposable Off()
    {
        lock (Gate)
        {
            if (!Resolve())
                return new Scope(false);
            if (depth++ == 0)
            {
                before = get!(context) != 0;
                set!(context, 0);
            }
            return new Scope(true);
        }
    }

    sealed class Scope(bool active) : IDisposable
    {
        bool open = active;

        public void Dispose()
        {
            lock (Gate)
            {
                if (!open)
                    return;
                open = false;
                if (--depth == 0)
                    set!(context, before ? (byte)1 : (byte)0);
            }
        }
    }
}
