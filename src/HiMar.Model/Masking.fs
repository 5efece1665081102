namespace HiMar.Model

open System
open TorchSharp

/// The masking math of Hi-MAR (models/himar.py): generation orders, training mask ratios, the sampler's
/// cosine schedule and masks built from orders. Masks are float with 1 = masked (unknown), 0 = known.
module Masking =
    /// Random generation orders (B, S + N) of this process's rows of a global batch: a permutation of the pivot
    /// positions 0..S-1, then one of the dense positions S..S+N-1 (reference `sample_orders_step`), drawn for
    /// every row of the global batch.
    [<CompiledName("RandomOrdersOf")>]
    let randomOrdersOf (rows: RowWindow) (pivots: int64) (dense: int64) (device: torch.Device) =
        use rp =
            rows.Draw(rows.Count, [| pivots |], fun shape -> torch.rand (shape, device = device))

        use rd =
            rows.Draw(rows.Count, [| dense |], fun shape -> torch.rand (shape, device = device))

        use op = rp.argsort (1L)
        use od = rd.argsort (1L)
        use odShift = od + scalarL pivots
        torch.cat ([| op; odShift |], 1L)

    /// Random generation orders (B, S + N) of a whole batch (see `randomOrdersOf`).
    [<CompiledName("RandomOrders")>]
    let randomOrders (batch: int64) (pivots: int64) (dense: int64) (device: torch.Device) =
        randomOrdersOf (RowWindow.Whole batch) pivots dense device

    /// A (B, L) mask with 1 at the first `count` positions of each row's order (the positions generated last).
    [<CompiledName("MaskByOrder")>]
    let maskByOrder (count: int64) (orders: torch.Tensor) (seqLen: int64) (dtype: torch.ScalarType) =
        let b = orders.shape.[0]
        let mask = torch.zeros (b, seqLen, dtype = dtype, device = orders.device)

        if count > 0L then
            use first = orders.narrow (1L, 0L, count)
            use ones = torch.ones (b, count, dtype = dtype, device = orders.device)
            mask.scatter_ (1L, first, ones) |> ignore

        mask

    /// The phase-1 training mask ratio: a truncated normal on [mask_ratio_min, 1], centred at 1, std 0.25
    /// (scipy `truncnorm((min - 1) / 0.25, 0, loc=1, scale=0.25)`), one draw for the whole batch.
    [<CompiledName("TruncatedNormalRate")>]
    let truncatedNormalRate (minRate: float) =
        use t = torch.empty (1L, dtype = torch.float64)
        torch.nn.init.trunc_normal_ (t, 1.0, 0.25, minRate, 1.0) |> ignore
        t.item<float> ()

    /// A Beta(a, 1) mask ratio (the text-to-image rule, a = 4: mean 0.8), by inversion: u^(1/a), u ~ U(0, 1]
    /// (never 0, so every row masks at least one token).
    [<CompiledName("BetaRate")>]
    let betaRate (a: float) =
        use u = torch.rand (1L, dtype = torch.float64)
        Math.Pow(1.0 - u.item<float> (), 1.0 / a)

    /// The phase-2 training mask ratio of the cosine rule: cos(pi/2 u), u ~ U[0, 1).
    [<CompiledName("CosineRate")>]
    let cosineRate () =
        use u = torch.rand (1L, dtype = torch.float64)
        Math.Cos(Math.PI / 2.0 * u.item<float> ())

    /// The sampler's next mask length: floor(n cos(pi/2 (step+1)/steps)), clamped to [1, remaining - 1]
    /// so at least one token stays masked until the last step (which then predicts every remaining token).
    [<CompiledName("NextMaskLength")>]
    let nextMaskLength (n: int) (step: int) (steps: int) (remaining: int) =
        let ratio = Math.Cos(Math.PI / 2.0 * float (step + 1) / float steps)
        let len = float32 (Math.Floor(float n * ratio))
        max 1.0f (min (float32 (remaining - 1)) len)

    /// The linear guidance schedule: 1 + (scale - 1) (n - len) / n, growing with the share of known tokens.
    /// Evaluated in float32 in the reference's order, since the reference computes it on a float32 tensor.
    [<CompiledName("LinearCfg")>]
    let linearCfg (scale: float) (n: int) (maskLen: float32) =
        float (1.0f + float32 (scale - 1.0) * (float32 n - maskLen) / float32 n)
