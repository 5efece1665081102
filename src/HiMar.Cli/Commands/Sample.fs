/// `himar sample`: two-phase sampling, VAE decoding, PNG files and a labelled grid.
module HiMar.Cli.Commands.Sample

open System
open Argu
open TorchSharp
open HiMar.Runtime
open HiMar.Runtime.Catalog
open HiMar.Runtime.Sampling
open HiMar.Cli.Commands.Common

/// Arguments of `himar sample`.
type SampleArgs =
    | Preset of name: string
    | [<AltCommandLine("-c")>] Checkpoint of path: string
    | Vae of path: string
    | Classes of ``list``: string
    | [<AltCommandLine("-n")>] N of count: int
    | Per_Class of count: int
    | Cfg of scale: float
    | Re_Cfg of scale: float
    | Guidance of ``full|no-phase2|off``: string
    | Schedule of ``linear|constant``: string
    | Re_Schedule of ``linear|constant``: string
    | Temperature of t: float
    | Num_Iter of steps: int
    | Phase1_Steps of steps: int
    | Mlp_Steps of respacing: string
    | Dit_Steps of respacing: string
    | Seed of seed: int64
    | Batch of size: int
    | Precision of ``fp32|bf16|auto``: string
    | Device of device: string
    | [<AltCommandLine("-o")>] Out of ``dir|file.png``: string
    | Explain
    | Clip
    | Weights of ``ema|model``: string
    | Prompt of text: string
    | Unconditional
    | Text_Encoder of dir: string
    | Allow_Nonfinite

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Allow_Nonfinite -> AllowNonfiniteHelp
            | Preset _ ->
                "a shipped model: fashion (Hi-MAR, Fashion-MNIST classes), fashion-mar (plain MAR, the same classes) or fashion-text (Hi-MAR, captions); no data or download needed."
            | Unconditional ->
                "sample the null condition on purpose (no class, the empty caption): -n images (default 1); an empty --prompt is refused."
            | Prompt _ ->
                "text models: a caption, e.g. \"a sandal\" (repeat the flag for several; default with --preset fashion-text: one caption per class)."
            | Text_Encoder _ ->
                "text models with an external encoder: a CLIP text-model folder (model.safetensors, config.json, vocab.json, merges.txt)."
            | Checkpoint _ ->
                "the model instead of a preset: an imported folder, a training checkpoint folder, a reference .pth (EMA weights), or a parity fixture folder."
            | Vae _ ->
                "the KL autoencoder of a latent model: an imported folder, MAR's vae.ckpt, or a safetensors file."
            | Classes _ ->
                "comma-separated classes: numbers, or names for Fashion-MNIST models, e.g. sneaker,bag or 7,8 (default: every class with --preset, else 0,1,2,3)."
            | N _ ->
                "this many random classes (from the seed) instead of --classes; with a text model, images per caption (default 6 with --preset and no --prompt, 8 with --preset and --prompt, else 1)."
            | Per_Class _ -> "images per class (default 6 with --preset, else 1)."
            | Cfg _ ->
                "phase-2 (dense-token) guidance scale, 1 = off (default: the model's sampling.json, 7 for the shipped models; 1 without one)."
            | Re_Cfg _ ->
                "phase-1 (pivot) guidance scale, 1 = off (default: the model's sampling.json, 7 for the shipped models; 1 without one)."
            | Guidance _ -> "full (default), no-phase2 (the paper's 'without CFG': phase 2 unguided) or off."
            | Schedule _ ->
                "how guidance grows over the steps: linear (default) or constant (phase 2, and phase 1 unless --re-schedule)."
            | Re_Schedule _ -> "the phase-1 guidance schedule: linear or constant (default: as --schedule)."
            | Temperature _ ->
                "sampling temperature (default: the model's sampling.json, 1.0 for the shipped models; 1 without one)."
            | Num_Iter _ ->
                "phase-2 steps (default: the model's sampling.json, 2 for the shipped models; 4 without one)."
            | Phase1_Steps _ ->
                "phase-1 steps (default: the model's, 4 x the pivot grid's side: 16 for the shipped models)."
            | Mlp_Steps _ ->
                "respacing of the MLP head's diffusion: N, ddimN or N1,N2,... (default: the model's sampling.json, 100 for the shipped models; without one, the model's num_sampling_steps)."
            | Dit_Steps _ ->
                "respacing of the Transformer head's diffusion (default: the model's sampling.json, 100 for the shipped models; without one, the model's dit_head_sampling_steps)."
            | Seed _ -> "run seed (default 0); image i is the same for a seed whatever the batch size."
            | Precision _ -> SamplePrecisionHelp
            | Batch _ -> "images per batch (default 64 for pixel-space models such as the shipped ones, else 8)."
            | Device _ -> DeviceHelp
            | Out _ ->
                "an output folder (images/ and grid.png), or a .png path to write only the grid (default: <preset>.png with --preset, else samples/)."
            | Explain ->
                "also write per image a strip: the pivots after every phase-1 step, then the image after every phase-2 step, the tokens decided at each step outlined."
            | Clip ->
                "clamp predicted x0 to [-1, 1] (default: the model's sampling.json, on for the shipped models; without one, on for pixel-space models)."
            | Weights _ -> WeightsHelp

/// Runs `himar sample`.
let run (args: ParseResults<SampleArgs>) =
    Native.TorchNative.EnsureLoaded()
    let dev = device (args.GetResult(Device, defaultValue = "cpu"))
    let preset = args.TryGetResult Preset

    let ckpt =
        match preset, args.TryGetResult Checkpoint with
        | _, Some c -> c
        | Some p, None -> ShippedModels.Find p
        | None, None -> usageError "himar sample needs --checkpoint (or --preset fashion)"

    let useEma = WeightsChoice.UseEma(args.TryGetResult Weights |> Option.toObj)
    let allowNonFinite = args.Contains Allow_Nonfinite

    use model =
        Checkpoints.ReferenceImport.LoadModel(ckpt, useEma, allowNonFinite, warn)

    model.``to`` dev |> ignore
    let config = model.Config

    let tokenizer: Data.ITokenizer =
        match ModelTraits.Tokenizer(config, ckpt, Option.toObj (args.TryGetResult Vae), allowNonFinite, warn, dev) with
        | NonNull t -> t
        | Null -> usageError "himar sample needs --vae to decode this model's latents"

    let textModel = config.Text.Conditioning = HiMar.Model.Conditioning.Text

    let conditions =
        SampleConditions.Resolve(
            config,
            SampleAsk(
                Classes = Option.toObj (args.TryGetResult Classes),
                N = Option.toNullable (args.TryGetResult N),
                PerClass = Option.toNullable (args.TryGetResult Per_Class),
                Prompts = ResizeArray(args.GetResults Prompt),
                Unconditional = args.Contains Unconditional,
                Shipped = preset.IsSome,
                Seed = args.GetResult(Seed, defaultValue = 0L)
            )
        )

    let textEncoder: HiMar.Model.ITextEncoder | null =
        match args.TryGetResult Text_Encoder with
        | Some dir when textModel -> Text.TextEncoders.Load(dir, dev)
        | Some _ -> usageError "--text-encoder is for text models"
        | None -> null

    use _ = textEncoder
    let precision = precisionOn (args.GetResult(Precision, defaultValue = "auto")) dev

    let options =
        (samplerFlags args precision).Over(SamplerDefaults.ForModel(ckpt, config))

    let out =
        args.GetResult(
            Out,
            defaultValue =
                (match preset with
                 | Some p -> p.ToLowerInvariant() + ".png"
                 | None -> "samples")
        )

    let gridOnly = out.EndsWith(".png", StringComparison.OrdinalIgnoreCase)

    let request =
        SampleRequest(
            Labels = conditions.Labels,
            Prompts = conditions.Prompts,
            TextEncoder = textEncoder,
            Seed = args.GetResult(Seed, defaultValue = 0L),
            BatchSize = args.GetResult(Batch, defaultValue = (if ModelTraits.UsesPixelPatches config then 64 else 8)),
            OutDir =
                (if gridOnly then
                     (match IO.Path.GetDirectoryName(IO.Path.GetFullPath out) with
                      | null -> "."
                      | d -> d)
                 else
                     out),
            GridPath = (if gridOnly then out else null),
            Columns = conditions.Columns,
            ClassNames = ModelTraits.ClassNames config,
            Explain = args.Contains Explain,
            Options = options
        )

    let total = request.Count

    let output =
        withProgress (fun add ->
            let images = add (sprintf "sampling %d images" total) total

            let steps =
                if interactive () then
                    Some(add "current batch" 100)
                else
                    None

            SampleJob.Run(
                model,
                tokenizer,
                request,
                fun doneImages p ->
                    images.Set doneImages

                    match steps with
                    | Some s when p.Steps > 0 ->
                        let frac =
                            (float p.Step + float p.DiffusionStep / float p.DiffusionSteps) / float p.Steps

                        s.Set(int (100.0 * frac), sprintf "phase %d, step %d/%d" p.Phase (p.Step + 1) p.Steps)
                    | _ -> ()
            ))

    printfn
        "sampled %d images; wrote %s%s in %.1f s"
        total
        output.Grid
        (if output.Explanations.Count > 0 then
             sprintf " and %d explanation strips" output.Explanations.Count
         else
             "")
        output.Seconds

    0
