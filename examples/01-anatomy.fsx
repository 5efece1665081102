// The anatomy of Hi-MAR: build a small model, look at its modules, shapes and parameter counts, run one
// forward pass of each phase, then the whole two-phase sampling loop, step by step. Build first (`dotnet build -c Release`), then:
//   dotnet fsi examples/01-anatomy.fsx
#r "../src/HiMar.Cli/bin/Release/net10.0/TorchSharp.dll"
#r "../src/HiMar.Cli/bin/Release/net10.0/HiMar.Model.dll"
#r "../src/HiMar.Cli/bin/Release/net10.0/HiMar.Runtime.dll"

open TorchSharp
open HiMar.Model

HiMar.Runtime.Native.TorchNative.EnsureLoaded()
torch.manual_seed 0L |> ignore

// A Hi-MAR small enough for a laptop: 128x128 images -> an 8x8 grid of dense tokens (N = 64) and a 4x4 grid of
// pivots (S = 16, the latent of a 64x64 image), 2 + 2 blocks of width 64, both diffusion heads tiny.
let config =
    { HiMarConfig.hiMarB with
        Backbone.ImageSize = 128
        Backbone.EncoderWidth = 64
        Backbone.EncoderDepth = 2
        Backbone.EncoderHeads = 4
        Backbone.DecoderWidth = 64
        Backbone.DecoderDepth = 2
        Backbone.DecoderHeads = 4
        Backbone.ClassCount = 10
        Backbone.BufferSize = 4
        Pivots.GridSide = 4
        MlpHead.Depth = 2
        MlpHead.Width = 96
        TransformerHead.Width = 64
        TransformerHead.Depth = 2
        TransformerHead.Heads = 4
    }

let model = new HiMAR(config)
model.eval ()

let s, n, l =
    int64 config.PivotTokens, int64 config.DenseTokens, int64 config.SeqLen

printfn "Sequence: %d buffer tokens | %d pivots | %d dense tokens (L = %d)" config.Backbone.BufferSize s n l

// 1. Modules and parameter counts. The presets are exact: Hi-MAR-B has 244,730,160 parameters.
printfn "\n%-30s %12s" "module" "parameters"

for name, count in Weights.parameterCounts model do
    printfn "%-30s %12d" name count

printfn "%-30s %12d" "total" (Weights.parameterCount model)

for name, preset in HiMarConfig.presets do
    printfn "%s: %d parameters" name (snd (Anatomy.parameterCounts preset))

// 2. A few state_dict keys: the same names as the reference checkpoints, so they load as they are.
printfn "\nSome state_dict keys and shapes:"

for KeyValue(k, v) in Weights.stateDict model do
    if
        k.StartsWith "encoder_blocks.0"
        || k.StartsWith "cond_proj"
        || k = "cond_tokens"
        || k = "mask_token"
    then
        printfn "  %-48s %A" k v.shape

// 3. Phase 1 (phase index 0): the pivots. Dense tokens are all masked; 6 pivots are known.
let b = 2L
let tokens = torch.randn (b, n, int64 config.TokenEmbedDim) // (B, N, C) dense latents
let pivots = torch.randn (b, s, int64 config.Pivots.Channels) // (B, S, C) pivot latents
let labels = torch.tensor [| 3L; 7L |]
let classEmb = model.ClassEmbedding labels // (B, E)
let mask1 = torch.ones (b, l) // 1 = unknown
mask1.narrow(1L, 0L, 6L).fill_ (scalar 0.0) |> ignore
let enc1 = model.EncoderPhase1(tokens, mask1, classEmb, pivots)
let dec1 = model.Decoder(enc1, mask1, 0L)
printfn "\nPhase 1: encoder sees %A (buffer + known pivots), decoder returns %A" enc1.shape dec1.shape

// The MLP head draws each pivot from its decoder state: noise and variance for a token at step t.
let z = dec1.narrow(1L, 0L, s).reshape (b * s, -1L)
let x = torch.randn (b * s, int64 config.TokenEmbedDim)
let t = torch.full ([| b * s |], scalarL 500L, dtype = torch.int64)
printfn "MLP head output (noise | variance value): %A" (model.DiffLoss.Net.call (x, t, z)).shape

// 4. Phase 2 (phase index 1): the dense tokens, conditioned on the pivots' conditional tokens (the phase-1 decoder
// states), not on the sampled pivot latents. Half of the dense tokens are known.
let mask2 = torch.ones (b, l)
mask2.narrow(1L, 0L, s + n / 2L).fill_ (scalar 0.0) |> ignore
let pivotStates = dec1.narrow (1L, 0L, s)
let enc2 = model.EncoderPhase2(tokens, mask2, classEmb, pivots, pivotStates)
let dec2 = model.Decoder(enc2, mask2, 1L)
printfn "\nPhase 2: encoder sees %A, decoder returns %A" enc2.shape dec2.shape

// The Transformer head denoises the whole grid at once; each token is conditioned on its own state.
let g = int64 config.SeqH
let zImg = dec2.narrow(1L, s, n).reshape(b, g, g, -1L).permute (0L, 3L, 1L, 2L) // (B, D, g, g)
let xImg = torch.randn (b, int64 config.TokenEmbedDim, g, g)
let tImg = torch.tensor [| 900L; 100L |]
printfn "Transformer head output: %A" (model.CondDiffLoss.Net.call (xImg, tImg, zImg)).shape

// 5. One training step's losses (phase 1 x 2.0, phase 2 x 0.75, combined with S/L and N/L).
model.train ()
let losses = model.TrainingLosses(tokens, pivots, labels, 0.0)

printfn
    "\nTraining losses: phase 1 %.3f, phase 2 %.3f, total %.3f"
    (losses.Phase1.item<float32> ())
    (losses.Phase2.item<float32> ())
    (losses.Total.item<float32> ())

// 6. The sampling loop: both phases end to end (src/HiMar.Runtime/Sampling/HiMarSampler.cs). Phase 1 decides a
// few pivots per step in a random order (a cosine schedule: few early, more later), each drawn by the MLP head;
// phase 2 regenerates the dense grid with the Transformer head and keeps more tokens at every step. OnStep sees
// each step as it happens. The weights are random here, so the tokens are noise; the bookkeeping is the real
// one (examples/02-sample.fsx samples the trained model).
model.eval ()

let options =
    HiMar.Runtime.Sampling.SamplerOptions(
        Phase1Steps = System.Nullable 6,
        Phase2Steps = 3,
        Cfg = 2.0,
        ReCfg = 2.0,
        MlpHeadSteps = "ddim5",
        DitHeadSteps = "ddim5",
        OnStep =
            fun step ->
                printfn
                    "phase %d, step %d of %d: %2d tokens decided now, %2d of %d known"
                    step.Phase
                    (step.Step + 1)
                    step.Steps
                    (step.Decided.[0].sum().item<int64> ())
                    (step.Known.[0].sum().item<int64> ())
                    (step.Known.[0].numel ())
    )

printfn "\nSampling one image of class 3 (guided in both phases):"
let noise = new HiMar.Runtime.Sampling.SeededNoise(0L, 0L, 1)

let result =
    HiMar.Runtime.Sampling.HiMarSampler.Sample(model, torch.tensor [| 3L |], noise, options)

printfn "pivots %A, dense tokens %A" result.Pivots.shape result.Dense.shape
