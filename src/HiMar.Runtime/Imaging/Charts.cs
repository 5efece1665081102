using HiMar.Runtime.Checkpoints;
using ScottPlot;
using SixLabors.ImageSharp.PixelFormats;
using SkiaSharp;

namespace HiMar.Runtime.Imaging;

/// <summary>One series of a chart: points with a mean and a spread (drawn as a whisker of +- spread).</summary>
/// <param name="Label">Legend text.</param>
/// <param name="Color">Line and marker colour.</param>
/// <param name="Points">(x, mean, spread) in data units.</param>
/// <param name="Connect">Join the points with a line (sweeps) or not (categories).</param>
public sealed record ChartSeries(string Label, Rgb24 Color, IReadOnlyList<(double X, double Mean, double Spread)> Points, bool Connect);

/// <summary>One line of a line chart (a loss curve): its legend text and (x, y) points; non-finite points are left out.</summary>
/// <param name="Label">Legend text.</param>
/// <param name="Points">(x, y) in data units.</param>
public sealed record LineSeries(string Label, IReadOnlyList<(double X, double Y)> Points);

/// <summary>One evaluation of a run for <see cref="Charts.SaveQuality"/>: the images trained on so far and the scores then.</summary>
/// <param name="TrainingImages">Images seen by the training (steps x global batch).</param>
/// <param name="Fd">FD-FMNIST (lower is better).</param>
/// <param name="Accuracy">Class accuracy of the samples in [0, 1].</param>
public readonly record struct QualityPoint(double TrainingImages, double Fd, double Accuracy);

/// <summary>
/// The project's charts as PNG, drawn with ScottPlot in <see cref="TextFont"/>: mean-and-spread charts (ablation,
/// step sweeps), line charts with a legend (loss curves) and two-panel quality curves. Every chart is written
/// atomically and refuses to be drawn without points.
/// </summary>
public static class Charts
{
    /// <summary>Series colours in order (blue, orange, green, purple, grey).</summary>
    public static readonly IReadOnlyList<Rgb24> Palette = [new(31, 90, 200), new(220, 110, 20), new(40, 150, 60), new(170, 40, 150), new(120, 120, 120)];

    static readonly Rgb24 FloorInk = new(200, 60, 60);

    /// <summary>
    /// Draws mean-and-spread series (markers with +- spread whiskers, joined when <see cref="ChartSeries.Connect"/>)
    /// with x ticks at the given positions and labels, and an optional dashed floor line, and saves the PNG.
    /// </summary>
    public static void Save(string path, string title, string yLabel, IReadOnlyList<ChartSeries> series, IReadOnlyList<(double X, string Label)> xTicks,
        double? floor = null, int width = 720, int height = 400, string xLabel = "")
    {
        if (series.All(s => s.Points.Count == 0))
            throw new ArgumentException("a chart needs at least one point", nameof(series));
        var plot = NewPlot(title, xLabel, yLabel);
        foreach (var s in series.Where(s => s.Points.Count > 0))
        {
            var pts = s.Points.OrderBy(p => p.X).ToList();
            double[] xs = [.. pts.Select(p => p.X)], ys = [.. pts.Select(p => p.Mean)], spread = [.. pts.Select(p => p.Spread)];
            var color = ToColor(s.Color);
            var bars = plot.Add.ErrorBar(xs, ys, spread);
            bars.Color = color;
            var line = plot.Add.Scatter(xs, ys, color);
            line.LineWidth = s.Connect ? 2 : 0;
            line.MarkerSize = 8;
            line.LegendText = series.Count > 1 ? s.Label : "";
        }
        if (floor is { } f)
        {
            var rule = plot.Add.HorizontalLine(f, 1.5f, ToColor(FloorInk), LinePattern.Dashed);
            rule.LegendText = "floor";
        }
        if (xTicks.Count > 0)
        {
            plot.Axes.Bottom.SetTicks([.. xTicks.Select(t => t.X)], [.. xTicks.Select(t => t.Label)]);
            var pad = Math.Max(0.5, 0.06 * (xTicks.Max(t => t.X) - xTicks.Min(t => t.X)));
            var all = series.SelectMany(s => s.Points).Select(p => p.X).Concat(xTicks.Select(t => t.X)).ToList();
            plot.Axes.SetLimitsX(all.Min() - pad, all.Max() + pad);
        }
        // Beside the plot: the whiskers may reach any corner.
        plot.ShowLegend(Edge.Right);
        WritePng(path, width, height, (canvas, rect) => plot.Render(canvas, rect));
    }

    /// <summary>
    /// Draws line series with a legend: x axis <paramref name="xLabel"/>, y axis <paramref name="yLabel"/>, round ticks;
    /// a log-scaled y axis (ticks at 1, 2, 5 x 10^k) when <paramref name="logY"/> is set. Saves the PNG.
    /// </summary>
    public static void SaveLines(string path, string title, string xLabel, string yLabel, IReadOnlyList<LineSeries> series, bool logY = false,
        int width = 720, int height = 400)
    {
        var kept = series.Select(s => (s.Label, Points: s.Points.Where(p => double.IsFinite(p.X) && double.IsFinite(p.Y) && (!logY || p.Y > 0)).ToList()))
            .ToList();
        if (kept.All(s => s.Points.Count == 0))
            throw new ArgumentException("a chart needs at least one point", nameof(series));
        var plot = NewPlot(title, xLabel, logY ? $"{yLabel} (log scale)" : yLabel);
        for (var i = 0; i < kept.Count; i++)
        {
            if (kept[i].Points.Count == 0)
                continue;
            double[] xs = [.. kept[i].Points.Select(p => p.X)], ys = [.. kept[i].Points.Select(p => logY ? Math.Log10(p.Y) : p.Y)];
            var line = plot.Add.Scatter(xs, ys, ToColor(Palette[i % Palette.Count]));
            line.LineWidth = 2;
            line.MarkerSize = kept[i].Points.Count == 1 ? 6 : 0;
            line.LegendText = kept[i].Label;
        }
        if (logY)
        {
            var ys = kept.SelectMany(s => s.Points).Select(p => p.Y).ToList();
            var (positions, labels) = LogTicks(ys.Min(), ys.Max());
            plot.Axes.Left.SetTicks(positions, labels);
            // Evenly spaced minor ticks would lie on a log axis.
            plot.Axes.Left.MinorTickStyle.Length = 0;
        }
        plot.Axes.Bottom.TickGenerator = new ScottPlot.TickGenerators.NumericAutomatic { IntegerTicksOnly = true };
        plot.ShowLegend(Alignment.UpperRight);
        WritePng(path, width, height, (canvas, rect) => plot.Render(canvas, rect));
    }

    /// <summary>
    /// The quality of a run against the images it trained on, in two panels sharing the x axis: FD-FMNIST above
    /// (lower is better), class accuracy in percent below (higher is better). Saves the PNG.
    /// </summary>
    public static void SaveQuality(string path, string title, IReadOnlyList<QualityPoint> points, int width = 720, int height = 560)
    {
        var pts = points.Where(p => double.IsFinite(p.TrainingImages)).OrderBy(p => p.TrainingImages).ToList();
        if (pts.Count == 0)
            throw new ArgumentException("a chart needs at least one point", nameof(points));
        double[] xs = [.. pts.Select(p => p.TrainingImages)];
        var top = NewPlot(title, "", "FD-FMNIST (lower is better)");
        double[] fds = [.. pts.Select(p => p.Fd)], accuracies = [.. pts.Select(p => 100 * p.Accuracy)];
        var fd = top.Add.Scatter(xs, fds, ToColor(Palette[0]));
        fd.LineWidth = 2;
        fd.MarkerSize = 7;
        var bottom = NewPlot("", "training images", "accuracy, % (higher is better)");
        var acc = bottom.Add.Scatter(xs, accuracies, ToColor(Palette[1]));
        acc.LineWidth = 2;
        acc.MarkerSize = 7;
        foreach (var p in new[] { top, bottom })
        {
            p.Axes.AutoScale();
            var (lo, hi) = (xs.Min(), xs.Max());
            var pad = Math.Max(hi - lo, Math.Abs(hi) + 1) * 0.05;
            p.Axes.SetLimitsX(lo - pad, hi + pad);
            // Room on the right for half of the last tick label, which is centred on its tick near the edge.
            p.Axes.Right.MinimumSize = 36;
        }
        // A plot clears the whole canvas it renders on: each panel is rendered apart and pasted.
        var upper = height / 2;
        WritePng(path, width, height, (canvas, _) =>
        {
            using var a = Render(top, width, upper);
            using var b = Render(bottom, width, height - upper);
            canvas.DrawImage(a, 0, 0);
            canvas.DrawImage(b, 0, upper);
        });
    }

    /// <summary>Tick positions (log10 of the values) and labels at 1, 2 and 5 x 10^k covering [lo, hi] (lo, hi &gt; 0).</summary>
    public static (double[] Positions, string[] Labels) LogTicks(double lo, double hi)
    {
        var values = new List<double>();
        for (var k = (int)Math.Floor(Math.Log10(lo)) - 1; k <= (int)Math.Ceiling(Math.Log10(hi)) + 1; k++)
            foreach (var m in new[] { 1.0, 2.0, 5.0 })
            {
                var v = m * Math.Pow(10, k);
                if (v >= lo / 1.5 && v <= hi * 1.5)
                    values.Add(v);
            }
        if (values.Count < 2)
            values = [lo, hi];
        return ([.. values.Select(Math.Log10)], [.. values.Select(v => v.ToString("G3", System.Globalization.CultureInfo.InvariantCulture))]);
    }

    static Plot NewPlot(string title, string xLabel, string yLabel)
    {
        var plot = new Plot();
        plot.Font.Set(FontFamily.Value);
        if (title.Length > 0)
            plot.Title(title, 14);
        plot.XLabel(xLabel, 13);
        plot.YLabel(yLabel, 13);
        return plot;
    }

    /// <summary>The family ScottPlot draws in, its file registered once when the font manager does not know it.</summary>
    static readonly Lazy<string> FontFamily = new(() =>
    {
        if (TextFont.File is { } file)
            Fonts.AddFontFile(TextFont.Family, file);
        return TextFont.FamilyName;
    });

    static ScottPlot.Color ToColor(Rgb24 c) => new(c.R, c.G, c.B);

    static SKImage Render(Plot plot, int width, int height)
    {
        using var surface = NewSurface(width, height);
        plot.Render(surface.Canvas, width, height);
        return surface.Snapshot();
    }

    static SKSurface NewSurface(int width, int height) =>
        SKSurface.Create(new SKImageInfo(width, height, SKColorType.Rgba8888, SKAlphaType.Premul))
            ?? throw new ArgumentException($"a chart of {width} x {height} pixels cannot be drawn");

    /// <summary>Renders onto a white canvas of the given size and saves it as a PNG, atomically.</summary>
    static void WritePng(string path, int width, int height, Action<SKCanvas, PixelRect> draw)
    {
        TextFont.RequireNative();
        using var surface = NewSurface(width, height);
        surface.Canvas.Clear(SKColors.White);
        draw(surface.Canvas, new PixelRect(0, width, height, 0));
        using var image = surface.Snapshot();
        using var png = image.Encode(SKEncodedImageFormat.Png, 100);
        AtomicFile.Write(path, s => png.SaveTo(s));
    }
}
