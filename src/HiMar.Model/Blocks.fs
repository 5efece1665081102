namespace HiMar.Model

open TorchSharp
open type TorchSharp.torch.nn

/// Hi-MAR `Block` (models/himar.py): scale-aware adaLN. Each phase (task) has its own `adaLN_scale` and
/// `adaLN_shift` (num_tasks, 1, 1, 4 dim) applied to the shared phase modulation `c` (1, 1, 4 dim), giving
/// (scale_msa, gate_msa, scale_mlp, gate_mlp); there is no shift term. Exact-erf GELU in the MLP.
type Block(dim: int64, numHeads: int64, mlpRatio: float, numTasks: int64, eps: float, attnDrop: float, projDrop: float) as this
    =
    inherit Layer<torch.Tensor, torch.Tensor, int64, torch.Tensor>("Block")

    let adaLN_scale =
        this.Param("adaLN_scale", torch.zeros (numTasks, 1L, 1L, 4L * dim))

    let adaLN_shift = this.Param("adaLN_shift", AdaLN.identityShift numTasks dim)
    let norm1 = this.Child("norm1", LayerNorm(dim, eps = eps))
    let attn = this.Child("attn", new Attention(dim, numHeads, attnDrop, projDrop))
    let norm2 = this.Child("norm2", LayerNorm(dim, eps = eps))

    let mlp =
        this.Child("mlp", new Mlp(dim, int64 (float dim * mlpRatio), false, projDrop))

    override _.forward(x, c, task) =
        use s = adaLN_scale.[task]
        use h = adaLN_shift.[task]
        let scaleMsa, gateMsa, scaleMlp, gateMlp = chunk4 (c * s + h)

        x
        |> residual gateMsa (norm1.call >> modulateScale scaleMsa >> attn.call)
        |> residual gateMlp (norm2.call >> modulateScale scaleMlp >> mlp.call)
