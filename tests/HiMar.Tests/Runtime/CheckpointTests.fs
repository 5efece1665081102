/// Tests of src/HiMar.Runtime/Checkpoints/TorchCheckpoint.cs and SafeUnpickler.cs: the reference `.pth` files of the
/// tiny fixture against their safetensors exports, and hand-built zips for strided views and every refusal.
module HiMar.Tests.CheckpointTests

open System
open System.Collections.Generic
open System.IO
open System.IO.Compression
open System.Text
open Expecto
open TorchSharp
open HiMar.Runtime.Checkpoints
open HiMar.Tests.TestUtil

let private fixtureFile name = Path.Combine(tinyFixture, name)

/// A fresh temporary folder for one test, deleted with its contents on disposal.
type private TempDir() =
    let path =
        Path.Combine(Path.GetTempPath(), "himar-pth-" + Guid.NewGuid().ToString "N")

    do Directory.CreateDirectory path |> ignore
    member _.Path = path

    interface IDisposable with
        member _.Dispose() = Directory.Delete(path, true)

/// Asserts that two name -> tensor maps hold the same names, shapes, dtypes and values.
let private expectSameTensors (actual: Dictionary<string, torch.Tensor>) (expected: Dictionary<string, torch.Tensor>) =
    Expect.equal (Set.ofSeq actual.Keys) (Set.ofSeq expected.Keys) "tensor names"

    for KeyValue(name, e) in expected do
        let a = actual[name]
        Expect.equal (shapeOf a) (shapeOf e) $"shape of {name}"
        Expect.equal a.dtype e.dtype $"dtype of {name}"
        Expect.isTrue (a.eq(e).all().item<bool> ()) $"values of {name}"

let private disposeAll (d: Dictionary<string, torch.Tensor>) =
    for t in d.Values do
        t.Dispose()

/// A pickled value as 'T, or a test failure naming what it was.
let private get<'T> (what: string) (x: obj | null) : 'T =
    match x with
    | :? 'T as v -> v
    | other -> failtestf "%s is %O, not a %s" what other typeof<'T>.Name

/// The root dict of a checkpoint.
let private rootOf (ck: TorchCheckpoint) =
    match ck.Root with
    | :? Dictionary<string, obj | null> as d -> d
    | other -> failtestf "root is %O, not a dict" other

/// Pickle opcodes, written by hand for the synthetic checkpoints.
module private Pickle =
    let proto2 = [| 0x80uy; 2uy |]
    let mark = [| byte '(' |]
    let tuple = [| byte 't' |]
    let emptyDict = [| byte '}' |]
    let emptyTuple = [| byte ')' |]
    let setItems = [| byte 'u' |]
    let reduce = [| byte 'R' |]
    let persId = [| byte 'Q' |]
    let newFalse = [| 0x89uy |]
    let stop = [| byte '.' |]

    let str (s: string) =
        let b = Encoding.UTF8.GetBytes s
        Array.concat [ [| byte 'X' |]; BitConverter.GetBytes(int32 b.Length); b ]

    let int (n: int) =
        Array.append [| byte 'J' |] (BitConverter.GetBytes(int32 n))

    let glob (m: string) (n: string) =
        Array.append [| byte 'c' |] (Encoding.ASCII.GetBytes $"{m}\n{n}\n")

    let tupleOf (items: byte array list) =
        Array.concat [ mark; Array.concat items; tuple ]

    /// _rebuild_tensor_v2(('storage', FloatStorage, key, 'cpu', numel), offset, size, stride, False, OrderedDict())
    let tensor (key: string) (numel: int) (offset: int) (size: int list) (stride: int list) =
        Array.concat
            [
                glob "torch._utils" "_rebuild_tensor_v2"
                tupleOf
                    [
                        tupleOf [ str "storage"; glob "torch" "FloatStorage"; str key; str "cpu"; int numel ]
                        persId
                        int offset
                        tupleOf (size |> List.map int)
                        tupleOf (stride |> List.map int)
                        newFalse
                        Array.concat [ glob "collections" "OrderedDict"; emptyTuple; reduce ]
                    ]
                reduce
            ]

    /// A dict of named values.
    let dict (items: (string * byte array) list) =
        Array.concat
            [
                emptyDict
                mark
                items |> List.map (fun (k, v) -> Array.append (str k) v) |> Array.concat
                setItems
            ]

/// Writes a zip holding `ck/data.pkl`, `ck/version` and the given `ck/data/<key>` float32 storages.
let private writeCheckpoint (dir: TempDir) (pickle: byte array) (storages: (string * float32 array) list) =
    let path = Path.Combine(dir.Path, "synthetic.pth")

    do
        use zip = ZipFile.Open(path, ZipArchiveMode.Create)

        let put (name: string) (bytes: byte array) =
            use s = zip.CreateEntry(name, CompressionLevel.NoCompression).Open()
            s.Write(bytes, 0, bytes.Length)

        put "ck/data.pkl" pickle
        put "ck/version" (Encoding.ASCII.GetBytes "3\n")

        for key, values in storages do
            put $"ck/data/{key}" (values |> Array.collect BitConverter.GetBytes)

    path

/// Reads a synthetic checkpoint expecting a CheckpointFormatException, and returns its message.
let private refusal (path: string) =
    (catchT<CheckpointFormatException> (fun () -> TorchCheckpoint.Read path |> ignore)).Message

let private floats (t: torch.Tensor) =
    t.data<float32>().ToArray() |> List.ofArray

let tests =
    testList
        "TorchCheckpoint"
        [
            test "The reference checkpoint's model state dict equals weights.safetensors tensor for tensor" {
                use ck = TorchCheckpoint.Read(fixtureFile "checkpoint-last.pth")
                let expected = SafeTensors.Load(fixtureFile "weights.safetensors")
                expectSameTensors (ck.StateDict "model") expected
                disposeAll expected
            }

            test "The reference checkpoint's model_ema state dict equals ema-weights.safetensors" {
                use ck = TorchCheckpoint.Read(fixtureFile "checkpoint-last.pth")
                let expected = SafeTensors.Load(fixtureFile "ema-weights.safetensors")
                let ema = ck.StateDict "model_ema"
                expectSameTensors ema expected
                let model = ck.StateDict "model"

                Expect.isTrue
                    (model.Keys
                     |> Seq.exists (fun k -> not (model[k].eq(ema[k]).all().item<bool> ())))
                    "EMA differs from model"

                disposeAll expected
            }

            test "The reference checkpoint keeps the state dict order of the pickle" {
                use ck = TorchCheckpoint.Read(fixtureFile "checkpoint-last.pth")
                let keys = (ck.StateDict "model").Keys |> List.ofSeq
                Expect.equal keys[0] "fake_latent" "first key"
                Expect.equal keys[1] "cond_tokens" "second key"

                Expect.equal
                    (List.ofSeq (rootOf ck).Keys)
                    [ "model"; "model_ema"; "optimizer"; "epoch"; "scaler"; "args" ]
                    "root keys"
            }

            test "The reference checkpoint holds epoch 41, its scaler and the training arguments" {
                use ck = TorchCheckpoint.Read(fixtureFile "checkpoint-last.pth")
                let root = rootOf ck
                Expect.equal (get<int64> "epoch" root["epoch"]) 41L "epoch"
                let scaler = get<Dictionary<string, obj | null>> "scaler" root["scaler"]
                Expect.equal (get<float> "scale" scaler["scale"]) 65536.0 "scaler scale"
                Expect.equal (get<int64> "growth_interval" scaler["growth_interval"]) 2000L "scaler growth_interval"

                match ck.Args() with
                | null -> failtest "args missing"
                | args ->
                    Expect.equal (get<int64> "encoder_embed_dim" args["encoder_embed_dim"]) 64L "encoder_embed_dim"
                    Expect.equal (get<int64> "class_num" args["class_num"]) 10L "class_num"
                    Expect.equal (get<float> "step_stage2_rate" args["step_stage2_rate"]) 0.25 "step_stage2_rate"
                    Expect.equal (get<bool> "two_diffloss" args["two_diffloss"]) true "two_diffloss"
            }

            test "The reference checkpoint's optimizer has one param group with lr 1e-4 and betas (0.9, 0.95)" {
                use ck = TorchCheckpoint.Read(fixtureFile "checkpoint-last.pth")
                let dict = get<Dictionary<string, obj | null>>
                let root = rootOf ck
                let optimizer = dict "optimizer" root["optimizer"]
                Expect.equal (dict "state" optimizer["state"]).Count 0 "state is empty"
                let groups = get<List<obj | null>> "param_groups" optimizer["param_groups"]
                Expect.equal groups.Count 1 "one group"
                let group = dict "group" groups[0]
                Expect.equal (get<float> "lr" group["lr"]) 1e-4 "lr"

                let betas =
                    get<(obj | null) array> "betas" group["betas"] |> Array.map (get<float> "beta")

                Expect.equal betas [| 0.9; 0.95 |] "betas"
                Expect.equal (get<float> "weight_decay" group["weight_decay"]) 0.02 "weight_decay"
                Expect.equal (get<bool> "amsgrad" group["amsgrad"]) false "amsgrad"

                let parameters =
                    get<List<obj | null>> "params" group["params"]
                    |> Seq.map (get<int64> "param")
                    |> List.ofSeq

                Expect.equal parameters [ 0L .. 144L ] "params 0..144"
            }

            test "The KL-16 checkpoint's model state dict equals vae-weights.safetensors" {
                use ck = TorchCheckpoint.Read(fixtureFile "vae.ckpt")
                let expected = SafeTensors.Load(fixtureFile "vae-weights.safetensors")
                expectSameTensors (ck.StateDict "model") expected
                Expect.isNull (ck.Args()) "a VAE checkpoint has no args"
                disposeAll expected
            }

            test "A checkpoint whose root is a state dict serves it under any key" {
                use dir = new TempDir()

                let path =
                    writeCheckpoint
                        dir
                        (Array.concat
                            [
                                Pickle.proto2
                                Pickle.dict [ "w", Pickle.tensor "0" 3 0 [ 3 ] [ 1 ] ]
                                Pickle.stop
                            ])
                        [ "0", [| 1.0f; 2.0f; 3.0f |] ]

                use ck = TorchCheckpoint.Read path
                let sd = ck.StateDict "model"
                Expect.equal (floats sd["w"]) [ 1.0f; 2.0f; 3.0f ] "root state dict"
            }

            test "Strided views of one storage are read with their offset and strides, and share the storage" {
                use dir = new TempDir()

                let pickle =
                    Array.concat
                        [
                            Pickle.proto2
                            Pickle.dict
                                [
                                    "t", Pickle.tensor "0" 6 1 [ 2; 2 ] [ 1; 3 ]
                                    "every_other", Pickle.tensor "0" 6 0 [ 3 ] [ 2 ]
                                    "scalar", Pickle.tensor "0" 6 5 [] []
                                    "whole", Pickle.tensor "0" 6 0 [ 6 ] [ 1 ]
                                    "tail", Pickle.tensor "0" 6 3 [ 3 ] [ 1 ]
                                ]
                            Pickle.stop
                        ]

                let path =
                    writeCheckpoint dir pickle [ "0", [| 0.0f; 1.0f; 2.0f; 3.0f; 4.0f; 5.0f |] ]

                use ck = TorchCheckpoint.Read path
                let sd = ck.StateDict "model"
                // element [i, j] is storage[1 + i + 3 j]
                Expect.equal (shapeOf sd["t"]) [ 2L; 2L ] "shape"
                Expect.isTrue (sd["t"].is_contiguous ()) "contiguous"
                Expect.equal (floats sd["t"]) [ 1.0f; 4.0f; 2.0f; 5.0f ] "transposed view"
                Expect.equal (floats sd["every_other"]) [ 0.0f; 2.0f; 4.0f ] "stride 2"
                Expect.equal (shapeOf sd["scalar"]) [] "a 0-d tensor"
                Expect.equal (sd["scalar"].item<float32> ()) 5.0f "scalar at offset 5"
                // contiguous views keep pointing into the one storage read from the zip, as after torch.load
                Expect.equal (floats sd["tail"]) [ 3.0f; 4.0f; 5.0f ] "tail"
                sd["whole"].mul_ (torch.tensor 2.0f) |> ignore
                Expect.equal (floats sd["tail"]) [ 6.0f; 8.0f; 10.0f ] "tail shares whole's memory"
                Expect.equal (floats sd["every_other"]) [ 0.0f; 2.0f; 4.0f ] "a strided view is a contiguous copy"
            }

            test "Protocol 4 pickles from Python read with frames, memoize, stack globals, big ints and namespaces" {
                // pickle.dumps({'a': [1, -2, 300, 70000, 2.5, 'xé', None, True, False, (1, 2, 3), (4,), ()],
                //   'ns': argparse.Namespace(lr=0.1, name='b'), 'big': 2**70, 'od': OrderedDict(k=1), 7: 'seven'}, protocol=4)
                let pickle =
                    Convert.FromBase64String
                        "gASVwgAAAAAAAAB9lCiMAWGUXZQoSwFK/v///00sAUpwEQEAR0AEAAAAAAAAjAN4w6mUToiJSwFLAksDh5RLBIWUKWWMAm5zlIwIYXJncGFyc2WUjAlOYW1lc3BhY2WUk5QpgZR9lCiMAmxylEc/uZmZmZmZmowEbmFtZZSMAWKUdWKMA2JpZ5SKCQAAAAAAAAAAQIwCb2SUjAtjb2xsZWN0aW9uc5SMC09yZGVyZWREaWN0lJOUKVKUjAFrlEsBc0sHjAVzZXZlbpR1Lg=="

                use dir = new TempDir()
                use ck = TorchCheckpoint.Read(writeCheckpoint dir pickle [])
                let root = rootOf ck
                Expect.equal (List.ofSeq root.Keys) [ "a"; "ns"; "big"; "od"; "7" ] "keys, the int key in decimal"

                let a = get<List<obj | null>> "a" root["a"]

                Expect.equal
                    (a |> Seq.take 4 |> Seq.map (get<int64> "int") |> List.ofSeq)
                    [ 1L; -2L; 300L; 70000L ]
                    "ints"

                Expect.equal (get<float> "float" a[4]) 2.5 "float"
                Expect.equal (get<string> "str" a[5]) "xé" "str"
                Expect.isNull a[6] "None"
                Expect.equal (get<bool> "True" a[7], get<bool> "False" a[8]) (true, false) "bools"

                let tuples =
                    a
                    |> Seq.skip 9
                    |> Seq.map (get<(obj | null) array> "tuple" >> Array.length)
                    |> List.ofSeq

                Expect.equal tuples [ 3; 1; 0 ] "tuple lengths"

                let ns = get<PickledNamespace> "ns" root["ns"]

                Expect.equal
                    (get<float> "lr" ns.Values["lr"], get<string> "name" ns.Values["name"])
                    (0.1, "b")
                    "namespace"

                Expect.equal (get<Numerics.BigInteger> "big" root["big"]) (Numerics.BigInteger.Pow(2I, 70)) "2**70"
                let od = get<Dictionary<string, obj | null>> "od" root["od"]
                Expect.equal (get<int64> "k" od["k"]) 1L "OrderedDict"
                Expect.equal (get<string> "7" root["7"]) "seven" "int key"
            }

            test "Bytes, sets and frozensets read in protocols 2 and 5" {
                // pickle.dumps({'b': b'\x00\xff', 's': {3}, 'f': frozenset([4])}, protocol=2), then protocol=5
                for encoded in
                    [
                        "gAJ9cQAoWAEAAABicQFjX2NvZGVjcwplbmNvZGUKcQJYAwAAAADDv3EDWAYAAABsYXRpbjFxBIZxBVJxBlgBAAAAc3EHY19fYnVpbHRpbl9fCnNldApxCF1xCUsDYYVxClJxC1gBAAAAZnEMY19fYnVpbHRpbl9fCmZyb3plbnNldApxDV1xDksEYYVxD1JxEHUu"
                        "gAWVIQAAAAAAAAB9lCiMAWKUQwIA/5SMAXOUj5QoSwOQjAFmlChLBJGUdS4="
                    ] do
                    use dir = new TempDir()

                    use ck =
                        TorchCheckpoint.Read(writeCheckpoint dir (Convert.FromBase64String encoded) [])

                    let root = rootOf ck
                    Expect.equal (get<byte array> "b" root["b"]) [| 0uy; 255uy |] "bytes"

                    Expect.equal
                        (get<List<obj | null>> "s" root["s"] |> Seq.map (get<int64> "s") |> List.ofSeq)
                        [ 3L ]
                        "set"

                    Expect.equal
                        (get<List<obj | null>> "f" root["f"] |> Seq.map (get<int64> "f") |> List.ofSeq)
                        [ 4L ]
                        "frozenset"
            }

            test "A truncated checkpoint is refused as a truncated zip" {
                use dir = new TempDir()
                let bytes = File.ReadAllBytes(fixtureFile "checkpoint-last.pth")
                let path = Path.Combine(dir.Path, "checkpoint-last.pth")
                File.WriteAllBytes(path, bytes[.. bytes.Length / 2])
                let message = refusal path
                Expect.stringStarts message $"{path}: the checkpoint zip is truncated or corrupt (" message
            }

            test "A text file is refused as neither format" {
                use dir = new TempDir()
                let path = Path.Combine(dir.Path, "notes.pth")
                File.WriteAllText(path, "this is not a checkpoint\n")

                Expect.equal
                    (refusal path)
                    $"{path}: not a torch.save checkpoint (neither a zip archive nor the legacy pickle stream of PyTorch before 1.6)."
                    "message"
            }

            test "A zip without data.pkl is refused" {
                use dir = new TempDir()
                let path = Path.Combine(dir.Path, "empty.pth")

                do
                    use zip = ZipFile.Open(path, ZipArchiveMode.Create)
                    zip.CreateEntry "ck/version" |> ignore

                Expect.equal
                    (refusal path)
                    $"{path}: the zip has no <prefix>/data.pkl entry, so it is not a torch.save checkpoint."
                    "message"
            }

            test "A pickle calling os.system is refused before anything runs" {
                use dir = new TempDir()

                let pickle =
                    Array.concat
                        [
                            Pickle.proto2
                            Pickle.glob "os" "system"
                            Pickle.tupleOf [ Pickle.str "echo pwned" ]
                            Pickle.reduce
                            Pickle.stop
                        ]

                let path = writeCheckpoint dir pickle []

                Expect.equal
                    (refusal path)
                    $"{path} (ck/data.pkl): refuses to load the pickled global 'os.system' (only tensors, dicts, lists and argparse.Namespace are read)."
                    "message"
            }

            test "A pickle through STACK_GLOBAL to builtins.eval is refused" {
                use dir = new TempDir()

                let pickle =
                    Array.concat
                        [
                            Pickle.proto2
                            Pickle.str "builtins"
                            Pickle.str "eval"
                            [| 0x93uy |]
                            Pickle.stop
                        ]

                Expect.stringContains
                    (refusal (writeCheckpoint dir pickle []))
                    "refuses to load the pickled global 'builtins.eval'"
                    "message"
            }

            test "A pickle without its STOP opcode is refused as truncated" {
                use dir = new TempDir()

                let path =
                    writeCheckpoint dir (Array.concat [ Pickle.proto2; Pickle.dict [ "a", Pickle.int 1 ] ]) []

                Expect.equal
                    (refusal path)
                    $"{path} (ck/data.pkl): the pickle is truncated (needs 1 bytes at byte 16 of 16)."
                    "message"
            }

            test "An opcode outside the torch.save subset is refused with its position" {
                use dir = new TempDir()
                // INST (`i`), the protocol-0 way to call a class, is never written by torch.save.
                let path =
                    writeCheckpoint dir (Array.concat [ Pickle.proto2; [| byte 'i' |]; Pickle.stop ]) []

                Expect.equal
                    (refusal path)
                    $"{path} (ck/data.pkl): bad pickle at byte 2 (opcode 0x69): unsupported opcode (torch.save does not write it)."
                    "message"
            }

            test "A tensor whose storage is missing from the zip is refused, naming the key" {
                use dir = new TempDir()

                let path =
                    writeCheckpoint
                        dir
                        (Array.concat
                            [
                                Pickle.proto2
                                Pickle.dict [ "w", Pickle.tensor "7" 3 0 [ 3 ] [ 1 ] ]
                                Pickle.stop
                            ])
                        []

                Expect.equal (refusal path) $"{path}: storage '7' (ck/data/7) is missing from the zip." "message"
            }

            test "A storage shorter than its numel is refused" {
                use dir = new TempDir()

                let path =
                    writeCheckpoint
                        dir
                        (Array.concat
                            [
                                Pickle.proto2
                                Pickle.dict [ "w", Pickle.tensor "0" 4 0 [ 4 ] [ 1 ] ]
                                Pickle.stop
                            ])
                        [ "0", [| 1.0f; 2.0f; 3.0f |] ]

                Expect.equal
                    (refusal path)
                    $"{path}: storage '0' (ck/data/0) holds 12 bytes, but 4 elements of FloatStorage need 16."
                    "message"
            }

            test "A view reaching past the end of its storage is refused" {
                use dir = new TempDir()

                let path =
                    writeCheckpoint
                        dir
                        (Array.concat
                            [
                                Pickle.proto2
                                Pickle.dict [ "w", Pickle.tensor "0" 3 1 [ 2; 2 ] [ 2; 1 ] ]
                                Pickle.stop
                            ])
                        [ "0", [| 1.0f; 2.0f; 3.0f |] ]

                Expect.equal
                    (refusal path)
                    $"{path}: a tensor of shape [2, 2] at offset 1 reaches element 4 of storage '0', which holds 3."
                    "message"
            }

            test "Asking for an absent state dict names the key and the top-level keys" {
                use ck = TorchCheckpoint.Read(fixtureFile "vae.ckpt")
                let path = fixtureFile "vae.ckpt"

                let message =
                    (catchT<CheckpointFormatException> (fun () -> ck.StateDict "model_ema" |> ignore)).Message

                Expect.equal
                    message
                    $"{path}: has no state dict 'model_ema' (its top-level keys are 'model')."
                    "message"
            }

            test "A legacy-format (PyTorch before 1.6) state dict reads with its float and int64 tensors" {
                use dir = new TempDir()
                let path = Path.Combine(dir.Path, "legacy.pth")
                use w = torch.arange(6.0f, dtype = torch.float32).reshape (2L, 3L)
                use n = torch.tensor 7L
                LegacyPth.write path [ "layer.weight", w; "bn.num_batches_tracked", n ]
                use ck = TorchCheckpoint.Read path
                let sd = ck.StateDict "state_dict"
                Expect.equal (List.ofSeq sd.Keys) [ "layer.weight"; "bn.num_batches_tracked" ] "keys in pickle order"
                Expect.equal (shapeOf sd["layer.weight"]) [ 2L; 3L ] "shape"
                Expect.equal (floats sd["layer.weight"]) [ 0.0f; 1.0f; 2.0f; 3.0f; 4.0f; 5.0f ] "values"
                Expect.equal sd["bn.num_batches_tracked"].dtype torch.int64 "int64 counter"
                Expect.equal (shapeOf sd["bn.num_batches_tracked"]) [] "a scalar"
                Expect.equal (sd["bn.num_batches_tracked"].item<int64> ()) 7L "value"
            }

            test "Legacy views of a storage and transposed tensors read as torch.load gives them" {
                use dir = new TempDir()
                let path = Path.Combine(dir.Path, "views.pth")

                let bytes =
                    Array.concat
                        [
                            LegacyPth.header
                            LegacyPth.stateDictPickle
                                [
                                    "view",
                                    LegacyPth.tensorRef "FloatStorage" "1" 6L (Some("v", 2L, 3L)) 0L [ 3L ] [ 1L ]
                                    "t", LegacyPth.tensorRef "FloatStorage" "1" 6L None 0L [ 3L; 2L ] [ 1L; 3L ]
                                ]
                            LegacyPth.storages
                                [
                                    "1",
                                    6L,
                                    [| 0.0f; 1.0f; 2.0f; 3.0f; 4.0f; 5.0f |] |> Array.collect BitConverter.GetBytes
                                ]
                        ]

                File.WriteAllBytes(path, bytes)
                use ck = TorchCheckpoint.Read path
                let root = rootOf ck
                Expect.equal (floats (get<torch.Tensor> "view" root["view"])) [ 2.0f; 3.0f; 4.0f ] "elements 2..4"
                let t = get<torch.Tensor> "t" root["t"]
                Expect.equal (shapeOf t) [ 3L; 2L ] "transposed shape"
                Expect.equal (floats t) [ 0.0f; 3.0f; 1.0f; 4.0f; 2.0f; 5.0f ] "transposed values, made contiguous"
            }

            test "A legacy storage whose element count differs from the pickle's, or that is cut short, is refused" {
                use dir = new TempDir()
                let path = Path.Combine(dir.Path, "bad.pth")
                use w = torch.ones (6L)
                LegacyPth.write path [ "w", w ]
                let good = File.ReadAllBytes path
                // The storage's int64 count sits right before its 24 data bytes.
                let miscounted = Array.copy good
                miscounted[good.Length - 32] <- 5uy
                File.WriteAllBytes(path, miscounted)

                Expect.equal (refusal path) $"{path}: storage '1000' holds 5 elements, but the pickle says 6." "count"

                File.WriteAllBytes(path, good[.. good.Length - 5])

                Expect.equal
                    (refusal path)
                    $"{path}: truncated: storage '1000' needs 24 bytes at byte {good.Length - 24} of {good.Length - 4}."
                    "truncated"
            }

            test "A legacy stream with another magic number is refused" {
                use dir = new TempDir()
                let path = Path.Combine(dir.Path, "magic.pth")
                File.WriteAllBytes(path, Array.concat [ Pickle.proto2; Pickle.int 42; Pickle.stop ])

                Expect.equal
                    (refusal path)
                    $"{path}: not a torch.save checkpoint (the legacy stream starts with a different magic number)."
                    "message"
            }
        ]
