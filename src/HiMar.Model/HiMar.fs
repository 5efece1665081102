namespace HiMar.Model

open System
open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn

/// Hi-MAR (models/himar.py `HiMAR`): one MAE-style encoder/decoder Transformer with buffer tokens and
/// scale-aware blocks that serves both phases, the phase-1 MLP diffusion head `diffloss` and the phase-2
/// Transformer head `cond_diffloss`. Sequences are [buffer | pivots (S) | dense (N)]; a phase index
/// selects the rows of the reference's per-task tables (`encoder_task_emb`, `mask_token`, positions): 0 for phase 1 (pivots), 1 for phase 2 (dense tokens). State-dict keys equal the reference's.
type HiMAR(config: HiMarConfig) as this =
    inherit Layer<torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor>("HiMAR")

    do
        match ConfigCodec.validate config with
        | [] -> ()
        | problems -> invalidArg "config" (String.Join("; ", problems))

    let e = int64 config.Backbone.EncoderWidth
    let d = int64 config.Backbone.DecoderWidth
    let c = int64 config.TokenEmbedDim
    let s = int64 config.PivotTokens
    let n = int64 config.DenseTokens
    let l = int64 config.SeqLen
    let buf = int64 config.Backbone.BufferSize
    let hasPivots = config.Pivots.Source <> PivotSource.NoPivots
    let eps = config.Backbone.LayerNormEps
    let normal (shape: int64[]) = torch.randn(shape).mul_ (scalar 0.02)

    let isText = config.Text.Conditioning = Conditioning.Text
    let builtinText = isText && config.Text.Encoder = TextEncoderKind.Builtin

    // Class models: the unconditional embedding (1, E); text models have their own null context.
    let fake_latent: Parameter | null =
        if isText then
            null
        else
            this.Param("fake_latent", normal [| 1L; e |])

    // A plain field, not an option: TorchSharp's `.to(dtype/device)` rebinds parameter fields by name.
    let cond_tokens: Parameter | null =
        if hasPivots then
            this.Param("cond_tokens", normal [| 1L; s; int64 config.Pivots.Channels |])
        else
            null

    let mask_token = this.Param("mask_token", normal [| 1L; 2L * l; e |])

    let encoder_pos_embed_learned =
        this.Param("encoder_pos_embed_learned", normal [| 1L; 2L * (l + buf); e |])

    let decoder_pos_embed_learned =
        this.Param("decoder_pos_embed_learned", normal [| 1L; 2L * (l + buf); d |])

    let diffusion_pos_embed_learned =
        this.Param("diffusion_pos_embed_learned", normal [| 1L; l; d |])

    let class_emb =
        if isText then
            None
        else
            Some(this.Child("class_emb", Embedding(int64 config.Backbone.ClassCount, e)))

    // Text models: the context (B, L, ContextWidth) is projected to the encoder width, one vector per buffer slot.
    let context_proj =
        if isText then
            Some(this.Child("context_proj", new Mixed.Linear(int64 config.ContextWidth, e)))
        else
            None

    let text_encoder =
        if builtinText then
            Some(this.Child("text_encoder", HiMarParts.builtinTextEncoder config))
        else
            None

    // The null context: the empty caption's embedding, fixed for an external encoder (set from the encoder or
    // the embedding shards; not trained), or a learned one.
    let empty_context: Parameter | null =
        if
            isText
            && config.Text.Encoder = TextEncoderKind.External
            && config.Text.NullContext = NullContextKind.Empty
        then
            this.Param("empty_context", torch.zeros (1L, buf, int64 config.Text.ExternalWidth), requiresGrad = false)
        else
            null

    let fake_context: Parameter | null =
        if isText && config.Text.NullContext = NullContextKind.Learned then
            this.Param("fake_context", normal [| 1L; buf; e |])
        else
            null

    let z_proj = this.Child("z_proj", new Mixed.Linear(c, e))
    let z_proj_ln = this.Child("z_proj_ln", LayerNorm(e, eps = 1e-6))

    let cond_z_proj =
        if hasPivots then
            Some(this.Child("cond_z_proj", new Mixed.Linear(d, e)))
        else
            None

    let cond_proj =
        if hasPivots then
            Some(this.Child("cond_proj", new Mixed.Linear(int64 config.Pivots.Channels, e)))
        else
            None

    let encoder_blocks = this.Child("encoder_blocks", HiMarParts.encoderBlocks config)
    let encoder_task_emb = this.Child("encoder_task_emb", Embedding(2L, e))
    let encoder_blocks_ada = this.Child("encoder_blocks_ada", AdaLN.modulation e 4L)
    let encoder_norm = this.Child("encoder_norm", LayerNorm(e, eps = eps))
    let decoder_embed = this.Child("decoder_embed", new Mixed.Linear(e, d))

    let decoder_blocks = this.Child("decoder_blocks", HiMarParts.decoderBlocks config)
    let decoder_task_emb = this.Child("decoder_task_emb", Embedding(2L, d))
    let decoder_blocks_ada = this.Child("decoder_blocks_ada", AdaLN.modulation d 4L)
    let decoder_norm = this.Child("decoder_norm", LayerNorm(d, eps = eps))

    let diffloss =
        if hasPivots || config.Phase2Head = Phase2Head.Mlp then
            Some(this.Child("diffloss", HiMarParts.mlpHead config))
        else
            None

    let cond_diffloss =
        if config.Phase2Head = Phase2Head.Transformer then
            Some(this.Child("cond_diffloss", HiMarParts.transformerHead config))
        else
            None

    let required name (o: 'a option) =
        match o with
        | Some v -> v
        | None -> invalidOp (sprintf "this configuration has no %s" name)

    let adaIndex = HiMarParts.adaIndex config
    let phaseModulation = HiMarParts.phaseModulation config

    /// The shared encoder: x (B, N, C) dense tokens, first (B, S, E) pivot block, mask (B, L),
    /// classEmb (B, E) -> (B, buf + known, E). Label drops are drawn for the global batch's rows and take
    /// `nullEmb` (made here when None; a training step makes it once for both phases).
    let encodeRows
        (rows: RowWindow)
        (nullEmb: torch.Tensor option)
        (first: torch.Tensor)
        (x: torch.Tensor)
        (mask: torch.Tensor)
        (classEmb: torch.Tensor)
        (phase: int64)
        =
        use dense = z_proj.call x |> castTo x.dtype
        use seq = torch.cat ([| first; dense |], 1L) // (B, L, E)

        use classEmb =
            if this.training && config.Training.LabelDropProb > 0.0 then
                let nullOf () =
                    match nullEmb with
                    | Some nul -> nul.alias ()
                    | None -> this.NullEmbedding x.shape.[0]

                HiMarParts.dropConditions rows config.Training.LabelDropProb x.device nullOf classEmb
            else
                classEmb.alias ()

        use buffer = HiMarParts.bufferSlots buf classEmb // (B, buf, E)
        use withBuf = torch.cat ([| buffer; seq |], 1L) // (B, buf + L, E)
        use pos = encoder_pos_embed_learned.narrow (1L, phase * (l + buf), l + buf)
        use added = withBuf + pos
        use normed = z_proj_ln.call added
        let visible = HiMarParts.gatherKnown buf mask normed // (B, buf + known, E)
        use ada = phaseModulation encoder_task_emb encoder_blocks_ada phase

        let h =
            Seq.fold (fun (h: torch.Tensor) (blk: Block) -> blk.call (h, ada, adaIndex phase)) visible encoder_blocks

        encoder_norm.call h

    let encode (first: torch.Tensor) (x: torch.Tensor) =
        encodeRows (RowWindow.Whole x.shape.[0]) None first x

    /// The configuration.
    member _.Config = config

    /// The unconditional class embedding (1, E) (class models).
    member _.FakeLatent =
        required "class conditioning (fake_latent)" (Option.ofObj fake_latent)

    /// The device of the weights.
    member _.Device = mask_token.device

    /// The floating-point type of the weights.
    member _.DType = mask_token.dtype

    /// Class embeddings (B, E) of labels (B,); labels equal to `ClassNum` (the null class) take `fake_latent`.
    member this.ClassEmbedding(labels: torch.Tensor) =
        let classes = required "class conditioning (class_emb)" class_emb
        use isNull = labels.eq (scalarL (int64 config.NullClass))
        use safe = labels.masked_fill (isNull, scalarL 0L)
        use emb = classes.call safe
        torch.where (isNull.unsqueeze 1L, this.FakeLatent.expand (labels.shape.[0], e), emb)

    /// The built-in text encoder.
    member _.TextEncoder = required "built-in text encoder (text_encoder)" text_encoder

    /// Text models: the context vectors (B, L, ContextWidth) of a condition (word ids through the built-in
    /// encoder, or an external encoder's context as it is).
    member this.ContextOf(condition: Condition) =
        match condition with
        | Condition.Tokens ids -> this.TextEncoder.call ids
        | Condition.Context ctx -> ctx.alias ()
        | Condition.Labels _ -> invalidArg "condition" "a text model is conditioned on captions, not class labels"

    /// The embedding the encoder's buffer slots take for a condition: (B, E) for class labels, (B, L, E) for
    /// captions.
    member this.ConditionEmbedding(condition: Condition) =
        match condition, context_proj with
        | Condition.Labels labels, None -> this.ClassEmbedding labels
        | Condition.Labels _, Some _ ->
            invalidArg "condition" "a text model is conditioned on captions, not class labels"
        | _, None -> invalidArg "condition" "a class model is conditioned on labels, not captions"
        | _, Some proj ->
            use ctx = this.ContextOf condition

            if
                ctx.dim () <> 3L
                || ctx.shape.[1] <> buf
                || ctx.shape.[2] <> int64 config.ContextWidth
            then
                invalidArg
                    "condition"
                    (sprintf "context of shape %A, expected (B, %d, %d)" ctx.shape buf config.ContextWidth)

            proj.call ctx |> castTo mask_token.dtype

    /// The unconditional embedding of `rows` rows: fake_latent (B, E) for class models; for text models the
    /// projected empty caption or the learned null context (B, L, E).
    member this.NullEmbedding(rows: int64) =
        if not isText then
            this.FakeLatent.expand (rows, e)
        elif config.Text.NullContext = NullContextKind.Learned then
            (nonNull fake_context).expand (rows, buf, e)
        else
            use empty =
                match text_encoder with
                | Some enc ->
                    use ids = torch.zeros (1L, buf, dtype = torch.int64, device = mask_token.device)
                    enc.call ids
                | None -> (nonNull empty_context).alias ()

            use projected =
                (required "text conditioning" context_proj).call empty
                |> castTo mask_token.dtype

            projected.expand (rows, buf, e)

    /// Sets the fixed empty-caption context (1, L, ContextDim) of a model with an external text encoder.
    member _.SetEmptyContext(context: torch.Tensor) =
        match empty_context with
        | null -> invalidOp "this model has no fixed empty context (built-in encoder or learned null context)"
        | p ->
            if context.shape <> p.shape then
                invalidArg "context" (sprintf "empty context of shape %A, expected %A" context.shape p.shape)

            use _ = torch.no_grad ()
            p.copy_ context |> ignore

    /// The phase-1 MLP diffusion head.
    member _.DiffLoss = required "MLP head (diffloss)" diffloss

    /// The phase-2 Transformer head.
    member _.CondDiffLoss = required "Transformer head (cond_diffloss)" cond_diffloss

    /// Phase-1 encoder (phase index 0): the pivots enter as cond_proj(cond (B, S, cd)); every dense token is masked
    /// in practice. -> (B, buf + known, E).
    member _.EncoderPhase1(tokens: torch.Tensor, mask: torch.Tensor, classEmb: torch.Tensor, cond: torch.Tensor) =
        use first = (required "pivots" cond_proj).call cond |> castTo tokens.dtype
        encode first tokens mask classEmb 0L

    /// The learned placeholder of pivots that phase 2 does not see: cond_proj(cond_tokens), (rows, S, E).
    member _.PivotPlaceholder(rows: int64, dtype: torch.ScalarType) =
        (required "pivots" cond_proj).call ((nonNull cond_tokens).expand (rows, -1L, -1L))
        |> castTo dtype

    /// Phase 2's pivot condition (B, S, E), one function for training and evaluation: nothing without pivots;
    /// Hi-MAR's phase-1 decoder states `pivotStates` (B, S, D) through cond_z_proj; low-res pivots, or no states,
    /// the pivot latents `pivots` (B, S, C) through cond_proj. In training `visiblePivots` (B, S) marks (1) the
    /// pivots phase 1 saw, which take the placeholder instead of their states; evaluation passes null.
    member this.PivotCondition
        (
            tokens: torch.Tensor,
            pivots: torch.Tensor,
            pivotStates: torch.Tensor | null,
            visiblePivots: torch.Tensor | null
        ) =
        let dt = tokens.dtype

        if not hasPivots then
            torch.zeros (tokens.shape.[0], 0L, e, dtype = dt, device = tokens.device)
        elif config.Pivots.Source <> PivotSource.ConditionalTokens || isNull pivotStates then
            (required "pivots" cond_proj).call pivots |> castTo dt
        else
            let z = (required "pivots" cond_z_proj).call (nonNull pivotStates) |> castTo dt

            match visiblePivots with
            | null -> z
            | visible ->
                use z = z
                use placeholder = this.PivotPlaceholder(tokens.shape.[0], dt)
                use v = visible.unsqueeze (-1L) // (B, S) -> (B, S, 1)
                v * placeholder + (1.0 - v) * z

    /// Phase-2 encoder (phase index 1), evaluation: the pivot condition (`PivotCondition`) of the pivot latents
    /// `pivots` (B, S, C) or the phase-1 decoder states `pivotStates` (B, S, D). -> (B, buf + known, E).
    member this.EncoderPhase2
        (
            tokens: torch.Tensor,
            mask: torch.Tensor,
            classEmb: torch.Tensor,
            pivots: torch.Tensor,
            pivotStates: torch.Tensor | null
        ) =
        use first = this.PivotCondition(tokens, pivots, pivotStates, null)
        encode first tokens mask classEmb 1L

    /// The decoder of either phase: encoder output (B, buf + known, E), mask (B, L) -> (B, L, D), the
    /// masked positions filled with the phase's mask tokens, buffer dropped, diffusion positions added.
    member _.Decoder(x: torch.Tensor, mask: torch.Tensor, phase: int64) =
        let b = x.shape.[0]
        use xe = decoder_embed.call x |> castTo x.dtype
        use tokens = mask_token.narrow(1L, phase * l, l).expand (b, l, e)
        use placed = HiMarParts.scatterKnown buf mask tokens xe // (B, buf + L, D)
        use pos = decoder_pos_embed_learned.narrow (1L, phase * (l + buf), l + buf)
        let h0 = placed + pos
        use ada = phaseModulation decoder_task_emb decoder_blocks_ada phase

        let h =
            Seq.fold (fun (h: torch.Tensor) (blk: Block) -> blk.call (h, ada, adaIndex phase)) h0 decoder_blocks

        use normed = decoder_norm.call h
        use noBuffer = normed.narrow (1L, buf, l) // (B, L, D)
        noBuffer + diffusion_pos_embed_learned

    /// The training losses of one batch: tokens (B, N, C) dense latents, pivots (B, S, C) pivot latents,
    /// labels (B,), epoch (for the pivot-condition warm-up). Draws orders, masks, label drops and diffusion
    /// noise from torch's generator.
    member this.TrainingLosses(tokens: torch.Tensor, pivots: torch.Tensor, labels: torch.Tensor, epoch: float) =
        this.TrainingLosses(tokens, pivots, Condition.Labels labels, epoch, RowWindow.Whole tokens.shape.[0])

    /// The training losses of one batch under any condition (labels or captions).
    member this.TrainingLosses(tokens: torch.Tensor, pivots: torch.Tensor, condition: Condition, epoch: float) =
        this.TrainingLosses(tokens, pivots, condition, epoch, RowWindow.Whole tokens.shape.[0])

    /// The training losses of this process's rows of a class-conditioned global batch.
    member this.TrainingLosses
        (tokens: torch.Tensor, pivots: torch.Tensor, labels: torch.Tensor, epoch: float, rows: RowWindow)
        =
        this.TrainingLosses(tokens, pivots, Condition.Labels labels, epoch, rows)

    /// The training losses of this process's rows of a global batch (data-parallel training). Every per-row
    /// draw (orders, label drops, pivot dropout, diffusion steps and noise) is made for all rows of the global
    /// batch and narrowed to `rows`; the per-batch draws (the two mask ratios) are made once, as in the whole
    /// batch. With generators that agree on every process, each process sees exactly its rows' share of the
    /// undivided batch's draws, and since every row masks the same number of tokens, the mean of the
    /// processes' losses is the undivided batch's loss.
    member this.TrainingLosses
        (tokens: torch.Tensor, pivots: torch.Tensor, condition: Condition, epoch: float, rows: RowWindow)
        =
        let b = tokens.shape.[0]

        if rows.Count <> b then
            invalidArg "rows" (sprintf "the batch has %d rows, its window %d" b rows.Count)

        use conditionEmb = this.ConditionEmbedding condition

        // The null embedding of caption/label dropout, made once for both phases' encoder passes.
        let nullEmb =
            if this.training && config.Training.LabelDropProb > 0.0 then
                Some(this.NullEmbedding b)
            else
                None

        use _ =
            { new IDisposable with
                member _.Dispose() =
                    nullEmb |> Option.iter (fun t -> t.Dispose())
            }

        use orders = Masking.randomOrdersOf rows s n tokens.device

        let phase1, pivotStates, visiblePivots =
            this.Phase1Loss(tokens, pivots, orders, rows, nullEmb, conditionEmb)

        use phase1 = phase1

        // Phase 2: ceil(N rate) dense tokens masked; the pivots known, seen through the pivot condition.
        let masked = int64 (Math.Ceiling(float n * PhaseLosses.denseMaskRate config))
        use denseOrders = orders.narrow (1L, s, n)
        use mask = Masking.maskByOrder masked denseOrders l tokens.dtype

        use pivotCondition =
            if not hasPivots then
                this.PivotCondition(tokens, pivots, null, null)
            else
                use seen = this.PivotCondition(tokens, pivots, pivotStates, visiblePivots)
                use placeholder = this.PivotPlaceholder(b, tokens.dtype)
                PhaseLosses.pivotDropout config rows epoch placeholder seen

        if not (isNull (box pivotStates)) then
            pivotStates.Dispose()
            visiblePivots.Dispose()

        use phase2 =
            this.Phase2Loss(tokens, pivotCondition, mask, rows, nullEmb, conditionEmb)

        PhaseLosses.weigh config phase1 phase2

    /// Phase 1's loss: ceil(S rate) pivots masked (rate ~ truncated normal on [min, 1] or Beta(4, 1)) and every
    /// dense token, the MLP head's loss on the masked pivots. Returns the loss, the decoder's pivot states
    /// (B, S, D), detached, and the pivots phase 1 saw (B, S) (1 = visible); without pivots a zero loss and nulls.
    member private this.Phase1Loss
        (
            tokens: torch.Tensor,
            pivots: torch.Tensor,
            orders: torch.Tensor,
            rows: RowWindow,
            nullEmb: torch.Tensor option,
            conditionEmb: torch.Tensor
        ) =
        let dt = tokens.dtype

        if not hasPivots then
            torch.zeros ([||], dtype = dt, device = tokens.device), null, null
        else
            let mul = int64 config.Training.DiffusionBatchMul
            let masked = int64 (Math.Ceiling(float s * PhaseLosses.pivotMaskRate config))
            use m = Masking.maskByOrder masked orders l dt
            m.narrow(1L, s, n).fill_ (scalar 1.0) |> ignore
            use first = (required "pivots" cond_proj).call pivots |> castTo dt
            use enc = encodeRows rows nullEmb first tokens m conditionEmb 0L
            use dec = this.Decoder(enc, m, 0L)
            use states = dec.narrow (1L, 0L, s) // (B, S, D)
            use pivotMask = m.narrow (1L, 0L, s)

            let loss =
                HiMarParts.perToken mul pivots states pivotMask (fun target z rowMask ->
                    (required "MLP head" diffloss).TrainingLoss(target, z, rowMask, rows.Times s))

            loss, states.detach (), (1.0 - pivotMask)

    /// Phase 2's loss: the encoder sees `pivotCondition` and the dense tokens known under `mask` (B, L); the
    /// dense decoder states go through the Transformer head (all tokens together, as a (B, C, g, g) grid) or
    /// the MLP head (per token).
    member private this.Phase2Loss
        (
            tokens: torch.Tensor,
            pivotCondition: torch.Tensor,
            mask: torch.Tensor,
            rows: RowWindow,
            nullEmb: torch.Tensor option,
            conditionEmb: torch.Tensor
        ) =
        let mul = int64 config.Training.DiffusionBatchMul
        use enc = encodeRows rows nullEmb pivotCondition tokens mask conditionEmb 1L
        use dec = this.Decoder(enc, mask, 1L)
        use states = dec.narrow (1L, s, n) // (B, N, D)
        use denseMask = mask.narrow (1L, s, n)

        match config.Phase2Head with
        | Phase2Head.Transformer ->
            HiMarParts.asGrid (int64 config.SeqH) mul tokens states denseMask (fun target zImg m ->
                (required "Transformer head" cond_diffloss).TrainingLoss(target, zImg, m, rows))
        | _ ->
            HiMarParts.perToken mul tokens states denseMask (fun target z m ->
                (required "MLP head" diffloss).TrainingLoss(target, z, m, rows.Times n))

    /// `forward(tokens, cond, labels)` is the training loss at the end of the warm-up; use `TrainingLosses`.
    override this.forward(tokens, cond, labels) =
        let r =
            this.TrainingLosses(tokens, cond, labels, float config.Training.PivotConditionWarmupEpochs)

        r.Phase1.Dispose()
        r.Phase2.Dispose()
        r.Total
