/// Helpers shared by the test lists: fixture location, exception capture, tensor comparison.
module HiMar.Tests.TestUtil

open System
open System.Diagnostics
open System.IO
open System.IO.Compression
open Expecto
open TorchSharp

/// The repository root (the folder holding HiMarFunctional.sln), found from the test binary upwards.
let repoRoot =
    let rec up (d: DirectoryInfo | null) =
        match d with
        | null -> failwith "HiMarFunctional.sln not found above the test binary"
        | d when File.Exists(Path.Combine(d.FullName, "HiMarFunctional.sln")) -> d.FullName
        | d -> up d.Parent

    up (DirectoryInfo AppContext.BaseDirectory)

/// The shared parity fixture folder `tiny` (../shared/fixtures/parity/tiny beside the checkout).
let tinyFixture =
    Path.GetFullPath(Path.Combine(repoRoot, "..", "shared", "fixtures", "parity", "tiny"))

/// The project's own fixture of a configuration unlike tiny's (tests/fixtures/generic: cond_scale 4, an 8x8
/// grid, decoder deeper and with more heads than the encoder, 7 classes, 8-channel tokens).
let genericFixture = Path.Combine(repoRoot, "tests", "fixtures", "generic")

/// Runs f, expecting an exception of type 'E, and returns it.
let catchT<'E when 'E :> exn> (f: unit -> unit) : 'E =
    try
        f ()
        failtestf "expected %s, got no exception" typeof<'E>.Name
    with :? 'E as e ->
        e

/// Runs f in a fresh temporary folder, deleted afterwards.
let withTempDir (f: string -> unit) =
    let dir = Directory.CreateTempSubdirectory("himar-test-")

    try
        f dir.FullName
    finally
        dir.Delete true

/// max |a - b| in float64.
let maxAbsDiff (a: torch.Tensor) (b: torch.Tensor) =
    use d = (a.``to`` torch.float64 - b.``to`` torch.float64).abs().max ()
    d.item<float> ()

/// The shape of a tensor as a list.
let shapeOf (t: torch.Tensor) = List.ofArray t.shape

/// Hand-written legacy `torch.save` streams (PyTorch 0.4 to 1.5, the format of pytorch-fid's Inception weights):
/// pickled magic number, protocol version and system facts, the pickled object with persistent ids, the pickled
/// storage keys, then per storage an int64 element count and the raw little-endian data. No Python runs here.
/// The 4 big-endian bytes of an int (IDX headers).
let bigEndian (v: int) =
    [| byte (v >>> 24); byte (v >>> 16); byte (v >>> 8); byte v |]

/// An IDX folder of `count` random 28x28 images in 10 classes, named as Fashion-MNIST's training files.
let writeIdx (dir: string) (count: int) =
    Directory.CreateDirectory dir |> ignore
    let rng = Random(3)
    let pixels = Array.zeroCreate<byte> (count * 28 * 28)
    rng.NextBytes pixels

    let write (name: string) (bytes: byte[]) =
        use f = File.Create(Path.Combine(dir, name))
        use gz = new GZipStream(f, CompressionLevel.Fastest)
        gz.Write(bytes, 0, bytes.Length)

    write
        "train-images-idx3-ubyte.gz"
        (Array.concat [ bigEndian 0x803; bigEndian count; bigEndian 28; bigEndian 28; pixels ])

    write
        "train-labels-idx1-ubyte.gz"
        (Array.concat
            [
                bigEndian 0x801
                bigEndian count
                [| for i in 0 .. count - 1 -> byte (i % 10) |]
            ])

module LegacyPth =
    let private str (s: string) =
        let b = Text.Encoding.UTF8.GetBytes s
        Array.concat [ [| byte 'X' |]; BitConverter.GetBytes(int32 b.Length); b ]

    let private int (n: int64) =
        Array.append [| byte 'J' |] (BitConverter.GetBytes(int32 n))

    let private glob (m: string) (n: string) =
        Array.append [| byte 'c' |] (Text.Encoding.ASCII.GetBytes $"{m}\n{n}\n")

    let private tupleOf (items: byte array list) =
        Array.concat [ [| byte '(' |]; Array.concat items; [| byte 't' |] ]

    let private pickle (body: byte array) =
        Array.concat [ [| 0x80uy; 2uy |]; body; [| byte '.' |] ]

    let private orderedDict =
        Array.concat [ glob "collections" "OrderedDict"; [| byte ')'; byte 'R' |] ]

    /// The three header pickles: magic number 0x1950a86a20f9469cfc6c, protocol 1001, system facts.
    let header =
        let magic =
            Numerics.BigInteger.Parse("1950a86a20f9469cfc6c", Globalization.NumberStyles.HexNumber)

        let m = magic.ToByteArray()

        Array.concat
            [
                pickle (Array.concat [ [| 0x8auy; byte m.Length |]; m ])
                pickle [| byte 'M'; 0xe9uy; 0x03uy |]
                pickle (
                    Array.concat
                        [
                            [| byte '}'; byte '(' |]
                            str "protocol_version"
                            int 1001L
                            str "little_endian"
                            [| 0x88uy |]
                            str "type_sizes"
                            [| byte '}'; byte '(' |]
                            str "short"
                            int 2L
                            str "int"
                            int 4L
                            str "long"
                            int 4L
                            [| byte 'u'; byte 'u' |]
                        ]
                )
            ]

    /// `_rebuild_tensor_v2(pid, offset, size, stride, False, OrderedDict())` with the legacy persistent id
    /// ('storage', torch.<storageClass>, key, 'cpu', numel, view), view None or (view key, offset, numel).
    let tensorRef
        (storageClass: string)
        (key: string)
        (numel: int64)
        (view: (string * int64 * int64) option)
        (offset: int64)
        (size: int64 list)
        (stride: int64 list)
        =
        let viewPart =
            match view with
            | None -> [| byte 'N' |]
            | Some(k, o, n) -> tupleOf [ str k; int o; int n ]

        Array.concat
            [
                glob "torch._utils" "_rebuild_tensor_v2"
                tupleOf
                    [
                        tupleOf
                            [
                                str "storage"
                                glob "torch" storageClass
                                str key
                                str "cpu"
                                int numel
                                viewPart
                            ]
                        [| byte 'Q' |]
                        int offset
                        tupleOf (size |> List.map int)
                        tupleOf (stride |> List.map int)
                        [| 0x89uy |]
                        orderedDict
                    ]
                [| byte 'R' |]
            ]

    /// The object pickle of an OrderedDict of named (already pickled) values.
    let stateDictPickle (items: (string * byte array) list) =
        pickle (
            Array.concat
                [
                    orderedDict
                    [| byte '(' |]
                    items |> List.map (fun (k, v) -> Array.append (str k) v) |> Array.concat
                    [| byte 'u' |]
                ]
        )

    /// The storage-keys pickle and each storage as its element count and raw bytes.
    let storages (items: (string * int64 * byte array) list) =
        Array.concat
            [
                pickle (
                    Array.concat
                        [
                            [| byte ']'; byte '(' |]
                            items |> List.map (fun (k, _, _) -> str k) |> Array.concat
                            [| byte 'e' |]
                        ]
                )
                for _, numel, bytes in items do
                    BitConverter.GetBytes numel
                    bytes
            ]

    /// A whole legacy file of a state dict: one storage per tensor (float32 or int64, any shape), in order.
    let write (path: string) (tensors: (string * torch.Tensor) list) =
        let entries =
            tensors
            |> List.mapi (fun i (name, t) ->
                use c = t.detach().cpu().contiguous ()

                let storageClass =
                    if c.dtype = torch.int64 then "LongStorage"
                    elif c.dtype = torch.float32 then "FloatStorage"
                    else failwithf "%s: %O is not written" name c.dtype

                let key = string (1000 + i)
                let shape = List.ofArray c.shape
                let strides = List.ofArray (c.stride ())

                name,
                tensorRef storageClass key (c.numel ()) None 0L shape strides,
                (key, c.numel (), c.bytes.ToArray()))

        use f = File.Create path
        f.Write(header, 0, header.Length)
        let obj = stateDictPickle (entries |> List.map (fun (n, r, _) -> n, r))
        f.Write(obj, 0, obj.Length)
        let data = storages (entries |> List.map (fun (_, _, s) -> s))
        f.Write(data, 0, data.Length)

/// The himar executable built beside this test binary (same configuration: bin/Release/net10.0 here).
let himarDll =
    let dir = Path.TrimEndingDirectorySeparator AppContext.BaseDirectory
    let framework = Path.GetFileName dir |> nonNull
    let configuration = Path.GetFileName(Path.GetDirectoryName dir) |> nonNull
    Path.Combine(repoRoot, "src", "HiMar.Cli", "bin", configuration, framework, "himar.dll")

/// How a himar process ended: its exit code and what it wrote.
type HimarRun = { Code: int; Out: string; Err: string }

/// Starts himar as a child process with stdout and stderr redirected (not a terminal), one OpenMP thread, and
/// the environment changes `env` (a variable to a value, or None to remove it).
let startHimarWith (env: (string * string option) list) (args: string list) =
    let psi = ProcessStartInfo("dotnet", himarDll :: args)
    psi.RedirectStandardOutput <- true
    psi.RedirectStandardError <- true
    psi.Environment.["OMP_NUM_THREADS"] <- "1"

    for name, value in env do
        match value with
        | Some v -> psi.Environment.[name] <- v
        | None -> psi.Environment.Remove name |> ignore

    Process.Start psi |> nonNull

/// Starts himar as a child process with stdout and stderr redirected (not a terminal), one OpenMP thread.
let startHimar (args: string list) = startHimarWith [] args

/// Runs himar to the end with the environment changes `env` (2 minutes at most; the test fails after that).
let himarWith (env: (string * string option) list) (args: string list) =
    use p = startHimarWith env args
    let out = p.StandardOutput.ReadToEndAsync()
    let err = p.StandardError.ReadToEndAsync()

    if not (p.WaitForExit(TimeSpan.FromMinutes 2.0)) then
        p.Kill true
        failtestf "himar %s did not finish in 2 minutes" (String.Join(" ", args))

    {
        Code = p.ExitCode
        Out = out.Result
        Err = err.Result
    }

/// Runs himar to the end (2 minutes at most; the test fails after that).
let himar (args: string list) = himarWith [] args
