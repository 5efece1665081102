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

// Each arity inherits its own TorchSharp Module<...> (for `forward`/`call`) and F# has no mixins, so the three
// registration members repeat, each a one-line forward to `Registration`.
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

/// The number format the matmul-heavy layers (Linear, convolutions and the attention they feed) compute in.
/// Parameters stay in their own dtype (fp32 master weights); only the products are taken in bf16.
type Precision =
    /// Products in the parameters' own dtype (fp32, or fp64 in the float64 tests).
    | Fp32 = 0
    /// Products in bfloat16 (8 mantissa bits, fp32's range): the bf16 units of the CPU (AVX512-BF16, AMX) or GPU.
    | Bf16 = 1

/// A layer that can take its products in a lower precision than its parameters: inputs, weights and bias are
/// cast to `ComputeType` inside `forward`, and the product comes out in that dtype (as under PyTorch's autocast,
/// so autograd gives the fp32 parameters fp32 gradients through the cast). `Freeze` keeps cast copies of the
/// weights for inference, where casting them on every call would cost as much as the product itself.
type IMixedPrecision =
    /// The dtype the products are computed in; None for the parameters' own.
    abstract ComputeType: torch.ScalarType option with get, set
    /// Keeps (true) or drops (false) cast copies of the weights; only valid while the weights do not change.
    abstract Freeze: bool -> unit

/// Mixed-precision versions of the torch.nn layers whose products dominate the cost. Each keeps the torch.nn
/// layer's keys (`weight`, `bias`) and its initialisation (drawn by a torch.nn layer of the same shape, so seeded
/// runs draw the same numbers as before), and computes in `ComputeType` (see `IMixedPrecision`).
module Mixed =
    /// A weight and an optional bias held in the compute dtype for inference.
    type private Frozen =
        {
            W: torch.Tensor
            B: torch.Tensor | null
        }

    /// Casts an optional parameter (a fresh tensor; null stays null).
    let private castOpt (dtype: torch.ScalarType) (p: torch.Tensor | null) : torch.Tensor | null =
        match p with
        | null -> null
        | t -> t.``to`` dtype

    let private disposeOpt (t: torch.Tensor | null) =
        match t with
        | null -> ()
        | t -> t.Dispose()

    /// The product `f x w b` in `computeType`: the frozen copies of w and b when there are, else casts made and
    /// freed here. Without a compute type, or when it is the parameters' own, f runs on the parameters as they are.
    let private compute
        (computeType: torch.ScalarType option)
        (frozen: Frozen option)
        (w: torch.Tensor)
        (b: torch.Tensor | null)
        (f: torch.Tensor -> torch.Tensor -> torch.Tensor | null -> torch.Tensor)
        (x: torch.Tensor)
        =
        match computeType with
        | Some ct when ct <> w.dtype ->
            use xc = x.``to`` ct

            match frozen with
            | Some fr when fr.W.dtype = ct -> f xc fr.W fr.B
            | _ ->
                use wc = w.``to`` ct
                let bc = castOpt ct b

                try
                    f xc wc bc
                finally
                    disposeOpt bc
        | _ -> f x w b

    /// Frees old frozen copies and makes new ones (outside any dispose scope) when `keep` and a compute type
    /// other than the parameters' own is set.
    let private refreeze (old: Frozen option) (keep: bool) (computeType: torch.ScalarType option) (w: torch.Tensor) b =
        old
        |> Option.iter (fun fr ->
            fr.W.Dispose()
            disposeOpt fr.B)

        match computeType with
        | Some ct when keep && ct <> w.dtype ->
            use _ = torch.no_grad ()
            let fw = w.``to``(ct).DetachFromDisposeScope()

            let fb =
                match castOpt ct b with
                | null -> null
                | t -> t.DetachFromDisposeScope()

            Some { W = fw; B = fb }
        | _ -> None

    /// torch.nn `Linear` (keys `weight`, `bias`) computing in its `ComputeType`.
    type Linear(inFeatures: int64, outFeatures: int64, ?hasBias: bool) as this =
        inherit Layer<torch.Tensor, torch.Tensor>("Linear")
        let hasBias = defaultArg hasBias true
        // The initial values come from torch.nn's own Linear: kaiming-uniform weight, uniform bias.
        let init = torch.nn.Linear(inFeatures, outFeatures, hasBias)
        let weight = this.Param("weight", init.weight.detach().clone ())

        let bias: Parameter | null =
            match init.bias with
            | null -> null
            | b -> this.Param("bias", b.detach().clone ())

        do init.Dispose()
        let mutable computeType: torch.ScalarType option = None
        let mutable frozen: Frozen option = None

        let linear (x: torch.Tensor) (w: torch.Tensor) (b: torch.Tensor | null) = torch.nn.functional.linear (x, w, b)

        /// The weight (out, in).
        member _.Weight: Parameter = weight

        /// The bias (out), or null.
        member _.Bias: Parameter | null = bias

        override _.forward x =
            compute computeType frozen weight bias linear x

        interface IMixedPrecision with
            member _.ComputeType
                with get () = computeType
                and set v = computeType <- v

            member _.Freeze keep =
                frozen <- refreeze frozen keep computeType weight bias

    /// torch.nn `Conv2d` with a square kernel, stride and padding (keys `weight`, `bias`) computing in its
    /// `ComputeType`.
    /// With `fullPrecision` the layer ignores any compute type (an output layer whose few products decide the
    /// result directly, such as the VAE decoder's last convolution).
    type Conv2d
        (inChannels: int64, outChannels: int64, kernel: int64, ?stride: int64, ?padding: int64, ?fullPrecision: bool) as this
        =
        inherit Layer<torch.Tensor, torch.Tensor>("Conv2d")
        let stride = defaultArg stride 1L
        let padding = defaultArg padding 0L
        let fullPrecision = defaultArg fullPrecision false
        // The initial values come from torch.nn's own Conv2d.
        let init =
            torch.nn.Conv2d(inChannels, outChannels, kernel, stride = stride, padding = padding)

        let weight = this.Param("weight", init.weight.detach().clone ())
        let bias = this.Param("bias", (nonNull init.bias).detach().clone ())
        do init.Dispose()
        let mutable computeType: torch.ScalarType option = None
        let mutable frozen: Frozen option = None

        let conv (x: torch.Tensor) (w: torch.Tensor) (b: torch.Tensor | null) =
            torch.nn.functional.conv2d (x, w, b, strides = [| stride; stride |], padding = [| padding; padding |])

        /// The kernel (out, in, k, k).
        member _.Weight: Parameter = weight

        /// The bias (out).
        member _.Bias: Parameter = bias

        override _.forward x =
            compute computeType frozen weight bias conv x

        interface IMixedPrecision with
            member _.ComputeType
                with get () = computeType
                and set v = computeType <- (if fullPrecision then None else v)

            member _.Freeze keep =
                frozen <- refreeze frozen keep computeType weight bias

    /// torch.nn `GroupNorm` (keys `weight`, `bias`) that always normalises in its parameters' dtype: a bf16 input
    /// (the product of a mixed-precision convolution) is cast up first, as autocast does for norms. Not only for
    /// accuracy: libtorch 2.10's CPU GroupNorm on bf16 input returned NaN for 8 groups of 4 channels and errors of
    /// 40% for other shapes in our tests (tests/HiMar.Tests check that this layer stays within bf16 rounding).
    type GroupNorm(groups: int64, channels: int64, eps: float) as this =
        inherit Layer<torch.Tensor, torch.Tensor>("GroupNorm")
        let weight = this.Param("weight", torch.ones channels)
        let bias = this.Param("bias", torch.zeros channels)

        /// The scale (channels).
        member _.Weight: Parameter = weight

        /// The shift (channels).
        member _.Bias: Parameter = bias

        override _.forward x =
            use xc = x.``to`` weight.dtype
            torch.nn.functional.group_norm (xc, groups, weight, bias, eps)

/// Sets the precision of every mixed-precision layer of a model, for a scope: training casts inside each call
/// (the fp32 master weights change every step), inference keeps cast copies of the weights while the scope lasts.
/// Disposing the scope puts the layers back as they were (products in the parameters' dtype, no copies).
type MixedPrecisionScope internal (layers: IMixedPrecision list, previous: torch.ScalarType option list) =
    /// The layers the scope changed.
    member _.Count = layers.Length

    interface System.IDisposable with
        member _.Dispose() =
            for layer, p in List.zip layers previous do
                layer.Freeze false
                layer.ComputeType <- p

/// Entry points for mixed precision (see `Precision`, `IMixedPrecision`).
module MixedPrecision =
    /// The dtype products are computed in for a precision (None: the parameters' own).
    [<CompiledName("ComputeType")>]
    let computeType (p: Precision) =
        match p with
        | Precision.Bf16 -> Some torch.ScalarType.BFloat16
        | _ -> None

    let private apply (m: torch.nn.Module) (p: Precision) (freeze: bool) =
        // TorchSharp's named_modules lists the descendants only: the module itself is checked first.
        let layers =
            [
                yield!
                    (match box m with
                     | :? IMixedPrecision as l -> [ l ]
                     | _ -> [])
                for struct (_, sub) in m.named_modules () do
                    match box sub with
                    | :? IMixedPrecision as l -> yield l
                    | _ -> ()
            ]

        let previous = layers |> List.map (fun l -> l.ComputeType)

        for l in layers do
            l.ComputeType <- computeType p
            l.Freeze freeze

        new MixedPrecisionScope(layers, previous)

    /// Training: products in `p`, weights cast inside each call (gradients reach the fp32 parameters).
    [<CompiledName("ForTraining")>]
    let forTraining (m: torch.nn.Module) (p: Precision) = apply m p false

    /// Inference: products in `p`, with cast copies of the weights kept until the scope is disposed (the weights
    /// must not change meanwhile).
    [<CompiledName("ForInference")>]
    let forInference (m: torch.nn.Module) (p: Precision) = apply m p true

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

    /// `t` in `dtype`: `t` itself when it already is, else a cast copy (and `t` is disposed). Brings the product
    /// of a mixed-precision layer back into the fp32 stream where the next operation needs matching dtypes.
    let castTo (dtype: torch.ScalarType) (t: torch.Tensor) =
        if t.dtype = dtype then
            t
        else
            use t = t
            t.``to`` dtype

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
        Sequential(SiLU() :> Module<torch.Tensor, torch.Tensor>, new Mixed.Linear(dim, n * dim))

    /// The initial `adaLN_shift` of a scale-aware block: chunks [0 | 1 | 0 | 1] of `dim` for each task.
    let identityShift (numTasks: int64) (dim: int64) =
        use z = torch.zeros (dim)
        use o = torch.ones (dim)
        use row = torch.cat ([| z; o; z; o |], 0L)
        row.reshape(1L, 1L, 1L, 4L * dim).repeat (numTasks, 1L, 1L, 1L)

/// timm `Mlp`: fc1, activation, dropout, fc2, dropout (keys `fc1.*`, `fc2.*`).
type Mlp(inFeatures: int64, hidden: int64, approximateGelu: bool, drop: float) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("Mlp")
    let fc1 = this.Child("fc1", new Mixed.Linear(inFeatures, hidden))
    let fc2 = this.Child("fc2", new Mixed.Linear(hidden, inFeatures))

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
    let qkv = this.Child("qkv", new Mixed.Linear(dim, 3L * dim))
    let proj = this.Child("proj", new Mixed.Linear(dim, dim))

    override this.forward x =
        let b, n = x.shape.[0], x.shape.[1]
        // The projections take the layer's precision; softmax(q k^T) v stays in x's dtype (fp32). bf16 rounds q and
        // k to 8 bits, so a logit of 100 moves by ~0.4 and the softmax weights with it (a 6% error on the parity
        // fixture's Transformer head), while bf16 attention ran no faster on CPU (16.4 ms vs 15.9 ms for 8 x 12
        // heads x 256 tokens x 64) and is a twelfth of the block's products at these widths.
        use qkvOut = qkv.call x |> castTo x.dtype
        // (B, N, 3C) -> (3, B, heads, N, headDim)
        use qkvT = qkvOut.reshape(b, n, 3L, numHeads, headDim).permute (2L, 0L, 3L, 1L, 4L)

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
                new Mixed.Linear(frequencySize, hidden) :> Module<torch.Tensor, torch.Tensor>,
                SiLU(),
                new Mixed.Linear(hidden, hidden)
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
