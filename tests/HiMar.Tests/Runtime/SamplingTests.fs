/// Tests of src/HiMar.Runtime/Sampling: seeded noise, leaks, the FLOP count and the sample job's files.
module HiMar.Tests.SamplingTests

open System
open System.IO
open Expecto
open TorchSharp
open HiMar.Model
open HiMar.Runtime.Checkpoints
open HiMar.Runtime.Parity
open HiMar.Runtime.Sampling
open HiMar.Tests.TestUtil

let private fixture = lazy (ParityFixture.Open tinyFixture)

/// Few steps, both phases guided: enough to exercise every path quickly.
let private quickWith (onStep: Action<SamplerStep> option) =
    SamplerOptions(
        Phase1Steps = Nullable 4,
        Phase2Steps = 2,
        Cfg = 2.0,
        ReCfg = 2.5,
        MlpHeadSteps = "ddim3",
        DitHeadSteps = "ddim3",
        OnStep = Option.toObj onStep
    )

let private quick = quickWith None

let private sample (labels: int64[]) (noise: INoiseSource) =
    use l = torch.tensor labels
    HiMarSampler.Sample(fixture.Force().Model, l, noise, quick)


let tests =
    testList
        "Sampling"
        [
            test "progress counts the generation steps of both phases alike, split by their diffusion steps" {
                // 4 phase-1 steps and 8 phase-2 steps: 12 generation steps in the run.
                let at phase step steps diffusion =
                    SamplerProgress(phase, step, steps, diffusion, 10).FractionOfRun(4, 8)

                Expect.floatClose Accuracy.veryHigh (at 1 0 4 1) (0.1 / 12.0) "first diffusion step"
                Expect.floatClose Accuracy.veryHigh (at 1 1 4 10) (2.0 / 12.0) "end of phase 1's second step"
                Expect.floatClose Accuracy.veryHigh (at 2 3 8 5) (7.5 / 12.0) "halfway through phase 2's fourth step"
                Expect.equal (at 2 7 8 10) 1.0 "the last diffusion step ends the run"

                Expect.equal
                    (SamplerProgress(2, 1, 2, 5, 10).FractionOfRun(0, 2))
                    0.75
                    "without pivots only phase 2 counts"
            }

            test "every generation step of both phases runs with the collector held off (GcPause)" {
                // The sampler's steps hand libtorch Scalars that TorchSharp makes and does not hold; a collection
                // mid-call could free one under libtorch. OnStep is called inside each step.
                let seen = ResizeArray<int * bool>()

                let options =
                    quickWith (
                        Some(Action<SamplerStep>(fun st -> seen.Add(st.Phase, HiMar.Runtime.Native.GcPause.Holding)))
                    )

                use l = torch.tensor [| 1L; 2L |]
                use noise = new SeededNoise(3L, 0L, 2)
                use _r = HiMarSampler.Sample(fixture.Force().Model, l, noise, options)
                Expect.equal (List.ofSeq seen) [ 1, true; 1, true; 1, true; 1, true; 2, true; 2, true ] "steps"
                Expect.isFalse HiMar.Runtime.Native.GcPause.Holding "released after the run"
            }

            test "image i of a seeded run is the same whatever the batch size" {
                use noise3 = new SeededNoise(42L, 0L, 3)
                use all = sample [| 1L; 2L; 3L |] noise3
                use noise1 = new SeededNoise(42L, 2L, 1)
                use third = sample [| 3L |] noise1
                Expect.equal (shapeOf all.Dense) [ 3L; 16L; 16L; 16L ] "dense shape"
                Expect.equal (shapeOf all.Pivots) [ 3L; 16L; 8L; 8L ] "pivot shape"

                Expect.isLessThan
                    (maxAbsDiff (all.Dense.narrow (0L, 2L, 1L)) third.Dense)
                    1e-4
                    "dense tokens of image 2"

                Expect.isLessThan (maxAbsDiff (all.Pivots.narrow (0L, 2L, 1L)) third.Pivots) 1e-4 "pivots of image 2"
            }

            test "two images of one class in one batch get different noise" {
                use noise = new SeededNoise(7L, 0L, 2)
                use r = sample [| 5L; 5L |] noise

                Expect.isGreaterThan
                    (maxAbsDiff (r.Dense.narrow (0L, 0L, 1L)) (r.Dense.narrow (0L, 1L, 1L)))
                    0.1
                    "distinct"
            }

            test "sampling leaks no tensors across runs" {
                let run () =
                    use noise = new SeededNoise(1L, 0L, 2)
                    use r = sample [| 0L; 9L |] noise
                    ()

                // Tensors that earlier tests left to the garbage collector are finalised on another thread and
                // would lower the count while we watch: settle them before each reading.
                let settled () =
                    GC.Collect()
                    GC.WaitForPendingFinalizers()
                    GC.Collect()
                    torch.Tensor.TotalCount

                run ()
                let before = settled ()

                for _ in 1..3 do
                    run ()

                Expect.equal (settled () - before) 0L "live tensors after three more runs"
            }

            test "the FLOP count of one guided Hi-MAR-B image at 32 + 4 steps and 10 head steps is about 7.9 TFLOP" {
                let o =
                    SamplerOptions(Cfg = 2.5, ReCfg = 2.7, MlpHeadSteps = "ddim10", DitHeadSteps = "ddim10")

                let tflop = SamplerFlops.Count(HiMarConfig.hiMarB, o, 1) / 1e12
                Expect.isTrue (tflop > 7.1 && tflop < 8.7) (sprintf "%.2f TFLOP" tflop)

                let unguided =
                    SamplerFlops.Count(
                        HiMarConfig.hiMarB,
                        SamplerOptions(MlpHeadSteps = "ddim10", DitHeadSteps = "ddim10"),
                        1
                    )
                    / 1e12

                Expect.floatClose Accuracy.low (tflop / unguided) 2.0 "guidance doubles the work"
            }

            test "the settings report gives a model without pivots 0 phase-1 steps, Hi-MAR its own or the asked" {
                let mar =
                    HiMarConfig.withAblation PivotSource.NoPivots Phase2Head.Mlp false HiMarConfig.fashion

                let steps (o: SamplerOptions) c =
                    (SamplerSettings.Describe(o, c)["phase1_steps"] |> nonNull).GetValue<int>()

                Expect.equal (steps (SamplerOptions()) HiMarConfig.fashion) 16 "Hi-MAR's default, 4 x 4"
                Expect.equal (steps (SamplerOptions(Phase1Steps = Nullable 8)) HiMarConfig.fashion) 8 "asked"
                Expect.equal (steps (SamplerOptions(Phase1Steps = Nullable 8)) mar) 0 "MAR runs no phase 1"
            }

            test "a replay whose recorded roles do not match the sampler's draws names both" {
                use orders = torch.arange(320L).reshape (1L, 320L)
                use wrong = torch.zeros (1L, 16L, 16L, 16L)

                let replay =
                    ReplayNoise(orders, [| struct ("p2_init", wrong) |] |> Array.map (fun struct (a, b) -> (a, b)))

                let e =
                    catchT<InvalidOperationException> (fun () -> sample [| 1L |] replay |> ignore)

                Expect.stringContains e.Message "recorded draw 0 is p2_init, the sampler asked for p1_init" "message"
            }

            test "the sample job writes one PNG per image, a grid and explanation strips" {
                withTempDir (fun dir ->
                    use vae = VaeParityCases.Build(fixture.Force())

                    let request =
                        SampleRequest(
                            Labels = ResizeArray [ 1L; 2L; 3L ],
                            Seed = 3L,
                            BatchSize = 2,
                            OutDir = dir,
                            Explain = true,
                            Options = quick
                        )

                    let counts = ResizeArray<int>()

                    let out =
                        SampleJob.Run(
                            fixture.Force().Model,
                            HiMar.Runtime.Data.VaeTokenizer vae,
                            request,
                            fun images _ -> counts.Add images
                        )

                    Expect.equal out.Images.Count 3 "images"
                    // Batches of 2 and 1: the count moves within the first batch (1 image) before it ends (2), and ends at 3.
                    Expect.equal (counts |> Seq.distinct |> List.ofSeq) [ 0; 1; 2; 3 ] "progress in images"
                    Expect.isTrue (counts |> Seq.pairwise |> Seq.forall (fun (a, b) -> b >= a)) "never backwards"

                    Expect.equal
                        (out.Images |> Seq.map Path.GetFileName |> List.ofSeq)
                        [ "0000-class1.png"; "0001-class2.png"; "0002-class3.png" ]
                        "names"

                    use img = SixLabors.ImageSharp.Image.Load(out.Images.[0])
                    Expect.equal (img.Width, img.Height) (256, 256) "a 16x16 latent decodes to 256x256"
                    use strip = SixLabors.ImageSharp.Image.Load(out.Explanations.[0])
                    Expect.isGreaterThan strip.Width (3 * 256) "pivots and two dense steps side by side"
                    Expect.isTrue (File.Exists out.Grid) "grid"
                    Expect.isEmpty (Directory.GetFiles(dir, "*.tmp", SearchOption.AllDirectories)) "no temporary files")
            }

            test "a label outside the model's classes is refused before any work" {
                withTempDir (fun dir ->
                    use vae = VaeParityCases.Build(fixture.Force())

                    let request =
                        SampleRequest(Labels = ResizeArray [ 11L ], OutDir = Path.Combine(dir, "out"))

                    let e =
                        catchT<ArgumentException> (fun () ->
                            SampleJob.Run(fixture.Force().Model, HiMar.Runtime.Data.VaeTokenizer vae, request)
                            |> ignore)

                    Expect.stringContains e.Message "class 11 is outside 0..9" "message"
                    Expect.isFalse (Directory.Exists(Path.Combine(dir, "out"))) "nothing written")
            }
        ]
