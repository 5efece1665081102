/// Tests of src/HiMar.Runtime/Catalog/ModelTraits.cs's tokenizer rule: pixel patches, a given --vae, or the
/// autoencoder a latent model carries in its folder or run folder; and of training on Fashion-MNIST latents.
module HiMar.Tests.ModelTraitsTests

open System.IO
open Expecto
open TorchSharp
open HiMar.Model
open HiMar.Runtime
open HiMar.Runtime.Catalog
open HiMar.Runtime.Checkpoints
open HiMar.Runtime.Data
open HiMar.Runtime.Training
open HiMar.Tests.TestUtil

/// The tiny training model on 4-channel latents of a stride-4 autoencoder instead of 16-value pixel patches.
let latentConfig =
    { TrainingTests.tinyConfig with
        Backbone.LatentChannels = 4
        Pivots.Channels = 4
    }

let private saveVae (dir: string) (channels: int) =
    use vae = new AutoencoderKL(VaeTrainer.FashionConfig channels)
    Directory.CreateDirectory dir |> ignore
    ModelFiles.Save(vae, Path.Combine(dir, ModelTraits.BundledVaeFile))
    Path.Combine(dir, ModelTraits.BundledVaeFile)

let tests =
    testList
        "ModelTraits"
        [
            test
                "pixel patches are the fashion layout with 16 values per token; a 4-channel latent model is Fashion-MNIST too" {
                Expect.isTrue (ModelTraits.UsesPixelPatches HiMarConfig.fashion) "fashion preset"
                Expect.isFalse (ModelTraits.UsesPixelPatches latentConfig) "latent tokens"
                Expect.isTrue (ModelTraits.IsFashionMnist latentConfig) "10 classes of 28x28 images"
                Expect.isNull (ModelTraits.BuiltinTokenizer latentConfig) "no tokenizer of its own"
            }

            test "a latent model finds the autoencoder in its folder or its run folder, and decodes through it" {
                withTempDir (fun dir ->
                    let vae = saveVae dir 4
                    let step = Path.Combine(dir, "checkpoints", "step-00000010")
                    Directory.CreateDirectory step |> ignore
                    Expect.equal (ModelTraits.BundledVae step) vae "from a checkpoint folder"
                    Expect.equal (ModelTraits.BundledVae dir) vae "from the run folder"
                    Expect.isNull (ModelTraits.BundledVae(Path.GetTempPath() + "no-such-model")) "none elsewhere"

                    match ModelTraits.Tokenizer(latentConfig, step) with
                    | :? PaddedTokenizer as t -> Expect.isTrue (t.Inner :? VaeTokenizer) "padded VAE tokens"
                    | other -> failtestf "expected a padded VAE tokenizer, got %O" other

                    // A pixel model ignores a stray autoencoder.
                    Expect.isTrue
                        (ModelTraits.Tokenizer(HiMarConfig.fashion, step) :? PixelPatchTokenizer)
                        "pixel model")
            }

            test "an autoencoder with other latent channels than the model's tokens is refused with both numbers" {
                withTempDir (fun dir ->
                    let vae = saveVae dir 6

                    let e =
                        catchT<BadInputException> (fun () -> ModelTraits.Tokenizer(latentConfig, null, vae) |> ignore)

                    Expect.stringContains e.Message "has 6 latent channels; the model's tokens have 4" "message")
            }

            test "training on latents bundles the autoencoder in the run folder and refuses another one on resume" {
                withTempDir (fun dir ->
                    let vaeDir = Path.Combine(dir, "vae")
                    let vae = saveVae vaeDir 4
                    let out = Path.Combine(dir, "run")
                    let options = TrainOptions(OutDir = out)
                    let data = TrainingData(VaePath = vae)
                    let tokenizer = TrainingSetup.LatentTokenizer(latentConfig, data, options)
                    Expect.isTrue (tokenizer :? PaddedTokenizer) "padded VAE tokens"
                    let bundled = Path.Combine(out, ModelTraits.BundledVaeFile)
                    Expect.equal (File.ReadAllBytes bundled) (File.ReadAllBytes vae) "a copy in the run folder"
                    let other = saveVae (Path.Combine(dir, "other")) 4

                    let e =
                        catchT<BadInputException> (fun () ->
                            TrainingSetup.LatentTokenizer(latentConfig, TrainingData(VaePath = other), options)
                            |> ignore)

                    Expect.stringContains e.Message "is not the autoencoder this run was trained with" "message")
            }
        ]
