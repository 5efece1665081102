/// `himar import`: a reference checkpoint (.pth) or VAE (vae.ckpt) to safetensors plus config.json.
module HiMar.Cli.Commands.Import

open Argu
open HiMar.Runtime.Native
open HiMar.Cli.Commands.Common


/// Arguments of `himar import`.
type ImportArgs =
    | [<MainCommand; ExactlyOnce>] Checkpoint of checkpoint: string
    | [<AltCommandLine("-o"); ExactlyOnce>] Out of dir: string
    | Weights of ``ema|model``: string

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Checkpoint _ -> "a reference checkpoint-*.pth, MAR's vae.ckpt, or a safetensors state dict."
            | Out _ -> "the folder to write (weights.safetensors and config.json)."
            | Weights _ -> WeightsHelp


/// Runs `himar import`.
let run (args: ParseResults<ImportArgs>) =
    TorchNative.EnsureLoaded()
    let source = args.GetResult ImportArgs.Checkpoint
    let out = args.GetResult ImportArgs.Out

    let useEma =
        HiMar.Runtime.Catalog.WeightsChoice.UseEma(args.TryGetResult ImportArgs.Weights |> Option.toObj)

    let struct (kind, summary) =
        HiMar.Runtime.Checkpoints.ReferenceImport.Import(source, out, useEma)

    printfn "imported %s (%A, %s) -> %s" source kind summary out
    0
