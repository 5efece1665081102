/// `himar plot-loss`: the loss curves of several training runs in one PNG.
module HiMar.Cli.Commands.PlotLoss

open System
open Argu
open HiMar.Cli.Commands.Common


/// Arguments of `himar plot-loss`.
type PlotLossArgs =
    | [<MainCommand; ExactlyOnce>] Runs of run: string list
    | [<AltCommandLine("-o")>] Out of file: string

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Runs _ -> "run folders written by himar train (or their metrics.jsonl files); each becomes one curve."
            | Out _ -> "the PNG to write (default loss-overlay.png)."


/// Runs `himar plot-loss`.
let run (args: ParseResults<PlotLossArgs>) =
    let runs = args.GetResult Runs
    let out = args.GetResult(Out, defaultValue = "loss-overlay.png")

    let curves =
        runs
        |> List.map (fun r ->
            let label =
                let full = IO.Path.GetFullPath(r).TrimEnd('/')

                if IO.File.Exists full then
                    nonNull (IO.Path.GetFileName(nonNull (IO.Path.GetDirectoryName full)))
                else
                    nonNull (IO.Path.GetFileName full)

            struct (label, HiMar.Runtime.Training.LossCurve.Read r))

    HiMar.Runtime.Training.LossCurve.SaveOverlay(Collections.Generic.List curves, out)

    for struct (label, points) in curves do
        let struct (lastStep, lastLoss) = points.[points.Count - 1]

        let tail =
            points
            |> Seq.skip (max 0 (points.Count - 10))
            |> Seq.averageBy (fun struct (_, l) -> l)

        printfn
            "%s: %d points, last step %d, loss %.4f (mean of the last 10: %.4f)"
            label
            points.Count
            lastStep
            lastLoss
            tail

    printfn "wrote %s" out
    0
