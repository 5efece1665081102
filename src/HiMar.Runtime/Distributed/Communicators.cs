using TorchSharp;

namespace HiMar.Runtime.Distributed;

/// <summary>How this process was started, read from the environment an MPI launcher sets.</summary>
/// <param name="Launcher">`mpirun` (Open MPI's OMPI_COMM_WORLD_* variables), `pmix` or `pmi` (a PMIx or PMI
/// launcher such as srun), or `none`.</param>
/// <param name="Rank">The world rank the launcher announced (0 without one).</param>
/// <param name="Size">The world size the launcher announced (1 without one, or when it does not say).</param>
/// <param name="LocalRank">The rank among this machine's processes.</param>
/// <param name="LocalSize">The number of this job's processes on this machine.</param>
public sealed record Launch(string Launcher, int Rank, int Size, int LocalRank, int LocalSize)
{
    /// <summary>Whether an MPI launcher started this process.</summary>
    public bool UnderMpi => Launcher != "none";

    /// <summary>Reads the launcher's variables from <paramref name="env"/> (the process environment by default).</summary>
    public static Launch Detect(Func<string, string?>? env = null)
    {
        env ??= Environment.GetEnvironmentVariable;
        int Int(string name, int fallback) => int.TryParse(env(name), out var v) ? v : fallback;
        if (env("OMPI_COMM_WORLD_SIZE") is { Length: > 0 })
        {
            return new Launch("mpirun", Int("OMPI_COMM_WORLD_RANK", 0), Int("OMPI_COMM_WORLD_SIZE", 1),
                Int("OMPI_COMM_WORLD_LOCAL_RANK", 0), Int("OMPI_COMM_WORLD_LOCAL_SIZE", 1));
        }
        if (env("PMIX_RANK") is { Length: > 0 })
        {
            var size = Int("PMIX_SIZE", Int("SLURM_NTASKS", 1));
            return new Launch("pmix", Int("PMIX_RANK", 0), size, Int("SLURM_LOCALID", 0), Int("SLURM_NTASKS_PER_NODE", size));
        }
        if (env("PMI_RANK") is { Length: > 0 } || env("PMI_SIZE") is { Length: > 0 })
        {
            var size = Int("PMI_SIZE", 1);
            return new Launch("pmi", Int("PMI_RANK", 0), size, Int("MPI_LOCALRANKID", Int("SLURM_LOCALID", 0)), Int("MPI_LOCALNRANKS", size));
        }
        return new Launch("none", 0, 1, 0, 1);
    }
}

/// <summary>
/// Picks the communicator of this process and ends it: a process started by <c>mpirun</c> (or a PMIx/PMI
/// launcher) joins <c>MPI_COMM_WORLD</c>; any other process is <see cref="SingleProcess"/> and never loads libmpi.
/// </summary>
public static class Communicators
{
    /// <summary>This process's launch, read once.</summary>
    public static Launch Launch { get; } = Launch.Detect();

    /// <summary>`auto` (MPI under an MPI launcher, otherwise single), `single`, `mpi` or `nccl` (NCCL for CUDA
    /// tensors, MPI for the rest; untested here).</summary>
    public static ICommunicator Create(string backend = "auto") => backend switch
    {
        "auto" => Launch.UnderMpi ? MpiCommunicator.World : SingleProcess.Instance,
        "single" => SingleProcess.Instance,
        "mpi" => MpiCommunicator.World,
        "nccl" => new NcclCommunicator(MpiCommunicator.World, Launch.LocalRank),
        _ => throw new ArgumentException($"unknown backend '{backend}' (auto, single, mpi or nccl)"),
    };

    /// <summary>
    /// Under an MPI launcher, and unless OMP_NUM_THREADS says otherwise, gives each of this machine's processes
    /// an equal share of its cores for libtorch's threads (as torchrun does), so N ranks do not run N x cores
    /// threads. Returns the thread count in use.
    /// </summary>
    public static int ShareCores()
    {
        if (Launch.UnderMpi && Launch.LocalSize > 1 && string.IsNullOrEmpty(Environment.GetEnvironmentVariable("OMP_NUM_THREADS")))
            torch.set_num_threads(Math.Max(1, Environment.ProcessorCount / Launch.LocalSize));
        return torch.get_num_threads();
    }

    /// <summary>
    /// Ends MPI at process exit when it was started: <c>MPI_Finalize</c> after success, <c>MPI_Abort</c> with the
    /// exit code after a failure (so the other ranks, perhaps waiting in a collective, end too). Call it once,
    /// last, with the code the process will exit with; nothing happens in a process that never started MPI.
    /// </summary>
    public static void Finish(int exitCode)
    {
        if (!MpiCommunicator.Started)
            return;
        var world = MpiCommunicator.World;
        if (exitCode == 0 || world.Size == 1)
            world.FinalizeWorld();
        else
            world.Abort(exitCode);
    }
}
