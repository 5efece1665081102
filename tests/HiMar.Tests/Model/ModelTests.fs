/// Tests of src/HiMar.Model (Config, Layers, Blocks, DiffLoss, DiT, HiMar, Weights): presets, key layout,
/// strict loading, float64 and configurations other than the fixture's.
module HiMar.Tests.ModelTests

open System
open System.Collections.Generic
open Expecto
open TorchSharp
open HiMar.Model
open HiMar.Runtime.Checkpoints
open HiMar.Tests.TestUtil

/// A small configuration unlike the fixture's: cond_scale 4, decoder deeper and with other heads than the
/// encoder, buffer 2, 7 classes, 128x128 images (an 8x8 dense grid).
let small =
    { HiMarConfig.hiMarB with
        ImgSize = 128
        EncoderEmbedDim = 32
        EncoderDepth = 1
        EncoderNumHeads = 2
        DecoderEmbedDim = 32
        DecoderDepth = 3
        DecoderNumHeads = 4
        ClassNum = 7
        BufferSize = 2
        DiffLossD = 1
        DiffLossW = 24
        CondScale = 4
        GdmW = 16
        GdmD = 1
        GdmHeads = 2
        NumSamplingSteps = "ddim5"
        DitSamplingSteps = "ddim5"
        DiffusionBatchMul = 2
    }

let private fixtureWeights =
    lazy (SafeTensors.Load(IO.Path.Combine(tinyFixture, "weights.safetensors")))

let private fixtureConfig =
    lazy (using (HiMar.Runtime.Parity.ParityFixture.Open tinyFixture) (fun f -> f.Config))

let tests =
    testList
        "Model"
        [
            test "the presets have exactly the reference parameter counts" {
                let count c = snd (Anatomy.parameterCounts c)
                Expect.equal (count HiMarConfig.hiMarB) 244_730_160L "Hi-MAR-B"
                Expect.equal (count HiMarConfig.hiMarL) 529_490_480L "Hi-MAR-L"
                Expect.equal (count HiMarConfig.hiMarH) 1_090_965_808L "Hi-MAR-H"
            }

            test "per-module counts add up to the total and start with the direct parameters" {
                let parts, total = Anatomy.parameterCounts HiMarConfig.hiMarB
                Expect.equal (Array.sumBy snd parts) total "sum"
                Expect.equal (fst parts.[0]) "fake_latent" "first"

                Expect.equal
                    (parts |> Array.find (fun (n, _) -> n = "class_emb") |> snd)
                    768_000L
                    "class_emb 1000 x 768"
            }

            test "the state_dict keys and shapes equal the reference fixture's" {
                use m = new HiMAR(fixtureConfig.Force())
                let own = Weights.stateDict m
                let file = fixtureWeights.Force()
                Expect.equal (own.Keys |> Set.ofSeq) (file.Keys |> Set.ofSeq) "key set"

                for KeyValue(k, t) in own do
                    Expect.equal (shapeOf t) (shapeOf file.[k]) k
            }

            test "strict loading names every missing, unexpected and mismatched key" {
                use m = new HiMAR(fixtureConfig.Force())
                let w = Dictionary<string, torch.Tensor>(fixtureWeights.Force())
                w.Remove "fake_latent" |> ignore
                w.["not_a_key"] <- torch.zeros (1L)
                w.["cond_tokens"] <- torch.zeros (1L, 3L, 16L)
                let e = catchT<WeightMismatchException> (fun () -> Weights.load m w true |> ignore)
                Expect.equal e.Missing [ "fake_latent" ] "missing"
                Expect.equal e.Unexpected [ "not_a_key" ] "unexpected"
                Expect.equal (e.Mismatched |> List.map (fun (k, _, _) -> k)) [ "cond_tokens" ] "mismatched"
                Expect.stringContains e.Message "cond_tokens (model [1, 64, 16], file [1, 3, 16])" "message"
            }

            test "the encoder and decoder widths must agree, as in the reference" {
                let e =
                    catchT<ArgumentException> (fun () ->
                        new HiMAR(
                            { small with
                                DecoderEmbedDim = 48
                                DecoderNumHeads = 4
                            }
                        )
                        |> ignore)

                Expect.stringContains e.Message "encoder width 32 differs from decoder width 48" "message"
            }

            test "the fixture model converted to float64 reproduces its float32 backbone outputs" {
                use f = HiMar.Runtime.Parity.ParityFixture.Open tinyFixture
                let c = f.Cases |> Seq.find (fun c -> c.Kind = "backbone_phase2")
                use m = new HiMAR(f.Config)
                Weights.load m (fixtureWeights.Force()) true |> ignore
                m.eval ()
                m.``to`` torch.float64 |> ignore
                use _ = torch.no_grad ()
                let input name = f.Tensor(c, name).``to`` torch.float64
                use mask = input "mask"
                use labels = f.Tensor(c, "labels")
                use emb = m.ClassEmbedding labels
                use enc = m.EncoderPhase2(input "tokens", mask, emb, input "cond", input "small_z")
                use dec = m.Decoder(enc, mask, 1L)
                Expect.equal dec.dtype torch.float64 "dtype"
                Expect.isLessThan (maxAbsDiff dec (f.Tensor(c, "decoder_out"))) 1e-4 "decoder_out"
                use x = torch.randn (2L, 16L, 16L, 16L, dtype = torch.float64)
                use t = torch.tensor ([| 10L; 900L |])
                use z = torch.randn (2L, 64L, 16L, 16L, dtype = torch.float64)
                use out = m.CondDiffLoss.Net.call (x, t, z)
                Expect.equal out.dtype torch.float64 "the Transformer head runs in float64"
                use xm = torch.randn (2L, 16L, dtype = torch.float64)
                use zm = torch.randn (2L, 64L, dtype = torch.float64)
                use outm = m.DiffLoss.Net.call (xm, t, zm)
                Expect.equal (shapeOf outm) [ 2L; 32L ] "the MLP head runs in float64"
            }

            test "a configuration unlike the fixture's runs both phases with the expected shapes" {
                torch.manual_seed 7L |> ignore
                use m = new HiMAR(small)
                m.eval ()
                use _ = torch.no_grad ()
                let b, s, n, l = 2L, 16L, 64L, 80L
                Expect.equal (int64 small.PivotTokens, int64 small.DenseTokens, int64 small.SeqLen) (s, n, l) "S, N, L"
                use tokens = torch.randn (b, n, 16L)
                use cond = torch.randn (b, s, 16L)
                use labels = torch.tensor ([| 0L; 6L |])
                use emb = m.ClassEmbedding labels
                // phase 1: 5 pivots known, every dense token masked
                use mask1 = torch.ones (b, l)
                mask1.narrow(1L, 0L, 5L).fill_ (scalar 0.0) |> ignore
                use enc1 = m.EncoderPhase1(tokens, mask1, emb, cond)
                Expect.equal (shapeOf enc1) [ b; 2L + 5L; 32L ] "phase-1 encoder: buffer + known"
                use dec1 = m.Decoder(enc1, mask1, 0L)
                Expect.equal (shapeOf dec1) [ b; l; 32L ] "phase-1 decoder"
                // phase 2: pivots known, 24 dense tokens known
                use mask2 = torch.ones (b, l)
                mask2.narrow(1L, 0L, s + 24L).fill_ (scalar 0.0) |> ignore
                use smallZ = dec1.narrow (1L, 0L, s)
                use enc2 = m.EncoderPhase2(tokens, mask2, emb, cond, smallZ)
                Expect.equal (shapeOf enc2) [ b; 2L + s + 24L; 32L ] "phase-2 encoder"
                use dec2 = m.Decoder(enc2, mask2, 1L)
                use zImg = dec2.narrow(1L, s, n).reshape(b, 8L, 8L, 32L).permute (0L, 3L, 1L, 2L)
                use x = torch.randn (b, 16L, 8L, 8L)
                use t = torch.tensor ([| 3L; 500L |])
                use out = m.CondDiffLoss.Net.call (x, t, zImg)
                Expect.equal (shapeOf out) [ b; 16L; 8L; 8L ] "the Transformer head works on an 8x8 grid"
            }

            test "the training losses are finite, weighted as the reference, and give every used parameter a gradient" {
                torch.manual_seed 11L |> ignore
                use m = new HiMAR(small)
                m.train ()
                use tokens = torch.randn (3L, 64L, 16L)
                use cond = torch.randn (3L, 16L, 16L)
                use labels = torch.tensor ([| 1L; 2L; 3L |])
                let r = m.TrainingLosses(tokens, cond, labels, 50.0)
                use p1 = r.Phase1
                use p2 = r.Phase2
                use total = r.Total
                let v (t: torch.Tensor) = t.item<float32> () |> float
                Expect.isTrue (Double.IsFinite(v total) && v p1 > 0.0 && v p2 > 0.0) "finite, positive"

                Expect.floatClose
                    Accuracy.medium
                    (v total)
                    (v p1 * 16.0 / 80.0 + v p2 * 64.0 / 80.0)
                    "S/L and N/L weights"

                total.backward ()

                let withGrad =
                    m.named_parameters ()
                    |> Seq.filter (fun struct (_, p) -> not (isNull p.grad))
                    |> Seq.length

                Expect.isGreaterThan withGrad 40 "parameters with gradients"

                let g =
                    m.named_parameters ()
                    |> Seq.find (fun struct (n, _) -> n = "encoder_blocks.0.adaLN_scale")

                let struct (_, p) = g
                Expect.isNotNull p.grad "the scale-aware tables learn"
            }

            test "the ablation switches build plain MAR and an MLP phase-2 head" {
                let plain =
                    { small with
                        Pivots = PivotSource.NoPivots
                        Phase2 = Phase2Head.Mlp
                    }

                use m = new HiMAR(plain)
                let keys = (Weights.stateDict m).Keys |> Set.ofSeq
                Expect.isFalse (keys |> Set.exists (fun k -> k.StartsWith "cond_diffloss")) "no Transformer head"
                Expect.isFalse (keys.Contains "cond_tokens") "no pivots"
                use tokens = torch.randn (2L, 64L, 16L)
                use cond = torch.zeros (2L, 0L, 16L)
                use labels = torch.tensor ([| 0L; 1L |])
                let r = m.TrainingLosses(tokens, cond, labels, 0.0)

                Expect.floatClose
                    Accuracy.medium
                    (r.Total.item<float32> () |> float)
                    (r.Phase2.item<float32> () |> float)
                    "only phase 2 counts"
            }
        ]

/// Weight files: save and load round trips through safetensors.
let fileTests =
    testList
        "ModelFiles"
        [
            test
                "weights saved as safetensors load back into a fresh model exactly, and float64 files load into float32 models" {
                let dir = IO.Directory.CreateTempSubdirectory("himar-weights-")

                try
                    torch.manual_seed 1L |> ignore
                    use a = new HiMAR(small)
                    let path = IO.Path.Combine(dir.FullName, "w.safetensors")
                    ModelFiles.Save(a, path)
                    torch.manual_seed 2L |> ignore
                    use b = new HiMAR(small)
                    ModelFiles.Load(b, path) |> ignore
                    let sa, sb = Weights.stateDict a, Weights.stateDict b

                    for KeyValue(k, t) in sa do
                        Expect.equal (maxAbsDiff t sb.[k]) 0.0 k

                    let path64 = IO.Path.Combine(dir.FullName, "w64.safetensors")
                    ModelFiles.Save(a, path64, torch.float64)
                    use c = new HiMAR(small)
                    ModelFiles.Load(c, path64) |> ignore

                    Expect.equal
                        (maxAbsDiff (Weights.stateDict c).["mask_token"] sa.["mask_token"])
                        0.0
                        "float64 -> float32"

                    Expect.equal (IO.Directory.GetFiles dir.FullName |> Array.length) 2 "no temporary files left"
                finally
                    dir.Delete true
            }

            test "loading weights of another configuration names the file and every mismatch" {
                let dir = IO.Directory.CreateTempSubdirectory("himar-weights-")

                try
                    use a = new HiMAR(small)
                    let path = IO.Path.Combine(dir.FullName, "w.safetensors")
                    ModelFiles.Save(a, path)
                    use b = new HiMAR({ small with ClassNum = 9 })

                    let e =
                        catchT<CheckpointFormatException> (fun () -> ModelFiles.Load(b, path) |> ignore)

                    Expect.stringContains e.Message path "file"
                    Expect.stringContains e.Message "class_emb.weight (model [9, 32], file [7, 32])" "mismatch"
                finally
                    dir.Delete true
            }

            test "a truncated safetensors file is refused with a message naming it" {
                let dir = IO.Directory.CreateTempSubdirectory("himar-weights-")

                try
                    use a = new HiMAR(small)
                    let path = IO.Path.Combine(dir.FullName, "w.safetensors")
                    ModelFiles.Save(a, path)
                    let bytes = IO.File.ReadAllBytes path
                    IO.File.WriteAllBytes(path, bytes.[.. bytes.Length / 2])

                    let e =
                        catchT<CheckpointFormatException> (fun () -> ModelFiles.Load(a, path) |> ignore)

                    Expect.stringContains e.Message path "file"
                    Expect.stringContains e.Message "outside the file (truncated?)" "problem"
                finally
                    dir.Delete true
            }
        ]
