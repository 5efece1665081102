namespace HiMar.Model

open System
open TorchSharp

/// The two weighted training losses of one step and their combination.
/// `Phase1` = 2.0 x MLP-head loss, `Phase2` = 0.75 x phase-2 head loss (reference `HiMAR.forward`), and
/// `Total` = (S / L) Phase1 + (N / L) Phase2 (reference engine: 64/320 and 256/320).
type HiMarLosses =
    {
        Phase1: torch.Tensor
        Phase2: torch.Tensor
        Total: torch.Tensor
    }

/// The training-loss arithmetic that needs no layer of the model: the two phases' mask ratios, the pivot-condition
/// dropout and the weighting of the two losses (reference `HiMAR.forward` and its engine).
module PhaseLosses =
    /// Phase 1's mask ratio of the pivots: Beta(4, 1), or a truncated normal on [mask_ratio_min, 1] (the reference).
    [<CompiledName("PivotMaskRate")>]
    let pivotMaskRate (config: HiMarConfig) =
        if config.Training.MaskRule = MaskRatioRule.Beta41 then
            Masking.betaRate 4.0
        else
            Masking.truncatedNormalRate config.Training.MaskRatioMin

    /// Phase 2's mask ratio of the dense tokens: Beta(4, 1), the cosine rule, or a truncated normal from 0.38.
    [<CompiledName("DenseMaskRate")>]
    let denseMaskRate (config: HiMarConfig) =
        if config.Training.MaskRule = MaskRatioRule.Beta41 then
            Masking.betaRate 4.0
        elif config.Training.CosineDenseMasking then
            Masking.cosineRate ()
        else
            Masking.truncatedNormalRate 0.38

    /// Pivot-condition dropout: per sample, with a probability that falls from 1 to 1 - step_stage2_rate over
    /// step_warmup epochs, all pivots take the learned `placeholder` (B, S, E) instead of the condition `seen`
    /// (B, S, E). One uniform draw per row of the global batch, narrowed to `rows`.
    [<CompiledName("PivotDropout")>]
    let pivotDropout
        (config: HiMarConfig)
        (rows: RowWindow)
        (epoch: float)
        (placeholder: torch.Tensor)
        (seen: torch.Tensor)
        =
        let b = seen.shape.[0]
        let dt = seen.dtype

        let warm =
            min 1.0 (epoch / float (max 1 config.Training.PivotConditionWarmupEpochs))

        use u =
            rows.Draw(b, [| 1L; 1L |], fun shape -> torch.rand (shape, dtype = dt, device = seen.device))

        use usePlaceholder =
            u.le(scalar (1.0 - config.Training.PivotConditionRate * warm)).``to`` dt

        usePlaceholder * placeholder + (1.0 - usePlaceholder) * seen

    /// The two losses weighted as the reference: inside the model 2.0 x phase 1 and 0.75 x phase 2, then in the
    /// engine by their share of the sequence, S / L and N / L (64/320 and 256/320).
    [<CompiledName("Weigh")>]
    let weigh (config: HiMarConfig) (phase1: torch.Tensor) (phase2: torch.Tensor) =
        let p1 = phase1 * config.Training.Phase1LossWeight
        let p2 = phase2 * config.Training.Phase2LossWeight
        let l = float config.SeqLen

        {
            Phase1 = p1
            Phase2 = p2
            Total = p1 * (float config.PivotTokens / l) + p2 * (float config.DenseTokens / l)
        }
