namespace HiMar.Model

open System
open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn

/// The parts of Hi-MAR (models/himar.py `HiMAR`) that hold no parameter of `HiMAR` itself: the child layers
/// built from the config, the choice of a phase's adaLN row, and the assembly of the encoder's and decoder's
/// sequences [buffer | pivots (S) | dense (N)] and of the heads' inputs. Masks are float, 1 = masked.
module HiMarParts =
    /// `depth` scale-aware blocks (`encoder_blocks` / `decoder_blocks`), each with one adaLN row per phase.
    let blocks (config: HiMarConfig) (depth: int) (width: int) (heads: int) =
        let b = config.Backbone

        ModuleList<Block>(
            [|
                for _ in 1..depth ->
                    new Block(
                        int64 width,
                        int64 heads,
                        b.MlpRatio,
                        2L,
                        b.LayerNormEps,
                        b.AttentionDropout,
                        b.ProjectionDropout
                    )
            |]
        )

    /// The encoder's blocks `encoder_blocks`.
    let encoderBlocks (config: HiMarConfig) =
        let b = config.Backbone
        blocks config b.EncoderDepth b.EncoderWidth b.EncoderHeads

    /// The decoder's blocks `decoder_blocks`.
    let decoderBlocks (config: HiMarConfig) =
        let b = config.Backbone
        blocks config b.DecoderDepth b.DecoderWidth b.DecoderHeads

    /// The MLP head `diffloss` (phase 1, and phase 2 of models without a Transformer head).
    let mlpHead (config: HiMarConfig) =
        new DiffLoss(
            int64 config.TokenEmbedDim,
            int64 config.Backbone.DecoderWidth,
            int64 config.MlpHead.Width,
            config.MlpHead.Depth,
            config.MlpHead.SamplingSteps,
            config.Training.NoiseSchedule,
            config.Training.DiffusionSteps
        )

    /// The phase-2 Transformer head `cond_diffloss`.
    let transformerHead (config: HiMarConfig) =
        let t = config.TransformerHead

        new GlobalDiffLoss(
            int64 config.TokenEmbedDim,
            int64 config.SeqH,
            int64 config.Backbone.DecoderWidth,
            int64 t.Width,
            t.Depth,
            int64 t.Heads,
            t.MlpRatio,
            t.SamplingSteps,
            config.Training.NoiseSchedule,
            config.Training.DiffusionSteps
        )

    /// The built-in caption encoder `text_encoder`: one context vector per buffer slot.
    let builtinTextEncoder (config: HiMarConfig) =
        let t = config.Text

        new BuiltinTextEncoder(
            int64 t.Vocabulary.Length,
            int64 config.Backbone.BufferSize,
            int64 t.Width,
            t.Depth,
            int64 t.Heads
        )

    /// The adaLN table index of a phase: scale-aware models use one per phase, the ablation shares phase 1's.
    let adaIndex (config: HiMarConfig) (phase: int64) =
        if config.Backbone.ScaleAware then phase else 0L

    /// The phase modulation (1, 1, 4 width) = ada(SiLU(task_emb[phase])).
    let phaseModulation (config: HiMarConfig) (emb: Embedding) (ada: Sequential) (phase: int64) =
        use row = (nonNull emb.weight).[adaIndex config phase]
        use r = row.reshape (1L, 1L, -1L)
        ada.call r

    /// A mask (B, L) with `buffer` known columns in front: (B, buffer + L).
    let withBuffer (buffer: int64) (mask: torch.Tensor) =
        use z =
            torch.zeros (mask.shape.[0], buffer, dtype = mask.dtype, device = mask.device)

        torch.cat ([| z; mask |], 1L)

    /// Column indices (B, T) of the known positions of each row, ascending; rows must agree on T.
    let knownColumns (maskWithBuffer: torch.Tensor) =
        let b = maskWithBuffer.shape.[0]
        use known = maskWithBuffer.eq (scalar 0.0)
        use idx = known.nonzero ()
        let count = idx.shape.[0]

        if count % b <> 0L then
            invalidArg "mask" "every row of the mask must have the same number of known positions"

        use col = idx.select (1L, 1L)
        col.reshape (b, count / b)

    /// The encoder's input: the rows of `sequence` (B, buffer + L, W) that are known under `mask` (B, L), the
    /// buffer always. -> (B, buffer + known, W).
    let gatherKnown (buffer: int64) (mask: torch.Tensor) (sequence: torch.Tensor) =
        use mwb = withBuffer buffer mask
        use cols = knownColumns mwb
        sequence.gather (1L, cols.unsqueeze(-1L).expand (-1L, -1L, sequence.shape.[2]))

    /// The decoder's input: the encoder output `known` (B, buffer + known, W) placed at its columns of a
    /// (B, buffer + L, W) sequence whose other rows are zeros (buffer) and `masked` (B, L, W) (mask tokens).
    let scatterKnown (buffer: int64) (mask: torch.Tensor) (masked: torch.Tensor) (known: torch.Tensor) =
        use mwb = withBuffer buffer mask
        use cols = knownColumns mwb

        use zeros =
            torch.zeros (masked.shape.[0], buffer, masked.shape.[2], dtype = known.dtype, device = known.device)

        use full = torch.cat ([| zeros; masked |], 1L) // (B, buffer + L, W)
        full.scatter (1L, cols.unsqueeze(-1L).expand (-1L, -1L, known.shape.[2]), known)

    /// Label (caption) dropout: each row of the global batch is dropped with probability `prob` (one uniform
    /// draw per row, narrowed to `rows`), and a dropped row takes `nullOf ()` instead of `conditionEmb`
    /// ((B, E) for class labels, (B, buffer, E) for captions). `nullOf` runs after the draw.
    let dropConditions
        (rows: RowWindow)
        (prob: float)
        (device: torch.Device)
        (nullOf: unit -> torch.Tensor)
        (conditionEmb: torch.Tensor)
        =
        let b = conditionEmb.shape.[0]
        use u = rows.Draw(b, [||], fun shape -> torch.rand (shape, device = device))
        use drop0 = u.lt (scalar prob)

        use drop =
            if conditionEmb.dim () = 3L then
                drop0.reshape (b, 1L, 1L)
            else
                drop0.unsqueeze 1L

        use nul = nullOf ()
        torch.where (drop, nul, conditionEmb)

    /// The encoder's buffer slots (B, buffer, E): a class embedding (B, E) repeated, or a caption's
    /// (B, buffer, E) context as it is.
    let bufferSlots (buffer: int64) (conditionEmb: torch.Tensor) =
        if conditionEmb.dim () = 3L then
            conditionEmb.alias ()
        else
            let b, e = conditionEmb.shape.[0], conditionEmb.shape.[1]
            conditionEmb.unsqueeze(1L).expand (b, buffer, e)

    /// An MLP head's inputs, one row per token: `head target z mask` with target (B, T, C) -> (mul B T, C),
    /// decoder states (B, T, D) -> (mul B T, D) and mask (B, T) -> (mul B T), each repeated `mul` times
    /// (the reference's diffusion_batch_mul).
    let perToken (mul: int64) (target: torch.Tensor) (states: torch.Tensor) (mask: torch.Tensor) head =
        let rows = target.shape.[0] * target.shape.[1]
        use t = target.reshape(rows, target.shape.[2]).repeat (mul, 1L)
        use z = states.reshape(rows, states.shape.[2]).repeat (mul, 1L)
        use m = mask.reshape(rows).repeat (mul)
        head t z m

    /// The Transformer head's inputs, all tokens as one g x g grid: `head target z mask` with target
    /// (B, N, C) -> (mul B, C, g, g), decoder states (B, N, D) -> (mul B, D, g, g), mask (B, N) -> (mul B, g, g).
    let asGrid (g: int64) (mul: int64) (target: torch.Tensor) (states: torch.Tensor) (mask: torch.Tensor) head =
        let b = target.shape.[0]

        use t =
            target.reshape(b, g, g, target.shape.[2]).permute(0L, 3L, 1L, 2L).repeat (mul, 1L, 1L, 1L)

        use z =
            states.reshape(b, g, g, states.shape.[2]).permute(0L, 3L, 1L, 2L).repeat (mul, 1L, 1L, 1L)

        use m = mask.reshape(b, g, g).repeat (mul, 1L, 1L)
        head t z m
