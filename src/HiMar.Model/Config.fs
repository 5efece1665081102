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

/// The MAE-style encoder/decoder Transformer that both phases share: its grid, widths, depths and dropouts.
type BackboneConfig =
    {
        /// Image side in pixels, 256 (reference `img_size`).
        ImageSize: int
        /// Tokenizer downsampling factor, 16 for KL-16 (`vae_stride`).
        VaeStride: int
        /// Latent positions per side of one token, 1 (`patch_size`).
        PatchSize: int
        /// Latent channels of the tokenizer, 16 for KL-16 (`vae_embed_dim`).
        LatentChannels: int
        /// Encoder width (`encoder_embed_dim`).
        EncoderWidth: int
        /// Encoder blocks (`encoder_depth`).
        EncoderDepth: int
        /// Encoder attention heads (`encoder_num_heads`).
        EncoderHeads: int
        /// Decoder width (`decoder_embed_dim`).
        DecoderWidth: int
        /// Decoder blocks (`decoder_depth`).
        DecoderDepth: int
        /// Decoder attention heads (`decoder_num_heads`).
        DecoderHeads: int
        /// Hidden width of a block's MLP over its width (`mlp_ratio`).
        MlpRatio: float
        /// Buffer (condition) slots in front of the sequence, 64 (`buffer_size`).
        BufferSize: int
        /// Class labels; the "no class" label is this number (`class_num`).
        ClassCount: int
        /// Attention-weight dropout (`attn_dropout`).
        AttentionDropout: float
        /// Dropout after attention and MLP projections (`proj_dropout`).
        ProjectionDropout: float
        /// LayerNorm eps, 1e-6 in the reference presets (hard-wired there).
        LayerNormEps: float
        /// Scale-aware adaLN blocks (true) or the same modulation for both phases (ours: `scale_aware`).
        ScaleAware: bool
    }

/// The phase-1 tokens: where phase 2's pivots come from and the pivot grid.
type PivotConfig =
    {
        /// Where the phase-2 pivots come from (ours: `pivots`; Table 5).
        Source: PivotSource
        /// Side of the pivot grid, 8: the latent of a 128x128 image (`cond_scale`).
        GridSide: int
        /// Channels of a pivot token, equal to the token channels (`cond_dim`).
        Channels: int
    }

/// The per-token MLP diffusion head (`DiffLoss` with `SimpleMLPAdaLN`): phase 1, and phase 2 in the ablation.
type MlpHeadConfig =
    {
        /// Residual blocks (`diffloss_d`).
        Depth: int
        /// Width (`diffloss_w`).
        Width: int
        /// Respacing of its sampling diffusion: "100", "ddim25", ... (`num_sampling_steps`).
        SamplingSteps: string
    }

/// The Diffusion Transformer head (`GlobalDiffLoss` with `DiT`) that denoises all dense tokens together in phase 2.
type TransformerHeadConfig =
    {
        /// Width (`gdm_w`).
        Width: int
        /// Blocks (`gdm_d`).
        Depth: int
        /// Attention heads (`head`).
        Heads: int
        /// Hidden width of a block's MLP over its width (`ratio`).
        MlpRatio: float
        /// Respacing of its sampling diffusion; the reference hard-codes "250" (ours: `dit_head_sampling_steps`).
        SamplingSteps: string
    }

/// How a model is trained: masking, label dropout, pivot-condition warm-up, loss weights, diffusion schedule.
type TrainingConfig =
    {
        /// Least mask ratio of the pivots' truncated normal (`mask_ratio_min`).
        MaskRatioMin: float
        /// Probability that a label is replaced by the "no class" label (`label_drop_prob`).
        LabelDropProb: float
        /// Times each token is repeated in a head's loss (`diffusion_batch_mul`).
        DiffusionBatchMul: int
        /// Dense-token masking: cosine rule (true) or truncated normal from 0.38 (`cos`).
        CosineDenseMasking: bool
        /// Epochs over which the chance of phase 2 seeing real pivots rises to `PivotConditionRate` (`step_warmup`).
        PivotConditionWarmupEpochs: int
        /// Chance, after the warm-up, that phase 2 sees real pivots rather than the placeholder (`step_stage2_rate`).
        PivotConditionRate: float
        /// Weight of the MLP head's loss inside the model, 2.0 (hard-wired in the reference `forward`).
        Phase1LossWeight: float
        /// Weight of the phase-2 head's loss inside the model, 0.75 (hard-wired in the reference `forward`).
        Phase2LossWeight: float
        /// Diffusion steps of the training schedule, 1000 (hard-wired in the reference).
        DiffusionSteps: int
        /// Noise schedule name, "cosine" (hard-wired in the reference).
        NoiseSchedule: string
        /// The mask-ratio rule (ours: `mask_ratio`).
        MaskRule: MaskRatioRule
    }

/// What a model is conditioned on, and for text models the encoder and the null context (ours: the reference
/// releases no text path).
type TextConfig =
    {
        /// Class labels or text context tokens; text models have `BufferSize` = L context positions (`conditioning`).
        Conditioning: Conditioning
        /// An external encoder's embeddings or the built-in encoder (`text_encoder`).
        Encoder: TextEncoderKind
        /// Width D of an external encoder's context vectors, 768 for CLIP ViT-L/14 (`context_dim`).
        ExternalWidth: int
        /// The null context of guidance and caption dropout (`null_context`).
        NullContext: NullContextKind
        /// The built-in encoder's word list: id = position + 1, 0 pads (`text_vocab`).
        Vocabulary: string[]
        /// The built-in encoder's width (`text_width`).
        Width: int
        /// The built-in encoder's blocks (`text_depth`).
        Depth: int
        /// The built-in encoder's attention heads (`text_heads`).
        Heads: int
    }

/// Every setting of a Hi-MAR model: the reference `HiMAR(...)` arguments (models/himar.py) plus the values the
/// reference hard-wires (Transformer head respacing, "no class" label, loss weights), grouped by what they
/// configure. Each field names its reference argument; `ConfigCodec` reads and writes them.
type HiMarConfig =
    {
        /// The shared encoder/decoder Transformer.
        Backbone: BackboneConfig
        /// The phase-1 tokens.
        Pivots: PivotConfig
        /// The per-token MLP head.
        MlpHead: MlpHeadConfig
        /// The phase-2 Transformer head.
        TransformerHead: TransformerHeadConfig
        /// Which head denoises the dense tokens in phase 2 (ours: `phase2_head`; Table 5).
        Phase2Head: Phase2Head
        /// Training-only settings.
        Training: TrainingConfig
        /// Class or text conditioning.
        Text: TextConfig
    }

    /// Dense grid side: img_size / vae_stride / patch_size (16).
    member c.SeqH = c.Backbone.ImageSize / c.Backbone.VaeStride / c.Backbone.PatchSize

    /// Dense token count N (256).
    member c.DenseTokens = c.SeqH * c.SeqH

    /// Pivot token count S = cond_scale^2 (64); zero without pivots.
    member c.PivotTokens =
        if c.Pivots.Source = PivotSource.NoPivots then
            0
        else
            c.Pivots.GridSide * c.Pivots.GridSide

    /// The full sequence L = S + N without buffer (320).
    member c.SeqLen = c.PivotTokens + c.DenseTokens

    /// Channels of one token: vae_embed_dim * patch_size^2 (16).
    member c.TokenEmbedDim =
        c.Backbone.LatentChannels * c.Backbone.PatchSize * c.Backbone.PatchSize

    /// The "no class" label used for unconditional rows (the reference hard-codes 1000).
    member c.NullClass = c.Backbone.ClassCount
    /// Phase-1 sampling steps by default: 4 * cond_scale.
    member c.Phase1Steps = 4 * c.Pivots.GridSide
    /// Text models: context tokens per caption L (the buffer slots they fill).
    member c.ContextLength = c.Backbone.BufferSize

    /// Width of the context vectors the model receives: the built-in encoder's or the external one's.
    member c.ContextWidth =
        if c.Text.Encoder = TextEncoderKind.Builtin then
            c.Text.Width
        else
            c.Text.ExternalWidth

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
