/// `himar train-vae`: a small KL autoencoder for Fashion-MNIST (src/HiMar.Runtime/Training/VaeTrainer.cs).
module HiMar.Cli.Commands.TrainVae

open Argu
open TorchSharp
open HiMar.Model
open HiMar.Runtime
open HiMar.Runtime.Data
open HiMar.Runtime.Training
open HiMar.Cli.Commands.Common

/// Arguments of `himar train-vae`.
type TrainVaeArgs =
    | Data of dir: string
    | [<AltCommandLine("-o")>] Out of dir: string
    | Latent_Channels of count: int
    | Steps of count: int
    | Batch of size: int
    | Lr of rate: float
    | Warmup of steps: int
    | Kl_Weight of weight: float
    | Precision of ``fp32|bf16|auto``: string
    | Seed of seed: int64

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Data _ -> "the Fashion-MNIST IDX folder (default /usr/share/datasets/fashion-mnist)."
            | Out _ ->
                "the folder to write (default runs/fashion-vae): weights.safetensors, train-vae.json, reconstructions.png."
            | Latent_Channels _ ->
                "latent channels per token (default 4): a 28x28 image padded to 32 gives 8x8 tokens, its pivots 4x4."
            | Steps _ -> "optimiser steps (default 3000)."
            | Batch _ -> "images per step (default 64)."
            | Lr _ -> "peak learning rate, after a linear warm-up, cosine to 0 (default 1e-3)."
            | Warmup _ -> "warm-up steps (default 100)."
            | Kl_Weight _ -> "weight of the KL term against the L1 reconstruction, both per pixel (default 1e-6)."
            | Precision _ -> "the precision of the convolutions' products (default fp32); weights stay fp32."
            | Seed _ -> "initialisation, batch order and posterior noise (default 1)."

/// Trains, writes the folder, prints the reconstruction error.
let run (args: ParseResults<TrainVaeArgs>) =
    HiMar.Runtime.Native.TorchNative.EnsureLoaded()

    let out =
        args.GetResult(Out, defaultValue = System.IO.Path.Combine("runs", "fashion-vae"))

    let channels = args.GetResult(Latent_Channels, defaultValue = 4)

    if channels < 1 || channels > 64 then
        usageError $"--latent-channels: {channels} is outside 1..64."

    let options =
        VaeTrainingOptions(
            Steps = args.GetResult(Steps, defaultValue = 3000),
            Batch = args.GetResult(Batch, defaultValue = 64),
            Lr = args.GetResult(Lr, defaultValue = 1e-3),
            Warmup = args.GetResult(Warmup, defaultValue = 100),
            KlWeight = args.GetResult(Kl_Weight, defaultValue = 1e-6),
            Seed = args.GetResult(Seed, defaultValue = 1L),
            Precision = precisionOn (args.GetResult(Precision, defaultValue = "fp32")) torch.CPU
        )

    let data = args.TryGetResult Data |> Option.toObj
    let train = IdxDataset.FashionMnist(data, true)
    let test = IdxDataset.FashionMnist(data, false)
    torch.manual_seed options.Seed |> ignore
    use vae = new AutoencoderKL(VaeTrainer.FashionConfig channels)

    let report =
        withProgress (fun add ->
            let task = add "training steps" options.Steps

            VaeTrainer.Train(
                vae,
                train,
                test,
                options,
                fun step loss l1 kl -> task.Set(step, sprintf "loss %.5f (L1 %.4f, KL %.2f per pixel)" loss l1 kl)
            ))

    VaeTrainer.WriteRun(out, vae, options, report, test)

    printfn
        "test reconstruction: MSE %.5f, PSNR %.2f dB, L1 %.4f (pixels in [0, 1]); token std %.3f; %.0f s; wrote %s"
        report.TestMse
        report.TestPsnr
        report.TestL1
        report.TokenStd
        report.Seconds
        out

    0
