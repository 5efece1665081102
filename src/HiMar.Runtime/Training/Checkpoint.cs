using System.Text.Json;
using System.Text.Json.Nodes;
using HiMar.Model;
using HiMar.Runtime.Checkpoints;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.PixelFormats;

namespace HiMar.Runtime.Training;

/// <summary>
/// Our training checkpoints: a folder per step with the raw weights, the EMA weights and the optimizer moments
/// as safetensors, config.json (the model's reference arguments) and state.json (step, epoch, RNG state, data
/// position, options). Each folder is written beside its final name and renamed, so a run killed at any moment
/// leaves only whole checkpoints. `himar sample --checkpoint` reads a checkpoint folder directly (EMA weights).
/// </summary>
public static class Checkpoint
{
    /// <summary>File names inside a checkpoint folder.</summary>
    public const string ModelFile = ReferenceImport.WeightsFile, EmaFile = "ema.safetensors", OptimizerFile = "optimizer.safetensors",
        StateFile = "state.json", ConfigFile = ReferenceImport.ConfigFile;

    /// <summary>Writes checkpoint <paramref name="name"/> under <paramref name="root"/>; returns its folder.</summary>
    public static string Write(string root, string name, HiMAR model, HiMAR ema, NamedAdamW optimizer, JsonObject state)
    {
        Directory.CreateDirectory(root);
        var final = Path.Combine(root, name);
        var staging = Path.Combine(root, $".{name}.{Guid.NewGuid():N}.tmp");
        Directory.CreateDirectory(staging);
        try
        {
            ModelFiles.Save(model, Path.Combine(staging, ModelFile));
            ModelFiles.Save(ema, Path.Combine(staging, EmaFile));
            SafeTensors.Save(Path.Combine(staging, OptimizerFile), optimizer.State());
            var indented = new JsonSerializerOptions { WriteIndented = true };
            AtomicFile.WriteText(Path.Combine(staging, ConfigFile), ReferenceImport.ToJson(model.Config).ToJsonString(indented));
            AtomicFile.WriteText(Path.Combine(staging, StateFile), state.ToJsonString(indented));
            if (Directory.Exists(final))
                Directory.Delete(final, true);
            Directory.Move(staging, final);
            return final;
        }
        finally
        {
            if (Directory.Exists(staging))
                Directory.Delete(staging, true);
        }
    }

    /// <summary>The step checkpoints under a root, oldest first.</summary>
    public static IReadOnlyList<string> Steps(string root) =>
        Directory.Exists(root)
            ? Directory.GetDirectories(root, "step-*").Where(d => File.Exists(Path.Combine(d, StateFile))).OrderBy(d => d, StringComparer.Ordinal).ToList()
            : [];

    /// <summary>The newest whole checkpoint, or null.</summary>
    public static string? Latest(string root) => Steps(root).LastOrDefault();

    /// <summary>Deletes all but the newest <paramref name="keep"/> step checkpoints.</summary>
    public static void Prune(string root, int keep)
    {
        var all = Steps(root);
        foreach (var d in all.Take(Math.Max(0, all.Count - Math.Max(1, keep))))
            Directory.Delete(d, true);
    }

    /// <summary>Copies a checkpoint folder to root/<paramref name="name"/>, atomically.</summary>
    public static void CopyAs(string source, string root, string name)
    {
        var staging = Path.Combine(root, $".{name}.{Guid.NewGuid():N}.tmp");
        Directory.CreateDirectory(staging);
        foreach (var f in Directory.GetFiles(source))
            File.Copy(f, Path.Combine(staging, Path.GetFileName(f)));
        var final = Path.Combine(root, name);
        if (Directory.Exists(final))
            Directory.Delete(final, true);
        Directory.Move(staging, final);
    }
}

/// <summary>A loss curve as a PNG: the logged loss against the step, with a light grid and labelled axes.</summary>
public static class LossCurve
{
    /// <summary>The (step, loss) points of a run folder's metrics.jsonl; bad input names the file and line.</summary>
    public static IReadOnlyList<(int Step, double Loss)> Read(string runDir)
    {
        var path = File.Exists(runDir) ? runDir : Path.Combine(runDir, "metrics.jsonl");
        if (!File.Exists(path))
            throw new BadInputException($"{runDir}: no metrics.jsonl (give a run folder written by himar train, or the file itself).");
        var points = new List<(int, double)>();
        var lineNo = 0;
        foreach (var line in File.ReadLines(path))
        {
            lineNo++;
            if (line.Length == 0)
                continue;
            try
            {
                var o = System.Text.Json.Nodes.JsonNode.Parse(line)?.AsObject();
                var step = o?["step"]?.GetValue<int>();
                var loss = o?["loss"]?.GetValue<double>();
                if (step is { } st && loss is { } l)
                    points.Add((st, l));
                else
                    throw new BadInputException($"{path}:{lineNo}: a metrics line needs 'step' and 'loss'.");
            }
            catch (Exception e) when (e is System.Text.Json.JsonException or InvalidOperationException or FormatException)
            {
                throw new BadInputException($"{path}:{lineNo}: not a metrics line ({e.Message.Split('\n')[0]}).");
            }
        }
        if (points.Count < 2)
            throw new BadInputException($"{path}: fewer than two loss points to draw.");
        return points;
    }

    /// <summary>Several runs' loss curves overlaid in one chart (one colour and legend entry per run), x in steps.</summary>
    public static void SaveOverlay(IReadOnlyList<(string Label, IReadOnlyList<(int Step, double Loss)> Points)> runs, string path)
    {
        Rgb24[] colors = [new(31, 90, 200), new(220, 110, 20), new(40, 150, 60), new(170, 40, 150), new(120, 120, 120)];
        var series = runs.Select((r, i) => new Imaging.ChartSeries(r.Label, colors[i % colors.Length],
            r.Points.Select(p => ((double)p.Step, p.Loss, 0.0)).ToList(), true)).ToList();
        var last = runs.Max(r => r.Points[^1].Step);
        var tick = Math.Max(1, (int)Math.Pow(10, Math.Floor(Math.Log10(Math.Max(1, last)))) / (last >= 5 * Math.Pow(10, Math.Floor(Math.Log10(Math.Max(1, last)))) ? 1 : 5));
        var ticks = Enumerable.Range(0, last / tick + 1).Select(k => ((double)(k * tick), (k * tick).ToString())).ToList();
        Imaging.Charts.Save(path, "training loss", "loss", series, ticks);
    }

    /// <summary>Draws and saves the curve (log-scaled loss axis when it spans more than a factor of 10).</summary>
    public static void Save(IReadOnlyList<(int Step, double Loss)> points, string path, int width = 640, int height = 360)
    {
        var finite = points.Where(p => double.IsFinite(p.Loss) && p.Loss > 0).ToList();
        if (finite.Count < 2)
            return;
        double lo = finite.Min(p => p.Loss), hi = finite.Max(p => p.Loss);
        var log = hi / lo > 10;
        double Y(double v) => log ? Math.Log10(v) : v;
        double ylo = Y(lo), yhi = Y(hi) + 1e-12;
        int x0 = 48, y0 = 16, w = width - x0 - 16, h = height - y0 - 32;
        int maxStep = finite[^1].Step, minStep = finite[0].Step;
        using var img = new Image<Rgb24>(width, height, new Rgb24(255, 255, 255));
        var grey = new Rgb24(225, 225, 225);
        for (var i = 0; i <= 4; i++)
        {
            var yy = y0 + h * i / 4;
            for (var x = x0; x < x0 + w; x++)
                img[x, yy] = grey;
            var value = log ? Math.Pow(10, yhi - (yhi - ylo) * i / 4) : yhi - (yhi - ylo) * i / 4;
            Imaging.PixelFont.Draw(img, value.ToString(value < 1 ? "0.000" : "0.00"), 2, yy - 2, 1, new Rgb24(80, 80, 80), x0 - 4);
        }
        (int, int) Pt((int Step, double Loss) p) =>
            (x0 + (int)((double)(p.Step - minStep) / Math.Max(1, maxStep - minStep) * (w - 1)), y0 + (int)((yhi - Y(p.Loss)) / (yhi - ylo) * (h - 1)));
        var blue = new Rgb24(31, 90, 200);
        for (var i = 1; i < finite.Count; i++)
        {
            var (ax, ay) = Pt(finite[i - 1]);
            var (bx, by) = Pt(finite[i]);
            var n = Math.Max(Math.Abs(bx - ax), Math.Abs(by - ay)) + 1;
            for (var k = 0; k <= n; k++)
            {
                int x = ax + (bx - ax) * k / n, y = ay + (by - ay) * k / n;
                if (x >= 0 && y >= 0 && x < width && y + 1 < height)
                {
                    img[x, y] = blue;
                    img[x, y + 1] = blue;
                }
            }
        }
        Imaging.PixelFont.Draw(img, $"step {minStep}", x0, height - 12, 1, new Rgb24(80, 80, 80), 100);
        Imaging.PixelFont.Draw(img, $"{maxStep}", x0 + w - 24, height - 12, 1, new Rgb24(80, 80, 80), 40);
        Imaging.PixelFont.Draw(img, log ? "loss (log)" : "loss", x0 + w / 2 - 20, height - 12, 1, new Rgb24(80, 80, 80), 100);
        Imaging.Images.SavePng(img, path);
    }
}
