using SkiaSharp;

namespace HiMar.Runtime.Imaging;

/// <summary>
/// The one typeface of captions and charts: DejaVu Sans (Debian's fonts-dejavu-core), found through the system's
/// font manager (fontconfig), else from its Debian path, else SkiaSharp's default typeface with a one-line warning.
/// Loading it also checks that SkiaSharp's native library (libSkiaSharp.so) loads.
/// </summary>
public static class TextFont
{
    /// <summary>The family name looked for first.</summary>
    public const string Family = "DejaVu Sans";

    /// <summary>Debian's file of <see cref="Family"/>, used when the font manager does not find it.</summary>
    public const string DebianFile = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

    static readonly Lazy<(SKTypeface Typeface, string? File)> Resolved = new(Resolve);

    /// <summary>The typeface captions and charts are drawn in.</summary>
    public static SKTypeface Typeface => Resolved.Value.Typeface;

    /// <summary>The font file ScottPlot is given (null when the system font manager found the family itself or no file exists).</summary>
    internal static string? File => Resolved.Value.File;

    /// <summary>The family name of <see cref="Typeface"/> (the fallback's when DejaVu Sans is missing).</summary>
    public static string FamilyName => Typeface.FamilyName;

    /// <summary>Throws an <see cref="EnvironmentException"/> naming libSkiaSharp.so when SkiaSharp's native library
    /// cannot be loaded (a missing NativeAssets package, or a system library it needs, such as libfontconfig1).</summary>
    public static void RequireNative()
    {
        try
        {
            using var probe = new SKBitmap(1, 1);
        }
        catch (Exception e) when (e is DllNotFoundException or TypeInitializationException or EntryPointNotFoundException or BadImageFormatException)
        {
            var inner = e;
            while (inner is TypeInitializationException { InnerException: { } i })
                inner = i;
            // The loader lists every path it tried; the first one under runtimes/ says what is wrong (missing, or a
            // library it needs, such as libfontconfig.so.1).
            var lines = inner.Message.Split('\n', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries);
            var reason = lines.FirstOrDefault(l => l.Contains("runtimes", StringComparison.Ordinal) && l.Contains("libSkiaSharp.so:", StringComparison.Ordinal))
                ?? lines.FirstOrDefault() ?? inner.GetType().Name;
            throw new EnvironmentException(
                $"libSkiaSharp.so: SkiaSharp's native library does not load ({Failures.OneLine(reason)}); charts and captions need it (package SkiaSharp.NativeAssets.Linux, system library libfontconfig1).", e);
        }
    }

    static (SKTypeface, string?) Resolve()
    {
        RequireNative();
        var found = SKFontManager.Default.MatchFamily(Family);
        if (found != null && found.FamilyName == Family)
            return (found, null);
        found?.Dispose();
        if (System.IO.File.Exists(DebianFile) && SKTypeface.FromFile(DebianFile) is { } fromFile)
            return (fromFile, DebianFile);
        Console.Error.WriteLine($"himar: warning: no {Family} font ({DebianFile} is missing; Debian package fonts-dejavu-core): captions and charts use SkiaSharp's default typeface.");
        return (SKTypeface.Default, null);
    }
}
