/// `himar info`: versions, devices, the native patch state, a matmul probe, or a model's parameter table.
module HiMar.Cli.Commands.Info

open System
open Argu
open Spectre.Console
open HiMar.Runtime.Native
open HiMar.Cli.Commands.Common


/// Arguments of `himar info`.
type InfoArgs =
    | [<AltCommandLine("-s")>] Probe_Seconds of seconds: float
    | No_Probe
    | [<AltCommandLine("-m")>] Model of ``name|file``: string

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Probe_Seconds _ -> "seconds each matmul probe (fp32, then bf16) runs (default 2)."
            | No_Probe -> "skip the matmul probe."
            | Model _ ->
                "print the parameter count per module of a model: a shipped model (fashion, fashion-mar, fashion-text), a preset (hi-mar-b, hi-mar-l, hi-mar-h, hi-mar-s, fashion-small) or a JSON file of reference arguments."


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
                    config.Backbone.EncoderDepth
                    config.Backbone.DecoderDepth
                    config.Backbone.EncoderWidth
                    config.Pivots.GridSide
                    config.Pivots.GridSide
                    config.Backbone.ClassCount
            )
        )

    AnsiConsole.Write table
    0

/// Runs `himar info`.
let run (args: ParseResults<InfoArgs>) =
    match args.TryGetResult InfoArgs.Model with
    | Some m ->
        TorchNative.EnsureLoaded()
        modelInfo m
    | None ->

        let e = TorchNative.Describe()
        let grid = Grid().AddColumn().AddColumn()

        let row (k: string) (v: string) =
            grid.AddRow(Markup.Escape k, Markup.Escape v) |> ignore

        row "HiMarFunctional" (string (typeof<InfoArgs>.Assembly.GetName().Version))
        row "TorchSharp" e.TorchSharpVersion
        row "libtorch" e.LibTorchVersion
        row ".NET" e.DotNetVersion
        row "OS" (Runtime.InteropServices.RuntimeInformation.OSDescription)
        row "devices" (String.Join(", ", e.Devices))
        row "threads" (string e.Threads)

        /// A setting himar chooses where the user's environment does not: its value, and who chose it.
        let chosen (value: string) setByHimar (variable: string) =
            if setByHimar then
                sprintf "%s (set by himar: %s was unset)" value variable
            else
                sprintf "%s (%s from the environment)" value variable

        row "OpenMP wait" (chosen e.WaitPolicy.Value e.WaitPolicy.SetByHimar "OMP_WAIT_POLICY")

        row
            "libtorch log"
            (match e.LogLevel.Ignored with
             | null -> chosen (e.LogLevel.Value + " and up") e.LogLevel.SetByHimar "TORCH_CPP_LOG_LEVEL"
             | bad ->
                 sprintf
                     "%s and up (set by himar: TORCH_CPP_LOG_LEVEL '%s' is not INFO, WARNING, ERROR or FATAL)"
                     e.LogLevel.Value
                     bad)

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

            let probe (name: string) dtype =
                AnsiConsole
                    .Status()
                    .Start(
                        sprintf "%s matmul probe (1024 x 1024)..." name,
                        fun _ -> TorchNative.MatmulGflops(seconds, dtype = dtype)
                    )

            let fp32 = probe "fp32" TorchSharp.torch.ScalarType.Float32
            let bf16 = probe "bf16" TorchSharp.torch.ScalarType.BFloat16
            AnsiConsole.MarkupLine(sprintf "matmul fp32   [bold]%.1f GFLOP/s[/] on cpu, %d threads" fp32 e.Threads)
            AnsiConsole.MarkupLine(sprintf "matmul bf16   [bold]%.1f GFLOP/s[/] on cpu (%.1fx fp32)" bf16 (bf16 / fp32))

        let auto =
            HiMar.Runtime.Native.Precisions.Decide(HiMar.Runtime.Native.PrecisionChoice.Auto, TorchSharp.torch.CPU)

        AnsiConsole.MarkupLine(
            Markup.Escape(
                sprintf
                    "precision auto picks %s on cpu (bf16 units: %s)"
                    auto.Name
                    (if auto.Bf16Units then
                         auto.Reason
                     else
                         "none; " + auto.Reason)
            )
        )

        0
