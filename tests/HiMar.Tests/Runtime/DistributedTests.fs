/// Tests of src/HiMar.Runtime/Distributed and of data-parallel training: the row windows that make N ranks of
/// batch B draw what one process of batch N B draws, bucketed gradient averaging, launch detection, and
/// `mpirun -np 2 himar train` against one process of the global batch.
module HiMar.Tests.DistributedTests

open System
open System.Diagnostics
open System.IO
open System.IO.Compression
open System.Text.Json.Nodes
open Expecto
open TorchSharp
open HiMar.Model
open HiMar.Runtime.Distributed
open HiMar.Tests.TestUtil

/// The tiny training model with repeated head rows (diffusion_batch_mul 2), so windows cover several blocks.
let private config =
    { TrainingTests.tinyConfig with
        DiffusionBatchMul = 2
    }

/// A communicator that pretends to be one of two ranks whose partner holds the same values: a sum doubles, and
/// every call is counted with its length.
type private MirrorPair() =
    let calls = ResizeArray<int64>()
    member _.Calls = calls

    interface ICommunicator with
        member _.Rank = 0
        member _.Size = 2
        member _.Backend = "mirror"

        member _.AllReduceSum(values: Span<float32>) =
            calls.Add(int64 values.Length)

            for i in 0 .. values.Length - 1 do
                values.[i] <- values.[i] * 2.0f

        member _.AllReduceSum(values: Span<float>) =
            calls.Add(int64 values.Length)

            for i in 0 .. values.Length - 1 do
                values.[i] <- values.[i] * 2.0

        member _.AllReduceSum(tensor: torch.Tensor) =
            calls.Add tensor.NumberOfElements
            tensor.mul_ (scalar 2.0) |> ignore

        member _.Broadcast(_: Span<byte>, _: int) = ()
        member _.Broadcast(_: torch.Tensor, _: int) = ()
        member _.Barrier() = ()
        member _.IdleBarrier() = ()
        member _.Dispose() = ()

/// The losses of rows `window` of a batch, after seeding torch's generator with `seed`.
let private lossesOf (m: HiMAR) seed (tokens: torch.Tensor) (cond: torch.Tensor) (labels: torch.Tensor) window =
    torch.manual_seed seed |> ignore
    let w: RowWindow = window
    use t = tokens.narrow (0L, w.Offset, w.Count)
    use c = cond.narrow (0L, w.Offset, w.Count)
    use l = labels.narrow (0L, w.Offset, w.Count)
    m.TrainingLosses(t, c, l, 0.5, w)

/// The gradients of every parameter after `f` runs backward, by name.
let private gradients (m: HiMAR) (f: unit -> torch.Tensor) =
    for struct (_, p) in m.named_parameters () do
        match p.grad with
        | null -> ()
        | g -> g.zero_ () |> ignore

    use loss = f ()
    loss.backward ()

    dict
        [
            for struct (n, p) in m.named_parameters () do
                match p.grad with
                | null -> ()
                | g -> n, g.clone ()
        ]

/// The himar executable built beside this test binary (same configuration: bin/Release/net10.0 here).
let private himarDll =
    let dir = Path.TrimEndingDirectorySeparator AppContext.BaseDirectory
    let framework = Path.GetFileName dir |> nonNull
    let configuration = Path.GetFileName(Path.GetDirectoryName dir) |> nonNull
    Path.Combine(repoRoot, "src", "HiMar.Cli", "bin", configuration, framework, "himar.dll")

/// mpirun on PATH (scripts/test and .ci/run install Open MPI when it is missing).
let private mpirun () =
    (Environment.GetEnvironmentVariable "PATH" |> string).Split(':')
    |> Array.map (fun d -> Path.Combine(d, "mpirun"))
    |> Array.tryFind File.Exists
    |> Option.defaultWith (fun () ->
        failtest "mpirun is not installed (apt-get install openmpi-bin libopenmpi-dev; scripts/test does it)")

/// Runs a command with one libtorch thread per process; fails the test with its output unless it exits 0, and
/// returns its standard output (launcher warnings on standard error stay out of the JSON reports).
let private run (exe: string) (args: string list) =
    let psi = ProcessStartInfo(exe, args)
    psi.RedirectStandardOutput <- true
    psi.RedirectStandardError <- true
    psi.Environment.["OMP_NUM_THREADS"] <- "1"
    use p = Process.Start psi |> nonNull
    let out = p.StandardOutput.ReadToEndAsync()
    let err = p.StandardError.ReadToEndAsync()

    if not (p.WaitForExit(TimeSpan.FromMinutes 5.0)) then
        p.Kill true
        failtestf "%s %s did not finish in 5 minutes" exe (String.Join(" ", args))

    if p.ExitCode <> 0 then
        failtestf "%s %s exited %d:\n%s%s" exe (String.Join(" ", args)) p.ExitCode out.Result err.Result

    out.Result

/// `mpirun -np 2 dotnet himar.dll ARGS` (root allowed, 2 slots whatever the core count).
let private mpiHimar (args: string list) =
    run
        (mpirun ())
        ([
            "--allow-run-as-root"
            "--oversubscribe"
            "-np"
            "2"
            "-x"
            "OMP_NUM_THREADS"
            "dotnet"
            himarDll
         ]
         @ args)

let private himar (args: string list) = run "dotnet" (himarDll :: args)

/// The tensors of a safetensors file by name.
let private load (path: string) =
    HiMar.Runtime.Checkpoints.SafeTensors.Load path

/// The worst of max|a - b| / max(max|a|, 1e-3) over the tensors of two weight files, with its tensor's name.
let private worstRelative (a: string) (b: string) =
    let ta, tb = load a, load b
    Expect.equal (Set.ofSeq ta.Keys) (Set.ofSeq tb.Keys) "the same tensors"

    ta.Keys
    |> Seq.map (fun k ->
        use scale = ta.[k].abs().max ()
        k, maxAbsDiff ta.[k] tb.[k] / max 1e-3 (scale.item<float32> () |> float))
    |> Seq.maxBy snd

let private lossesIn (run: string) =
    File.ReadAllLines(Path.Combine(run, "metrics.jsonl"))
    |> Array.map (fun l ->
        (JsonNode.Parse l |> nonNull).["loss"]
        |> nonNull
        |> fun n -> n.GetValue<float>())

let tests =
    testList
        "Distributed"
        [
            test "a window's draw is exactly its rows of the whole batch's draw, block by block" {
                let draw (w: RowWindow) rows =
                    torch.manual_seed 4L |> ignore
                    w.Draw(rows, [| 3L |], fun shape -> torch.randn shape)

                use whole = draw (RowWindow.Whole 8L) 16L // two blocks of 8 rows
                use second = draw { Offset = 4L; Count = 4L; Total = 8L } 8L
                // (2 blocks, 8, 3): this share is rows 4..7 of each block
                use expected = whole.view(2L, 8L, 3L).narrow(1L, 4L, 4L).reshape (8L, 3L)
                Expect.equal (maxAbsDiff second expected) 0.0 "the same numbers"

                let e =
                    catchT<ArgumentException> (fun () -> draw { Offset = 0L; Count = 3L; Total = 6L } 7L |> ignore)

                Expect.stringContains e.Message "7 rows are not whole blocks of this share's 3 rows" "message"
            }

            test "a VAE tokenizer draws its posterior noise for the global batch and keeps the window's rows" {
                use fixture = HiMar.Runtime.Parity.ParityFixture.Open tinyFixture
                use vae = HiMar.Runtime.Parity.VaeParityCases.Build fixture
                let tok = HiMar.Runtime.Data.VaeTokenizer vae :> HiMar.Runtime.Data.ITokenizer
                torch.manual_seed 6L |> ignore
                use images = torch.rand(4L, 3L, 64L, 64L).mul(scalar 2.0).sub (scalar 1.0)
                torch.manual_seed 7L |> ignore
                let struct (wholeTokens, wholePivots) = tok.Encode images
                use wholeTokens = wholeTokens
                use wholePivots = wholePivots
                torch.manual_seed 7L |> ignore
                use last = images.narrow (0L, 2L, 2L)

                let struct (tokens, pivots) =
                    tok.Encode(last, { Offset = 2L; Count = 2L; Total = 4L })

                use tokens = tokens
                use pivots = pivots
                use expectedTokens = wholeTokens.narrow (0L, 2L, 2L)
                use expectedPivots = wholePivots.narrow (0L, 2L, 2L)
                Expect.isLessThan (maxAbsDiff tokens expectedTokens) 1e-5 "dense latents"
                Expect.isLessThan (maxAbsDiff pivots expectedPivots) 1e-5 "pivot latents"
            }

            test "two halves of a batch give losses and gradients whose means are the whole batch's" {
                torch.manual_seed 21L |> ignore
                use m = new HiMAR(config)
                Init.himar m
                m.train ()
                use tokens = torch.randn (6L, 64L, 16L)
                use cond = torch.randn (6L, 16L, 16L)
                use labels = torch.tensor ([| 0L; 3L; 5L; 7L; 9L; 2L |])
                let whole = RowWindow.Whole 6L

                let halves =
                    [
                        { Offset = 0L; Count = 3L; Total = 6L }
                        { Offset = 3L; Count = 3L; Total = 6L }
                    ]

                let value (t: torch.Tensor) = t.item<float32> () |> float
                let r = lossesOf m 8L tokens cond labels whole
                let parts = halves |> List.map (lossesOf m 8L tokens cond labels)

                for name, pick in
                    [
                        "phase 1", (fun (l: HiMarLosses) -> l.Phase1)
                        "phase 2", (fun l -> l.Phase2)
                        "total", (fun l -> l.Total)
                    ] do
                    let mean = parts |> List.averageBy (pick >> value)
                    Expect.floatClose { absolute = 1e-6; relative = 1e-5 } mean (value (pick r)) name

                let gw = gradients m (fun () -> (lossesOf m 8L tokens cond labels whole).Total)

                let gh =
                    halves
                    |> List.map (fun w -> gradients m (fun () -> (lossesOf m 8L tokens cond labels w).Total))

                Expect.isGreaterThan gw.Count 40 "parameters with gradients"

                for KeyValue(name, g) in gw do
                    use mean = (gh.[0].[name] + gh.[1].[name]) / 2.0
                    use scale = g.abs().max ()
                    let tol = 1e-5 * max 1e-3 (scale.item<float32> () |> float)
                    Expect.isLessThanOrEqual (maxAbsDiff mean g) tol name
            }

            test "gradients are averaged in a few buckets, one all-reduce each, and come back unchanged" {
                torch.manual_seed 2L |> ignore
                use m = new HiMAR(config)

                let parameters =
                    m.parameters () |> Seq.filter (fun p -> p.requires_grad) |> Array.ofSeq

                // d/dp of sum p^2 = 2 p: every parameter gets a gradient
                use loss = parameters |> Array.map (fun p -> p.square().sum ()) |> Array.reduce (+)
                loss.backward ()
                let before = parameters |> Array.map (fun p -> (nonNull p.grad).clone ())
                let pair = new MirrorPair()
                let bytes = parameters |> Array.sumBy (fun p -> p.NumberOfElements * 4L)
                use buckets = new GradientBuckets(parameters, pair, bytes / 3L)
                Expect.isTrue (buckets.Count >= 3 && buckets.Count <= 5) (sprintf "%d buckets" buckets.Count)
                Expect.equal buckets.Bytes bytes "every gradient travels once"
                buckets.AllReduceAverage()
                Expect.equal pair.Calls.Count buckets.Count "one all-reduce per bucket"

                for p, b in Array.zip parameters before do
                    Expect.equal (maxAbsDiff (nonNull p.grad) b) 0.0 "(g + g) / 2 = g"

                use single = new GradientBuckets(parameters, SingleProcess.Instance)
                Expect.equal single.Count 0 "one rank plans nothing"
            }

            test "the launch is read from Open MPI's, PMIx's or PMI's variables, and none means one process" {
                let env (pairs: (string * string) list) =
                    fun name -> pairs |> List.tryFind (fst >> (=) name) |> Option.map snd |> Option.toObj

                let l =
                    Launch.Detect(
                        env
                            [
                                "OMPI_COMM_WORLD_SIZE", "4"
                                "OMPI_COMM_WORLD_RANK", "3"
                                "OMPI_COMM_WORLD_LOCAL_RANK", "1"
                                "OMPI_COMM_WORLD_LOCAL_SIZE", "2"
                            ]
                    )

                Expect.equal l (Launch("mpirun", 3, 4, 1, 2)) "mpirun"
                Expect.equal (Launch.Detect(env [ "PMIX_RANK", "1"; "PMIX_SIZE", "2" ])).Launcher "pmix" "PMIx"
                let none = Launch.Detect(env [])
                Expect.equal none (Launch("none", 0, 1, 0, 1)) "no launcher"
                Expect.isFalse none.UnderMpi "not under MPI"
            }

            test "a process not started by mpirun is one rank and never loads libmpi" {
                use c = Communicators.Create "auto"
                Expect.equal (c.Rank, c.Size, c.Backend) (0, 1, "single") "single process"

                let maps = File.ReadAllText "/proc/self/maps"
                Expect.isFalse (maps.Contains "libmpi") "libmpi is not mapped"
            }

            test "mpirun -np 2 himar bench allreduce sums float32 buffers over both ranks" {
                let out = mpiHimar [ "bench"; "allreduce"; "--sizes"; "4K,1M"; "--repeat"; "2" ]
                // the JSON report, without the terminal codes mpirun may print before it
                let report = JsonNode.Parse(out.[out.IndexOf '{' .. out.LastIndexOf '}']) |> nonNull
                Expect.equal (report.["ranks"] |> nonNull |> _.GetValue<int>()) 2 "two ranks"
                Expect.equal (report.["backend"] |> nonNull |> _.GetValue<string>()) "mpi" "MPI"

                for row in (report.["sizes"] |> nonNull).AsArray() do
                    Expect.isTrue
                        ((nonNull row).["result_correct"] |> nonNull |> _.GetValue<bool>())
                        "every element is 2"
            }

            test "2 ranks x batch 4 train to the weights of 1 process x batch 8, and resume from 2 ranks onto 1 process" {
                withTempDir (fun dir ->
                    let data = Path.Combine(dir, "data")
                    writeIdx data 40
                    let cfg = Path.Combine(dir, "tiny.json")
                    File.WriteAllText(cfg, HiMar.Runtime.Checkpoints.ReferenceImport.ToJson(config).ToJsonString())

                    let train out steps batch =
                        [
                            "train"
                            "--config"
                            cfg
                            "--data"
                            data
                            "--out"
                            Path.Combine(dir, out)
                            "--steps"
                            string steps
                            "--batch"
                            string batch
                            "--blr"
                            "0.01"
                            "--warmup"
                            "2"
                            "--ema"
                            "0.9"
                            "--seed"
                            "9"
                            "--checkpoint-every"
                            "2"
                            "--sample-every"
                            "0"
                            "--log-every"
                            "1"
                        ]

                    let steps = 6
                    himar (train "one" steps 8) |> ignore
                    let out = mpiHimar (train "two" steps 4)
                    Expect.stringContains out "data-parallel training on 2 ranks (mpi)" "rank 0 says how it runs"
                    mpiHimar (train "mixed" (steps / 2) 4) |> ignore
                    himar (train "mixed" steps 8 @ [ "--resume" ]) |> ignore
                    let final = sprintf "step-%08d" steps

                    let file run name =
                        Path.Combine(dir, run, "checkpoints", final, name)

                    for run in [ "two"; "mixed" ] do
                        for name in [ "weights.safetensors"; "ema.safetensors"; "optimizer.safetensors" ] do
                            let tensor, err = worstRelative (file "one" name) (file run name)
                            Expect.isLessThan err 1e-5 (sprintf "%s %s: %s differs by %g" run name tensor err)

                    Expect.equal (lossesIn (Path.Combine(dir, "two"))).Length steps "rank 0 alone writes metrics"

                    for a, b in Array.zip (lossesIn (Path.Combine(dir, "one"))) (lossesIn (Path.Combine(dir, "two"))) do
                        Expect.floatClose
                            { absolute = 1e-6; relative = 1e-5 }
                            b
                            a
                            "logged losses are the all-reduced means"

                    let state = JsonNode.Parse(File.ReadAllText(file "two" "state.json")) |> nonNull

                    let position = state.["data_position"] |> nonNull
                    Expect.equal (position.["global_batch"] |> nonNull |> _.GetValue<int>()) 8 "global batch"
                    Expect.equal (position.["world_size"] |> nonNull |> _.GetValue<int>()) 2 "world size")
            }
        ]
