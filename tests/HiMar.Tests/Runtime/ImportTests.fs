/// Tests of src/HiMar.Runtime/Checkpoints/ReferenceImport: importing the fixture's reference checkpoints (EMA or raw
/// weights, MAR's VAE) and refusing truncated, foreign or inconsistent files without writing anything.
module HiMar.Tests.ImportTests

open System.IO
open Expecto
open TorchSharp
open HiMar.Model
open HiMar.Runtime.Checkpoints
open HiMar.Tests.TestUtil

let tests =
    testList
        "ReferenceImport"
        [
            test "importing the fixture checkpoint writes the EMA weights and a config that rebuilds the model" {
                withTempDir (fun dir ->
                    let out = Path.Combine(dir, "model")

                    let struct (kind, _) =
                        ReferenceImport.Import(Path.Combine(tinyFixture, "checkpoint-last.pth"), out)

                    Expect.equal kind CheckpointKind.HiMar "kind"
                    use m = ReferenceImport.LoadModel out
                    Expect.equal m.Config.ClassNum 10 "class_num from args"
                    Expect.equal m.Config.BufferSize 4 "buffer size from shapes"
                    Expect.equal (m.Config.EncoderNumHeads, m.Config.GdmHeads) (4, 4) "heads from args"
                    let ema = SafeTensors.Load(Path.Combine(tinyFixture, "ema-weights.safetensors"))

                    for KeyValue(k, t) in Weights.stateDict m do
                        Expect.equal (maxAbsDiff t ema.[k]) 0.0 k)
            }

            test "importing with --weights model takes the raw weights" {
                withTempDir (fun dir ->
                    let out = Path.Combine(dir, "raw")

                    ReferenceImport.Import(Path.Combine(tinyFixture, "checkpoint-last.pth"), out, false)
                    |> ignore

                    use m = ReferenceImport.LoadModel out
                    let raw = SafeTensors.Load(Path.Combine(tinyFixture, "weights.safetensors"))

                    Expect.equal
                        (maxAbsDiff (Weights.stateDict m).["fake_latent"] raw.["fake_latent"])
                        0.0
                        "fake_latent")
            }

            test "MAR's vae.ckpt imports and loads with its layout inferred" {
                withTempDir (fun dir ->
                    let out = Path.Combine(dir, "vae")

                    let struct (kind, _) =
                        ReferenceImport.Import(Path.Combine(tinyFixture, "vae.ckpt"), out)

                    Expect.equal kind CheckpointKind.Vae "kind"
                    use vae = ReferenceImport.LoadVae out

                    Expect.equal
                        (vae.Config.Ch, List.ofArray vae.Config.ChMult, List.ofArray vae.Config.AttnResolutions)
                        (32, [ 1; 1; 2; 2; 4 ], [ 16 ])
                        "layout")
            }

            test "a truncated checkpoint is refused with its name and nothing is written" {
                withTempDir (fun dir ->
                    let bytes = File.ReadAllBytes(Path.Combine(tinyFixture, "checkpoint-last.pth"))
                    let bad = Path.Combine(dir, "cut.pth")
                    File.WriteAllBytes(bad, bytes.[.. bytes.Length / 3])
                    let out = Path.Combine(dir, "out")

                    let e =
                        catchT<CheckpointFormatException> (fun () -> ReferenceImport.Import(bad, out) |> ignore)

                    Expect.stringContains e.Message bad "names the file"

                    Expect.isEmpty
                        (Directory.GetFileSystemEntries dir |> Array.filter (fun p -> p <> bad))
                        "nothing written")
            }

            test "a file that is not a checkpoint is refused" {
                withTempDir (fun dir ->
                    let bad = Path.Combine(dir, "notes.pth")
                    File.WriteAllText(bad, "hello")

                    let e =
                        catchT<CheckpointFormatException> (fun () ->
                            ReferenceImport.Import(bad, Path.Combine(dir, "out")) |> ignore)

                    Expect.stringContains e.Message bad "names the file")
            }

            test "weights whose shapes do not fit any consistent model are refused and nothing is written" {
                withTempDir (fun dir ->
                    let w = SafeTensors.Load(Path.Combine(tinyFixture, "weights.safetensors"))
                    w.["decoder_blocks.1.mlp.fc1.weight"] <- torch.zeros (8L, 64L)
                    let bad = Path.Combine(dir, "bad.safetensors")
                    SafeTensors.Save(bad, w)
                    // The head counts come from the manifest beside the file (shapes cannot tell them).
                    File.Copy(Path.Combine(tinyFixture, "manifest.json"), Path.Combine(dir, "manifest.json"))

                    let e =
                        catchT<CheckpointFormatException> (fun () ->
                            ReferenceImport.Import(bad, Path.Combine(dir, "out")) |> ignore)

                    Expect.stringContains e.Message "decoder_blocks.1.mlp.fc1.weight" "names the key"
                    Expect.isFalse (Directory.Exists(Path.Combine(dir, "out"))) "nothing written")
            }

            test "a bare state dict of unknown width asks for its head counts" {
                withTempDir (fun dir ->
                    let src = Path.Combine(dir, "w.safetensors")
                    File.Copy(Path.Combine(tinyFixture, "weights.safetensors"), src)

                    let e =
                        catchT<CheckpointFormatException> (fun () ->
                            ReferenceImport.Import(src, Path.Combine(dir, "out")) |> ignore)

                    Expect.stringContains e.Message "head counts cannot be read from tensor shapes" "hint")
            }
        ]
