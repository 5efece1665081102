namespace HiMar.Model

open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn

/// The random draws of one diffusion training loss (both heads): a timestep uniform in [0, steps) and standard
/// normal noise shaped like the target, per sample, drawn for the global batch and narrowed to `rows`.
module TrainingDraws =
    [<CompiledName("TimestepsAndNoise")>]
    let timestepsAndNoise (rows: RowWindow) (steps: int) (target: torch.Tensor) =
        let n = target.shape.[0]
        let dev = target.device

        let t =
            rows.Draw(n, [||], fun shape -> torch.randint (0L, int64 steps, shape, device = dev))

        let noise =
            rows.Draw(n, target.shape.[1..], fun shape -> torch.randn (shape, dtype = target.dtype, device = dev))

        t, noise

/// MAR DiffLoss `ResBlock` (models/diffloss.py): in_ln.*, mlp.{0,2}.*, adaLN_modulation.1.*
type ResBlock(channels: int64) as this =
    inherit Layer<torch.Tensor, torch.Tensor, torch.Tensor>("ResBlock")
    let in_ln = this.Child("in_ln", LayerNorm(channels, eps = 1e-6))

    let mlp =
        this.Child(
            "mlp",
            Sequential(
                new Mixed.Linear(channels, channels) :> Module<torch.Tensor, torch.Tensor>,
                SiLU(),
                new Mixed.Linear(channels, channels)
            )
        )

    let adaLN_modulation = this.Child("adaLN_modulation", AdaLN.modulation channels 3L)

    override _.forward(x, y) =
        let shift, scale, gate = chunk3 (adaLN_modulation.call y)
        x |> residual gate (in_ln.call >> modulate shift scale >> mlp.call)

/// MAR DiffLoss `FinalLayer`: a LayerNorm without affine (eps 1e-6), adaLN (shift, scale), then `linear`.
type FinalLayer(channels: int64, outChannels: int64) as this =
    inherit Layer<torch.Tensor, torch.Tensor, torch.Tensor>("FinalLayer")
    let norm_final = LayerNorm(channels, eps = 1e-6, elementwise_affine = false)
    let linear = this.Child("linear", new Mixed.Linear(channels, outChannels))
    let adaLN_modulation = this.Child("adaLN_modulation", AdaLN.modulation channels 2L)

    override _.forward(x, c) =
        let shift, scale = chunk2 (adaLN_modulation.call c)
        x |> norm_final.call |> modulate shift scale |> linear.call

/// MAR `SimpleMLPAdaLN` (models/diffloss.py): the phase-1 per-token diffusion head. Predicts the noise and
/// the learned-variance interpolation value: output (n, 2C) for input x (n, C), step t (n,), condition c (n, D).
type SimpleMLPAdaLN(inChannels: int64, modelChannels: int64, outChannels: int64, zChannels: int64, numResBlocks: int) as this
    =
    inherit Layer<torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor>("SimpleMLPAdaLN")
    let time_embed = this.Child("time_embed", new TimestepEmbedder(modelChannels, 256L))

    let cond_embed =
        this.Child("cond_embed", new Mixed.Linear(zChannels, modelChannels))

    let input_proj =
        this.Child("input_proj", new Mixed.Linear(inChannels, modelChannels))

    let res_blocks =
        this.Child("res_blocks", ModuleList<ResBlock>([| for _ in 1..numResBlocks -> new ResBlock(modelChannels) |]))

    let final_layer =
        this.Child("final_layer", new FinalLayer(modelChannels, outChannels))

    /// The noise channels C (the rest of the output is the variance value).
    member _.InChannels = inChannels

    override _.forward(x, t, c) =
        use y = time_embed.call t + cond_embed.call c

        let h =
            // The residual stream stays in x's dtype (fp32): the LayerNorms never see a bf16 input.
            Seq.fold
                (fun (h: torch.Tensor) (blk: ResBlock) -> blk.call (h, y))
                (input_proj.call x |> castTo x.dtype)
                res_blocks

        // The head's output in the input's dtype: under mixed precision the diffusion arithmetic stays fp32.
        final_layer.call (h, y) |> castTo x.dtype

    /// Classifier-free guidance: rows [cond; uncond] of c share the first half of x; only the noise channels
    /// are guided (uncond + s (cond - uncond)), and each half keeps its own variance channels.
    member this.ForwardWithCfg(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, cfgScale: float) =
        use combined = firstHalfTwice x
        use out = this.forward (combined, t, c)
        use eps = out.narrow (1L, 0L, inChannels)
        use rest = out.narrow (1L, inChannels, out.shape.[1] - inChannels)
        use both = guide cfgScale eps
        torch.cat ([| both; rest |], 1L)

/// MAR `DiffLoss` (models/diffloss.py): the phase-1 head `net` with its training and sampling diffusions.
type DiffLoss
    (
        targetChannels: int64,
        zChannels: int64,
        width: int64,
        depth: int,
        samplingSteps: string,
        noiseSchedule: string,
        diffusionSteps: int
    ) as this =
    inherit Layer<torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor>("DiffLoss")

    let net =
        this.Child("net", new SimpleMLPAdaLN(targetChannels, width, targetChannels * 2L, zChannels, depth))

    let trainDiffusion, genDiffusion =
        HeadDiffusions.create noiseSchedule diffusionSteps samplingSteps VarianceKind.LearnedRange

    /// The network.
    member _.Net = net
    /// The 1000-step training diffusion.
    member _.TrainDiffusion = trainDiffusion
    /// The respaced sampling diffusion.
    member _.GenDiffusion = genDiffusion

    /// The per-row training terms for given noise and steps (original timesteps 0..T-1).
    member _.Losses(target: torch.Tensor, z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) =
        use xT = trainDiffusion.QSample(target, t, noise)
        use out = net.call (xT, t, z)
        trainDiffusion.TrainingLosses(out, target, xT, t, noise)

    /// The training loss: t uniform per row, noise standard normal, mean of (mse + vb) over the rows whose
    /// mask is 1 (all rows without a mask). The reference reads an undefined `t` here; MAR samples it.
    override this.forward(target, z, mask) =
        this.TrainingLoss(target, z, mask, RowWindow.Whole target.shape.[0])

    /// The training loss of this process's rows of a global batch: t and noise are drawn for every row of the
    /// global batch and this share's rows kept (`rows` counts rows of the head, one per token).
    member this.TrainingLoss(target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor, rows: RowWindow) =
        let t, noise = TrainingDraws.timestepsAndNoise rows diffusionSteps target
        use t = t
        use noise = noise

        let l = this.Losses(target, z, t, noise)
        use _ = l.Mse
        use _ = l.Vb
        use loss = l.Loss

        if isNull (box mask) then
            loss.mean ()
        else
            use m = mask.``to`` loss.dtype
            (loss * m).sum () / m.sum ()
