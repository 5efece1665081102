/// The `himar` command: maps arguments to runtime calls in one place and does no math.
module HiMar.Cli.Program

open System
open Argu
open Spectre.Console
open HiMar.Runtime.Native

/// Arguments of `himar info`.
type InfoArgs =
    | [<AltCommandLine("-s")>] Probe_Seconds of seconds: float
    | No_Probe
    | [<AltCommandLine("-m")>] Model of preset_or_file: string

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Probe_Seconds _ -> "how long the fp32 matmul probe runs (default 2)."
            | No_Probe -> "skip the matmul probe."
            | Model _ ->
                "print the parameter count per module of a model: hi-mar-b, hi-mar-l, hi-mar-h, or a JSON file of reference arguments."

/// Arguments of `himar verify-parity`.
type VerifyParityArgs =
    | [<MainCommand; ExactlyOnce>] Dir of dir: string
    | Kind of kind: string

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Dir _ -> "a parity fixture folder (manifest.json, weights and cases; see shared/fixtures/parity)."
            | Kind _ -> "run only the cases of this kind (e.g. mlp_head_forward)."

/// The top-level command line.
[<RequireSubcommand>]
type HimarArgs =
    | [<CliPrefix(CliPrefix.None)>] Info of ParseResults<InfoArgs>
    | [<CliPrefix(CliPrefix.None)>] Verify_Parity of ParseResults<VerifyParityArgs>

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Info _ -> "print versions, devices, threads, the native patch state and a matmul GFLOP/s probe."
            | Verify_Parity _ ->
                "check our implementation against a reference parity fixture; one line per case, exit 1 on any failure."

/// The parameter table of one configuration, built on the meta device (no memory, instant).
let private modelInfo (nameOrFile: string) =
    let config = HiMar.Runtime.Checkpoints.ModelConfigs.Resolve nameOrFile
    let parts, total = HiMar.Model.Anatomy.parameterCounts config

    let table =
        Table()
            .AddColumn("module")
            .AddColumn(TableColumn("parameters").RightAligned())
            .AddColumn(TableColumn("share").RightAligned())

    for name, count in parts do
        table.AddRow(Markup.Escape name, count.ToString("N0"), sprintf "%.1f%%" (100.0 * float count / float total))
        |> ignore

    table.AddRow("[bold]total[/]", sprintf "[bold]%s[/]" (total.ToString("N0")), "100.0%")
    |> ignore

    table.Title <-
        TableTitle(
            Markup.Escape(
                sprintf
                    "%s: %d+%d blocks of width %d, pivots %dx%d, %d classes"
                    nameOrFile
                    config.EncoderDepth
                    config.DecoderDepth
                    config.EncoderEmbedDim
                    config.CondScale
                    config.CondScale
                    config.ClassNum
            )
        )

    AnsiConsole.Write table
    0

let private info (args: ParseResults<InfoArgs>) =
    match args.TryGetResult Model with
    | Some m ->
        TorchNative.EnsureLoaded()
        modelInfo m
    | None ->

        let e = TorchNative.Describe()
        let grid = Grid().AddColumn().AddColumn()

        let row (k: string) (v: string) =
            grid.AddRow(Markup.Escape k, Markup.Escape v) |> ignore

        row "HiMarFunctional" (string (typeof<HimarArgs>.Assembly.GetName().Version))
        row "TorchSharp" e.TorchSharpVersion
        row "libtorch" e.LibTorchVersion
        row ".NET" e.DotNetVersion
        row "OS" (Runtime.InteropServices.RuntimeInformation.OSDescription)
        row "devices" (String.Join(", ", e.Devices))
        row "threads" (string e.Threads)

        row
            "native patch"
            (match e.Glue.Path with
             | null -> "no libLibTorchSharp.so beside the application"
             | p when e.Glue.PatchApplied ->
                 sprintf "applied: %s need marked weak in %s" (String.Join(", ", e.Glue.WeakenedNeeds)) p
             | p -> sprintf "not needed: %s loads as shipped" p)

        AnsiConsole.Write grid

        if not (args.Contains No_Probe) then
            let seconds = args.GetResult(Probe_Seconds, defaultValue = 2.0)

            let gflops =
                AnsiConsole
                    .Status()
                    .Start("fp32 matmul probe (1024 x 1024)...", fun _ -> TorchNative.MatmulGflops(seconds))

            AnsiConsole.MarkupLine(sprintf "matmul fp32   [bold]%.1f GFLOP/s[/] on cpu, %d threads" gflops e.Threads)

        0

let private verifyParity (args: ParseResults<VerifyParityArgs>) =
    TorchNative.EnsureLoaded()
    let dir = args.GetResult Dir
    let only = args.TryGetResult Kind
    use fixture = HiMar.Runtime.Parity.ParityFixture.Open dir
    let mutable failed = 0
    let mutable passed = 0
    let mutable pending = 0
    printfn "%-28s %-24s %12s %12s  %s" "case" "kind" "worst error" "allowed" "result"

    for c in fixture.Cases do
        if only.IsNone || only = Some c.Kind then
            let r = HiMar.Runtime.Parity.ParityRunner.Run(fixture, c)

            let status =
                match r.Status with
                | HiMar.Runtime.Parity.ParityStatus.Pass ->
                    passed <- passed + 1
                    "pass"
                | HiMar.Runtime.Parity.ParityStatus.Pending ->
                    pending <- pending + 1
                    "pending"
                | _ ->
                    failed <- failed + 1
                    "FAIL"

            let num (x: float) =
                if Double.IsNaN x then "-" else x.ToString("0.000e+00")

            printfn "%-28s %-24s %12s %12s  %-7s %s" r.Name r.Kind (num r.WorstError) (num r.Allowed) status r.Detail

    printfn "%d passed, %d failed, %d pending" passed failed pending
    if failed > 0 then 1 else 0

/// Entry point: parses, dispatches, and turns known failures into one line and an exit code.
[<EntryPoint>]
let main argv =
    let parser =
        ArgumentParser.Create<HimarArgs>(programName = "himar", errorHandler = ProcessExiter())

    try
        let results = parser.ParseCommandLine argv

        match results.GetSubCommand() with
        | Info a -> info a
        | Verify_Parity a -> verifyParity a
    with
    | :? TorchLoadException as e ->
        eprintfn "himar: %s" e.Message
        TorchLoadException.ExitCode
    | :? IO.FileNotFoundException as e ->
        eprintfn "himar: %s" e.Message
        2
    | :? IO.InvalidDataException as e ->
        eprintfn "himar: %s" e.Message
        2
    | :? HiMar.Runtime.Checkpoints.CheckpointFormatException as e ->
        eprintfn "himar: %s" e.Message
        HiMar.Runtime.Checkpoints.CheckpointFormatException.ExitCode
