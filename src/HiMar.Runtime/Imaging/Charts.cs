using SixLabors.ImageSharp;
using SixLabors.ImageSharp.PixelFormats;

namespace HiMar.Runtime.Imaging;

/// <summary>One series of a chart: points with a mean and a spread (drawn as a whisker of +- spread).</summary>
/// <param name="Label">Legend text.</param>
/// <param name="Color">Line and marker colour.</param>
/// <param name="Points">(x, mean, spread) in data units.</param>
/// <param name="Connect">Join the points with a line (sweeps) or not (categories).</param>
public sealed record ChartSeries(string Label, Rgb24 Color, IReadOnlyList<(double X, double Mean, double Spread)> Points, bool Connect);

/// <summary>
/// Small mean-and-spread charts as PNG (ablation bars, step sweeps), drawn pixel by pixel with <see cref="PixelFont"/>:
/// ImageSharp.Drawing, which would draw lines and text, is not served by this workplace's package feed.
/// </summary>
public static class Charts
{
    static readonly Rgb24 Ink = new(60, 60, 60), Grid = new(228, 228, 228), FloorInk = new(200, 60, 60);

    /// <summary>Draws the series with x ticks at the given positions and an optional dashed floor line, and saves the PNG.</summary>
    public static void Save(string path, string title, string yLabel, IReadOnlyList<ChartSeries> series, IReadOnlyList<(double X, string Label)> xTicks,
        double? floor = null, int width = 720, int height = 400)
    {
        var all = series.SelectMany(s => s.Points).ToList();
        if (all.Count == 0)
            throw new ArgumentException("a chart needs at least one point", nameof(series));
        var lo = Math.Min(all.Min(p => p.Mean - p.Spread), floor ?? double.MaxValue);
        var hi = all.Max(p => p.Mean + p.Spread);
        lo = Math.Max(0, lo - 0.05 * (hi - lo + 1e-9));
        hi += 0.08 * (hi - lo + 1e-9);
        double xlo = xTicks.Concat(all.Select(p => (p.X, ""))).Min(t => t.Item1), xhi = xTicks.Concat(all.Select(p => (p.X, ""))).Max(t => t.Item1);
        var xpad = Math.Max(0.5, 0.06 * (xhi - xlo));
        xlo -= xpad;
        xhi += xpad;
        int x0 = 56, y0 = 28, w = width - x0 - 16, h = height - y0 - 44;
        using var img = new Image<Rgb24>(width, height, new Rgb24(255, 255, 255));
        int Px(double x) => x0 + (int)Math.Round((x - xlo) / (xhi - xlo) * (w - 1));
        int Py(double y) => y0 + (int)Math.Round((hi - y) / (hi - lo) * (h - 1));

        PixelFont.Draw(img, title, x0, 8, 2, Ink, w);
        for (var i = 0; i <= 5; i++)
        {
            var v = lo + (hi - lo) * i / 5;
            var yy = Py(v);
            Line(img, x0, yy, x0 + w - 1, yy, Grid, 1);
            PixelFont.Draw(img, v.ToString(hi - lo < 5 ? "0.00" : "0.0"), 2, yy - 2, 1, Ink, x0 - 6);
        }
        Line(img, x0, y0, x0, y0 + h - 1, Ink, 1);
        Line(img, x0, y0 + h - 1, x0 + w - 1, y0 + h - 1, Ink, 1);
        foreach (var (x, label) in xTicks)
        {
            var xx = Px(x);
            Line(img, xx, y0 + h - 1, xx, y0 + h + 2, Ink, 1);
            var textWidth = 4 * label.Length;
            PixelFont.Draw(img, label, xx - textWidth / 2, y0 + h + 6, 1, Ink, textWidth + 4);
        }
        PixelFont.Draw(img, yLabel, x0, y0 + h + 20, 1, Ink, w);
        if (floor is { } f)
        {
            var yy = Py(f);
            for (var x = x0; x < x0 + w; x += 8)
                Line(img, x, yy, Math.Min(x + 4, x0 + w - 1), yy, FloorInk, 1);
            PixelFont.Draw(img, "floor", x0 + w - 24, yy - 8, 1, FloorInk, 24);
        }

        var legendY = y0 + h + 32;
        var legendX = x0;
        foreach (var s in series)
        {
            var pts = s.Points.OrderBy(p => p.X).ToList();
            for (var i = 0; s.Connect && i + 1 < pts.Count; i++)
                Line(img, Px(pts[i].X), Py(pts[i].Mean), Px(pts[i + 1].X), Py(pts[i + 1].Mean), s.Color, 2);
            foreach (var (x, mean, spread) in pts)
            {
                int xx = Px(x), top = Py(mean + spread), bottom = Py(mean - spread);
                Line(img, xx, top, xx, bottom, s.Color, 1);
                Line(img, xx - 3, top, xx + 3, top, s.Color, 1);
                Line(img, xx - 3, bottom, xx + 3, bottom, s.Color, 1);
                var yy = Py(mean);
                for (var dy = -2; dy <= 2; dy++)
                    for (var dx = -2; dx <= 2; dx++)
                        Set(img, xx + dx, yy + dy, s.Color);
            }
            if (series.Count > 1)
            {
                Line(img, legendX, legendY + 2, legendX + 12, legendY + 2, s.Color, 2);
                PixelFont.Draw(img, s.Label, legendX + 16, legendY, 1, Ink, 4 * s.Label.Length + 4);
                legendX += 4 * s.Label.Length + 32;
            }
        }
        Images.SavePng(img, path);
    }

    static void Set(Image<Rgb24> img, int x, int y, Rgb24 c)
    {
        if (x >= 0 && y >= 0 && x < img.Width && y < img.Height)
            img[x, y] = c;
    }

    static void Line(Image<Rgb24> img, int ax, int ay, int bx, int by, Rgb24 c, int thickness)
    {
        var n = Math.Max(Math.Abs(bx - ax), Math.Abs(by - ay));
        for (var k = 0; k <= n; k++)
        {
            int x = n == 0 ? ax : ax + (bx - ax) * k / n, y = n == 0 ? ay : ay + (by - ay) * k / n;
            for (var t = 0; t < thickness; t++)
                Set(img, x, y + t, c);
        }
    }
}
