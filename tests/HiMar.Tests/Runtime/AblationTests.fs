/// Tests of the Table 5 ablation: the sampler on every variant, the switches in config files, the charts, and a
/// small `Ablation.Run` end to end (src/HiMar.Runtime/Evaluation/Ablation.cs, Sampling/HiMarSampler.cs).
module HiMar.Tests.AblationTests

open System
open System.IO
open System.Text.Json.Nodes
open Expecto
open TorchSharp
open HiMar.Model
open HiMar.Runtime.Checkpoints
open HiMar.Runtime.Evaluation
open HiMar.Runtime.Imaging
open HiMar.Runtime.Sampling
open HiMar.Tests.TestUtil

/// Counts the rows of every start-noise draw: one row per token a head generates (MLP head) or one per
/// Transformer-head loop.
type private CountingNoise(inner: INoiseSource) =
    let rows = Collections.Generic.Dictionary<NoiseRole, int64>()

    member _.Rows role =
        match rows.TryGetValue role with
        | true, v -> v
        | _ -> 0L

    interface INoiseSource with
        member _.Orders(pivots, dense, device) = inner.Orders(pivots, dense, device)

        member this.Draw(role, halves, rowsPerImage, rowShape, device) =
            rows.[role] <- this.Rows role + rowsPerImage
            inner.Draw(role, halves, rowsPerImage, rowShape, device)

let private quick =
    SamplerOptions(
        Phase1Steps = Nullable 3,
        Phase2Steps = 3,
        Cfg = 2.0,
        ReCfg = 2.0,
        MlpHeadSteps = "ddim2",
        DitHeadSteps = "ddim2"
    )

let private small = HiMarConfig.fashionSmall

let tests =
    testList
        "Ablation"
        [
            test "every Table 5 variant samples: each token is drawn once, pivots only where the variant has them" {
                for v in Ablation.Variants small do
                    torch.manual_seed 3L |> ignore
                    use model = new HiMAR(v.Config)
                    Init.himar model
                    use seeded = new SeededNoise(5L, 0L, 2)
                    let noise = CountingNoise(seeded)
                    use labels = torch.tensor [| 1L; 7L |]
                    use r = HiMarSampler.Sample(model, labels, noise, quick)
                    let g = int64 small.SeqH
                    Expect.equal (shapeOf r.BigTokens) [ 2L; 16L; g; g ] (v.Key + ": dense shape")
                    Expect.isTrue (r.BigTokens.isfinite().all().item<bool> ()) (v.Key + ": finite")
                    let hasPivots = v.Config.Pivots <> PivotSource.NoPivots

                    let pivots =
                        if hasPivots then
                            int64 (small.CondScale * small.CondScale)
                        else
                            0L

                    Expect.equal (r.SmallTokens.numel ()) (2L * 16L * pivots) (v.Key + ": pivot values")
                    Expect.equal (noise.Rows NoiseRole.Phase1Init) pivots (v.Key + ": pivots drawn by the MLP head")

                    let phase2Rows =
                        if v.Config.Phase2 = Phase2Head.Mlp then
                            int64 small.DenseTokens
                        else
                            3L

                    Expect.equal
                        (noise.Rows NoiseRole.Phase2Init)
                        phase2Rows
                        (v.Key + ": dense tokens (MLP head) or loops (Transformer head)")
            }

            test "the ablation switches round-trip through config.json, and a wrong value is named" {
                withTempDir (fun dir ->
                    for v in Ablation.Variants small do
                        let path = Path.Combine(dir, v.Key + ".json")
                        File.WriteAllText(path, (ReferenceImport.ToJson v.Config).ToJsonString())
                        let back = ModelConfigs.Resolve path
                        Expect.equal back v.Config (v.Key + ": same config")

                    let hiMar = (ReferenceImport.ToJson small).ToJsonString()
                    Expect.isFalse (hiMar.Contains "pivots") "Hi-MAR's own config has no ablation keys"
                    let bad = Path.Combine(dir, "bad.json")
                    File.WriteAllText(bad, """{"model": "fashion", "pivots": "sideways"}""")

                    let e =
                        catchT<CheckpointFormatException> (fun () -> ModelConfigs.Resolve bad |> ignore)

                    Expect.stringContains e.Message "bad.json" "names the file"
                    Expect.stringContains e.Message "none, low_res, cond_tokens" "lists the choices")
            }

            test "a bare state dict of an ablation variant imports as that variant" {
                withTempDir (fun dir ->
                    let mar = (Ablation.Variants small).[0].Config
                    use model = new HiMAR(mar)
                    let src = Path.Combine(dir, "weights.safetensors")
                    ModelFiles.Save(model, src)

                    File.WriteAllText(
                        Path.Combine(dir, "config.json"),
                        """{"encoder_num_heads": 4, "decoder_num_heads": 4, "head": 4, "vae_stride": 4}"""
                    )

                    ReferenceImport.Import(src, Path.Combine(dir, "out")) |> ignore
                    use back = ReferenceImport.LoadModel(Path.Combine(dir, "out"))
                    Expect.equal back.Config.Pivots PivotSource.NoPivots "no pivots"
                    Expect.equal back.Config.Phase2 Phase2Head.Mlp "MLP phase-2 head")
            }

            test "low-res pivots get the pivot-condition dropout too: phase 2 ignores them at epoch 0, not once warm" {
                let lowRes =
                    { (Ablation.Variants small).[1].Config with
                        StepStage2Rate = 1.0
                    }

                Expect.equal lowRes.Pivots PivotSource.LowResTokens "the low-res variant"
                torch.manual_seed 11L |> ignore
                // Default (random) weights: Init.himar zeroes the heads' output layers, so no loss would see z.
                use model = new HiMAR(lowRes)
                use tokens = torch.randn (4L, 64L, 16L)
                use condA = torch.randn (4L, 16L, 16L)
                use condB = torch.randn (4L, 16L, 16L)
                use labels = torch.tensor [| 0L; 1L; 2L; 3L |]

                let phase2 (cond: torch.Tensor) epoch =
                    torch.manual_seed 5L |> ignore
                    let r = model.TrainingLosses(tokens, cond, labels, epoch)
                    use _ = r.Phase1
                    use _ = r.Total
                    use p = r.Phase2
                    p.item<float32> () |> float

                Expect.equal (phase2 condA 0.0) (phase2 condB 0.0) "epoch 0: every sample takes the placeholder"
                let warm = float lowRes.StepWarmup

                Expect.isGreaterThan
                    (abs (phase2 condA warm - phase2 condB warm))
                    1e-6
                    "warm, rate 1: the pivots are seen"
            }

            test "mean and sample standard deviation" {
                let struct (m, s) = Ablation.MeanStd [| 1.0; 2.0; 3.0; 6.0 |]
                Expect.floatClose Accuracy.high m 3.0 "mean"
                Expect.floatClose Accuracy.high s (sqrt (14.0 / 3.0)) "std with n - 1"
                let struct (m1, s1) = Ablation.MeanStd [| 4.5 |]
                Expect.equal (m1, s1) (4.5, 0.0) "one value"
            }

            test "charts are PNGs of the requested size; no points is refused" {
                withTempDir (fun dir ->
                    let path = Path.Combine(dir, "c.png")

                    let series =
                        ChartSeries(
                            "s",
                            SixLabors.ImageSharp.PixelFormats.Rgb24(0uy, 0uy, 255uy),
                            [| struct (0.0, 5.0, 1.0); struct (1.0, 3.0, 0.5) |],
                            true
                        )

                    Charts.Save(
                        path,
                        "t",
                        "y",
                        [| series |],
                        [| struct (0.0, "a"); struct (1.0, "b") |],
                        Nullable 2.0,
                        300,
                        200
                    )

                    use img = SixLabors.ImageSharp.Image.Load path
                    Expect.equal (img.Width, img.Height) (300, 200) "size"

                    let empty = ChartSeries("e", SixLabors.ImageSharp.PixelFormats.Rgb24(), [||], false)

                    catchT<ArgumentException> (fun () ->
                        Charts.Save(path, "t", "y", [| empty |], [||], Nullable(), 300, 200))
                    |> ignore)
            }

            test "an evaluation folder refuses images sampled with other settings" {
                withTempDir (fun dir ->
                    let models = Path.Combine(repoRoot, "models")
                    use m = ReferenceImport.LoadModel(Path.Combine(models, "fashion"))
                    use clf = ClassifierRuns.Load(Path.Combine(models, "fashion-classifier"))
                    let stats = Path.Combine(models, "fashion-classifier", "train-stats.npz")

                    let options =
                        SamplerOptions(Cfg = 2.0, MlpHeadSteps = "3", DitHeadSteps = "3", ClipDenoised = true)

                    let ckpt = Path.Combine(models, "fashion")
                    EvalJob.Run(m, ckpt, true, clf, stats, 2, options, 0L, dir) |> ignore
                    let again = EvalJob.Run(m, ckpt, true, clf, stats, 2, options, 0L, dir)
                    Expect.equal again.Reused 2 "same settings: reused"

                    let e =
                        catchT<InvalidDataException> (fun () ->
                            EvalJob.Run(
                                m,
                                ckpt,
                                true,
                                clf,
                                stats,
                                2,
                                SamplerOptions(Cfg = 3.0, MlpHeadSteps = "3", DitHeadSteps = "3", ClipDenoised = true),
                                0L,
                                dir
                            )
                            |> ignore)

                    Expect.stringContains e.Message dir "names the folder"
                    Expect.stringContains e.Message "other settings" "says why")
            }

            test "a small ablation runs end to end, tabulates, plots, and resumes without redoing work" {
                withTempDir (fun dir ->
                    let plan =
                        AblationPlan(
                            Base = small,
                            OutDir = dir,
                            ClassifierDir = Path.Combine(repoRoot, "models", "fashion-classifier"),
                            Steps = 3,
                            Batch = 8,
                            Warmup = 1,
                            Seeds = [| 1L; 2L |],
                            Samples = 10,
                            Phase1Sweep = [| 1; 16 |],
                            Phase2Sweep = [| 1 |],
                            Only = [| "mar"; "hi-mar" |],
                            Sampling =
                                SamplerOptions(Cfg = 2.0, ReCfg = 2.0, MlpHeadSteps = "ddim2", DitHeadSteps = "ddim2"),
                            SampleBatch = 10
                        )

                    let report = Ablation.Run plan
                    let variants = (nonNull report.["variants"]).AsArray()

                    Expect.equal
                        [ for v in variants -> (nonNull (nonNull v).["key"]).GetValue<string>() ]
                        [ "mar"; "hi-mar" ]
                        "variants in order"

                    for v in variants do
                        let v = nonNull v
                        Expect.equal ((nonNull v.["runs"]).AsArray().Count) 2 "one run per seed"
                        let fd = (nonNull v.["fd_fmnist_mean"]).GetValue<float>()
                        Expect.isTrue (Double.IsFinite fd && fd > 0.0) "a finite FD"

                    let marParams = (nonNull (nonNull variants.[0]).["parameters"]).GetValue<int64>()
                    let _, expected = Anatomy.parameterCounts (Ablation.Variants small).[0].Config
                    Expect.equal marParams expected "parameter count of plain MAR"

                    let steps (sweep: string) =
                        [
                            for p in (nonNull (nonNull report.["sweeps"]).[sweep]).AsArray() ->
                                (nonNull (nonNull p).["steps"]).GetValue<int>()
                        ]

                    Expect.equal (steps "phase1") [ 1; 16 ] "phase-1 sweep points"
                    Expect.equal (steps "phase2") [ 1 ] "phase-2 sweep points"

                    for f in
                        [
                            "results.json"
                            "results.md"
                            "ablation.png"
                            "sweep-phase1.png"
                            "samples-mar.png"
                        ] do
                        Expect.isTrue (File.Exists(Path.Combine(dir, f))) f

                    let ckpt = Path.Combine(dir, "mar", "seed-1", "checkpoints")
                    let stamp () = Directory.GetLastWriteTimeUtc ckpt
                    let before = stamp ()
                    let again = Ablation.Run plan
                    Expect.equal (stamp ()) before "no retraining"

                    Expect.equal
                        ((nonNull again.["variants"]).ToJsonString())
                        ((nonNull report.["variants"]).ToJsonString())
                        "the same numbers from the files on disk")
            }
        ]
