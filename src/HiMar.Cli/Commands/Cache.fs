/// `himar cache`: an image folder encoded with the VAE into a latent cache for training.
module HiMar.Cli.Commands.Cache

open System
open Argu
open HiMar.Runtime.Native
open HiMar.Cli.Commands.Common


/// Arguments of `himar cache`.
type CacheArgs =
    | [<ExactlyOnce>] Data of dir: string
    | [<ExactlyOnce>] Vae of path: string
    | [<AltCommandLine("-o"); ExactlyOnce>] Out of dir: string
    | Size of pixels: int
    | Batch of size: int
    | Captions of file: string

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Captions _ ->
                "a COCO captions JSON (images + annotations): cache the images it lists from --data (a flat folder such as train2017/)."
            | Data _ -> "an image folder in the ImageNet layout (one subfolder per class; JPEG or PNG)."
            | Vae _ -> "the KL autoencoder (imported folder, vae.ckpt or safetensors)."
            | Out _ -> "the cache folder to write (cache.json and safetensors shards)."
            | Size _ -> "centre-crop side in pixels (default 256; the pivots use half)."
            | Batch _ -> "images per VAE batch (default 8)."


/// Runs `himar cache`.
let run (args: ParseResults<CacheArgs>) =
    TorchNative.EnsureLoaded()

    let size = args.GetResult(Size, defaultValue = 256)

    let folder =
        match args.TryGetResult CacheArgs.Captions with
        | Some file ->
            let coco = HiMar.Runtime.Text.CocoCaptions.Load file
            HiMar.Runtime.Data.ImageFolder.FromFiles(args.GetResult CacheArgs.Data, coco.Files, size)
        | None -> HiMar.Runtime.Data.ImageFolder(args.GetResult CacheArgs.Data, size)

    use vae =
        HiMar.Runtime.Checkpoints.ReferenceImport.LoadVae(args.GetResult CacheArgs.Vae)

    let out = args.GetResult CacheArgs.Out
    let warnings = ResizeArray<string>()

    let manifest =
        withProgress (fun add ->
            let task = add (sprintf "encoding %d images" folder.Count) folder.Count

            HiMar.Runtime.Data.LatentCache.Build(
                folder,
                vae,
                out,
                args.GetResult(CacheArgs.Batch, defaultValue = 8),
                (fun doneCount _ -> task.Set doneCount),
                (fun w -> warnings.Add w)
            ))

    for w in warnings do
        eprintfn "warning: %s" w

    printfn
        "cached %d images of %d classes in %s; %d skipped"
        ((nonNull manifest.["count"]).GetValue<int>())
        folder.ClassCount
        out
        warnings.Count

    0
