using System.Diagnostics;
using System.Reflection;
using System.Text;

namespace HiMar.Runtime;

/// <summary>
/// The command line's error boundary: turns any exception into one line for standard error and an exit code.
/// Known failures (<see cref="HiMarException"/>, missing or unreadable input files, a full disk, a denied
/// permission) keep their documented code; anything else is a defect of himar: its full trace goes to a file and
/// the line says where (exit code <see cref="UnexpectedExitCode"/>).
/// </summary>
public static class Failures
{
    /// <summary>The exit code of an unexpected failure (EX_SOFTWARE of sysexits.h: an internal error).</summary>
    public const int UnexpectedExitCode = 70;

    /// <summary>The most characters of a message that are printed (the rest is summarised).</summary>
    public const int MaxMessageLength = 1000;

    /// <summary>
    /// The exit code and the one-line message (without the `himar: ` prefix) of a failure. Unexpected failures write
    /// their trace under <see cref="TraceDirectory"/> (or <paramref name="traceDirectory"/>) first.
    /// </summary>
    public static (int ExitCode, string Message) Explain(Exception e, string? traceDirectory = null)
    {
        e = Unwrap(e);
        if (Known(e) is { } known)
            return (known.ExitCode, OneLine(known.Message));
        var first = OneLine(FirstLine(e.Message));
        string where;
        try
        {
            where = "full trace in " + WriteTrace(e, traceDirectory ?? TraceDirectory());
        }
        catch (Exception writeFailure) when (writeFailure is IOException or UnauthorizedAccessException)
        {
            where = "the trace could not be written (" + OneLine(FirstLine(writeFailure.Message)) + ")";
        }
        return (UnexpectedExitCode, $"unexpected error: {e.GetType().FullName}: {first}; {where}");
    }

    /// <summary>The exit code and message of a failure himar knows how to explain, or null for a defect.</summary>
    public static (int ExitCode, string Message)? Known(Exception e)
    {
        e = Unwrap(e);
        switch (e)
        {
            case HiMarException h:
                return (h.ExitCode, h.Message);
            case Model.WeightMismatchException w:
                return ((int)FailureKind.BadInput, w.Message);
            case FileNotFoundException or DirectoryNotFoundException or InvalidDataException:
                return ((int)FailureKind.BadInput, e.Message);
            case IOException io when IsDiskFull(io):
                return ((int)FailureKind.Storage, $"no space left on the device: {FirstLine(io.Message)} (free some space; a training run continues from its last checkpoint with --resume).");
            case IOException or UnauthorizedAccessException:
                return ((int)FailureKind.Storage, e.Message);
            case OutOfMemoryException:
                return ((int)FailureKind.Environment, "out of memory (try a smaller --batch or -n).");
            case System.Runtime.InteropServices.ExternalException x when IsNativeOutOfMemory(x):
                return ((int)FailureKind.Environment, $"out of memory in libtorch: {FirstLine(x.Message)} (try a smaller --batch or -n).");
            case ArgumentException a when ThrownByHiMar(a):
                return ((int)FailureKind.BadInput, WithoutParameterName(a));
            default:
                return null;
        }
    }

    /// <summary>True for libtorch's allocation failures (CPU "can't allocate memory", CUDA "out of memory").</summary>
    static bool IsNativeOutOfMemory(System.Runtime.InteropServices.ExternalException e) =>
        e.Message.Contains("can't allocate memory", StringComparison.OrdinalIgnoreCase)
        || e.Message.Contains("out of memory", StringComparison.OrdinalIgnoreCase);

    /// <summary>True for the "no space left on the device" error of Linux (ENOSPC 28) or Windows (0x70, 0x27).</summary>
    public static bool IsDiskFull(IOException e) =>
        e.HResult == 28 || (e.HResult & 0xFFFF) is 0x70 or 0x27
        || e.Message.Contains("No space left on device", StringComparison.OrdinalIgnoreCase);

    /// <summary>Where unexpected failures write their traces: $XDG_STATE_HOME/himar, else ~/.local/state/himar,
    /// else the temporary folder.</summary>
    public static string TraceDirectory()
    {
        var state = Environment.GetEnvironmentVariable("XDG_STATE_HOME");
        if (string.IsNullOrEmpty(state))
        {
            var home = Environment.GetFolderPath(Environment.SpecialFolder.UserProfile);
            state = string.IsNullOrEmpty(home) ? null : Path.Combine(home, ".local", "state");
        }
        return state == null ? Path.Combine(Path.GetTempPath(), "himar") : Path.Combine(state, "himar");
    }

    /// <summary>Writes the full trace of <paramref name="e"/> with the command line and versions; returns the file.
    /// Falls back to the temporary folder when <paramref name="directory"/> cannot be written.</summary>
    public static string WriteTrace(Exception e, string directory)
    {
        var name = $"crash-{DateTime.UtcNow:yyyyMMdd-HHmmss}-{Environment.ProcessId}.txt";
        var text = new StringBuilder()
            .AppendLine($"himar {Assembly.GetEntryAssembly()?.GetName().Version} failed at {DateTime.UtcNow:O} (UTC)")
            .AppendLine($"command line: {string.Join(' ', Environment.GetCommandLineArgs())}")
            .AppendLine($".NET {Environment.Version} on {System.Runtime.InteropServices.RuntimeInformation.OSDescription}")
            .AppendLine()
            .AppendLine(e.ToString())
            .ToString();
        try
        {
            Directory.CreateDirectory(directory);
            var path = Path.Combine(directory, name);
            File.WriteAllText(path, text);
            return path;
        }
        catch (Exception first) when (first is IOException or UnauthorizedAccessException)
        {
            var fallback = Path.Combine(Path.GetTempPath(), "himar-" + name);
            File.WriteAllText(fallback, text);
            return fallback;
        }
    }

    /// <summary>A message as one printable line: line breaks become spaces, other control characters are escaped
    /// (\t, \x1b, ...), and more than <see cref="MaxMessageLength"/> characters are cut with a count.</summary>
    public static string OneLine(string message)
    {
        var s = new StringBuilder();
        foreach (var ch in message.Trim())
        {
            if (ch is '\n' or '\r')
            {
                if (s.Length > 0 && s[^1] != ' ')
                    s.Append(' ');
            }
            else if (char.IsControl(ch))
                s.Append(ch == '\t' ? "\\t" : $"\\x{(int)ch:x2}");
            else
                s.Append(ch);
        }
        if (s.Length > MaxMessageLength)
            return s.ToString(0, MaxMessageLength) + $"... ({s.Length - MaxMessageLength} more characters)";
        return s.ToString();
    }

    static string FirstLine(string message) =>
        message.TrimStart().Split('\n', 2)[0].TrimEnd('\r', ' ');

    static Exception Unwrap(Exception e)
    {
        while (true)
        {
            switch (e)
            {
                case TargetInvocationException { InnerException: { } inner }:
                    e = inner;
                    continue;
                case AggregateException a when a.InnerExceptions.Count == 1:
                    e = a.InnerExceptions[0];
                    continue;
                default:
                    return e;
            }
        }
    }

    /// <summary>Argument errors raised by himar's own code name the flag, field or file; those raised inside .NET
    /// or TorchSharp ("Non-negative number required.") are defects of the caller.</summary>
    static bool ThrownByHiMar(Exception e)
    {
        var frame = new StackTrace(e, false).GetFrames().FirstOrDefault(f => f.GetMethod()?.DeclaringType is not null);
        var assembly = frame?.GetMethod()?.DeclaringType?.Assembly.GetName().Name ?? "";
        return assembly.StartsWith("HiMar", StringComparison.Ordinal) || assembly == "himar";
    }

    /// <summary>The message without the " (Parameter 'x')" that .NET appends when a parameter name is given.</summary>
    static string WithoutParameterName(ArgumentException a)
    {
        var suffix = a.ParamName is { } p ? $" (Parameter '{p}')" : null;
        return suffix != null && a.Message.EndsWith(suffix, StringComparison.Ordinal) ? a.Message[..^suffix.Length] : a.Message;
    }
}
