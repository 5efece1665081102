/// `himar train`: train a model, resumably, on one process or under mpirun.
module HiMar.Cli.Commands.Train

open System
open Argu
open HiMar.Runtime.Native
open HiMar.Cli.Commands.Common


/// Arguments of `himar train`.
type TrainArgs =
    | Preset of name: string
    | Config of file: string
    | Data of dir: string
    | Cache of dir: string
    | Vae of path: string
    | [<AltCommandLine("-o")>] Out of dir: string
    | Steps of count: int
    | Batch of size: int
    | Precision of ``fp32|bf16|auto``: string
    | Accumulation of micro_batches: int
    | Blr of rate: float
    | Warmup of steps: int
    | Lr_Schedule of ``constant|cosine``: string
    | Weight_Decay of wd: float
    | Grad_Clip of norm: float
    | Ema of rate: float
    | Seed of seed: int64
    | No_Flip
    | Checkpoint_Every of steps: int
    | Keep of count: int
    | Sample_Every of steps: int
    | Log_Every of steps: int
    | Resume
    | Init of path: string
    | Captions of file: string
    | Embeddings of dir: string
    | Device of device: string

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Captions _ ->
                "text models with the built-in encoder on a latent cache: the COCO captions JSON of its images (one caption drawn per image and step)."
            | Embeddings _ ->
                "text models with an external encoder: caption embeddings from `himar embed-captions` (matched to the cache's images, or to Fashion-MNIST's)."
            | Preset _ -> "a model preset (default fashion; fashion-text trains on captions made from the labels)."
            | Config _ -> "a JSON file of reference arguments instead of a preset."
            | Data _ ->
                "the IDX folder (default /usr/share/datasets/fashion-mnist, from apt-get install dataset-fashion-mnist)."
            | Cache _ ->
                "train on a latent cache made by `himar cache` instead (needs --vae for previews and the hash check)."
            | Vae _ -> "the VAE the cache was made with."
            | Out _ -> "the run folder (default runs/<preset>): checkpoints/, samples/, metrics.jsonl, loss.png."
            | Steps _ -> "optimiser steps in total (default 4000); a resumed run continues up to this."
            | Precision _ ->
                "fp32, bf16 or auto: the precision of the networks' products (bf16: bf16 matmuls, fp32 weights, noise and diffusion arithmetic); auto picks bf16 where the device has bf16 units; weights, AdamW, EMA and checkpoints stay fp32, and a run resumes in either precision (default fp32)."
            | Batch _ ->
                "images per step and process (default 64); under mpirun -np N the global batch is N times this."
            | Accumulation _ -> "micro-batches per step (default 1)."
            | Blr _ ->
                "base learning rate: lr = blr x global batch / 256 (default 4e-3, i.e. 1e-3 at a global batch of 64)."
            | Warmup _ -> "linear warm-up steps (default 200)."
            | Lr_Schedule _ -> "constant (default) or cosine."
            | Weight_Decay _ -> "AdamW weight decay (default 0.02)."
            | Grad_Clip _ -> "gradient-norm clip (default 3.0)."
            | Ema _ -> "EMA rate (default 0.999 for short runs; the reference uses 0.9999)."
            | Seed _ -> "run seed (default 1)."
            | No_Flip -> "no random horizontal flips."
            | Checkpoint_Every _ -> "checkpoint every N steps (default 250)."
            | Keep _ -> "checkpoints to keep besides best (default 3)."
            | Sample_Every _ -> "a grid of EMA samples every N steps (default 500; 0 = never)."
            | Log_Every _ -> "metrics every N steps (default 10)."
            | Device _ -> "cpu (default; training runs on the CPU in this version)."
            | Resume -> "continue from the newest checkpoint of the run folder, exactly."
            | Init _ ->
                "fine-tune: start from the weights of a model folder (models/fashion), training checkpoint folder (its EMA weights) or .pth of the same model, with a fresh optimiser, schedule and EMA; ignored when --resume finds a checkpoint."


/// Runs `himar train`.
let run (args: ParseResults<TrainArgs>) =
    TorchNative.EnsureLoaded()

    match args.TryGetResult TrainArgs.Device with
    | Some d when d.Trim().ToLowerInvariant() <> "cpu" ->
        usageError (
            sprintf "--device %s: training runs on the CPU in this version (sample, eval and serve take --device)" d
        )
    | _ -> ()

    let presetName = args.GetResult(TrainArgs.Preset, defaultValue = "fashion")

    let config =
        match args.TryGetResult TrainArgs.Config with
        | Some file -> HiMar.Runtime.Checkpoints.ModelConfigs.Resolve file
        | None -> HiMar.Runtime.Checkpoints.ModelConfigs.Resolve presetName

    let options =
        HiMar.Runtime.Training.TrainOptions(
            OutDir = args.GetResult(TrainArgs.Out, defaultValue = IO.Path.Combine("runs", presetName)),
            Steps = args.GetResult(TrainArgs.Steps, defaultValue = 4000),
            BatchSize = args.GetResult(TrainArgs.Batch, defaultValue = 64),
            Accumulation = args.GetResult(Accumulation, defaultValue = 1),
            BaseLr = args.GetResult(Blr, defaultValue = 4e-3),
            WarmupSteps = args.GetResult(Warmup, defaultValue = 200),
            LrSchedule = args.GetResult(Lr_Schedule, defaultValue = "constant"),
            WeightDecay = args.GetResult(Weight_Decay, defaultValue = 0.02),
            GradClip = args.GetResult(Grad_Clip, defaultValue = 3.0),
            EmaRate = args.GetResult(TrainArgs.Ema, defaultValue = 0.999),
            Seed = args.GetResult(TrainArgs.Seed, defaultValue = 1L),
            Flip = not (args.Contains No_Flip),
            CheckpointEvery = args.GetResult(Checkpoint_Every, defaultValue = 250),
            KeepLast = args.GetResult(Keep, defaultValue = 3),
            SampleEvery = args.GetResult(Sample_Every, defaultValue = 500),
            LogEvery = args.GetResult(Log_Every, defaultValue = 10),
            InitFrom = Option.toObj (args.TryGetResult Init),
            Precision = precisionOn (args.GetResult(TrainArgs.Precision, defaultValue = "fp32")) TorchSharp.torch.CPU
        )

    let comm = HiMar.Runtime.Distributed.Communicators.Create "auto"
    let threads = HiMar.Runtime.Distributed.Communicators.ShareCores()
    let root = comm.Rank = 0

    if root && comm.Size > 1 then
        printfn
            "data-parallel training on %d ranks (%s), %d libtorch thread%s per rank"
            comm.Size
            comm.Backend
            threads
            (if threads = 1 then "" else "s")

        match HiMar.Runtime.Training.TrainingSetup.DataParallelWarning(config, comm.Size) with
        | NonNull w -> eprintfn "himar: warning: %s" w
        | Null -> ()

    let data =
        HiMar.Runtime.Training.TrainingData(
            DataDir = args.GetResult(TrainArgs.Data, defaultValue = HiMar.Runtime.Data.IdxDataset.FashionMnistDir),
            CacheDir = Option.toObj (args.TryGetResult TrainArgs.Cache),
            VaePath = Option.toObj (args.TryGetResult TrainArgs.Vae),
            CaptionsFile = Option.toObj (args.TryGetResult TrainArgs.Captions),
            EmbeddingsDir = Option.toObj (args.TryGetResult TrainArgs.Embeddings)
        )

    use trainer =
        HiMar.Runtime.Training.TrainingSetup.Create(config, data, options, args.Contains Resume, comm)

    if root then
        for skipped in trainer.SkippedCheckpoints do
            eprintfn "himar: warning: skipped checkpoint %s" skipped

        if trainer.RemovedDebris.Count > 0 then
            eprintfn "himar: removed %s (left by an interrupted run)" (String.Join(", ", trainer.RemovedDebris))

    if root && trainer.Step > 0 then
        printfn "resuming %s at step %d" options.OutDir trainer.Step

    if root then
        withProgress (fun add ->
            let task = add "training steps" options.Steps
            task.Set trainer.Step

            trainer.Run(fun p ->
                task.Set(
                    p.Step,
                    sprintf
                        "loss %.4f (phase 1 %.3f, phase 2 %.3f)  lr %.1e  %.0f img/s"
                        p.Loss
                        p.Phase1
                        p.Phase2
                        p.Lr
                        p.ImagesPerSecond
                )))
    else
        // Other ranks train silently: rank 0 logs, checkpoints and shows progress.
        trainer.Run()

    if root then
        printfn "done: %d steps; checkpoints in %s" trainer.Step trainer.CheckpointsDir

    0
