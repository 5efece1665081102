using System.Runtime;

namespace HiMar.Runtime.Native;

/// <summary>
/// Holds the garbage collector off for a stretch of libtorch calls (one sampler step, one training step).
/// <para>
/// Why: TorchSharp passes libtorch the handle of Scalars it makes itself (<c>a + b</c> passes alpha = 1 and
/// <c>x * 0.5</c> passes 0.5 as new Scalar objects) and holds no reference to them while the native call runs. A
/// collection started during that call by another thread (the test runner's, a progress bar's) may find such a
/// Scalar unreachable; its finalizer then frees the native value while libtorch still reads it. That is the
/// intermittent "Unknown scalar type", "Expected false to be true" (Scalar::toDouble) and segmentation fault seen
/// in training runs and test runs. Inside a pause no collection runs (<see cref="GC.TryStartNoGCRegion(long)"/>),
/// from any thread, unless the stretch allocates more than its budget; collections happen between pauses, where the
/// pausing thread is in managed code and has no libtorch call in flight. Our own code holds the Scalars it makes
/// (<c>using</c>); this covers the ones made inside TorchSharp, which we cannot hold.
/// </para>
/// Pauses nest (only the outermost one holds the collector) and may be taken from several threads: the collector
/// runs again when the last one ends.
/// </summary>
public static class GcPause
{
    /// <summary>The managed allocations a pause allows before the collector runs anyway (a step allocates a few MB).</summary>
    public const long DefaultBudget = 32L << 20;

    static readonly object Gate = new();
    static int depth;
    static bool holding;
    static long lapses;

    /// <summary>Pauses that outlived their budget (the collector ran inside them): a sign the budget is too small.</summary>
    public static long Lapses => Interlocked.Read(ref lapses);

    /// <summary>Whether the collector is held off now.</summary>
    public static bool Holding => GCSettings.LatencyMode == GCLatencyMode.NoGCRegion;

    /// <summary>Starts a pause; dispose the result to end it.</summary>
    public static Scope Begin(long budget = DefaultBudget)
    {
        lock (Gate)
        {
            depth++;
            // The outermost pause starts the region; an inner one restarts it when an earlier stretch outgrew it.
            if (!Holding)
            {
                if (holding)
                    Interlocked.Increment(ref lapses);
                try
                {
                    holding = GC.TryStartNoGCRegion(budget);
                }
                catch (ArgumentOutOfRangeException)
                {
                    holding = false; // a budget above what this runtime allows: run without a pause
                }
            }
        }
        return new Scope(true);
    }

    static void End()
    {
        lock (Gate)
        {
            if (--depth > 0 || !holding)
                return;
            holding = false;
            if (!Holding)
            {
                Interlocked.Increment(ref lapses); // the budget ran out and the collector ran: the region is gone
                return;
            }
            try
            {
                GC.EndNoGCRegion();
            }
            catch (InvalidOperationException)
            {
                Interlocked.Increment(ref lapses); // allocated past the budget or collected explicitly in the stretch
            }
        }
    }

    /// <summary>One pause; ends when disposed (a default value ends nothing).</summary>
    public readonly struct Scope(bool open) : IDisposable
    {
        readonly bool open = open;

        /// <summary>Ends the pause.</summary>
        public void Dispose()
        {
            if (open)
                End();
        }
    }
}
