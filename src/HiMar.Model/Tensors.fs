namespace HiMar.Model

open TorchSharp

/// Small tensor helpers shared by the layers and the diffusion math.
[<AutoOpen>]
module Tensors =
    /// A float as a TorchSharp Scalar (F# does not pick TorchSharp's implicit conversions between overloads).
    let inline scalar (x: float) : Scalar = Scalar.op_Implicit x

    /// An int64 as a TorchSharp Scalar.
    let inline scalarL (x: int64) : Scalar = Scalar.op_Implicit x

    /// The shape (B, 1, ..., 1) that broadcasts a per-row value over a tensor like `like`.
    let rowShape (like: torch.Tensor) =
        Array.init (int like.Dimensions) (fun i -> if i = 0 then like.shape.[0] else 1L)

    /// 1.0 for rows whose step t is not zero, 0.0 where it is, shaped (B, 1, ..., 1) in like's dtype.
    let nonzeroRows (t: torch.Tensor) (like: torch.Tensor) =
        use ne = t.ne (scalarL 0L)
        use cast = ne.``to`` like.dtype
        cast.reshape (rowShape like)
