/// What the commands share: device and precision flags, progress in real units, report printing, one-line usage
/// errors. Domain rules (shipped models, a model's defaults, the data pipeline) live in HiMar.Runtime, not here.
module HiMar.Cli.Commands.Common

open System
open Argu
open TorchSharp
open Spectre.Console
open HiMar.Runtime

/// A usage problem found after parsing: one line, exit code 2.
let usageError (message: string) : 'T = raise (BadInputException message)

/// `--device`: cpu, cuda or cuda:N (Flags.fs has already checked that the device exists).
let device (name: string) =
    match name.ToLowerInvariant() with
    | "cpu" -> TorchSharp.torch.CPU
    | d when d.StartsWith "cuda" -> TorchSharp.torch.device d
    | other -> usageError (sprintf "unknown device '%s' (cpu, cuda, cuda:N)" other)

/// The help text of every `--device` flag.
[<Literal>]
let DeviceHelp = "cpu (default), cuda or cuda:N."

/// The help text of `--precision` for evaluation, whose default is fp32 (numbers comparable across machines).
[<Literal>]
let PrecisionHelp =
    "fp32 (default), bf16 or auto: the precision of the networks' products (bf16: bf16 matmuls, fp32 weights, noise and diffusion arithmetic); auto picks bf16 where the device has bf16 units."

/// The help text of `--precision` for sampling, whose default is auto (bf16 scores as fp32 does, in less time).
[<Literal>]
let SamplePrecisionHelp =
    "auto (default), fp32 or bf16: the precision of the networks' products (bf16: bf16 matmuls, fp32 weights, noise and diffusion arithmetic); auto picks bf16 where the device has bf16 units (avx512_bf16 or amx_bf16 CPUs, CUDA 8.0+) and says what it found, else fp32."

/// The help text of `--weights`.
[<Literal>]
let WeightsHelp =
    "ema (default) or model: which weights of a training checkpoint folder or .pth to take; anything else is refused."

/// The help text of `--allow-nonfinite`.
[<Literal>]
let AllowNonfiniteHelp =
    "load weights holding NaN or infinity anyway (a warning instead of the refusal, exit 2)."

/// The precision `--precision` asks for on a device; `auto` says what it found and picked.
let precisionOn (text: string) (dev: TorchSharp.torch.Device) =
    let choice = Native.Precisions.Parse text
    let decision = Native.Precisions.Decide(choice, dev)

    if choice = Native.PrecisionChoice.Auto then
        printfn "precision %s (auto; %s)" decision.Name decision.Reason

    decision.Precision

/// The precisions a benchmark compares: a comma list of fp32, bf16 and auto.
let precisionsOn (text: string) (dev: TorchSharp.torch.Device) =
    text.Split(',', StringSplitOptions.RemoveEmptyEntries ||| StringSplitOptions.TrimEntries)
    |> Array.map (fun t -> precisionOn t dev)
    |> Array.distinct

/// Warnings while loading weights: one line each on stderr.
let warn = Action<string>(eprintfn "himar: warning: %s")

/// Prints a report as indented JSON, and writes it to a file when asked.
let printReport (report: Text.Json.Nodes.JsonObject) (file: string option) =
    let json =
        report.ToJsonString(Text.Json.JsonSerializerOptions(WriteIndented = true))

    printfn "%s" json

    match file with
    | Some path -> Checkpoints.AtomicFile.WriteText(path, json + "\n")
    | None -> ()

    0

/// The last occurrence of the flag with Argu case name `name` among `given` (case name, fields), if any.
let private lastFlag (given: (string * (obj | null) array) list) (name: string) =
    given |> List.tryFindBack (fun (n, _) -> n = name) |> Option.map snd

/// The value of the flag with Argu case name `name`, if given.
let private flagValue<'V> (given: (string * (obj | null) array) list) (name: string) : 'V option =
    lastFlag given name |> Option.map (fun f -> unbox<'V> (nonNull f.[0]))

/// The sampler flags a command was given (`--cfg`, `--re-cfg`, `--temperature`, `--num-iter`, `--phase1-steps`,
/// `--mlp-steps`, `--dit-steps`, `--clip`, `--guidance`, `--schedule`, `--re-schedule`; the last of a repeated flag),
/// read by their Argu case names, so sample, eval, bench sample and ablation map them to Runtime's SamplerFlags in
/// this one place; a flag a command does not have reads as not given.
let samplerFlags (args: ParseResults<'T>) (precision: HiMar.Model.Precision) : Sampling.SamplerFlags =
    let given =
        args.GetAllResults()
        |> List.map (fun r ->
            let case, fields = Reflection.FSharpValue.GetUnionFields(r, typeof<'T>)
            case.Name, fields)

    let flag name = lastFlag given name

    Sampling.SamplerFlags(
        Cfg = Option.toNullable (flagValue<float> given "Cfg"),
        ReCfg = Option.toNullable (flagValue<float> given "Re_Cfg"),
        Temperature = Option.toNullable (flagValue<float> given "Temperature"),
        Phase2Steps = Option.toNullable (flagValue<int> given "Num_Iter"),
        Phase1Steps = Option.toNullable (flagValue<int> given "Phase1_Steps"),
        MlpHeadSteps = Option.toObj (flagValue<string> given "Mlp_Steps"),
        DitHeadSteps = Option.toObj (flagValue<string> given "Dit_Steps"),
        Clip = (flag "Clip").IsSome,
        Guidance = Option.toObj (flagValue<string> given "Guidance"),
        Schedule = Option.toObj (flagValue<string> given "Schedule"),
        ReSchedule = Option.toObj (flagValue<string> given "Re_Schedule"),
        Precision = precision
    )

/// True when progress can redraw in place: stdout and stderr are terminals that take ANSI codes.
let interactive () =
    not Console.IsOutputRedirected
    && not Console.IsErrorRedirected
    && AnsiConsole.Profile.Capabilities.Interactive

/// One counted piece of work: `units` of `total` done, with an optional detail ("loss 0.93 ...").
type Counter(what: string, total: int, redraw: (string -> float -> unit) option) =
    let mutable lastDecile = -1

    /// Reports `count` units done.
    member this.Set(count: int, ?detail: string) =
        let count = min total (max 0 count)

        let line =
            sprintf "%s: %d/%d%s" what count total (detail |> Option.map (sprintf "  %s") |> Option.defaultValue "")

        match redraw with
        | Some draw -> draw line (float count)
        | None ->
            // Plain output (a log, mpirun, a test): one line per tenth of the work, the last at 100%.
            let decile = if total = 0 then 10 else count * 10 / total

            if decile > lastDecile then
                lastDecile <- decile
                printfn "%s (%d%%)" line (decile * 10)

    /// The units of the whole.
    member _.Total = total

/// Runs `work` with a way to add counters: a live bar on a terminal, plain lines (no ANSI codes, no carriage
/// returns) one per tenth of the work when the output is a file or a pipe.
let withProgress (work: (string -> int -> Counter) -> 'T) : 'T =
    if interactive () then
        AnsiConsole
            .Progress()
            .Columns(
                TaskDescriptionColumn(),
                ProgressBarColumn(),
                PercentageColumn(),
                ElapsedTimeColumn(),
                RemainingTimeColumn()
            )
            .Start(fun ctx ->
                work (fun what total ->
                    let task =
                        ctx.AddTask(Markup.Escape(sprintf "%s: 0/%d" what total), maxValue = float (max 1 total))

                    Counter(
                        what,
                        total,
                        Some(fun line value ->
                            task.Description <- Markup.Escape line
                            task.Value <- value)
                    )))
    else
        work (fun what total -> Counter(what, total, None))

/// Prints a two-column table of metrics (name, value), then where the report was written.
let printMetrics (rows: (string * string) list) (report: string) =
    let table =
        Table().AddColumn("metric").AddColumn(TableColumn("value").RightAligned())

    for name, value in rows do
        table.AddRow(Markup.Escape name, Markup.Escape value) |> ignore

    AnsiConsole.Write table
    printfn "wrote %s" report
    0

/// Argu's help and usage errors: help to stdout with exit code 0, any usage error as one line on stderr with exit code
/// 2 (bad input), whatever stage of parsing found it (Argu's own codes would make a missing argument 3, our
/// environment code).
type UsageExiter() =
    interface IExiter with
        member _.Name = "himar"

        member _.Exit(message, code) =
            if code = ErrorCode.HelpText then
                printfn "%s" message
                exit 0
            else
                // One line: Argu's first line names the flag and the problem; the usage is one --help away.
                let lines = message.Split('\n')

                let command =
                    lines
                    |> Array.tryFind (fun l -> l.StartsWith "USAGE: ")
                    |> Option.map (fun l -> (l.Substring 7).Split(" [").[0].Split(" <").[0].Trim())
                    |> Option.defaultValue "himar"

                eprintfn "himar: %s (see '%s --help')" (lines.[0].Replace("ERROR: ", "").TrimEnd('.', ' ')) command
                exit 2

/// The FID Inception network, loaded and moved to the device.
let inception (weights: string) (deviceName: string option) =
    Native.TorchNative.EnsureLoaded()
    let model = Evaluation.InceptionWeights.Load weights

    match deviceName with
    | Some d -> model.``to`` (device d) |> ignore
    | None -> ()

    model
