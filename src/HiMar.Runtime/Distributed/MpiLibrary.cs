using System.Runtime.InteropServices;
using System.Text;

namespace HiMar.Runtime.Distributed;

/// <summary>MPI failed: the library could not be found or loaded, or a call returned an error.</summary>
public sealed class MpiException(string message, Exception? inner = null) : EnvironmentException(message, inner);

/// <summary>
/// Thin bindings to Open MPI's C API (libmpi.so.40), loaded at run time through <see cref="NativeLibrary"/>, so a
/// build without MPI installed works and single-process runs never touch it. Open MPI's predefined handles are
/// exported data symbols and a handle is the symbol's ADDRESS (in mpi.h, <c>MPI_COMM_WORLD</c> is
/// <c>&amp;ompi_mpi_comm_world</c>, <c>MPI_FLOAT</c> is <c>&amp;ompi_mpi_float</c>), which is what
/// <see cref="NativeLibrary.GetExport"/> returns. MPICH-family libraries (integer handles) are not supported.
/// </summary>
public sealed unsafe class MpiLibrary
{
    /// <summary><c>MPI_THREAD_SINGLE</c>..<c>MPI_THREAD_MULTIPLE</c>, as Open MPI numbers them.</summary>
    public const int ThreadSingle = 0, ThreadFunneled = 1, ThreadSerialized = 2, ThreadMultiple = 3;

    /// <summary><c>MPI_IN_PLACE</c> in Open MPI: <c>(void *) 1</c>.</summary>
    public static readonly IntPtr InPlace = 1;

    const int MaxString = 256; // MPI_MAX_ERROR_STRING and MPI_MAX_LIBRARY_VERSION_STRING in Open MPI 4 and 5

    readonly delegate* unmanaged<int*, byte***, int, int*, int> initThread;
    readonly delegate* unmanaged<int*, int> initialized;
    readonly delegate* unmanaged<int*, int> finalized;
    readonly delegate* unmanaged<int> finalize;
    readonly delegate* unmanaged<IntPtr, int*, int> commRank;
    readonly delegate* unmanaged<IntPtr, int*, int> commSize;
    readonly delegate* unmanaged<IntPtr, IntPtr, int, IntPtr, IntPtr, IntPtr, int> allreduce;
    readonly delegate* unmanaged<IntPtr, int, IntPtr, int, IntPtr, int> bcast;
    readonly delegate* unmanaged<IntPtr, int> barrier;
    readonly delegate* unmanaged<IntPtr, IntPtr*, int> ibarrier;
    readonly delegate* unmanaged<IntPtr*, int*, IntPtr, int> test;
    readonly delegate* unmanaged<IntPtr, int, int> abort;
    readonly delegate* unmanaged<int, byte*, int*, int> errorString;
    readonly delegate* unmanaged<byte*, int*, int> libraryVersion;

    MpiLibrary(IntPtr handle, string path)
    {
        Handle = handle;
        Path = path;
        IntPtr F(string name) => NativeLibrary.TryGetExport(handle, name, out var p) ? p : throw new MpiException($"{path} does not export {name}.");
        initThread = (delegate* unmanaged<int*, byte***, int, int*, int>)F("MPI_Init_thread");
        initialized = (delegate* unmanaged<int*, int>)F("MPI_Initialized");
        finalized = (delegate* unmanaged<int*, int>)F("MPI_Finalized");
        finalize = (delegate* unmanaged<int>)F("MPI_Finalize");
        commRank = (delegate* unmanaged<IntPtr, int*, int>)F("MPI_Comm_rank");
        commSize = (delegate* unmanaged<IntPtr, int*, int>)F("MPI_Comm_size");
        allreduce = (delegate* unmanaged<IntPtr, IntPtr, int, IntPtr, IntPtr, IntPtr, int>)F("MPI_Allreduce");
        bcast = (delegate* unmanaged<IntPtr, int, IntPtr, int, IntPtr, int>)F("MPI_Bcast");
        barrier = (delegate* unmanaged<IntPtr, int>)F("MPI_Barrier");
        ibarrier = (delegate* unmanaged<IntPtr, IntPtr*, int>)F("MPI_Ibarrier");
        test = (delegate* unmanaged<IntPtr*, int*, IntPtr, int>)F("MPI_Test");
        abort = (delegate* unmanaged<IntPtr, int, int>)F("MPI_Abort");
        errorString = (delegate* unmanaged<int, byte*, int*, int>)F("MPI_Error_string");
        libraryVersion = (delegate* unmanaged<byte*, int*, int>)F("MPI_Get_library_version");
        CommWorld = F("ompi_mpi_comm_world");
        Float = F("ompi_mpi_float");
        Double = F("ompi_mpi_double");
        Byte = F("ompi_mpi_byte");
        OpSum = F("ompi_mpi_op_sum");
    }

    /// <summary>The library handle.</summary>
    public IntPtr Handle { get; }

    /// <summary>The file or name the library was loaded from.</summary>
    public string Path { get; }

    /// <summary><c>MPI_COMM_WORLD</c>.</summary>
    public IntPtr CommWorld { get; }

    /// <summary><c>MPI_FLOAT</c>.</summary>
    public IntPtr Float { get; }

    /// <summary><c>MPI_DOUBLE</c>.</summary>
    public IntPtr Double { get; }

    /// <summary><c>MPI_BYTE</c>.</summary>
    public IntPtr Byte { get; }

    /// <summary><c>MPI_SUM</c>.</summary>
    public IntPtr OpSum { get; }

    /// <summary>Where libmpi is looked for, in order: <c>HIMAR_MPI_LIBRARY</c> (a file), the loader's own search
    /// (<c>libmpi.so.40</c>, <c>libmpi.so</c>: LD_LIBRARY_PATH and the system's library cache), then the
    /// <c>lib</c> folder of <c>OPAL_PREFIX</c> and of the <c>mpirun</c> found on PATH.</summary>
    public static IReadOnlyList<string> Candidates()
    {
        var list = new List<string>();
        if (Environment.GetEnvironmentVariable("HIMAR_MPI_LIBRARY") is { Length: > 0 } explicitPath)
            list.Add(explicitPath);
        list.Add("libmpi.so.40");
        list.Add("libmpi.so");
        var prefixes = new List<string>();
        if (Environment.GetEnvironmentVariable("OPAL_PREFIX") is { Length: > 0 } opal)
            prefixes.Add(opal);
        foreach (var dir in (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries))
        {
            if (File.Exists(System.IO.Path.Combine(dir, "mpirun")))
            {
                var parent = Directory.GetParent(System.IO.Path.GetFullPath(dir));
                if (parent != null)
                    prefixes.Add(parent.FullName);
            }
        }
        foreach (var prefix in prefixes.Distinct())
            list.Add(System.IO.Path.Combine(prefix, "lib", "libmpi.so.40"));
        return list;
    }

    /// <summary>Loads the first candidate that is Open MPI; the exception names every place tried.</summary>
    public static MpiLibrary Load()
    {
        var tried = new List<string>();
        foreach (var name in Candidates())
        {
            if (!NativeLibrary.TryLoad(name, out var handle))
            {
                tried.Add($"{name} (not found)");
                continue;
            }
            if (!NativeLibrary.TryGetExport(handle, "ompi_mpi_comm_world", out _))
            {
                tried.Add($"{name} (not Open MPI)");
                continue;
            }
            return new MpiLibrary(handle, name);
        }
        throw new MpiException(
            $"this process was started by an MPI launcher, but no Open MPI library loaded (tried {string.Join(", ", tried)}); install Open MPI (`apt-get install openmpi-bin libopenmpi-dev`) or set HIMAR_MPI_LIBRARY to libmpi.so.40.");
    }

    /// <summary>Throws <see cref="MpiException"/> naming the call and MPI's message when <paramref name="rc"/> is not MPI_SUCCESS.</summary>
    public void Check(int rc, string what)
    {
        if (rc != 0)
            throw new MpiException($"{what} failed: {ErrorString(rc)} (error {rc}).");
    }

    /// <summary>MPI's text for an error code.</summary>
    public string ErrorString(int code)
    {
        var buffer = stackalloc byte[MaxString + 1];
        int length;
        return errorString(code, buffer, &length) == 0 ? Encoding.UTF8.GetString(buffer, Math.Clamp(length, 0, MaxString)) : "unknown MPI error";
    }

    /// <summary><c>MPI_Get_library_version</c>: the library's own description (first line).</summary>
    public string LibraryVersion()
    {
        var buffer = stackalloc byte[MaxString + 1];
        int length;
        if (libraryVersion(buffer, &length) != 0)
            return "unknown";
        var text = Encoding.UTF8.GetString(buffer, Math.Clamp(length, 0, MaxString));
        return text.Split('\n', 2)[0].Trim().TrimEnd(',');
    }

    /// <summary><c>MPI_Initialized</c>.</summary>
    public bool IsInitialized()
    {
        int flag;
        Check(initialized(&flag), "MPI_Initialized");
        return flag != 0;
    }

    /// <summary><c>MPI_Finalized</c>.</summary>
    public bool IsFinalized()
    {
        int flag;
        Check(finalized(&flag), "MPI_Finalized");
        return flag != 0;
    }

    /// <summary><c>MPI_Init_thread(NULL, NULL, required, &amp;provided)</c>; returns the provided level.</summary>
    public int InitThread(int required)
    {
        int provided;
        Check(initThread(null, null, required, &provided), "MPI_Init_thread");
        return provided;
    }

    /// <summary><c>MPI_Finalize</c>.</summary>
    public void FinalizeMpi() => Check(finalize(), "MPI_Finalize");

    /// <summary><c>MPI_Comm_rank</c>.</summary>
    public int CommRank(IntPtr comm)
    {
        int rank;
        Check(commRank(comm, &rank), "MPI_Comm_rank");
        return rank;
    }

    /// <summary><c>MPI_Comm_size</c>.</summary>
    public int CommSize(IntPtr comm)
    {
        int size;
        Check(commSize(comm, &size), "MPI_Comm_size");
        return size;
    }

    /// <summary><c>MPI_Allreduce(send, recv, count, type, op, comm)</c> (send may be <see cref="InPlace"/>).</summary>
    public void Allreduce(IntPtr send, IntPtr recv, int count, IntPtr type, IntPtr op, IntPtr comm) =>
        Check(allreduce(send, recv, count, type, op, comm), "MPI_Allreduce");

    /// <summary><c>MPI_Bcast(buffer, count, type, root, comm)</c>.</summary>
    public void Bcast(IntPtr buffer, int count, IntPtr type, int root, IntPtr comm) =>
        Check(bcast(buffer, count, type, root, comm), "MPI_Bcast");

    /// <summary><c>MPI_Barrier</c>.</summary>
    public void Barrier(IntPtr comm) => Check(barrier(comm), "MPI_Barrier");

    /// <summary><c>MPI_Ibarrier</c>, then <c>MPI_Test</c> every <paramref name="poll"/> until every rank has
    /// arrived: a barrier that sleeps instead of spinning (MPI requests are pointers in Open MPI;
    /// <c>MPI_STATUS_IGNORE</c> is null).</summary>
    public void SleepingBarrier(IntPtr comm, TimeSpan poll)
    {
        IntPtr request;
        Check(ibarrier(comm, &request), "MPI_Ibarrier");
        while (true)
        {
            int done;
            Check(test(&request, &done, IntPtr.Zero), "MPI_Test");
            if (done != 0)
                return;
            Thread.Sleep(poll);
        }
    }

    /// <summary><c>MPI_Abort</c>: ends every process of the job.</summary>
    public void Abort(IntPtr comm, int code) => abort(comm, code);
}
