/// `himar embed-captions`: caption embeddings precomputed with a text encoder.
module HiMar.Cli.Commands.EmbedCaptions

open System
open Argu
open HiMar.Runtime.Native
open HiMar.Cli.Commands.Common


/// Arguments of `himar embed-captions`.
type EmbedCaptionsArgs =
    | [<ExactlyOnce>] Text_Encoder of path: string
    | Captions of file: string
    | Fashion
    | Data of dir: string
    | [<AltCommandLine("-o"); ExactlyOnce>] Out of dir: string
    | Float32
    | Batch of size: int
    | Device of device: string

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Text_Encoder _ ->
                "a CLIP text-model folder (model.safetensors, vocab.json, merges.txt) or a himar text model with a built-in encoder."
            | Captions _ -> "a COCO captions JSON (images + annotations); the image keys are its file names."
            | Fashion -> "Fashion-MNIST's training captions instead (five per image, from the labels and templates)."
            | Data _ -> "the Fashion-MNIST IDX folder (default /usr/share/datasets/fashion-mnist)."
            | Out _ -> "the folder to write: embeddings.json, shard-NNNNN.safetensors, empty.safetensors."
            | Float32 -> "store float32 (default float16, half the disk)."
            | Batch _ -> "captions per encoder batch (default 64)."
            | Device _ -> DeviceHelp


/// Runs `himar embed-captions`.
let run (args: ParseResults<EmbedCaptionsArgs>) =
    TorchNative.EnsureLoaded()
    let dev = device (args.GetResult(EmbedCaptionsArgs.Device, defaultValue = "cpu"))
    let encoderPath = args.GetResult EmbedCaptionsArgs.Text_Encoder

    let keys, captions =
        match args.TryGetResult EmbedCaptionsArgs.Captions, args.Contains EmbedCaptionsArgs.Fashion with
        | Some file, false ->
            let coco = HiMar.Runtime.Text.CocoCaptions.Load file

            if coco.WithoutCaptions > 0 then
                eprintfn "warning: %s: %d images have no caption and are left out" file coco.WithoutCaptions

            coco.Files, coco.Captions
        | None, true ->
            let data =
                HiMar.Runtime.Data.IdxDataset.FashionMnist(
                    args.GetResult(EmbedCaptionsArgs.Data, defaultValue = HiMar.Runtime.Data.IdxDataset.FashionMnistDir)
                )

            HiMar.Runtime.Text.CaptionTexts.FashionMnistKeys data.Count,
            (HiMar.Runtime.Text.CaptionTexts.FashionMnist data.Labels).Captions
        | _ -> usageError "give one of --captions FILE or --fashion"

    use encoder = HiMar.Runtime.Text.TextEncoders.Load(encoderPath, dev)
    let out = args.GetResult EmbedCaptionsArgs.Out
    let total = captions |> Seq.sumBy (fun c -> c.Count)

    let manifest =
        withProgress (fun add ->
            let task = add (sprintf "embedding %d captions" total) total

            HiMar.Runtime.Text.CaptionEmbeddings.Build(
                keys,
                captions,
                encoder,
                nonNull (IO.Path.GetFileName(IO.Path.GetFullPath(encoderPath).TrimEnd('/'))),
                out,
                not (args.Contains EmbedCaptionsArgs.Float32),
                batchSize = args.GetResult(EmbedCaptionsArgs.Batch, defaultValue = 64),
                progress = fun d _ -> task.Set d
            ))

    printfn
        "embedded %d captions of %d images (%d x %d each) in %s"
        total
        keys.Count
        encoder.ContextLength
        encoder.Width
        out

    ignore manifest
    0
