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

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Probe_Seconds _ -> "how long the fp32 matmul probe runs (default 2)."
            | No_Probe -> "skip the matmul probe."

/// The top-level command line.
[<RequireSubcommand>]
type HimarArgs =
    | [<CliPrefix(CliPrefix.None)>] Info of ParseResults<InfoArgs>

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Info _ -> "print versions, devices, threads, the native patch state and a matmul GFLOP/s probe."

let private info (args: ParseResults<InfoArgs>) =
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
            AnsiConsole.Status().Start("fp32 matmul probe (1024 x 1024)...", fun _ -> TorchNative.MatmulGflops(seconds))

        AnsiConsole.MarkupLine(sprintf "matmul fp32   [bold]%.1f GFLOP/s[/] on cpu, %d threads" gflops e.Threads)

    0

/// Entry point: parses, dispatches, and turns known failures into one line and an exit code.
[<EntryPoint>]
let main argv =
    let parser =
        ArgumentParser.Create<HimarArgs>(programName = "himar", errorHandler = ProcessExiter())

    try
        let results = parser.ParseCommandLine argv

        match results.GetSubCommand() with
        | Info a -> info a
    with :? TorchLoadException as e ->
        eprintfn "himar: %s" e.Message
        TorchLoadException.ExitCode
