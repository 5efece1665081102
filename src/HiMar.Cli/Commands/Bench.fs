/// `himar bench sample|train|allreduce`: benchmarks, reported as JSON.
module HiMar.Cli.Commands.Bench

open System
open Argu
open TorchSharp
open HiMar.Runtime.Native
open HiMar.Cli.Commands.Common


/// Arguments of `himar bench sample`.
type BenchSampleArgs =
    | [<AltCommandLine("-m"); ExactlyOnce>] Model of ``name|path``: string
    | Images of count: int
    | Repeat of runs: int
    | Cfg of scale: float
    | Re_Cfg of scale: float
    | Num_Iter of steps: int
    | Mlp_Steps of respacing: string
    | Dit_Steps of respacing: string
    | Device of device: string
    | Precision of ``fp32,bf16``: string
    | [<AltCommandLine("-o")>] Out of file: string

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Model _ ->
                "a preset with random weights (hi-mar-b, hi-mar-l, hi-mar-h, fashion), a config JSON, or trained weights: an imported folder, .pth or fixture folder."
            | Images _ -> "images per run (default 1)."
            | Repeat _ -> "timed runs after one warm-up (default 3); the median is reported."
            | Cfg _ -> "phase-2 (dense-token) guidance scale (default 2.5, the reference's ImageNet setting)."
            | Re_Cfg _ -> "phase-1 (pivot) guidance scale (default 2.7, the reference's ImageNet setting)."
            | Num_Iter _ -> "phase-2 steps (default 4)."
            | Mlp_Steps _ -> "MLP-head respacing (default ddim10)."
            | Dit_Steps _ -> "Transformer-head respacing (default ddim10)."
            | Precision _ ->
                "fp32, bf16, auto, or a comma list run one after the other in this process to compare them (default fp32,bf16: both, with the bf16 speed-up)."
            | Device _ -> DeviceHelp
            | Out _ -> "also write the JSON report to this file."

/// Arguments of `himar bench train`.
type BenchTrainArgs =
    | [<AltCommandLine("-m"); ExactlyOnce>] Model of ``name|path``: string
    | Batch of size: int
    | Precision of ``fp32,bf16``: string
    | Steps of count: int
    | [<AltCommandLine("-o")>] Out of file: string

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Model _ -> "hi-mar-b|l|h|fashion, a config JSON, or a parity fixture folder (its model_config)."
            | Precision _ ->
                "fp32, bf16, auto, or a comma list run one after the other in this process to compare them (default fp32,bf16: both, with the bf16 speed-up)."
            | Batch _ -> "images per step and process (default 8)."
            | Steps _ -> "timed steps after one warm-up (default 3); the median is reported."
            | Out _ -> "also write the JSON report to this file."

/// Arguments of `himar bench allreduce`.
type BenchAllReduceArgs =
    | Sizes of bytes: string
    | Repeat of runs: int
    | Backend of ``auto|mpi|nccl``: string
    | Device of device: string
    | [<AltCommandLine("-o")>] Out of file: string

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Sizes _ -> "buffer sizes, comma-separated, with K/M suffixes (default 4K,64K,1M,4M,25M,64M)."
            | Repeat _ -> "timed all-reduces per size after three warm-up ones (default 20); the median is reported."
            | Backend _ -> "auto (default: MPI under mpirun), mpi, or nccl (CUDA tensors; untested)."
            | Device _ -> "where the buffers live: cpu (default) or cuda (for --backend nccl)."
            | Out _ -> "also write the JSON report to this file."

/// Arguments of `himar bench`.
[<RequireSubcommand>]
type BenchArgs =
    | [<CliPrefix(CliPrefix.None)>] Sample of ParseResults<BenchSampleArgs>
    | [<CliPrefix(CliPrefix.None)>] Train of ParseResults<BenchTrainArgs>
    | [<CliPrefix(CliPrefix.None)>] Allreduce of ParseResults<BenchAllReduceArgs>

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Sample _ -> "time the two-phase sampler: seconds per image, settings and GFLOP/s, as JSON."
            | Train _ ->
                "time training steps: seconds per step for a configuration and batch, as JSON; under mpirun also the data-parallel scaling efficiency."
            | Allreduce _ -> "time float32 all-reduces of several sizes over the MPI ranks: seconds and GB/s, as JSON."


let private benchSample (args: ParseResults<BenchSampleArgs>) =
    TorchNative.EnsureLoaded()
    let name = args.GetResult BenchSampleArgs.Model
    use model = HiMar.Runtime.Sampling.SampleBenchmark.LoadForTiming name
    let dev = device (args.GetResult(BenchSampleArgs.Device, defaultValue = "cpu"))
    model.``to`` dev |> ignore

    let precisions =
        precisionsOn (args.GetResult(BenchSampleArgs.Precision, defaultValue = "fp32,bf16")) dev

    let options =
        (samplerFlags args HiMar.Model.Precision.Fp32).Over(HiMar.Runtime.Sampling.SamplerDefaults.Benchmark)

    let report =
        HiMar.Runtime.Native.PrecisionComparison.Run(
            precisions,
            dev,
            "seconds_per_image",
            fun p ->
                HiMar.Runtime.Sampling.SampleBenchmark.Run(
                    model,
                    name,
                    options.WithPrecision p,
                    args.GetResult(Images, defaultValue = 1),
                    args.GetResult(BenchSampleArgs.Repeat, defaultValue = 3)
                )
        )

    printReport report (args.TryGetResult BenchSampleArgs.Out)


let private benchTrain (args: ParseResults<BenchTrainArgs>) =
    TorchNative.EnsureLoaded()
    let name = args.GetResult BenchTrainArgs.Model
    let config = HiMar.Runtime.Training.TrainBenchmark.ConfigOf name

    let comm = HiMar.Runtime.Distributed.Communicators.Create "auto"
    HiMar.Runtime.Distributed.Communicators.ShareCores() |> ignore

    let precisions =
        precisionsOn (args.GetResult(BenchTrainArgs.Precision, defaultValue = "fp32,bf16")) TorchSharp.torch.CPU

    let report =
        HiMar.Runtime.Native.PrecisionComparison.Run(
            precisions,
            TorchSharp.torch.CPU,
            "seconds_per_step",
            fun p ->
                HiMar.Runtime.Training.TrainBenchmark.Run(
                    config,
                    name,
                    args.GetResult(BenchTrainArgs.Batch, defaultValue = 8),
                    args.GetResult(BenchTrainArgs.Steps, defaultValue = 3),
                    communicator = comm,
                    precision = p
                )
        )

    if comm.Rank = 0 then
        printReport report (args.TryGetResult BenchTrainArgs.Out)
    else
        0

/// "4K,25M,1024" -> bytes.
let private parseSizes (text: string) =
    [
        for part in text.Split(',', StringSplitOptions.RemoveEmptyEntries ||| StringSplitOptions.TrimEntries) ->
            let number, scale =
                match part.[part.Length - 1] with
                | 'K'
                | 'k' -> part.[.. part.Length - 2], 1024L
                | 'M'
                | 'm' -> part.[.. part.Length - 2], 1024L * 1024L
                | 'G'
                | 'g' -> part.[.. part.Length - 2], 1024L * 1024L * 1024L
                | _ -> part, 1L

            match Int64.TryParse number with
            | true, n when n > 0L -> n * scale
            | _ -> usageError (sprintf "--sizes: '%s' is not a size (like 4K, 25M or 1024)" part)
    ]

let private benchAllReduce (args: ParseResults<BenchAllReduceArgs>) =
    TorchNative.EnsureLoaded()

    let sizes =
        match args.TryGetResult BenchAllReduceArgs.Sizes with
        | Some text -> parseSizes text
        | None -> List.ofSeq HiMar.Runtime.Distributed.AllReduceBenchmark.DefaultSizes

    use comm =
        HiMar.Runtime.Distributed.Communicators.Create(
            args.GetResult(BenchAllReduceArgs.Backend, defaultValue = "auto")
        )

    let report =
        HiMar.Runtime.Distributed.AllReduceBenchmark.Run(
            comm,
            ResizeArray sizes,
            args.GetResult(BenchAllReduceArgs.Repeat, defaultValue = 20),
            device = args.GetResult(BenchAllReduceArgs.Device, defaultValue = "cpu")
        )

    if comm.Rank = 0 then
        printReport report (args.TryGetResult BenchAllReduceArgs.Out)
    else
        0

/// Runs `himar bench sample|train|allreduce`.
let run (args: ParseResults<BenchArgs>) =
    match args.GetSubCommand() with
    | Sample a -> benchSample a
    | Train a -> benchTrain a
    | Allreduce a -> benchAllReduce a
