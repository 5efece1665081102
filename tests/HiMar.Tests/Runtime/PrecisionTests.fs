/// Tests of mixed precision: the bf16 layers of src/HiMar.Model/Layers.fs, the sampler's and the trainer's
/// precision (src/HiMar.Runtime/Sampling, Training) and the device check of src/HiMar.Runtime/Native/Precisions.cs.
module HiMar.Tests.PrecisionTests

open System
open System.IO
open System.Text.Json.Nodes
open Expecto
open TorchSharp
open HiMar.Model
open HiMar.Runtime
open HiMar.Runtime.Data
open HiMar.Runtime.Native
open HiMar.Runtime.Sampling
open HiMar.Runtime.Training
open HiMar.Tests.TestUtil

/// max |a - b| / max |a|, in float64.
let private relErr (a: torch.Tensor) (b: torch.Tensor) =
    use a64 = a.``to`` torch.float64
    use scale = a64.abs().max ()
    maxAbsDiff a b / scale.item<float> ()

/// A noise source that hands out another source's draws and keeps a copy of each.
type private Recording(inner: INoiseSource) =
    member val Draws = Collections.Generic.List<torch.Tensor>()

    interface INoiseSource with
        member _.Orders(pivots, dense, device) = inner.Orders(pivots, dense, device)

        member this.Draw(role, halves, rows, shape, device) =
            let t = inner.Draw(role, halves, rows, shape, device)
            this.Draws.Add(t.clone().DetachFromDisposeScope())
            t

let tests =
    testList
        "Precision"
        [
            test "a bf16 Linear takes its product in bf16 from fp32 weights, within bf16 rounding of fp32" {
                torch.manual_seed 3L |> ignore
                use lin = new Mixed.Linear(64L, 32L)
                use x = torch.randn (16L, 64L)
                use exact = lin.call x
                let layer = lin :> IMixedPrecision
                layer.ComputeType <- Some torch.ScalarType.BFloat16
                use y = lin.call x
                layer.ComputeType <- None
                Expect.equal y.dtype torch.ScalarType.BFloat16 "product dtype"
                Expect.equal lin.Weight.dtype torch.ScalarType.Float32 "master weight dtype"
                let e = relErr exact y
                // inputs and weights rounded to 8 bits (2^-9 each), summed over 64 terms: well under 2^-6
                Expect.isLessThan e (1.0 / 64.0) "relative error"
                Expect.isGreaterThan e 0.0 "bf16 actually used"
            }

            test "gradients through a bf16 Linear reach the fp32 weights in fp32, close to the fp32 gradients" {
                torch.manual_seed 4L |> ignore
                use lin = new Mixed.Linear(32L, 8L)
                use x = torch.randn (64L, 32L)

                let grad (p: Precision) =
                    use scope = MixedPrecision.forTraining lin p
                    lin.zero_grad ()
                    use y = lin.call x
                    use loss = (y.``to`` torch.float32).pow(scalar 2.0).mean ()
                    loss.backward ()
                    (nonNull lin.Weight.grad).clone ()

                use g32 = grad Precision.Fp32
                use g16 = grad Precision.Bf16
                Expect.equal g16.dtype torch.ScalarType.Float32 "gradient dtype"
                Expect.isLessThan (relErr g32 g16) (1.0 / 32.0) "relative error of the gradient"
            }

            test "an inference scope keeps bf16 copies and puts the layers back exactly when disposed" {
                torch.manual_seed 5L |> ignore
                use net = new Mlp(16L, 64L, false, 0.0)
                use x = torch.randn (4L, 16L)
                use before = net.call x

                do
                    use scope = MixedPrecision.forInference net Precision.Bf16
                    Expect.equal scope.Count 2 "fc1 and fc2"
                    use y = net.call x
                    Expect.equal y.dtype torch.ScalarType.BFloat16 "bf16 inside the scope"

                use after = net.call x
                Expect.equal after.dtype torch.ScalarType.Float32 "fp32 after the scope"
                Expect.equal (maxAbsDiff before after) 0.0 "identical to before"
            }

            test "GroupNorm normalises a bf16 input in fp32 (libtorch's own bf16 kernel gave NaN for 8 groups)" {
                torch.manual_seed 6L |> ignore
                use gn = new Mixed.GroupNorm(8L, 32L, 1e-6)
                use x = torch.randn(2L, 32L, 8L, 8L).mul(scalar 5.0).add (scalar 3.0)
                use exact = gn.call x
                use xb = x.``to`` torch.bfloat16
                use y = gn.call xb
                Expect.equal y.dtype torch.ScalarType.Float32 "normalised in the weights' dtype"
                // only the input's rounding (2^-9 of |x| <= ~25, over a std of 5) remains
                Expect.isLessThan (relErr exact y) 0.02 "relative error"
            }

            test "the sampler draws the same seeded noise in both precisions and returns fp32 tokens" {
                torch.manual_seed 7L |> ignore
                use model = new HiMAR(TrainingTests.tinyConfig)
                model.eval ()

                let run (p: Precision) =
                    use labels = torch.tensor [| 1L; 4L |]
                    use seeded = new SeededNoise(11L, 0L, 2)
                    let noise = Recording(seeded)

                    use r =
                        HiMarSampler.Sample(
                            model,
                            labels,
                            noise,
                            SamplerOptions(Cfg = 2.0, ReCfg = 2.0, ClipDenoised = true, Precision = p)
                        )

                    Expect.equal r.BigTokens.dtype torch.ScalarType.Float32 "tokens between and after steps are fp32"
                    noise.Draws |> List.ofSeq, r.BigTokens.clone().DetachFromDisposeScope()

                let d32, t32 = run Precision.Fp32
                let d16, t16 = run Precision.Bf16
                Expect.equal d16.Length d32.Length "same number of draws"
                Expect.isGreaterThan d32.Length 4 "both phases drew noise"

                for a, b in List.zip d32 d16 do
                    Expect.equal b.dtype torch.ScalarType.Float32 "noise dtype"
                    Expect.equal (maxAbsDiff a b) 0.0 "identical noise"

                Expect.isGreaterThan (maxAbsDiff t32 t16) 0.0 "the bf16 run computed in bf16"
                // clipped tokens in [-1, 1]: the two runs follow the same noise and stay close
                Expect.isLessThan (maxAbsDiff t32 t16) 0.5 "bf16 tokens near the fp32 ones"
            }

            test "bf16 training keeps fp32 master weights and checkpoints, records its precision, and resumes in fp32" {
                withTempDir (fun dir ->
                    let bf16 = (TrainingTests.options dir 3).WithPrecision Precision.Bf16

                    do
                        use t =
                            new Trainer(
                                TrainingTests.tinyConfig,
                                TrainingTests.SyntheticData(),
                                PixelPatchTokenizer.Fashion,
                                bf16
                            )

                        t.Run()

                        for KeyValue(k, p) in Weights.stateDict t.Model do
                            Expect.equal p.dtype torch.ScalarType.Float32 k

                    let ckpt = Path.Combine(dir, "checkpoints", "step-00000003")

                    let state =
                        nonNull (JsonNode.Parse(File.ReadAllText(Path.Combine(ckpt, "state.json"))))

                    Expect.equal
                        ((nonNull state.["precision"]).GetValue<string>())
                        "bf16"
                        "state.json records the precision"

                    for file in [ Checkpoint.ModelFile; Checkpoint.EmaFile ] do
                        let tensors = HiMar.Runtime.Checkpoints.SafeTensors.Load(Path.Combine(ckpt, file))

                        for KeyValue(k, t) in tensors do
                            Expect.equal t.dtype torch.ScalarType.Float32 $"{file}: {k}"
                            t.Dispose()

                    // Resume the bf16 run in fp32: it continues from step 3 with finite losses.
                    use r =
                        new Trainer(
                            TrainingTests.tinyConfig,
                            TrainingTests.SyntheticData(),
                            PixelPatchTokenizer.Fashion,
                            TrainingTests.options dir 5,
                            resume = true
                        )

                    Expect.equal r.Step 3 "resumed at step 3"
                    r.Run()
                    let last = File.ReadAllLines(Path.Combine(dir, "metrics.jsonl")) |> Array.last
                    let loss = (nonNull (nonNull (JsonNode.Parse last)).["loss"]).GetValue<float>()
                    Expect.isTrue (Double.IsFinite loss && loss > 0.0) $"finite loss after the resume: {loss}")
            }

            test "a bf16 run resumed in bf16 equals the uninterrupted bf16 run exactly" {
                withTempDir (fun dir ->
                    let opts d n =
                        (TrainingTests.options d n).WithPrecision Precision.Bf16

                    let straight, split = Path.Combine(dir, "a"), Path.Combine(dir, "b")
                    let cfg, data = TrainingTests.tinyConfig, TrainingTests.SyntheticData

                    use a = new Trainer(cfg, data (), PixelPatchTokenizer.Fashion, opts straight 4)
                    a.Run()
                    use b = new Trainer(cfg, data (), PixelPatchTokenizer.Fashion, opts split 3)
                    b.Run()

                    use c =
                        new Trainer(cfg, data (), PixelPatchTokenizer.Fashion, opts split 4, resume = true)

                    c.Run()
                    let wa, wc = Weights.stateDict a.Model, Weights.stateDict c.Model

                    for KeyValue(k, t) in wa do
                        Expect.equal (maxAbsDiff t wc.[k]) 0.0 k)
            }

            test "every case of the project's generic fixture stays within the bf16 allowance" {
                use fixture = HiMar.Runtime.Parity.ParityFixture.Open genericFixture
                fixture.Precision <- Precision.Bf16
                let results = HiMar.Runtime.Parity.ParityRunner.RunAll fixture |> List.ofSeq
                Expect.equal results.Length 12 "cases"

                for r in results do
                    Expect.equal
                        r.Status
                        HiMar.Runtime.Parity.ParityStatus.Pass
                        $"{r.Name}: {r.WorstError} > {r.Allowed}"

                let model = results |> List.filter (fun r -> r.Kind.StartsWith "backbone")
                // the backbone's products really ran in bf16: errors far above the fp32 ones (~1e-6)
                Expect.isTrue (model |> List.forall (fun r -> r.WorstError > 1e-4)) "bf16 errors are visible"
            }

            test "the CPU's bf16 flags are read from /proc/cpuinfo text" {
                let text =
                    "processor : 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n\nprocessor : 1\nflags : fpu avx2 avx512_bf16\n"

                Expect.equal
                    (List.ofSeq (Precisions.CpuBf16Flags text))
                    [ "amx_bf16"; "avx512_bf16" ]
                    "both flags, once"

                Expect.isEmpty (Precisions.CpuBf16Flags "flags : fpu sse2 avx2 fma\n") "an AVX2-only CPU"
            }

            test "auto is bf16 exactly where the device has bf16 units; a wrong word names the flag" {
                let d = Precisions.Decide(PrecisionChoice.Auto, torch.CPU)
                let units = Precisions.CpuBf16Flags().Count > 0
                Expect.equal d.Bf16Units units "units as /proc/cpuinfo says"
                Expect.equal d.Precision (if units then Precision.Bf16 else Precision.Fp32) "auto's choice"
                Expect.equal (Precisions.Decide(PrecisionChoice.Fp32, torch.CPU).Precision) Precision.Fp32 "fp32"
                let e = catchT<BadInputException> (fun () -> Precisions.Parse "half" |> ignore)
                Expect.equal e.Message "--precision: 'half' is not a precision; use fp32, bf16 or auto." "message"
                Expect.equal e.ExitCode 2 "bad input"
            }

            test "loss curves of two runs are read from metrics.jsonl and overlaid; a bad line names file and line" {
                let dir = Path.Combine(Path.GetTempPath(), $"himar-curves-{Guid.NewGuid():N}")
                Directory.CreateDirectory dir |> ignore

                try
                    let run name (f: int -> float) =
                        let d = Path.Combine(dir, name)
                        Directory.CreateDirectory d |> ignore

                        File.WriteAllLines(
                            Path.Combine(d, "metrics.jsonl"),
                            [ for s in 10..10..100 -> $"{{\"step\":{s},\"loss\":{f s},\"lr\":0.001}}" ]
                        )

                        d

                    let a = LossCurve.Read(run "fp32" (fun s -> 1.0 / float s))
                    let b = LossCurve.Read(run "bf16" (fun s -> 1.1 / float s))
                    Expect.equal a.Count 10 "ten points"
                    let struct (s0, l0) = b.[0]
                    Expect.equal s0 10 "first step of the second run"
                    Expect.floatClose Accuracy.high l0 0.11 "first loss of the second run"
                    let png = Path.Combine(dir, "overlay.png")
                    LossCurve.SaveOverlay(Collections.Generic.List [ struct ("fp32", a); struct ("bf16", b) ], png)
                    use img = SixLabors.ImageSharp.Image.Load png
                    Expect.isGreaterThan img.Width 300 "a chart was drawn"
                    let bad = Path.Combine(dir, "bad.jsonl")
                    File.WriteAllLines(bad, [ "{\"step\":1,\"loss\":0.5}"; "{\"step\":2" ])
                    let e = catchT<BadInputException> (fun () -> LossCurve.Read bad |> ignore)
                    Expect.stringStarts e.Message $"{bad}:2: not a metrics line" "file and line"
                finally
                    Directory.Delete(dir, true)
            }
        ]
