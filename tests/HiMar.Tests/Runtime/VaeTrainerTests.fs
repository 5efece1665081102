/// Tests of src/HiMar.Runtime/Training/VaeTrainer.cs: the Fashion-MNIST autoencoder's layout, the folded latent
/// scale and a short training run.
module HiMar.Tests.VaeTrainerTests

open System
open System.IO
open Expecto
open TorchSharp
open HiMar.Model
open HiMar.Runtime.Data
open HiMar.Runtime.Training
open HiMar.Runtime.Checkpoints
open HiMar.Tests.TestUtil

/// 32 smooth 28x28 blobs (learnable in a few steps, unlike noise).
type Blobs() =
    let images =
        let coords = torch.linspace (-1.0, 1.0, 28L)
        let yy = coords.view(28L, 1L).expand (28L, 28L)
        let xx = coords.view(1L, 28L).expand (28L, 28L)

        torch.stack
            [|
                for i in 0..31 ->
                    let cx, cy = float (i % 4) * 0.4 - 0.6, float (i / 8) * 0.4 - 0.6
                    let r2 = (xx - cx).square () + (yy - cy).square ()
                    (torch.exp (r2 * -6.0) * 2.0 - 1.0).unsqueeze 0L
            |]

    interface IImageDataset with
        member _.Count = 32
        member _.Labels = [| for i in 0L .. 31L -> i % 10L |]
        member _.ClassCount = 10

        member _.Batch(indices, _flips) =
            use idx = torch.tensor (indices |> Seq.map int64 |> Array.ofSeq)
            images.index_select (0L, idx)

let tests =
    testList
        "VaeTrainer"
        [
            test "the Fashion-MNIST autoencoder turns a 32x32 image into 8x8 latents and a 16x16 pivot image into 4x4" {
                use vae = new AutoencoderKL(VaeTrainer.FashionConfig 4)
                use _noGrad = torch.no_grad ()
                use m32 = vae.Encode(torch.zeros (2L, 1L, 32L, 32L))
                use m16 = vae.Encode(torch.zeros (2L, 1L, 16L, 16L))
                Expect.equal m32.shape [| 2L; 8L; 8L; 8L |] "mean and log-variance of 4 channels, 8x8"
                Expect.equal m16.shape [| 2L; 8L; 4L; 4L |] "pivots: 4x4"
            }

            test "its layout reads back from the weights' shapes (the VAE loader infers it)" {
                use vae = new AutoencoderKL(VaeTrainer.FashionConfig 6)
                let inferred = ReferenceImport.InferVaeConfig(Weights.stateDict vae, "vae")
                let cfg = VaeTrainer.FashionConfig 6

                Expect.equal
                    (inferred.EmbedDim, inferred.Ch, List.ofArray inferred.ChMult)
                    (6, 32, [ 1; 2; 2 ])
                    "widths"

                Expect.equal (inferred.NumResBlocks, inferred.InChannels, inferred.OutCh) (1, 1, 1) "blocks, grey"
                Expect.isEmpty inferred.AttnResolutions "no encoder attention"
                Expect.equal inferred.ScaleFactor cfg.ScaleFactor "scale factor"
            }

            test "folding the latent scale leaves reconstructions unchanged and gives tokens unit deviation" {
                torch.manual_seed 3L |> ignore
                use vae = new AutoencoderKL(VaeTrainer.FashionConfig 4)
                vae.eval ()
                let data = Blobs()
                use _noGrad = torch.no_grad ()

                let x =
                    VaeTrainer.Pad((data :> IImageDataset).Batch([| 0..7 |], Array.zeroCreate 8), 32)

                let before = vae.forward x
                let s = VaeTrainer.FoldLatentScale(vae, data, 32)
                let after = vae.forward x
                let diff = (after - before).abs().max().item<float32> ()
                Expect.isLessThan diff 1e-4f "same images"
                Expect.isGreaterThan s 0.0 "positive scale"
                let struct (_, _, std) = VaeTrainer.Measure(vae, data, 32)
                Expect.floatClose Accuracy.low std 1.0 "token std"
            }

            test "forty steps on smooth blobs lower the reconstruction error more than threefold" {
                torch.manual_seed 4L |> ignore
                use vae = new AutoencoderKL(VaeTrainer.FashionConfig 4)
                let data = Blobs()
                vae.eval ()
                let struct (mse0, _, _) = VaeTrainer.Measure(vae, data, 32)
                let losses = ResizeArray<float>()

                let report =
                    VaeTrainer.Train(
                        vae,
                        data,
                        data,
                        VaeTrainingOptions(Steps = 40, Batch = 8, Lr = 3e-3, Warmup = 5, LogEvery = 10),
                        fun _ loss _ _ -> losses.Add loss
                    )

                Expect.equal losses.Count 4 "a report every 10 steps"
                // isLessThan passes on NaN, so finiteness first (oneDNN's backward once made every weight NaN).
                Expect.all losses Double.IsFinite "finite losses"
                Expect.isTrue (Double.IsFinite report.TestMse) "finite reconstruction error"
                Expect.isLessThan report.TestMse (mse0 / 3.0) "reconstruction improved"
                Expect.floatClose Accuracy.medium report.TestPsnr (10.0 * log10 (1.0 / report.TestMse)) "PSNR"

                withTempDir (fun dir ->
                    VaeTrainer.WriteRun(dir, vae, VaeTrainingOptions(Steps = 40), report, data)

                    let json =
                        nonNull (
                            System.Text.Json.Nodes.JsonNode.Parse(
                                File.ReadAllText(Path.Combine(dir, "train-vae.json"))
                            )
                        )

                    Expect.equal ((nonNull json.["test_psnr_db"]).GetValue<float>()) report.TestPsnr "report written"
                    Expect.equal ((nonNull json.["latent_channels"]).GetValue<int>()) 4 "latent channels written"
                    Expect.isTrue (File.Exists(Path.Combine(dir, "reconstructions.png"))) "picture"
                    // The VAE loader reads the folder as it is (layout from the shapes, the scale folded in).
                    use loaded = ReferenceImport.LoadVae dir
                    use _noGrad = torch.no_grad ()

                    let x =
                        VaeTrainer.Pad((data :> IImageDataset).Batch([| 0..3 |], Array.zeroCreate 4), 32)

                    let diff = (loaded.forward x - vae.forward x).abs().max().item<float32> ()
                    Expect.isLessThan diff 1e-5f "the same reconstructions")
            }

            test "a non-positive step count is refused with the flag's name" {
                use vae = new AutoencoderKL(VaeTrainer.FashionConfig 4)

                let e =
                    catchT<HiMar.Runtime.BadInputException> (fun () ->
                        VaeTrainer.Train(vae, Blobs(), Blobs(), VaeTrainingOptions(Steps = 0)) |> ignore)

                Expect.stringContains e.Message "train-vae: steps" "names the command and the setting"
            }
        ]

let paddedTests =
    testList
        "PaddedTokenizer"
        [
            test "28x28 images through the stride-4 autoencoder: 8x8 tokens, 4x4 pivots, decoded back to 28 and 14" {
                use vae = new AutoencoderKL(VaeTrainer.FashionConfig 4)
                vae.eval ()
                let tok = PaddedTokenizer(VaeTokenizer vae, 28, 32) :> ITokenizer
                use images = torch.zeros (3L, 1L, 28L, 28L)
                let struct (tokens, pivots) = tok.Encode images
                Expect.equal tokens.shape [| 3L; 64L; 4L |] "dense tokens"
                Expect.equal pivots.shape [| 3L; 16L; 4L |] "pivots"
                use grid = tokens.transpose(1L, 2L).reshape (3L, 4L, 8L, 8L)
                use pgrid = pivots.transpose(1L, 2L).reshape (3L, 4L, 4L, 4L)
                Expect.equal (tok.Decode grid).shape [| 3L; 1L; 28L; 28L |] "cropped image"
                Expect.equal (tok.Decode pgrid).shape [| 3L; 1L; 14L; 14L |] "cropped pivot image"
                Expect.equal (tok.TokenCells(8L, 28)) struct (-2.0, 4.0) "dense cells"
                Expect.equal (tok.TokenCells(4L, 14)) struct (-1.0, 4.0) "pivot cells"
            }
        ]
