namespace HiMar.Model

open TorchSharp
open type TorchSharp.torch.nn

/// What one batch is conditioned on.
[<RequireQualifiedAccess>]
type Condition =
    /// Class labels (B,) int64; the null class `ClassNum` takes the unconditional embedding.
    | Labels of labels: torch.Tensor
    /// Word ids (B, L) int64 of the built-in text encoder's vocabulary (0 pads; an all-zero row is the empty
    /// caption).
    | Tokens of ids: torch.Tensor
    /// An external encoder's context vectors (B, L, ContextDim).
    | Context of context: torch.Tensor

    /// Rows in the batch.
    member c.Rows =
        match c with
        | Labels t
        | Tokens t
        | Context t -> t.shape.[0]

    /// The tensor it holds.
    member c.Tensor =
        match c with
        | Labels t
        | Tokens t
        | Context t -> t

    /// Rows [start, start + count) of the condition (a view of the same tensor).
    member c.Narrow(start: int64, count: int64) =
        match c with
        | Labels t -> Labels(t.narrow (0L, start, count))
        | Tokens t -> Tokens(t.narrow (0L, start, count))
        | Context t -> Context(t.narrow (0L, start, count))

    /// A random condition of `batch` rows for a configuration (benchmarks, smoke runs): labels, word ids or
    /// context vectors, from torch's generator.
    static member Random(config: HiMarConfig, batch: int64) =
        match config.Text.Conditioning, config.Text.Encoder with
        | Conditioning.Class, _ -> Labels(torch.randint (0L, int64 config.Backbone.ClassCount, [| batch |]))
        | _, TextEncoderKind.Builtin ->
            Tokens(
                torch.randint (1L, int64 config.Text.Vocabulary.Length + 1L, [| batch; int64 config.ContextLength |])
            )
        | _ -> Context(torch.randn (batch, int64 config.ContextLength, int64 config.Text.ExternalWidth))

    /// Disposes the tensor it holds.
    interface System.IDisposable with
        member c.Dispose() = c.Tensor.Dispose()

/// A pre-LayerNorm Transformer block without modulation: x + attn(norm1 x), then x + mlp(norm2 x); every token
/// sees every other (captions are read whole, not left to right).
type TextBlock(dim: int64, heads: int64) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("TextBlock")
    let norm1 = this.Child("norm1", LayerNorm(dim, eps = 1e-6))
    let attn = this.Child("attn", new Attention(dim, heads, 0.0, 0.0))
    let norm2 = this.Child("norm2", LayerNorm(dim, eps = 1e-6))
    let mlp = this.Child("mlp", new Mlp(dim, 4L * dim, false, 0.0))

    override _.forward x =
        use a = attn.call (norm1.call x)
        use h = x + a
        use m = mlp.call (norm2.call h)
        h + m

/// The built-in text encoder (`text_encoder.*`): word embeddings plus learned positions, `depth` TextBlocks and
/// a final LayerNorm; word ids (B, L) -> context (B, L, width). Trained with the generator, so it learns exactly
/// the distinctions the images need; meant for data sets whose captions use a small, closed vocabulary.
type BuiltinTextEncoder(vocabSize: int64, length: int64, width: int64, depth: int, heads: int64) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("BuiltinTextEncoder")

    let token_embed = this.Child("token_embed", Embedding(vocabSize + 1L, width))

    let pos_embed =
        this.Param("pos_embed", torch.randn(1L, length, width).mul_ (scalar 0.02))

    let blocks =
        this.Child("blocks", ModuleList<TextBlock>([| for _ in 1..depth -> new TextBlock(width, heads) |]))

    let norm = this.Child("norm", LayerNorm(width, eps = 1e-6))

    override _.forward ids =
        use e = token_embed.call ids
        let h0 = e + pos_embed
        let h = Seq.fold (fun (h: torch.Tensor) (blk: TextBlock) -> blk.call h) h0 blocks
        norm.call h
