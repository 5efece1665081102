using System.Diagnostics;
using System.Text.Json.Nodes;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Distributed;

/// <summary>
/// `himar bench allreduce`: the time of one in-place float32 all-reduce (sum) of each buffer size over the ranks
/// of the communicator, and the bandwidths NCCL's tests report: algorithm bandwidth (bytes / time) and bus
/// bandwidth (algorithm bandwidth x 2 (n - 1) / n, the bytes each rank moves in a ring all-reduce, comparable
/// across rank counts). Every rank runs it; the times are the slowest rank's medians.
/// </summary>
public static class AllReduceBenchmark
{
    /// <summary>The default buffer sizes: 4 KiB to 64 MiB (25 MiB is the gradient bucket size).</summary>
    public static readonly IReadOnlyList<long> DefaultSizes = [4L << 10, 64L << 10, 1L << 20, 4L << 20, 25L << 20, 64L << 20];

    /// <summary>Times <paramref name="repeat"/> all-reduces per size after <paramref name="warmup"/> untimed ones (collective: every rank calls it).</summary>
    public static JsonObject Run(ICommunicator comm, IReadOnlyList<long> sizes, int repeat = 20, int warmup = 3, string device = "cpu")
    {
        var rows = new JsonArray();
        var dev = torch.device(device);
        foreach (var bytes in sizes)
        {
            var count = Math.Max(1, bytes / sizeof(float));
            using var buffer = torch.ones(count, dtype: ScalarType.Float32, device: dev);
            var times = new double[Math.Max(1, repeat)];
            for (var i = 0; i < warmup + times.Length; i++)
            {
                buffer.fill_(1);
                comm.Barrier();
                var sw = Stopwatch.StartNew();
                comm.AllReduceSum(buffer);
                if (dev.type == DeviceType.CUDA)
                    torch.cuda.synchronize();
                if (i >= warmup)
                    times[i - warmup] = sw.Elapsed.TotalSeconds;
            }
            // Ones summed over the ranks: every element must be the rank count (a check that the data moved).
            using var wrong = buffer.ne(comm.Size).sum().to(DeviceType.CPU);
            var ok = wrong.item<long>() == 0;
            Array.Sort(times);
            Span<double> median = [times[times.Length / 2]];
            Span<double> slowest = [median[0]];
            Max(comm, slowest);
            var seconds = slowest[0];
            var actual = count * sizeof(float);
            // One rank moves nothing (the call returns at once): no bandwidth to report.
            double? algBw = seconds > 0 && comm.Size > 1 ? actual / seconds / 1e9 : null;
            rows.Add(new JsonObject
            {
                ["bytes"] = actual,
                ["seconds"] = seconds,
                ["algbw_gb_per_s"] = algBw,
                ["busbw_gb_per_s"] = algBw * 2.0 * (comm.Size - 1) / comm.Size,
                ["result_correct"] = ok,
            });
        }
        return new JsonObject
        {
            ["benchmark"] = "allreduce",
            ["backend"] = comm.Backend,
            ["ranks"] = comm.Size,
            ["device"] = device,
            ["dtype"] = "float32",
            ["repeats"] = Math.Max(1, repeat),
            ["sizes"] = rows,
        };
    }

    /// <summary>The maximum of one value per rank, on every rank (gathered as a sum of one-hot slots).</summary>
    public static void Max(ICommunicator comm, Span<double> value)
    {
        if (comm.Size == 1)
            return;
        var slots = new double[comm.Size * value.Length];
        for (var i = 0; i < value.Length; i++)
            slots[comm.Rank * value.Length + i] = value[i];
        comm.AllReduceSum(slots);
        for (var i = 0; i < value.Length; i++)
        {
            var m = double.NegativeInfinity;
            for (var r = 0; r < comm.Size; r++)
                m = Math.Max(m, slots[r * value.Length + i]);
            value[i] = m;
        }
    }
}
