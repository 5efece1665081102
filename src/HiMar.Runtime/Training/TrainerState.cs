using System.Text.Json;
using System.Text.Json.Nodes;
using HiMar.Model;
using HiMar.Runtime.Checkpoints;
using HiMar.Runtime.Distributed;
using TorchSharp;

namespace HiMar.Runtime.Training;

/// <summary>The trainer's checkpoints: writing them (and `best`), resuming from the newest that verifies, trimming the
/// metrics a killed run logged past it, and sharing rank 0's state with the other ranks.</summary>
public sealed partial class Trainer
{
    /// <summary>Writes a checkpoint of the current step, and copies it to `best` when the smoothed loss
    /// (<see cref="SmoothedLoss"/>) is the lowest yet; its state.json records the value compared as both
    /// `smoothed_loss` and `best_loss`.</summary>
    public void SaveCheckpoint()
    {
        if (!comm.IsRoot())
            return;
        var recent = curve.Count > 0 ? curve[^1].Loss : double.PositiveInfinity;
        var compared = smoothed.Value;
        var isBest = double.IsFinite(compared) && compared < bestLoss;
        if (isBest)
            bestLoss = compared;
        var state = new JsonObject
        {
            ["step"] = step,
            ["epoch"] = EpochProgress,
            ["optimizer_steps"] = optimizer.Steps,
            ["recent_loss"] = double.IsFinite(recent) ? recent : null,
            ["best_loss"] = double.IsFinite(bestLoss) ? bestLoss : null,
            ["smoothed_loss"] = double.IsFinite(compared) ? compared : null,
            ["smoothed_loss_state"] = smoothed.ToJson(),
            ["rng_state"] = Convert.ToBase64String(RngState()),
            ["seed"] = options.Seed,
            ["precision"] = options.Precision == Precision.Bf16 ? "bf16" : "fp32",
            ["data_position"] = new JsonObject
            {
                ["epoch"] = dataEpoch,
                ["images"] = dataOffset,
                ["step_in_epoch"] = dataOffset / ImagesPerStep,
                ["global_batch"] = options.GlobalBatch,
                ["world_size"] = comm.Size,
            },
            ["options"] = JsonSerializer.SerializeToNode(options),
        };
        var dir = Checkpoint.Write(CheckpointsDir, $"step-{step:D8}", model, ema, optimizer, state);
        Checkpoint.Prune(CheckpointsDir, options.KeepLast);
        if (isBest)
            Checkpoint.CopyAs(dir, CheckpointsDir, "best");
    }

    static byte[] RngState()
    {
        using var s = torch.get_rng_state();
        return s.bytes.ToArray();
    }

    /// <summary>Restores the newest checkpoint that verifies and reads, noting the ones skipped; null when there is
    /// none at all. When checkpoints exist but none can be used, the run stops rather than start afresh over them.</summary>
    string? RestoreNewestValid()
    {
        var skipped = new List<string>();
        foreach (var dir in Checkpoint.Steps(CheckpointsDir).Reverse())
        {
            try
            {
                Checkpoint.Verify(dir);
                Restore(dir);
                SkippedCheckpoints = skipped;
                return dir;
            }
            catch (Exception e) when (e is HiMarException or JsonException or InvalidOperationException or FormatException
                or KeyNotFoundException or NullReferenceException or IOException)
            {
                skipped.Add($"{Path.GetFileName(dir)}: {Failures.OneLine(e.Message.Replace(dir + Path.DirectorySeparatorChar, ""))}");
            }
        }
        SkippedCheckpoints = skipped;
        if (skipped.Count > 0)
            throw new CheckpointFormatException($"{CheckpointsDir}: no checkpoint can be resumed ({string.Join("; ", skipped)}); move the folder away to train afresh.");
        return null;
    }

    /// <summary>Copies the weights of <paramref name="path"/> (see <see cref="TrainOptions.InitFrom"/>) into the model;
    /// their names and shapes must be the model's.</summary>
    void InitialiseFrom(string path)
    {
        if (!File.Exists(path) && !Directory.Exists(path))
            throw new BadInputException($"--init: {path}: no such model folder, checkpoint folder or .pth file.");
        HiMAR source;
        try
        {
            source = ReferenceImport.LoadModel(path, useEma: true);
        }
        catch (Exception e) when (e is HiMarException or JsonException or IOException or InvalidOperationException or FormatException
            or KeyNotFoundException or ArgumentException)
        {
            throw new BadInputException($"--init: {Failures.OneLine(e.Message)}", e);
        }
        using (source)
        {
            var from = source.state_dict();
            var to = model.state_dict();
            foreach (var (name, t) in to)
            {
                if (!from.TryGetValue(name, out var f))
                    throw new BadInputException($"--init: {path}: has no weight '{name}'; its model is not this run's model (compare its config.json with the preset or --config).");
                if (!f.shape.SequenceEqual(t.shape))
                    throw new BadInputException($"--init: {path}: '{name}' is [{string.Join(", ", f.shape)}] there and [{string.Join(", ", t.shape)}] in this run's model; its model is not this run's model.");
            }
            foreach (var name in from.Keys)
                if (!to.ContainsKey(name))
                    throw new BadInputException($"--init: {path}: has a weight '{name}' this run's model lacks; its model is not this run's model.");
            using var noGrad = torch.no_grad();
            foreach (var (name, t) in to)
                t.copy_(from[name]);
        }
    }

    /// <summary>Drops the metrics lines after the step the run starts from (steps a killed run logged and this one
    /// repeats) and unreadable ones (a line cut by the kill); the loss curve continues from the lines kept.</summary>
    void TrimMetrics()
    {
        var path = Path.Combine(options.OutDir, "metrics.jsonl");
        if (!File.Exists(path))
            return;
        var kept = new List<string>();
        var dropped = 0;
        foreach (var line in File.ReadLines(path))
        {
            int? logged = null;
            LossPoint? point = null;
            try
            {
                var o = JsonNode.Parse(line) as JsonObject;
                logged = o?["step"]?.GetValue<int>();
                point = LossCurve.Parse(o);
            }
            catch (Exception e) when (e is JsonException or InvalidOperationException or FormatException)
            {
            }
            if (logged is { } st && st <= step)
            {
                kept.Add(line);
                if (point is { } p)
                    curve.Add(p);
            }
            else
                dropped++;
        }
        if (dropped > 0)
            AtomicFile.WriteText(path, string.Concat(kept.Select(l => l + "\n")));
    }

    void Restore(string dir)
    {
        var stateJson = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, Checkpoint.StateFile)))!.AsObject();
        ModelFiles.Load(model, Path.Combine(dir, Checkpoint.ModelFile));
        ModelFiles.Load(ema, Path.Combine(dir, Checkpoint.EmaFile));
        var opt = SafeTensors.Load(Path.Combine(dir, Checkpoint.OptimizerFile));
        try
        {
            FiniteWeights.Require(opt, Path.Combine(dir, Checkpoint.OptimizerFile));
            optimizer.LoadState(opt, stateJson["optimizer_steps"]!.GetValue<long>(), Path.Combine(dir, Checkpoint.OptimizerFile));
        }
        finally
        {
            foreach (var t in opt.Values)
                t.Dispose();
        }
        step = stateJson["step"]!.GetValue<int>();
        (dataEpoch, dataOffset) = DataPosition(stateJson);
        if (dataOffset + ImagesPerStep > data.Count && dataOffset > 0)
        {
            dataEpoch++;
            dataOffset = 0;
        }
        average.Updates = optimizer.Steps;
        bestLoss = stateJson["best_loss"]?.GetValue<double>() ?? double.PositiveInfinity;
        smoothed.Load(stateJson["smoothed_loss_state"]);
        var rng = Convert.FromBase64String(stateJson["rng_state"]!.GetValue<string>());
        using var rngTensor = torch.tensor(rng);
        torch.set_rng_state(rngTensor);
    }

    /// <summary>The global data position of a checkpoint: the epoch and the images of its order already consumed.
    /// Checkpoints written before the position was kept in images hold the step within the epoch, in steps of
    /// their (single-process) batch x accumulation.</summary>
    static (int Epoch, int Images) DataPosition(JsonObject state)
    {
        var position = state["data_position"]!.AsObject();
        var epoch = position["epoch"]!.GetValue<int>();
        if (position["images"] is { } images)
            return (epoch, images.GetValue<int>());
        var saved = state["options"]!.AsObject();
        var perStep = saved["BatchSize"]!.GetValue<int>() * saved["Accumulation"]!.GetValue<int>();
        return (epoch, position["step_in_epoch"]!.GetValue<int>() * perStep);
    }

    /// <summary>Makes every rank start where rank 0 is: its weights, and on resume its optimiser moments, counters,
    /// data position and random state (rank 0 alone reads the checkpoint, which other machines may not see).</summary>
    void ShareState(bool resumed)
    {
        comm.BroadcastModule(model);
        Span<long> flag = [resumed ? 1 : 0];
        comm.Broadcast(flag, 0);
        if (flag[0] == 0)
            return;
        using (var noGrad = torch.no_grad())
            foreach (var t in optimizer.State().Values)
                comm.BroadcastInPlace(t, 0);
        Span<long> counters = [step, optimizer.Steps, dataEpoch, dataOffset];
        comm.Broadcast(counters, 0);
        (step, optimizer.Steps, dataEpoch, dataOffset) = ((int)counters[0], counters[1], (int)counters[2], (int)counters[3]);
        Span<double> best = [bestLoss, smoothed.Raw.Average, smoothed.Raw.Steps];
        comm.Broadcast(best, 0);
        bestLoss = best[0];
        smoothed.Raw = (best[1], (long)best[2]);
        var rng = comm.BroadcastBytes(comm.IsRoot() ? RngState() : null, 0);
        using var rngTensor = torch.tensor(rng);
        torch.set_rng_state(rngTensor);
    }
}
