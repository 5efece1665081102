namespace HiMar.Runtime;

/// <summary>What kind of failure ended a command; each kind has one documented process exit code.</summary>
public enum FailureKind
{
    /// <summary>A flag, config field, prompt or input file is wrong (exit code 2).</summary>
    BadInput = 2,

    /// <summary>The environment cannot do the job: libtorch, the device, MPI (exit code 3).</summary>
    Environment = 3,

    /// <summary>A computation produced NaN or infinity (exit code 4).</summary>
    Numerical = 4,

    /// <summary>Reading or writing files failed: disk full, permissions (exit code 5).</summary>
    Storage = 5,
}

/// <summary>
/// The root of the failures himar knows how to explain: the message is one line naming the file, flag or field and
/// the problem, and <see cref="Kind"/> says which exit code the command line returns.
/// </summary>
public abstract class HiMarException(string message, Exception? inner = null) : Exception(message, inner)
{
    /// <summary>The kind of failure, which fixes the exit code.</summary>
    public abstract FailureKind Kind { get; }

    /// <summary>The process exit code for this failure.</summary>
    public int ExitCode => (int)Kind;
}

/// <summary>Bad input: a flag, config field, prompt or file that cannot be used as given (exit code 2).</summary>
public class BadInputException(string message, Exception? inner = null) : HiMarException(message, inner)
{
    /// <inheritdoc />
    public override FailureKind Kind => FailureKind.BadInput;
}

/// <summary>The environment cannot do the job: libtorch, the device or MPI (exit code 3).</summary>
public class EnvironmentException(string message, Exception? inner = null) : HiMarException(message, inner)
{
    /// <inheritdoc />
    public override FailureKind Kind => FailureKind.Environment;
}

/// <summary>A computation produced NaN or infinity (exit code 4).</summary>
public class NumericalException(string message, Exception? inner = null) : HiMarException(message, inner)
{
    /// <inheritdoc />
    public override FailureKind Kind => FailureKind.Numerical;
}

/// <summary>Reading or writing files failed for a reason outside the input: disk full, permissions (exit code 5).</summary>
public class StorageException(string message, Exception? inner = null) : HiMarException(message, inner)
{
    /// <inheritdoc />
    public override FailureKind Kind => FailureKind.Storage;
}
