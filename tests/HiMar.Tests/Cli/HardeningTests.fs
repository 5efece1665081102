/// Tests of the edges (issue 16): the command line's error boundary and flag checks, the config validator, prompt
/// errors, checkpoint manifests and the resume fallback, and runs killed at random moments or out of disk space.
module HiMar.Tests.HardeningTests

open System
open System.Diagnostics
open System.IO
open System.IO.Compression
open System.Text.Json.Nodes
open Expecto
open HiMar.Model
open HiMar.Runtime
open HiMar.Runtime.Checkpoints
open HiMar.Runtime.Data
open HiMar.Runtime.Training
open HiMar.Tests.TestUtil

/// A failure as the issue asks: the exit code, one `himar: ` line holding the fragment, no stack trace.
let private expectFailure (o: HimarRun) (code: int) (fragment: string) =
    Expect.equal o.Code code (sprintf "exit code (stderr: %s)" o.Err)
    let lines = o.Err.Split('\n') |> Array.filter (fun l -> l.Trim() <> "")
    Expect.equal lines.Length 1 (sprintf "one line on stderr: %s" o.Err)
    Expect.stringStarts lines.[0] "himar: " "prefixed"
    Expect.stringContains lines.[0] fragment "names the problem"
    Expect.isFalse (o.Err.Contains "   at ") "no stack trace"

/// The tiny training config as a config file, and 48 IDX images: what the child training processes read.
let private trainingInputs (dir: string) =
    let config = Path.Combine(dir, "tiny.json")
    File.WriteAllText(config, (ConfigCodec.toJson TrainingTests.tinyConfig).ToJsonString())
    let data = Path.Combine(dir, "idx")
    writeIdx data 48
    config, data

/// `himar train` of the tiny config with checkpoints every `every` steps, resuming from the run folder.
let private trainArgs (config: string) (data: string) (out: string) (steps: int) (every: int) (logEvery: int) =
    [
        "train"
        "--config"
        config
        "--data"
        data
        "--out"
        out
        "--steps"
        string steps
        "--batch"
        "8"
        "--blr"
        "0.01"
        "--warmup"
        "2"
        "--ema"
        "0.9"
        "--seed"
        "9"
        "--checkpoint-every"
        string every
        "--keep"
        "2"
        "--sample-every"
        "0"
        "--log-every"
        string logEvery
        "--resume"
    ]

/// Dot-named work in progress left under a folder.
let private debrisIn (dir: string) =
    if Directory.Exists dir then
        Directory.GetFileSystemEntries dir
        |> Array.map Path.GetFileName
        |> Array.filter (fun n -> (nonNull n).EndsWith ".tmp")
    else
        [||]

/// The steps logged in a run's metrics.jsonl, in order.
let private loggedSteps (run: string) =
    File.ReadAllLines(Path.Combine(run, "metrics.jsonl"))
    |> Array.map (fun l -> (nonNull (JsonNode.Parse l)).["step"] |> nonNull |> _.GetValue<int>())

/// The last step a (possibly running) training has logged, 0 before any; lines cut mid-write are skipped.
let private lastLoggedStep (run: string) =
    let path = Path.Combine(run, "metrics.jsonl")

    try
        use f =
            new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite ||| FileShare.Delete)

        use r = new StreamReader(f)

        r.ReadToEnd().Split('\n')
        |> Array.choose (fun l ->
            try
                match JsonNode.Parse l with
                | null -> None
                | n -> n.["step"] |> Option.ofObj |> Option.map _.GetValue<int>()
            with _ ->
                None)
        |> Array.fold max 0
    with
    | :? FileNotFoundException
    | :? DirectoryNotFoundException -> 0

/// A config file of the fashion preset with some fields replaced (raw JSON text per key).
let private configWith (dir: string) (fields: (string * string) list) =
    let path = Path.Combine(dir, "config.json")
    let root = ConfigCodec.toJson HiMarConfig.fashion

    for key, raw in fields do
        root.[key] <- JsonNode.Parse raw

    File.WriteAllText(path, root.ToJsonString())
    path

let private resolveError (fields: (string * string) list) =
    let mutable message = ""

    withTempDir (fun dir ->
        let path = configWith dir fields
        message <- (catchT<CheckpointFormatException> (fun () -> ModelConfigs.Resolve path |> ignore)).Message)

    message

let configTests =
    testList
        "Config validator"
        [
            test "wrong types name the field: text, 1e30, null, 128.5 and a string boolean" {
                Expect.stringContains
                    (resolveError [ "encoder_depth", "\"four\"" ])
                    "'encoder_depth' must be a whole number, not the string \"four\""
                    "text for a number"

                Expect.stringContains
                    (resolveError [ "encoder_depth", "1e30" ])
                    "'encoder_depth' is 1e30, out of range"
                    "1e30"

                Expect.stringContains
                    (resolveError [ "encoder_embed_dim", "null" ])
                    "'encoder_embed_dim' is null (give a whole number, or leave the key out"
                    "null is not the preset's default"

                Expect.stringContains
                    (resolveError [ "encoder_embed_dim", "128.5" ])
                    "'encoder_embed_dim' must be a whole number, not 128.5"
                    "128.5 is not 128"

                Expect.stringContains (resolveError [ "cos", "\"true\"" ]) "'cos' must be true or false" "bool"
                Expect.stringContains (resolveError [ "mlp_ratio", "\"4\"" ]) "'mlp_ratio' must be a number" "number"
            }

            test "ranges: zero heads, zero vae_stride, negative widths, depth -1, indivisible widths" {
                Expect.stringContains
                    (resolveError [ "encoder_num_heads", "0"; "decoder_num_heads", "0" ])
                    "encoder_num_heads must be a whole number from 1 to 1024, not 0"
                    "zero heads"

                Expect.stringContains
                    (resolveError [ "vae_stride", "0" ])
                    "vae_stride must be a whole number from 1 to 1024, not 0"
                    "zero stride"

                Expect.stringContains
                    (resolveError [ "encoder_embed_dim", "-8"; "decoder_embed_dim", "-8" ])
                    "encoder_embed_dim must be a whole number from 1 to 65536, not -8"
                    "negative width"

                Expect.stringContains
                    (resolveError [ "encoder_depth", "-1" ])
                    "encoder_depth must be a whole number from 1 to 1000, not -1"
                    "depth -1"

                Expect.stringContains
                    (resolveError [ "encoder_embed_dim", "130"; "decoder_embed_dim", "130" ])
                    "encoder width 130 is not divisible by 4 heads"
                    "width / heads"

                Expect.stringContains
                    (resolveError [ "img_size", "30" ])
                    "img_size 30 is not a multiple of vae_stride * patch_size = 4"
                    "image / stride"

                Expect.stringContains
                    (resolveError [ "attn_dropout", "1.5" ])
                    "attn_dropout must be a number from 0 to 1 (excluded), not 1.5"
                    "dropout"

                Expect.stringContains
                    (resolveError [ "num_sampling_steps", "\"ddimx\"" ])
                    "num_sampling_steps must be a respacing"
                    "respacing"
            }

            test "unknown keys are refused, with the nearest known key for a near miss" {
                Expect.stringContains
                    (resolveError [ "encoder_dept", "4" ])
                    "unknown key 'encoder_dept' (did you mean 'encoder_depth'?)"
                    "near miss"

                let far = resolveError [ "learning_rate_of_the_moon", "4" ]
                Expect.stringContains far "unknown key 'learning_rate_of_the_moon'" "far"
                Expect.isFalse (far.Contains "did you mean") "no suggestion for a far key"
                Expect.equal (ModelConfigs.Levenshtein("encoder_dept", "encoder_depth")) 1 "edit distance"
                Expect.equal (ModelConfigs.Levenshtein("kitten", "sitting")) 3 "kitten/sitting"
            }

            test "integral reals are whole numbers; the shipped and reference argument files still load" {
                withTempDir (fun dir ->
                    let c =
                        ModelConfigs.Resolve(configWith dir [ "encoder_depth", "3.0"; "decoder_depth", "3" ])

                    Expect.equal c.Backbone.EncoderDepth 3 "3.0 is 3")

                Expect.equal
                    (ModelConfigs.Resolve(Path.Combine(repoRoot, "models", "fashion", "config.json")))
                    HiMarConfig.fashion
                    "fashion"

                Expect.equal
                    (ModelConfigs.Resolve(Path.Combine(repoRoot, "models", "fashion-text", "config.json")))
                    HiMarConfig.fashionText
                    "fashion-text"

                let tiny = ModelConfigs.Resolve(Path.Combine(tinyFixture, "manifest.json"))

                Expect.equal
                    (tiny.Backbone.EncoderWidth, tiny.MlpHead.Width, tiny.MlpHead.SamplingSteps)
                    (64, 96, "ddim10")
                    "tiny fixture"

                let generic = ModelConfigs.Resolve(Path.Combine(genericFixture, "manifest.json"))
                Expect.equal (generic.Backbone.DecoderDepth, generic.Backbone.ClassCount) (3, 7) "generic fixture"
            }

            test "reference arguments in memory (a checkpoint's Namespace) are typed exactly too" {
                let args = Collections.Generic.Dictionary<string, obj>()
                args.["encoder_depth"] <- (128.5 :> obj)
                args.["some_training_flag"] <- ("ignored" :> obj)

                let e =
                    catchT<ArgumentException> (fun () ->
                        ConfigCodec.fromReferenceArgs HiMarConfig.fashion args |> ignore)

                Expect.equal e.Message "encoder_depth must be a whole number, not 128.5" "message, no parameter suffix"

                let problems =
                    ConfigCodec.validate
                        { HiMarConfig.fashion with
                            Backbone.EncoderDepth = -1
                        }

                Expect.equal problems [ "encoder_depth must be a whole number from 1 to 1000, not -1" ] "validate"

                let e2 =
                    catchT<ArgumentException> (fun () ->
                        new HiMAR(
                            { HiMarConfig.fashion with
                                TransformerHead.Heads = 0
                            }
                        )
                        |> ignore)

                Expect.stringContains
                    e2.Message
                    "head must be a whole number from 1 to 1024, not 0"
                    "no division by zero"
            }
        ]

let promptTests =
    testList
        "Prompts"
        [
            test "errors quote at most 80 characters of a caption, control characters escaped" {
                let huge = "\u001b[31m" + String.replicate 20000 "zebra\tunicorn\n" // about 280,000 characters
                let q = WordVocabulary.quote huge
                Expect.isLessThan q.Length 130 "short"
                Expect.stringContains q "\\x1b[31m" "escape shown"
                Expect.stringContains q (sprintf "(%d characters)" huge.Length) "the length"
                Expect.isFalse (q |> Seq.exists Char.IsControl) "no raw control characters"

                match WordVocabulary.tryEncode HiMarConfig.fashionText.Text.Vocabulary 12 huge with
                | Ok _ -> failtest "unknown words accepted"
                | Error e ->
                    Expect.isLessThan e.Length 1000 "the whole message is short"
                    Expect.isFalse (e |> Seq.exists Char.IsControl) "no raw control characters"
                    Expect.stringContains e "'zebra'" "an unknown word"
                    Expect.stringContains e "'unicorn'" "another"
            }

            test "an empty or wordless prompt is refused with the way to sample the null condition" {
                for p in [ ""; "   "; "!!! ..." ] do
                    let e =
                        catchT<Text.PromptException> (fun () -> Text.Prompts.CheckGiven([ p ], HiMarConfig.fashionText))

                    Expect.stringContains e.Message "use --unconditional" p

                Text.Prompts.CheckGiven([ "a sandal" ], HiMarConfig.fashionText)
            }
        ]

let failureTests =
    testList
        "Error boundary"
        [
            test "known failures keep their exit codes; a full disk and a denied permission are storage (5)" {
                let code (e: exn) =
                    let struct (c, _) = Failures.Explain(e)
                    c

                Expect.equal (code (BadInputException "x")) 2 "bad input"
                Expect.equal (code (EnvironmentException "x")) 3 "environment"
                Expect.equal (code (NumericalException "x")) 4 "numerical"
                Expect.equal (code (StorageException "x")) 5 "storage"
                Expect.equal (code (UnauthorizedAccessException "Access to the path '/x' is denied.")) 5 "permission"
                Expect.equal (code (FileNotFoundException "no such file")) 2 "missing input"

                Expect.equal
                    (code (
                        Runtime.InteropServices.ExternalException(
                            "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 80000000000 bytes.\nException raised from ..."
                        )
                    ))
                    3
                    "libtorch out of memory"

                let full = IOException("No space left on device : '/mnt/x'", 28)
                let struct (c, m) = Failures.Explain(full)

                Expect.equal
                    (c, m)
                    (5,
                     "no space left on the device: No space left on device : '/mnt/x' (free some space; a training run continues from its last checkpoint with --resume).")
                    "disk full"
            }

            test "an unexpected failure is one line naming its type, with the full trace in a file (exit 70)" {
                withTempDir (fun dir ->
                    // The raw .NET message the issue quotes, raised inside the base library.
                    let e =
                        catchT<ArgumentOutOfRangeException> (fun () -> Collections.Generic.List<int>(-1) |> ignore)

                    let struct (code, line) = Failures.Explain(e, dir)
                    Expect.equal code 70 "exit code"

                    Expect.stringStarts
                        line
                        "unexpected error: System.ArgumentOutOfRangeException: Non-negative number required."
                        "type and first line"

                    let trace = Directory.GetFiles dir
                    Expect.equal trace.Length 1 "one trace file"
                    Expect.stringEnds line (sprintf "; full trace in %s" trace.[0]) "says where"
                    Expect.stringContains (File.ReadAllText trace.[0]) "   at " "the trace is in the file"

                    let multi = InvalidOperationException("first\nsecond\u001b")
                    let struct (_, l2) = Failures.Explain(multi, dir)
                    Expect.isFalse (l2.Contains "second") "the first line only")
            }

            test "argument errors raised by himar itself are bad input, without .NET's parameter suffix" {
                let e =
                    catchT<ArgumentException> (fun () ->
                        ConfigCodec.fromReferenceArgs
                            HiMarConfig.fashion
                            (readOnlyDict [ "conditioning", ("audio" :> obj) ])
                        |> ignore)

                let struct (code, line) = Failures.Explain(e)
                Expect.equal (code, line) (2, "conditioning must be one of class, text, not 'audio'") "message"
            }
        ]

/// The rows of bad command lines: arguments, exit code, message fragment.
let private badCommandLines (tmp: string) (aFile: string) =
    let out = Path.Combine(tmp, "out")
    let png = Path.Combine(out, "grid.png")

    [
        [ "sample"; "--preset"; "fashion"; "--batch"; "0"; "-o"; png ], 2, "--batch: 0 is out of range"
        [ "train"; "--accumulation"; "0"; "--out"; out ], 2, "--accumulation: 0 is out of range"
        [ "train"; "--checkpoint-every"; "0"; "--out"; out ], 2, "--checkpoint-every: 0 is out of range"
        [ "sample"; "--preset"; "fashion"; "--cfg"; "NaN"; "-o"; png ], 2, "--cfg: NaN is not a finite number"
        [ "sample"; "--preset"; "fashion"; "--cfg"; "Infinity"; "-o"; png ], 2, "--cfg: Infinity is not a finite"
        [ "sample"; "--preset"; "fashion"; "--temperature"; "-1"; "-o"; png ],
        2,
        "--temperature: -1 is out of range; give a number > 0"
        [ "train"; "--ema"; "2"; "--out"; out ], 2, "--ema: 2 is out of range; give a number >= 0 and < 1"
        [ "train"; "--steps"; "-1"; "--out"; out ], 2, "--steps: -1 is out of range"
        [ "sample"; "--preset"; "fashion"; "-n"; "100000000"; "-o"; png ], 2, "-n: 100000000 is out of range"
        [ "sample"; "--preset"; "fashion"; "--mlp-steps"; "ddimx"; "-o"; png ],
        2,
        "--mlp-steps: 'ddimx' is not a respacing"
        [ "train"; "--out"; aFile ], 2, "is a file; give a folder"
        [ "fid-stats"; "--inception"; "x"; "--images"; "y"; "-o"; tmp ], 2, "is a folder; give a file name"
        [ "train"; "--out"; "/proc/himar-hardening/run" ], 5, "cannot write in /proc"
    ]

let cliTests =
    testList
        "Command line"
        [
            test "bad flags end in one line and the right exit code before any work, leaving no files" {
                withTempDir (fun tmp ->
                    let aFile = Path.Combine(tmp, "a-file")
                    File.WriteAllText(aFile, "not a folder")

                    for args, code, fragment in badCommandLines tmp aFile do
                        let o = himar args
                        expectFailure o code fragment

                        Expect.isFalse
                            (Directory.Exists(Path.Combine(tmp, "out")))
                            (String.Join(" ", args) + ": no output")

                    Expect.equal (Directory.GetFileSystemEntries tmp) [| aFile |] "nothing written")
            }

            test "Argu's own usage errors are one line with exit code 2, at every stage of parsing" {
                expectFailure
                    (himar [ "sample"; "--batch"; "many" ])
                    2
                    "parameter '--batch' must be followed by <size>, but was 'many' (see 'himar sample --help')"

                // a missing main argument is found after parsing (Argu's own code for it would be 3)
                expectFailure (himar [ "plot-loss" ]) 2 "missing argument '<run>...'"
                expectFailure (himar [ "bogus" ]) 2 "unrecognized argument: 'bogus'"
                let help = himar [ "plot-loss"; "--help" ]
                Expect.equal help.Code 0 "--help succeeds"
                Expect.stringContains help.Out "USAGE: himar plot-loss" "usage on stdout"
            }

            test "an unknown --preset names the shipped models, in sample and eval alike" {
                for cmd in [ "sample"; "eval" ] do
                    expectFailure
                        (himar [ cmd; "--preset"; "nope" ])
                        2
                        "--preset: no shipped model 'nope' (shipped: fashion, fashion-mar, fashion-text)"
            }

            test "--device cuda without a GPU is an environment failure (3)" {
                if TorchSharp.torch.cuda.is_available () then
                    skiptest "this machine has a CUDA device"

                withTempDir (fun tmp ->
                    let o =
                        himar
                            [
                                "sample"
                                "--preset"
                                "fashion"
                                "--device"
                                "cuda"
                                "-o"
                                Path.Combine(tmp, "g.png")
                            ]

                    expectFailure o 3 "--device cuda: no CUDA device is available"
                    Expect.isEmpty (Directory.GetFileSystemEntries tmp) "nothing written")
            }

            test "train --init: a missing path or another model's weights is one line, exit 2, no run folder" {
                withTempDir (fun tmp ->
                    let out = Path.Combine(tmp, "run")

                    let missing =
                        himar [ "train"; "--init"; Path.Combine(tmp, "nope"); "--steps"; "1"; "-o"; out ]

                    expectFailure missing 2 "--init: "
                    Expect.stringContains missing.Err "no such model folder" "says what is wrong"

                    let other =
                        himar
                            [
                                "train"
                                "--preset"
                                "fashion-text"
                                "--init"
                                Path.Combine(repoRoot, "models", "fashion")
                                "--steps"
                                "1"
                                "-o"
                                out
                            ]

                    expectFailure other 2 "in this run's model; its model is not this run's model"
                    Expect.isEmpty (Directory.GetFileSystemEntries tmp) "nothing written")
            }

            test "prompts: an empty one is refused, a long one with control characters is quoted short" {
                withTempDir (fun tmp ->
                    let png = Path.Combine(tmp, "g.png")

                    let empty =
                        himar [ "sample"; "--preset"; "fashion-text"; "--prompt"; ""; "-o"; png ]

                    expectFailure empty 2 "to sample it on purpose, use --unconditional"
                    // Below the 128 KiB a single argument may have on Linux.
                    let long = "\u001b[2J " + String.replicate 8000 "purple hat\t"

                    let o = himar [ "sample"; "--preset"; "fashion-text"; "--prompt"; long; "-o"; png ]
                    expectFailure o 2 "the model does not know the words '2j', 'purple', 'hat'"
                    Expect.isLessThan o.Err.Length 1200 "short"
                    Expect.stringContains o.Err "\\x1b[2J" "escaped"

                    Expect.isFalse
                        (o.Err |> Seq.exists (fun c -> Char.IsControl c && c <> '\n'))
                        "no raw control characters"

                    Expect.isEmpty (Directory.GetFileSystemEntries tmp) "nothing written")
            }

            test "sample --unconditional samples the null condition on purpose" {
                withTempDir (fun tmp ->
                    let png = Path.Combine(tmp, "g.png")

                    let o =
                        himar
                            [
                                "sample"
                                "--preset"
                                "fashion"
                                "--unconditional"
                                "-n"
                                "2"
                                "--mlp-steps"
                                "5"
                                "--dit-steps"
                                "5"
                                "-o"
                                png
                            ]

                    Expect.equal o.Code 0 o.Err
                    Expect.stringContains o.Out "sampled 2 images" "two images"
                    Expect.isTrue (File.Exists png) "the grid")
            }

            test "a bad config file and a half-pruned checkpoint are refused by the command line" {
                withTempDir (fun tmp ->
                    let config = configWith tmp [ "encoder_dept", "4" ]
                    let out = Path.Combine(tmp, "run")
                    let o = himar [ "train"; "--config"; config; "--out"; out ]
                    expectFailure o 2 "did you mean 'encoder_depth'?"
                    Expect.isFalse (Directory.Exists out) "no run folder"
                    // A step folder whose state.json and optimizer moments were pruned before the kill.
                    let half = Path.Combine(tmp, "checkpoints", "step-00000003")
                    Directory.CreateDirectory half |> ignore

                    for f in [ "config.json"; "weights.safetensors" ] do
                        File.Copy(Path.Combine(repoRoot, "models", "fashion", f), Path.Combine(half, f))

                    let s = himar [ "sample"; "--checkpoint"; half; "-o"; Path.Combine(tmp, "g.png") ]
                    expectFailure s 2 "an incomplete checkpoint (no ema.safetensors, optimizer.safetensors, state.json"
                    Expect.isFalse (File.Exists(Path.Combine(tmp, "g.png"))) "no grid")
            }
        ]

/// Runs f with one libtorch thread (as the child processes), restoring the count after: a busy 2-core machine
/// makes several spinning threads much slower than one.
let private singleThreaded (f: unit -> unit) =
    let before = TorchSharp.torch.get_num_threads ()
    TorchSharp.torch.set_num_threads 1

    try
        f ()
    finally
        TorchSharp.torch.set_num_threads before

/// withTempDir with one libtorch thread.
let private withTempDirOneThread (f: string -> unit) =
    singleThreaded (fun () -> withTempDir f)

let checkpointTests =
    testList
        "Checkpoints"
        [
            test "a manifest lists every file; a corrupt newest checkpoint is skipped on resume, metrics are cut back" {
                withTempDirOneThread (fun dir ->
                    do
                        use t =
                            new Trainer(
                                TrainingTests.tinyConfig,
                                TrainingTests.SyntheticData(),
                                PixelPatchTokenizer.Fashion,
                                TrainingTests.options dir 6
                            )

                        t.Run()

                    let ckpts = Path.Combine(dir, "checkpoints")
                    let step6 = Path.Combine(ckpts, "step-00000006")

                    let manifest =
                        (nonNull (JsonNode.Parse(File.ReadAllText(Path.Combine(step6, "manifest.json"))))).AsObject()

                    let files = (nonNull manifest.["files"]).AsObject()

                    Expect.equal
                        (files |> Seq.map _.Key |> Seq.sort |> List.ofSeq)
                        [
                            "config.json"
                            "ema.safetensors"
                            "optimizer.safetensors"
                            "state.json"
                            "weights.safetensors"
                        ]
                        "files"

                    Checkpoint.Verify step6

                    Expect.equal
                        (ModelConfigs.Resolve(Path.Combine(step6, "manifest.json")))
                        TrainingTests.tinyConfig
                        "a checkpoint manifest resolves to the config beside it"
                    // One flipped byte in the newest optimizer moments.
                    let opt = Path.Combine(step6, "optimizer.safetensors")
                    let bytes = File.ReadAllBytes opt
                    bytes.[bytes.Length - 1] <- bytes.[bytes.Length - 1] ^^^ 0xFFuy
                    File.WriteAllBytes(opt, bytes)
                    let e = catchT<CheckpointFormatException> (fun () -> Checkpoint.Verify step6)

                    Expect.stringContains
                        e.Message
                        "optimizer.safetensors: its SHA-256 differs from the manifest's"
                        "hash"
                    // Debris of killed runs: a staging folder and a half-pruned step folder.
                    Directory.CreateDirectory(
                        Path.Combine(ckpts, ".step-00000009.0123456789abcdef0123456789abcdef.tmp")
                    )
                    |> ignore

                    Directory.CreateDirectory(Path.Combine(ckpts, "step-00000012")) |> ignore

                    use r =
                        new Trainer(
                            TrainingTests.tinyConfig,
                            TrainingTests.SyntheticData(),
                            PixelPatchTokenizer.Fashion,
                            TrainingTests.options dir 6,
                            resume = true
                        )

                    Expect.equal r.Step 3 "resumed from step 3"
                    Expect.equal r.SkippedCheckpoints.Count 1 "one skipped"

                    Expect.stringStarts
                        r.SkippedCheckpoints.[0]
                        "step-00000006: optimizer.safetensors: its SHA-256"
                        "why"

                    Expect.equal
                        (Set.ofSeq r.RemovedDebris)
                        (set [ ".step-00000009.0123456789abcdef0123456789abcdef.tmp"; "step-00000012" ])
                        "debris removed"

                    Expect.equal (loggedSteps dir) [| 1; 2; 3 |] "metrics cut back to the resumed step"
                    r.Run()
                    Expect.equal (loggedSteps dir) [| 1..6 |] "each step logged once"
                    Checkpoint.Verify step6)
            }

            test "sample --checkpoint verifies; a run whose checkpoints all fail stops instead of starting afresh" {
                withTempDirOneThread (fun dir ->
                    do
                        use t =
                            new Trainer(
                                TrainingTests.tinyConfig,
                                TrainingTests.SyntheticData(),
                                PixelPatchTokenizer.Fashion,
                                TrainingTests.options dir 3
                            )

                        t.Run()

                    let step3 = Path.Combine(dir, "checkpoints", "step-00000003")
                    // A state.json cut short by a full disk.
                    let state = Path.Combine(step3, "state.json")
                    File.WriteAllText(state, File.ReadAllText(state).Substring(0, 20))

                    let e =
                        catchT<CheckpointFormatException> (fun () -> ReferenceImport.LoadModel step3 |> ignore)

                    Expect.stringContains e.Message "state.json: 20 bytes, the manifest says" "sample --checkpoint"

                    let e2 =
                        catchT<CheckpointFormatException> (fun () ->
                            new Trainer(
                                TrainingTests.tinyConfig,
                                TrainingTests.SyntheticData(),
                                PixelPatchTokenizer.Fashion,
                                TrainingTests.options dir 6,
                                resume = true
                            )
                            |> ignore)

                    Expect.stringContains
                        e2.Message
                        "no checkpoint can be resumed (step-00000003: state.json: 20 bytes"
                        "resume")
            }

            test "a checkpoint that cannot be written is a storage failure (5) and leaves nothing behind" {
                use model = new HiMAR(TrainingTests.tinyConfig)
                use optimizer = new NamedAdamW(model, 0.02)

                let e =
                    catchT<StorageException> (fun () ->
                        Checkpoint.Write(
                            "/proc/himar-hardening",
                            "step-00000001",
                            model,
                            model,
                            optimizer,
                            JsonObject()
                        )
                        |> ignore)

                Expect.equal e.ExitCode 5 "exit code"
                Expect.stringContains e.Message "the checkpoint could not be written" "message"
            }
        ]

let soakTests =
    testList
        "Kills"
        [
            test
                "training killed at random moments, checkpoint writes included, resumes to an uninterrupted run's weights" {
                withTempDir (fun dir ->
                    let config, data = trainingInputs dir
                    let steps = 16
                    let straight = Path.Combine(dir, "straight")
                    let o = himar (trainArgs config data straight steps 1 1)
                    Expect.equal o.Code 0 o.Err
                    let killed = Path.Combine(dir, "killed")
                    // Cycle i kills its child once step 3i is logged, after a further 0-40 ms (fixed by the seed):
                    // inside a step, its metrics line or its checkpoint write (one per step), whatever the load.
                    let rng = Random(16)
                    let mutable kills = 0

                    for i in 1..4 do
                        use p = startHimar (trainArgs config data killed steps 1 1)
                        p.StandardOutput.ReadToEndAsync() |> ignore
                        p.StandardError.ReadToEndAsync() |> ignore
                        let target = 3 * i
                        let deadline = Stopwatch.StartNew()

                        while not p.HasExited
                              && lastLoggedStep killed < target
                              && deadline.Elapsed < TimeSpan.FromMinutes 1.0 do
                            Threading.Thread.Sleep 5

                        Threading.Thread.Sleep(rng.Next 40)

                        if not p.HasExited then
                            p.Kill true
                            kills <- kills + 1

                        p.WaitForExit()

                    let last = himar (trainArgs config data killed steps 1 1)
                    Expect.equal last.Code 0 last.Err
                    Expect.isGreaterThanOrEqual kills 3 "runs killed mid-training"

                    let final (run: string) =
                        Path.Combine(run, "checkpoints", sprintf "step-%08d" steps)

                    for f in [ "weights.safetensors"; "ema.safetensors"; "optimizer.safetensors" ] do
                        let a = SafeTensors.Load(Path.Combine(final straight, f))
                        let b = SafeTensors.Load(Path.Combine(final killed, f))

                        for KeyValue(k, t) in a do
                            Expect.equal (maxAbsDiff t b.[k]) 0.0 (f + ": " + k)

                    Expect.equal (loggedSteps killed) [| 1..steps |] "each step logged once"
                    Expect.isEmpty (debrisIn (Path.Combine(killed, "checkpoints"))) "no debris"

                    for d in Checkpoint.Steps(Path.Combine(killed, "checkpoints")) do
                        Checkpoint.Verify d)
            }

            test "a full disk during training exits 5 with one line and keeps the earlier checkpoint" {
                withTempDir (fun dir ->
                    let mnt = Path.Combine(dir, "small")
                    Directory.CreateDirectory mnt |> ignore

                    let mount =
                        try
                            use p = Process.Start("mount", [ "-t"; "tmpfs"; "-o"; "size=8m"; "tmpfs"; mnt ])
                            p.WaitForExit()
                            p.ExitCode = 0
                        with _ ->
                            false

                    if not mount then
                        skiptest "cannot mount a tmpfs here (needs root and mount permission)"

                    try
                        let config, data = trainingInputs dir
                        let run = Path.Combine(mnt, "run")
                        let first = himar (trainArgs config data run 2 2 100)
                        Expect.equal first.Code 0 first.Err
                        // Fill what is left of the 8 MiB.
                        let filler = Path.Combine(mnt, "filler")

                        try
                            use f = File.Create filler
                            let block = Array.zeroCreate<byte> 65536

                            while true do
                                f.Write(block, 0, block.Length)
                                f.Flush()
                        with :? IOException ->
                            ()

                        let full = himar (trainArgs config data run 6 2 100)
                        expectFailure full 5 "no space left on the device"
                        Expect.stringContains full.Err "the earlier checkpoints" "says what survived"
                        let ckpts = Path.Combine(run, "checkpoints")
                        Checkpoint.Verify(Path.Combine(ckpts, "step-00000002"))
                        Expect.isFalse (Directory.Exists(Path.Combine(ckpts, "step-00000004"))) "no partial step 4"
                        Expect.isEmpty (debrisIn ckpts) "no staging debris"
                    finally
                        use u = Process.Start("umount", [ "-l"; mnt ])
                        u.WaitForExit())
            }
        ]

/// All the hardening tests.
let tests =
    testList "Hardening" [ configTests; promptTests; failureTests; cliTests; checkpointTests; soakTests ]
