/// `himar train-vae`: a small KL autoencoder for Fashion-MNIST (src/HiMar.Runtime/Training/VaeTrainer.cs).
module HiMar.Cli.TrainVae

open System
open System.IO
open Argu
open TorchSharp
open HiMar.Model
open HiMar.Runtime
open HiMar.Runtime.Data
open HiMar.Runtime.Training

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
    | Precision of precision: string
    | Seed of seed: int64

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Data _ -> "the Fashion-MNIST IDX folder (default /usr/share/datasets/fashion-mnist)."
            | Out _ ->
                "the folder to write (default runs/fashion-vae): weights.safetensors, train-vae.json, reconstructions.png."
            | Latent_Channels _ -> "latent channels per token (default 4): 8x8 tokens for a 28x28 image padded to 32."
            | Steps _ -> "optimiser steps (default 3000)."
            | Batch _ -> "images per step (default 64)."
            | Lr _ -> "peak learning rate, after a linear warm-up, cosine to 0 (default 1e-3)."
            | Warmup _ -> "warm-up steps (default 100)."
            | Kl_Weight _ -> "weight of the KL term against the L1 reconstruction, per pixel (default 1e-6)."
            | Precision _ -> "fp32 (default), bf16 or auto: the precision of the convolutions' products."
            | Seed _ -> "initialisation, batch order and posterior noise (default 1)."

/// Trains, writes the weights and a report, prints the reconstruction error.
let run (args: ParseResults<TrainVaeArgs>) =
    HiMar.Runtime.Native.TorchNative.EnsureLoaded()
    let data = args.TryGetResult Data |> Option.toObj
    let out = args.GetResult(Out, defaultValue = Path.Combine("runs", "fashion-vae"))
    let channels = args.GetResult(Latent_Channels, defaultValue = 4)

    if channels < 1 || channels > 64 then
        raise (BadInputException $"--latent-channels: {channels} is outside 1..64.")

    let choice =
        HiMar.Runtime.Native.Precisions.Parse(args.GetResult(Precision, defaultValue = "fp32"))

    let precision = HiMar.Runtime.Native.Precisions.Decide(choice, torch.CPU)

    let options =
        VaeTrainingOptions(
            Steps = args.GetResult(Steps, defaultValue = 3000),
            Batch = args.GetResult(Batch, defaultValue = 64),
            Lr = args.GetResult(Lr, defaultValue = 1e-3),
            Warmup = args.GetResult(Warmup, defaultValue = 100),
            KlWeight = args.GetResult(Kl_Weight, defaultValue = 1e-6),
            Seed = args.GetResult(Seed, defaultValue = 1L),
            Precision = precision.Precision
        )

    let train = IdxDataset.FashionMnist(data, true)
    let test = IdxDataset.FashionMnist(data, false)
    torch.manual_seed options.Seed |> ignore
    use vae = new AutoencoderKL(VaeTrainer.FashionConfig channels)
    let interactive = not Console.IsOutputRedirected

    let log =
        Action<int, float, float, float>(fun step loss l1 kl ->
            let line =
                $"step {step}/{options.Steps}  loss {loss:F5} (L1 {l1:F4}, KL {kl:F2} per pixel)"

            if interactive then
                printf "\r%s   " line
            else
                printfn "%s" line)

    let report = VaeTrainer.Train(vae, train, test, options, log)

    if interactive then
        printfn ""

    Directory.CreateDirectory out |> ignore
    HiMar.Runtime.Checkpoints.ModelFiles.Save(vae, Path.Combine(out, "weights.safetensors"))

    let json =
        Text.Json.JsonSerializer.Serialize(
            {|
                latent_channels = channels
                steps = options.Steps
                batch = options.Batch
                lr = options.Lr
                kl_weight = options.KlWeight
                seed = options.Seed
                precision = string precision.Precision
                test_mse = report.TestMse
                test_psnr_db = report.TestPsnr
                test_l1 = report.TestL1
                latent_scale = report.LatentScale
                token_std = report.TokenStd
                seconds = report.Seconds
            |},
            Text.Json.JsonSerializerOptions(WriteIndented = true)
        )

    HiMar.Runtime.Checkpoints.AtomicFile.WriteText(Path.Combine(out, "train-vae.json"), json + "\n")

    // Test images over their reconstructions, 10 a row.
    let grid =
        use scope = torch.NewDisposeScope()
        use noGrad = torch.no_grad ()
        let idx = [| 0..19 |]
        let raw = test.Batch(idx, Array.zeroCreate 20)
        use posterior = vae.Posterior(vae.Encode(VaeTrainer.Pad(raw, 32)))
        let recon = vae.Decode(posterior.Mean).narrow(2, 2L, 28L).narrow (3, 2L, 28L)

        let pairs =
            torch.cat (
                [|
                    raw.narrow (0, 0L, 10L)
                    recon.narrow (0, 0L, 10L)
                    raw.narrow (0, 10L, 10L)
                    recon.narrow (0, 10L, 10L)
                |],
                0L
            )

        let tiles =
            HiMar.Runtime.Imaging.Images.FromTensor pairs
            |> Array.map (fun t -> HiMar.Runtime.Imaging.Images.Resize(t, 56))

        HiMar.Runtime.Imaging.Images.Grid(tiles, null, 10)

    HiMar.Runtime.Imaging.Images.SavePng(grid, Path.Combine(out, "reconstructions.png"))

    printfn
        "test reconstruction: MSE %.5f, PSNR %.2f dB, L1 %.4f (pixels in [0, 1]); token std %.3f; %.0f s; wrote %s"
        report.TestMse
        report.TestPsnr
        report.TestL1
        report.TokenStd
        report.Seconds
        out

    0
