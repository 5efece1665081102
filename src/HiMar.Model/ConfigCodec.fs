namespace HiMar.Model

open System
open System.Collections.Generic
open System.Globalization
open System.Text.Json.Nodes

/// One reference argument: its JSON name and type, how it is read into a config and how a config writes it.
type internal Argument =
    {
        Name: string
        Kind: ArgumentKind
        /// Sets the field from the arguments (keeping the current value when the argument is absent).
        Read: ArgumentReader -> HiMarConfig -> HiMarConfig
        /// The JSON value a config writes, or None where the file leaves the argument out.
        Write: HiMarConfig -> JsonNode option
    }

/// The one codec between `HiMarConfig` and the reference's argument JSON (snake_case keys, the format of config
/// files, imported folders, checkpoints and parity fixtures), with the checks of a config's values.
module ConfigCodec =
    let private node (v: JsonValue) = Some(v :> JsonNode)

    let private whole name (get: HiMarConfig -> int) set =
        {
            Name = name
            Kind = ArgumentKind.WholeNumber
            Read = fun r c -> set (r.Whole(name, get c)) c
            Write = fun c -> node (JsonValue.Create(get c))
        }

    let private real name (get: HiMarConfig -> float) set =
        {
            Name = name
            Kind = ArgumentKind.Number
            Read = fun r c -> set (r.Real(name, get c)) c
            Write = fun c -> node (JsonValue.Create(get c))
        }

    let private text name (get: HiMarConfig -> string) set =
        {
            Name = name
            Kind = ArgumentKind.Text
            Read = fun r c -> set (r.Text(name, get c)) c
            Write = fun c -> node (JsonValue.Create(get c: string) |> nonNull)
        }

    let private flag name (get: HiMarConfig -> bool) set =
        {
            Name = name
            Kind = ArgumentKind.Boolean
            Read = fun r c -> set (r.Flag(name, get c)) c
            Write = fun c -> node (JsonValue.Create(get c))
        }

    let private choice name (table: (string * 'T) list) (get: HiMarConfig -> 'T) set =
        {
            Name = name
            Kind = ArgumentKind.Text
            Read = fun r c -> set (r.Choice(name, table, get c)) c
            Write = fun c -> node (JsonValue.Create(AblationNames.nameOf table (get c): string) |> nonNull)
        }

    /// Written only where `keep` holds (our extensions appear only where a model differs from Hi-MAR).
    let private writtenWhen keep (a: Argument) =
        { a with
            Write = fun c -> if keep c then a.Write c else None
        }

    let private isText (c: HiMarConfig) = c.Text.Conditioning = Conditioning.Text

    let private isBuiltin (c: HiMarConfig) =
        isText c && c.Text.Encoder = TextEncoderKind.Builtin

    /// Every argument a config reads and writes, in the order of the written files: the reference's `HiMAR(...)`
    /// arguments, then ours (ablation switches and text settings).
    let internal arguments =
        [
            whole "img_size" (fun c -> c.Backbone.ImageSize) (fun v c -> { c with Backbone.ImageSize = v })
            whole "vae_stride" (fun c -> c.Backbone.VaeStride) (fun v c -> { c with Backbone.VaeStride = v })
            whole "patch_size" (fun c -> c.Backbone.PatchSize) (fun v c -> { c with Backbone.PatchSize = v })
            whole "encoder_embed_dim" (fun c -> c.Backbone.EncoderWidth) (fun v c ->
                { c with Backbone.EncoderWidth = v })
            whole "encoder_depth" (fun c -> c.Backbone.EncoderDepth) (fun v c -> { c with Backbone.EncoderDepth = v })
            whole "encoder_num_heads" (fun c -> c.Backbone.EncoderHeads) (fun v c ->
                { c with Backbone.EncoderHeads = v })
            // The decoder defaults to the encoder's settings (as the reference's argparse defaults do), not the base's.
            { whole "decoder_embed_dim" (fun c -> c.Backbone.DecoderWidth) (fun v c ->
                  { c with Backbone.DecoderWidth = v }) with
                Read =
                    fun r c ->
                        { c with
                            Backbone.DecoderWidth = r.Whole("decoder_embed_dim", c.Backbone.EncoderWidth)
                        }
            }
            { whole "decoder_depth" (fun c -> c.Backbone.DecoderDepth) (fun v c -> { c with Backbone.DecoderDepth = v }) with
                Read =
                    fun r c ->
                        { c with
                            Backbone.DecoderDepth = r.Whole("decoder_depth", c.Backbone.EncoderDepth)
                        }
            }
            { whole "decoder_num_heads" (fun c -> c.Backbone.DecoderHeads) (fun v c ->
                  { c with Backbone.DecoderHeads = v }) with
                Read =
                    fun r c ->
                        { c with
                            Backbone.DecoderHeads = r.Whole("decoder_num_heads", c.Backbone.EncoderHeads)
                        }
            }
            real "mlp_ratio" (fun c -> c.Backbone.MlpRatio) (fun v c -> { c with Backbone.MlpRatio = v })
            whole "vae_embed_dim" (fun c -> c.Backbone.LatentChannels) (fun v c ->
                { c with Backbone.LatentChannels = v })
            real "mask_ratio_min" (fun c -> c.Training.MaskRatioMin) (fun v c -> { c with Training.MaskRatioMin = v })
            real "label_drop_prob" (fun c -> c.Training.LabelDropProb) (fun v c ->
                { c with Training.LabelDropProb = v })
            whole "class_num" (fun c -> c.Backbone.ClassCount) (fun v c -> { c with Backbone.ClassCount = v })
            real "attn_dropout" (fun c -> c.Backbone.AttentionDropout) (fun v c ->
                { c with Backbone.AttentionDropout = v })
            real "proj_dropout" (fun c -> c.Backbone.ProjectionDropout) (fun v c ->
                { c with
                    Backbone.ProjectionDropout = v
                })
            whole "buffer_size" (fun c -> c.Backbone.BufferSize) (fun v c -> { c with Backbone.BufferSize = v })
            whole "diffloss_d" (fun c -> c.MlpHead.Depth) (fun v c -> { c with MlpHead.Depth = v })
            whole "diffloss_w" (fun c -> c.MlpHead.Width) (fun v c -> { c with MlpHead.Width = v })
            text "num_sampling_steps" (fun c -> c.MlpHead.SamplingSteps) (fun v c ->
                { c with MlpHead.SamplingSteps = v })
            text "dit_head_sampling_steps" (fun c -> c.TransformerHead.SamplingSteps) (fun v c ->
                { c with
                    TransformerHead.SamplingSteps = v
                })
            whole "diffusion_batch_mul" (fun c -> c.Training.DiffusionBatchMul) (fun v c ->
                { c with
                    Training.DiffusionBatchMul = v
                })
            whole "cond_scale" (fun c -> c.Pivots.GridSide) (fun v c -> { c with Pivots.GridSide = v })
            whole "cond_dim" (fun c -> c.Pivots.Channels) (fun v c -> { c with Pivots.Channels = v })
            whole "gdm_w" (fun c -> c.TransformerHead.Width) (fun v c -> { c with TransformerHead.Width = v })
            whole "gdm_d" (fun c -> c.TransformerHead.Depth) (fun v c -> { c with TransformerHead.Depth = v })
            whole "head" (fun c -> c.TransformerHead.Heads) (fun v c -> { c with TransformerHead.Heads = v })
            real "ratio" (fun c -> c.TransformerHead.MlpRatio) (fun v c -> { c with TransformerHead.MlpRatio = v })
            flag "cos" (fun c -> c.Training.CosineDenseMasking) (fun v c ->
                { c with
                    Training.CosineDenseMasking = v
                })
            whole "step_warmup" (fun c -> c.Training.PivotConditionWarmupEpochs) (fun v c ->
                { c with
                    Training.PivotConditionWarmupEpochs = v
                })
            real "step_stage2_rate" (fun c -> c.Training.PivotConditionRate) (fun v c ->
                { c with
                    Training.PivotConditionRate = v
                })
            choice "pivots" AblationNames.pivots (fun c -> c.Pivots.Source) (fun v c -> { c with Pivots.Source = v })
            |> writtenWhen (fun c -> c.Pivots.Source <> PivotSource.ConditionalTokens)
            choice "phase2_head" AblationNames.phase2Heads (fun c -> c.Phase2Head) (fun v c ->
                { c with Phase2Head = v })
            |> writtenWhen (fun c -> c.Phase2Head <> Phase2Head.Transformer)
            flag "scale_aware" (fun c -> c.Backbone.ScaleAware) (fun v c -> { c with Backbone.ScaleAware = v })
            |> writtenWhen (fun c -> not c.Backbone.ScaleAware)
            choice "mask_ratio" AblationNames.maskRatios (fun c -> c.Training.MaskRule) (fun v c ->
                { c with Training.MaskRule = v })
            |> writtenWhen (fun c -> c.Training.MaskRule <> MaskRatioRule.Reference)
            choice "conditioning" AblationNames.conditionings (fun c -> c.Text.Conditioning) (fun v c ->
                { c with Text.Conditioning = v })
            |> writtenWhen isText
            choice "text_encoder" AblationNames.textEncoders (fun c -> c.Text.Encoder) (fun v c ->
                { c with Text.Encoder = v })
            |> writtenWhen isText
            choice "null_context" AblationNames.nullContexts (fun c -> c.Text.NullContext) (fun v c ->
                { c with Text.NullContext = v })
            |> writtenWhen isText
            whole "context_dim" (fun c -> c.Text.ExternalWidth) (fun v c -> { c with Text.ExternalWidth = v })
            |> writtenWhen (fun c -> isText c && not (isBuiltin c))
            whole "text_width" (fun c -> c.Text.Width) (fun v c -> { c with Text.Width = v })
            |> writtenWhen isBuiltin
            whole "text_depth" (fun c -> c.Text.Depth) (fun v c -> { c with Text.Depth = v })
            |> writtenWhen isBuiltin
            whole "text_heads" (fun c -> c.Text.Heads) (fun v c -> { c with Text.Heads = v })
            |> writtenWhen isBuiltin
            {
                Name = "text_vocab"
                Kind = ArgumentKind.Words
                Read =
                    fun r c ->
                        { c with
                            Text.Vocabulary = r.Words("text_vocab", c.Text.Vocabulary)
                        }
                Write =
                    fun c ->
                        if isBuiltin c then
                            Some(
                                JsonArray(
                                    c.Text.Vocabulary
                                    |> Array.map (fun w -> JsonValue.Create(w: string) |> nonNull :> JsonNode)
                                )
                            )
                        else
                            None
            }
        ]

    /// The JSON type of each reference argument (and of ours: the ablation and text switches) that a config file
    /// may hold. `model` names the preset the file starts from; `two_diffloss`, `global_dm` and
    /// `grad_checkpointing` are reference arguments that do not change the model (always on, or memory only).
    [<CompiledName("ArgumentKinds")>]
    let argumentKinds: IReadOnlyDictionary<string, ArgumentKind> =
        readOnlyDict
            [
                for a in arguments -> a.Name, a.Kind
                yield "model", ArgumentKind.Text
                for name in [ "two_diffloss"; "global_dm"; "grad_checkpointing" ] -> name, ArgumentKind.Boolean
            ]

    /// A config from the reference's `HiMAR(...)` keyword arguments or argparse fields (boxed int, float,
    /// string or bool by name), starting from `baseConfig` for anything absent. Unknown names are ignored (a
    /// checkpoint's argparse Namespace holds the training arguments too); a value of the wrong type (text for a
    /// number, 128.5 for a whole number) raises an ArgumentException naming the field.
    [<CompiledName("FromReferenceArgs")>]
    let fromReferenceArgs (baseConfig: HiMarConfig) (args: IReadOnlyDictionary<string, obj>) =
        let reader = ArgumentReader args
        arguments |> List.fold (fun c a -> a.Read reader c) baseConfig

    /// The reference-argument JSON of a config (the format of `--config` files and imported folders): the
    /// reference's arguments, then ours where the model differs from Hi-MAR (reference files stay as they are).
    [<CompiledName("ToJson")>]
    let toJson (c: HiMarConfig) =
        let json = JsonObject()

        for a in arguments do
            match a.Write c with
            | Some v -> json[a.Name] <- v
            | None -> ()

        json

    /// The ranges of the whole-number settings, by JSON name: (name, value, least, most). The upper bounds are
    /// sanity limits far above any published model, so that a typo fails here instead of in a native allocation.
    let private wholeRanges (c: HiMarConfig) =
        [
            "img_size", c.Backbone.ImageSize, 1, 16384
            "vae_stride", c.Backbone.VaeStride, 1, 1024
            "patch_size", c.Backbone.PatchSize, 1, 64
            "encoder_embed_dim", c.Backbone.EncoderWidth, 1, 65536
            "encoder_depth", c.Backbone.EncoderDepth, 1, 1000
            "encoder_num_heads", c.Backbone.EncoderHeads, 1, 1024
            "decoder_embed_dim", c.Backbone.DecoderWidth, 1, 65536
            "decoder_depth", c.Backbone.DecoderDepth, 1, 1000
            "decoder_num_heads", c.Backbone.DecoderHeads, 1, 1024
            "vae_embed_dim", c.Backbone.LatentChannels, 1, 4096
            "class_num", c.Backbone.ClassCount, 1, 1000000
            "buffer_size", c.Backbone.BufferSize, 1, 4096
            "diffloss_d", c.MlpHead.Depth, 1, 1000
            "diffloss_w", c.MlpHead.Width, 1, 65536
            "diffusion_batch_mul", c.Training.DiffusionBatchMul, 1, 64
            "cond_scale", c.Pivots.GridSide, 1, 1024
            "cond_dim", c.Pivots.Channels, 1, 4096
            "gdm_w", c.TransformerHead.Width, 1, 65536
            "gdm_d", c.TransformerHead.Depth, 1, 1000
            "head", c.TransformerHead.Heads, 1, 1024
            "step_warmup", c.Training.PivotConditionWarmupEpochs, 0, 100000000
            "diffusion_steps", c.Training.DiffusionSteps, 1, 100000
            if c.Text.Conditioning = Conditioning.Text then
                if c.Text.Encoder = TextEncoderKind.Builtin then
                    "text_width", c.Text.Width, 1, 65536
                    "text_depth", c.Text.Depth, 1, 1000
                    "text_heads", c.Text.Heads, 1, 1024
                else
                    "context_dim", c.Text.ExternalWidth, 1, 65536
        ]

    /// The ranges of the real-valued settings: (name, value, least, most, most included).
    let private realRanges (c: HiMarConfig) =
        [
            "mlp_ratio", c.Backbone.MlpRatio, 0.0, 64.0, true
            "ratio", c.TransformerHead.MlpRatio, 0.0, 64.0, true
            "mask_ratio_min", c.Training.MaskRatioMin, 0.0, 1.0, true
            "label_drop_prob", c.Training.LabelDropProb, 0.0, 1.0, true
            "attn_dropout", c.Backbone.AttentionDropout, 0.0, 1.0, false
            "proj_dropout", c.Backbone.ProjectionDropout, 0.0, 1.0, false
            "step_stage2_rate", c.Training.PivotConditionRate, 0.0, 1.0, true
            "layer_norm_eps", c.Backbone.LayerNormEps, 0.0, 1.0, true
            "phase1_loss_weight", c.Training.Phase1LossWeight, 0.0, 1e6, true
            "phase2_loss_weight", c.Training.Phase2LossWeight, 0.0, 1e6, true
        ]

    let private respacing =
        System.Text.RegularExpressions.Regex(@"^\s*(ddim[1-9][0-9]{0,5}|[0-9]{1,6}(\s*,\s*[0-9]{1,6})*)?\s*$")

    /// Checks every setting: ranges first (whole numbers, finite reals, respacing syntax), then, when those hold, the
    /// relations the architecture depends on (widths divisible by heads, the image by the token stride, ...).
    /// Returns every problem found, each naming the JSON field.
    [<CompiledName("Validate")>]
    let validate (c: HiMarConfig) =
        let ranges =
            [
                for name, value, lo, hi in wholeRanges c do
                    if value < lo || value > hi then
                        sprintf "%s must be a whole number from %d to %d, not %d" name lo hi value
                for name, value, lo, hi, hiClosed in realRanges c do
                    let below = if hiClosed then value <= hi else value < hi

                    if not (System.Double.IsFinite value) || value < lo || not below then
                        sprintf
                            "%s must be a number from %g to %g%s, not %s"
                            name
                            lo
                            hi
                            (if hiClosed then "" else " (excluded)")
                            (value.ToString System.Globalization.CultureInfo.InvariantCulture)
                if
                    c.Backbone.MlpRatio > 0.0
                    && int (float c.Backbone.EncoderWidth * c.Backbone.MlpRatio) < 1
                then
                    sprintf
                        "mlp_ratio %g makes an MLP of no units at width %d"
                        c.Backbone.MlpRatio
                        c.Backbone.EncoderWidth
                for name, spec in
                    [
                        "num_sampling_steps", c.MlpHead.SamplingSteps
                        "dit_head_sampling_steps", c.TransformerHead.SamplingSteps
                    ] do
                    if not (respacing.IsMatch spec) then
                        sprintf "%s must be a respacing such as \"100\" or \"ddim25\", not \"%s\"" name spec
            ]

        if not ranges.IsEmpty then
            ranges
        else
            [
                if c.Backbone.ImageSize % (c.Backbone.VaeStride * c.Backbone.PatchSize) <> 0 then
                    sprintf
                        "img_size %d is not a multiple of vae_stride * patch_size = %d"
                        c.Backbone.ImageSize
                        (c.Backbone.VaeStride * c.Backbone.PatchSize)
                if c.Backbone.EncoderWidth % c.Backbone.EncoderHeads <> 0 then
                    sprintf
                        "encoder width %d is not divisible by %d heads"
                        c.Backbone.EncoderWidth
                        c.Backbone.EncoderHeads
                if c.Backbone.DecoderWidth % c.Backbone.DecoderHeads <> 0 then
                    sprintf
                        "decoder width %d is not divisible by %d heads"
                        c.Backbone.DecoderWidth
                        c.Backbone.DecoderHeads
                if c.Backbone.EncoderWidth <> c.Backbone.DecoderWidth then
                    // The reference's mask token has the encoder's width but is placed in the decoder's sequence.
                    sprintf
                        "encoder width %d differs from decoder width %d (the reference needs them equal)"
                        c.Backbone.EncoderWidth
                        c.Backbone.DecoderWidth
                if c.TransformerHead.Width % c.TransformerHead.Heads <> 0 then
                    sprintf
                        "Transformer head width %d is not divisible by %d heads"
                        c.TransformerHead.Width
                        c.TransformerHead.Heads
                if c.Pivots.Source <> PivotSource.NoPivots && c.Pivots.Channels <> c.TokenEmbedDim then
                    sprintf
                        "cond_dim %d must equal the token channels %d (sampled pivots are written as tokens)"
                        c.Pivots.Channels
                        c.TokenEmbedDim
                if c.Phase2Head = Phase2Head.Transformer && c.Backbone.PatchSize <> 1 then
                    sprintf "the Transformer head needs patch_size 1, not %d" c.Backbone.PatchSize
                if c.Text.Conditioning = Conditioning.Text then
                    if c.Text.Encoder = TextEncoderKind.Builtin then
                        if c.Text.Vocabulary.Length = 0 then
                            "the built-in text encoder needs a vocabulary (text_vocab)"

                        if c.Text.Width % c.Text.Heads <> 0 then
                            sprintf "text width %d is not divisible by %d heads" c.Text.Width c.Text.Heads
            ]
