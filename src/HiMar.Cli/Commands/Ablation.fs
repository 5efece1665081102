/// `himar ablation`: the paper's Table 5 and step sweeps on Fashion-MNIST.
module HiMar.Cli.Commands.Ablation

open System
open Argu
open Spectre.Console
open HiMar.Runtime.Native
open HiMar.Cli.Commands.Common


/// Arguments of `himar ablation`.
type AblationArgs =
    | Config of ``name|file``: string
    | Data of dir: string
    | [<AltCommandLine("-o")>] Out of dir: string
    | Steps of count: int
    | Batch of size: int
    | Precision of ``fp32|bf16|auto``: string
    | Blr of rate: float
    | Warmup of steps: int
    | Ema of rate: float
    | Seeds of list: string
    | [<AltCommandLine("-n")>] N of count: int
    | Phase1_Sweep of list: string
    | Phase2_Sweep of list: string
    | Only of keys: string
    | Cfg of scale: float
    | Re_Cfg of scale: float
    | Temperature of t: float
    | Num_Iter of steps: int
    | Mlp_Steps of respacing: string
    | Dit_Steps of respacing: string

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Config _ ->
                "the full Hi-MAR model the variants are cut from: a preset or config JSON (default fashion-small)."
            | Data _ -> "the Fashion-MNIST IDX folder (default /usr/share/datasets/fashion-mnist)."
            | Out _ -> "the run folder (default runs/ablation); an interrupted run resumes from it."
            | Steps _ -> "optimiser steps of every training run (default 1200)."
            | Precision _ ->
                "fp32, bf16 or auto: the precision of every run's training and sampling (bf16: bf16 matmuls, fp32 weights, noise and diffusion arithmetic); auto picks bf16 where the device has bf16 units (default fp32)."
            | Batch _ -> "images per step of every training run (default 32)."
            | Blr _ -> "base learning rate, lr = blr x batch / 256 (default 8e-3: 1e-3 at batch 32)."
            | Warmup _ -> "linear warm-up steps (default 50)."
            | Ema _ -> "EMA rate (default 0.995: about the last 200 steps)."
            | Seeds _ -> "training seeds, comma-separated (default 1,2,3)."
            | N _ -> "class-balanced samples per evaluation (default 250)."
            | Phase1_Sweep _ -> "phase-1 step counts of the first sweep (default 1,2,4,8,16; empty for none)."
            | Phase2_Sweep _ -> "phase-2 step counts of the second sweep (default 1,2,4,8; empty for none)."
            | Only _ -> "only these variants (mar, low-res, cond-tokens, transformer-head, hi-mar), comma-separated."
            | Cfg _ -> "phase-2 guidance (default 3, as the shipped fashion model)."
            | Re_Cfg _ -> "phase-1 guidance (default 3)."
            | Temperature _ -> "sampling temperature (default 0.9)."
            | Num_Iter _ -> "phase-2 steps outside the sweep (default 4)."
            | Mlp_Steps _ -> "MLP-head respacing of every evaluation (default 25)."
            | Dit_Steps _ -> "Transformer-head respacing of every evaluation (default 25)."


/// Comma-separated integers ("1,2,4"); empty for none.
let private intList (what: string) (text: string) =
    text.Split(',', StringSplitOptions.RemoveEmptyEntries ||| StringSplitOptions.TrimEntries)
    |> Array.map (fun t ->
        match Int64.TryParse t with
        | true, v when v > 0L -> v
        | _ -> usageError (sprintf "%s: '%s' is not a positive whole number" what t))
    |> Array.toList

/// Runs `himar ablation`.
let run (args: ParseResults<AblationArgs>) =
    TorchNative.EnsureLoaded()

    let config =
        HiMar.Runtime.Checkpoints.ModelConfigs.Resolve(
            args.GetResult(AblationArgs.Config, defaultValue = "fashion-small")
        )

    if not (HiMar.Runtime.Catalog.ModelTraits.IsFashionMnist config) then
        usageError "the ablation trains on Fashion-MNIST pixel patches: img_size 32, vae_stride 4, 10 classes"

    let ints name dflt (case: Quotations.Expr<string -> AblationArgs>) =
        args.TryGetResult case |> Option.map (intList name) |> Option.defaultValue dflt

    let plan =
        HiMar.Runtime.Evaluation.AblationPlan(
            Base = config,
            OutDir = args.GetResult(AblationArgs.Out, defaultValue = IO.Path.Combine("runs", "ablation")),
            DataDir = args.GetResult(AblationArgs.Data, defaultValue = HiMar.Runtime.Data.IdxDataset.FashionMnistDir),
            ClassifierDir = HiMar.Runtime.Catalog.ShippedModels.ClassifierDir,
            Steps = args.GetResult(AblationArgs.Steps, defaultValue = 1200),
            Batch = args.GetResult(AblationArgs.Batch, defaultValue = 32),
            BaseLr = args.GetResult(AblationArgs.Blr, defaultValue = 8e-3),
            Warmup = args.GetResult(AblationArgs.Warmup, defaultValue = 50),
            Ema = args.GetResult(AblationArgs.Ema, defaultValue = 0.995),
            Seeds = ints "--seeds" [ 1L; 2L; 3L ] <@ AblationArgs.Seeds @>,
            Samples = args.GetResult(AblationArgs.N, defaultValue = 250),
            Phase1Sweep =
                (ints "--phase1-sweep" [ 1L; 2L; 4L; 8L; 16L ] <@ AblationArgs.Phase1_Sweep @>
                 |> List.map int),
            Phase2Sweep =
                (ints "--phase2-sweep" [ 1L; 2L; 4L; 8L ] <@ AblationArgs.Phase2_Sweep @>
                 |> List.map int),
            Only =
                (args.TryGetResult AblationArgs.Only
                 |> Option.map (fun t ->
                     t.Split(',', StringSplitOptions.RemoveEmptyEntries ||| StringSplitOptions.TrimEntries))
                 |> Option.toObj),
            Sampling =
                (samplerFlags
                    args
                    (precisionOn (args.GetResult(AblationArgs.Precision, defaultValue = "fp32")) TorchSharp.torch.CPU))
                    .Over(HiMar.Runtime.Sampling.SamplerDefaults.Ablation)
        )

    let report =
        withProgress (fun add ->
            let task = add "ablation (per mille of the work)" 1000
            HiMar.Runtime.Evaluation.Ablation.Run(plan, fun p -> task.Set(int (1000.0 * p.Done), p.Stage)))

    printfn "%s" (HiMar.Runtime.Evaluation.Ablation.Markdown report)
    printfn "wrote %s (results.json, results.md, ablation.png, sweep-*.png)" plan.OutDir
    0
