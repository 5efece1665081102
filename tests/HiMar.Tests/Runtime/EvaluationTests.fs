/// Tests of src/HiMar.Runtime/Evaluation/Metrics.cs: Fréchet distance, Inception Score, precision/recall and
/// the .npz statistics format, on inputs whose answers are known in closed form.
module HiMar.Tests.EvaluationTests

open System
open System.IO
open Expecto
open TorchSharp
open HiMar.Model
open HiMar.Runtime.Evaluation
open HiMar.Tests.TestUtil

let private stats (mu: float[]) (sigma: float[]) =
    let d = int64 mu.Length

    new FeatureStats(
        torch.tensor (mu, dtype = torch.float64),
        torch.tensor(sigma, dtype = torch.float64).reshape (d, d)
    )

/// Writes a training checkpoint's state.json (step, global batch) and an eval.json scoring it, as himar writes them.
let private writeEval (root: string) (step: int) (fd: float) (acc: float) (images: int) =
    let ckpt = Path.Combine(root, "run", "checkpoints", sprintf "step-%08d" step)
    Directory.CreateDirectory ckpt |> ignore

    File.WriteAllText(
        Path.Combine(ckpt, "state.json"),
        sprintf """{"step": %d, "data_position": {"epoch": 0, "global_batch": 64}}""" step
    )

    let dir = Path.Combine(root, sprintf "eval-%d" step)
    Directory.CreateDirectory dir |> ignore

    File.WriteAllText(
        Path.Combine(dir, "eval.json"),
        sprintf
            """{"metrics": {"fd_fmnist": %g, "class_accuracy": %g}, "images": %d, "checkpoint": %s}"""
            fd
            acc
            images
            (Text.Json.JsonSerializer.Serialize ckpt)
    )

    dir

let tests =
    testList
        "Evaluation"
        [
            test "the Fréchet distance of diagonal Gaussians is |dmu|^2 + sum (sqrt s1 - sqrt s2)^2" {
                use a = stats [| 0.0; 0.0 |] [| 1.0; 0.0; 0.0; 4.0 |]
                use b = stats [| 1.0; 2.0 |] [| 4.0; 0.0; 0.0; 9.0 |]
                // 5 + (1 - 2)^2 + (2 - 3)^2
                Expect.floatClose Accuracy.veryHigh (Metrics.FrechetDistance(a, b)) 7.0 "FD"
            }

            test
                "the Fréchet distance handles covariances that do not commute: [[2,1],[1,2]] against I gives 4 - 2 sqrt 3" {
                use a = stats [| 0.0; 0.0 |] [| 2.0; 1.0; 1.0; 2.0 |]
                use b = stats [| 0.0; 0.0 |] [| 1.0; 0.0; 0.0; 1.0 |]
                Expect.floatClose Accuracy.veryHigh (Metrics.FrechetDistance(a, b)) (4.0 - 2.0 * sqrt 3.0) "FD"
            }

            test "features compared with themselves are at distance zero, even with a singular covariance" {
                torch.manual_seed 1L |> ignore
                use f = torch.randn (20L, 50L) // 20 samples in 50 dimensions: rank-deficient covariance
                use s = FeatureStats.Of f
                // Relative to the total variance (about 100 here), float64 eigenvalue rounding leaves ~1e-8.
                let total = s.Sigma.trace().item<float> () * 2.0
                Expect.isLessThan (abs (Metrics.FrechetDistance(s, s)) / total) 1e-7 "FD(x, x) relative to the variance"
            }

            test
                "a quality curve reads each eval folder's scores and its checkpoint's step x global batch, in training order" {
                withTempDir (fun dir ->
                    let late = writeEval dir 2000 40.5 0.8 200
                    let early = writeEval dir 1000 60.25 0.6 200
                    let r = QualityCurve.ReadAll [| late; early |]
                    Expect.equal (r |> Seq.map (fun q -> q.Step) |> List.ofSeq) [ 1000; 2000 ] "sorted by step"
                    Expect.equal r.[0].Point.TrainingImages 64000.0 "1000 steps x 64"
                    Expect.equal (r.[1].Point.Fd, r.[1].Point.Accuracy) (40.5, 0.8) "scores of step 2000")
            }

            test "a quality curve refuses evaluations at different N, and an eval whose checkpoint has no state.json" {
                withTempDir (fun dir ->
                    let a = writeEval dir 1000 60.0 0.6 200
                    let b = writeEval dir 2000 40.0 0.8 500

                    let e =
                        catchT<HiMar.Runtime.BadInputException> (fun () -> QualityCurve.ReadAll [| a; b |] |> ignore)

                    Expect.stringContains e.Message "different sample counts (200, 500)" "names the counts"
                    File.Delete(Path.Combine(dir, "run", "checkpoints", "step-00001000", "state.json"))

                    let e2 =
                        catchT<HiMar.Runtime.BadInputException> (fun () -> QualityCurve.Read a |> ignore)

                    Expect.stringContains e2.Message "has no state.json beside it" "names the missing file"
                    Expect.stringContains e2.Message "eval.json" "names the eval file")
            }

            test
                "himar plot-quality draws the curve of two eval folders and answers a folder without eval.json with one line and exit 2" {
                withTempDir (fun dir ->
                    let a = writeEval dir 1000 60.0 0.6 200
                    let b = writeEval dir 2000 40.0 0.8 200
                    let png = Path.Combine(dir, "q.png")
                    let r = himar [ "plot-quality"; a; b; "-o"; png ]
                    Expect.equal r.Code 0 r.Err

                    Expect.stringContains
                        r.Out
                        "step 2000 (128000 images): FD-FMNIST 40.00, class accuracy 80.0%"
                        "summary"

                    Expect.isGreaterThan (FileInfo(png).Length) 1000L "a PNG"
                    let bad = himar [ "plot-quality"; a; dir; "-o"; Path.Combine(dir, "r.png") ]
                    Expect.equal bad.Code 2 bad.Err
                    Expect.stringContains bad.Err "no eval.json" "names the problem"
                    Expect.equal (bad.Err.Trim().Split('\n').Length) 1 "one line"
                    Expect.isFalse (File.Exists(Path.Combine(dir, "r.png"))) "nothing written")
            }

            test "the Inception Score is 1 for uniform predictions and the class count for confident, balanced ones" {
                use uniform = torch.full ([| 100L; 10L |], scalar 0.1, dtype = torch.float64)
                let m, s = Metrics.InceptionScore(uniform, 10).ToTuple()
                Expect.floatClose Accuracy.high m 1.0 "uniform"
                Expect.floatClose Accuracy.high s 0.0 "no spread"
                use confident = torch.eye(10L, dtype = torch.float64).repeat (10L, 1L)
                let m2, _ = Metrics.InceptionScore(confident, 10).ToTuple()
                Expect.floatClose Accuracy.medium m2 10.0 "one-hot over 10 classes"
            }

            test "precision and recall are 1 for the same set and 0 for sets far apart" {
                torch.manual_seed 2L |> ignore
                use real = torch.randn (40L, 5L)
                let p, r = Metrics.PrecisionRecall(real, real, 3).ToTuple()
                Expect.equal (p, r) (1.0, 1.0) "same set"
                use far = real + 100.0
                let p2, r2 = Metrics.PrecisionRecall(real, far, 3).ToTuple()
                Expect.equal (p2, r2) (0.0, 0.0) "far apart"
            }

            test "precision and recall in row blocks equal the direct computation on sets larger than a block" {
                torch.manual_seed 4L |> ignore
                use real = torch.randn (700L, 6L, dtype = torch.float64)
                use gen = torch.randn (600L, 6L, dtype = torch.float64) * 1.3 + 0.2

                let direct (manifold: torch.Tensor) (probe: torch.Tensor) =
                    use dm = torch.cdist (manifold, manifold)
                    let struct (sorted: torch.Tensor, order: torch.Tensor) = dm.sort (1L)
                    use _ = order
                    use _ = sorted
                    use radii = sorted.select (1L, 3L)
                    use dp = torch.cdist (probe, manifold)
                    use bound = radii.unsqueeze 0L
                    use inside = dp.le bound
                    use hit = inside.any (1L)
                    use covered = hit.``to`` torch.float64
                    use m = covered.mean ()
                    m.item<float> ()

                let p, r = Metrics.PrecisionRecall(real, gen, 3).ToTuple()
                Expect.floatClose Accuracy.veryHigh p (direct real gen) "precision"
                Expect.floatClose Accuracy.veryHigh r (direct gen real) "recall"
                Expect.isTrue (p > 0.2 && p < 1.0 && r > 0.2 && r < 1.0) "neither trivial"
            }

            test "the shipped Fashion-MNIST classifier scores at least 90% on the test set and its floor FD is small" {
                let dir = Path.Combine(repoRoot, "models", "fashion-classifier")
                use clf = new FashionClassifier(10L)

                HiMar.Runtime.Checkpoints.ModelFiles.Load(clf, Path.Combine(dir, "weights.safetensors"))
                |> ignore

                clf.eval ()
                let test = HiMar.Runtime.Data.IdxDataset.FashionMnist(train = false)
                let acc = ClassifierRuns.Accuracy(clf, test)
                Expect.isGreaterThanOrEqual acc 0.90 "test accuracy"
                use all = ClassifierRuns.All test
                let struct (features, _) = ClassifierRuns.Apply(clf, all)
                use features = features
                Expect.equal (shapeOf features) [ 10000L; 128L ] "128-d features"
                use sTest = FeatureStats.Of features
                use sTrain = Metrics.ReadNpz(Path.Combine(dir, "train-stats.npz"))
                let fd = Metrics.FrechetDistance(sTest, sTrain)
                Expect.isTrue (fd > 0.05 && fd < 0.3) (sprintf "FD-FMNIST(test, train) = %g, the floor" fd)
            }

            test
                "an evaluation writes its metrics with every setting, and a longer rerun reuses the images already written" {
                withTempDir (fun dir ->
                    let models = Path.Combine(repoRoot, "models")

                    use m =
                        HiMar.Runtime.Checkpoints.ReferenceImport.LoadModel(Path.Combine(models, "fashion"))

                    use clf = new FashionClassifier(10L)

                    HiMar.Runtime.Checkpoints.ModelFiles.Load(
                        clf,
                        Path.Combine(models, "fashion-classifier", "weights.safetensors")
                    )
                    |> ignore

                    clf.eval ()
                    let stats = Path.Combine(models, "fashion-classifier", "train-stats.npz")

                    let options =
                        HiMar.Runtime.Sampling.SamplerOptions(
                            Cfg = 3.0,
                            ReCfg = 3.0,
                            MlpHeadSteps = "5",
                            DitHeadSteps = "5",
                            ClipDenoised = true
                        )

                    let first =
                        EvalJob.Run(m, Path.Combine(models, "fashion"), true, clf, stats, 10, options, 0L, dir)

                    Expect.equal first.Reused 0 "nothing to reuse"

                    let reported = Collections.Generic.List<int * int>()

                    let second =
                        EvalJob.Run(
                            m,
                            Path.Combine(models, "fashion"),
                            true,
                            clf,
                            stats,
                            14,
                            options,
                            0L,
                            dir,
                            progress = (fun d total -> reported.Add((d, total)))
                        )

                    Expect.equal second.Reused 10 "the first ten images are reused"
                    let counts = reported |> Seq.map fst |> List.ofSeq
                    Expect.isTrue (reported |> Seq.forall (fun (_, total) -> total = 14)) "counted out of 14"
                    Expect.equal counts (List.sort counts) "never goes back"
                    Expect.equal (List.last counts) 14 "reaches every image"

                    Expect.equal
                        (List.distinct counts)
                        [ 10; 11; 12; 13; 14 ]
                        "moves image by image within the one batch of 4, from the 10 reused"

                    Expect.equal (Directory.GetFiles(Path.Combine(dir, "images")).Length) 14 "images"
                    let json = File.ReadAllText(Path.Combine(dir, "eval.json"))

                    for key in
                        [
                            "fd_fmnist"
                            "class_accuracy"
                            "checkpoint_hash"
                            "cfg"
                            "re_cfg"
                            "temperature"
                            "mlp_head_steps"
                            "seed"
                        ] do
                        Expect.stringContains json (sprintf "\"%s\"" key) key

                    let acc =
                        (nonNull (nonNull second.Report.["metrics"]).["class_accuracy"]).GetValue<float>()

                    Expect.isTrue (acc >= 0.0 && acc <= 1.0) "an accuracy")
            }

            test "statistics round-trip through the .npz format" {
                withTempDir (fun dir ->
                    use s = stats [| 1.5; -2.0; 3.0 |] [| 1.0; 0.1; 0.0; 0.1; 2.0; 0.3; 0.0; 0.3; 3.0 |]
                    let path = Path.Combine(dir, "ref.npz")
                    Metrics.WriteNpz(s, path)
                    use back = Metrics.ReadNpz path
                    Expect.equal (maxAbsDiff back.Mu s.Mu) 0.0 "mu"
                    Expect.equal (maxAbsDiff back.Sigma s.Sigma) 0.0 "sigma"
                    File.WriteAllText(Path.Combine(dir, "bad.npz"), "not a zip")

                    let e =
                        catchT<HiMar.Runtime.BadInputException> (fun () ->
                            Metrics.ReadNpz(Path.Combine(dir, "bad.npz")) |> ignore)

                    Expect.stringContains e.Message "bad.npz" "names the file")
            }
        ]
