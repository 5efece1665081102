/// The `himar` command: parses the command line, checks the flags and dispatches to one handler per command
/// (src/HiMar.Cli/Commands/); every failure ends in one line and a documented exit code.
module HiMar.Cli.Program

open Argu
open HiMar.Cli.Commands

/// The top-level command line.
[<RequireSubcommand>]
type HimarArgs =
    | [<CliPrefix(CliPrefix.None)>] Info of ParseResults<Info.InfoArgs>
    | [<CliPrefix(CliPrefix.None)>] Verify_Parity of ParseResults<VerifyParity.VerifyParityArgs>
    | [<CliPrefix(CliPrefix.None)>] Import of ParseResults<Import.ImportArgs>
    | [<CliPrefix(CliPrefix.None)>] Sample of ParseResults<Sample.SampleArgs>
    | [<CliPrefix(CliPrefix.None)>] Bench of ParseResults<Bench.BenchArgs>
    | [<CliPrefix(CliPrefix.None)>] Train of ParseResults<Train.TrainArgs>
    | [<CliPrefix(CliPrefix.None)>] Cache of ParseResults<Cache.CacheArgs>
    | [<CliPrefix(CliPrefix.None)>] Eval of ParseResults<Eval.EvalArgs>
    | [<CliPrefix(CliPrefix.None)>] Fid_Stats of ParseResults<FidStats.FidStatsArgs>
    | [<CliPrefix(CliPrefix.None)>] Ablation of ParseResults<Ablation.AblationArgs>
    | [<CliPrefix(CliPrefix.None)>] Embed_Captions of ParseResults<EmbedCaptions.EmbedCaptionsArgs>
    | [<CliPrefix(CliPrefix.None)>] Plot_Loss of ParseResults<PlotLoss.PlotLossArgs>
    | [<CliPrefix(CliPrefix.None)>] Plot_Quality of ParseResults<PlotQuality.PlotQualityArgs>
    | [<CliPrefix(CliPrefix.None)>] Serve of ParseResults<Serve.ServeArgs>
    | [<CliPrefix(CliPrefix.None)>] Train_Vae of ParseResults<TrainVae.TrainVaeArgs>

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Info _ -> "print versions, devices, threads, the native patch state and a matmul GFLOP/s probe."
            | Verify_Parity _ ->
                "check our implementation against a reference parity fixture; one line per case, exit 1 on any failure."
            | Import _ -> "convert a reference checkpoint (.pth) or VAE (vae.ckpt) to safetensors plus config.json."
            | Sample _ -> "generate images: two-phase sampling, VAE decoding, PNG files and a labelled grid."
            | Bench _ -> "benchmarks, reported as JSON."
            | Train _ -> "train a model (default: the fashion preset on Fashion-MNIST), resumably."
            | Cache _ -> "encode an image folder with the VAE into a latent cache for training."
            | Eval _ ->
                "FD-FMNIST and class accuracy of a Fashion-MNIST model's samples, or with --inception FID/IS/PR of an image folder; as JSON."
            | Fid_Stats _ ->
                "reference statistics (mu, sigma of the FID Inception features) of an image folder, as .npz."
            | Ablation _ ->
                "the paper's Table 5 and step sweeps on Fashion-MNIST: train, evaluate, tabulate and plot (resumable)."
            | Embed_Captions _ ->
                "precompute caption embeddings (safetensors shards) with a text encoder, so training never runs it."
            | Plot_Loss _ -> "overlay the loss curves of several training runs in one PNG (e.g. fp32 against bf16)."
            | Plot_Quality _ ->
                "a run's quality curve: FD-FMNIST and class accuracy of eval folders against the images trained on."
            | Serve _ -> "a page on 127.0.0.1:8080 that shows the shipped models generate, step by step."
            | Train_Vae _ -> "train a small KL autoencoder on Fashion-MNIST (the tokenizer of latent models)."


/// Entry point: parses, checks the flags, dispatches, and turns every failure into one line and an exit code.
[<EntryPoint>]
let main argv =
    let parser =
        ArgumentParser.Create<HimarArgs>(programName = "himar", errorHandler = Common.UsageExiter())

    let code =
        try
            let results = parser.ParseCommandLine argv
            HiMar.Cli.Flags.checkCommandLine results

            match results.GetSubCommand() with
            | Info a -> Info.run a
            | Verify_Parity a -> VerifyParity.run a
            | Import a -> Import.run a
            | Sample a -> Sample.run a
            | Train a -> Train.run a
            | Cache a -> Cache.run a
            | Eval a -> Eval.run a
            | Fid_Stats a -> FidStats.run a
            | Ablation a -> Ablation.run a
            | Embed_Captions a -> EmbedCaptions.run a
            | Plot_Loss a -> PlotLoss.run a
            | Plot_Quality a -> PlotQuality.run a
            | Train_Vae a -> TrainVae.run a
            | Serve a -> Serve.run a
            | Bench a -> Bench.run a
        with e ->
            // Known failures keep their documented exit code; anything else is a defect: one line, the trace in a file.
            let struct (code, line) = HiMar.Runtime.Failures.Explain e
            eprintfn "himar: %s" line
            code

    // MPI_Finalize after success; MPI_Abort after a failure, so ranks waiting in a collective end too.
    HiMar.Runtime.Distributed.Communicators.Finish code
    code
