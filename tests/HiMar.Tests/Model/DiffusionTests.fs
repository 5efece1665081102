/// Tests of src/HiMar.Model/Diffusion.fs: schedules, respacing and the Gaussian diffusion math.
module HiMar.Tests.DiffusionTests

open System
open Expecto
open TorchSharp
open HiMar.Model
open HiMar.Tests.TestUtil

let tests =
    testList
        "Diffusion"
        [
            test "respacing \"100\" spreads steps with Python's half-to-even rounding" {
                let steps = Schedule.spaceTimesteps 1000 "100"
                Expect.equal steps.Length 100 "count"
                Expect.equal steps.[..6] [| 0; 10; 20; 30; 40; 50; 61 |] "first steps"
                Expect.equal (Array.last steps) 999 "last step"
            }

            test "respacing \"ddim10\" takes every hundredth step" {
                Expect.equal (Schedule.spaceTimesteps 1000 "ddim10") [| 0..100..900 |] "steps"
            }

            test "respacing with sections splits the range into parts" {
                let steps = Schedule.spaceTimesteps 100 "2,3"
                Expect.equal steps [| 0; 49; 50; 74; 99 |] "two sections of 50"
            }

            test "an impossible respacing names the problem" {
                let e =
                    catchT<ArgumentException> (fun () -> Schedule.spaceTimesteps 1000 "ddim7000" |> ignore)

                Expect.stringContains e.Message "exactly 7000 steps" "message"

                let e2 =
                    catchT<ArgumentException> (fun () -> Schedule.spaceTimesteps 10 "20" |> ignore)

                Expect.stringContains e2.Message "section of 10 steps into 20" "message"
            }

            test "the cosine schedule's cumulative alphas follow cos((t + 0.008) / 1.008 pi/2)^2 until the 0.999 cap" {
                let s = Schedule.create "cosine" 1000 ""

                let abar t =
                    Math.Pow(Math.Cos((t + 0.008) / 1.008 * Math.PI / 2.0), 2.0)
                    / Math.Pow(Math.Cos(0.008 / 1.008 * Math.PI / 2.0), 2.0)

                for i in [ 0; 100; 500; 900 ] do
                    Expect.floatClose
                        Accuracy.high
                        s.AlphasCumprod.[i]
                        (abar (float (i + 1) / 1000.0))
                        (sprintf "abar[%d]" i)

                Expect.equal s.Betas.[999] 0.999 "the last beta is capped"
            }

            test "a respaced schedule keeps the base cumulative alphas at its kept steps" {
                let full = Schedule.create "cosine" 1000 ""
                let spaced = Schedule.create "cosine" 1000 "250"

                for i in 0 .. spaced.NumTimesteps - 1 do
                    let t = int spaced.TimestepMap.[i]
                    Expect.floatClose Accuracy.veryHigh spaced.AlphasCumprod.[i] full.AlphasCumprod.[t] "abar"
            }

            test "q_sample at step 0 is almost the data and the posterior mean of x0 at x_t = q_sample is between them" {
                let d = GaussianDiffusion(Schedule.create "cosine" 1000 "", VarianceKind.FixedLarge)
                use x0 = torch.ones (2L, 3L)
                use noise = torch.zeros (2L, 3L)
                use t = torch.tensor ([| 0L; 999L |])
                use xt = d.QSample(x0, t, noise)
                let v = xt.data<float32>().ToArray()
                Expect.floatClose Accuracy.medium (float v.[0]) (sqrt d.Schedule.AlphasCumprod.[0]) "t = 0"
                Expect.isLessThan (float v.[3]) 0.01 "t = 999 keeps almost nothing of x0"
            }

            test "a learned-range variance of v = 1 is beta_t and v = -1 the clipped posterior variance" {
                let d =
                    GaussianDiffusion(Schedule.create "cosine" 1000 "100", VarianceKind.LearnedRange)

                use x = torch.zeros (2L, 4L)
                use t = torch.tensor ([| 50L; 50L |])
                use eps = torch.zeros (2L, 4L)
                use v = torch.tensor([| 1.0f; -1.0f |]).reshape(2L, 1L).expand (2L, 4L)
                use out = torch.cat ([| eps; v |], 1L)
                let step = d.PMeanVariance(out, x, t, false)
                let lv = step.LogVariance.data<float32>().ToArray()
                Expect.floatClose Accuracy.medium (float lv.[0]) (Math.Log d.Schedule.Betas.[50]) "v = 1"
                Expect.floatClose Accuracy.medium (float lv.[4]) d.Schedule.PosteriorLogVarianceClipped.[50] "v = -1"
            }

            test "a perfect noise prediction has zero MSE and the KL term is non-negative" {
                let d =
                    GaussianDiffusion(Schedule.create "cosine" 1000 "", VarianceKind.LearnedRange)

                torch.manual_seed 3L |> ignore
                use x0 = torch.randn (8L, 4L)
                use noise = torch.randn (8L, 4L)
                use t = torch.tensor ([| 0L; 1L; 10L; 100L; 400L; 700L; 900L; 999L |])
                use xt = d.QSample(x0, t, noise)
                use v = torch.zeros (8L, 4L)
                use out = torch.cat ([| noise; v |], 1L)
                let l = d.TrainingLosses(out, x0, xt, t, noise)
                Expect.isLessThan (l.Mse.abs().max().item<float32> ()) 1e-10f "mse"
                Expect.isGreaterThanOrEqual (l.Vb.narrow(0L, 1L, 7L).min().item<float32> ()) -1e-5f "kl >= 0"
            }

            test "clip_denoised clamps the predicted x0 to [-1, 1] and leaves it alone otherwise" {
                let d =
                    GaussianDiffusion(Schedule.create "cosine" 1000 "10", VarianceKind.FixedLarge)

                use x = torch.full ([| 1L; 4L |], scalar 0.5)
                use t = torch.tensor ([| 9L |])
                use eps = torch.full ([| 1L; 4L |], scalar -0.5)
                let free = d.PMeanVariance(eps, x, t, false)
                let clipped = d.PMeanVariance(eps, x, t, true)

                Expect.isGreaterThan
                    (free.PredXstart.max().item<float32> ())
                    10.0f
                    "the last step amplifies the noise error"

                Expect.equal (clipped.PredXstart.max().item<float32> ()) 1.0f "clamped"
            }

            test "the DDIM step with eta 0 is deterministic and returns x0 at the last step" {
                let d =
                    GaussianDiffusion(Schedule.create "cosine" 1000 "ddim10", VarianceKind.FixedLarge)

                use x0 = torch.full ([| 1L; 2L |], scalar 0.5)
                use noise = torch.randn (1L, 2L)
                use t = torch.tensor ([| 0L |])
                use xt = d.QSample(x0, t, noise)
                use eps = d.PredictEpsFromXstart(xt, t, x0)
                let step = d.PMeanVariance(eps, xt, t, false)
                use other = torch.randn (1L, 2L)
                use out = d.DdimSample(step, xt, t, other, 0.0)
                Expect.isLessThan (maxAbsDiff out x0) 1e-5 "x0"
            }
        ]
