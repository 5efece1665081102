/// Tests of src/HiMar.Model/Inception.fs and src/HiMar.Runtime/Evaluation/Inception.cs: the FID Inception
/// network's layout against the published weights file, its resizing, loading (safetensors and legacy .pth),
/// and FID / IS / precision-recall end to end on tiny synthetic images with random weights.
module HiMar.Tests.InceptionTests

open System
open System.IO
open Expecto
open SixLabors.ImageSharp
open SixLabors.ImageSharp.PixelFormats
open TorchSharp
open HiMar.Model
open HiMar.Runtime.Checkpoints
open HiMar.Runtime.Evaluation
open HiMar.Tests.TestUtil

/// The top-level modules of torchvision's Inception3 without its auxiliary head, in registration order.
let private topLevel =
    [
        "Conv2d_1a_3x3"
        "Conv2d_2a_3x3"
        "Conv2d_2b_3x3"
        "Conv2d_3b_1x1"
        "Conv2d_4a_3x3"
        "Mixed_5b"
        "Mixed_5c"
        "Mixed_5d"
        "Mixed_6a"
        "Mixed_6b"
        "Mixed_6c"
        "Mixed_6d"
        "Mixed_6e"
        "Mixed_7a"
        "Mixed_7b"
        "Mixed_7c"
        "fc"
    ]

/// A random network whose activations keep their scale through the 94 convolutions (He-normal kernels, BatchNorm
/// statistics and affine terms near identity), so features and logits are O(1) and differ between images.
let private randomInception (inputSize: int64) (seed: int64) =
    torch.manual_seed seed |> ignore
    let m = new InceptionV3(inputSize)

    do
        use _ = torch.no_grad ()

        for struct (name, t) in m.named_parameters () do
            if name.EndsWith "conv.weight" then
                torch.nn.init.kaiming_normal_ t |> ignore
            elif name.EndsWith "bn.weight" then
                use r = torch.randn_like t
                t.copy_ (r * 0.1 + 1.0) |> ignore
            elif name.EndsWith "bn.bias" || name = "fc.bias" then
                use r = torch.randn_like t
                t.copy_ (r * 0.1) |> ignore
            elif name = "fc.weight" then
                use r = torch.randn_like t
                t.copy_ (r * 0.05) |> ignore

        for struct (name, b) in m.named_buffers () do
            if name.EndsWith "running_mean" then
                use r = torch.randn_like b
                b.copy_ (r * 0.1) |> ignore
            elif name.EndsWith "running_var" then
                use r = torch.rand_like b
                b.copy_ (r + 0.5) |> ignore

    m.eval ()
    m

/// The state dict as (name, tensor) pairs, optionally without the BatchNorm step counters.
let private entries (m: torch.nn.Module) (withCounters: bool) =
    [
        for KeyValue(k, t) in Weights.stateDict m do
            if withCounters || not (k.EndsWith ".num_batches_tracked") then
                k, t
    ]

/// Asserts that two models hold equal tensors under every key of the first.
let private expectSameWeights (expected: torch.nn.Module) (actual: torch.nn.Module) =
    let a = Weights.stateDict actual

    for KeyValue(k, t) in Weights.stateDict expected do
        Expect.isTrue (a.ContainsKey k) $"{k} loaded"
        Expect.equal (maxAbsDiff a.[k] t) 0.0 k

/// Writes `count` small RGB PNGs (sizes and colours vary with the seed; every fifth one grey) into `dir`.
let private writeImages (dir: string) (count: int) (seed: int) =
    Directory.CreateDirectory dir |> ignore
    let rng = Random seed

    for i in 0 .. count - 1 do
        let w, h = 24 + rng.Next 24, 24 + rng.Next 24
        let tint = [| rng.Next 256; rng.Next 256; rng.Next 256 |]
        let path = Path.Combine(dir, sprintf "%03d.png" i)

        if i % 5 = 4 then
            use img = new Image<L8>(w, h)

            for y in 0 .. h - 1 do
                for x in 0 .. w - 1 do
                    img.[x, y] <- L8(byte ((x * 255 / w + rng.Next 64) % 256))

            img.SaveAsPng path
        else
            use img = new Image<Rgb24>(w, h)

            for y in 0 .. h - 1 do
                for x in 0 .. w - 1 do
                    let c k =
                        byte ((tint.[k] + (if k = 0 then x * 4 else y * 3) + rng.Next 40) % 256)

                    img.[x, y] <- Rgb24(c 0, c 1, c 2)

            img.SaveAsPng path

let private ioError (f: unit -> unit) =
    (catchT<CheckpointFormatException> f).Message

/// A metric of an ImageNet evaluation report; NaN where it is null.
let private metric (r: ImageNetEvalResult) (k: string) =
    match (nonNull r.Report.["metrics"]).[k] with
    | null -> nan
    | v -> v.GetValue<float>()

/// Random 75-pixel Inception weights as safetensors and two folders of 12 synthetic images: (weights, images, other).
let private endToEndFiles (dir: string) =
    use src = randomInception 75L 8L
    let weights = Path.Combine(dir, "inception.safetensors")
    ModelFiles.Save(src, weights)
    let images = Path.Combine(dir, "samples")
    writeImages images 12 9
    let other = Path.Combine(dir, "other")
    writeImages other 12 10
    weights, images, other

let tests =
    testList
        "Inception"
        [
            test "the FID network has the published file's 566 keys, torchvision's layout and 23,850,960 parameters" {
                use m = Anatomy.onMeta (fun () -> new InceptionV3())
                let sd = Weights.stateDict m
                // 94 BasicConv2d x (conv.weight + bn.{weight, bias, running_mean, running_var, num_batches_tracked}) + fc.{weight, bias}
                Expect.equal sd.Count (94 * 6 + 2) "state dict entries"

                Expect.equal
                    [ for struct (n, _) in m.named_children () -> n ]
                    topLevel
                    "top-level modules, in the reference's order"

                let shape k = shapeOf sd.[k]
                Expect.equal (shape "Conv2d_1a_3x3.conv.weight") [ 32L; 3L; 3L; 3L ] "stem conv"
                Expect.equal (shape "Conv2d_1a_3x3.bn.running_var") [ 32L ] "stem bn"
                Expect.equal (shape "Conv2d_1a_3x3.bn.num_batches_tracked") [] "step counter, a scalar"
                Expect.equal (shape "Mixed_5b.branch_pool.conv.weight") [ 32L; 192L; 1L; 1L ] "A pool_features 32"
                Expect.equal (shape "Mixed_5d.branch5x5_2.conv.weight") [ 64L; 48L; 5L; 5L ] "A 5x5"
                Expect.equal (shape "Mixed_6a.branch3x3.conv.weight") [ 384L; 288L; 3L; 3L ] "B"
                Expect.equal (shape "Mixed_6b.branch7x7_2.conv.weight") [ 128L; 128L; 1L; 7L ] "C 1x7"
                Expect.equal (shape "Mixed_6e.branch7x7dbl_4.conv.weight") [ 192L; 192L; 7L; 1L ] "C 7x1"
                Expect.equal (shape "Mixed_7a.branch7x7x3_4.conv.weight") [ 192L; 192L; 3L; 3L ] "D"
                Expect.equal (shape "Mixed_7b.branch3x3dbl_1.conv.weight") [ 448L; 1280L; 1L; 1L ] "E_1"
                Expect.equal (shape "Mixed_7c.branch3x3dbl_3b.conv.weight") [ 384L; 384L; 3L; 1L ] "E_2 3x1"
                Expect.equal (shape "Mixed_7c.branch_pool.bn.running_mean") [ 192L ] "E_2 pool"
                Expect.equal (shape "fc.weight") [ 1008L; 2048L ] "1008-way fc"
                Expect.equal (shape "fc.bias") [ 1008L ] "fc bias"

                Expect.isFalse
                    (sd.Keys
                     |> Seq.exists (fun k -> k.Contains "AuxLogits" || k.Contains "conv.bias"))
                    "no aux head, bias-free convolutions"
                // torchvision's inception_v3 has 27,161,264; less its AuxLogits (3,326,696), plus 8 more fc classes (8 x 2049).
                Expect.equal (Weights.parameterCount m) 23_850_960L "parameters"
            }

            test "two 64x64 images give 2048-d features and 1008 score logits at the full 299x299 input size" {
                use m = randomInception 299L 1L
                use _ = torch.no_grad ()
                torch.manual_seed 2L |> ignore
                use x = torch.rand (2L, 3L, 64L, 64L)
                use f = m.Features x
                use score = m.ScoreLogits f
                Expect.equal (shapeOf f) [ 2L; 2048L ] "features"
                Expect.equal (shapeOf score) [ 2L; 1008L ] "score logits"
                Expect.isTrue (f.isfinite().all().item<bool> ()) "finite features"
                Expect.isGreaterThan (f.std().item<float32> ()) 1e-3f "features vary"
                use d = (f.[0] - f.[1]).abs().max ()
                Expect.isGreaterThan (d.item<float32> ()) 1e-4f "different images, different features"
            }

            test "resizing is bilinear with half-pixel centres (align_corners=False) and leaves 299x299 input alone" {
                // One row [0, 1] widened to 4: sources at -0.25, 0.25, 0.75, 1.25 -> 0, 0.25, 0.75, 1.
                use ramp = torch.tensor([| 0.0f; 1.0f; 0.0f; 1.0f |]).reshape (1L, 1L, 2L, 2L)
                use wide = InceptionV3.Resize(ramp, 4L)
                Expect.equal (shapeOf wide) [ 1L; 1L; 4L; 4L ] "size"

                Expect.sequenceEqual
                    (wide.[0L, 0L, 1L].data<float32>().ToArray())
                    [| 0.0f; 0.25f; 0.75f; 1.0f |]
                    "half-pixel bilinear row (align_corners=True would give 1/3, 2/3)"

                use flat = torch.full ([| 1L; 3L; 37L; 53L |], scalar 0.3)
                use big = InceptionV3.Resize(flat, 299L)
                Expect.equal (shapeOf big) [ 1L; 3L; 299L; 299L ] "to 299"

                Expect.isLessThan
                    (maxAbsDiff big (torch.full ([| 1L; 3L; 299L; 299L |], scalar 0.3)))
                    1e-6
                    "constant stays constant"

                use same = InceptionV3.Resize(big, 299L)
                Expect.equal (maxAbsDiff same big) 0.0 "already 299: unchanged"
            }

            test "the network resizes its input itself, and its logits are the score logits plus the fc bias" {
                use m = randomInception 75L 3L
                use _ = torch.no_grad ()
                torch.manual_seed 4L |> ignore
                use x = torch.rand (1L, 3L, 40L, 40L)
                use pre = InceptionV3.Resize(x, 75L)
                use a = m.Features x
                use logits = m.call pre
                Expect.equal (shapeOf logits) [ 1L; 1008L ] "logits"
                use score = m.ScoreLogits a
                use withBias = score + Weights.stateDict(m).["fc.bias"]
                // Features of the 40x40 image (resized inside) reproduce the logits of the pre-resized one.
                Expect.isLessThan (maxAbsDiff withBias logits) 1e-4 "logits = score logits + fc.bias"
            }

            test "weights load from safetensors and from a legacy-format .pth, with or without the step counters" {
                withTempDir (fun dir ->
                    use src = randomInception 75L 5L
                    let st = Path.Combine(dir, "inception.safetensors")
                    ModelFiles.Save(src, st)
                    use a = InceptionWeights.Load(st, 75L)
                    expectSameWeights src a
                    Expect.isFalse a.training "eval mode"

                    let pth = Path.Combine(dir, "pt_inception.pth")
                    LegacyPth.write pth (entries src false)
                    use b = InceptionWeights.Load(pth, 75L)
                    expectSameWeights src b

                    let noCounters = Path.Combine(dir, "no-counters.safetensors")
                    SafeTensors.Save(noCounters, readOnlyDict (entries src false))
                    use c = InceptionWeights.Load(noCounters, 75L)
                    expectSameWeights src c)
            }

            test "a missing, foreign or mismatched weights file is one error naming the file" {
                withTempDir (fun dir ->
                    let missing = Path.Combine(dir, "absent.pth")

                    Expect.stringStarts
                        (ioError (fun () -> InceptionWeights.Load missing |> ignore))
                        $"{missing}: cannot be read ("
                        "missing"

                    let text = Path.Combine(dir, "notes.pth")
                    File.WriteAllText(text, "not weights at all\n")

                    Expect.equal
                        (ioError (fun () -> InceptionWeights.Load text |> ignore))
                        $"{text}: not a torch.save checkpoint (neither a zip archive nor the legacy pickle stream of PyTorch before 1.6)."
                        "text"

                    use small = randomInception 75L 6L

                    let wrong =
                        entries small true
                        |> List.filter (fun (k, _) -> k <> "Mixed_6c.branch7x7_1.conv.weight")
                        |> List.map (fun (k, t) ->
                            if k = "fc.weight" then
                                k, t.narrow (0L, 0L, 1000L)
                            else
                                k, t)

                    let st = Path.Combine(dir, "wrong.safetensors")
                    SafeTensors.Save(st, readOnlyDict wrong)
                    let message = ioError (fun () -> InceptionWeights.Load(st, 75L) |> ignore)
                    Expect.stringStarts message $"{st}: the weights do not fit the model: " "names the file"
                    Expect.stringContains message "1 missing: Mixed_6c.branch7x7_1.conv.weight" "missing key"

                    Expect.stringContains
                        message
                        "fc.weight (model [1008, 2048], file [1000, 2048])"
                        "mismatched shape")
            }

            test "an image folder that is missing, empty or holds a broken image fails naming it" {
                withTempDir (fun dir ->
                    let absent = Path.Combine(dir, "absent")

                    let e1 =
                        catchT<DirectoryNotFoundException> (fun () -> InceptionFeatures.ListImages absent |> ignore)

                    Expect.equal e1.Message $"{absent}: no such folder of images." "missing folder"
                    let empty = Path.Combine(dir, "empty")
                    Directory.CreateDirectory empty |> ignore
                    File.WriteAllText(Path.Combine(empty, "readme.txt"), "no images")

                    let e2 =
                        catchT<InvalidDataException> (fun () -> InceptionFeatures.ListImages empty |> ignore)

                    Expect.stringStarts e2.Message $"{empty}: no images (.png, .jpg" "empty folder"
                    let broken = Path.Combine(dir, "broken.png")
                    File.WriteAllText(broken, "not a png")

                    let e3 =
                        catchT<HiMar.Runtime.BadInputException> (fun () ->
                            InceptionFeatures.ReadImage broken |> ignore)

                    Expect.equal
                        e3.Message
                        $"{broken}: not a readable image (unknown or unsupported format)."
                        "broken image")
            }

            test "images read as RGB in [0, 1], grey ones with three equal channels" {
                withTempDir (fun dir ->
                    writeImages dir 5 7
                    use rgb = InceptionFeatures.ReadImage(Path.Combine(dir, "000.png"))
                    use grey = InceptionFeatures.ReadImage(Path.Combine(dir, "004.png"))
                    Expect.equal rgb.shape.[1] 3L "three channels"

                    Expect.isTrue
                        (rgb.min().item<float32> () >= 0.0f && rgb.max().item<float32> () <= 1.0f)
                        "in [0, 1]"

                    Expect.equal (maxAbsDiff (grey.narrow (1L, 0L, 1L)) (grey.narrow (1L, 2L, 1L))) 0.0 "grey: R = B"
                    use img = Image.Load<Rgb24>(Path.Combine(dir, "000.png"))
                    let p = img.[0, 0]

                    Expect.floatClose
                        Accuracy.high
                        (float (rgb.[0L, 0L, 0L, 0L].item<float32> ()))
                        (float p.R / 255.0)
                        "R / 255")
            }

            test "end to end: reference statistics, then FID of a set against them is 0 and IS lies in (1, n/splits]" {
                withTempDir (fun dir ->
                    let weights, images, other = endToEndFiles dir
                    use m = InceptionWeights.Load(weights, 75L)
                    let statsPath = Path.Combine(dir, "ref.npz")
                    let mutable calls = 0

                    use stats =
                        ImageNetEval.WriteStats(
                            m,
                            images,
                            statsPath,
                            batch = 5,
                            progress = fun _ _ -> calls <- calls + 1
                        )

                    Expect.equal calls 3 "three batches of at most 5"
                    Expect.equal (shapeOf stats.Mu) [ 2048L ] "mu"
                    Expect.equal (shapeOf stats.Sigma) [ 2048L; 2048L ] "sigma"
                    use back = Metrics.ReadNpz statsPath
                    Expect.equal (maxAbsDiff back.Sigma stats.Sigma) 0.0 "written as computed"
                    use otherStats = ImageNetEval.WriteStats(m, other, Path.Combine(dir, "other.npz"))
                    Expect.isGreaterThan (maxAbsDiff otherStats.Mu stats.Mu) 1e-3 "other images, other statistics"

                    let r =
                        ImageNetEval.Run(m, weights, images, statsPath, null, Path.Combine(dir, "eval"), batch = 6)
                    // 12 samples in 2048 dimensions: a rank-11 covariance, whose ~2000 zero eigenvalues leave float64
                    // rounding of about 1e-6 of the total variance in the square root's trace.
                    let scale = stats.Sigma.trace().item<float> ()
                    Expect.isLessThan (abs (metric r "fid") / scale) 1e-5 "FID(set, its own statistics) = 0"
                    let isMean = metric r "inception_score"
                    // 10 splits of one or two images: exp(mutual information) between 1 and 2.
                    Expect.isTrue (isMean > 1.0 && isMean <= 2.0 + 1e-9) (sprintf "IS %g in (1, 2]" isMean)
                    Expect.isTrue (Double.IsNaN(metric r "precision")) "no PR from statistics alone"
                    let json = File.ReadAllText(Path.Combine(dir, "eval", "eval.json"))

                    for key in
                        [
                            "fid"
                            "inception_score"
                            "precision"
                            "inception_weights_hash"
                            "is_splits"
                            "resize"
                        ] do
                        Expect.stringContains json (sprintf "\"%s\"" key) key)
            }

            test "end to end with reference images: precision and recall of a set against itself are 1, FID 0" {
                withTempDir (fun dir ->
                    let weights, images, _ = endToEndFiles dir
                    use m = InceptionWeights.Load(weights, 75L)

                    let r =
                        ImageNetEval.Run(m, weights, images, null, images, Path.Combine(dir, "self"), batch = 6)

                    Expect.equal (metric r "precision", metric r "recall") (1.0, 1.0) "PR of a set against itself"
                    // The same seeds as above: a total variance of about 12, so 1e-3 is a relative 1e-4.
                    Expect.isLessThan (abs (metric r "fid")) 1e-3 "FID(set, its own images) = 0"
                    Expect.isGreaterThan (metric r "inception_score") 1.0 "IS"

                    Expect.equal
                        ((nonNull (nonNull r.Report.["reference"]).["images"]).GetValue<int>())
                        12
                        "reference count")
            }

            test "statistics of another feature size are refused before scoring, naming the file" {
                withTempDir (fun dir ->
                    use m = randomInception 75L 11L
                    let weights = Path.Combine(dir, "w.safetensors")
                    ModelFiles.Save(m, weights)
                    let images = Path.Combine(dir, "samples")
                    writeImages images 4 12
                    let statsPath = Path.Combine(dir, "fmnist.npz")

                    use s =
                        new FeatureStats(
                            torch.zeros (128L, dtype = torch.float64),
                            torch.eye (128L, dtype = torch.float64)
                        )

                    Metrics.WriteNpz(s, statsPath)

                    let e =
                        catchT<InvalidDataException> (fun () ->
                            ImageNetEval.Run(
                                m,
                                weights,
                                images,
                                statsPath,
                                null,
                                Path.Combine(dir, "eval"),
                                batch = 4
                            )
                            |> ignore)

                    Expect.stringStarts e.Message $"{statsPath}: statistics of shape mu [128]" "names the file"
                    Expect.stringContains e.Message "2048-d" "says what was expected")
            }
        ]
