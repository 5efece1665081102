using System.Runtime.InteropServices;
using HiMar.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Native;

/// <summary>What a user asks for with <c>--precision</c>: a precision, or <see cref="Auto"/> to let the device decide.</summary>
public enum PrecisionChoice
{
    /// <summary>Products in fp32.</summary>
    Fp32,

    /// <summary>Products in bf16 (fp32 master weights and diffusion arithmetic).</summary>
    Bf16,

    /// <summary>bf16 where the device has bf16 units, fp32 elsewhere.</summary>
    Auto,
}

/// <summary>The precision a run uses and why.</summary>
/// <param name="Precision">The precision chosen.</param>
/// <param name="Bf16Units">Whether the device has bf16 units.</param>
/// <param name="Reason">What was found on the device, in words (e.g. "cpu: avx512_bf16, amx_bf16").</param>
public sealed record PrecisionDecision(Precision Precision, bool Bf16Units, string Reason)
{
    /// <summary>The precision's name as flags and reports write it: fp32 or bf16.</summary>
    public string Name => Precisions.Name(Precision);
}

/// <summary>
/// Parses <c>--precision</c> and decides what <c>auto</c> means on a device: bf16 on a CPU whose flags in
/// /proc/cpuinfo include <c>avx512_bf16</c> or <c>amx_bf16</c>, or on a CUDA device of compute capability 8.0 or
/// more (asked of the driver, libcuda, since TorchSharp does not expose it); fp32 elsewhere.
/// </summary>
public static class Precisions
{
    /// <summary>fp32 or bf16.</summary>
    public static string Name(Precision p) => p == Precision.Bf16 ? "bf16" : "fp32";

    /// <summary>Parses fp32, bf16 or auto (any case); anything else is bad input naming the flag.</summary>
    public static PrecisionChoice Parse(string text, string flag = "--precision") => text.Trim().ToLowerInvariant() switch
    {
        "fp32" or "float32" => PrecisionChoice.Fp32,
        "bf16" or "bfloat16" => PrecisionChoice.Bf16,
        "auto" => PrecisionChoice.Auto,
        _ => throw new BadInputException($"{flag}: '{Quote(text)}' is not a precision; use fp32, bf16 or auto."),
    };

    /// <summary>Parses a precision that must be concrete (fp32 or bf16), e.g. as recorded in a file.</summary>
    public static Precision ParseConcrete(string text, string where) => Parse(text, where) switch
    {
        PrecisionChoice.Fp32 => Precision.Fp32,
        PrecisionChoice.Bf16 => Precision.Bf16,
        _ => throw new BadInputException($"{where}: 'auto' is not a concrete precision; use fp32 or bf16."),
    };

    static string Quote(string s) => s.Length > 40 ? s[..40] + "..." : s;

    /// <summary>The bf16 flags of this machine's CPU (<c>avx512_bf16</c>, <c>amx_bf16</c>) found in
    /// <paramref name="cpuinfo"/> (the text of /proc/cpuinfo); empty when none.</summary>
    public static IReadOnlyList<string> CpuBf16Flags(string cpuinfo)
    {
        var found = new SortedSet<string>(StringComparer.Ordinal);
        foreach (var line in cpuinfo.Split('\n'))
        {
            if (!line.StartsWith("flags", StringComparison.Ordinal))
                continue;
            foreach (var flag in line[(line.IndexOf(':') + 1)..].Split(' ', StringSplitOptions.RemoveEmptyEntries))
                if (flag is "avx512_bf16" or "amx_bf16")
                    found.Add(flag);
        }
        return found.ToList();
    }

    /// <summary>The bf16 flags of this machine's CPU, read from /proc/cpuinfo (empty where it cannot be read).</summary>
    public static IReadOnlyList<string> CpuBf16Flags()
    {
        try
        {
            return CpuBf16Flags(File.ReadAllText("/proc/cpuinfo"));
        }
        catch (IOException)
        {
            return [];
        }
        catch (UnauthorizedAccessException)
        {
            return [];
        }
    }

    /// <summary>Whether <paramref name="device"/> has bf16 units, and what was found.</summary>
    public static (bool Units, string Reason) Bf16Units(Device device)
    {
        if (device.type == DeviceType.CUDA)
        {
            var cc = CudaCapability(device.index < 0 ? 0 : device.index);
            return cc switch
            {
                null => (false, $"{device}: compute capability unknown (libcuda not found)"),
                var (major, minor) => (major >= 8, $"{device}: compute capability {major}.{minor}{(major >= 8 ? "" : " (bf16 units need 8.0)")}"),
            };
        }
        var flags = CpuBf16Flags();
        return flags.Count > 0
            ? (true, $"cpu: {string.Join(", ", flags)}")
            : (false, "cpu: no avx512_bf16 or amx_bf16 in /proc/cpuinfo");
    }

    /// <summary>The precision a choice means on a device: auto becomes bf16 where the device has bf16 units.</summary>
    public static PrecisionDecision Decide(PrecisionChoice choice, Device device)
    {
        var (units, reason) = Bf16Units(device);
        var p = choice switch
        {
            PrecisionChoice.Bf16 => Precision.Bf16,
            PrecisionChoice.Fp32 => Precision.Fp32,
            _ => units ? Precision.Bf16 : Precision.Fp32,
        };
        return new PrecisionDecision(p, units, reason);
    }

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    delegate int CuInit(uint flags);

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    delegate int CuDeviceGet(out int device, int ordinal);

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    delegate int CuDeviceGetAttribute(out int value, int attribute, int device);

    /// <summary>The compute capability of CUDA device <paramref name="ordinal"/> from the driver API
    /// (cuDeviceGetAttribute, attributes 75 and 76), or null where libcuda is missing or answers with an error.</summary>
    public static (int Major, int Minor)? CudaCapability(int ordinal)
    {
        if (!NativeLibrary.TryLoad("libcuda.so.1", out var lib) && !NativeLibrary.TryLoad("libcuda.so", out lib))
            return null;
        try
        {
            T Fn<T>(string name) where T : Delegate => Marshal.GetDelegateForFunctionPointer<T>(NativeLibrary.GetExport(lib, name));
            if (Fn<CuInit>("cuInit")(0) != 0 || Fn<CuDeviceGet>("cuDeviceGet")(out var dev, ordinal) != 0)
                return null;
            var attr = Fn<CuDeviceGetAttribute>("cuDeviceGetAttribute");
            if (attr(out var major, 75, dev) != 0 || attr(out var minor, 76, dev) != 0)
                return null;
            return (major, minor);
        }
        catch (EntryPointNotFoundException)
        {
            return null;
        }
    }
}
