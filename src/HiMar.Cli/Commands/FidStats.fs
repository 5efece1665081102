/// `himar fid-stats`: reference statistics (mu, sigma of the FID Inception features) of an image folder.
module HiMar.Cli.Commands.FidStats

open Argu
open HiMar.Cli.Commands.Common


/// Arguments of `himar fid-stats`.
type FidStatsArgs =
    | [<ExactlyOnce>] Inception of file: string
    | [<ExactlyOnce>] Images of dir: string
    | [<AltCommandLine("-o"); ExactlyOnce>] Out of npz: string
    | Batch of size: int
    | Device of device: string

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Inception _ -> "the FID Inception weights (pt_inception-2015-12-05-6726825d.pth or safetensors)."
            | Images _ -> "the reference image folder (any size, RGB; PNG, JPEG, ...)."
            | Out _ -> "the statistics file to write (.npz with float64 mu and sigma)."
            | Batch _ -> "images per Inception batch (default 50)."
            | Device _ -> DeviceHelp


/// `himar fid-stats`: reference statistics of an image folder.
let run (args: ParseResults<FidStatsArgs>) =
    let images = args.GetResult FidStatsArgs.Images
    let count = HiMar.Runtime.Evaluation.InceptionFeatures.ListImages(images).Count

    use model =
        inception (args.GetResult FidStatsArgs.Inception) (args.TryGetResult FidStatsArgs.Device)

    let out = args.GetResult FidStatsArgs.Out

    use stats =
        withProgress (fun add ->
            let task = add (sprintf "Inception features of %d images" count) count

            HiMar.Runtime.Evaluation.ImageNetEval.WriteStats(
                model,
                images,
                out,
                args.GetResult(FidStatsArgs.Batch, defaultValue = 50),
                fun d _ -> task.Set d
            ))

    printfn "wrote %s: mu and sigma of %d images, %d-d features" out count stats.Mu.shape.[0]
    0
