using System.Text.Json.Nodes;
using HiMar.Runtime.Imaging;

namespace HiMar.Runtime.Evaluation;

/// <summary>One point of a quality curve as read from disk: the eval folder and its scores against training images.</summary>
/// <param name="EvalDir">The folder holding eval.json.</param>
/// <param name="Step">The training step of the evaluated checkpoint.</param>
/// <param name="Point">Training images (step x global batch), FD-FMNIST and class accuracy.</param>
/// <param name="Images">How many samples the evaluation scored.</param>
public sealed record QualityReading(string EvalDir, int Step, QualityPoint Point, int Images);

/// <summary>
/// A training run's quality curve from `himar eval` folders of its checkpoints: each eval.json names the checkpoint
/// it scored, whose state.json (written by `himar train`) gives the step and the global batch.
/// </summary>
public static class QualityCurve
{
    /// <summary>Reads one eval folder (or its eval.json); bad input names the file and the missing field.</summary>
    public static QualityReading Read(string evalDir)
    {
        var path = File.Exists(evalDir) ? evalDir : Path.Combine(evalDir, "eval.json");
        if (!File.Exists(path))
            throw new BadInputException($"{evalDir}: no eval.json (give a folder written by himar eval, or the file itself).");
        var report = Parse(path);
        var metrics = report["metrics"] as JsonObject ?? throw new BadInputException($"{path}: no 'metrics' object.");
        var fd = Number(metrics, "fd_fmnist", path);
        var acc = Number(metrics, "class_accuracy", path);
        var images = (int)Number(report, "images", path);
        var checkpoint = report["checkpoint"]?.GetValue<string>() ?? throw new BadInputException($"{path}: no 'checkpoint' field.");
        var stateDir = Directory.Exists(checkpoint) ? checkpoint : Path.GetDirectoryName(checkpoint) ?? checkpoint;
        var statePath = Path.Combine(stateDir, "state.json");
        if (!File.Exists(statePath))
            throw new BadInputException(
                $"{path}: its checkpoint {checkpoint} has no state.json beside it; a quality curve needs evaluations of `himar train` checkpoints (runs/NAME/checkpoints/step-N).");
        var state = Parse(statePath);
        var step = (int)Number(state, "step", statePath);
        var position = state["data_position"] as JsonObject ?? throw new BadInputException($"{statePath}: no 'data_position' object.");
        var batch = Number(position, "global_batch", statePath);
        return new QualityReading(evalDir, step, new QualityPoint(step * batch, fd, acc), images);
    }

    /// <summary>Reads several eval folders, sorted by training images; refuses fewer than two or unequal sample counts.</summary>
    public static IReadOnlyList<QualityReading> ReadAll(IReadOnlyList<string> evalDirs)
    {
        var readings = evalDirs.Select(Read).OrderBy(r => r.Point.TrainingImages).ToList();
        if (readings.Count < 2)
            throw new BadInputException("a quality curve needs at least two eval folders.");
        var counts = readings.Select(r => r.Images).Distinct().ToList();
        if (counts.Count > 1)
            throw new BadInputException(
                $"the eval folders scored different sample counts ({string.Join(", ", counts)}); FD depends on N, so compare evaluations at one N.");
        return readings;
    }

    static JsonObject Parse(string path)
    {
        try
        {
            return JsonNode.Parse(File.ReadAllText(path)) as JsonObject ?? throw new BadInputException($"{path}: not a JSON object.");
        }
        catch (System.Text.Json.JsonException e)
        {
            throw new BadInputException($"{path}: not JSON ({e.Message.Split('\n')[0]}).", e);
        }
    }

    static double Number(JsonObject o, string key, string path)
    {
        try
        {
            return o[key]?.GetValue<double>() ?? throw new BadInputException($"{path}: no '{key}' number.");
        }
        catch (Exception e) when (e is InvalidOperationException or FormatException)
        {
            throw new BadInputException($"{path}: '{key}' is not a number.", e);
        }
    }
}
