/// Tests of src/HiMar.Runtime/Training and Data: exact resume, no leaks, the NaN guard, IDX files, the
/// pixel-patch tokenizer.
module HiMar.Tests.TrainingTests

open System
open System.IO
open System.IO.Compression
open Expecto
open TorchSharp
open HiMar.Model
open HiMar.Runtime.Data
open HiMar.Runtime.Training
open HiMar.Tests.TestUtil

/// A tiny model on 32x32 pixel patches (the fashion layout, much narrower).
let tinyConfig =
    { HiMarConfig.fashion with
        Backbone.EncoderWidth = 32
        Backbone.EncoderDepth = 1
        Backbone.EncoderHeads = 2
        Backbone.DecoderWidth = 32
        Backbone.DecoderDepth = 1
        Backbone.DecoderHeads = 2
        MlpHead.Depth = 1
        MlpHead.Width = 32
        TransformerHead.Width = 16
        TransformerHead.Depth = 1
        TransformerHead.Heads = 2
        MlpHead.SamplingSteps = "ddim3"
        TransformerHead.SamplingSteps = "ddim3"
    }

/// 48 random 28x28 images in 10 classes (or NaN images, to trip the guard).
type SyntheticData(?nan: bool) =
    let images =
        use g = new torch.Generator(5UL)
        torch.rand([| 48L; 1L; 28L; 28L |], generator = g).mul(scalar 2.0).sub (scalar 1.0)

    interface IImageDataset with
        member _.Count = 48
        member _.Labels = [| for i in 0L .. 47L -> i % 10L |]
        member _.ClassCount = 10

        member _.Batch(indices, _flips) =
            use idx = torch.tensor (indices |> Seq.map int64 |> Array.ofSeq)
            let b = images.index_select (0L, idx)

            if defaultArg nan false then
                b.fill_ (scalar Double.NaN)
            else
                b

/// Training options of the tests: batch 8, a short warm-up, a fast EMA, checkpoints every 3 steps.
let options dir steps =
    TrainOptions(
        OutDir = dir,
        Steps = steps,
        BatchSize = 8,
        BaseLr = 0.01,
        WarmupSteps = 2,
        EmaRate = 0.9,
        CheckpointEvery = 3,
        LogEvery = 1,
        Seed = 9L
    )


let private writeGz (path: string) (bytes: byte[]) =
    use f = File.Create path
    use gz = new GZipStream(f, CompressionLevel.Fastest)
    gz.Write(bytes, 0, bytes.Length)

let private bigEndian (v: int) =
    [| byte (v >>> 24); byte (v >>> 16); byte (v >>> 8); byte v |]

let tests =
    testList
        "Training"
        [
            test "the named AdamW takes the same steps as TorchSharp's AdamW, decay and bias correction included" {
                // Two linear layers: a weight (decayed) and a bias (not), five steps of fixed gradients.
                let make () =
                    torch.manual_seed 3L |> ignore
                    torch.nn.Linear(4L, 3L)

                use ours = make ()
                use theirs = make ()
                use named = new NamedAdamW(ours, 0.05, beta1 = 0.9, beta2 = 0.95, eps = 1e-8)

                let param (name: string) =
                    theirs.named_parameters ()
                    |> Seq.pick (fun struct (n, p) -> if n = name then Some p else None)

                // TorchSharp's groups do not inherit the optimiser's settings, so each names them.
                let group name decay =
                    Modules.AdamW.ParamGroup(
                        [ param name ],
                        lr = 0.01,
                        beta1 = 0.9,
                        beta2 = 0.95,
                        eps = 1e-8,
                        weight_decay = decay
                    )

                let groups = [ group "weight" 0.05; group "bias" 0.0 ]

                use reference =
                    torch.optim.AdamW(groups, lr = 0.01, beta1 = 0.9, beta2 = 0.95, eps = 1e-8)

                for step in 1..5 do
                    use x = torch.linspace(-1.0, 1.0, 8L).reshape (2L, 4L) * float step

                    for m in [ ours; theirs ] do
                        m.zero_grad ()
                        use loss = (m.forward x).square().sum ()
                        loss.backward ()

                    named.Step 0.01
                    reference.step () |> ignore

                let close (a: torch.Tensor | null) (b: torch.Tensor | null) =
                    (nonNull a - nonNull b).abs().max().item<float32> ()

                Expect.isLessThan (close ours.weight theirs.weight) 1e-6f "decayed weight"
                Expect.isLessThan (close ours.bias theirs.bias) 1e-6f "bias"
                Expect.isGreaterThan (close ours.weight (make ()).weight) 1e-3f "the steps moved the weight"
            }

            test "N steps straight and N/2 + resume + N/2 give the same weights, EMA and optimizer state" {
                withTempDir (fun dir ->
                    let straight = Path.Combine(dir, "straight")
                    let split = Path.Combine(dir, "split")

                    use a =
                        new Trainer(tinyConfig, SyntheticData(), PixelPatchTokenizer.Fashion, options straight 6)

                    a.Run()

                    use b =
                        new Trainer(tinyConfig, SyntheticData(), PixelPatchTokenizer.Fashion, options split 3)

                    b.Run()

                    use c =
                        new Trainer(
                            tinyConfig,
                            SyntheticData(),
                            PixelPatchTokenizer.Fashion,
                            options split 6,
                            resume = true
                        )

                    Expect.equal c.Step 3 "resumed at step 3"
                    c.Run()
                    let wa, wc = Weights.stateDict a.Model, Weights.stateDict c.Model

                    for KeyValue(k, t) in wa do
                        Expect.equal (maxAbsDiff t wc.[k]) 0.0 k

                    Expect.equal
                        (maxAbsDiff
                            (Weights.stateDict a.EmaModel).["mask_token"]
                            (Weights.stateDict c.EmaModel).["mask_token"])
                        0.0
                        "EMA"

                    let lines (d: string) =
                        File.ReadAllLines(Path.Combine(d, "metrics.jsonl"))

                    Expect.equal (lines split).Length 6 "metrics continue after the resume"
                    Expect.isTrue (File.Exists(Path.Combine(straight, "loss.png"))) "loss curve")
            }

            test
                "--init starts a fresh run from another run's EMA weights; a model of other shapes is refused before anything is written" {
                withTempDir (fun dir ->
                    let first = Path.Combine(dir, "first")

                    use a =
                        new Trainer(tinyConfig, SyntheticData(), PixelPatchTokenizer.Fashion, options first 3)

                    a.Run()
                    let ckpt = Path.Combine(first, "checkpoints", "step-00000003")

                    use b =
                        new Trainer(
                            tinyConfig,
                            SyntheticData(),
                            PixelPatchTokenizer.Fashion,
                            (options (Path.Combine(dir, "tuned")) 6).WithInit ckpt
                        )

                    Expect.equal b.Step 0 "a fresh run"

                    let ea, wb, eb =
                        Weights.stateDict a.EmaModel, Weights.stateDict b.Model, Weights.stateDict b.EmaModel

                    for KeyValue(k, t) in ea do
                        Expect.equal (maxAbsDiff t wb.[k]) 0.0 $"model {k}"
                        Expect.equal (maxAbsDiff t eb.[k]) 0.0 $"EMA {k}"

                    Expect.isGreaterThan
                        (maxAbsDiff (Weights.stateDict a.Model).["mask_token"] wb.["mask_token"])
                        0.0
                        "the EMA weights, not the raw ones"

                    b.Run()
                    Expect.equal b.Step 6 "trains its own schedule"

                    let wider = { tinyConfig with MlpHead.Width = 48 }

                    let refused = Path.Combine(dir, "refused")

                    let e =
                        catchT<HiMar.Runtime.BadInputException> (fun () ->
                            (new Trainer(
                                wider,
                                SyntheticData(),
                                PixelPatchTokenizer.Fashion,
                                (options refused 3).WithInit ckpt
                            ))
                                .Dispose())

                    Expect.stringContains e.Message $"--init: {ckpt}: '" "names the flag and the folder"
                    Expect.stringContains e.Message "in this run's model" "says what does not fit"
                    Expect.isFalse (Directory.Exists refused) "no run folder"

                    let missing =
                        catchT<HiMar.Runtime.BadInputException> (fun () ->
                            (new Trainer(
                                tinyConfig,
                                SyntheticData(),
                                PixelPatchTokenizer.Fashion,
                                (options refused 3).WithInit(Path.Combine(dir, "nope"))
                            ))
                                .Dispose())

                    Expect.stringContains missing.Message "no such model folder" "a missing path"
                    Expect.isFalse (Directory.Exists refused) "still no run folder")
            }

            test "checkpoints are whole folders, pruned to the last K, with a best copy" {
                withTempDir (fun dir ->
                    use t =
                        new Trainer(
                            tinyConfig,
                            SyntheticData(),
                            PixelPatchTokenizer.Fashion,
                            (options dir 9).WithKeep 2
                        )

                    t.Run()

                    let names =
                        Directory.GetDirectories(Path.Combine(dir, "checkpoints"))
                        |> Array.map Path.GetFileName
                        |> Array.sort

                    Expect.equal names [| "best"; "step-00000006"; "step-00000009" |] "folders"

                    for f in
                        [
                            "weights.safetensors"
                            "ema.safetensors"
                            "optimizer.safetensors"
                            "config.json"
                            "state.json"
                        ] do
                        Expect.isTrue (File.Exists(Path.Combine(dir, "checkpoints", "step-00000009", f))) f

                    use m =
                        HiMar.Runtime.Checkpoints.ReferenceImport.LoadModel(
                            Path.Combine(dir, "checkpoints", "step-00000009")
                        )

                    Expect.equal m.Config.Backbone.EncoderWidth 32 "a checkpoint folder loads for sampling")
            }

            test "training steps leak no tensors" {
                withTempDir (fun dir ->
                    use t =
                        new Trainer(
                            tinyConfig,
                            SyntheticData(),
                            PixelPatchTokenizer.Fashion,
                            (options dir 100).WithCheckpointEvery 1000
                        )

                    // Tensors other tests left to the finalizer are collected before the baseline, so that their
                    // finalisation during the three steps cannot offset what the steps leave behind.
                    let settle () =
                        GC.Collect()
                        GC.WaitForPendingFinalizers()
                        GC.Collect()

                    t.Run(maxSteps = 1)
                    settle ()
                    let after1 = torch.Tensor.TotalCount
                    t.Run(maxSteps = 3)
                    Expect.equal t.Step 4 "steps"
                    Expect.equal (torch.Tensor.TotalCount - after1) 0L "live tensors after three more steps")
            }

            test "a non-finite loss stops training, names the term and keeps the last good checkpoint" {
                withTempDir (fun dir ->
                    use t =
                        new Trainer(tinyConfig, SyntheticData(nan = true), PixelPatchTokenizer.Fashion, options dir 3)

                    let e = catchT<NonFiniteException> (fun () -> t.Run())
                    Expect.stringContains e.Message "step 1: the phase-1 loss is not finite" "message"
                    Expect.stringContains e.Message "checkpoints" "where the good checkpoints are")
            }

            test "the pixel-patch tokenizer round-trips images and makes 8x8 tokens and 4x4 pivots of 16 values" {
                use img = torch.rand(2L, 1L, 28L, 28L).mul(scalar 2.0).sub (scalar 1.0)
                let tok = PixelPatchTokenizer.Fashion
                let struct (tokens, pivots) = tok.Encode img
                use tokens = tokens
                use pivots = pivots
                Expect.equal (shapeOf tokens) [ 2L; 64L; 16L ] "tokens"
                Expect.equal (shapeOf pivots) [ 2L; 16L; 16L ] "pivots"
                use grid = tokens.reshape(2L, 8L, 8L, 16L).permute (0L, 3L, 1L, 2L)
                use back = tok.Decode grid
                Expect.isLessThan (maxAbsDiff back img) 1e-6 "round trip"
                use pgrid = pivots.reshape(2L, 4L, 4L, 16L).permute (0L, 3L, 1L, 2L)
                use small = tok.Decode pgrid
                Expect.equal (shapeOf small) [ 2L; 1L; 14L; 14L ] "pivot image"
            }

            test "IDX files load, and a truncated one is refused naming the file" {
                withTempDir (fun dir ->
                    let images =
                        Array.concat [ bigEndian 0x803; bigEndian 3; bigEndian 2; bigEndian 2; [| 0uy .. 11uy |] ]

                    let labels = Array.concat [ bigEndian 0x801; bigEndian 3; [| 2uy; 0uy; 1uy |] ]
                    writeGz (Path.Combine(dir, "img.gz")) images
                    writeGz (Path.Combine(dir, "lab.gz")) labels
                    let d = IdxDataset.Load(Path.Combine(dir, "img.gz"), Path.Combine(dir, "lab.gz"))
                    Expect.equal (d.Count, d.Rows, d.Cols, d.ClassCount) (3, 2, 2, 3) "header"
                    use b = (d :> IImageDataset).Batch([| 1 |], [| true |])

                    Expect.sequenceEqual
                        (b.data<float32>().ToArray())
                        [|
                            5.0f / 127.5f - 1.0f
                            4.0f / 127.5f - 1.0f
                            7.0f / 127.5f - 1.0f
                            6.0f / 127.5f - 1.0f
                        |]
                        "flipped pixels"

                    writeGz (Path.Combine(dir, "cut.gz")) images.[..20]

                    let e =
                        catchT<HiMar.Runtime.BadInputException> (fun () ->
                            IdxDataset.Load(Path.Combine(dir, "cut.gz"), Path.Combine(dir, "lab.gz"))
                            |> ignore)

                    Expect.stringContains
                        e.Message
                        "cut.gz: 21 bytes do not hold 3 images of 2x2 (truncated?)"
                        "message")
            }

            test
                "the shipped fashion model loads strictly as the fashion preset and samples bounded pixels for every class" {
                let dir = Path.Combine(repoRoot, "models", "fashion")
                use m = HiMar.Runtime.Checkpoints.ReferenceImport.LoadModel dir
                Expect.equal m.Config HiMarConfig.fashion "the preset's configuration"

                Expect.isLessThan
                    (FileInfo(Path.Combine(dir, "weights.safetensors"))).Length
                    (20L * 1024L * 1024L)
                    "at most 20 MB"

                use labels = torch.arange (10L)
                use noise = new HiMar.Runtime.Sampling.SeededNoise(0L, 0L, 10)

                let options =
                    HiMar.Runtime.Sampling.SamplerOptions(
                        Cfg = 3.0,
                        ReCfg = 3.0,
                        MlpHeadSteps = "10",
                        DitHeadSteps = "10",
                        ClipDenoised = true
                    )

                use r = HiMar.Runtime.Sampling.HiMarSampler.Sample(m, labels, noise, options)
                use images = PixelPatchTokenizer.Fashion.Decode r.Dense
                Expect.equal (shapeOf images) [ 10L; 1L; 28L; 28L ] "28x28 images"
                // Trousers and sandals are dark beside tops and coats: the per-class ink follows the data's order.
                use ink = (images + 1.0).mean ([| 1L; 2L; 3L |])
                let v = ink.data<float32>().ToArray()
                Expect.isGreaterThan v.[4] v.[5] "coats carry more ink than sandals"
                Expect.isGreaterThan v.[2] v.[1] "pullovers carry more ink than trousers"
            }

            test "Fashion-MNIST from the Debian package has 60,000 training images in 10 classes" {
                let d = IdxDataset.FashionMnist()
                Expect.equal (d.Count, d.Rows, d.Cols, d.ClassCount) (60000, 28, 28, 10) "shape"
            }
        ]

/// Image folders and latent caches.
let cacheTests =
    testList
        "LatentCache"
        [
            test "an image folder caches with a corrupt file skipped and named, and the cache trains a matching model" {
                withTempDir (fun dir ->
                    let data = Path.Combine(dir, "images")

                    for cls, n in [ "cat", 2; "dog", 1 ] do
                        Directory.CreateDirectory(Path.Combine(data, cls)) |> ignore

                        for i in 1..n do
                            use img =
                                new SixLabors.ImageSharp.Image<SixLabors.ImageSharp.PixelFormats.Rgb24>(80, 60)

                            img.[5 * i, 7] <- SixLabors.ImageSharp.PixelFormats.Rgb24(200uy, 10uy, 10uy)

                            SixLabors.ImageSharp.ImageExtensions.SaveAsPng(
                                img,
                                Path.Combine(data, cls, sprintf "%d.png" i)
                            )

                    File.WriteAllText(Path.Combine(data, "dog", "broken.png"), "not a png")
                    let folder = ImageFolder(data, 64)
                    Expect.equal (folder.Count, folder.ClassCount) (4, 2) "files and classes"
                    use fixture = HiMar.Runtime.Parity.ParityFixture.Open tinyFixture
                    use vae = HiMar.Runtime.Parity.VaeParityCases.Build fixture
                    let warnings = ResizeArray<string>()
                    let out = Path.Combine(dir, "cache")

                    let manifest =
                        LatentCache.Build(folder, vae, out, 2, warn = Action<string>(fun w -> warnings.Add w))

                    Expect.equal ((nonNull manifest.["count"]).GetValue<int>()) 3 "three readable images"
                    Expect.equal warnings.Count 1 "one warning"
                    Expect.stringContains warnings.[0] "broken.png: skipped, cannot be decoded" "names the file"
                    use cache = LatentCache.Open out
                    cache.CheckVae vae

                    let config =
                        { tinyConfig with
                            Backbone.ImageSize = 64
                            Backbone.VaeStride = 16
                            Pivots.GridSide = 2
                        }

                    cache.CheckFits config
                    let struct (tokens, pivots) = cache.Batch([| 0; 2 |], [| false; true |])

                    Expect.equal
                        (shapeOf tokens, shapeOf pivots)
                        ([ 2L; 16L; 16L ], [ 2L; 4L; 16L ])
                        "4x4 tokens, 2x2 pivots"

                    let e = catchT<InvalidDataException> (fun () -> cache.CheckFits tinyConfig)
                    Expect.stringContains e.Message "cache.json: this cache does not match the model" "message"
                    Expect.stringContains e.Message "the dense grid is 4x4, the model's 8x8" "names the mismatch"
                    use t = new Trainer(config, cache, null, options (Path.Combine(dir, "run")) 2)
                    t.Run()
                    Expect.equal t.Step 2 "trained on the cache")
            }
        ]
