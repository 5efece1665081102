/// Hostile and damaged inputs for every file reader (safetensors, `.pth` zips and their pickles, legacy `.pth`, IDX
/// gzip, image files) and the non-finite weight check: each must load correctly or end in a BadInputException naming
/// the file, without allocating much more than the file legitimately describes. Small files written here, never the
/// shipped models.
module HiMar.Tests.ReaderFuzzTests

open System
open System.Collections.Generic
open System.IO
open System.IO.Compression
open System.Text
open Expecto
open TorchSharp
open SixLabors.ImageSharp
open SixLabors.ImageSharp.PixelFormats
open HiMar.Runtime
open HiMar.Runtime.Checkpoints
open HiMar.Runtime.Data
open HiMar.Runtime.Imaging
open HiMar.Tests.TestUtil

/// A scratch folder for the files of one test run (rewritten by each case), deleted when the process exits.
let private scratch =
    lazy
        (let dir = Directory.CreateTempSubdirectory("himar-fuzz-").FullName
         AppDomain.CurrentDomain.ProcessExit.Add(fun _ -> Directory.Delete(dir, true))
         dir)

/// Runs a read: Ok, or the BadInputException's message; any other exception fails the test with its type.
let private outcome (read: unit -> unit) =
    try
        read ()
        Ok()
    with
    | :? BadInputException as e -> Error e.Message
    | e -> failtestf "expected a load or a BadInputException, got %s: %s" (e.GetType().FullName) e.Message

/// The refusal message of a read that must fail.
let private refused (read: unit -> unit) =
    match outcome read with
    | Error message -> message
    | Ok() -> failtest "expected a BadInputException, but the input loaded"

/// Managed bytes allocated on this thread while running f.
let private allocatedBy (f: unit -> unit) =
    let before = GC.GetAllocatedBytesForCurrentThread()
    f ()
    GC.GetAllocatedBytesForCurrentThread() - before

/// The bound every read must keep: a small multiple of the file, plus a fixed allowance for the reader itself.
let private memoryBound (fileLength: int64) = 16L * fileLength + (8L <<< 20)

let private flipBit (bytes: byte array) (position: int) (bit: int) =
    let copy = Array.copy bytes
    copy[position] <- copy[position] ^^^ (1uy <<< bit)
    copy

let private floatBytes (values: float32 array) =
    values |> Array.collect (fun (f: float32) -> BitConverter.GetBytes f)

let private floats (t: torch.Tensor) = t.data<float32>().ToArray()

// ---------------------------------------------------------------------------------------------------------------
// safetensors

/// A small valid safetensors file, written by the project's writer: four dtypes, an empty tensor, metadata.
let private safetensorsFile =
    lazy
        (let path = Path.GetTempFileName()

         try
             use a = torch.arange(6.0f, dtype = torch.float32).reshape (2L, 3L)
             use b = torch.arange (4L, dtype = torch.int64)
             use c = torch.zeros ([| 0L; 3L |], dtype = torch.bfloat16)
             use d = torch.tensor ([| 1.5f; -2.0f; 0.25f |], dtype = torch.float16)

             SafeTensors.Save(path, readOnlyDict [ "a", a; "b", b; "c", c; "d", d ], readOnlyDict [ "source", "fuzz" ])

             File.ReadAllBytes path
         finally
             File.Delete path)

/// Parses safetensors bytes and returns name -> (dtype, shape, raw bytes), disposing the tensors.
let private parseSafetensors (bytes: byte array) =
    let tensors, _ = SafeTensors.Parse(bytes, "fuzz.safetensors", null)

    try
        tensors
        |> Seq.map (fun kv -> kv.Key, (string kv.Value.dtype, List.ofArray kv.Value.shape, kv.Value.bytes.ToArray()))
        |> Map.ofSeq
    finally
        for t in tensors.Values do
            t.Dispose()

/// A safetensors file from a header text and a data section.
let private craftSafetensors (header: string) (data: byte array) =
    let json = Encoding.UTF8.GetBytes header
    Array.concat [ BitConverter.GetBytes(uint64 json.Length); json; data ]

let private headerRefusal (header: string) (data: byte array) =
    refused (fun () -> parseSafetensors (craftSafetensors header data) |> ignore)

let private crcTests =
    testList
        "CRC-32"
        [
            test "the check value of \"123456789\" is 0xCBF43926, and zip's own CRC agrees" {
                Expect.equal (Crc32.Compute("123456789"B)) 0xCBF43926u "check value"
                let data = Array.init 1000 (fun i -> byte (i * 7 % 256))
                use ms = new MemoryStream()

                do
                    use zip = new ZipArchive(ms, ZipArchiveMode.Create, true)
                    use s = zip.CreateEntry("x").Open()
                    s.Write(data, 0, data.Length)

                use zip = new ZipArchive(new MemoryStream(ms.ToArray()), ZipArchiveMode.Read)

                Expect.equal
                    (Crc32.Compute data)
                    (nonNull (zip.GetEntry "x")).Crc32
                    "as System.IO.Compression computes it"
            }

            testProperty "a CRC continued over two pieces equals the CRC of the whole"
            <| fun (data: byte array) (split: uint16) ->
                let k = if data.Length = 0 then 0 else int split % (data.Length + 1)

                Crc32.Append(Crc32.Compute(ReadOnlySpan(data, 0, k)), ReadOnlySpan(data, k, data.Length - k)) = Crc32.Compute
                    data
        ]

let private safetensorsTests =
    testList
        "safetensors"
        [
            test "malformed headers are refused with a message naming the problem" {
                let cases =
                    [
                        "123", "the safetensors header is a JSON number, not an object of tensors"
                        "[]", "the safetensors header is a JSON array, not an object of tensors"
                        """{"w":{"dtype":"F32","shape":[null],"data_offsets":[0,4]}}""",
                        "tensor 'w' has shape [null]: dimensions must be integers >= 0"
                        """{"w":{"dtype":"F32","shape":[-1,-4],"data_offsets":[0,4]}}""",
                        "tensor 'w' has shape [-1, -4]: dimensions must be integers >= 0"
                        """{"w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}}""",
                        "tensor 'w' has shape [1.5]: dimensions must be integers >= 0"
                        """{"w":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,4]}}""",
                        "tensor 'w' has shape [4611686018427387904, 4]: its byte count overflows 64 bits"
                        """{"w":{"dtype":"F32","shape":[0,4611686018427387904,4611686018427387904],"data_offsets":[0,4]}}""",
                        "its byte count overflows 64 bits"
                        """{"w":{"dtype":"F31","shape":[1],"data_offsets":[0,4]}}""",
                        "tensor 'w' has unsupported dtype 'F31'"
                        """{"w":{"dtype":7,"shape":[1],"data_offsets":[0,4]}}""", "tensor 'w' has no dtype string"
                        """{"w":{"dtype":"F32","shape":{},"data_offsets":[0,4]}}""", "tensor 'w' has no shape array"
                        """{"w":{"dtype":"F32","shape":[1],"data_offsets":["0",4]}}""",
                        "tensor 'w' has data_offsets that are not two integers >= 0"
                        """{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}}""",
                        "tensor 'w' has data_offsets that are not two integers >= 0"
                        """{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}""",
                        "tensor 'w' has data offsets outside the file (truncated?)"
                        """{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}""",
                        "tensor 'w' has 4 bytes for shape [2] of F32, which needs 8"
                        """{"w":"F32"}""", "tensor 'w' is a JSON string, not an object"
                        """{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}""",
                        "the safetensors header names 'w' twice"
                        """{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}""",
                        "tensor 'b' (bytes 4 to 12) overlaps another tensor's data, which reaches byte 8"
                        """{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}""",
                        "the safetensors data has a gap: no tensor holds bytes 4 to 8"
                        """{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}""",
                        "the tensors hold 4 bytes, but the data section after the header has 12"
                        """{"__metadata__":{"k":1}}""", "the safetensors __metadata__ entry 'k' is a JSON number"
                        """{"__metadata__":[]}""", "the safetensors __metadata__ is a JSON array"
                        "{", "the safetensors header is not valid JSON"
                    ]

                for header, expected in cases do
                    let message = headerRefusal header (Array.zeroCreate 12)
                    Expect.stringStarts message "fuzz.safetensors: " $"names the file: {header}"
                    Expect.stringContains message expected header

                // Bytes that are not UTF-8 inside a name.
                let json =
                    Array.concat [ "{\""B |> Array.map byte; [| 0xffuy |]; "\":1}"B |> Array.map byte ]

                let bytes = Array.concat [ BitConverter.GetBytes(uint64 json.Length); json ]

                Expect.stringStarts
                    (refused (fun () -> parseSafetensors bytes |> ignore))
                    "fuzz.safetensors: "
                    "invalid UTF-8"
            }

            test "a header length beyond the file or the 100 MB limit is refused before reading" {
                let bytes =
                    Array.append (BitConverter.GetBytes(UInt64.MaxValue)) (Encoding.UTF8.GetBytes "{}")

                Expect.stringContains
                    (refused (fun () -> parseSafetensors bytes |> ignore))
                    "not a safetensors file (header length 18446744073709551615 does not fit in 10 bytes)"
                    "huge length"

                Expect.stringContains
                    (refused (fun () -> parseSafetensors [| 1uy; 2uy |] |> ignore))
                    "too short for a safetensors file (2 bytes)"
                    "short file"
            }

            test "the project's file round-trips, and a file cut at any byte is refused" {
                let bytes = safetensorsFile.Value
                let whole = parseSafetensors bytes
                Expect.equal (whole |> Map.keys |> List.ofSeq) [ "a"; "b"; "c"; "d" ] "names"
                Expect.equal (whole["c"] |> fun (_, s, _) -> s) [ 0L; 3L ] "an empty bf16 tensor"

                for cut in 0 .. bytes.Length - 1 do
                    let used =
                        allocatedBy (fun () ->
                            let message = refused (fun () -> parseSafetensors bytes[.. cut - 1] |> ignore)
                            Expect.stringStarts message "fuzz.safetensors: " $"cut at {cut}")

                    Expect.isLessThan used (memoryBound bytes.LongLength) $"memory at cut {cut}"
            }

            testPropertyWithConfig
                { FsCheckConfig.defaultConfig with
                    maxTest = 400
                }
                "a flipped bit is refused, or loads with the same tensors and at most one changed data byte"
            <| fun (position: uint16) (bit: byte) ->
                let bytes = safetensorsFile.Value
                let original = parseSafetensors bytes
                let p = int position % bytes.Length
                let flipped = flipBit bytes p (int (bit % 8uy))
                let dataStart = 8 + int (BitConverter.ToUInt64(bytes, 0))
                let mutable loaded = Map.empty

                match outcome (fun () -> loaded <- parseSafetensors flipped) with
                | Error message -> message.StartsWith "fuzz.safetensors: "
                | Ok() when p >= dataStart ->
                    // No checksum in safetensors: the same tensors, one byte of one of them changed.
                    let changed =
                        original
                        |> Map.toList
                        |> List.sumBy (fun (name, (_, _, before)) ->
                            let _, _, after = loaded[name]
                            Array.fold2 (fun n (x: byte) y -> if x <> y then n + 1 else n) 0 before after)

                    Set.ofSeq (Map.keys loaded) = Set.ofSeq (Map.keys original) && changed = 1
                | Ok() ->
                    // A flip inside a name or the padding can leave a valid header: the same sizes, in some order.
                    let sizes (m: Map<string, string * int64 list * byte array>) =
                        m |> Map.values |> Seq.map (fun (_, _, b) -> b.Length) |> Seq.sort |> List.ofSeq

                    sizes loaded = sizes original
        ]

// ---------------------------------------------------------------------------------------------------------------
// .pth: zip of a pickle

/// Pickle opcodes for hand-built checkpoints.
module private Pk =
    let op (c: char) = [| byte c |]
    let proto2 = [| 0x80uy; 2uy |]

    let str (s: string) =
        let b = Encoding.UTF8.GetBytes s
        Array.concat [ op 'X'; BitConverter.GetBytes(int32 b.Length); b ]

    let int (n: int) =
        Array.append (op 'J') (BitConverter.GetBytes n)

    let long (n: int64) =
        Array.concat [ [| 0x8auy; 8uy |]; BitConverter.GetBytes n ]

    let glob (m: string) (n: string) =
        Array.append (op 'c') (Encoding.ASCII.GetBytes $"{m}\n{n}\n")

    let tupleOf (items: byte array list) =
        Array.concat [ op '('; Array.concat items; op 't' ]

    let pickle (body: byte array) = Array.concat [ proto2; body; op '.' ]

    /// _rebuild_tensor_v2(('storage', FloatStorage, key, 'cpu', numel), offset, size, stride, False, OrderedDict())
    let tensorWith (key: string) (numel: byte array) (offset: int) (size: byte array list) (stride: byte array list) =
        Array.concat
            [
                glob "torch._utils" "_rebuild_tensor_v2"
                tupleOf
                    [
                        tupleOf [ str "storage"; glob "torch" "FloatStorage"; str key; str "cpu"; numel ]
                        op 'Q'
                        int offset
                        tupleOf size
                        tupleOf stride
                        [| 0x89uy |]
                        Array.concat [ glob "collections" "OrderedDict"; op ')'; op 'R' ]
                    ]
                op 'R'
            ]

    let tensor key (numel: int) offset (size: int list) (stride: int list) =
        tensorWith key (int numel) offset (List.map int size) (List.map int stride)

    let dict (items: (string * byte array) list) =
        Array.concat
            [
                op '}'
                op '('
                items |> List.map (fun (k, v) -> Array.append (str k) v) |> Array.concat
                op 'u'
            ]

/// A torch.save-style zip: ck/data.pkl, ck/byteorder, ck/version and ck/data/<key> storages.
let private zipBytes (level: CompressionLevel) (pickle: byte array) (storages: (string * byte array) list) =
    use ms = new MemoryStream()

    do
        use zip = new ZipArchive(ms, ZipArchiveMode.Create, true)

        let put (name: string) (bytes: byte array) =
            use s = zip.CreateEntry(name, level).Open()
            s.Write(bytes, 0, bytes.Length)

        put "ck/data.pkl" pickle
        put "ck/byteorder" (Encoding.ASCII.GetBytes "little")

        for key, bytes in storages do
            put $"ck/data/{key}" bytes

        put "ck/version" (Encoding.ASCII.GetBytes "3\n")

    ms.ToArray()

/// Reads .pth bytes (written to the scratch folder) and returns the model state dict's values by name.
let private readPth (bytes: byte array) =
    let path = Path.Combine(scratch.Value, "fuzz.pth")
    File.WriteAllBytes(path, bytes)
    use ck = TorchCheckpoint.Read path

    ck.StateDict "model"
    |> Seq.map (fun kv -> kv.Key, (List.ofArray kv.Value.shape, floats kv.Value))
    |> Map.ofSeq

/// The refusal message of .pth bytes, with the scratch path replaced by `fuzz.pth`.
let private pthRefusal (bytes: byte array) =
    let path = Path.Combine(scratch.Value, "fuzz.pth")
    File.WriteAllBytes(path, bytes)
    (refused (fun () -> (TorchCheckpoint.Read path).Dispose())).Replace(path, "fuzz.pth")

let private modelPickle =
    Pk.pickle (
        Pk.dict
            [
                "model",
                Pk.dict
                    [
                        "w", Pk.tensor "0" 6 0 [ 2; 3 ] [ 3; 1 ]
                        "wt", Pk.tensor "0" 6 0 [ 3; 2 ] [ 1; 3 ]
                        "b", Pk.tensor "1" 3 0 [ 3 ] [ 1 ]
                    ]
            ]
    )

let private modelStorages =
    [
        "0", floatBytes [| 0.5f; 1.0f; 1.5f; 2.0f; 2.5f; 3.0f |]
        "1", floatBytes [| -1.0f; 0.0f; 1.0f |]
    ]

/// A small legacy-format (PyTorch before 1.6) checkpoint: one float tensor 0..5 of shape (2, 3).
let private legacyFile =
    lazy
        (let path = Path.Combine(scratch.Value, "legacy-original.pth")
         use w = torch.arange(6.0f, dtype = torch.float32).reshape (2L, 3L)
         LegacyPth.write path [ "layer.weight", w ]
         File.ReadAllBytes path)

/// A small valid checkpoint, stored (as torch.save writes it) or deflated.
let private pthFile level =
    zipBytes level modelPickle modelStorages

/// Offset of the first occurrence of `pattern` in `bytes`.
let private indexOf (bytes: byte array) (pattern: byte array) =
    seq { 0 .. bytes.Length - pattern.Length }
    |> Seq.find (fun i -> bytes[i .. i + pattern.Length - 1] = pattern)

let private pthTests =
    testList
        "pth"
        [
            test "a valid checkpoint loads, stored or deflated, with its strided view" {
                for level in [ CompressionLevel.NoCompression; CompressionLevel.Optimal ] do
                    let sd = readPth (pthFile level)
                    Expect.equal (snd sd["w"]) [| 0.5f; 1.0f; 1.5f; 2.0f; 2.5f; 3.0f |] "w"
                    Expect.equal (fst sd["wt"]) [ 3L; 2L ] "transposed shape"
                    Expect.equal (snd sd["wt"]) [| 0.5f; 2.0f; 1.0f; 2.5f; 1.5f; 3.0f |] "transposed values"
            }

            test "a flipped bit in a stored weight fails the zip's CRC-32" {
                let bytes = pthFile CompressionLevel.NoCompression
                let at = indexOf bytes (floatBytes [| 2.5f |])
                let message = pthRefusal (flipBit bytes (at + 3) 6)
                Expect.stringStarts message "fuzz.pth: zip entry ck/data/0 fails its CRC-32 check (recorded " "message"
                Expect.stringEnds message "): the file is corrupt." "message end"
            }

            test "sizes (2^31-1)^3 with stride 0 are refused as an overflow, before libtorch sees them" {
                let big = Pk.int Int32.MaxValue

                let pickle =
                    Pk.pickle (
                        Pk.dict
                            [
                                "model",
                                Pk.dict
                                    [
                                        "w",
                                        Pk.tensorWith
                                            "0"
                                            (Pk.int 4)
                                            0
                                            [ big; big; big ]
                                            [ Pk.int 0; Pk.int 0; Pk.int 0 ]
                                    ]
                            ]
                    )

                let message =
                    pthRefusal (
                        zipBytes CompressionLevel.NoCompression pickle [ "0", floatBytes [| 1.0f; 2.0f; 3.0f; 4.0f |] ]
                    )

                Expect.equal
                    message
                    "fuzz.pth: a tensor of storage '0' has shape [2147483647, 2147483647, 2147483647], whose byte count overflows 64 bits."
                    "message"
            }

            test "a stride-0 view stretching 256 bytes to 1.2 GB is refused before allocating" {
                let pickle =
                    Pk.pickle (Pk.dict [ "model", Pk.dict [ "w", Pk.tensor "0" 64 0 [ 300_000_000 ] [ 0 ] ] ])

                let bytes =
                    zipBytes CompressionLevel.NoCompression pickle [ "0", floatBytes (Array.create 64 1.0f) ]

                let mutable message = ""
                let used = allocatedBy (fun () -> message <- pthRefusal bytes)

                Expect.stringStarts
                    message
                    "fuzz.pth: a tensor of shape [300000000] (strides [0]) over storage '0' of 64 elements would bring the tensors built to more than "
                    "message"

                Expect.stringEnds message "refused as a view bomb." "message end"
                Expect.isLessThan used (memoryBound bytes.LongLength) "managed memory"
            }

            test "one storage rebuilt a thousand times is refused by the tensor budget" {
                let view = Pk.tensor "0" 262144 0 [ 262144 ] [ 1 ]

                let pickle =
                    Pk.pickle (Pk.dict [ "model", Pk.dict [ for i in 1..1000 -> $"w{i}", view ] ])

                let bytes =
                    zipBytes CompressionLevel.NoCompression pickle [ "0", Array.zeroCreate (4 * 262144) ]

                Expect.stringContains (pthRefusal bytes) "refused as a view bomb" "message"
            }

            test "a storage claiming 2^61 elements is refused before allocating" {
                let pickle =
                    Pk.pickle (
                        Pk.dict
                            [
                                "model",
                                Pk.dict [ "w", Pk.tensorWith "0" (Pk.long (1L <<< 61)) 0 [ Pk.int 1 ] [ Pk.int 1 ] ]
                            ]
                    )

                Expect.equal
                    (pthRefusal (zipBytes CompressionLevel.NoCompression pickle [ "0", floatBytes [| 1.0f |] ]))
                    "fuzz.pth: storage '0' (ck/data/0) claims 2305843009213693952 elements of FloatStorage, which no file can hold."
                    "message"
            }

            test "a 29 KB pickle of nested empty lists is refused for its depth, in little memory" {
                let n = 29 * 1024 / 2

                let pickle =
                    Pk.pickle (Array.concat [ Array.create n (byte ']'); Array.create (n - 1) (byte 'a') ])

                let bytes = zipBytes CompressionLevel.NoCompression pickle []
                let mutable message = ""
                let used = allocatedBy (fun () -> message <- pthRefusal bytes)

                Expect.equal
                    message
                    "fuzz.pth (ck/data.pkl): the pickled object nests containers more than 64 deep."
                    "message"

                Expect.isLessThan used (memoryBound bytes.LongLength) "managed memory"
            }

            test "a pickle copying a memoized list into sets is refused by the value budget" {
                // L = [0] * 4000 (memo 0); then set(L) appended to a list, again and again.
                let fill =
                    Array.concat
                        [
                            Pk.op ']'
                            [| byte 'q'; 0uy |]
                            Pk.op '('
                            Array.concat (List.replicate 4000 [| byte 'K'; 0uy |])
                            Pk.op 'e'
                        ]

                let copy =
                    Array.concat [ [| byte 'h'; 1uy |]; [| byte 'h'; 0uy |]; [| 0x85uy |]; Pk.op 'R'; Pk.op 'a' ]

                let pickle =
                    Pk.pickle (
                        Array.concat
                            [
                                Pk.glob "builtins" "set"
                                [| byte 'q'; 1uy; byte '0' |]
                                fill
                                Pk.op '0'
                                Pk.op ']'
                                Array.concat (List.replicate 2000 copy)
                            ]
                    )

                let bytes = zipBytes CompressionLevel.NoCompression pickle []
                let mutable message = ""
                let used = allocatedBy (fun () -> message <- pthRefusal bytes)
                Expect.stringStarts message "fuzz.pth (ck/data.pkl): bad pickle at byte " "message"
                Expect.stringContains message "(a container bomb?)" "budget"
                Expect.isLessThan used (memoryBound bytes.LongLength) "managed memory"
            }

            test "a list that contains itself is refused" {
                let pickle =
                    Pk.pickle (Array.concat [ Pk.op ']'; [| byte 'q'; 0uy; byte 'h'; 0uy |]; Pk.op 'a' ])

                Expect.equal
                    (pthRefusal (zipBytes CompressionLevel.NoCompression pickle []))
                    "fuzz.pth (ck/data.pkl): the pickled object contains itself (a list holds itself); recursive structures are not read."
                    "message"
            }

            test "an entry declaring more bytes than deflate can produce is refused before allocating" {
                // The pickle and the central directory agree on a 1 GB storage; its 24 compressed bytes cannot hold it.
                let pickle =
                    Pk.pickle (Pk.dict [ "model", Pk.dict [ "w", Pk.tensor "0" 250_000_000 0 [ 6 ] [ 1 ] ] ])

                let bytes =
                    zipBytes CompressionLevel.Optimal pickle [ "0", floatBytes (Array.create 6 1.0f) ]

                let name = Encoding.ASCII.GetBytes "ck/data/0"

                let record =
                    seq { 0 .. bytes.Length - 46 - name.Length }
                    |> Seq.find (fun i ->
                        BitConverter.ToUInt32(bytes, i) = 0x02014b50u
                        && bytes[i + 46 .. i + 45 + name.Length] = name)

                let patched = Array.copy bytes
                BitConverter.GetBytes(1_000_000_000u).CopyTo(patched, record + 24)
                let mutable message = ""
                let used = allocatedBy (fun () -> message <- pthRefusal patched)
                Expect.stringStarts message "fuzz.pth: zip entry ck/data/0 claims 1000000000 bytes from " "message"
                Expect.stringEnds message "compressed bytes, more than deflate can produce (corrupt zip)." "message end"
                Expect.isLessThan used (memoryBound bytes.LongLength) "managed memory"
            }

            test "a checkpoint cut at any byte is refused" {
                let bytes = pthFile CompressionLevel.NoCompression

                for cut in 0 .. bytes.Length - 1 do
                    Expect.stringStarts (pthRefusal bytes[.. cut - 1]) "fuzz.pth" $"cut at {cut}"
            }

            test "a legacy checkpoint cut at any byte is refused" {
                let bytes = legacyFile.Value

                for cut in 0 .. bytes.Length - 1 do
                    Expect.stringStarts (pthRefusal bytes[.. cut - 1]) "fuzz.pth" $"cut at {cut}"
            }

            testPropertyWithConfig
                { FsCheckConfig.defaultConfig with
                    maxTest = 300
                }
                "a random program of the opcodes torch.save uses is refused or loads, never another exception"
            <| fun (choices: byte array) ->
                let snippets =
                    [|
                        Pk.op ']'
                        Pk.op '}'
                        Pk.op ')'
                        Pk.op '('
                        Pk.op '0'
                        Pk.op '1'
                        Pk.op '2'
                        Pk.op 'a'
                        Pk.op 'e'
                        Pk.op 's'
                        Pk.op 'u'
                        Pk.op 't'
                        Pk.op 'R'
                        Pk.op 'b'
                        Pk.op 'N'
                        Pk.op 'Q'
                        [| 0x85uy |]
                        [| 0x86uy |]
                        [| 0x87uy |]
                        [| 0x88uy |]
                        [| 0x8fuy |]
                        [| 0x90uy |]
                        [| 0x91uy |]
                        [| 0x93uy |]
                        [| 0x94uy |]
                        [| 0x81uy |]
                        [| byte 'K'; 1uy |]
                        [| byte 'q'; 0uy |]
                        [| byte 'h'; 0uy |]
                        [| byte 'h'; 1uy |]
                        Pk.str "k"
                        Pk.str "storage"
                        Pk.glob "builtins" "set"
                        Pk.glob "collections" "OrderedDict"
                        Pk.glob "argparse" "Namespace"
                        Pk.glob "torch" "FloatStorage"
                        Pk.glob "torch._utils" "_rebuild_tensor_v2"
                        Pk.glob "_codecs" "encode"
                        Pk.op '.'
                    |]

                let program =
                    Array.concat
                        [
                            Pk.proto2
                            choices |> Array.collect (fun c -> snippets[int c % snippets.Length])
                        ]

                match
                    outcome (fun () ->
                        let path = Path.Combine(scratch.Value, "fuzz.pth")
                        File.WriteAllBytes(path, zipBytes CompressionLevel.NoCompression program modelStorages)
                        (TorchCheckpoint.Read path).Dispose())
                with
                | Error message -> message.StartsWith(Path.Combine(scratch.Value, "fuzz.pth"))
                | Ok() -> true

            testPropertyWithConfig
                { FsCheckConfig.defaultConfig with
                    maxTest = 300
                }
                "a flipped bit in a .pth is refused, or loads the very same tensors"
            <| fun (position: uint16) (bit: byte) (deflated: bool) ->
                let bytes =
                    pthFile (
                        if deflated then
                            CompressionLevel.Optimal
                        else
                            CompressionLevel.NoCompression
                    )

                let flipped = flipBit bytes (int position % bytes.Length) (int (bit % 8uy))
                let mutable loaded = Map.empty

                match outcome (fun () -> loaded <- readPth flipped) with
                | Error message -> message.Contains "fuzz.pth"
                | Ok() -> loaded = readPth bytes

            testPropertyWithConfig
                { FsCheckConfig.defaultConfig with
                    maxTest = 200
                }
                "a flipped bit in a legacy .pth (no checksum) is refused, or loads one tensor, its data at most one value off"
            <| fun (position: uint16) (bit: byte) ->
                let bytes = legacyFile.Value
                let p = int position % bytes.Length
                let path = Path.Combine(scratch.Value, "legacy.pth")
                File.WriteAllBytes(path, flipBit bytes p (int (bit % 8uy)))
                let mutable loaded = []

                let read () =
                    use ck = TorchCheckpoint.Read path

                    loaded <-
                        [
                            for kv in ck.StateDict "state_dict" -> List.ofArray kv.Value.shape, floats kv.Value
                        ]

                match outcome read with
                | Error message -> message.StartsWith path
                | Ok() when p >= bytes.Length - 24 ->
                    // A flip in the storage's data (its last 24 bytes) changes one value of the tensor.
                    match loaded with
                    | [ shape, values ] ->
                        shape = [ 2L; 3L ]
                        && (Array.zip values [| 0.0f .. 5.0f |] |> Array.filter (fun (a, b) -> a <> b)).Length
                           <= 1
                    | _ -> false
                | Ok() -> loaded.Length = 1
        ]

// ---------------------------------------------------------------------------------------------------------------
// IDX (gzip)

let private gzip (bytes: byte array) =
    use ms = new MemoryStream()

    do
        use z = new GZipStream(ms, CompressionLevel.Optimal, true)
        z.Write(bytes, 0, bytes.Length)

    ms.ToArray()

let private idxImages (count: int) (rows: int) (cols: int) =
    Array.concat
        [
            bigEndian 0x803
            bigEndian count
            bigEndian rows
            bigEndian cols
            Array.init (count * rows * cols) (fun i -> byte (i % 251))
        ]

let private idxLabels (labels: byte array) =
    Array.concat [ bigEndian 0x801; bigEndian labels.Length; labels ]

/// Writes a Fashion-MNIST folder (training split) and loads it: count, rows, cols and the first image's pixel sum.
let private loadFashion (images: byte array) (labels: byte array) =
    let dir = Path.Combine(scratch.Value, "fashion")
    Directory.CreateDirectory dir |> ignore
    File.WriteAllBytes(Path.Combine(dir, "train-images-idx3-ubyte.gz"), images)
    File.WriteAllBytes(Path.Combine(dir, "train-labels-idx1-ubyte.gz"), labels)
    let d = IdxDataset.FashionMnist dir
    use b = (d :> IImageDataset).Batch([| 0 |], [| false |])
    use sum = b.sum ()
    d.Count, d.Rows, d.Cols, sum.item<float32> ()

/// The load of the valid two-image Fashion-MNIST pair the flip property damages.
let private fashionExpected =
    lazy (loadFashion (gzip (idxImages 2 28 28)) (gzip (idxLabels [| 3uy; 9uy |])))

let private fashionRefusal images labels =
    refused (fun () -> loadFashion images labels |> ignore)

let private idxTests =
    testList
        "IDX"
        [
            test "Fashion-MNIST files of 28x28 images load; other sizes, bad labels and bad headers are refused" {
                let labels = gzip (idxLabels [| 3uy; 9uy |])
                let count, rows, cols, _ = loadFashion (gzip (idxImages 2 28 28)) labels
                Expect.equal (count, rows, cols) (2, 28, 28) "loaded"

                Expect.stringEnds
                    (fashionRefusal (gzip (idxImages 2 32 32)) labels)
                    "train-images-idx3-ubyte.gz: holds 32x32 images; this loader expects 28x28."
                    "not 28x28"

                Expect.stringEnds
                    (fashionRefusal (gzip (idxImages 2 28 28)) (gzip (idxLabels [| 3uy; 200uy |])))
                    "train-labels-idx1-ubyte.gz: label 200 of image 1 is not one of the 10 classes."
                    "label"

                Expect.stringEnds
                    (fashionRefusal (gzip (idxImages 2 28 28)) (gzip (idxLabels [| 3uy |])))
                    "train-labels-idx1-ubyte.gz: holds 1 labels for 2 images."
                    "label count"

                Expect.stringEnds
                    (fashionRefusal (gzip (Array.append (bigEndian 0x803) (bigEndian 2))) labels)
                    "train-images-idx3-ubyte.gz: the IDX header is truncated (8 of 16 bytes)."
                    "short header"

                Expect.stringEnds
                    (fashionRefusal (gzip (idxLabels [| 1uy |])) labels)
                    "train-images-idx3-ubyte.gz: not an IDX images file (magic 0x00000803 expected)."
                    "magic"

                Expect.stringEnds
                    (fashionRefusal
                        (gzip (Array.concat [ bigEndian 0x803; bigEndian -5; bigEndian 28; bigEndian 28 ]))
                        labels)
                    "train-images-idx3-ubyte.gz: the IDX header declares dimensions -5x28x28; each must be positive."
                    "negative count"
            }

            test "a header declaring gigabytes is refused before allocating" {
                let labels = gzip (idxLabels [| 3uy |])

                let huge =
                    gzip (Array.concat [ bigEndian 0x803; bigEndian Int32.MaxValue; bigEndian 28; bigEndian 28 ])

                let mutable message = ""
                let used = allocatedBy (fun () -> message <- fashionRefusal huge labels)

                Expect.stringContains
                    message
                    "the IDX header declares 2147483647x28x28 bytes, more than the "
                    "2^31 images"

                Expect.isLessThan used (memoryBound 1024L) "managed memory"

                let million =
                    gzip (Array.concat [ bigEndian 0x803; bigEndian 1_000_000; bigEndian 28; bigEndian 28 ])

                let used2 = allocatedBy (fun () -> message <- fashionRefusal million labels)
                Expect.stringContains message "bytes, more than a " "a million images from a tiny file"

                Expect.stringContains
                    message
                    "-byte gzip file can hold (truncated?)."
                    "a million images from a tiny file"

                Expect.isLessThan used2 (memoryBound 1024L) "managed memory"
            }

            test "a small gzip that expands far beyond its header is refused after reading only the declared size" {
                // 2 images declared, 32 MB of zeros behind them (about 32 KB of gzip).
                let body = Array.zeroCreate<byte> (32 <<< 20)
                Array.blit (idxImages 2 28 28) 0 body 0 (16 + 2 * 784)
                let bomb = gzip body
                Expect.isLessThan bomb.Length (64 <<< 10) "a small file"
                let labels = gzip (idxLabels [| 3uy; 9uy |])
                let mutable message = ""
                let used = allocatedBy (fun () -> message <- fashionRefusal bomb labels)

                Expect.stringEnds
                    message
                    "train-images-idx3-ubyte.gz: the gzip trailer records 33554432 bytes (mod 2^32), but the IDX header declares 16 + 1568 (not one gzip stream?)."
                    "the trailer's length"

                Expect.isLessThan used (memoryBound bomb.LongLength) "managed memory"
                // With the trailer's length forged to match, the stream is read only to the declared size plus one byte.
                let forged = Array.copy bomb
                BitConverter.GetBytes(16u + 1568u).CopyTo(forged, forged.Length - 4)
                let used2 = allocatedBy (fun () -> message <- fashionRefusal forged labels)

                Expect.stringEnds
                    message
                    "train-images-idx3-ubyte.gz: holds more than the 2x28x28 = 1568 bytes its IDX header declares."
                    "message"

                Expect.isLessThan used2 (memoryBound bomb.LongLength) "managed memory"
            }

            test "an IDX gzip cut at any byte is refused" {
                let images = gzip (idxImages 2 28 28)
                let labels = gzip (idxLabels [| 3uy; 9uy |])

                let loaded =
                    [
                        for cut in 0 .. images.Length - 1 do
                            match outcome (fun () -> loadFashion images[.. cut - 1] labels |> ignore) with
                            | Ok() -> yield cut
                            | Error message ->
                                Expect.stringContains message "train-images-idx3-ubyte.gz: " $"cut at {cut}"
                    ]

                Expect.equal loaded [] $"cuts that loaded, of {images.Length} bytes"
            }

            testPropertyWithConfig
                { FsCheckConfig.defaultConfig with
                    maxTest = 200
                }
                "a flipped bit in an IDX gzip is refused (gzip's CRC), or loads the same pixels"
            <| fun (position: uint16) (bit: byte) ->
                let images = gzip (idxImages 2 28 28)
                let labels = gzip (idxLabels [| 3uy; 9uy |])
                let flipped = flipBit images (int position % images.Length) (int (bit % 8uy))
                let expected = fashionExpected.Value
                let mutable loaded = None

                match outcome (fun () -> loaded <- Some(loadFashion flipped labels)) with
                | Error message -> message.Contains "train-images-idx3-ubyte.gz: "
                | Ok() -> loaded = Some expected
        ]

// ---------------------------------------------------------------------------------------------------------------
// Images

let private pngBytes (width: int) (height: int) =
    use image = new Image<Rgb24>(width, height)

    for y in 0 .. height - 1 do
        for x in 0 .. width - 1 do
            image[x, y] <- Rgb24(byte (x * 40), byte (y * 40), 128uy)

    use ms = new MemoryStream()
    image.SaveAsPng ms
    ms.ToArray()

/// A 5x3 image encoded as JPEG (0), GIF (1), BMP (2) or TIFF (3).
let private encoded (format: int) =
    use image = new Image<Rgb24>(5, 3)

    for y in 0..2 do
        for x in 0..4 do
            image[x, y] <- Rgb24(byte (x * 40), byte (y * 40), 128uy)

    use ms = new MemoryStream()

    match format with
    | 0 -> image.SaveAsJpeg ms
    | 1 -> image.SaveAsGif ms
    | 2 -> image.SaveAsBmp ms
    | _ -> image.SaveAsTiff ms

    ms.ToArray()

/// A PNG whose IHDR (its CRC recomputed) declares another size.
let private withDeclaredSize (png: byte array) (width: int) (height: int) =
    let copy = Array.copy png
    bigEndian(width).CopyTo(copy, 16)
    bigEndian(height).CopyTo(copy, 20)
    let crc = Crc32.Compute(ReadOnlySpan(copy, 12, 17))
    bigEndian(int crc).CopyTo(copy, 29)
    copy

let private imageRefusal (bytes: byte array) =
    let path = Path.Combine(scratch.Value, "fuzz.png")
    File.WriteAllBytes(path, bytes)
    (refused (fun () -> (ImageFiles.Load<Rgb24> path).Dispose())).Replace(path, "fuzz.png")

let private imageTests =
    testList
        "images"
        [
            test "an image declaring 10^10 pixels is refused from its header, before decoding" {
                let bomb = withDeclaredSize (pngBytes 4 4) 100_000 100_000
                let mutable message = ""
                let used = allocatedBy (fun () -> message <- imageRefusal bomb)

                Expect.equal
                    message
                    $"fuzz.png: the image is 100000x100000 = 10000000000 pixels, more than the {ImageFiles.MaxPixels} read (a decompression bomb?)."
                    "message"

                Expect.isLessThan used (memoryBound bomb.LongLength) "managed memory"
            }

            test "an image folder skips such an image with a warning naming it" {
                withTempDir (fun dir ->
                    let cls = Path.Combine(dir, "cls")
                    Directory.CreateDirectory cls |> ignore
                    File.WriteAllBytes(Path.Combine(cls, "a.png"), pngBytes 8 8)
                    File.WriteAllBytes(Path.Combine(cls, "b.png"), withDeclaredSize (pngBytes 4 4) 100_000 100_000)
                    let folder = ImageFolder(dir, 4)
                    let warnings = List<string>()
                    let mutable pixels: float32 array | null = null
                    Expect.isTrue (folder.TryLoad(0, &pixels, Action<string> warnings.Add)) "the small image"
                    Expect.isFalse (folder.TryLoad(1, &pixels, Action<string> warnings.Add)) "the bomb"
                    Expect.equal (List.ofSeq folder.Skipped) (List.ofSeq warnings) "skipped = warned"
                    let bomb = Path.Combine(cls, "b.png")

                    Expect.stringStarts
                        warnings[0]
                        $"{bomb}: skipped, cannot be decoded (the image is 100000x100000"
                        "names it"

                    let e =
                        catchT<BadInputException> (fun () ->
                            (folder :> IImageDataset).Batch([| 1 |], [| false |]) |> ignore)

                    Expect.equal e.Message warnings[0] "a batch with it is refused")
            }

            test "a text file is refused as an unreadable image" {
                Expect.equal
                    (imageRefusal (Encoding.ASCII.GetBytes "not an image"))
                    "fuzz.png: not a readable image (unknown or unsupported format)."
                    "message"
            }

            testPropertyWithConfig
                { FsCheckConfig.defaultConfig with
                    maxTest = 200
                }
                "a PNG cut or with a flipped bit is refused, or decodes at its declared size"
            <| fun (position: uint16) (bit: byte) (cut: bool) ->
                let png = pngBytes 5 3
                let p = int position % png.Length

                let damaged =
                    if cut then
                        png[.. p - 1]
                    else
                        flipBit png p (int (bit % 8uy))

                let path = Path.Combine(scratch.Value, "fuzz.png")
                File.WriteAllBytes(path, damaged)
                let mutable size = (0, 0)

                match
                    outcome (fun () ->
                        use image = ImageFiles.Load<Rgb24> path
                        size <- (image.Width, image.Height))
                with
                | Error message -> message.StartsWith path
                | Ok() -> size = (5, 3)

            testPropertyWithConfig
                { FsCheckConfig.defaultConfig with
                    maxTest = 300
                }
                "a JPEG, GIF, BMP or TIFF cut or with a flipped bit is refused, or decodes within the pixel limit"
            <| fun (format: byte) (position: uint16) (bit: byte) (cut: bool) ->
                let bytes = encoded (int (format % 4uy))
                let p = int position % bytes.Length

                let damaged =
                    if cut then
                        bytes[.. p - 1]
                    else
                        flipBit bytes p (int (bit % 8uy))

                let path = Path.Combine(scratch.Value, "fuzz.img")
                File.WriteAllBytes(path, damaged)
                let mutable pixels = 0L

                match
                    outcome (fun () ->
                        use image = ImageFiles.Load<Rgb24> path
                        pixels <- int64 image.Width * int64 image.Height)
                with
                | Error message -> message.StartsWith path
                | Ok() -> pixels > 0L && pixels <= ImageFiles.MaxPixels

            test "the flipped bit that made a decoder divide by zero is refused in one line naming the file" {
                // Found by the property above: format 2, byte 29, bit 7 (a header field turned to zero).
                let bytes = encoded 2
                let path = Path.Combine(scratch.Value, "divide.img")
                File.WriteAllBytes(path, flipBit bytes (29 % bytes.Length) 7)

                match outcome (fun () -> (ImageFiles.Load<Rgb24> path).Dispose()) with
                | Error message ->
                    Expect.stringStarts message path "names the file"
                    Expect.isFalse (message.Contains '\n') "one line"
                | Ok() -> ()
            }

            test
                "a JPEG cut inside its scan, where the decoder met a null buffer, is refused in one line naming the file" {
                // Found by sweeping every cut and flipped bit of the four formats: the test JPEG cut to its first 173
                // bytes threw a NullReferenceException from inside the decoder.
                let path = Path.Combine(scratch.Value, "cut.jpg")
                File.WriteAllBytes(path, (encoded 0)[..172])
                let message = refused (fun () -> (ImageFiles.Load<Rgb24> path).Dispose())
                Expect.stringStarts message path "names the file"
                Expect.stringContains message "not a readable image" "says what is wrong"
                Expect.isFalse (message.Contains '\n') "one line"
            }
        ]

// ---------------------------------------------------------------------------------------------------------------
// .npz reference statistics

/// Valid statistics (mu 0..3, sigma the 4x4 identity), written by the project's writer.
let private npzFile =
    lazy
        (let path = Path.Combine(scratch.Value, "original.npz")

         use s =
             new HiMar.Runtime.Evaluation.FeatureStats(
                 torch.arange (4.0, dtype = torch.float64),
                 torch.eye (4L, dtype = torch.float64)
             )

         HiMar.Runtime.Evaluation.Metrics.WriteNpz(s, path)
         File.ReadAllBytes path)

/// Reads .npz bytes: mu and sigma as float64 arrays.
let private readNpz (bytes: byte array) =
    let path = Path.Combine(scratch.Value, "fuzz.npz")
    File.WriteAllBytes(path, bytes)
    use s = HiMar.Runtime.Evaluation.Metrics.ReadNpz path
    s.Mu.data<float>().ToArray(), s.Sigma.data<float>().ToArray()

/// An .npz holding one `mu.npy` of the given bytes.
let private npzOf (npy: byte array) =
    use ms = new MemoryStream()

    do
        use zip = new ZipArchive(ms, ZipArchiveMode.Create, true)
        use s = zip.CreateEntry("mu.npy").Open()
        s.Write(npy, 0, npy.Length)

    ms.ToArray()

/// An .npy (version 1) of a header length, header text and data.
let private npy (headerLength: int) (header: string) (data: byte array) =
    Array.concat
        [
            [| 0x93uy |]
            Encoding.ASCII.GetBytes "NUMPY"
            [| 1uy; 0uy |]
            BitConverter.GetBytes(uint16 headerLength)
            Encoding.ASCII.GetBytes header
            data
        ]

/// An .npz holding one `mu.npy` with the given header text and data.
let private craftNpz (header: string) (data: byte array) = npzOf (npy header.Length header data)

let private npzTests =
    testList
        "npz"
        [
            test "valid statistics load; malformed arrays are refused naming the file and array" {
                let mu, sigma = readNpz npzFile.Value
                Expect.equal mu [| 0.0; 1.0; 2.0; 3.0 |] "mu"
                Expect.equal sigma.Length 16 "sigma"

                let refusal header data =
                    refused (fun () -> readNpz (craftNpz header data) |> ignore)
                    |> fun m -> m.Replace(Path.Combine(scratch.Value, "fuzz.npz"), "fuzz.npz")

                Expect.equal
                    (refusal
                        "{'descr': '<f8', 'fortran_order': False, 'shape': (4611686018427387904, 4), }"
                        (Array.zeroCreate 8))
                    "fuzz.npz:mu: truncated (8 bytes for shape (4611686018427387904, 4) of <f8)."
                    "overflowing shape"

                Expect.equal
                    (refusal "{'descr': '<f8', 'fortran_order': False, 'shape': (-4,), }" (Array.zeroCreate 8))
                    "fuzz.npz:mu: shape entry '-4' is not an integer >= 0."
                    "negative shape"

                Expect.equal
                    (refusal "{'descr': '<i8', 'fortran_order': False, 'shape': (1,), }" (Array.zeroCreate 8))
                    "fuzz.npz:mu: dtype '<i8' is not read (float32 or float64 little-endian)."
                    "dtype"

                Expect.equal
                    (refused (fun () -> readNpz (npzOf (npy 60000 "{'descr': '<f8', }" [||])) |> ignore)
                     |> fun m -> m.Replace(Path.Combine(scratch.Value, "fuzz.npz"), "fuzz.npz"))
                    "fuzz.npz:mu: the .npy header is truncated."
                    "header length beyond the array"
            }

            test "an .npz cut at any byte is refused" {
                let bytes = npzFile.Value

                for cut in 0 .. bytes.Length - 1 do
                    Expect.stringStarts
                        (refused (fun () -> readNpz bytes[.. cut - 1] |> ignore))
                        (Path.Combine(scratch.Value, "fuzz.npz"))
                        $"cut at {cut}"
            }

            testPropertyWithConfig
                { FsCheckConfig.defaultConfig with
                    maxTest = 200
                }
                "a flipped bit in an .npz is refused (zip CRC-32), or loads the same statistics"
            <| fun (position: uint16) (bit: byte) ->
                let bytes = npzFile.Value
                let flipped = flipBit bytes (int position % bytes.Length) (int (bit % 8uy))
                let mutable loaded = ([||], [||])

                match outcome (fun () -> loaded <- readNpz flipped) with
                | Error message -> message.StartsWith(Path.Combine(scratch.Value, "fuzz.npz"))
                | Ok() -> loaded = readNpz bytes
        ]

// ---------------------------------------------------------------------------------------------------------------
// Non-finite weights

let private finiteTests =
    testList
        "non-finite weights"
        [
            test "a model folder with NaN and infinity is refused naming the tensors; allowed, it loads with a warning" {
                withTempDir (fun dir ->
                    File.Copy(Path.Combine(genericFixture, "manifest.json"), Path.Combine(dir, "manifest.json"))
                    let tensors = SafeTensors.Load(Path.Combine(genericFixture, "weights.safetensors"))

                    try
                        let names =
                            tensors.Keys
                            |> Seq.filter (fun k -> tensors[k].is_floating_point ())
                            |> Seq.sort
                            |> Seq.take 2
                            |> List.ofSeq

                        tensors[names[0]].view(-1L).narrow(0L, 0L, 1L).fill_ (Double.NaN) |> ignore

                        tensors[names[1]].view(-1L).narrow(0L, 0L, 1L).fill_ (Double.PositiveInfinity)
                        |> ignore

                        let weights = Path.Combine(dir, "weights.safetensors")
                        SafeTensors.Save(weights, tensors)

                        let e =
                            catchT<CheckpointFormatException> (fun () -> (ReferenceImport.LoadModel dir).Dispose())

                        Expect.equal
                            e.Message
                            $"{weights}: 2 tensors hold NaN or infinity ({names[0]}, {names[1]}); such weights sample black or garbage images (sample and eval take --allow-nonfinite to load them anyway)."
                            "message"

                        let warnings = List<string>()

                        use m = ReferenceImport.LoadModel(dir, true, true, Action<string> warnings.Add)

                        Expect.equal
                            (List.ofSeq warnings)
                            [
                                $"{weights}: 2 tensors hold NaN or infinity ({names[0]}, {names[1]}); loading them anyway (--allow-nonfinite)."
                            ]
                            "warning"
                    finally
                        for t in tensors.Values do
                            t.Dispose())
            }

            test "the message lists the first five offending tensors and counts the rest" {
                let tensors =
                    [ for i in 1..7 -> KeyValuePair($"t{i}", torch.tensor [| 1.0f; Single.NaN |]) ]
                    @ [
                        KeyValuePair("ok", torch.ones (3L))
                        KeyValuePair("ints", torch.tensor [| 1L |])
                    ]

                try
                    let e =
                        catchT<CheckpointFormatException> (fun () -> FiniteWeights.Require(tensors, "w.safetensors"))

                    Expect.stringStarts
                        e.Message
                        "w.safetensors: 7 tensors hold NaN or infinity (t1, t2, t3, t4, t5 and 2 more); "
                        "message"
                finally
                    for kv in tensors do
                        kv.Value.Dispose()
            }
        ]

let tests =
    testList
        "ReaderFuzz"
        [
            crcTests
            safetensorsTests
            pthTests
            idxTests
            imageTests
            npzTests
            finiteTests
        ]
