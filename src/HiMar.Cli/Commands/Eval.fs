/// `himar eval`: FD-FMNIST and class accuracy of a Fashion-MNIST model's samples, or FID/IS/PR of an image folder.
module HiMar.Cli.Commands.Eval

open System
open Argu
open Spectre.Console
open HiMar.Runtime.Native
open HiMar.Cli.Commands.Common


/// Arguments of `himar eval`.
type EvalArgs =
    | Preset of name: string
    | [<AltCommandLine("-c")>] Checkpoint of path: string
    | Weights of ``ema|model``: string
    | [<AltCommandLine("-n")>] N of count: int
    | Cfg of scale: float
    | Re_Cfg of scale: float
    | Temperature of t: float
    | Num_Iter of steps: int
    | Phase1_Steps of steps: int
    | Mlp_Steps of respacing: string
    | Dit_Steps of respacing: string
    | Seed of seed: int64
    | Batch of size: int
    | Precision of ``fp32|bf16|auto``: string
    | [<AltCommandLine("-o")>] Out of dir: string
    | Inception of file: string
    | Images of dir: string
    | Ref_Stats of npz: string
    | Ref_Images of dir: string
    | Text_Encoder of dir: string
    | Vae of path: string
    | Training_Templates
    | Device of device: string
    | Allow_Nonfinite

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Allow_Nonfinite -> AllowNonfiniteHelp
            | Preset _ ->
                "the shipped model to evaluate: fashion (default), fashion-mar or fashion-text (prompted with held-out caption templates)."
            | Text_Encoder _ -> "text models with an external encoder: its folder (CLIP text model)."
            | Vae _ ->
                "the autoencoder of a latent model (default: the vae.safetensors the model carries in its folder or run folder)."
            | Training_Templates ->
                "text models: prompt with the training caption templates instead of the held-out ones (the gap shows how well phrasing generalises)."
            | Checkpoint _ -> "a Fashion-MNIST model folder or training checkpoint instead."
            | Weights _ -> WeightsHelp
            | N _ -> "class-balanced samples (default 1000); images already in the output folder are reused."
            | Cfg _ ->
                "phase-2 (dense-token) guidance scale, 1 = off (default: the model's sampling.json, 7 for the shipped models; 1 without one)."
            | Re_Cfg _ ->
                "phase-1 (pivot) guidance scale, 1 = off (default: the model's sampling.json, 7 for the shipped models; 1 without one)."
            | Temperature _ ->
                "sampling temperature (default: the model's sampling.json, 1.0 for the shipped models; 1 without one)."
            | Num_Iter _ ->
                "phase-2 steps (default: the model's sampling.json, 2 for the shipped models; 4 without one)."
            | Phase1_Steps _ ->
                "phase-1 steps (default: the model's, 4 x the pivot grid's side: 16 for the shipped models)."
            | Mlp_Steps _ ->
                "MLP-head respacing: N, ddimN or N1,N2,... (default: the model's sampling.json, 100 for the shipped models; without one, the model's num_sampling_steps)."
            | Dit_Steps _ ->
                "Transformer-head respacing (default: the model's sampling.json, 100 for the shipped models; without one, the model's dit_head_sampling_steps)."
            | Seed _ -> "run seed (default 0)."
            | Precision _ -> PrecisionHelp
            | Batch _ -> "images per sampler batch (default 50)."
            | Out _ -> "output folder (default eval/<model>, or eval/<images folder>): eval.json (and images/)."
            | Inception _ ->
                "ImageNet metrics instead: FID/IS/PR of --images with these FID Inception weights (pt_inception-2015-12-05-6726825d.pth or safetensors)."
            | Images _ -> "with --inception: the folder of generated images to score."
            | Ref_Stats _ -> "with --inception: reference statistics (.npz with mu, sigma; see himar fid-stats)."
            | Ref_Images _ -> "with --inception: a reference image folder instead (also gives precision/recall)."
            | Device _ -> "with --inception: " + DeviceHelp


let private evalSamples (args: ParseResults<EvalArgs>) =
    TorchNative.EnsureLoaded()

    let name, ckpt =
        match args.TryGetResult EvalArgs.Checkpoint, args.TryGetResult EvalArgs.Preset with
        | Some c, _ ->
            (match IO.Path.GetFileName(IO.Path.TrimEndingDirectorySeparator c) with
             | null -> "model"
             | n -> n),
            c
        | None, p ->
            let p = defaultArg p "fashion"
            p, HiMar.Runtime.Catalog.ShippedModels.Find p

    let useEma =
        HiMar.Runtime.Catalog.WeightsChoice.UseEma(args.TryGetResult EvalArgs.Weights |> Option.toObj)

    use model =
        HiMar.Runtime.Checkpoints.ReferenceImport.LoadModel(ckpt, useEma, args.Contains EvalArgs.Allow_Nonfinite, warn)

    if not (HiMar.Runtime.Catalog.ModelTraits.IsFashionMnist model.Config) then
        usageError
            "himar eval samples Fashion-MNIST models (32x32 tokens of stride 4, 10 classes); for ImageNet, score a folder of samples with --inception FILE --images DIR"

    let tokenizer =
        HiMar.Runtime.Catalog.ModelTraits.Tokenizer(
            model.Config,
            ckpt,
            Option.toObj (args.TryGetResult EvalArgs.Vae),
            args.Contains EvalArgs.Allow_Nonfinite,
            warn
        )
        |> function
            | NonNull t -> t
            | Null -> usageError "himar eval needs --vae to decode this model's latents"

    let clfDir = HiMar.Runtime.Catalog.ShippedModels.ClassifierDir
    use classifier = HiMar.Runtime.Evaluation.ClassifierRuns.Load clfDir

    let options =
        (samplerFlags
            args
            (precisionOn (args.GetResult(EvalArgs.Precision, defaultValue = "fp32")) TorchSharp.torch.CPU))
            .Over(HiMar.Runtime.Sampling.SamplerDefaults.ForModel(ckpt, model.Config).Clipped())

    let count = args.GetResult(EvalArgs.N, defaultValue = 1000)
    let out = args.GetResult(EvalArgs.Out, defaultValue = IO.Path.Combine("eval", name))

    let textEncoder: HiMar.Model.ITextEncoder | null =
        match args.TryGetResult EvalArgs.Text_Encoder with
        | Some dir -> HiMar.Runtime.Text.TextEncoders.Load dir
        | None -> null

    use _ = textEncoder

    let result =
        withProgress (fun add ->
            let task = add (sprintf "sampling %d images" count) count

            HiMar.Runtime.Evaluation.EvalJob.Run(
                model,
                ckpt,
                useEma,
                classifier,
                IO.Path.Combine(clfDir, "train-stats.npz"),
                count,
                options,
                args.GetResult(EvalArgs.Seed, defaultValue = 0L),
                out,
                args.GetResult(EvalArgs.Batch, defaultValue = 50),
                (fun d _ -> task.Set d),
                textEncoder,
                args.Contains Training_Templates,
                tokenizer
            ))

    let metrics = nonNull result.Report.["metrics"]

    let number (key: string) =
        sprintf "%.3f" ((nonNull metrics.[key]).GetValue<float>())

    printMetrics
        [
            "FD-FMNIST", number "fd_fmnist"
            "class accuracy", number "class_accuracy"
            "images", sprintf "%d (%d reused)" count result.Reused
            if model.Config.Text.Conditioning = HiMar.Model.Conditioning.Text then
                "prompts",
                (if args.Contains Training_Templates then
                     "training caption templates"
                 else
                     "held-out caption templates")
        ]
        (IO.Path.Combine(out, "eval.json"))


/// `himar eval --inception`: FID, Inception Score and precision/recall of a folder of generated images.
let private evalImages (args: ParseResults<EvalArgs>) (weights: string) =
    let images =
        match args.TryGetResult EvalArgs.Images with
        | Some d -> d
        | None -> usageError ("eval --inception needs --images DIR, the folder of generated images to score")

    let refStats, refImages =
        match args.TryGetResult EvalArgs.Ref_Stats, args.TryGetResult EvalArgs.Ref_Images with
        | Some s, None -> s, null
        | None, Some d -> null, d
        | _ -> usageError ("eval --inception needs exactly one of --ref-stats FILE.npz and --ref-images DIR")

    let name =
        match IO.Path.GetFileName(IO.Path.TrimEndingDirectorySeparator images) with
        | null
        | "" -> "images"
        | n -> n

    let out = args.GetResult(EvalArgs.Out, defaultValue = IO.Path.Combine("eval", name))
    use model = inception weights (args.TryGetResult EvalArgs.Device)

    let result =
        withProgress (fun add ->
            let tasks = Collections.Generic.Dictionary<string, Counter>()

            HiMar.Runtime.Evaluation.ImageNetEval.Run(
                model,
                weights,
                images,
                refStats,
                refImages,
                out,
                args.GetResult(EvalArgs.Batch, defaultValue = 50),
                fun what d total ->
                    match tasks.TryGetValue what with
                    | true, t -> t.Set d
                    | _ ->
                        let t = add (sprintf "Inception features of %s" what) total
                        tasks.[what] <- t
                        t.Set d
            ))

    let metrics = nonNull result.Report.["metrics"]

    let value (key: string) =
        match metrics.[key] with
        | null -> "-"
        | v -> sprintf "%.4f" (v.GetValue<float>())

    printMetrics
        [
            "FID", value "fid"
            "Inception Score", sprintf "%s ± %s" (value "inception_score") (value "inception_score_std")
            "precision", value "precision"
            "recall", value "recall"
            "images", string ((nonNull result.Report.["images"]).GetValue<int>())
        ]
        (IO.Path.Combine(out, "eval.json"))

/// Runs `himar eval`: with --inception the ImageNet metrics of an image folder, else a Fashion-MNIST model's samples.
let run (args: ParseResults<EvalArgs>) =
    match args.TryGetResult EvalArgs.Inception with
    | Some weights -> evalImages args weights
    | None -> evalSamples args
