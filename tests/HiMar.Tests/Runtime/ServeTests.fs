/// Tests of src/HiMar.Runtime/Serving (`himar serve`): the settings' checks, the queue, the sampler's step reports and
/// the explanation strips' marks, and the HTTP API (server-sent frames, 400 and 503 answers, cancellation).
module HiMar.Tests.ServeTests

open System
open System.Collections.Generic
open System.IO
open System.Net
open System.Net.Http
open System.Threading
open System.Threading.Tasks
open Expecto
open TorchSharp
open HiMar.Runtime
open HiMar.Runtime.Sampling
open HiMar.Runtime.Serving
open HiMar.Tests.TestUtil

/// The shipped fashion model (models/fashion), loaded once for the lists that need it.
let fashion =
    lazy (ServedModel.Load("fashion", Path.Combine(repoRoot, "models", "fashion"), null, null, torch.CPU, waiting = 0))

let private query (pairs: (string * string) list) =
    Dictionary<string, string>(dict pairs) :> IReadOnlyDictionary<string, string>

let private parseError pairs =
    (catchT<BadInputException> (fun () -> fashion.Force().Parse(query pairs) |> ignore)).Message

/// Few steps of each phase and few diffusion steps: a fraction of a second on the fashion model.
let quick =
    [ "class", "7"; "steps1", "3"; "steps2", "2"; "head_steps", "5"; "seed", "3" ]

/// The events of a server-sent-events body: (event name, data) in order.
let parseEvents (body: string) =
    [
        for block in body.Split("\n\n", StringSplitOptions.RemoveEmptyEntries) do
            let lines = block.Split '\n'

            let name =
                lines
                |> Array.tryPick (fun l -> if l.StartsWith "event: " then Some(l.Substring 7) else None)

            let data =
                lines
                |> Array.tryPick (fun l -> if l.StartsWith "data: " then Some(l.Substring 6) else None)

            match name, data with
            | Some n, Some d -> n, Text.Json.JsonDocument.Parse(d).RootElement
            | _ -> ()
    ]

let private url (server: DemoServer) (pairs: (string * string) list) =
    let q =
        pairs
        |> List.map (fun (k, v) -> k + "=" + Uri.EscapeDataString v)
        |> String.concat "&"

    Uri(server.Address, "api/generate?" + q)

let private withServer (f: DemoServer -> HttpClient -> unit) =
    let server =
        DemoServer.StartAsync([ fashion.Force() ], "127.0.0.1", 0).GetAwaiter().GetResult()

    use client = new HttpClient(Timeout = TimeSpan.FromSeconds 120.0)

    try
        f server client
    finally
        server.DisposeAsync().AsTask().GetAwaiter().GetResult()

/// A place in a queue that must have one.
let private enter (q: GenerationQueue) =
    match q.TryEnter() with
    | null -> failtest "the queue refused a place"
    | t -> t

/// Waits (at most `seconds`) for a condition, polling.
let private eventually seconds (condition: unit -> bool) =
    let sw = Diagnostics.Stopwatch.StartNew()

    while not (condition ()) && sw.Elapsed.TotalSeconds < seconds do
        Thread.Sleep 20

    condition ()

let tests =
    testList
        "Serve"
        [
            testList
                "settings"
                [
                    test "a request without parameters takes the model folder's sampling.json" {
                        let s = fashion.Force().Parse(query [])

                        use shipped =
                            Text.Json.JsonDocument.Parse(
                                File.ReadAllText(Path.Combine(repoRoot, "models", "fashion", "sampling.json"))
                            )

                        let number (name: string) =
                            shipped.RootElement.GetProperty(name).GetDouble()

                        Expect.equal
                            (s.Guidance1, s.Guidance2, s.Temperature)
                            (number "re_cfg", number "cfg", number "temperature")
                            "sampling.json"

                        Expect.equal (s.Steps1, s.Steps2, s.Label) (16, int (number "num_iter"), 0L) "steps and class"
                    }

                    test "fashion-mar is served with its sampling.json's 32 phase-2 steps, under the cap" {
                        use mar =
                            ServedModel.Load(
                                "fashion-mar",
                                Path.Combine(repoRoot, "models", "fashion-mar"),
                                null,
                                null,
                                torch.CPU,
                                waiting = 0
                            )

                        let s = mar.Parse(query [])
                        Expect.equal (s.Steps2, s.Guidance2) (32, 7.0) "steps and guidance of sampling.json"
                        Expect.equal (mar.Parse(query [ "steps2", "32" ])).Steps2 32 "32 asked for"
                    }

                    test "a class is taken by number or by name" {
                        Expect.equal (fashion.Force().Parse(query [ "class", "sneaker" ])).Label 7L "name"
                        Expect.equal (fashion.Force().Parse(query [ "class", "Ankle Boot" ])).Label 9L "name, any case"
                        Expect.equal (fashion.Force().Parse(query [ "class", "3" ])).Label 3L "number"
                    }

                    test "NaN, infinite and unparsable numbers are refused, naming the parameter" {
                        Expect.equal
                            (parseError [ "guidance1", "NaN" ])
                            "guidance1: 'NaN' is not a finite number."
                            "NaN"

                        Expect.equal
                            (parseError [ "temperature", "Infinity" ])
                            "temperature: 'Infinity' is not a finite number."
                            "Infinity"

                        Expect.equal (parseError [ "steps2", "2.5" ]) "steps2: '2.5' is not a whole number." "fraction"
                    }

                    test "negative and zero values are refused with the bound" {
                        Expect.equal
                            (parseError [ "temperature", "0" ])
                            "temperature: 0 is too small; it must be above 0."
                            "zero temperature"

                        Expect.equal
                            (parseError [ "seed", "-1" ])
                            "seed: -1 is too small; it must be at least 0."
                            "negative seed"

                        Expect.equal
                            (parseError [ "guidance2", "-3" ])
                            "guidance2: -3 is too small; it must be at least 1."
                            "negative guidance"
                    }

                    test "steps above the stated caps are refused with the cap" {
                        Expect.equal
                            (parseError [ "steps1", "17" ])
                            "steps1: 17 is above the cap of 16 (one pivot per step: the model has 16 pivots)."
                            "phase 1"

                        Expect.equal (parseError [ "steps2", "33" ]) "steps2: 33 is above the cap of 32." "phase 2"

                        Expect.equal
                            (parseError [ "head_steps", "1000" ])
                            "head_steps: 1000 is above the cap of 100."
                            "head"

                        Expect.equal
                            (parseError [ "guidance1", "11" ])
                            "guidance1: 11 is above the cap of 10."
                            "guidance"
                    }

                    test "an unknown class, a prompt for a class model and an unknown parameter are refused" {
                        Expect.equal
                            (parseError [ "class", "zebra" ])
                            "class: 'zebra' is not a class of this model (0..9, or a name such as sneaker)."
                            "class"

                        Expect.equal
                            (parseError [ "class", "10" ])
                            "class: '10' is not a class of this model (0..9, or a name such as sneaker)."
                            "label 10 is the null class"

                        Expect.stringStarts
                            (parseError [ "prompt", "a sandal" ])
                            "prompt: the model 'fashion' is conditioned on class labels"
                            "prompt"

                        Expect.stringStarts
                            (parseError [ "file", "/etc/passwd" ])
                            "unknown parameter 'file' (known: model, class, prompt,"
                            "parameter"
                    }
                ]

            testList
                "queue"
                [
                    test "a queue of one running and one waiting refuses a third and takes one again after a release" {
                        let q = GenerationQueue 1
                        use _a = enter q
                        let b = enter q
                        Expect.isNull (q.TryEnter()) "third is refused"
                        Expect.equal q.Pending 2 "pending"
                        b.Dispose()
                        b.Dispose()
                        Expect.equal q.Pending 1 "released once"
                        use _c = enter q
                        Expect.equal q.Pending 2 "a place again"
                    }

                    test "jobs run one at a time, and a job cancelled while waiting never starts" {
                        let q = GenerationQueue 2
                        use a = enter q
                        use b = enter q
                        use release = new ManualResetEventSlim false
                        let mutable running = 0
                        let mutable most = 0
                        let mutable bStarted = false

                        let work () =
                            let now = Interlocked.Increment &running
                            most <- max most now
                            release.Wait()
                            Interlocked.Decrement &running |> ignore
                            1

                        let first = a.RunAsync(work, CancellationToken.None)
                        Expect.isTrue (eventually 5.0 (fun () -> running = 1)) "the first job runs"
                        use cts = new CancellationTokenSource()

                        let second =
                            b.RunAsync(
                                (fun () ->
                                    bStarted <- true
                                    2),
                                cts.Token
                            )

                        cts.Cancel()

                        Expect.throwsT<OperationCanceledException>
                            (fun () -> second.GetAwaiter().GetResult() |> ignore)
                            "the waiting job is cancelled"

                        release.Set()
                        Expect.equal (first.GetAwaiter().GetResult()) 1 "the first job's result"
                        Expect.isFalse bStarted "the cancelled job never ran"
                        Expect.equal most 1 "one at a time"
                        Expect.equal (q.Completed, q.Cancelled) (1, 1) "counts"
                    }
                ]

            testList
                "steps"
                [
                    test "the sampler reports every step, and the pivots decided in phase 1 cover the grid once" {
                        let m = fashion.Force()
                        let steps = ResizeArray<int * int * int64 * int64>()
                        let cover = Array.zeroCreate<int> 16

                        let options =
                            SamplerOptions(
                                Phase1Steps = Nullable 5,
                                Phase2Steps = 3,
                                Cfg = 2.0,
                                ReCfg = 2.0,
                                MlpHeadSteps = "4",
                                DitHeadSteps = "4",
                                OnStep =
                                    Action<SamplerStep>(fun st ->
                                        steps.Add(
                                            st.Phase,
                                            st.Step,
                                            st.Decided.sum().item<int64> (),
                                            st.Known.sum().item<int64> ()
                                        )

                                        if st.Phase = 1 then
                                            Expect.equal (shapeOf st.Decided) [ 1L; 4L; 4L ] "pivot grid"

                                            st.Decided.flatten().data<bool>().ToArray()
                                            |> Array.iteri (fun i d ->
                                                if d then
                                                    cover.[i] <- cover.[i] + 1)
                                        else
                                            Expect.equal (shapeOf st.Decided) [ 1L; 8L; 8L ] "dense grid")
                            )

                        use noise = new SeededNoise(1L, 0L, 1)
                        use labels = torch.tensor [| 7L |]
                        use _ = HiMarSampler.Sample(m.Model, labels, noise, options)

                        Expect.equal
                            (steps |> Seq.map (fun (p, s, _, _) -> p, s) |> List.ofSeq)
                            ([ for s in 0..4 -> 1, s ] @ [ for s in 0..2 -> 2, s ])
                            "phases and steps"

                        Expect.equal cover (Array.create 16 1) "each pivot decided at exactly one step"
                        let p1 = steps |> Seq.filter (fun (p, _, _, _) -> p = 1) |> List.ofSeq
                        let p2 = steps |> Seq.filter (fun (p, _, _, _) -> p = 2) |> List.ofSeq

                        Expect.equal
                            (p1 |> List.map (fun (_, _, _, k) -> k) |> List.last)
                            16L
                            "every pivot known after phase 1"

                        Expect.equal
                            (p2 |> List.sumBy (fun (_, _, d, _) -> d))
                            64L
                            "the dense tokens decided add up to the grid"

                        Expect.equal
                            (p2 |> List.map (fun (_, _, _, k) -> k) |> List.last)
                            64L
                            "every dense token known at the end"
                    }

                    test "explanation strips show every step of both phases with the decided tokens outlined" {
                        withTempDir (fun dir ->
                            let m = fashion.Force()

                            let request =
                                SampleRequest(
                                    Labels = ResizeArray [ 7L ],
                                    OutDir = dir,
                                    Explain = true,
                                    Options =
                                        SamplerOptions(
                                            Phase1Steps = Nullable 4,
                                            Phase2Steps = 2,
                                            MlpHeadSteps = "4",
                                            DitHeadSteps = "4",
                                            ClipDenoised = true
                                        )
                                )

                            let output = SampleJob.Run(m.Model, m.Tokenizer, request)
                            Expect.equal output.Explanations.Count 1 "one strip"

                            use strip =
                                SixLabors.ImageSharp.Image.Load<SixLabors.ImageSharp.PixelFormats.Rgb24>(
                                    output.Explanations.[0]
                                )

                            // 4 columns of 128-pixel tiles with 4-pixel gaps; two rows (phase 1, phase 2) with captions.
                            Expect.equal strip.Width (4 * 132 + 4) "four columns"
                            Expect.equal strip.Height (2 * (128 + 9 + 4) + 4) "two rows"
                            let c = SampleJob.DecidedColor

                            let row (y0: int) =
                                [
                                    for y in y0 .. y0 + 127 do
                                        for x in 0 .. strip.Width - 1 -> strip.[x, y]
                                ]
                                |> List.filter ((=) c)
                                |> List.length

                            Expect.isGreaterThan (row 4) 100 "phase-1 tiles have outlined pivots"
                            Expect.isGreaterThan (row (4 + 141)) 100 "phase-2 tiles have outlined dense tokens")
                    }
                ]

            testList
                "http"
                [
                    test "a generation streams one frame per step of both phases, then the final image" {
                        withServer (fun server client ->
                            let body = client.GetStringAsync(url server quick).GetAwaiter().GetResult()
                            let events = parseEvents body
                            let frames = events |> List.filter (fst >> (=) "frame") |> List.map snd

                            let phase (p: int) =
                                frames |> List.filter (fun f -> f.GetProperty("phase").GetInt32() = p)

                            Expect.equal (events |> List.map fst |> List.head) "queued" "first event"
                            Expect.equal (events |> List.map fst |> List.last) "done" "last event"
                            Expect.equal (phase 1).Length 3 "phase-1 frames"
                            Expect.equal (phase 2).Length 2 "phase-2 frames"
                            let first = (phase 1).Head
                            Expect.equal (first.GetProperty("grid").GetInt32()) 4 "pivot grid side"
                            Expect.equal (first.GetProperty("cell").GetDouble()) 4.0 "pixels per pivot"
                            Expect.equal (first.GetProperty("offset").GetDouble()) -1.0 "cropped padding"
                            Expect.stringStarts (first.GetProperty("image").GetString()) "data:image/png;base64," "png"
                            let last = (phase 2) |> List.last
                            Expect.equal (last.GetProperty("known").GetArrayLength()) 64 "all dense tokens known"
                            let fin = events |> List.last |> snd

                            let png =
                                Convert.FromBase64String((string (fin.GetProperty("image").GetString())).Substring 22)

                            use img = SixLabors.ImageSharp.Image.Load<SixLabors.ImageSharp.PixelFormats.L8>(png)
                            Expect.equal (img.Width, img.Height) (28, 28) "final image size"

                            let values =
                                [|
                                    for y in 0..27 do
                                        for x in 0..27 -> float img.[x, y].PackedValue
                                |]

                            let mean = Array.average values
                            let sd = sqrt (values |> Array.averageBy (fun v -> (v - mean) ** 2.0))
                            Expect.isGreaterThan sd 20.0 "the final image is not blank")
                    }

                    test "bad settings get 400 with one line naming the parameter" {
                        withServer (fun server client ->
                            let check pairs expected =
                                use r = client.GetAsync(url server pairs).GetAwaiter().GetResult()
                                Expect.equal r.StatusCode HttpStatusCode.BadRequest "status"
                                let text = r.Content.ReadAsStringAsync().GetAwaiter().GetResult()
                                Expect.equal (text.TrimEnd '\n') expected "message"

                            check [ "guidance2", "nan" ] "guidance2: 'nan' is not a finite number."
                            check [ "steps2", "99" ] "steps2: 99 is above the cap of 32."
                            check [ "model", "../../etc" ] "model: '../../etc' is not served here (served: fashion)."

                            check
                                [ "class", "unicorn" ]
                                "class: 'unicorn' is not a class of this model (0..9, or a name such as sneaker).")
                    }

                    test "the page and its assets are served from memory, other paths are 404" {
                        withServer (fun server client ->
                            let get (path: string) =
                                client.GetAsync(Uri(server.Address, path)).GetAwaiter().GetResult()

                            use page = get "/"
                            Expect.equal page.StatusCode HttpStatusCode.OK "page"

                            Expect.stringContains
                                (page.Content.ReadAsStringAsync().Result)
                                "<canvas id=\"view\""
                                "the viewer"

                            use js = get "/app.js"

                            Expect.equal
                                (string js.Content.Headers.ContentType)
                                "text/javascript; charset=utf-8"
                                "script"

                            use models = get "/api/models"

                            let json =
                                Text.Json.JsonDocument.Parse(models.Content.ReadAsStringAsync().Result).RootElement.[0]

                            Expect.equal (json.GetProperty("name").GetString()) "fashion" "model name"

                            let parts =
                                [
                                    for p in json.GetProperty("parts").EnumerateArray() ->
                                        p.GetProperty("key").GetString(), p.GetProperty("parameters").GetInt64()
                                ]

                            Expect.equal
                                (parts |> List.map fst)
                                [
                                    "encoder"
                                    "decoder"
                                    "scale-aware"
                                    "mlp-head"
                                    "transformer-head"
                                    "tokenizer"
                                ]
                                "parts"

                            Expect.equal
                                (parts |> List.sumBy snd)
                                (fashion.Force().Model.parameters () |> Seq.sumBy (fun p -> p.numel ()))
                                "the parts add up to the model"

                            use doc = get "/architecture.md"
                            let md = doc.Content.ReadAsStringAsync().Result

                            for p in json.GetProperty("parts").EnumerateArray() do
                                Expect.stringContains
                                    md
                                    ("\n## " + string (p.GetProperty("title").GetString()))
                                    "each part has its section"

                            use page = get "/architecture.html"
                            let html = page.Content.ReadAsStringAsync().Result
                            Expect.stringContains html "<table>" "the page renders the tables"
                            Expect.stringContains html "<pre><code" "and the diagram as preformatted text"
                            Expect.stringContains html "id=\"mlp-head\"" "with GitHub's heading anchors"

                            use traversal = get "/app.js/../../../etc/passwd"
                            Expect.equal traversal.StatusCode HttpStatusCode.NotFound "no file system"
                            use other = get "/Program.cs"
                            Expect.equal other.StatusCode HttpStatusCode.NotFound "unknown asset")
                    }

                    test "a full queue answers 503, and a client that goes away cancels its job and frees the model" {
                        withServer (fun server client ->
                            let m = fashion.Force()
                            let cancelledBefore = m.Queue.Cancelled
                            let long = [ "class", "1"; "steps1", "16"; "steps2", "16"; "head_steps", "100" ]
                            use cts = new CancellationTokenSource()
                            use request = new HttpRequestMessage(HttpMethod.Get, url server long)

                            let response =
                                client
                                    .SendAsync(request, HttpCompletionOption.ResponseHeadersRead, cts.Token)
                                    .GetAwaiter()
                                    .GetResult()

                            use reader = new StreamReader(response.Content.ReadAsStream())
                            let mutable line = reader.ReadLine()

                            while not (isNull line) && line <> "event: frame" do
                                line <- reader.ReadLine()

                            Expect.equal line "event: frame" "the long job has started"
                            Expect.equal m.Queue.Pending 1 "it holds the only place"
                            use busy = client.GetAsync(url server quick).GetAwaiter().GetResult()
                            Expect.equal busy.StatusCode HttpStatusCode.ServiceUnavailable "full"

                            Expect.equal
                                (busy.Content.ReadAsStringAsync().Result.TrimEnd '\n')
                                "the model 'fashion' is busy: one generation runs and 0 wait; try again in a few seconds."
                                "message"

                            let sw = Diagnostics.Stopwatch.StartNew()
                            cts.Cancel()
                            response.Dispose()
                            Expect.isTrue (eventually 20.0 (fun () -> m.Queue.Pending = 0)) "the place is given back"
                            Expect.equal m.Queue.Cancelled (cancelledBefore + 1) "the job was cancelled, not finished"
                            Expect.isLessThan sw.Elapsed.TotalSeconds 20.0 "promptly"
                            let body = client.GetStringAsync(url server quick).GetAwaiter().GetResult()
                            Expect.equal (parseEvents body |> List.last |> fst) "done" "the model serves again")
                    }
                ]
        ]
