/// The `himar` command: maps arguments to runtime calls in one place and does no math.
module HiMar.Cli.Program

open System
open Argu
open Spectre.Console
open HiMar.Runtime.Native
open TorchSharp

/// A usage problem found after parsing: printed as one line, exit code 2.
exception CliError of string

/// Arguments of `himar info`.
type InfoArgs =
    | [<AltCommandLine("-s")>] Probe_Seconds of seconds: float
    | No_Probe
    | [<AltCommandLine("-m")>] Model of preset_or_file: string

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Probe_Seconds _ -> "how long each matmul probe (fp32, then bf16) runs (default 2)."
            | No_Probe -> "skip the matmul probe."
            | Model _ ->
                "print the parameter count per module of a model: hi-mar-b, hi-mar-l, hi-mar-h, or a JSON file of reference arguments."

/// Arguments of `himar verify-parity`.
type VerifyParityArgs =
    | [<MainCommand; ExactlyOnce>] Dir of dir: string
    | Kind of kind: string
    | Bf16

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Dir _ -> "a parity fixture folder (manifest.json, weights and cases; see shared/fixtures/parity)."
            | Bf16 ->
                "run every case a second time with bf16 products and report its error against the same reference, allowed 2^-5 of the output's scale (failures count)."
            | Kind _ -> "run only the cases of this kind (e.g. mlp_head_forward)."

/// Arguments of `himar import`.
type ImportArgs =
    | [<MainCommand; ExactlyOnce>] Checkpoint of checkpoint: string
    | [<AltCommandLine("-o"); ExactlyOnce>] Out of dir: string
    | Weights of which: string

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Checkpoint _ -> "a reference checkpoint-*.pth, MAR's vae.ckpt, or a safetensors state dict."
            | Out _ -> "the folder to write (weights.safetensors and config.json)."
            | Weights _ -> "ema (default) or model: which weights of a training checkpoint to take."

/// Arguments of `himar sample`.
type SampleArgs =
    | Preset of name: string
    | [<AltCommandLine("-c")>] Checkpoint of path: string
    | Vae of path: string
    | Classes of classes: string
    | [<AltCommandLine("-n")>] N of count: int
    | Per_Class of count: int
    | Cfg of scale: float
    | Re_Cfg of scale: float
    | Guidance of mode: string
    | Schedule of schedule: string
    | Re_Schedule of schedule: string
    | Temperature of t: float
    | Num_Iter of steps: int
    | Phase1_Steps of steps: int
    | Mlp_Steps of respacing: string
    | Dit_Steps of respacing: string
    | Seed of seed: int64
    | Batch of size: int
    | Precision of precision: string
    | Device of device: string
    | [<AltCommandLine("-o")>] Out of dir: string
    | Explain
    | Clip
    | Weights of which: string
    | Prompt of text: string
    | Unconditional
    | Text_Encoder of dir: string
    | Allow_Nonfinite

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Allow_Nonfinite ->
                "load weights holding NaN or infinity anyway (a warning instead of the refusal, exit 2)."
            | Preset _ ->
                "a shipped model: fashion (Fashion-MNIST classes) or fashion-text (captions); no data or download needed."
            | Unconditional ->
                "sample the null condition on purpose (no class, the empty caption): -n images (default 1); an empty --prompt is refused."
            | Prompt _ ->
                "text models: a caption, e.g. \"a sandal\" (repeat the flag for several); --n images each (default 8 for a shipped model, else 1)."
            | Text_Encoder _ ->
                "text models with an external encoder: a CLIP text-model folder (model.safetensors, config.json, vocab.json, merges.txt)."
            | Checkpoint _ ->
                "the model: an imported folder, a training checkpoint folder, a reference .pth (EMA weights), or a parity fixture folder."
            | Vae _ -> "the KL autoencoder: an imported folder, MAR's vae.ckpt, or a safetensors file."
            | Classes _ -> "comma-separated class labels, e.g. 207,360,387,974."
            | N _ -> "this many random classes (from the seed) instead of --classes; with --prompt, images per prompt."
            | Per_Class _ -> "images per class (default 1)."
            | Cfg _ -> "phase-2 guidance scale (dense tokens; default 1 = off)."
            | Re_Cfg _ -> "phase-1 guidance scale (pivots; default 1 = off)."
            | Guidance _ -> "full (default), no-phase2 (the paper's 'without CFG': phase 2 unguided) or off."
            | Schedule _ ->
                "linear (default) or constant guidance schedule (phase 2, and phase 1 unless --re-schedule)."
            | Re_Schedule _ -> "linear or constant schedule of the phase-1 guidance (default: as --schedule)."
            | Temperature _ -> "sampling temperature (default 1)."
            | Num_Iter _ -> "phase-2 steps (default 4)."
            | Phase1_Steps _ -> "phase-1 steps (default 4 x cond_scale)."
            | Mlp_Steps _ -> "respacing of the MLP head's diffusion (default: the model's, 100)."
            | Dit_Steps _ -> "respacing of the Transformer head's diffusion (default: the model's, 250)."
            | Seed _ -> "run seed (default 0); image i is the same for a seed whatever the batch size."
            | Precision _ ->
                "fp32, bf16 or auto: the precision of the networks' products (bf16: bf16 matmuls, fp32 weights, noise and diffusion arithmetic); auto picks bf16 where the device has bf16 units (default fp32)."
            | Batch _ -> "images per batch (default 8)."
            | Device _ -> "cpu (default), cuda or cuda:N."
            | Out _ -> "output folder (default samples/), or a .png path to write only the grid."
            | Explain ->
                "also write per image a strip: the pivots after every phase-1 step, then the image after every phase-2 step, the tokens decided at each step outlined."
            | Clip -> "clamp predicted x0 to [-1, 1] (on by default for pixel-space models; else from sampling.json)."
            | Weights _ -> "ema (default) or model, for training checkpoint folders and .pth files."

/// Arguments of `himar eval`.
type EvalArgs =
    | Preset of name: string
    | [<AltCommandLine("-c")>] Checkpoint of path: string
    | Weights of which: string
    | [<AltCommandLine("-n")>] N of count: int
    | Cfg of scale: float
    | Re_Cfg of scale: float
    | Temperature of t: float
    | Num_Iter of steps: int
    | Phase1_Steps of steps: int
    | Mlp_Steps of respacing: string
    | Dit_Steps of respacing: string
    | Seed of seed: int64
    | Batch of size: int
    | Precision of precision: string
    | [<AltCommandLine("-o")>] Out of dir: string
    | Inception of file: string
    | Images of dir: string
    | Ref_Stats of npz: string
    | Ref_Images of dir: string
    | Text_Encoder of dir: string
    | Training_Templates
    | Device of name: string
    | Allow_Nonfinite

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Allow_Nonfinite ->
                "load weights holding NaN or infinity anyway (a warning instead of the refusal, exit 2)."
            | Preset _ ->
                "the shipped model to evaluate (fashion, or fashion-text: prompted with held-out caption templates)."
            | Text_Encoder _ -> "text models with an external encoder: its folder (CLIP text model)."
            | Training_Templates ->
                "text models: prompt with the training caption templates instead of the held-out ones (the gap shows how well phrasing generalises)."
            | Checkpoint _ -> "a Fashion-MNIST model folder or training checkpoint instead."
            | Weights _ -> "ema (default) or model."
            | N _ -> "class-balanced samples (default 1000); images already in the output folder are reused."
            | Cfg _ -> "phase-2 guidance (default from the model's sampling.json, else 1)."
            | Re_Cfg _ -> "phase-1 guidance (default from sampling.json, else 1)."
            | Temperature _ -> "sampling temperature (default from sampling.json, else 1)."
            | Num_Iter _ -> "phase-2 steps (default 4)."
            | Phase1_Steps _ -> "phase-1 steps (default 4 x cond_scale)."
            | Mlp_Steps _ -> "MLP-head respacing (default the model's)."
            | Dit_Steps _ -> "Transformer-head respacing (default the model's)."
            | Seed _ -> "run seed (default 0)."
            | Precision _ ->
                "fp32, bf16 or auto: the precision of the networks' products (bf16: bf16 matmuls, fp32 weights, noise and diffusion arithmetic); auto picks bf16 where the device has bf16 units (default fp32)."
            | Batch _ -> "images per sampler batch (default 50)."
            | Out _ -> "output folder (default eval/<model>, or eval/<images folder>): eval.json (and images/)."
            | Inception _ ->
                "ImageNet metrics instead: FID/IS/PR of --images with these FID Inception weights (pt_inception-2015-12-05-6726825d.pth or safetensors)."
            | Images _ -> "with --inception: the folder of generated images to score."
            | Ref_Stats _ -> "with --inception: reference statistics (.npz with mu, sigma; see himar fid-stats)."
            | Ref_Images _ -> "with --inception: a reference image folder instead (also gives precision/recall)."
            | Device _ -> "with --inception: cpu (default), cuda or cuda:N."

/// Arguments of `himar fid-stats`.
type FidStatsArgs =
    | [<ExactlyOnce>] Inception of file: string
    | [<ExactlyOnce>] Images of dir: string
    | [<AltCommandLine("-o"); ExactlyOnce>] Out of npz: string
    | Batch of size: int
    | Device of name: string

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Inception _ -> "the FID Inception weights (pt_inception-2015-12-05-6726825d.pth or safetensors)."
            | Images _ -> "the reference image folder (any size, RGB; PNG, JPEG, ...)."
            | Out _ -> "the statistics file to write (.npz with float64 mu and sigma)."
            | Batch _ -> "images per Inception batch (default 50)."
            | Device _ -> "cpu (default), cuda or cuda:N."

/// Arguments of `himar ablation`.
type AblationArgs =
    | Config of nameOrFile: string
    | Data of dir: string
    | [<AltCommandLine("-o")>] Out of dir: string
    | Steps of count: int
    | Batch of size: int
    | Precision of precision: string
    | Blr of rate: float
    | Warmup of steps: int
    | Ema of rate: float
    | Seeds of list: string
    | [<AltCommandLine("-n")>] N of count: int
    | Phase1_Sweep of list: string
    | Phase2_Sweep of list: string
    | Only of keys: string
    | Cfg of scale: float
    | Re_Cfg of scale: float
    | Temperature of t: float
    | Num_Iter of steps: int
    | Mlp_Steps of respacing: string
    | Dit_Steps of respacing: string

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Config _ ->
                "the full Hi-MAR model the variants are cut from: a preset or config JSON (default fashion-small)."
            | Data _ -> "the Fashion-MNIST IDX folder (default /usr/share/datasets/fashion-mnist)."
            | Out _ -> "the run folder (default runs/ablation); an interrupted run resumes from it."
            | Steps _ -> "optimiser steps of every training run (default 1200)."
            | Precision _ ->
                "fp32, bf16 or auto: the precision of every run's training and sampling (bf16: bf16 matmuls, fp32 weights, noise and diffusion arithmetic); auto picks bf16 where the device has bf16 units (default fp32)."
            | Batch _ -> "images per step of every training run (default 32)."
            | Blr _ -> "base learning rate, lr = blr x batch / 256 (default 8e-3: 1e-3 at batch 32)."
            | Warmup _ -> "linear warm-up steps (default 50)."
            | Ema _ -> "EMA rate (default 0.995: about the last 200 steps)."
            | Seeds _ -> "training seeds, comma-separated (default 1,2,3)."
            | N _ -> "class-balanced samples per evaluation (default 250)."
            | Phase1_Sweep _ -> "phase-1 step counts of the first sweep (default 1,2,4,8,16; empty for none)."
            | Phase2_Sweep _ -> "phase-2 step counts of the second sweep (default 1,2,4,8; empty for none)."
            | Only _ -> "only these variants (mar, low-res, cond-tokens, transformer-head, hi-mar), comma-separated."
            | Cfg _ -> "phase-2 guidance (default 3, as the shipped fashion model)."
            | Re_Cfg _ -> "phase-1 guidance (default 3)."
            | Temperature _ -> "sampling temperature (default 0.9)."
            | Num_Iter _ -> "phase-2 steps outside the sweep (default 4)."
            | Mlp_Steps _ -> "MLP-head respacing of every evaluation (default 25)."
            | Dit_Steps _ -> "Transformer-head respacing of every evaluation (default 25)."

/// Arguments of `himar cache`.
type CacheArgs =
    | [<ExactlyOnce>] Data of folder: string
    | [<ExactlyOnce>] Vae of path: string
    | [<AltCommandLine("-o"); ExactlyOnce>] Out of dir: string
    | Size of pixels: int
    | Batch of size: int
    | Captions of file: string

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Captions _ ->
                "a COCO captions JSON (images + annotations): cache the images it lists from --data (a flat folder such as train2017/)."
            | Data _ -> "an image folder in the ImageNet layout (one subfolder per class; JPEG or PNG)."
            | Vae _ -> "the KL autoencoder (imported folder, vae.ckpt or safetensors)."
            | Out _ -> "the cache folder to write (cache.json and safetensors shards)."
            | Size _ -> "centre-crop side in pixels (default 256; the pivots use half)."
            | Batch _ -> "images per VAE batch (default 8)."

/// Arguments of `himar embed-captions`.
type EmbedCaptionsArgs =
    | [<ExactlyOnce>] Text_Encoder of path: string
    | Captions of file: string
    | Fashion
    | Data of dir: string
    | [<AltCommandLine("-o"); ExactlyOnce>] Out of dir: string
    | Float32
    | Batch of size: int
    | Device of device: string

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Text_Encoder _ ->
                "a CLIP text-model folder (model.safetensors, vocab.json, merges.txt) or a himar text model with a built-in encoder."
            | Captions _ -> "a COCO captions JSON (images + annotations); the image keys are its file names."
            | Fashion -> "Fashion-MNIST's training captions instead (five per image, from the labels and templates)."
            | Data _ -> "the Fashion-MNIST IDX folder (default /usr/share/datasets/fashion-mnist)."
            | Out _ -> "the folder to write: embeddings.json, shard-NNNNN.safetensors, empty.safetensors."
            | Float32 -> "store float32 (default float16, half the disk)."
            | Batch _ -> "captions per encoder batch (default 64)."
            | Device _ -> "cpu (default), cuda or cuda:N."

/// Arguments of `himar train`.
type TrainArgs =
    | Preset of name: string
    | Config of file: string
    | Data of dir: string
    | Cache of dir: string
    | Vae of path: string
    | [<AltCommandLine("-o")>] Out of dir: string
    | Steps of count: int
    | Batch of size: int
    | Precision of precision: string
    | Accumulation of micro_batches: int
    | Blr of rate: float
    | Warmup of steps: int
    | Lr_Schedule of schedule: string
    | Weight_Decay of wd: float
    | Grad_Clip of norm: float
    | Ema of rate: float
    | Seed of seed: int64
    | No_Flip
    | Checkpoint_Every of steps: int
    | Keep of count: int
    | Sample_Every of steps: int
    | Log_Every of steps: int
    | Resume
    | Captions of file: string
    | Embeddings of dir: string

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Captions _ ->
                "text models with the built-in encoder on a latent cache: the COCO captions JSON of its images (one caption drawn per image and step)."
            | Embeddings _ ->
                "text models with an external encoder: caption embeddings from `himar embed-captions` (matched to the cache's images, or to Fashion-MNIST's)."
            | Preset _ -> "a model preset (default fashion; fashion-text trains on captions made from the labels)."
            | Config _ -> "a JSON file of reference arguments instead of a preset."
            | Data _ ->
                "the IDX folder (default /usr/share/datasets/fashion-mnist, from apt-get install dataset-fashion-mnist)."
            | Cache _ ->
                "train on a latent cache made by `himar cache` instead (needs --vae for previews and the hash check)."
            | Vae _ -> "the VAE the cache was made with."
            | Out _ -> "the run folder (default runs/<preset>): checkpoints/, samples/, metrics.jsonl, loss.png."
            | Steps _ -> "optimiser steps in total (default 4000); a resumed run continues up to this."
            | Precision _ ->
                "fp32, bf16 or auto: the precision of the networks' products (bf16: bf16 matmuls, fp32 weights, noise and diffusion arithmetic); auto picks bf16 where the device has bf16 units; weights, AdamW, EMA and checkpoints stay fp32, and a run resumes in either precision (default fp32)."
            | Batch _ ->
                "images per step and process (default 64); under mpirun -np N the global batch is N times this."
            | Accumulation _ -> "micro-batches per step (default 1)."
            | Blr _ ->
                "base learning rate: lr = blr x global batch / 256 (default 4e-3, i.e. 1e-3 at a global batch of 64)."
            | Warmup _ -> "linear warm-up steps (default 200)."
            | Lr_Schedule _ -> "constant (default) or cosine."
            | Weight_Decay _ -> "AdamW weight decay (default 0.02)."
            | Grad_Clip _ -> "gradient-norm clip (default 3.0)."
            | Ema _ -> "EMA rate (default 0.999 for short runs; the reference uses 0.9999)."
            | Seed _ -> "run seed (default 1)."
            | No_Flip -> "no random horizontal flips."
            | Checkpoint_Every _ -> "checkpoint every N steps (default 250)."
            | Keep _ -> "checkpoints to keep besides best (default 3)."
            | Sample_Every _ -> "a grid of EMA samples every N steps (default 500; 0 = never)."
            | Log_Every _ -> "metrics every N steps (default 10)."
            | Resume -> "continue from the newest checkpoint of the run folder, exactly."

/// Arguments of `himar bench sample`.
type BenchSampleArgs =
    | [<AltCommandLine("-m"); ExactlyOnce>] Model of model: string
    | Images of count: int
    | Repeat of runs: int
    | Cfg of scale: float
    | Re_Cfg of scale: float
    | Num_Iter of steps: int
    | Mlp_Steps of respacing: string
    | Dit_Steps of respacing: string
    | Device of device: string
    | Precision of precision: string
    | [<AltCommandLine("-o")>] Out of file: string

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Model _ ->
                "hi-mar-b|l|h or a config JSON (random weights), or an imported folder, .pth or fixture folder."
            | Images _ -> "images per run (default 1)."
            | Repeat _ -> "timed runs after one warm-up (default 3); the median is reported."
            | Cfg _ -> "phase-2 guidance (default 2.5)."
            | Re_Cfg _ -> "phase-1 guidance (default 2.7)."
            | Num_Iter _ -> "phase-2 steps (default 4)."
            | Mlp_Steps _ -> "MLP-head respacing (default ddim10)."
            | Dit_Steps _ -> "Transformer-head respacing (default ddim10)."
            | Precision _ ->
                "fp32, bf16, auto, or a comma list run one after the other in this process to compare them (default fp32,bf16: both, with the bf16 speed-up)."
            | Device _ -> "cpu (default), cuda or cuda:N."
            | Out _ -> "also write the JSON report to this file."

/// Arguments of `himar bench train`.
type BenchTrainArgs =
    | [<AltCommandLine("-m"); ExactlyOnce>] Model of model: string
    | Batch of size: int
    | Precision of precision: string
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
    | Backend of backend: string
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

/// Arguments of `himar plot-loss`.
type PlotLossArgs =
    | [<MainCommand; ExactlyOnce>] Runs of run: string list
    | [<AltCommandLine("-o")>] Out of file: string

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Runs _ -> "run folders written by himar train (or their metrics.jsonl files); each becomes one curve."
            | Out _ -> "the PNG to write (default loss-overlay.png)."

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

/// The top-level command line.
[<RequireSubcommand>]
type HimarArgs =
    | [<CliPrefix(CliPrefix.None)>] Info of ParseResults<InfoArgs>
    | [<CliPrefix(CliPrefix.None)>] Verify_Parity of ParseResults<VerifyParityArgs>
    | [<CliPrefix(CliPrefix.None)>] Import of ParseResults<ImportArgs>
    | [<CliPrefix(CliPrefix.None)>] Sample of ParseResults<SampleArgs>
    | [<CliPrefix(CliPrefix.None)>] Bench of ParseResults<BenchArgs>
    | [<CliPrefix(CliPrefix.None)>] Train of ParseResults<TrainArgs>
    | [<CliPrefix(CliPrefix.None)>] Cache of ParseResults<CacheArgs>
    | [<CliPrefix(CliPrefix.None)>] Eval of ParseResults<EvalArgs>
    | [<CliPrefix(CliPrefix.None)>] Fid_Stats of ParseResults<FidStatsArgs>
    | [<CliPrefix(CliPrefix.None)>] Ablation of ParseResults<AblationArgs>
    | [<CliPrefix(CliPrefix.None)>] Embed_Captions of ParseResults<EmbedCaptionsArgs>
    | [<CliPrefix(CliPrefix.None)>] Plot_Loss of ParseResults<PlotLossArgs>
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
            | Serve _ -> "a page on 127.0.0.1:8080 that shows the shipped models generate, step by step."
            | Train_Vae _ -> "train a small KL autoencoder on Fashion-MNIST (the tokenizer of latent models)."

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
    match args.TryGetResult InfoArgs.Model with
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

let private verifyParity (args: ParseResults<VerifyParityArgs>) =
    TorchNative.EnsureLoaded()
    let dir = args.GetResult Dir
    let only = args.TryGetResult Kind
    use fixture = HiMar.Runtime.Parity.ParityFixture.Open dir
    let mutable failed = 0
    let mutable passed = 0
    let mutable pending = 0

    let runAll (precision: HiMar.Model.Precision) =
        fixture.Precision <- precision
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

                printfn
                    "%-28s %-24s %12s %12s  %-7s %s"
                    r.Name
                    r.Kind
                    (num r.WorstError)
                    (num r.Allowed)
                    status
                    r.Detail

    runAll HiMar.Model.Precision.Fp32

    if args.Contains Bf16 then
        printfn
            "\nbf16 products (allowed: atol + max(rtol, %.4f) x max |reference|; see ParityRunner.Bf16Rtol)"
            HiMar.Runtime.Parity.ParityRunner.Bf16Rtol

        runAll HiMar.Model.Precision.Bf16

    printfn "%d passed, %d failed, %d pending" passed failed pending
    if failed > 0 then 1 else 0

let private import' (args: ParseResults<ImportArgs>) =
    TorchNative.EnsureLoaded()
    let source = args.GetResult ImportArgs.Checkpoint
    let out = args.GetResult ImportArgs.Out

    let useEma =
        match args.GetResult(ImportArgs.Weights, defaultValue = "ema").ToLowerInvariant() with
        | "ema" -> true
        | "model" -> false
        | other -> raise (CliError(sprintf "--weights must be ema or model, not '%s'" other))

    let struct (kind, summary) =
        HiMar.Runtime.Checkpoints.ReferenceImport.Import(source, out, useEma)

    printfn "imported %s (%A, %s) -> %s" source kind summary out
    0

let private device (name: string) =
    match name.ToLowerInvariant() with
    | "cpu" -> TorchSharp.torch.CPU
    | d when d.StartsWith "cuda" -> TorchSharp.torch.device d
    | other -> raise (CliError(sprintf "unknown device '%s' (cpu, cuda, cuda:N)" other))

/// The precision `--precision` asks for on a device; `auto` says what it found and picked.
let private precisionOn (text: string) (dev: TorchSharp.torch.Device) =
    let choice = HiMar.Runtime.Native.Precisions.Parse text
    let decision = HiMar.Runtime.Native.Precisions.Decide(choice, dev)

    if choice = HiMar.Runtime.Native.PrecisionChoice.Auto then
        printfn "precision %s (auto; %s)" decision.Name decision.Reason

    decision.Precision

/// The precisions a benchmark compares: a comma list of fp32, bf16 and auto.
let private precisionsOn (text: string) (dev: TorchSharp.torch.Device) =
    text.Split(',', StringSplitOptions.RemoveEmptyEntries ||| StringSplitOptions.TrimEntries)
    |> Array.map (fun t -> precisionOn t dev)
    |> Array.distinct

/// A setting from the model folder's sampling.json, or the fallback.
let private modelDefault (modelDir: string) =
    let defaults = HiMar.Runtime.Sampling.SamplerSettings.Defaults modelDir

    fun (key: string) (fallback: float) ->
        match defaults.TryGetValue key with
        | true, v -> v
        | _ -> fallback

/// A progress display with a bar, percentage, elapsed and remaining time.
let private progressBar () =
    AnsiConsole
        .Progress()
        .Columns(
            TaskDescriptionColumn(),
            ProgressBarColumn(),
            PercentageColumn(),
            ElapsedTimeColumn(),
            RemainingTimeColumn()
        )

/// Prints a benchmark report as indented JSON, and writes it to a file when asked.
let private printReport (report: Text.Json.Nodes.JsonObject) (file: string option) =
    let json =
        report.ToJsonString(Text.Json.JsonSerializerOptions(WriteIndented = true))

    printfn "%s" json

    match file with
    | Some path -> HiMar.Runtime.Checkpoints.AtomicFile.WriteText(path, json + "\n")
    | None -> ()

    0

let private parseSchedule (flag: string) (text: string) =
    match text.ToLowerInvariant() with
    | "linear" -> HiMar.Runtime.Sampling.CfgSchedule.Linear
    | "constant" -> HiMar.Runtime.Sampling.CfgSchedule.Constant
    | other -> raise (CliError(sprintf "%s must be linear or constant, not '%s'" flag other))

/// The folder of a shipped model (models/<name> beside the executable); an unknown name lists the shipped ones.
let private shippedModel (name: string) =
    let models = IO.Path.Combine(AppContext.BaseDirectory, "models")
    let dir = IO.Path.Combine(models, name.ToLowerInvariant())

    if not (IO.Directory.Exists dir) || name.ToLowerInvariant() = "fashion-classifier" then
        let shipped =
            IO.Directory.GetDirectories models
            |> Array.map IO.Path.GetFileName
            |> Array.filter (fun n -> n <> "fashion-classifier")
            |> Array.sort

        raise (CliError(sprintf "--preset: no shipped model '%s' (shipped: %s)" name (String.Join(", ", shipped))))

    dir

let private sample (args: ParseResults<SampleArgs>) =
    TorchNative.EnsureLoaded()
    let dev = device (args.GetResult(SampleArgs.Device, defaultValue = "cpu"))

    let preset = args.TryGetResult SampleArgs.Preset

    let ckpt =
        match preset, args.TryGetResult SampleArgs.Checkpoint with
        | _, Some c -> c
        | Some p, None -> shippedModel p
        | None, None -> raise (CliError "himar sample needs --checkpoint (or --preset fashion)")

    let useEma =
        match args.GetResult(SampleArgs.Weights, defaultValue = "ema").ToLowerInvariant() with
        | "ema" -> true
        | "model" -> false
        | other -> raise (CliError(sprintf "--weights must be ema or model, not '%s'" other))

    let allowNonFinite = args.Contains SampleArgs.Allow_Nonfinite
    let warn = Action<string>(eprintfn "himar: warning: %s")

    use model =
        HiMar.Runtime.Checkpoints.ReferenceImport.LoadModel(ckpt, useEma, allowNonFinite, warn)

    model.``to`` dev |> ignore
    let pixelModel = model.Config.ImgSize = 32 && model.Config.VaeStride = 4

    let tokenizer: HiMar.Runtime.Data.ITokenizer =
        match args.TryGetResult SampleArgs.Vae with
        | Some vaePath ->
            let vae =
                HiMar.Runtime.Checkpoints.ReferenceImport.LoadVae(vaePath, allowNonFinite, warn)

            vae.``to`` dev |> ignore
            HiMar.Runtime.Data.VaeTokenizer vae
        | None when pixelModel -> HiMar.Runtime.Data.PixelPatchTokenizer.Fashion
        | None -> raise (CliError "himar sample needs --vae to decode this model's latents")

    // A model folder may carry its recommended sampling settings (sampling.json: cfg, re_cfg, num_iter, ...).
    let dflt = modelDefault ckpt

    let seed = args.GetResult(SampleArgs.Seed, defaultValue = 0L)

    let perClass =
        args.GetResult(
            SampleArgs.Per_Class,
            defaultValue =
                (if preset.IsSome && not (args.Contains SampleArgs.Unconditional) then
                     6
                 else
                     1)
        )

    let classNum = model.Config.ClassNum

    let unconditional = args.Contains SampleArgs.Unconditional

    if
        unconditional
        && (args.Contains SampleArgs.Prompt || args.Contains SampleArgs.Classes)
    then
        raise (CliError "--unconditional samples the null condition: give it without --prompt or --classes")

    HiMar.Runtime.Text.Prompts.CheckGiven(args.GetResults SampleArgs.Prompt, model.Config)

    let classes =
        match args.TryGetResult SampleArgs.Classes, args.TryGetResult SampleArgs.N with
        | _ when unconditional -> Array.create (args.GetResult(SampleArgs.N, defaultValue = 1)) (int64 classNum)
        | Some text, _ ->
            text.Split(',', StringSplitOptions.RemoveEmptyEntries)
            |> Array.map (fun c ->
                match Int64.TryParse(c.Trim()) with
                | true, v when v >= 0L && v < int64 classNum -> v
                | _ -> raise (CliError(sprintf "--classes: '%s' is not a class of 0..%d" c (classNum - 1))))
        | None, Some n ->
            let rng = Random(int seed)
            Array.init n (fun _ -> int64 (rng.Next classNum))
        | None, None when preset.IsSome -> [| 0L .. int64 classNum - 1L |]
        | None, None -> [| 0L .. int64 (min 4 classNum) - 1L |]

    let textModel = model.Config.Conditioning = HiMar.Model.Conditioning.Text
    let promptsGiven = args.GetResults SampleArgs.Prompt

    // A shipped Fashion-MNIST text model without a prompt shows every class ("a t-shirt", "a pair of trousers", ...).
    let promptsGiven =
        if textModel && unconditional then
            [ "" ]
        elif textModel && promptsGiven.IsEmpty && preset.IsSome && model.Config.ClassNum = 10 then
            [
                for phrases in HiMar.Model.FashionCaptions.classPhrases ->
                    HiMar.Model.FashionCaptions.fill "{a} {x}" phrases.[0]
            ]
        elif textModel && promptsGiven.IsEmpty then
            raise (CliError "this is a text-to-image model: give a caption with --prompt \"...\"")
        else
            promptsGiven

    if not textModel && not promptsGiven.IsEmpty then
        raise (CliError "this model is conditioned on class labels, not captions: use --classes or --n")

    let perPrompt =
        args.GetResult(
            SampleArgs.N,
            defaultValue =
                (if unconditional then
                     1
                 elif preset.IsSome && args.GetResults(SampleArgs.Prompt).IsEmpty then
                     6
                 elif preset.IsSome then
                     8
                 else
                     1)
        )

    let prompts =
        [
            for p in promptsGiven do
                for _ in 1..perPrompt -> p
        ]

    let labels =
        if textModel then
            []
        else
            [
                for c in classes do
                    for _ in 1..perClass -> c
            ]

    let textEncoder: HiMar.Model.ITextEncoder | null =
        match args.TryGetResult SampleArgs.Text_Encoder with
        | Some dir when textModel -> HiMar.Runtime.Text.TextEncoders.Load(dir, dev)
        | Some _ -> raise (CliError "--text-encoder is for text models")
        | None -> null

    use _ = textEncoder

    let cfg = args.GetResult(SampleArgs.Cfg, defaultValue = dflt "cfg" 1.0)
    let reCfg = args.GetResult(SampleArgs.Re_Cfg, defaultValue = dflt "re_cfg" 1.0)

    let cfg, reCfg =
        match args.GetResult(SampleArgs.Guidance, defaultValue = "full").ToLowerInvariant() with
        | "full" -> cfg, reCfg
        | "no-phase2" -> 1.0, reCfg
        | "off" -> 1.0, 1.0
        | other -> raise (CliError(sprintf "--guidance must be full, no-phase2 or off, not '%s'" other))

    let options =
        HiMar.Runtime.Sampling.SamplerOptions(
            Cfg = cfg,
            ReCfg = reCfg,
            Temperature = args.GetResult(SampleArgs.Temperature, defaultValue = dflt "temperature" 1.0),
            ClipDenoised =
                (args.Contains SampleArgs.Clip
                 || dflt "clip_denoised" (if pixelModel then 1.0 else 0.0) <> 0.0),
            Phase2Steps = args.GetResult(SampleArgs.Num_Iter, defaultValue = int (dflt "num_iter" 4.0)),
            Phase1Steps =
                (match args.TryGetResult SampleArgs.Phase1_Steps with
                 | Some s -> Nullable s
                 | None -> Nullable()),
            MlpHeadSteps = (args.TryGetResult SampleArgs.Mlp_Steps |> Option.toObj),
            DitHeadSteps = (args.TryGetResult SampleArgs.Dit_Steps |> Option.toObj),
            Schedule = parseSchedule "--schedule" (args.GetResult(SampleArgs.Schedule, defaultValue = "linear")),
            ReCfgSchedule =
                (match args.TryGetResult SampleArgs.Re_Schedule with
                 | Some text -> Nullable(parseSchedule "--re-schedule" text)
                 | None -> Nullable()),
            Precision = precisionOn (args.GetResult(SampleArgs.Precision, defaultValue = "fp32")) dev
        )

    let out =
        args.GetResult(
            SampleArgs.Out,
            defaultValue =
                (match preset with
                 | Some p -> p.ToLowerInvariant() + ".png"
                 | None -> "samples")
        )

    let gridOnly = out.EndsWith(".png", StringComparison.OrdinalIgnoreCase)

    let request =
        HiMar.Runtime.Sampling.SampleRequest(
            Labels = ResizeArray labels,
            Prompts =
                (if textModel then
                     (ResizeArray prompts :> Collections.Generic.IReadOnlyList<string> | null)
                 else
                     null),
            TextEncoder = textEncoder,
            Seed = seed,
            BatchSize = args.GetResult(SampleArgs.Batch, defaultValue = (if pixelModel then 64 else 8)),
            OutDir =
                (if gridOnly then
                     (match IO.Path.GetDirectoryName(IO.Path.GetFullPath out) with
                      | null -> "."
                      | d -> d)
                 else
                     out),
            GridPath = (if gridOnly then out else null),
            Columns =
                (if textModel then min perPrompt 8
                 elif preset.IsSome then perClass
                 else 0),
            ClassNames =
                (if classNum = 10 && pixelModel then
                     HiMar.Runtime.Data.IdxDataset.FashionClasses
                 else
                     ResizeArray()),
            Explain = args.Contains SampleArgs.Explain,
            Options = options
        )

    let total = if textModel then prompts.Length else labels.Length

    let output =
        (progressBar ())
            .Start(fun ctx ->
                let images = ctx.AddTask(sprintf "%d images" total, maxValue = float total)
                let steps = ctx.AddTask("phase 1", maxValue = 1.0)

                HiMar.Runtime.Sampling.SampleJob.Run(
                    model,
                    tokenizer,
                    request,
                    fun doneImages p ->
                        images.Value <- float doneImages

                        if p.Steps > 0 then
                            let frac =
                                (float p.Step + float p.DiffusionStep / float p.DiffusionSteps) / float p.Steps

                            steps.Description <- sprintf "phase %d, step %d/%d" p.Phase (p.Step + 1) p.Steps
                            steps.Value <- frac
                ))

    printfn
        "sampled %d images; wrote %s%s in %.1f s"
        total
        output.Grid
        (if output.Explanations.Count > 0 then
             sprintf " and %d explanation strips" output.Explanations.Count
         else
             "")
        output.Seconds

    0

let private benchSample (args: ParseResults<BenchSampleArgs>) =
    TorchNative.EnsureLoaded()
    let name = args.GetResult BenchSampleArgs.Model
    use model = HiMar.Runtime.Sampling.SampleBenchmark.LoadForTiming name
    let dev = device (args.GetResult(BenchSampleArgs.Device, defaultValue = "cpu"))
    model.``to`` dev |> ignore

    let precisions =
        precisionsOn (args.GetResult(BenchSampleArgs.Precision, defaultValue = "fp32,bf16")) dev

    let options =
        HiMar.Runtime.Sampling.SamplerOptions(
            Cfg = args.GetResult(BenchSampleArgs.Cfg, defaultValue = 2.5),
            ReCfg = args.GetResult(BenchSampleArgs.Re_Cfg, defaultValue = 2.7),
            Phase2Steps = args.GetResult(BenchSampleArgs.Num_Iter, defaultValue = 4),
            MlpHeadSteps = args.GetResult(BenchSampleArgs.Mlp_Steps, defaultValue = "ddim10"),
            DitHeadSteps = args.GetResult(BenchSampleArgs.Dit_Steps, defaultValue = "ddim10")
        )

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

let private train (args: ParseResults<TrainArgs>) =
    TorchNative.EnsureLoaded()
    let presetName = args.GetResult(TrainArgs.Preset, defaultValue = "fashion")

    let config =
        match args.TryGetResult TrainArgs.Config with
        | Some file -> HiMar.Runtime.Checkpoints.ModelConfigs.Resolve file
        | None -> HiMar.Runtime.Checkpoints.ModelConfigs.Resolve presetName

    let cache = args.TryGetResult TrainArgs.Cache

    if cache.IsNone && (config.ImgSize <> 32 || config.VaeStride <> 4) then
        raise (
            CliError
                "IDX data trains with the pixel-patch tokenizer (img_size 32, vae_stride 4, as the fashion preset); for other configs make a latent cache with `himar cache` and pass --cache and --vae"
        )

    let options =
        HiMar.Runtime.Training.TrainOptions(
            OutDir = args.GetResult(TrainArgs.Out, defaultValue = IO.Path.Combine("runs", presetName)),
            Steps = args.GetResult(TrainArgs.Steps, defaultValue = 4000),
            BatchSize = args.GetResult(TrainArgs.Batch, defaultValue = 64),
            Accumulation = args.GetResult(Accumulation, defaultValue = 1),
            BaseLr = args.GetResult(Blr, defaultValue = 4e-3),
            WarmupSteps = args.GetResult(Warmup, defaultValue = 200),
            LrSchedule = args.GetResult(Lr_Schedule, defaultValue = "constant"),
            WeightDecay = args.GetResult(Weight_Decay, defaultValue = 0.02),
            GradClip = args.GetResult(Grad_Clip, defaultValue = 3.0),
            EmaRate = args.GetResult(TrainArgs.Ema, defaultValue = 0.999),
            Seed = args.GetResult(TrainArgs.Seed, defaultValue = 1L),
            Flip = not (args.Contains No_Flip),
            CheckpointEvery = args.GetResult(Checkpoint_Every, defaultValue = 250),
            KeepLast = args.GetResult(Keep, defaultValue = 3),
            SampleEvery = args.GetResult(Sample_Every, defaultValue = 500),
            LogEvery = args.GetResult(Log_Every, defaultValue = 10),
            Precision = precisionOn (args.GetResult(TrainArgs.Precision, defaultValue = "fp32")) TorchSharp.torch.CPU
        )

    let comm = HiMar.Runtime.Distributed.Communicators.Create "auto"
    let threads = HiMar.Runtime.Distributed.Communicators.ShareCores()
    let root = comm.Rank = 0

    if root && comm.Size > 1 then
        printfn
            "data-parallel training on %d ranks (%s), %d libtorch thread%s per rank"
            comm.Size
            comm.Backend
            threads
            (if threads = 1 then "" else "s")

        if config.AttnDropout > 0.0 || config.ProjDropout > 0.0 then
            eprintfn
                "himar: warning: dropout masks are drawn per rank from the shared generator (ranks share masks); %s"
                "the N-rank run no longer equals one process of the global batch exactly"

    use trainer =
        match cache with
        | Some dir ->
            let latents = HiMar.Runtime.Data.LatentCache.Open dir

            let vae =
                HiMar.Runtime.Checkpoints.ReferenceImport.LoadVae(
                    args.TryGetResult TrainArgs.Vae
                    |> Option.defaultWith (fun () -> raise (CliError "--cache needs --vae"))
                )

            latents.CheckVae vae

            let keys () =
                match latents.Files with
                | null ->
                    raise (
                        CliError(
                            sprintf
                                "%s: this cache does not list its images (made by an older himar); rebuild it to train on captions"
                                dir
                        )
                    )
                | files -> files

            let captions: HiMar.Runtime.Text.ICaptionSource | null =
                match args.TryGetResult TrainArgs.Captions, args.TryGetResult TrainArgs.Embeddings with
                | Some _, Some _ -> raise (CliError "give --captions or --embeddings, not both")
                | Some file, None ->
                    HiMar.Runtime.Text.CaptionTexts.ForKeys(HiMar.Runtime.Text.CocoCaptions.Load file, keys (), file)
                | None, Some emb -> HiMar.Runtime.Text.CaptionEmbeddings.Open(emb, keys ())
                | None, None -> null

            new HiMar.Runtime.Training.Trainer(
                config,
                latents,
                HiMar.Runtime.Data.VaeTokenizer vae,
                options,
                args.Contains Resume,
                comm,
                captions
            )
        | None ->
            let data =
                HiMar.Runtime.Data.IdxDataset.FashionMnist(
                    args.GetResult(TrainArgs.Data, defaultValue = HiMar.Runtime.Data.IdxDataset.FashionMnistDir)
                )

            // Text models on Fashion-MNIST read captions made from the labels ("a photo of a sneaker").
            let captions: HiMar.Runtime.Text.ICaptionSource | null =
                match args.TryGetResult TrainArgs.Embeddings with
                | Some emb ->
                    HiMar.Runtime.Text.CaptionEmbeddings.Open(
                        emb,
                        HiMar.Runtime.Text.CaptionTexts.FashionMnistKeys data.Count
                    )
                | None when config.Conditioning = HiMar.Model.Conditioning.Text ->
                    HiMar.Runtime.Text.CaptionTexts.FashionMnist data.Labels
                | None -> null

            new HiMar.Runtime.Training.Trainer(
                config,
                data,
                HiMar.Runtime.Data.PixelPatchTokenizer.Fashion,
                options,
                args.Contains Resume,
                comm,
                captions
            )

    if root then
        for skipped in trainer.SkippedCheckpoints do
            eprintfn "himar: warning: skipped checkpoint %s" skipped

        if trainer.RemovedDebris.Count > 0 then
            eprintfn "himar: removed %s (left by an interrupted run)" (String.Join(", ", trainer.RemovedDebris))

    if root && trainer.Step > 0 then
        printfn "resuming %s at step %d" options.OutDir trainer.Step

    if root then
        (progressBar ())
            .Start(fun ctx ->
                let task = ctx.AddTask("training", maxValue = float options.Steps)
                task.Value <- float trainer.Step

                trainer.Run(fun p ->
                    task.Value <- float p.Step

                    task.Description <-
                        sprintf
                            "step %d  loss %.4f (%.3f / %.3f)  lr %.1e  %.0f img/s"
                            p.Step
                            p.Loss
                            p.Phase1
                            p.Phase2
                            p.Lr
                            p.ImagesPerSecond))
    else
        // Other ranks train silently: rank 0 logs, checkpoints and shows progress.
        trainer.Run()

    if root then
        printfn "done: %d steps; checkpoints in %s" trainer.Step trainer.CheckpointsDir

    0

let private cache (args: ParseResults<CacheArgs>) =
    TorchNative.EnsureLoaded()

    let size = args.GetResult(Size, defaultValue = 256)

    let folder =
        match args.TryGetResult CacheArgs.Captions with
        | Some file ->
            let coco = HiMar.Runtime.Text.CocoCaptions.Load file
            HiMar.Runtime.Data.ImageFolder.FromFiles(args.GetResult CacheArgs.Data, coco.Files, size)
        | None -> HiMar.Runtime.Data.ImageFolder(args.GetResult CacheArgs.Data, size)

    use vae =
        HiMar.Runtime.Checkpoints.ReferenceImport.LoadVae(args.GetResult CacheArgs.Vae)

    let out = args.GetResult CacheArgs.Out
    let warnings = ResizeArray<string>()

    let manifest =
        AnsiConsole
            .Progress()
            .Start(fun ctx ->
                let task =
                    ctx.AddTask(sprintf "encoding %d images" folder.Count, maxValue = float folder.Count)

                HiMar.Runtime.Data.LatentCache.Build(
                    folder,
                    vae,
                    out,
                    args.GetResult(CacheArgs.Batch, defaultValue = 8),
                    (fun doneCount _ -> task.Value <- float doneCount),
                    (fun w -> warnings.Add w)
                ))

    for w in warnings do
        eprintfn "warning: %s" w

    printfn
        "cached %d images of %d classes in %s; %d skipped"
        ((nonNull manifest.["count"]).GetValue<int>())
        folder.ClassCount
        out
        warnings.Count

    0

let private plotLoss (args: ParseResults<PlotLossArgs>) =
    let runs = args.GetResult Runs
    let out = args.GetResult(Out, defaultValue = "loss-overlay.png")

    let curves =
        runs
        |> List.map (fun r ->
            let label =
                let full = IO.Path.GetFullPath(r).TrimEnd('/')

                if IO.File.Exists full then
                    nonNull (IO.Path.GetFileName(nonNull (IO.Path.GetDirectoryName full)))
                else
                    nonNull (IO.Path.GetFileName full)

            struct (label, HiMar.Runtime.Training.LossCurve.Read r))

    HiMar.Runtime.Training.LossCurve.SaveOverlay(Collections.Generic.List curves, out)

    for struct (label, points) in curves do
        let struct (lastStep, lastLoss) = points.[points.Count - 1]

        let tail =
            points
            |> Seq.skip (max 0 (points.Count - 10))
            |> Seq.averageBy (fun struct (_, l) -> l)

        printfn
            "%s: %d points, last step %d, loss %.4f (mean of the last 10: %.4f)"
            label
            points.Count
            lastStep
            lastLoss
            tail

    printfn "wrote %s" out
    0

let private embedCaptions (args: ParseResults<EmbedCaptionsArgs>) =
    TorchNative.EnsureLoaded()
    let dev = device (args.GetResult(EmbedCaptionsArgs.Device, defaultValue = "cpu"))
    let encoderPath = args.GetResult EmbedCaptionsArgs.Text_Encoder

    let keys, captions =
        match args.TryGetResult EmbedCaptionsArgs.Captions, args.Contains EmbedCaptionsArgs.Fashion with
        | Some file, false ->
            let coco = HiMar.Runtime.Text.CocoCaptions.Load file

            if coco.WithoutCaptions > 0 then
                eprintfn "warning: %s: %d images have no caption and are left out" file coco.WithoutCaptions

            coco.Files, coco.Captions
        | None, true ->
            let data =
                HiMar.Runtime.Data.IdxDataset.FashionMnist(
                    args.GetResult(EmbedCaptionsArgs.Data, defaultValue = HiMar.Runtime.Data.IdxDataset.FashionMnistDir)
                )

            HiMar.Runtime.Text.CaptionTexts.FashionMnistKeys data.Count,
            (HiMar.Runtime.Text.CaptionTexts.FashionMnist data.Labels).Captions
        | _ -> raise (CliError "give one of --captions FILE or --fashion")

    use encoder = HiMar.Runtime.Text.TextEncoders.Load(encoderPath, dev)
    let out = args.GetResult EmbedCaptionsArgs.Out
    let total = captions |> Seq.sumBy (fun c -> c.Count)

    let manifest =
        (progressBar ())
            .Start(fun ctx ->
                let task =
                    ctx.AddTask(sprintf "embedding %d captions" total, maxValue = float total)

                HiMar.Runtime.Text.CaptionEmbeddings.Build(
                    keys,
                    captions,
                    encoder,
                    nonNull (IO.Path.GetFileName(IO.Path.GetFullPath(encoderPath).TrimEnd('/'))),
                    out,
                    not (args.Contains EmbedCaptionsArgs.Float32),
                    batchSize = args.GetResult(EmbedCaptionsArgs.Batch, defaultValue = 64),
                    progress = fun d _ -> task.Value <- float d
                ))

    printfn
        "embedded %d captions of %d images (%d x %d each) in %s"
        total
        keys.Count
        encoder.ContextLength
        encoder.Width
        out

    ignore manifest
    0

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
            | _ -> raise (CliError(sprintf "--sizes: '%s' is not a size (like 4K, 25M or 1024)" part))
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

let private evalSamples (args: ParseResults<EvalArgs>) =
    TorchNative.EnsureLoaded()
    let models = IO.Path.Combine(AppContext.BaseDirectory, "models")

    let name, ckpt =
        match args.TryGetResult EvalArgs.Checkpoint, args.TryGetResult EvalArgs.Preset with
        | Some c, _ ->
            (match IO.Path.GetFileName(IO.Path.TrimEndingDirectorySeparator c) with
             | null -> "model"
             | n -> n),
            c
        | None, p ->
            let p = defaultArg p "fashion"
            p, shippedModel p

    let useEma =
        args.GetResult(EvalArgs.Weights, defaultValue = "ema").ToLowerInvariant()
        <> "model"

    use model =
        HiMar.Runtime.Checkpoints.ReferenceImport.LoadModel(
            ckpt,
            useEma,
            args.Contains EvalArgs.Allow_Nonfinite,
            Action<string>(eprintfn "himar: warning: %s")
        )

    if
        model.Config.ImgSize <> 32
        || model.Config.VaeStride <> 4
        || model.Config.ClassNum <> 10
    then
        raise (
            CliError
                "himar eval samples Fashion-MNIST models (pixel patches, 10 classes); for ImageNet, score a folder of samples with --inception FILE --images DIR"
        )

    let clfDir = IO.Path.Combine(models, "fashion-classifier")
    use classifier = HiMar.Runtime.Evaluation.ClassifierRuns.Load clfDir

    let dflt = modelDefault ckpt

    let options =
        HiMar.Runtime.Sampling.SamplerOptions(
            Cfg = args.GetResult(EvalArgs.Cfg, defaultValue = dflt "cfg" 1.0),
            ReCfg = args.GetResult(EvalArgs.Re_Cfg, defaultValue = dflt "re_cfg" 1.0),
            Temperature = args.GetResult(EvalArgs.Temperature, defaultValue = dflt "temperature" 1.0),
            Phase2Steps = args.GetResult(EvalArgs.Num_Iter, defaultValue = int (dflt "num_iter" 4.0)),
            Phase1Steps = (args.TryGetResult EvalArgs.Phase1_Steps |> Option.toNullable),
            MlpHeadSteps = (args.TryGetResult EvalArgs.Mlp_Steps |> Option.toObj),
            DitHeadSteps = (args.TryGetResult EvalArgs.Dit_Steps |> Option.toObj),
            ClipDenoised = true,
            Precision = precisionOn (args.GetResult(EvalArgs.Precision, defaultValue = "fp32")) TorchSharp.torch.CPU
        )

    let count = args.GetResult(EvalArgs.N, defaultValue = 1000)
    let out = args.GetResult(EvalArgs.Out, defaultValue = IO.Path.Combine("eval", name))

    let textEncoder: HiMar.Model.ITextEncoder | null =
        match args.TryGetResult EvalArgs.Text_Encoder with
        | Some dir -> HiMar.Runtime.Text.TextEncoders.Load dir
        | None -> null

    use _ = textEncoder

    let result =
        (progressBar ())
            .Start(fun ctx ->
                let task = ctx.AddTask(sprintf "sampling %d images" count, maxValue = float count)

                HiMar.Runtime.Evaluation.EvalJob.Run(
                    model,
                    ckpt,
                    useEma,
                    classifier,
                    IO.Path.Combine(clfDir, "train-stats.npz"),
                    count,
                    options,
                    args.GetResult(EvalArgs.Seed, defaultValue = 0L),
                    out,
                    args.GetResult(EvalArgs.Batch, defaultValue = 50),
                    (fun d _ -> task.Value <- float d),
                    textEncoder,
                    args.Contains Training_Templates
                ))

    let metrics = nonNull result.Report.["metrics"]

    let table =
        Table().AddColumn("metric").AddColumn(TableColumn("value").RightAligned())

    table.AddRow("FD-FMNIST", sprintf "%.3f" ((nonNull metrics.["fd_fmnist"]).GetValue<float>()))
    |> ignore

    table.AddRow("class accuracy", sprintf "%.3f" ((nonNull metrics.["class_accuracy"]).GetValue<float>()))
    |> ignore

    table.AddRow("images", sprintf "%d (%d reused)" count result.Reused) |> ignore

    if model.Config.Conditioning = HiMar.Model.Conditioning.Text then
        table.AddRow(
            "prompts",
            (if args.Contains Training_Templates then
                 "training caption templates"
             else
                 "held-out caption templates")
        )
        |> ignore

    AnsiConsole.Write table
    printfn "wrote %s" (IO.Path.Combine(out, "eval.json"))
    0

/// Comma-separated integers ("1,2,4"); empty for none.
let private intList (what: string) (text: string) =
    text.Split(',', StringSplitOptions.RemoveEmptyEntries ||| StringSplitOptions.TrimEntries)
    |> Array.map (fun t ->
        match Int64.TryParse t with
        | true, v when v > 0L -> v
        | _ -> raise (CliError(sprintf "%s: '%s' is not a positive whole number" what t)))
    |> Array.toList

let private ablation (args: ParseResults<AblationArgs>) =
    TorchNative.EnsureLoaded()
    let models = IO.Path.Combine(AppContext.BaseDirectory, "models")

    let config =
        HiMar.Runtime.Checkpoints.ModelConfigs.Resolve(
            args.GetResult(AblationArgs.Config, defaultValue = "fashion-small")
        )

    if config.ImgSize <> 32 || config.VaeStride <> 4 || config.ClassNum <> 10 then
        raise (CliError "the ablation trains on Fashion-MNIST pixel patches: img_size 32, vae_stride 4, 10 classes")

    let ints name dflt (case: Quotations.Expr<string -> AblationArgs>) =
        args.TryGetResult case |> Option.map (intList name) |> Option.defaultValue dflt

    let plan =
        HiMar.Runtime.Evaluation.AblationPlan(
            Base = config,
            OutDir = args.GetResult(AblationArgs.Out, defaultValue = IO.Path.Combine("runs", "ablation")),
            DataDir = args.GetResult(AblationArgs.Data, defaultValue = HiMar.Runtime.Data.IdxDataset.FashionMnistDir),
            ClassifierDir = IO.Path.Combine(models, "fashion-classifier"),
            Steps = args.GetResult(AblationArgs.Steps, defaultValue = 1200),
            Batch = args.GetResult(AblationArgs.Batch, defaultValue = 32),
            BaseLr = args.GetResult(AblationArgs.Blr, defaultValue = 8e-3),
            Warmup = args.GetResult(AblationArgs.Warmup, defaultValue = 50),
            Ema = args.GetResult(AblationArgs.Ema, defaultValue = 0.995),
            Seeds = ints "--seeds" [ 1L; 2L; 3L ] <@ AblationArgs.Seeds @>,
            Samples = args.GetResult(AblationArgs.N, defaultValue = 250),
            Phase1Sweep =
                (ints "--phase1-sweep" [ 1L; 2L; 4L; 8L; 16L ] <@ AblationArgs.Phase1_Sweep @>
                 |> List.map int),
            Phase2Sweep =
                (ints "--phase2-sweep" [ 1L; 2L; 4L; 8L ] <@ AblationArgs.Phase2_Sweep @>
                 |> List.map int),
            Only =
                (args.TryGetResult AblationArgs.Only
                 |> Option.map (fun t ->
                     t.Split(',', StringSplitOptions.RemoveEmptyEntries ||| StringSplitOptions.TrimEntries))
                 |> Option.toObj),
            Sampling =
                HiMar.Runtime.Sampling.SamplerOptions(
                    Cfg = args.GetResult(AblationArgs.Cfg, defaultValue = 3.0),
                    ReCfg = args.GetResult(AblationArgs.Re_Cfg, defaultValue = 3.0),
                    Temperature = args.GetResult(AblationArgs.Temperature, defaultValue = 0.9),
                    Phase2Steps = args.GetResult(AblationArgs.Num_Iter, defaultValue = 4),
                    MlpHeadSteps = args.GetResult(AblationArgs.Mlp_Steps, defaultValue = "25"),
                    DitHeadSteps = args.GetResult(AblationArgs.Dit_Steps, defaultValue = "25"),
                    ClipDenoised = true,
                    Precision =
                        precisionOn (args.GetResult(AblationArgs.Precision, defaultValue = "fp32")) TorchSharp.torch.CPU
                )
        )

    let report =
        (progressBar ())
            .Start(fun ctx ->
                let task = ctx.AddTask("ablation", maxValue = 1.0)

                HiMar.Runtime.Evaluation.Ablation.Run(
                    plan,
                    fun p ->
                        task.Value <- p.Done
                        task.Description <- Markup.Escape p.Stage
                ))

    printfn "%s" (HiMar.Runtime.Evaluation.Ablation.Markdown report)
    printfn "wrote %s (results.json, results.md, ablation.png, sweep-*.png)" plan.OutDir
    0


/// The FID Inception network, loaded and moved to the device.
let private inception (weights: string) (deviceName: string option) =
    TorchNative.EnsureLoaded()
    let model = HiMar.Runtime.Evaluation.InceptionWeights.Load weights

    match deviceName with
    | Some d -> model.``to`` (device d) |> ignore
    | None -> ()

    model

/// `himar fid-stats`: reference statistics of an image folder.
let private fidStats (args: ParseResults<FidStatsArgs>) =
    let images = args.GetResult FidStatsArgs.Images
    let count = HiMar.Runtime.Evaluation.InceptionFeatures.ListImages(images).Count

    use model =
        inception (args.GetResult FidStatsArgs.Inception) (args.TryGetResult FidStatsArgs.Device)

    let out = args.GetResult FidStatsArgs.Out

    use stats =
        (progressBar ())
            .Start(fun ctx ->
                let task =
                    ctx.AddTask(sprintf "Inception features of %d images" count, maxValue = float count)

                HiMar.Runtime.Evaluation.ImageNetEval.WriteStats(
                    model,
                    images,
                    out,
                    args.GetResult(FidStatsArgs.Batch, defaultValue = 50),
                    fun d _ -> task.Value <- float d
                ))

    printfn "wrote %s: mu and sigma of %d images, %d-d features" out count stats.Mu.shape.[0]
    0

/// `himar eval --inception`: FID, Inception Score and precision/recall of a folder of generated images.
let private evalImages (args: ParseResults<EvalArgs>) (weights: string) =
    let images =
        match args.TryGetResult EvalArgs.Images with
        | Some d -> d
        | None -> raise (CliError "eval --inception needs --images DIR, the folder of generated images to score")

    let refStats, refImages =
        match args.TryGetResult EvalArgs.Ref_Stats, args.TryGetResult EvalArgs.Ref_Images with
        | Some s, None -> s, null
        | None, Some d -> null, d
        | _ -> raise (CliError "eval --inception needs exactly one of --ref-stats FILE.npz and --ref-images DIR")

    let name =
        match IO.Path.GetFileName(IO.Path.TrimEndingDirectorySeparator images) with
        | null
        | "" -> "images"
        | n -> n

    let out = args.GetResult(EvalArgs.Out, defaultValue = IO.Path.Combine("eval", name))
    use model = inception weights (args.TryGetResult EvalArgs.Device)

    let result =
        (progressBar ())
            .Start(fun ctx ->
                let tasks = Collections.Generic.Dictionary<string, ProgressTask>()

                HiMar.Runtime.Evaluation.ImageNetEval.Run(
                    model,
                    weights,
                    images,
                    refStats,
                    refImages,
                    out,
                    args.GetResult(EvalArgs.Batch, defaultValue = 50),
                    fun what d total ->
                        match tasks.TryGetValue what with
                        | true, t -> t.Value <- float d
                        | _ ->
                            tasks.[what] <-
                                ctx.AddTask(
                                    sprintf "Inception features of %s" what,
                                    maxValue = float total,
                                    Value = float d
                                )
                ))

    let metrics = nonNull result.Report.["metrics"]

    let value (key: string) =
        match metrics.[key] with
        | null -> "-"
        | v -> sprintf "%.4f" (v.GetValue<float>())

    let table =
        Table().AddColumn("metric").AddColumn(TableColumn("value").RightAligned())

    table.AddRow("FID", value "fid") |> ignore

    table.AddRow("Inception Score", sprintf "%s ± %s" (value "inception_score") (value "inception_score_std"))
    |> ignore

    table.AddRow("precision", value "precision") |> ignore
    table.AddRow("recall", value "recall") |> ignore

    table.AddRow("images", string ((nonNull result.Report.["images"]).GetValue<int>()))
    |> ignore

    AnsiConsole.Write table
    printfn "wrote %s" (IO.Path.Combine(out, "eval.json"))
    0

/// `himar eval`: with --inception the ImageNet metrics of an image folder, else a Fashion-MNIST model's samples.
let private eval (args: ParseResults<EvalArgs>) =
    match args.TryGetResult EvalArgs.Inception with
    | Some weights -> evalImages args weights
    | None -> evalSamples args

/// Entry point: parses, checks the flags, dispatches, and turns every failure into one line and an exit code.
[<EntryPoint>]
let main argv =
    let parser =
        ArgumentParser.Create<HimarArgs>(programName = "himar", errorHandler = UsageExiter())

    let code =
        try
            let results = parser.ParseCommandLine argv
            HiMar.Cli.Flags.checkCommandLine results

            match results.GetSubCommand() with
            | Info a -> info a
            | Verify_Parity a -> verifyParity a
            | Import a -> import' a
            | Sample a -> sample a
            | Train a -> train a
            | Cache a -> cache a
            | Eval a -> eval a
            | Fid_Stats a -> fidStats a
            | Ablation a -> ablation a
            | Embed_Captions a -> embedCaptions a
            | Plot_Loss a -> plotLoss a
            | Train_Vae a -> TrainVae.run a
            | Serve a -> Serve.run a
            | Bench b ->
                match b.GetSubCommand() with
                | BenchArgs.Sample a -> benchSample a
                | BenchArgs.Train a -> benchTrain a
                | BenchArgs.Allreduce a -> benchAllReduce a
        with
        | CliError message ->
            eprintfn "himar: %s" (HiMar.Runtime.Failures.OneLine message)
            2
        | e ->
            // Known failures keep their documented exit code; anything else is a defect: one line, the trace in a file.
            let struct (code, line) = HiMar.Runtime.Failures.Explain e
            eprintfn "himar: %s" line
            code

    // MPI_Finalize after success; MPI_Abort after a failure, so ranks waiting in a collective end too.
    HiMar.Runtime.Distributed.Communicators.Finish code
    code
