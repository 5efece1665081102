namespace HiMar.Model

open System
open System.Collections.Generic
open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn

/// The settings of a CLIP text tower (HF `CLIPTextConfig`; OpenAI `clip/model.py` `build_model`).
type ClipTextConfig =
    {
        /// Token vocabulary (49408: 256 bytes, their 256 end-of-word forms, 48894 merges, 2 special tokens).
        VocabSize: int64
        /// Width D of the residual stream (`hidden_size`, OpenAI `transformer_width`).
        Width: int64
        /// Residual attention blocks (`num_hidden_layers`).
        Layers: int
        /// Attention heads (`num_attention_heads`; OpenAI always uses width / 64).
        Heads: int64
        /// Hidden width of each block's MLP (`intermediate_size`, 4 x width in OpenAI's models).
        MlpWidth: int64
        /// Positions L (`max_position_embeddings`, OpenAI `context_length`): 77.
        ContextLength: int64
        /// Output width of `text_projection` (full CLIP, HF `CLIPTextModelWithProjection`), or 0 for none
        /// (HF `CLIPTextModel`, what text-to-image models load).
        ProjectionDim: int64
        /// LayerNorm eps (1e-5).
        LayerNormEps: float
        /// quick_gelu x sigmoid(1.702 x) (OpenAI's models) or the exact GELU (`hidden_act = "gelu"`).
        QuickGelu: bool
    }

    /// The text tower of OpenAI CLIP ViT-L/14 (HF openai/clip-vit-large-patch14 `CLIPTextModel`): 12 layers,
    /// width 768, 12 heads, 77 positions, no projection; 123,060,480 parameters.
    static member vitL14 =
        {
            VocabSize = 49408L
            Width = 768L
            Layers = 12
            Heads = 12L
            MlpWidth = 3072L
            ContextLength = 77L
            ProjectionDim = 0L
            LayerNormEps = 1e-5
            QuickGelu = true
        }

/// HF `CLIPTextEmbeddings` (modeling_clip.py): token plus learned absolute position embeddings
/// (keys `token_embedding.weight` (V, D), `position_embedding.weight` (77, D)). HF's `position_ids` buffer is
/// not persistent (older checkpoints carry it; the loader ignores it): positions are 0..L-1.
type ClipTextEmbeddings(config: ClipTextConfig) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("CLIPTextEmbeddings")

    let token_embedding =
        this.Child("token_embedding", Embedding(config.VocabSize, config.Width))

    let position_embedding =
        this.Child("position_embedding", Embedding(config.ContextLength, config.Width))

    /// Token ids (B, L), L <= ContextLength -> embeddings (B, L, D).
    override _.forward ids =
        let l = ids.shape.[1]

        if l > config.ContextLength then
            invalidArg "ids" (sprintf "%d tokens per caption; the model has %d positions" l config.ContextLength)

        use positions = torch.arange (l, dtype = torch.int64, device = ids.device)
        use tokens = token_embedding.call ids
        use pos = position_embedding.call positions
        // (B, L, D) + (L, D)
        tokens + pos

/// HF `CLIPAttention`: multi-head self-attention with separate projections (keys `q_proj`, `k_proj`, `v_proj`,
/// `out_proj`, each with bias), scaled by head_dim^-0.5, under the causal mask of the text tower.
type ClipAttention(width: int64, heads: int64) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("CLIPAttention")

    do
        if heads <= 0L || width % heads <> 0L then
            invalidArg "heads" (sprintf "width %d does not split into %d heads" width heads)

    let headDim = width / heads
    let q_proj = this.Child("q_proj", Linear(width, width))
    let k_proj = this.Child("k_proj", Linear(width, width))
    let v_proj = this.Child("v_proj", Linear(width, width))
    let out_proj = this.Child("out_proj", Linear(width, width))

    override _.forward x =
        let b, n = x.shape.[0], x.shape.[1]
        // (B, N, D) -> (B, heads, N, headDim)
        let split (t: torch.Tensor) =
            t.reshape(b, n, heads, headDim).transpose (1L, 2L)

        use q0 = q_proj.call x
        use k0 = k_proj.call x
        use v0 = v_proj.call x
        use q = split q0
        use k = split k0
        use v = split v0
        // Position i attends to positions 0..i only.
        use o = torch.nn.functional.scaled_dot_product_attention (q, k, v, is_casual = true)
        // (B, heads, N, headDim) -> (B, N, D)
        use merged = o.transpose(1L, 2L).reshape (b, n, width)
        out_proj.call merged

/// HF `CLIPMLP`: fc1, quick_gelu (or GELU), fc2 (keys `fc1.*`, `fc2.*`).
type ClipMlp(width: int64, hidden: int64, quickGelu: bool) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("CLIPMLP")
    let fc1 = this.Child("fc1", Linear(width, hidden))
    let fc2 = this.Child("fc2", Linear(hidden, width))

    /// quick_gelu, OpenAI's approximation: x sigmoid(1.702 x).
    static member QuickGelu(x: torch.Tensor) =
        use s = (x * 1.702).sigmoid ()
        x * s

    override _.forward x =
        use h = fc1.call x

        use a =
            if quickGelu then
                ClipMlp.QuickGelu h
            else
                torch.nn.functional.gelu h

        fc2.call a

/// HF `CLIPEncoderLayer`, a pre-norm residual block: x + attn(ln1 x), then x + mlp(ln2 x)
/// (keys `self_attn.*`, `layer_norm1.*`, `mlp.*`, `layer_norm2.*`).
type ClipEncoderLayer(config: ClipTextConfig) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("CLIPEncoderLayer")

    let self_attn =
        this.Child("self_attn", new ClipAttention(config.Width, config.Heads))

    let layer_norm1 =
        this.Child("layer_norm1", LayerNorm(config.Width, eps = config.LayerNormEps))

    let mlp =
        this.Child("mlp", new ClipMlp(config.Width, config.MlpWidth, config.QuickGelu))

    let layer_norm2 =
        this.Child("layer_norm2", LayerNorm(config.Width, eps = config.LayerNormEps))

    override _.forward x =
        use h = x + (x |> layer_norm1.call |> self_attn.call)
        h + (h |> layer_norm2.call |> mlp.call)

/// HF `CLIPEncoder`: the blocks in order (keys `layers.N.*`).
type ClipEncoder(config: ClipTextConfig) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("CLIPEncoder")

    let layers =
        this.Child(
            "layers",
            ModuleList<Module<torch.Tensor, torch.Tensor>>(
                [|
                    for _ in 1 .. config.Layers -> new ClipEncoderLayer(config) :> Module<torch.Tensor, torch.Tensor>
                |]
            )
        )

    override _.forward x =
        layers |> Seq.fold (fun (h: torch.Tensor) layer -> layer.call h) x

/// HF `CLIPTextTransformer`: embeddings, the causal encoder and the final LayerNorm
/// (keys `embeddings.*`, `encoder.layers.N.*`, `final_layer_norm.*`). Ids (B, L) -> last hidden state (B, L, D).
type ClipTextTransformer(config: ClipTextConfig) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("CLIPTextTransformer")
    let embeddings = this.Child("embeddings", new ClipTextEmbeddings(config))
    let encoder = this.Child("encoder", new ClipEncoder(config))

    let final_layer_norm =
        this.Child("final_layer_norm", LayerNorm(config.Width, eps = config.LayerNormEps))

    override _.forward ids =
        use e = embeddings.call ids
        use h = encoder.call e
        final_layer_norm.call h

/// HF `CLIPTextModel` (or `CLIPTextModelWithProjection` when `ProjectionDim` > 0): the text tower under
/// `text_model.*`, plus `text_projection.weight` (P, D, no bias) with a projection. Its state_dict keys are
/// those of the published safetensors files (`text_model.encoder.layers.0.self_attn.q_proj.weight`, ...).
type ClipTextModel(config: ClipTextConfig) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("CLIPTextModel")
    let text_model = this.Child("text_model", new ClipTextTransformer(config))

    let text_projection =
        if config.ProjectionDim > 0L then
            Some(this.Child("text_projection", Linear(config.Width, config.ProjectionDim, hasBias = false)))
        else
            None

    /// The configuration the model was built with.
    member _.Config = config

    /// The last hidden state (B, L, D) of token ids (B, L): the context sequence text-to-image models use.
    override _.forward ids = text_model.call ids

    /// HF `pooler_output` (B, D): the last hidden state at each caption's end token, found as the position of
    /// the largest id (the end token 49407 is the largest id of CLIP's vocabulary, and the first one wins).
    member _.Pool(lastHidden: torch.Tensor, ids: torch.Tensor) =
        let b, d = lastHidden.shape.[0], lastHidden.shape.[2]
        use ends = ids.argmax (-1L)
        // (B,) -> (B, 1, D): the end position repeated over the width
        use index = ends.reshape(b, 1L, 1L).expand (b, 1L, d)
        use picked = lastHidden.gather (1L, index)
        // (B, 1, D) -> (B, D)
        picked.squeeze 1L

    /// HF `text_embeds` (B, P): the pooled state through `text_projection` (CLIP's joint embedding space).
    member _.Project(pooled: torch.Tensor) =
        match text_projection with
        | Some p -> p.call pooled
        | None -> invalidOp "this CLIP text model has no text_projection (ProjectionDim = 0)"

/// Reading a CLIP text configuration off a checkpoint's tensor shapes.
module ClipText =
    /// The configuration of a `text_model.*` state_dict (HF layout), from its shapes: vocabulary and width from
    /// `token_embedding`, positions from `position_embedding`, layers from the highest `layers.N`, MLP width from
    /// `fc1`, projection from `text_projection.weight` if present. Heads, activation and eps are not in the shapes:
    /// they come as arguments (heads <= 0 takes OpenAI's rule, width / 64). A missing key raises
    /// WeightMismatchException naming it.
    [<CompiledName("ConfigFromShapes")>]
    let configFromShapes (shapes: IReadOnlyDictionary<string, int64[]>) (heads: int64) (quickGelu: bool) (eps: float) =
        let shape key =
            match shapes.TryGetValue key with
            | true, s -> s
            | _ -> raise (WeightMismatchException([ key ], [], []))

        let token = shape "text_model.embeddings.token_embedding.weight"
        let positions = shape "text_model.embeddings.position_embedding.weight"
        let prefix = "text_model.encoder.layers."

        let layers =
            shapes.Keys
            |> Seq.filter (fun k -> k.StartsWith(prefix, StringComparison.Ordinal))
            |> Seq.map (fun k -> int (k.Substring(prefix.Length).Split('.').[0]))
            |> Seq.fold max -1
            |> (+) 1

        let width = token.[1]

        {
            VocabSize = token.[0]
            Width = width
            Layers = layers
            Heads = (if heads > 0L then heads else width / 64L)
            MlpWidth = (shape "text_model.encoder.layers.0.mlp.fc1.weight").[0]
            ContextLength = positions.[0]
            ProjectionDim =
                match shapes.TryGetValue "text_projection.weight" with
                | true, s -> s.[0]
                | _ -> 0L
            LayerNormEps = eps
            QuickGelu = quickGelu
        }
