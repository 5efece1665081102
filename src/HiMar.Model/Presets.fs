namespace HiMar.Model

/// Named configurations equal to the reference launch settings.
[<CompilationRepresentation(CompilationRepresentationFlags.ModuleSuffix)>]
module HiMarConfig =
    /// Hi-MAR-B: 12 + 12 blocks of width 768 (12 heads), MLP head 6 x 1024, Transformer head 6 x 512 (8 heads).
    /// 244,730,160 parameters.
    [<CompiledName("Base")>]
    let hiMarB =
        {
            Backbone =
                {
                    ImageSize = 256
                    VaeStride = 16
                    PatchSize = 1
                    LatentChannels = 16
                    EncoderWidth = 768
                    EncoderDepth = 12
                    EncoderHeads = 12
                    DecoderWidth = 768
                    DecoderDepth = 12
                    DecoderHeads = 12
                    MlpRatio = 4.0
                    BufferSize = 64
                    ClassCount = 1000
                    AttentionDropout = 0.1
                    ProjectionDropout = 0.1
                    LayerNormEps = 1e-6
                    ScaleAware = true
                }
            Pivots =
                {
                    Source = PivotSource.ConditionalTokens
                    GridSide = 8
                    Channels = 16
                }
            MlpHead =
                {
                    Depth = 6
                    Width = 1024
                    SamplingSteps = "100"
                }
            TransformerHead =
                {
                    Width = 512
                    Depth = 6
                    Heads = 8
                    MlpRatio = 4.0
                    SamplingSteps = "250"
                }
            Phase2Head = Phase2Head.Transformer
            Training =
                {
                    MaskRatioMin = 0.7
                    LabelDropProb = 0.1
                    DiffusionBatchMul = 1
                    CosineDenseMasking = true
                    PivotConditionWarmupEpochs = 100
                    PivotConditionRate = 0.25
                    Phase1LossWeight = 2.0
                    Phase2LossWeight = 0.75
                    DiffusionSteps = 1000
                    NoiseSchedule = "cosine"
                    MaskRule = MaskRatioRule.Reference
                }
            Text =
                {
                    Conditioning = Conditioning.Class
                    Encoder = TextEncoderKind.External
                    ExternalWidth = 768
                    NullContext = NullContextKind.Empty
                    Vocabulary = [||]
                    Width = 0
                    Depth = 0
                    Heads = 0
                }
        }

    /// Hi-MAR-L: 16 + 16 blocks of width 1024 (16 heads), MLP head 8 x 1280, Transformer head 8 x 512 (8 heads).
    /// 529,490,480 parameters.
    [<CompiledName("Large")>]
    let hiMarL =
        { hiMarB with
            Backbone.EncoderWidth = 1024
            Backbone.EncoderDepth = 16
            Backbone.EncoderHeads = 16
            Backbone.DecoderWidth = 1024
            Backbone.DecoderDepth = 16
            Backbone.DecoderHeads = 16
            MlpHead.Depth = 8
            MlpHead.Width = 1280
            TransformerHead.Width = 512
            TransformerHead.Depth = 8
            TransformerHead.Heads = 8
        }

    /// Hi-MAR-H: 20 + 20 blocks of width 1280 (16 heads), MLP head 12 x 1536, Transformer head 12 x 768 (12 heads).
    /// 1,090,965,808 parameters.
    [<CompiledName("Huge")>]
    let hiMarH =
        { hiMarB with
            Backbone.EncoderWidth = 1280
            Backbone.EncoderDepth = 20
            Backbone.EncoderHeads = 16
            Backbone.DecoderWidth = 1280
            Backbone.DecoderDepth = 20
            Backbone.DecoderHeads = 16
            MlpHead.Depth = 12
            MlpHead.Width = 1536
            TransformerHead.Width = 768
            TransformerHead.Depth = 12
            TransformerHead.Heads = 12
        }

    /// The embedded default: Hi-MAR for Fashion-MNIST on 2 CPU cores. A 28x28 image padded to 32x32 becomes an
    /// 8x8 grid of 4x4 pixel patches (16 values per token) through the pixel-patch tokenizer (so `VaeStride` 4
    /// and 16 token channels); the 16x16 pivot image becomes a 4x4 grid (cond_scale 4). 4 + 4 blocks of width
    /// 128, MLP head 3 x 256, Transformer head 3 x 128: 4,155,952 parameters. `diffusion_batch_mul` 1 (not 4):
    /// on 2 CPU cores the heads' repeated rows would cost more than the extra data they bring in a short run.
    [<CompiledName("Fashion")>]
    let fashion =
        { hiMarB with
            Backbone.ImageSize = 32
            Backbone.VaeStride = 4
            Backbone.LatentChannels = 16
            Backbone.EncoderWidth = 128
            Backbone.EncoderDepth = 4
            Backbone.EncoderHeads = 4
            Backbone.DecoderWidth = 128
            Backbone.DecoderDepth = 4
            Backbone.DecoderHeads = 4
            Backbone.ClassCount = 10
            Backbone.BufferSize = 4
            Backbone.AttentionDropout = 0.0
            Backbone.ProjectionDropout = 0.0
            MlpHead.Depth = 3
            MlpHead.Width = 256
            MlpHead.SamplingSteps = "50"
            TransformerHead.SamplingSteps = "50"
            Training.DiffusionBatchMul = 1
            Pivots.GridSide = 4
            Pivots.Channels = 16
            TransformerHead.Width = 128
            TransformerHead.Depth = 3
            TransformerHead.Heads = 4
            Training.PivotConditionWarmupEpochs = 2
        }

    /// The ablation's model (Table 5 at small scale): the fashion preset at width 64, 2 + 2 blocks, MLP head
    /// 2 x 128, Transformer head 2 x 64, so that 15 training runs and their evaluations fit in about an hour on
    /// 2 CPU cores. 741,744 parameters.
    [<CompiledName("FashionSmall")>]
    let fashionSmall =
        { fashion with
            Backbone.EncoderWidth = 64
            Backbone.EncoderDepth = 2
            Backbone.DecoderWidth = 64
            Backbone.DecoderDepth = 2
            MlpHead.Depth = 2
            MlpHead.Width = 128
            TransformerHead.Width = 64
            TransformerHead.Depth = 2
        }

    /// The embedded text-to-image default: the fashion preset conditioned on captions ("a photo of a sneaker")
    /// through a built-in word-level text encoder (2 blocks of width 64, 4 heads) trained jointly. A caption is at
    /// most 12 words, so 12 context tokens fill the buffer slots; guidance's null context is the empty caption;
    /// training mask ratios follow Beta(4, 1) as in the paper's text-to-image setting.
    [<CompiledName("FashionText")>]
    let fashionText =
        { fashion with
            Backbone.BufferSize = 12
            Text.Conditioning = Conditioning.Text
            Text.Encoder = TextEncoderKind.Builtin
            Text.NullContext = NullContextKind.Empty
            Training.MaskRule = MaskRatioRule.Beta41
            Text.Vocabulary = FashionCaptions.vocabulary
            Text.Width = 64
            Text.Depth = 2
            Text.Heads = 4
        }

    /// Hi-MAR-S for text-to-image at 256x256 (the paper's MS-COCO model, "in the spirit of" U-ViT-S/2 (Deep):
    /// width 512, 8 heads, 17 blocks): 8 + 8 blocks of width 512, MLP head 3 x 1024,
    /// Transformer head 4 x 512 (8 heads), conditioned on CLIP ViT-L/14 text features (77 x 768, external:
    /// precomputed with `himar embed-captions`), the empty caption as null context, Beta(4, 1) mask ratios.
    [<CompiledName("Small")>]
    let hiMarS =
        { hiMarB with
            Backbone.EncoderWidth = 512
            Backbone.EncoderDepth = 8
            Backbone.EncoderHeads = 8
            Backbone.DecoderWidth = 512
            Backbone.DecoderDepth = 8
            Backbone.DecoderHeads = 8
            MlpHead.Depth = 3
            MlpHead.Width = 1024
            TransformerHead.Width = 512
            TransformerHead.Depth = 4
            TransformerHead.Heads = 8
            Backbone.ClassCount = 1
            Backbone.BufferSize = 77
            Text.Conditioning = Conditioning.Text
            Text.Encoder = TextEncoderKind.External
            Text.ExternalWidth = 768
            Text.NullContext = NullContextKind.Empty
            Training.MaskRule = MaskRatioRule.Beta41
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
            Pivots.Source = pivots
            Phase2Head = phase2
            Backbone.ScaleAware = scaleAware
        }
