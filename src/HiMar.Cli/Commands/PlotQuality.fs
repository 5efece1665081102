/// `himar plot-quality`: a training run's quality curve (FD-FMNIST and class accuracy against training images).
module HiMar.Cli.Commands.PlotQuality

open System
open Argu
open HiMar.Runtime.Evaluation


/// Arguments of `himar plot-quality`.
type PlotQualityArgs =
    | [<MainCommand; ExactlyOnce>] Evals of eval: string list
    | [<AltCommandLine("-o")>] Out of file: string
    | Title of text: string

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Evals _ ->
                "eval folders written by himar eval --checkpoint RUN/checkpoints/step-N (or their eval.json files), all at one -n."
            | Out _ -> "the PNG to write (default quality.png)."
            | Title _ -> "the chart's title (default: FD-FMNIST and class accuracy, N = the sample count)."


/// Runs `himar plot-quality`.
let run (args: ParseResults<PlotQualityArgs>) =
    let readings = QualityCurve.ReadAll(args.GetResult Evals)
    let out = args.GetResult(Out, defaultValue = "quality.png")
    let n = readings.[0].Images

    let title =
        args.GetResult(Title, defaultValue = sprintf "FD-FMNIST and class accuracy, N = %d" n)

    HiMar.Runtime.Imaging.Charts.SaveQuality(
        out,
        title,
        readings |> Seq.map (fun r -> r.Point) |> Collections.Generic.List
    )

    for r in readings do
        printfn
            "step %d (%.0f images): FD-FMNIST %.2f, class accuracy %.1f%%  (%s)"
            r.Step
            r.Point.TrainingImages
            r.Point.Fd
            (100.0 * r.Point.Accuracy)
            r.EvalDir

    printfn "wrote %s" out
    0
