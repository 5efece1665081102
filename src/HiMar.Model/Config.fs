namespace HiMar.Model

/// Where the phase-2 pivots come from (the ablation of the paper's Table 5).
type PivotSource =
    /// Plain MAR: no phase 1; the dense tokens are generated alone.
    | NoPivots = 0
    /// Phase 2 sees the ground-truth (or sampled) low-resolution latents through `cond_proj`.
    | LowResTokens = 1
    /// Hi-MAR: phase 2 sees the pivots' conditional tokens (phase-1 decoder states) through `cond_z_proj`.
    | ConditionalTokens = 2

/// Which diffusion head denoises the dense tokens in phase 2 (Table 5).
type Phase2Head =
    /// The per-token MLP head (as MAR and phase 1).
    | Mlp = 0
    /// The Diffusion Transformer head that denoises all tokens together (Hi-MAR).
    | Transformer = 1

/// What a model is conditioned on.
type Conditioning =
    /// A class label (ImageNet's 1000 classes): one embedding repeated over the buffer slots (the reference).
    | Class = 0
    /// A caption: a sequence of L text embeddings, projected to the encoder width, one per buffer slot.
    | Text = 1

/// Where a text model's context embeddings come from.
type TextEncoderKind =
    /// Computed outside the model (CLIP, precomputed shards): the model receives (B, L, ContextDim) tensors.
    | External = 0
    /// A small word-level Transformer inside the model (`text_encoder.*`), trained jointly; for short captions.
    | Builtin = 1

/// The unconditional input of classifier-free guidance for text models.
type NullContextKind =
    /// The empty caption's embedding (stored as `empty_context` for external encoders).
    | Empty = 0
    /// A learned (L, E) context (`fake_context`).
    | Learned = 1

/// How the training mask ratios are drawn.
type MaskRatioRule =
    /// The reference: truncated normal on [mask_ratio_min, 1] for the pivots, cosine or truncated normal for the
    /// dense tokens.
    | Reference = 0
    /// Beta(4, 1) for both phases (the paper's text-to-image setting, after AutoNAT): mean 0.8, mode 1.
    | Beta41 = 1

/// Every setting of a Hi-MAR model: the reference `HiMAR(...)` arguments (models/himar.py) plus the values the
/// reference hard-wires (DiT head grid, "no class" label, loss weights), which here derive from the config.
type HiMarConfig =
    {
        /// Image side in pixels (256).
        ImgSize: int
        /// VAE downsampling factor (16).
        VaeStride: int
        /// Tokens per side of one patch of latents (1).
        PatchSize: int
        EncoderEmbedDim: int
        EncoderDepth: int
        EncoderNumHeads: int
        DecoderEmbedDim: int
        DecoderDepth: int
        DecoderNumHeads: int
        MlpRatio: float
        /// Latent channels of the tokenizer (16 for KL-16).
        VaeEmbedDim: int
        MaskRatioMin: float
        LabelDropProb: float
        ClassNum: int
        AttnDropout: float
        ProjDropout: float
        BufferSize: int
        /// MLP head (phase 1): depth and width.
        DiffLossD: int
        DiffLossW: int
        /// Respacing of the MLP head's sampling diffusion ("100", "ddim25", ...).
        NumSamplingSteps: string
        /// Respacing of the Transformer head's sampling diffusion (the reference hard-codes "250").
        DitSamplingSteps: string
        DiffusionBatchMul: int
        /// Side of the pivot grid (8: the latent of a 128x128 image).
        CondScale: int
        /// Channels of a pivot token (equal to the token channels).
        CondDim: int
        /// Transformer head (phase 2): width, depth, heads and MLP ratio (`gdm_w`, `gdm_d`, `head`, `ratio`).
        GdmW: int
        GdmD: int
        GdmHeads: int
        GdmMlpRatio: float
        /// Phase-2 masking: cosine rule (true) or truncated normal from 0.38.
        Cos: bool
        /// Pivot-condition dropout: the placeholder probability falls from 1 to 1 - StepStage2Rate over StepWarmup epochs.
        StepWarmup: int
        StepStage2Rate: float
        /// LayerNorm eps of the backbone (1e-6 in the reference presets).
        LayerNormEps: float
        /// Loss weights: inside the model (2.0, 0.75), then in the engine (S/L and N/L: 64/320, 256/320).
        Phase1LossWeight: float
        Phase2LossWeight: float
        /// Diffusion steps of the training schedule (1000) and the noise schedule name ("cosine").
        DiffusionSteps: int
        NoiseSchedule: string
        /// Ablation switches (Table 5).
        Pivots: PivotSource
        Phase2: Phase2Head
        /// Scale-aware adaLN blocks (true) or the same modulation for both phases (false).
        ScaleAware: bool
        /// Class labels or text context tokens; text models have `BufferSize` = L context positions.
        Conditioning: Conditioning
        /// Text models: an external encoder's embeddings (width `ContextDim`) or the built-in encoder.
        TextEncoder: TextEncoderKind
        /// Width D of an external encoder's context vectors (768 for CLIP ViT-L/14).
        ContextDim: int
        /// Text models: the null context of guidance and caption dropout.
        NullContext: NullContextKind
        /// The training mask-ratio rule.
        MaskRatio: MaskRatioRule
        /// The built-in text encoder: its word list (id = position + 1; 0 pads), width, depth and heads.
        TextVocab: string[]
        TextWidth: int
        TextDepth: int
        TextHeads: int
    }

    /// Dense grid side: img_size / vae_stride / patch_size (16).
    member c.SeqH = c.ImgSize / c.VaeStride / c.PatchSize
    /// Dense token count N (256).
    member c.DenseTokens = c.SeqH * c.SeqH

    /// Pivot token count S = cond_scale^2 (64); zero without pivots.
    member c.PivotTokens =
        if c.Pivots = PivotSource.NoPivots then
            0
        else
            c.CondScale * c.CondScale

    /// The full sequence L = S + N without buffer (320).
    member c.SeqLen = c.PivotTokens + c.DenseTokens
    /// Channels of one token: vae_embed_dim * patch_size^2 (16).
    member c.TokenEmbedDim = c.VaeEmbedDim * c.PatchSize * c.PatchSize
    /// The "no class" label used for unconditional rows (the reference hard-codes 1000).
    member c.NullClass = c.ClassNum
    /// Phase-1 sampling steps by default: 4 * cond_scale.
    member c.Phase1Steps = 4 * c.CondScale
    /// Text models: context tokens per caption L (the buffer slots they fill).
    member c.ContextLength = c.BufferSize

    /// Width of the context vectors the model receives: the built-in encoder's or the external one's.
    member c.ContextWidth =
        if c.TextEncoder = TextEncoderKind.Builtin then
            c.TextWidth
        else
            c.ContextDim

/// The JSON names of the ablation switches (`pivots`, `phase2_head`; `scale_aware` is a boolean), which our
/// config files add to the reference's arguments when a switch differs from Hi-MAR.
module AblationNames =
    [<CompiledName("Pivots")>]
    let pivots =
        [
            "none", PivotSource.NoPivots
            "low_res", PivotSource.LowResTokens
            "cond_tokens", PivotSource.ConditionalTokens
        ]

    [<CompiledName("Phase2Heads")>]
    let phase2Heads = [ "mlp", Phase2Head.Mlp; "transformer", Phase2Head.Transformer ]

    /// JSON names of the text settings (`conditioning`, `text_encoder`, `null_context`, `mask_ratio`).
    [<CompiledName("Conditionings")>]
    let conditionings = [ "class", Conditioning.Class; "text", Conditioning.Text ]

    [<CompiledName("TextEncoders")>]
    let textEncoders =
        [ "external", TextEncoderKind.External; "builtin", TextEncoderKind.Builtin ]

    [<CompiledName("NullContexts")>]
    let nullContexts =
        [ "empty", NullContextKind.Empty; "learned", NullContextKind.Learned ]

    [<CompiledName("MaskRatios")>]
    let maskRatios =
        [ "reference", MaskRatioRule.Reference; "beta_4_1", MaskRatioRule.Beta41 ]

    /// The JSON name of a switch value.
    [<CompiledName("NameOf")>]
    let nameOf (table: (string * 'T) list) (value: 'T) =
        table |> List.find (fun (_, v) -> v = value) |> fst

/// The JSON type of a config-file argument.
type ArgumentKind =
    /// An integral number (4 or 4.0; not 4.5, not "4").
    | WholeNumber = 0
    /// A finite number.
    | Number = 1
    /// A string.
    | Text = 2
    /// true or false.
    | Boolean = 3
    /// A list of strings.
    | Words = 4

/// Named configurations equal to the reference launch settings.
module HiMarConfig =
    /// Hi-MAR-B: 12 + 12 blocks of width 768 (12 heads), MLP head 6 x 1024, Transformer head 6 x 512 (8 heads).
    /// 244,730,160 parameters.
    [<CompiledName("Base")>]
    let hiMarB =
        {
            ImgSize = 256
            VaeStride = 16
            PatchSize = 1
            EncoderEmbedDim = 768
            EncoderDepth = 12
            EncoderNumHeads = 12
            DecoderEmbedDim = 768
            DecoderDepth = 12
            DecoderNumHeads = 12
            MlpRatio = 4.0
            VaeEmbedDim = 16
            MaskRatioMin = 0.7
            LabelDropProb = 0.1
            ClassNum = 1000
            AttnDropout = 0.1
            ProjDropout = 0.1
            BufferSize = 64
            DiffLossD = 6
            DiffLossW = 1024
            NumSamplingSteps = "100"
            DitSamplingSteps = "250"
            DiffusionBatchMul = 1
            CondScale = 8
            CondDim = 16
            GdmW = 512
            GdmD = 6
            GdmHeads = 8
            GdmMlpRatio = 4.0
            Cos = true
            StepWarmup = 100
            StepStage2Rate = 0.25
            LayerNormEps = 1e-6
            Phase1LossWeight = 2.0
            Phase2LossWeight = 0.75
            DiffusionSteps = 1000
            NoiseSchedule = "cosine"
            Pivots = PivotSource.ConditionalTokens
            Phase2 = Phase2Head.Transformer
            ScaleAware = true
            Conditioning = Conditioning.Class
            TextEncoder = TextEncoderKind.External
            ContextDim = 768
            NullContext = NullContextKind.Empty
            MaskRatio = MaskRatioRule.Reference
            TextVocab = [||]
            TextWidth = 0
            TextDepth = 0
            TextHeads = 0
        }

    /// Hi-MAR-L: 16 + 16 blocks of width 1024 (16 heads), MLP head 8 x 1280, Transformer head 8 x 512 (8 heads).
    /// 529,490,480 parameters.
    [<CompiledName("Large")>]
    let hiMarL =
        { hiMarB with
            EncoderEmbedDim = 1024
            EncoderDepth = 16
            EncoderNumHeads = 16
            DecoderEmbedDim = 1024
            DecoderDepth = 16
            DecoderNumHeads = 16
            DiffLossD = 8
            DiffLossW = 1280
            GdmW = 512
            GdmD = 8
            GdmHeads = 8
        }

    /// Hi-MAR-H: 20 + 20 blocks of width 1280 (16 heads), MLP head 12 x 1536, Transformer head 12 x 768 (12 heads).
    /// 1,090,965,808 parameters.
    [<CompiledName("Huge")>]
    let hiMarH =
        { hiMarB with
            EncoderEmbedDim = 1280
            EncoderDepth = 20
            EncoderNumHeads = 16
            DecoderEmbedDim = 1280
            DecoderDepth = 20
            DecoderNumHeads = 16
            DiffLossD = 12
            DiffLossW = 1536
            GdmW = 768
            GdmD = 12
            GdmHeads = 12
        }

    /// The embedded default: Hi-MAR for Fashion-MNIST on 2 CPU cores. A 28x28 image padded to 32x32 becomes an
    /// 8x8 grid of 4x4 pixel patches (16 values per token) through the pixel-patch tokenizer (so `VaeStride` 4
    /// and 16 token channels); the 16x16 pivot image becomes a 4x4 grid (cond_scale 4). 4 + 4 blocks of width
    /// 128, MLP head 3 x 256, Transformer head 3 x 128: 4,155,952 parameters. `diffusion_batch_mul` 1 (not 4):
    /// on 2 CPU cores the heads' repeated rows would cost more than the extra data they bring in a short run.
    [<CompiledName("Fashion")>]
    let fashion =
        { hiMarB with
            ImgSize = 32
            VaeStride = 4
            VaeEmbedDim = 16
            EncoderEmbedDim = 128
            EncoderDepth = 4
            EncoderNumHeads = 4
            DecoderEmbedDim = 128
            DecoderDepth = 4
            DecoderNumHeads = 4
            ClassNum = 10
            BufferSize = 4
            AttnDropout = 0.0
            ProjDropout = 0.0
            DiffLossD = 3
            DiffLossW = 256
            NumSamplingSteps = "50"
            DitSamplingSteps = "50"
            DiffusionBatchMul = 1
            CondScale = 4
            CondDim = 16
            GdmW = 128
            GdmD = 3
            GdmHeads = 4
            StepWarmup = 2
        }

    /// The ablation's model (Table 5 at small scale): the fashion preset at width 64, 2 + 2 blocks, MLP head
    /// 2 x 128, Transformer head 2 x 64, so that 15 training runs and their evaluations fit in about an hour on
    /// 2 CPU cores. 741,744 parameters.
    [<CompiledName("FashionSmall")>]
    let fashionSmall =
        { fashion with
            EncoderEmbedDim = 64
            EncoderDepth = 2
            DecoderEmbedDim = 64
            DecoderDepth = 2
            DiffLossD = 2
            DiffLossW = 128
            GdmW = 64
            GdmD = 2
        }

    /// The embedded text-to-image default: the fashion preset conditioned on captions ("a photo of a sneaker")
    /// through a built-in word-level text encoder (2 blocks of width 64, 4 heads) trained jointly. A caption is at
    /// most 12 words, so 12 context tokens fill the buffer slots; guidance's null context is the empty caption;
    /// training mask ratios follow Beta(4, 1) as in the paper's text-to-image setting.
    [<CompiledName("FashionText")>]
    let fashionText =
        { fashion with
            BufferSize = 12
            Conditioning = Conditioning.Text
            TextEncoder = TextEncoderKind.Builtin
            NullContext = NullContextKind.Empty
            MaskRatio = MaskRatioRule.Beta41
            TextVocab = FashionCaptions.vocabulary
            TextWidth = 64
            TextDepth = 2
            TextHeads = 4
        }

    /// Hi-MAR-S for text-to-image at 256x256 (the paper's MS-COCO model, "in the spirit of" U-ViT-S/2 (Deep):
    /// width 512, 8 heads, 17 blocks): 8 + 8 blocks of width 512, MLP head 3 x 1024,
    /// Transformer head 4 x 512 (8 heads), conditioned on CLIP ViT-L/14 text features (77 x 768, external:
    /// precomputed with `himar embed-captions`), the empty caption as null context, Beta(4, 1) mask ratios.
    [<CompiledName("Small")>]
    let hiMarS =
        { hiMarB with
            EncoderEmbedDim = 512
            EncoderDepth = 8
            EncoderNumHeads = 8
            DecoderEmbedDim = 512
            DecoderDepth = 8
            DecoderNumHeads = 8
            DiffLossD = 3
            DiffLossW = 1024
            GdmW = 512
            GdmD = 4
            GdmHeads = 8
            ClassNum = 1
            BufferSize = 77
            Conditioning = Conditioning.Text
            TextEncoder = TextEncoderKind.External
            ContextDim = 768
            NullContext = NullContextKind.Empty
            MaskRatio = MaskRatioRule.Beta41
        }

    /// The presets by name (`hi-mar-b`, `hi-mar-l`, `hi-mar-h`, `hi-mar-s`, `fashion`, `fashion-small`,
    /// `fashion-text`).
    [<CompiledName("Presets")>]
    let presets =
        [
            "hi-mar-b", hiMarB
            "hi-mar-l", hiMarL
            "hi-mar-h", hiMarH
            "fashion", fashion
            "fashion-small", fashionSmall
            "hi-mar-s", hiMarS
            "fashion-text", fashionText
        ]

    /// A preset by name (case-insensitive; `b`, `himar_base` and `hi-mar-b` all work), or None.
    [<CompiledName("TryPreset")>]
    let tryPreset (name: string) =
        match name.Trim().ToLowerInvariant().Replace("_", "-") with
        | "b"
        | "hi-mar-b"
        | "himar-b"
        | "himar-base"
        | "base" -> Some hiMarB
        | "l"
        | "hi-mar-l"
        | "himar-l"
        | "himar-large"
        | "large" -> Some hiMarL
        | "h"
        | "hi-mar-h"
        | "himar-h"
        | "himar-huge"
        | "huge" -> Some hiMarH
        | "fashion"
        | "fashion-mnist" -> Some fashion
        | "fashion-small" -> Some fashionSmall
        | "fashion-text" -> Some fashionText
        | "s"
        | "hi-mar-s"
        | "himar-s"
        | "himar-small"
        | "small" -> Some hiMarS
        | _ -> None

    /// The configuration with the ablation switches of Table 5 set.
    [<CompiledName("WithAblation")>]
    let withAblation (pivots: PivotSource) (phase2: Phase2Head) (scaleAware: bool) (c: HiMarConfig) =
        { c with
            Pivots = pivots
            Phase2 = phase2
            ScaleAware = scaleAware
        }

    /// The ranges of the whole-number settings, by JSON name: (name, value, least, most). The upper bounds are
    /// sanity limits far above any published model, so that a typo fails here instead of in a native allocation.
    let private wholeRanges (c: HiMarConfig) =
        [
            "img_size", c.ImgSize, 1, 16384
            "vae_stride", c.VaeStride, 1, 1024
            "patch_size", c.PatchSize, 1, 64
            "encoder_embed_dim", c.EncoderEmbedDim, 1, 65536
            "encoder_depth", c.EncoderDepth, 1, 1000
            "encoder_num_heads", c.EncoderNumHeads, 1, 1024
            "decoder_embed_dim", c.DecoderEmbedDim, 1, 65536
            "decoder_depth", c.DecoderDepth, 1, 1000
            "decoder_num_heads", c.DecoderNumHeads, 1, 1024
            "vae_embed_dim", c.VaeEmbedDim, 1, 4096
            "class_num", c.ClassNum, 1, 1000000
            "buffer_size", c.BufferSize, 1, 4096
            "diffloss_d", c.DiffLossD, 1, 1000
            "diffloss_w", c.DiffLossW, 1, 65536
            "diffusion_batch_mul", c.DiffusionBatchMul, 1, 64
            "cond_scale", c.CondScale, 1, 1024
            "cond_dim", c.CondDim, 1, 4096
            "gdm_w", c.GdmW, 1, 65536
            "gdm_d", c.GdmD, 1, 1000
            "head", c.GdmHeads, 1, 1024
            "step_warmup", c.StepWarmup, 0, 100000000
            "diffusion_steps", c.DiffusionSteps, 1, 100000
            if c.Conditioning = Conditioning.Text then
                if c.TextEncoder = TextEncoderKind.Builtin then
                    "text_width", c.TextWidth, 1, 65536
                    "text_depth", c.TextDepth, 1, 1000
                    "text_heads", c.TextHeads, 1, 1024
                else
                    "context_dim", c.ContextDim, 1, 65536
        ]

    /// The ranges of the real-valued settings: (name, value, least, most, most included).
    let private realRanges (c: HiMarConfig) =
        [
            "mlp_ratio", c.MlpRatio, 0.0, 64.0, true
            "ratio", c.GdmMlpRatio, 0.0, 64.0, true
            "mask_ratio_min", c.MaskRatioMin, 0.0, 1.0, true
            "label_drop_prob", c.LabelDropProb, 0.0, 1.0, true
            "attn_dropout", c.AttnDropout, 0.0, 1.0, false
            "proj_dropout", c.ProjDropout, 0.0, 1.0, false
            "step_stage2_rate", c.StepStage2Rate, 0.0, 1.0, true
            "layer_norm_eps", c.LayerNormEps, 0.0, 1.0, true
            "phase1_loss_weight", c.Phase1LossWeight, 0.0, 1e6, true
            "phase2_loss_weight", c.Phase2LossWeight, 0.0, 1e6, true
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
                if c.MlpRatio > 0.0 && int (float c.EncoderEmbedDim * c.MlpRatio) < 1 then
                    sprintf "mlp_ratio %g makes an MLP of no units at width %d" c.MlpRatio c.EncoderEmbedDim
                for name, spec in
                    [
                        "num_sampling_steps", c.NumSamplingSteps
                        "dit_head_sampling_steps", c.DitSamplingSteps
                    ] do
                    if not (respacing.IsMatch spec) then
                        sprintf "%s must be a respacing such as \"100\" or \"ddim25\", not \"%s\"" name spec
            ]

        if not ranges.IsEmpty then
            ranges
        else
            [
                if c.ImgSize % (c.VaeStride * c.PatchSize) <> 0 then
                    sprintf
                        "img_size %d is not a multiple of vae_stride * patch_size = %d"
                        c.ImgSize
                        (c.VaeStride * c.PatchSize)
                if c.EncoderEmbedDim % c.EncoderNumHeads <> 0 then
                    sprintf "encoder width %d is not divisible by %d heads" c.EncoderEmbedDim c.EncoderNumHeads
                if c.DecoderEmbedDim % c.DecoderNumHeads <> 0 then
                    sprintf "decoder width %d is not divisible by %d heads" c.DecoderEmbedDim c.DecoderNumHeads
                if c.EncoderEmbedDim <> c.DecoderEmbedDim then
                    // The reference's mask token has the encoder's width but is placed in the decoder's sequence.
                    sprintf
                        "encoder width %d differs from decoder width %d (the reference needs them equal)"
                        c.EncoderEmbedDim
                        c.DecoderEmbedDim
                if c.GdmW % c.GdmHeads <> 0 then
                    sprintf "Transformer head width %d is not divisible by %d heads" c.GdmW c.GdmHeads
                if c.Pivots <> PivotSource.NoPivots && c.CondDim <> c.TokenEmbedDim then
                    sprintf
                        "cond_dim %d must equal the token channels %d (sampled pivots are written as tokens)"
                        c.CondDim
                        c.TokenEmbedDim
                if c.Phase2 = Phase2Head.Transformer && c.PatchSize <> 1 then
                    sprintf "the Transformer head needs patch_size 1, not %d" c.PatchSize
                if c.Conditioning = Conditioning.Text then
                    if c.TextEncoder = TextEncoderKind.Builtin then
                        if c.TextVocab.Length = 0 then
                            "the built-in text encoder needs a vocabulary (text_vocab)"

                        if c.TextWidth % c.TextHeads <> 0 then
                            sprintf "text width %d is not divisible by %d heads" c.TextWidth c.TextHeads
            ]

    /// The JSON type of each reference argument (and of ours: the ablation and text switches) that a config file
    /// may hold. `model` names the preset the file starts from; `two_diffloss`, `global_dm` and
    /// `grad_checkpointing` are reference arguments that do not change the model (always on, or memory only).
    [<CompiledName("ArgumentKinds")>]
    let argumentKinds: System.Collections.Generic.IReadOnlyDictionary<string, ArgumentKind> =
        readOnlyDict
            [
                for name in
                    [
                        "img_size"
                        "vae_stride"
                        "patch_size"
                        "encoder_embed_dim"
                        "encoder_depth"
                        "encoder_num_heads"
                        "decoder_embed_dim"
                        "decoder_depth"
                        "decoder_num_heads"
                        "vae_embed_dim"
                        "class_num"
                        "buffer_size"
                        "diffloss_d"
                        "diffloss_w"
                        "diffusion_batch_mul"
                        "cond_scale"
                        "cond_dim"
                        "gdm_w"
                        "gdm_d"
                        "head"
                        "step_warmup"
                        "context_dim"
                        "text_width"
                        "text_depth"
                        "text_heads"
                    ] -> name, ArgumentKind.WholeNumber
                for name in
                    [
                        "mlp_ratio"
                        "mask_ratio_min"
                        "label_drop_prob"
                        "attn_dropout"
                        "proj_dropout"
                        "ratio"
                        "step_stage2_rate"
                    ] -> name, ArgumentKind.Number
                for name in
                    [
                        "model"
                        "num_sampling_steps"
                        "dit_head_sampling_steps"
                        "pivots"
                        "phase2_head"
                        "conditioning"
                        "text_encoder"
                        "null_context"
                        "mask_ratio"
                    ] -> name, ArgumentKind.Text
                for name in [ "cos"; "scale_aware"; "two_diffloss"; "global_dm"; "grad_checkpointing" ] ->
                    name, ArgumentKind.Boolean
                yield "text_vocab", ArgumentKind.Words
            ]

    /// A config from the reference's `HiMAR(...)` keyword arguments or argparse fields (boxed int, float,
    /// string or bool by name), starting from `baseConfig` for anything absent. Unknown names are ignored (a
    /// checkpoint's argparse Namespace holds the training arguments too); a value of the wrong type (text for a
    /// number, 128.5 for a whole number) raises an ArgumentException naming the field.
    [<CompiledName("FromReferenceArgs")>]
    let fromReferenceArgs
        (baseConfig: HiMarConfig)
        (args: System.Collections.Generic.IReadOnlyDictionary<string, obj>)
        =
        let get name =
            match args.TryGetValue name with
            | true, v when not (obj.ReferenceEquals(v, null)) -> Some v
            | _ -> None

        let fail (message: string) =
            raise (System.ArgumentException message)

        let invariant = System.Globalization.CultureInfo.InvariantCulture

        /// How a wrong value reads in a message: text quoted (at most 40 characters), numbers invariant.
        let shown (v: obj) =
            match v with
            | :? string as t when t.Length > 40 -> sprintf "the text \"%s...\"" (t.Substring(0, 40))
            | :? string as t -> sprintf "the text \"%s\"" t
            | :? bool as b -> if b then "true" else "false"
            | :? System.IConvertible as n -> n.ToString invariant
            | v -> v.GetType().Name

        /// A boxed number as a double, or None for text, booleans and other objects.
        let number (v: obj) =
            match v with
            | :? string
            | :? bool
            | :? char -> None
            | :? System.IConvertible as n ->
                match n.GetTypeCode() with
                | System.TypeCode.SByte
                | System.TypeCode.Byte
                | System.TypeCode.Int16
                | System.TypeCode.UInt16
                | System.TypeCode.Int32
                | System.TypeCode.UInt32
                | System.TypeCode.Int64
                | System.TypeCode.UInt64
                | System.TypeCode.Single
                | System.TypeCode.Double
                | System.TypeCode.Decimal -> Some(n.ToDouble invariant)
                | _ -> None
            | _ -> None

        // Types are exact: whole numbers must be integral (128.5 is not 128), text is not a number, null is absent.
        let int' name dflt =
            match get name with
            | None -> dflt
            | Some v ->
                match number v with
                | Some x when System.Double.IsFinite x && System.Math.Floor x = x ->
                    if x < float System.Int32.MinValue || x > float System.Int32.MaxValue then
                        fail (sprintf "%s: %s is out of range" name (shown v))

                    int x
                | Some _ -> fail (sprintf "%s must be a whole number, not %s" name (shown v))
                | None -> fail (sprintf "%s must be a whole number, not %s" name (shown v))

        let float' name dflt =
            match get name with
            | None -> dflt
            | Some v ->
                match number v with
                | Some x when System.Double.IsFinite x -> x
                | _ -> fail (sprintf "%s must be a finite number, not %s" name (shown v))

        let str' name dflt =
            match get name with
            | None -> dflt
            | Some(:? string as t) -> t
            | Some v -> fail (sprintf "%s must be text (a string such as \"100\"), not %s" name (shown v))

        let bool' name dflt =
            match get name with
            | None -> dflt
            | Some(:? bool as b) -> b
            | Some v -> fail (sprintf "%s must be true or false, not %s" name (shown v))

        let choice name (table: (string * 'T) list) (dflt: 'T) =
            match get name with
            | None -> dflt
            | Some v ->
                let key = (string v).Trim().ToLowerInvariant().Replace("-", "_")

                match v, List.tryFind (fun (k, _) -> k = key) table with
                | :? string, Some(_, x) -> x
                | _ ->
                    fail (
                        sprintf
                            "%s must be one of %s, not %s"
                            name
                            (table |> List.map fst |> String.concat ", ")
                            (match v with
                             | :? string as t -> sprintf "'%s'" t
                             | v -> shown v)
                    )

        let b = baseConfig
        let encDim = int' "encoder_embed_dim" b.EncoderEmbedDim
        let encDepth = int' "encoder_depth" b.EncoderDepth
        let encHeads = int' "encoder_num_heads" b.EncoderNumHeads

        { b with
            ImgSize = int' "img_size" b.ImgSize
            VaeStride = int' "vae_stride" b.VaeStride
            PatchSize = int' "patch_size" b.PatchSize
            EncoderEmbedDim = encDim
            EncoderDepth = encDepth
            EncoderNumHeads = encHeads
            DecoderEmbedDim = int' "decoder_embed_dim" encDim
            DecoderDepth = int' "decoder_depth" encDepth
            DecoderNumHeads = int' "decoder_num_heads" encHeads
            MlpRatio = float' "mlp_ratio" b.MlpRatio
            VaeEmbedDim = int' "vae_embed_dim" b.VaeEmbedDim
            MaskRatioMin = float' "mask_ratio_min" b.MaskRatioMin
            LabelDropProb = float' "label_drop_prob" b.LabelDropProb
            ClassNum = int' "class_num" b.ClassNum
            AttnDropout = float' "attn_dropout" b.AttnDropout
            ProjDropout = float' "proj_dropout" b.ProjDropout
            BufferSize = int' "buffer_size" b.BufferSize
            DiffLossD = int' "diffloss_d" b.DiffLossD
            DiffLossW = int' "diffloss_w" b.DiffLossW
            NumSamplingSteps = str' "num_sampling_steps" b.NumSamplingSteps
            DitSamplingSteps = str' "dit_head_sampling_steps" b.DitSamplingSteps
            DiffusionBatchMul = int' "diffusion_batch_mul" b.DiffusionBatchMul
            CondScale = int' "cond_scale" b.CondScale
            CondDim = int' "cond_dim" b.CondDim
            GdmW = int' "gdm_w" b.GdmW
            GdmD = int' "gdm_d" b.GdmD
            GdmHeads = int' "head" b.GdmHeads
            GdmMlpRatio = float' "ratio" b.GdmMlpRatio
            Cos = bool' "cos" b.Cos
            StepWarmup = int' "step_warmup" b.StepWarmup
            StepStage2Rate = float' "step_stage2_rate" b.StepStage2Rate
            Pivots = choice "pivots" AblationNames.pivots b.Pivots
            Phase2 = choice "phase2_head" AblationNames.phase2Heads b.Phase2
            ScaleAware = bool' "scale_aware" b.ScaleAware
            Conditioning = choice "conditioning" AblationNames.conditionings b.Conditioning
            TextEncoder = choice "text_encoder" AblationNames.textEncoders b.TextEncoder
            ContextDim = int' "context_dim" b.ContextDim
            NullContext = choice "null_context" AblationNames.nullContexts b.NullContext
            MaskRatio = choice "mask_ratio" AblationNames.maskRatios b.MaskRatio
            TextVocab =
                match get "text_vocab" with
                | None -> b.TextVocab
                | Some(:? (string[]) as words) -> words
                | Some(:? seq<string> as words) -> Array.ofSeq words
                | Some v -> fail (sprintf "text_vocab must be a list of words, not %s" (shown v))
            TextWidth = int' "text_width" b.TextWidth
            TextDepth = int' "text_depth" b.TextDepth
            TextHeads = int' "text_heads" b.TextHeads
        }
