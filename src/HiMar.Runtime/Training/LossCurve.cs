using HiMar.Runtime.Imaging;

namespace HiMar.Runtime.Training;

/// <summary>One logged point of a training run: the combined loss and its two parts, averaged over the log window.</summary>
/// <param name="Step">Optimiser steps done.</param>
/// <param name="Loss">The combined loss the optimiser follows (the parts weighted by their token counts).</param>
/// <param name="Phase1">The phase-1 (pivot) loss, unweighted; NaN where the metrics line has none.</param>
/// <param name="Phase2">The phase-2 (dense-token) loss, unweighted; NaN where the metrics line has none.</param>
public readonly record struct LossPoint(int Step, double Loss, double Phase1, double Phase2);

/// <summary>Loss curves as PNG charts: a run's combined, phase-1 and phase-2 losses, or several runs overlaid.</summary>
public static class LossCurve
{
    /// <summary>The (step, loss) points of a run folder's metrics.jsonl; bad input names the file and line.</summary>
    public static IReadOnlyList<(int Step, double Loss)> Read(string runDir) => ReadPoints(runDir).Select(p => (p.Step, p.Loss)).ToList();

    /// <summary>The points of a run folder's metrics.jsonl (or of the file itself) with both loss parts; bad input names the file and line.</summary>
    public static IReadOnlyList<LossPoint> ReadPoints(string runDir)
    {
        var path = File.Exists(runDir) ? runDir : Path.Combine(runDir, "metrics.jsonl");
        if (!File.Exists(path))
            throw new BadInputException($"{runDir}: no metrics.jsonl (give a run folder written by himar train, or the file itself).");
        var points = new List<LossPoint>();
        var lineNo = 0;
        foreach (var line in File.ReadLines(path))
        {
            lineNo++;
            if (line.Length == 0)
                continue;
            try
            {
                points.Add(Parse(System.Text.Json.Nodes.JsonNode.Parse(line)?.AsObject()) ?? throw new BadInputException($"{path}:{lineNo}: a metrics line needs 'step' and 'loss'."));
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

    /// <summary>The point of one parsed metrics line, null when it lacks `step` or `loss`; a value of the wrong kind throws.</summary>
    public static LossPoint? Parse(System.Text.Json.Nodes.JsonObject? o)
    {
        if (o?["step"]?.GetValue<int>() is not { } step || o["loss"]?.GetValue<double>() is not { } loss)
            return null;
        return new LossPoint(step, loss, o["phase1"]?.GetValue<double>() ?? double.NaN, o["phase2"]?.GetValue<double>() ?? double.NaN);
    }

    /// <summary>Several runs' loss curves overlaid in one chart (one colour and legend entry per run), x in training steps.</summary>
    public static void SaveOverlay(IReadOnlyList<(string Label, IReadOnlyList<(int Step, double Loss)> Points)> runs, string path)
    {
        var series = runs.Select(r => new LineSeries(r.Label, r.Points.Select(p => ((double)p.Step, p.Loss)).ToList())).ToList();
        Charts.SaveLines(path, "training loss", "training step", "loss", series, ReadsBetterLog(series));
    }

    /// <summary>A run's loss.png: the combined loss and the phase-1 and phase-2 losses against the training step, with a
    /// legend; the loss axis is log-scaled when the values span more than a factor of 10. Fewer than two points: nothing.</summary>
    public static void Save(IReadOnlyList<LossPoint> points, string path, int width = 720, int height = 400)
    {
        if (points.Count(p => double.IsFinite(p.Loss)) < 2)
            return;
        var series = new List<LineSeries>
        {
            new("combined (weighted)", points.Select(p => ((double)p.Step, p.Loss)).ToList()),
            new("phase 1 (pivots)", points.Select(p => ((double)p.Step, p.Phase1)).ToList()),
            new("phase 2 (dense tokens)", points.Select(p => ((double)p.Step, p.Phase2)).ToList()),
        };
        Charts.SaveLines(path, "training loss", "training step", "loss", series, ReadsBetterLog(series), width, height);
    }

    /// <summary>True when the finite positive values span more than a factor of 10 (a log axis then reads better).</summary>
    static bool ReadsBetterLog(IReadOnlyList<LineSeries> series)
    {
        var ys = series.SelectMany(s => s.Points).Select(p => p.Y).Where(y => double.IsFinite(y) && y > 0).ToList();
        return ys.Count > 1 && ys.Max() / ys.Min() > 10;
    }
}
