/// Tests of src/HiMar.Model/Vae.fs: the KL autoencoder against the tiny parity fixture (ch 32), in float32 and
/// float64, and the diagonal Gaussian posterior on hand-made numbers.
module HiMar.Tests.VaeTests

open System
open System.Collections.Generic
open System.IO
open System.Text.Json.Nodes
open Expecto
open TorchSharp
open HiMar.Model
open HiMar.Runtime.Checkpoints
open HiMar.Runtime.Parity

/// The value, or a test failure naming what was absent.
let private present what (x: 'T | null) : 'T =
    match x with
    | null -> failtestf "%s is missing" what
    | v -> v

let private fixtureDir = lazy HiMar.Tests.TestUtil.tinyFixture

let private fixture = lazy (ParityFixture.Open fixtureDir.Value)

let private weights () =
    fixture.Value.Load "vae-weights.safetensors"

let private cases () =
    fixture.Value.Load "vae-cases.safetensors"

let private vaeJson () =
    present "the manifest's vae_config" fixture.Value.VaeConfig

let private manifestConfig () = VaeParityCases.Config(vaeJson ())

let private shapeText (t: torch.Tensor) =
    t.shape |> Array.map string |> String.concat ", " |> sprintf "[%s]"

/// Loads the safetensors entries strictly (the shared loader lists every missing, unexpected and mis-shaped key).
let copyWeights (model: torch.nn.Module) (source: Dictionary<string, torch.Tensor>) =
    Weights.load model source true |> ignore

let private loadedVae () =
    let vae = new AutoencoderKL(manifestConfig ())
    copyWeights vae (weights ())
    vae.eval ()
    vae

/// max |actual - expected| and the fixture's allowance 1e-4 + 1e-4 * max |expected|.
let private errorAndAllowance (actual: torch.Tensor) (expected: torch.Tensor) =
    Expect.equal (shapeText actual) (shapeText expected) "shape"
    let struct (err, allowed) = ParityRunner.Compare(actual, expected, 1e-4, 1e-4)
    err, allowed

let private encode (vae: AutoencoderKL) (image: torch.Tensor) =
    use _ = torch.no_grad ()
    vae.Encode image

let private decode (vae: AutoencoderKL) (latent: torch.Tensor) =
    use _ = torch.no_grad ()
    vae.Decode latent

let tests =
    testList
        "Vae"
        [
            test "the state_dict keys and shapes equal vae-weights.safetensors, 312 entries" {
                use vae = new AutoencoderKL(manifestConfig ())

                let ours =
                    vae.state_dict () |> Seq.map (fun kv -> kv.Key, shapeText kv.Value) |> Set.ofSeq

                let reference =
                    weights () |> Seq.map (fun kv -> kv.Key, shapeText kv.Value) |> Set.ofSeq

                Expect.equal (Set.count reference) 312 "reference entries"
                Expect.equal (Set.difference ours reference) Set.empty "keys or shapes only we have"
                Expect.equal (Set.difference reference ours) Set.empty "keys or shapes only the reference has"
            }

            test "the manifest's vae_config is the KL-16 preset at width 32" {
                Expect.equal
                    { manifestConfig () with
                        ChMult = [||]
                        AttnResolutions = [||]
                    }
                    { VaeConfig.kl16 with
                        Ch = 32
                        ChMult = [||]
                        AttnResolutions = [||]
                    }
                    "scalar settings"

                Expect.sequenceEqual (manifestConfig ()).ChMult VaeConfig.kl16.ChMult "ch_mult"
                Expect.sequenceEqual (manifestConfig ()).AttnResolutions VaeConfig.kl16.AttnResolutions "attention"
            }

            test "the KL-16 preset has the fixture's keys with 128-wide convolutions" {
                use vae = new AutoencoderKL(VaeConfig.kl16)
                let state = vae.state_dict ()
                Expect.equal (Set.ofSeq state.Keys) (Set.ofSeq (weights ()).Keys) "keys"
                Expect.equal (shapeText state.["encoder.conv_in.weight"]) "[128, 3, 3, 3]" "conv_in"
                Expect.equal (shapeText state.["encoder.mid.attn_1.q.weight"]) "[512, 512, 1, 1]" "mid attention"
                Expect.equal (shapeText state.["decoder.up.3.block.0.nin_shortcut.weight"]) "[256, 512, 1, 1]" "up.3"
                Expect.equal (shapeText state.["decoder.conv_out.weight"]) "[3, 128, 3, 3]" "decoder conv_out"
            }

            test "encoding the fixture image gives the reference moments (2, 32, 4, 4)" {
                use vae = loadedVae ()
                use moments = encode vae (cases ()).["vae_encode/image"]
                let err, allowed = errorAndAllowance moments (cases ()).["vae_encode/moments"]
                printfn "vae_encode float32: max error %.3g (allowed %.3g)" err allowed
                Expect.equal (shapeText moments) "[2, 32, 4, 4]" "shape"
                Expect.isLessThanOrEqual err allowed "max |moments - reference|"
            }

            test "decoding the fixture latent gives the reference image (2, 3, 64, 64)" {
                use vae = loadedVae ()
                use image = decode vae (cases ()).["vae_decode/latent"]
                let err, allowed = errorAndAllowance image (cases ()).["vae_decode/image"]
                printfn "vae_decode float32: max error %.3g (allowed %.3g)" err allowed
                Expect.equal (shapeText image) "[2, 3, 64, 64]" "shape"
                Expect.isLessThanOrEqual err allowed "max |image - reference|"
            }

            test "the float64 model reproduces the float32 moments and image within 1e-4" {
                use vae = loadedVae ()

                let image, latent =
                    (cases ()).["vae_encode/image"], (cases ()).["vae_decode/latent"]

                use moments32 = encode vae image
                use decoded32 = decode vae latent
                vae.``to`` torch.float64 |> ignore

                Expect.equal
                    (vae.parameters () |> Seq.map _.dtype |> Set.ofSeq)
                    (Set.singleton torch.float64)
                    "parameter dtypes"

                use image64 = image.``to`` torch.float64
                use latent64 = latent.``to`` torch.float64
                use moments64 = encode vae image64
                use decoded64 = decode vae latent64
                Expect.equal moments64.dtype torch.float64 "moments dtype"

                for name, a, b, expected in
                    [
                        "moments", moments64, moments32, (cases ()).["vae_encode/moments"]
                        "image", decoded64, decoded32, (cases ()).["vae_decode/image"]
                    ] do
                    let struct (vs32, _) = ParityRunner.Compare(a, b, 0.0, 0.0)
                    let err, allowed = errorAndAllowance a expected
                    printfn "%s float64: max error %.3g vs float32, %.3g vs reference" name vs32 err
                    Expect.isLessThanOrEqual vs32 1e-4 $"max |%s{name} float64 - float32|"
                    Expect.isLessThanOrEqual err allowed $"max |%s{name} float64 - reference|"
            }

            test "the parity evaluators reproduce both VAE cases of the manifest" {
                let f = fixture.Value

                for node in (present "vae_cases" f.Manifest.["vae_cases"]).AsArray() do
                    let spec = (present "a vae case" node).AsObject()
                    let name = (present "name" spec.["name"]).GetValue<string>()
                    let c = ParityCase(name, name, [ "x" ], [ "y" ], 1e-4, 1e-4, spec)
                    use _ = torch.NewDisposeScope()

                    let outputs, output =
                        match name with
                        | "vae_encode" -> VaeParityCases.Encode(f, c), "moments"
                        | "vae_decode" -> VaeParityCases.Decode(f, c), "image"
                        | other -> failtestf "unknown VAE case %s" other

                    let err, allowed = errorAndAllowance outputs.[output] (f.Tensor(c, output))
                    Expect.isLessThanOrEqual err allowed $"%s{name}/%s{output}"
            }

            test "a vae_config without 'ch' is refused with a message naming the key" {
                let json = (vaeJson ()).DeepClone().AsObject()
                json.Remove "ch" |> ignore

                let e =
                    NativeTests.catchT<InvalidDataException> (fun () -> VaeParityCases.Config(json, "tiny") |> ignore)

                Expect.equal e.Message "tiny: vae_config has no 'ch'." "message"
            }

            test "the posterior clamps logvar to [-30, 20] and samples mean + std * noise" {
                // moments (1, 4, 1, 1): mean [1, -2], logvar [-40, 25] -> clamped [-30, 20]
                use moments = torch.tensor([| 1.0; -2.0; -40.0; 25.0 |]).reshape (1L, 4L, 1L, 1L)
                use posterior = new DiagonalGaussianDistribution(moments)
                let values (t: torch.Tensor) = t.flatten().data<float>().ToArray()

                let close (actual: float[]) (expected: float[]) what =
                    Expect.equal actual.Length expected.Length $"%s{what} length"

                    Array.iteri2
                        (fun i a e -> Expect.floatClose Accuracy.veryHigh a e $"%s{what}[%d{i}]")
                        actual
                        expected

                Expect.sequenceEqual (values posterior.Mean) [| 1.0; -2.0 |] "mean"
                Expect.sequenceEqual (values posterior.Logvar) [| -30.0; 20.0 |] "clamped logvar"
                Expect.equal (shapeText posterior.Std) "[1, 2, 1, 1]" "std shape"
                close (values posterior.Std) [| exp -15.0; exp 10.0 |] "std"
                close (values posterior.Var) [| exp -30.0; exp 20.0 |] "var"
                use noise = torch.tensor([| 0.5; 2.0 |]).reshape (1L, 2L, 1L, 1L)
                use sample = posterior.Sample noise
                close (values sample) [| 1.0 + 0.5 * exp -15.0; -2.0 + 2.0 * exp 10.0 |] "sample"
                use mode = posterior.Mode()
                Expect.sequenceEqual (values mode) [| 1.0; -2.0 |] "mode"
                use kl = posterior.Kl()
                // 0.5 * ((1 + e^-30 - 1 + 30) + (4 + e^20 - 1 - 20))
                let expected =
                    0.5 * ((1.0 + exp -30.0 - 1.0 + 30.0) + (4.0 + exp 20.0 - 1.0 - 20.0))

                Expect.equal (shapeText kl) "[1]" "kl shape"
                Expect.floatClose Accuracy.high (kl.item<float> ()) expected "kl"
                Expect.sequenceEqual (values moments) [| 1.0; -2.0; -40.0; 25.0 |] "the moments are left unchanged"
            }
        ]
