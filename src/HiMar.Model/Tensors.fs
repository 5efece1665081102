namespace HiMar.Model

open System
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

/// The rows of one process's share of a global batch split across processes (data-parallel training): rows
/// [Offset, Offset + Count) of Total. Training draws its randomness (orders, label drops, pivot dropout,
/// diffusion steps and noise) for all Total rows, from generators that agree on every process, and keeps this
/// window's rows: a process then sees exactly the draws its rows get in the undivided batch, so N processes of
/// B rows train as one process of N B rows. `RowWindow.Whole n` is the undivided batch (no narrowing at all).
[<Struct>]
type RowWindow =
    {
        /// The first row of this share.
        Offset: int64
        /// Rows in this share.
        Count: int64
        /// Rows in the global batch.
        Total: int64
    }

    /// All n rows: the single-process case.
    static member Whole(n: int64) = { Offset = 0L; Count = n; Total = n }

    /// Whether this is the whole batch.
    member w.IsWhole = w.Offset = 0L && w.Count = w.Total

    /// The same share counted in units of k rows per sample (one row per token, say).
    member w.Times(k: int64) =
        {
            Offset = w.Offset * k
            Count = w.Count * k
            Total = w.Total * k
        }

    /// A random draw for `rows` local rows of shape (rows, tail...), where the local rows are one or more
    /// repeated blocks of this share (`rows` = blocks x Count): `make` draws (blocks x Total, tail...) for the
    /// global batch and this share's rows of each block are kept. The whole batch calls `make` once, unchanged.
    member w.Draw(rows: int64, tail: int64[], make: Func<int64[], torch.Tensor>) =
        if w.IsWhole then
            make.Invoke(Array.append [| rows |] tail)
        else
            if w.Count <= 0L || rows % w.Count <> 0L then
                invalidArg "rows" (sprintf "%d rows are not whole blocks of this share's %d rows" rows w.Count)

            let blocks = rows / w.Count
            use all = make.Invoke(Array.append [| blocks * w.Total |] tail)
            // (blocks Total, tail...) -> (blocks, Total, tail...) -> this share's rows -> (blocks Count, tail...)
            use split = all.view (Array.append [| blocks; w.Total |] tail)
            use mine = split.narrow (1L, w.Offset, w.Count)
            mine.reshape (Array.append [| rows |] tail)
