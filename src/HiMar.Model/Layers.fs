namespace HiMar.Model

open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn

/// Explicit registration under reference names, shared by every layer base class.
module internal Registration =
    let child (owner: torch.nn.Module) (name: string) (m: 'M :> torch.nn.Module) : 'M =
        owner.register_module (name, m)
        m

    let param (owner: torch.nn.Module) (name: string) (t: torch.Tensor) (requiresGrad: bool) : Parameter =
        let p = new Parameter(t, requiresGrad)
        owner.register_parameter (name, p)
        p

/// Base class of one-input layers. Registration is explicit (`Child`, `Param`) under the reference's
/// attribute names; TorchSharp's reflective `RegisterComponents` is a no-op here.
[<AbstractClass>]
type Layer<'T, 'R>(name: string) =
    inherit Module<'T, 'R>(name)
    /// Registers a submodule under the reference attribute name and returns it.
    member this.Child(childName: string, m: 'M) : 'M = Registration.child this childName m

    /// Registers a parameter under the reference attribute name and returns it.
    member this.Param(paramName: string, t: torch.Tensor, ?requiresGrad: bool) =
        Registration.param this paramName t (defaultArg requiresGrad true)

    override _.RegisterComponents() = ()

/// Base class of two-input layers (see `Layer<'T, 'R>`).
[<AbstractClass>]
type Layer<'T1, 'T2, 'R>(name: string) =
    inherit Module<'T1, 'T2, 'R>(name)
    /// Registers a submodule under the reference attribute name and returns it.
    member this.Child(childName: string, m: 'M) : 'M = Registration.child this childName m

    /// Registers a parameter under the reference attribute name and returns it.
    member this.Param(paramName: string, t: torch.Tensor, ?requiresGrad: bool) =
        Registration.param this paramName t (defaultArg requiresGrad true)

    override _.RegisterComponents() = ()

/// Base class of three-input layers (see `Layer<'T, 'R>`).
[<AbstractClass>]
type Layer<'T1, 'T2, 'T3, 'R>(name: string) =
    inherit Module<'T1, 'T2, 'T3, 'R>(name)
    /// Registers a submodule under the reference attribute name and returns it.
    member this.Child(childName: string, m: 'M) : 'M = Registration.child this childName m

    /// Registers a parameter under the reference attribute name and returns it.
    member this.Param(paramName: string, t: torch.Tensor, ?requiresGrad: bool) =
        Registration.param this paramName t (defaultArg requiresGrad true)

    override _.RegisterComponents() = ()

/// The combinators the layers are written with.
[<AutoOpen>]
module Combinators =
    /// x * (1 + scale) + shift, with per-sample (B, C) or per-token (B, T, C) modulation.
    let modulate (shift: torch.Tensor) (scale: torch.Tensor) (x: torch.Tensor) =
        let shift, scale =
            if x.Dimensions = 3L && shift.Dimensions = 2L then
                shift.unsqueeze 1L, scale.unsqueeze 1L
            else
                shift, scale

        x * (scale + 1.0) + shift

    /// x * (1 + scale): the shift-free modulation of Hi-MAR's scale-aware blocks.
    let modulateScale (scale: torch.Tensor) (x: torch.Tensor) = x * (scale + 1.0)

    /// x + gate * f(x), the gated residual of adaLN-Zero blocks.
    let residual (gate: torch.Tensor) (f: torch.Tensor -> torch.Tensor) (x: torch.Tensor) =
        let gate =
            if x.Dimensions = 3L && gate.Dimensions = 2L then
                gate.unsqueeze 1L
            else
                gate

        x + gate * f x

    /// Splits the last dimension into n equal chunks.
    let chunks (n: int) (t: torch.Tensor) = t.chunk (int64 n, -1L)

    /// Two equal chunks of the last dimension.
    let chunk2 (t: torch.Tensor) =
        let c = chunks 2 t
        c.[0], c.[1]

    /// Three equal chunks of the last dimension.
    let chunk3 (t: torch.Tensor) =
        let c = chunks 3 t
        c.[0], c.[1], c.[2]

    /// Four equal chunks of the last dimension.
    let chunk4 (t: torch.Tensor) =
        let c = chunks 4 t
        c.[0], c.[1], c.[2], c.[3]

    /// Six equal chunks of the last dimension.
    let chunk6 (t: torch.Tensor) =
        let c = chunks 6 t
        c.[0], c.[1], c.[2], c.[3], c.[4], c.[5]

    /// [x_half; x_half] from the first half of a batch: both guidance halves start from the same input.
    let firstHalfTwice (x: torch.Tensor) =
        use half = x.narrow (0L, 0L, x.shape.[0] / 2L)
        torch.cat ([| half; half |], 0L)

    /// Classifier-free guidance on rows [cond; uncond]: g = uncond + s (cond - uncond), returned as [g; g].
    let guide (scale: float) (eps: torch.Tensor) =
        let n = eps.shape.[0] / 2L
        use cond = eps.narrow (0L, 0L, n)
        use uncond = eps.narrow (0L, n, n)
        use guided = uncond + (cond - uncond) * scale
        torch.cat ([| guided; guided |], 0L)

    /// Dropout active only in training mode.
    let dropout (p: float) (training: bool) (x: torch.Tensor) =
        if training && p > 0.0 then
            torch.nn.functional.dropout (x, p, true)
        else
            x

/// The adaLN modulation head `Sequential(SiLU(), Linear(dim, n * dim))` (keys `1.weight`, `1.bias`).
module AdaLN =
    /// SiLU then a Linear from `dim` to `n * dim`.
    let modulation (dim: int64) (n: int64) =
        Sequential(SiLU() :> Module<torch.Tensor, torch.Tensor>, Linear(dim, n * dim))

    /// The initial `adaLN_shift` of a scale-aware block: chunks [0 | 1 | 0 | 1] of `dim` for each task.
    let identityShift (numTasks: int64) (dim: int64) =
        use z = torch.zeros (dim)
        use o = torch.ones (dim)
        use row = torch.cat ([| z; o; z; o |], 0L)
        row.reshape(1L, 1L, 1L, 4L * dim).repeat (numTasks, 1L, 1L, 1L)

/// timm `Mlp`: fc1, activation, dropout, fc2, dropout (keys `fc1.*`, `fc2.*`).
type Mlp(inFeatures: int64, hidden: int64, approximateGelu: bool, drop: float) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("Mlp")
    let fc1 = this.Child("fc1", Linear(inFeatures, hidden))
    let fc2 = this.Child("fc2", Linear(hidden, inFeatures))

    let act (x: torch.Tensor) =
        if approximateGelu then
            torch.nn.functional.gelu (x, GELU.Approximate.tanh)
        else
            torch.nn.functional.gelu x

    override this.forward x =
        x
        |> fc1.call
        |> act
        |> dropout drop this.training
        |> fc2.call
        |> dropout drop this.training

/// timm `Attention` with qkv bias: softmax(q k^T / sqrt(head_dim)) v over all tokens (keys `qkv.*`, `proj.*`).
type Attention(dim: int64, numHeads: int64, attnDrop: float, projDrop: float) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("Attention")
    let headDim = dim / numHeads
    let qkv = this.Child("qkv", Linear(dim, 3L * dim))
    let proj = this.Child("proj", Linear(dim, dim))

    override this.forward x =
        let b, n = x.shape.[0], x.shape.[1]
        // (B, N, 3C) -> (3, B, heads, N, headDim)
        use qkvT =
            qkv.call(x).reshape(b, n, 3L, numHeads, headDim).permute (2L, 0L, 3L, 1L, 4L)

        use q = qkvT.[0]
        use k = qkvT.[1]
        use v = qkvT.[2]
        let p = if this.training then attnDrop else 0.0
        use o = torch.nn.functional.scaled_dot_product_attention (q, k, v, p = p)
        // (B, heads, N, headDim) -> (B, N, C)
        o.transpose(1L, 2L).reshape (b, n, dim)
        |> proj.call
        |> dropout projDrop this.training

/// The sinusoidal timestep embedding followed by `mlp = Sequential(Linear(256, W), SiLU, Linear(W, W))`
/// (DiT/MAR `TimestepEmbedder`; keys `mlp.0.*`, `mlp.2.*`).
type TimestepEmbedder(hidden: int64, frequencySize: int64) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("TimestepEmbedder")

    let mlp =
        this.Child(
            "mlp",
            Sequential(
                Linear(frequencySize, hidden) :> Module<torch.Tensor, torch.Tensor>,
                SiLU(),
                Linear(hidden, hidden)
            )
        )

    /// [cos(t f) | sin(t f)] with f_k = exp(-ln(10000) k / half), k < half. The frequencies are built in
    /// float32 tensor ops exactly as the reference: at t near 1000 one ulp of f moves outputs by 1e-4.
    static member Embedding(t: torch.Tensor, dim: int64, ?maxPeriod: float) =
        let maxPeriod = defaultArg maxPeriod 10000.0
        let half = dim / 2L
        use k = torch.arange (0L, half, dtype = torch.float32, device = t.device)
        use e = k * scalar (-System.Math.Log maxPeriod) / scalar (float half)
        use freqs = e.exp ()
        use tf = t.``to`` torch.float32
        use args = tf.unsqueeze (1L) * freqs.unsqueeze (0L)
        use c = args.cos ()
        use s = args.sin ()
        torch.cat ([| c; s |], 1L)

    override _.forward t =
        use emb = TimestepEmbedder.Embedding(t, frequencySize)
        // Run the MLP in the parameters' dtype (float64 models take the float32 embedding cast up).
        let w = (mlp.parameters () |> Seq.head).dtype
        use cast = emb.``to`` w
        mlp.call cast
