using System.Diagnostics;
using System.Reflection;
using TorchSharp;

namespace HiMar.Runtime.Native;

/// <summary>libtorch could not be loaded; <see cref="Exception.Message"/> is one sentence saying why and how to fix it.</summary>
public sealed class TorchLoadException(string message, Exception? inner = null) : EnvironmentException(message, inner);

/// <summary>Where the TorchSharp glue library is, and what its libstdc++ version needs look like.</summary>
/// <param name="Path">The `libLibTorchSharp.so` this process would load, or null if none was found.</param>
/// <param name="WeakenedNeeds">Versions whose need was marked weak by the build's patch.</param>
/// <param name="MissingNeeds">Non-weak needs that the system libstdc++ does not define: these stop the load.</param>
/// <param name="SystemLibStdCxx">The system libstdc++ compared against, or null.</param>
public sealed record GlueLibraryReport(
    string? Path,
    IReadOnlyList<string> WeakenedNeeds,
    IReadOnlyList<string> MissingNeeds,
    string? SystemLibStdCxx)
{
    /// <summary>Whether the build's patch is present in the loaded copy.</summary>
    public bool PatchApplied => WeakenedNeeds.Count > 0;
}

/// <summary>Facts about the tensor engine, as `himar info` prints them.</summary>
/// <param name="TorchSharpVersion">TorchSharp's assembly version.</param>
/// <param name="LibTorchVersion">libtorch's version as TorchSharp reports it.</param>
/// <param name="DotNetVersion">The .NET runtime.</param>
/// <param name="Devices">Usable devices, `cpu` first.</param>
/// <param name="Threads">libtorch's intra-op thread count.</param>
/// <param name="Glue">What the glue library's version needs look like.</param>
/// <param name="WaitPolicy">OpenMP's wait policy as libtorch read it (see <see cref="TorchNative.WaitPolicy"/>).</param>
/// <param name="LogLevel">The least severity libtorch's own log prints (see <see cref="TorchNative.LogLevel"/>).</param>
public sealed record EngineInfo(
    string TorchSharpVersion,
    string LibTorchVersion,
    string DotNetVersion,
    IReadOnlyList<string> Devices,
    int Threads,
    GlueLibraryReport Glue,
    WaitPolicyReport WaitPolicy,
    LogLevelReport LogLevel);

/// <summary>The least severity that libtorch's own log (c10's `[W... file:line]` lines on stderr) prints.</summary>
/// <param name="Value">INFO, WARNING, ERROR or FATAL; `unknown` where libc10 does not export its level.</param>
/// <param name="SetByHimar">True when himar raised it to ERROR (TORCH_CPP_LOG_LEVEL unset, or not a level).</param>
/// <param name="Ignored">A TORCH_CPP_LOG_LEVEL value that names no level, which himar ignored; null otherwise.</param>
public sealed record LogLevelReport(string Value, bool SetByHimar, string? Ignored = null);

/// <summary>OpenMP's wait policy for libtorch's threads: its value and who chose it.</summary>
/// <param name="Value">The value of OMP_WAIT_POLICY in the native environment (PASSIVE, ACTIVE, ...).</param>
/// <param name="SetByHimar">True when himar set it (the variable was unset when libtorch loaded).</param>
public sealed record WaitPolicyReport(string Value, bool SetByHimar);

/// <summary>Loads libtorch once, turning TorchSharp's long loader trace into one actionable sentence.</summary>
public static class TorchNative
{
    static readonly object Gate = new();
    static bool loaded;
    static bool waitPolicySet;
    static bool logLevelSet;
    static string? logLevelIgnored;
    static IntPtr logLevelFlag;

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "setenv")]
    static extern int SetEnv(string name, string value, int overwrite);

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "getenv")]
    static extern IntPtr GetEnv(string name);

    /// <summary>
    /// OMP_WAIT_POLICY as the native environment holds it, and whether himar chose it. Before loading libtorch,
    /// himar sets it to PASSIVE where it is unset: libgomp's default lets idle threads spin, and on a machine whose
    /// cores other work also uses, two spinning threads halved a fashion training run's speed here (20 against 41
    /// images/s with one core busy), while on a quiet machine PASSIVE trained as fast. A value the user set is kept.
    /// .NET's Environment.SetEnvironmentVariable does not reach the C environment that libgomp reads, hence setenv.
    /// </summary>
    public static WaitPolicyReport WaitPolicy()
    {
        if (!OperatingSystem.IsLinux() && !OperatingSystem.IsMacOS())
            return new WaitPolicyReport(Environment.GetEnvironmentVariable("OMP_WAIT_POLICY") ?? "(unset)", false);
        var p = GetEnv("OMP_WAIT_POLICY");
        var value = p == IntPtr.Zero ? "(unset)" : System.Runtime.InteropServices.Marshal.PtrToStringAnsi(p) ?? "(unset)";
        return new WaitPolicyReport(value, waitPolicySet);
    }

    static void ChooseWaitPolicy()
    {
        if (!OperatingSystem.IsLinux() && !OperatingSystem.IsMacOS())
            return;
        if (GetEnv("OMP_WAIT_POLICY") == IntPtr.Zero && SetEnv("OMP_WAIT_POLICY", "PASSIVE", 0) == 0)
            waitPolicySet = true;
    }

    static readonly string[] LogLevelNames = ["INFO", "WARNING", "ERROR", "FATAL"];

    /// <summary>
    /// libtorch's log level as it stands, and whether himar chose it. After loading libtorch, himar raises it from
    /// WARNING to ERROR where TORCH_CPP_LOG_LEVEL is unset: on a CPU where NNPACK cannot start, libtorch writes
    /// "Could not initialize NNPACK! Reason: Unsupported hardware." on every convolution (the VAE's, the
    /// classifier's), burying the one line a command prints on failure and flooding every progress bar; these
    /// warnings say nothing a user can act on (libtorch falls back to its own kernels). Errors still print;
    /// TORCH_CPP_LOG_LEVEL=WARNING (or INFO) brings the warnings back. The level is c10's exported
    /// FLAGS_caffe2_log_level, which its logger compares each message's severity against.
    /// </summary>
    public static LogLevelReport LogLevel()
    {
        lock (Gate)
        {
            if (logLevelFlag == IntPtr.Zero)
                return new LogLevelReport("unknown", false);
            var v = System.Runtime.InteropServices.Marshal.ReadInt32(logLevelFlag);
            return new LogLevelReport(v >= 0 && v < LogLevelNames.Length ? LogLevelNames[v] : v.ToString(System.Globalization.CultureInfo.InvariantCulture), logLevelSet, logLevelIgnored);
        }
    }

    /// <summary>
    /// The handle of one of libtorch's libraries (libc10.so, libtorch_cpu.so), which are loaded by the time libtorch
    /// is: loading one again, by its path beside the glue library or by its soname, returns the loaded copy.
    /// </summary>
    internal static bool TryLoadLibTorchPart(string name, string? gluePath, out IntPtr handle)
    {
        var path = gluePath == null ? null : System.IO.Path.Combine(System.IO.Path.GetDirectoryName(gluePath)!, name);
        handle = IntPtr.Zero;
        return (path != null && System.Runtime.InteropServices.NativeLibrary.TryLoad(path, out handle))
            || System.Runtime.InteropServices.NativeLibrary.TryLoad(name, out handle);
    }

    static void ChooseLogLevel(string? gluePath)
    {
        if (!OperatingSystem.IsLinux() && !OperatingSystem.IsMacOS())
            return;
        if (!TryLoadLibTorchPart("libc10.so", gluePath, out var lib)
            || !System.Runtime.InteropServices.NativeLibrary.TryGetExport(lib, "FLAGS_caffe2_log_level", out var flag))
            return;
        logLevelFlag = flag;
        var env = GetEnv("TORCH_CPP_LOG_LEVEL");
        if (env != IntPtr.Zero)
        {
            // The user's choice, applied here too: libtorch reads the variable only where its Python module starts.
            var text = (System.Runtime.InteropServices.Marshal.PtrToStringAnsi(env) ?? "").Trim().ToUpperInvariant();
            var level = Array.IndexOf(LogLevelNames, text);
            if (level < 0 && int.TryParse(text, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out var n) && n < LogLevelNames.Length)
                level = n;
            if (level >= 0)
            {
                System.Runtime.InteropServices.Marshal.WriteInt32(flag, level);
                return;
            }
            // Not a level: ignored, as if unset (`himar info` names the value).
            logLevelIgnored = text;
        }
        if (System.Runtime.InteropServices.Marshal.ReadInt32(flag) < 2)
        {
            System.Runtime.InteropServices.Marshal.WriteInt32(flag, 2);
            logLevelSet = true;
        }
    }

    /// <summary>The `libLibTorchSharp.so` beside the application (as the build lays it out), or null.</summary>
    public static string? FindGlueLibrary()
    {
        var roots = new[] { AppContext.BaseDirectory, System.IO.Path.GetDirectoryName(typeof(torch).Assembly.Location) ?? "" };
        foreach (var root in roots.Where(r => r.Length > 0).Distinct())
        {
            foreach (var rel in new[] { "runtimes/linux-x64/native/libLibTorchSharp.so", "runtimes/linux-arm64/native/libLibTorchSharp.so", "libLibTorchSharp.so" })
            {
                var p = System.IO.Path.Combine(root, rel);
                if (File.Exists(p))
                    return p;
            }
        }
        return null;
    }

    /// <summary>Reads the glue library's libstdc++ needs and compares them with the system's libstdc++.</summary>
    public static GlueLibraryReport InspectGlueLibrary()
    {
        var path = FindGlueLibrary();
        var system = OperatingSystem.IsLinux() ? ElfVersions.FindSystemLibStdCxx() : null;
        if (path == null || !OperatingSystem.IsLinux())
            return new GlueLibraryReport(path, [], [], system);
        try
        {
            var needs = ElfVersions.ReadNeeds(path).Where(n => n.Library.StartsWith("libstdc++", StringComparison.Ordinal)).ToList();
            var defined = system == null ? new HashSet<string>() : ElfVersions.ReadDefinitions(system).ToHashSet();
            var weak = needs.Where(n => n.IsWeak).Select(n => n.Version).ToList();
            var missing = system == null ? [] : needs.Where(n => !n.IsWeak && !defined.Contains(n.Version)).Select(n => n.Version).ToList();
            return new GlueLibraryReport(path, weak, missing, system);
        }
        catch (Exception e) when (e is IOException or InvalidDataException or UnauthorizedAccessException)
        {
            return new GlueLibraryReport(path, [], [], system);
        }
    }

    /// <summary>
    /// Makes sure libtorch is loaded, or throws <see cref="TorchLoadException"/> with one sentence saying why
    /// and how to fix it. Safe to call many times.
    /// </summary>
    public static void EnsureLoaded()
    {
        lock (Gate)
        {
            if (loaded)
                return;
            var glue = InspectGlueLibrary();
            if (glue.MissingNeeds.Count > 0)
                throw new TorchLoadException(
                    $"libtorch cannot load: {glue.Path} needs {string.Join(", ", glue.MissingNeeds)} from libstdc++, which {glue.SystemLibStdCxx} lacks; " +
                    "rebuild with `dotnet build` (the build marks that need weak in its output folder) or install a libstdc++ from GCC 13 or newer.");
            // Before libtorch (and its OpenMP runtime, which reads the variable once) is loaded.
            ChooseWaitPolicy();
            try
            {
                // Load the glue library from the build's folder by its full path first. Hosts without this
                // application's deps.json (F# Interactive, notebooks) would otherwise make TorchSharp copy the
                // unpatched libraries out of the NuGet cache; with this, its by-name load finds the loaded
                // copy by its soname. Its libtorch dependencies come from the same folder ($ORIGIN runpath).
                if (glue.Path != null && OperatingSystem.IsLinux())
                    System.Runtime.InteropServices.NativeLibrary.Load(glue.Path);
                torch.InitializeDeviceType(DeviceType.CPU);
                ChooseLogLevel(glue.Path);
                using var probe = torch.ones(1);
                loaded = true;
            }
            catch (Exception e) when (e is NotSupportedException or DllNotFoundException or TypeInitializationException or EntryPointNotFoundException or BadImageFormatException)
            {
                var where = glue.Path ?? "no libLibTorchSharp.so beside the application";
                throw new TorchLoadException(
                    $"libtorch cannot load ({where}): {FirstLine(e)}; reference a backend package (TorchSharp-cpu, or TorchSharp-cuda-linux with -p:TorchBackend=cuda) from the executable and rebuild.",
                    e);
            }
        }
    }

    static string FirstLine(Exception e)
    {
        var inner = e;
        while (inner.InnerException != null && inner is TypeInitializationException)
            inner = inner.InnerException;
        var line = inner.Message.Split('\n', 2)[0].Trim();
        return line.Length > 200 ? line[..200] + "..." : line;
    }

    /// <summary>Versions, devices, threads and the patch state; loads libtorch first.</summary>
    public static EngineInfo Describe()
    {
        EnsureLoaded();
        var tsAssembly = typeof(torch).Assembly;
        var tsVersion = tsAssembly.GetCustomAttribute<AssemblyInformationalVersionAttribute>()?.InformationalVersion
            ?? tsAssembly.GetName().Version?.ToString() ?? "unknown";
        tsVersion = tsVersion.Split('+')[0];
        var devices = new List<string> { "cpu" };
        if (torch.cuda.is_available())
            for (var i = 0; i < torch.cuda.device_count(); i++)
                devices.Add($"cuda:{i}");
        return new EngineInfo(tsVersion, torch.__version__, Environment.Version.ToString(), devices, torch.get_num_threads(), InspectGlueLibrary(), WaitPolicy(), LogLevel());
    }

    /// <summary>
    /// Multiplies square matrices of <paramref name="dtype"/> (fp32 by default) for about <paramref name="seconds"/>
    /// and returns the achieved GFLOP/s (2 n^3 floating-point operations per product).
    /// </summary>
    public static double MatmulGflops(double seconds = 2.0, long n = 1024, torch.Device? device = null, torch.ScalarType dtype = torch.ScalarType.Float32)
    {
        EnsureLoaded();
        device ??= torch.CPU;
        using var scope = torch.NewDisposeScope();
        var a = torch.randn(n, n, device: device).to(dtype);
        var b = torch.randn(n, n, device: device).to(dtype);
        torch.matmul(a, b).Dispose(); // warm-up
        long count = 0;
        var sw = Stopwatch.StartNew();
        while (sw.Elapsed.TotalSeconds < seconds)
        {
            using var c = torch.matmul(a, b);
            if (device.type == DeviceType.CUDA)
                torch.cuda.synchronize();
            count++;
        }
        return 2.0 * n * n * n * count / sw.Elapsed.TotalSeconds / 1e9;
    }
}
