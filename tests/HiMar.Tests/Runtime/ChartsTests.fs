/// Tests of src/HiMar.Runtime/Imaging (Charts, TextFont, grid captions) and of the loss curve and `best`
/// checkpoint of the trainer: PNG sizes, colours where the series are drawn, a real font, the smoothed best loss.
module HiMar.Tests.ChartsTests

open System
open System.IO
open System.Text.Json.Nodes
open Expecto
open SixLabors.ImageSharp
open SixLabors.ImageSharp.PixelFormats
open HiMar.Runtime.Data
open HiMar.Runtime.Imaging
open HiMar.Runtime.Training
open HiMar.Tests.TestUtil

/// Pixels of an image within `tolerance` (per channel) of a colour, as (x, y).
let private pixelsNear (img: Image<Rgb24>) (c: Rgb24) (tolerance: int) =
    [
        for y in 0 .. img.Height - 1 do
            for x in 0 .. img.Width - 1 do
                let p = img.[x, y]

                if
                    abs (int p.R - int c.R) <= tolerance
                    && abs (int p.G - int c.G) <= tolerance
                    && abs (int p.B - int c.B) <= tolerance
                then
                    yield (x, y)
    ]

/// A number field of a JSON object (a missing field fails the test).
let private number (o: JsonNode) (name: string) = (nonNull o.[name]).GetValue<float>()

let private grey (v: byte) (side: int) =
    new Image<Rgb24>(side, side, Rgb24(v, v, v))

/// The caption band of tile 0 of a one-row grid of `side`-pixel tiles (padding 4): its pixels, row-major.
let private band (img: Image<Rgb24>) (side: int) =
    [|
        for y in 4 + side .. 4 + side + Images.CaptionBand(max 1 (side / 96)) - 1 do
            for x in 4 .. 4 + side - 1 -> img.[x, y]
    |]

let tests =
    testList
        "Charts"
        [
            test "SkiaSharp's native library loads and the caption font is DejaVu Sans" {
                TextFont.RequireNative()

                Expect.equal
                    TextFont.FamilyName
                    "DejaVu Sans"
                    "Debian's fonts-dejavu-core, found by the font manager or its path"
            }

            test "a grid caption is written in an anti-aliased font in the band under its tile" {
                use tile = grey 128uy 96
                use grid = Images.Grid([| tile |], [| "sneaker" |], 1)
                Expect.equal (grid.Width, grid.Height) (96 + 8, 96 + 9 + 8) "one tile, a 9-pixel band, padding 4"
                let pixels = band grid 96
                let dark = pixels |> Array.filter (fun p -> p.R < 100uy) |> Array.length

                let mid =
                    pixels |> Array.filter (fun p -> p.R > 100uy && p.R < 230uy) |> Array.length

                Expect.isGreaterThan dark 15 "the letters' strokes"
                Expect.isGreaterThan mid 10 "anti-aliased edges (the pixel font had none)"
                let blank = pixels |> Array.filter (fun p -> p.R = 255uy) |> Array.length
                Expect.isGreaterThan blank (pixels.Length / 2) "white around the text"
            }

            test "grids are the same tiles and layout whatever the captions say" {
                use a = grey 40uy 96
                use b = grey 200uy 96
                use one = Images.Grid([| a; b |], [| "t-shirt/top"; "bag" |], 2)
                use other = Images.Grid([| a; b |], [| "ankle boot"; "class 9" |], 2)
                use none = Images.Grid([| a; b |], null, 2)
                Expect.equal (one.Width, one.Height) (other.Width, other.Height) "same size"
                Expect.equal (none.Width, none.Height) (2 * 100 + 4, 96 + 8) "no captions: no band"

                for (x, y) in [ (4, 4); (99, 99); (104, 4); (199, 99) ] do
                    Expect.equal one.[x, y] other.[x, y] $"tile pixel ({x}, {y})"
                    Expect.equal one.[x, y] none.[x, y] $"tile pixel ({x}, {y}) without captions"

                Expect.notEqual (band one 96) (band other 96) "different captions differ in the band"
            }

            test "a line chart has the requested size and each series its palette colour" {
                withTempDir (fun dir ->
                    let path = Path.Combine(dir, "lines.png")

                    let series =
                        [|
                            LineSeries("low", [| for s in 0..10 -> struct (float s, 1.0) |])
                            LineSeries("high", [| for s in 0..10 -> struct (float s, 3.0) |])
                        |]

                    Charts.SaveLines(path, "t", "training step", "loss", series, false, 500, 300)
                    use img = Image.Load<Rgb24> path
                    Expect.equal (img.Width, img.Height) (500, 300) "size"
                    let blue = pixelsNear img Charts.Palette.[0] 30
                    let orange = pixelsNear img Charts.Palette.[1] 30
                    Expect.isGreaterThan blue.Length 200 "the first series (and its legend swatch) in blue"
                    Expect.isGreaterThan orange.Length 200 "the second series in orange"

                    let medianY (ps: (int * int) list) =
                        ps |> List.map snd |> List.sort |> (fun l -> l.[l.Length / 2])

                    Expect.isLessThan (medianY orange) (medianY blue) "the higher series is drawn above the lower"

                    let e =
                        catchT<ArgumentException> (fun () ->
                            Charts.SaveLines(path, "t", "x", "y", [| LineSeries("e", [||]) |]))

                    Expect.stringContains e.Message "at least one point" "no points is refused")
            }

            test "log-scale ticks are 1, 2 and 5 times powers of ten covering the values" {
                let struct (positions, labels) = Charts.LogTicks(0.3, 4.0)
                Expect.equal labels [| "0.2"; "0.5"; "1"; "2"; "5" |] "round labels"
                Expect.floatClose Accuracy.high positions.[2] 0.0 "1 sits at log10 1 = 0"
            }

            test "a quality chart puts FD in the top panel and accuracy in the bottom one" {
                withTempDir (fun dir ->
                    let path = Path.Combine(dir, "quality.png")

                    let points =
                        [|
                            QualityPoint(1000.0, 120.0, 0.40)
                            QualityPoint(2000.0, 90.0, 0.55)
                            QualityPoint(4000.0, 70.0, 0.61)
                        |]

                    Charts.SaveQuality(path, "quality", points, 600, 500)
                    use img = Image.Load<Rgb24> path
                    Expect.equal (img.Width, img.Height) (600, 500) "size"
                    let blue = pixelsNear img Charts.Palette.[0] 30
                    let orange = pixelsNear img Charts.Palette.[1] 30
                    Expect.isGreaterThan blue.Length 100 "FD drawn"
                    Expect.isGreaterThan orange.Length 100 "accuracy drawn"
                    Expect.isTrue (blue |> List.forall (fun (_, y) -> y < 250)) "FD only in the top half"
                    Expect.isTrue (orange |> List.forall (fun (_, y) -> y >= 250)) "accuracy only in the bottom half")
            }

            test "a run's loss.png shows three curves; best/state.json records the smoothed loss it was judged on" {
                withTempDir (fun dir ->
                    let opts = TrainingTests.options dir 6

                    do
                        use t =
                            new Trainer(
                                TrainingTests.tinyConfig,
                                TrainingTests.SyntheticData(),
                                PixelPatchTokenizer.Fashion,
                                opts
                            )

                        t.Run()

                    use img = Image.Load<Rgb24>(Path.Combine(dir, "loss.png"))
                    Expect.equal (img.Width, img.Height) (720, 400) "loss.png size"

                    for i in 0..2 do
                        Expect.isGreaterThan (pixelsNear img Charts.Palette.[i] 30).Length 20 $"series {i} drawn"

                    // Every step is logged (LogEvery = 1), so the metrics give each step's loss.
                    let losses =
                        File.ReadLines(Path.Combine(dir, "metrics.jsonl"))
                        |> Seq.map (fun l -> number (nonNull (JsonNode.Parse l)) "loss")
                        |> Array.ofSeq

                    Expect.equal losses.Length 6 "six steps"
                    let first = File.ReadLines(Path.Combine(dir, "metrics.jsonl")) |> Seq.head

                    let names =
                        (nonNull (JsonNode.Parse first)).AsObject()
                        |> Seq.map (fun kv -> kv.Key)
                        |> List.ofSeq

                    Expect.equal
                        names
                        [
                            "step"
                            "epoch"
                            "loss"
                            "phase1"
                            "phase2"
                            "lr"
                            "grad_norm"
                            "images_per_s"
                        ]
                        "the metrics line keeps its names and order"

                    let smoothedAt n =
                        let d = SmoothedLoss.Decay
                        let raw = losses.[.. n - 1] |> Array.fold (fun s l -> d * s + (1.0 - d) * l) 0.0
                        raw / (1.0 - Math.Pow(d, float n))

                    let state name =
                        JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "checkpoints", name, "state.json")))
                        |> nonNull

                    let best = state "best"
                    let bestStep = int (number best "step")
                    let compared = number best "smoothed_loss"

                    Expect.floatClose
                        Accuracy.veryHigh
                        compared
                        (smoothedAt bestStep)
                        "the compared value is the EMA of the logged losses"

                    Expect.equal (number best "best_loss") compared "best_loss is the value compared, not a stale one"
                    let expectedBest = min (smoothedAt 3) (smoothedAt 6)

                    Expect.floatClose
                        Accuracy.veryHigh
                        compared
                        expectedBest
                        "best is the lower of the two checkpoints' smoothed losses"

                    let last = state "step-00000006"
                    Expect.equal (number last "best_loss") compared "the last checkpoint knows the best so far")
            }
        ]
