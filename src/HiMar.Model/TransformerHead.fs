namespace HiMar.Model

open System
open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn

/// timm `PatchEmbed` on a square grid: a p x p stride-p convolution, then tokens in row-major order
/// (keys `proj.weight`, `proj.bias`). (B, Cin, H, W) -> (B, H/p * W/p, Cout).
type PatchEmbed(inChannels: int64, embedDim: int64, patchSize: int64) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("PatchEmbed")

    let proj =
        this.Child("proj", new Mixed.Conv2d(inChannels, embedDim, patchSize, stride = patchSize))

    override _.forward x =
        use y = proj.call x
        // (B, C, h, w) -> (B, h*w, C)
        y.flatten(2L).transpose (1L, 2L)

/// DiT `DiTBlock` (models/models.py): adaLN-Zero with per-token conditioning, non-affine LayerNorms,
/// tanh GELU in the MLP; keys `attn.*`, `mlp.fc{1,2}.*`, `adaLN_modulation.1.*`.
type DiTBlock(hidden: int64, numHeads: int64, mlpRatio: float) as this =
    inherit Layer<torch.Tensor, torch.Tensor, torch.Tensor>("DiTBlock")
    let norm1 = LayerNorm(hidden, eps = 1e-6, elementwise_affine = false)
    let attn = this.Child("attn", new Attention(hidden, numHeads, 0.0, 0.0))
    let norm2 = LayerNorm(hidden, eps = 1e-6, elementwise_affine = false)

    let mlp =
        this.Child("mlp", new Mlp(hidden, int64 (float hidden * mlpRatio), true, 0.0))

    let adaLN_modulation = this.Child("adaLN_modulation", AdaLN.modulation hidden 6L)

    override _.forward(x, c) =
        let shiftMsa, scaleMsa, gateMsa, shiftMlp, scaleMlp, gateMlp =
            chunk6 (adaLN_modulation.call c)

        x
        |> residual gateMsa (norm1.call >> modulate shiftMsa scaleMsa >> attn.call)
        |> residual gateMlp (norm2.call >> modulate shiftMlp scaleMlp >> mlp.call)

/// The fixed 2-D sin-cos position table of DiT/MAE for a square grid, (grid*grid, dim), float64 math cast to
/// float32: the first half of the features encodes the column, the second the row, each as [sin | cos].
module SinCos =
    let private oneD (dim: int) (positions: float[]) =
        let quarter = dim / 2

        let omega =
            Array.init (quarter / 2) (fun k -> 1.0 / Math.Pow(10000.0, float k / float (quarter / 2)))

        positions
        |> Array.map (fun p ->
            Array.append (omega |> Array.map (fun w -> sin (p * w))) (omega |> Array.map (fun w -> cos (p * w))))

    /// The (grid * grid, dim) table, token index row * grid + col.
    [<CompiledName("Table2D")>]
    let table2D (dim: int) (grid: int) =
        let cols = Array.init (grid * grid) (fun i -> float (i % grid))
        let rows = Array.init (grid * grid) (fun i -> float (i / grid))
        let c = oneD dim cols
        let r = oneD dim rows

        let flat =
            Array.init (grid * grid) (fun i -> Array.append c.[i] r.[i])
            |> Array.concat
            |> Array.map float32

        torch.tensor(flat).reshape (int64 (grid * grid), int64 dim)

/// Hi-MAR's phase-2 Diffusion Transformer head (`DiT` in models/models.py, learn_sigma off): it denoises the
/// whole token grid x (B, C, g, g) at step t (B,), each token conditioned on its backbone state z (B, D, g, g)
/// through c = t_emb + z_emb. `pos_embed` is a frozen parameter (loaded, not recomputed); `c_pos_embed` is
/// stored by the reference but never used. The grid side g comes from the config (the reference fixes 16).
type DiT(inChannels: int64, grid: int64, cChannels: int64, hidden: int64, depth: int, numHeads: int64, mlpRatio: float) as this
    =
    inherit Layer<torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor>("DiT")
    let tokens = grid * grid

    let pos_embed =
        this.Param("pos_embed", (SinCos.table2D (int hidden) (int grid)).unsqueeze 0L, requiresGrad = false)

    let c_pos_embed =
        this.Param("c_pos_embed", torch.zeros (1L, tokens, hidden), requiresGrad = false)

    let x_embedder = this.Child("x_embedder", new PatchEmbed(inChannels, hidden, 1L))
    let t_embedder = this.Child("t_embedder", new TimestepEmbedder(hidden, 256L))
    let c_embedder = this.Child("c_embedder", new PatchEmbed(cChannels, hidden, 1L))

    let blocks =
        this.Child("blocks", ModuleList<DiTBlock>([| for _ in 1..depth -> new DiTBlock(hidden, numHeads, mlpRatio) |]))

    let final_layer = this.Child("final_layer", new FinalLayer(hidden, inChannels))

    /// The unused stored table, kept for strict loading.
    member _.CPosEmbed = c_pos_embed

    override _.forward(x, t, z) =
        let b = x.shape.[0]
        use hx0 = x_embedder.call x
        let hx = hx0 + pos_embed
        use te = t_embedder.call t
        use ze = c_embedder.call z
        // per-token context: (B, 1, G) + (B, T, G)
        use c = te.unsqueeze 1L + ze

        let h =
            Seq.fold (fun (h: torch.Tensor) (blk: DiTBlock) -> blk.call (h, c)) hx blocks

        // The head's output in the input's dtype: under mixed precision the diffusion arithmetic stays fp32.
        use o = final_layer.call (h, c) |> castTo x.dtype
        // (B, T, C) -> (B, g, g, C) -> (B, C, g, g)
        o.reshape(b, grid, grid, inChannels).permute (0L, 3L, 1L, 2L)

    /// Classifier-free guidance over all channels: the first half of x runs with both halves of z
    /// ([cond; uncond]), and uncond + s (cond - uncond) is returned for both halves.
    member this.ForwardWithCfg(x: torch.Tensor, t: torch.Tensor, z: torch.Tensor, cfgScale: float) =
        use combined = firstHalfTwice x
        use out = this.forward (combined, t, z)
        guide cfgScale out

/// Hi-MAR `GlobalDiffLoss` (models/models.py): the phase-2 head `net` with a fixed-variance diffusion.
type GlobalDiffLoss
    (
        targetChannels: int64,
        grid: int64,
        zChannels: int64,
        width: int64,
        depth: int,
        heads: int64,
        ratio: float,
        samplingSteps: string,
        noiseSchedule: string,
        diffusionSteps: int
    ) as this =
    inherit Layer<torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor>("GlobalDiffLoss")

    let net =
        this.Child("net", new DiT(targetChannels, grid, zChannels, width, depth, heads, ratio))

    let trainDiffusion, genDiffusion =
        HeadDiffusions.create noiseSchedule diffusionSteps samplingSteps VarianceKind.FixedLarge

    /// The network.
    member _.Net = net
    /// The 1000-step training diffusion.
    member _.TrainDiffusion = trainDiffusion
    /// The respaced sampling diffusion.
    member _.GenDiffusion = genDiffusion

    /// Per-sample loss for given noise and steps: mean over (C, H, W) of ((noise - eps) * mask)^2, the mask
    /// (B, H, W) with 1 where the token counts (every token when null). The denominator is C*H*W.
    member _.Losses(target: torch.Tensor, z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor) =
        use xT = trainDiffusion.QSample(target, t, noise)
        use out = net.call (xT, t, z)
        use diff = noise - out

        use weighted =
            if isNull (box mask) then
                diff.alias ()
            else
                use m = mask.``to``(diff.dtype).unsqueeze 1L
                diff * m

        use sq = weighted.square ()
        sq.mean ([| 1L; 2L; 3L |])

    /// The training loss: t uniform per sample, standard normal noise, the batch mean of `Losses`.
    override this.forward(target, z, mask) =
        this.TrainingLoss(target, z, mask, RowWindow.Whole target.shape.[0])

    /// The training loss of this process's samples of a global batch: t and noise are drawn for every sample
    /// of the global batch and this share's samples kept.
    member this.TrainingLoss(target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor, rows: RowWindow) =
        let t, noise = TrainingDraws.timestepsAndNoise rows diffusionSteps target
        use t = t
        use noise = noise

        use l = this.Losses(target, z, t, noise, mask)
        l.mean ()
