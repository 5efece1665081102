namespace HiMar.Runtime.Serving;

/// <summary>
/// One generation at a time for a model, with a few more waiting: a request takes a place
/// (<see cref="TryEnter"/>, refused when every place is taken), waits its turn, runs on a thread of its own, and
/// gives the place back when it has finished or been cancelled.
/// </summary>
public sealed class GenerationQueue(int waiting)
{
    readonly SemaphoreSlim gate = new(1, 1);
    int pending;
    int completed;
    int cancelled;

    /// <summary>Places in all: the running job and <c>waiting</c> more.</summary>
    public int Capacity { get; } = 1 + Math.Max(0, waiting);

    /// <summary>Jobs running or waiting now.</summary>
    public int Pending => Volatile.Read(ref pending);

    /// <summary>Jobs that ran to the end.</summary>
    public int Completed => Volatile.Read(ref completed);

    /// <summary>Jobs cancelled while waiting or running.</summary>
    public int Cancelled => Volatile.Read(ref cancelled);

    /// <summary>Takes a place; null when the queue is full.</summary>
    public Ticket? TryEnter()
    {
        if (Interlocked.Increment(ref pending) > Capacity)
        {
            Interlocked.Decrement(ref pending);
            return null;
        }
        return new Ticket(this);
    }

    /// <summary>A place in the queue; disposing it gives the place back.</summary>
    public sealed class Ticket : IDisposable
    {
        readonly GenerationQueue queue;
        int released;

        internal Ticket(GenerationQueue queue) => this.queue = queue;

        /// <summary>
        /// Waits for the running job to finish, then runs <paramref name="work"/> on a thread of its own. The work
        /// must watch <paramref name="token"/> itself; a cancellation while waiting never starts it.
        /// </summary>
        public async Task<T> RunAsync<T>(Func<T> work, CancellationToken token)
        {
            try
            {
                await queue.gate.WaitAsync(token).ConfigureAwait(false);
            }
            catch (OperationCanceledException)
            {
                Interlocked.Increment(ref queue.cancelled);
                throw;
            }
            try
            {
                var result = await Task.Factory.StartNew(work, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default).ConfigureAwait(false);
                Interlocked.Increment(ref queue.completed);
                return result;
            }
            catch (OperationCanceledException)
            {
                Interlocked.Increment(ref queue.cancelled);
                throw;
            }
            finally
            {
                queue.gate.Release();
            }
        }

        /// <summary>Gives the place back (once).</summary>
        public void Dispose()
        {
            if (Interlocked.Exchange(ref released, 1) == 0)
                Interlocked.Decrement(ref queue.pending);
        }
    }
}
