/// Tests of src/HiMar.Runtime/Native: the ELF version-need patch, the load check and libtorch itself.
module HiMar.Tests.NativeTests

open System
open System.IO
open System.Text
open Expecto
open TorchSharp
open HiMar.Runtime.Native
open HiMar.Tests.TestUtil

/// A minimal 64-bit little-endian ELF image with a string table and a `.gnu.version_r` section:
/// libc.so.6 needs GLIBC_2.34; libstdc++.so.6 needs GLIBCXX_3.4.30 and GLIBCXX_3.4.32.
let syntheticElf () =
    let strtab =
        "\000libc.so.6\000GLIBC_2.34\000libstdc++.so.6\000GLIBCXX_3.4.30\000GLIBCXX_3.4.32\000"

    let str (s: string) =
        int (strtab.IndexOf("\000" + s + "\000")) + 1

    let buf = Array.zeroCreate<byte> 1024

    let w16 (o: int) (v: int) =
        BitConverter.TryWriteBytes(Span(buf, o, 2), uint16 v) |> ignore

    let w32 (o: int) (v: int) =
        BitConverter.TryWriteBytes(Span(buf, o, 4), uint32 v) |> ignore

    let w64 (o: int) (v: int64) =
        BitConverter.TryWriteBytes(Span(buf, o, 8), v) |> ignore

    buf[0] <- 0x7fuy
    Encoding.ASCII.GetBytes("ELF").CopyTo(buf, 1)
    buf[4] <- 2uy // 64-bit
    buf[5] <- 1uy // little-endian
    buf[6] <- 1uy
    let strOff, needOff, shOff = 64, 256, 512
    Encoding.ASCII.GetBytes(strtab).CopyTo(buf, strOff)
    // Verneed libc (1 aux) -> Vernaux GLIBC_2.34
    w16 needOff 1
    w16 (needOff + 2) 1
    w32 (needOff + 4) (str "libc.so.6")
    w32 (needOff + 8) 16
    w32 (needOff + 12) 32
    w32 (needOff + 16 + 8) (str "GLIBC_2.34")
    // Verneed libstdc++ (2 aux)
    let n2 = needOff + 32
    w16 n2 1
    w16 (n2 + 2) 2
    w32 (n2 + 4) (str "libstdc++.so.6")
    w32 (n2 + 8) 16
    w32 (n2 + 16 + 8) (str "GLIBCXX_3.4.30")
    w32 (n2 + 16 + 12) 16
    w32 (n2 + 32 + 8) (str "GLIBCXX_3.4.32")
    // Section headers: null, .dynstr (STRTAB), .gnu.version_r (SHT_GNU_verneed, link 1, info 2)
    w64 0x28 (int64 shOff)
    w16 0x3A 64
    w16 0x3C 3

    let sh i (typ: int) (off: int) (size: int) (link: int) (info: int) =
        let h = shOff + 64 * i
        w32 (h + 4) typ
        w64 (h + 0x18) (int64 off)
        w64 (h + 0x20) (int64 size)
        w32 (h + 0x28) link
        w32 (h + 0x2C) info

    sh 1 3 strOff strtab.Length 0 0
    sh 2 0x6ffffffe needOff 80 1 2
    buf

/// Runs f, expecting an exception of type 'E, and returns it.
let catchT<'E when 'E :> exn> (f: unit -> unit) : 'E =
    try
        f ()
        failtestf "expected %s, got no exception" typeof<'E>.Name
    with :? 'E as e ->
        e

let private needsOf (image: byte[]) =
    ElfVersions.ReadNeeds(image, "synthetic")
    |> Seq.map (fun n -> n.Library, n.Version, n.IsWeak)
    |> List.ofSeq

let tests =
    testList
        "Native"
        [
            test "the version needs of a synthetic ELF image are read in table order" {
                Expect.equal
                    (needsOf (syntheticElf ()))
                    [
                        "libc.so.6", "GLIBC_2.34", false
                        "libstdc++.so.6", "GLIBCXX_3.4.30", false
                        "libstdc++.so.6", "GLIBCXX_3.4.32", false
                    ]
                    "needs"
            }

            test "weakening a need sets only VER_FLG_WEAK on that entry and changes no other byte" {
                let image = syntheticElf ()
                let before = Array.copy image
                let outcome = ElfVersions.WeakenNeed(image, "GLIBCXX_3.4.32", "synthetic")
                Expect.equal outcome WeakenOutcome.Patched "outcome"

                let changed =
                    [
                        for i in 0 .. image.Length - 1 do
                            if image[i] <> before[i] then
                                i
                    ]

                Expect.equal changed [ 256 + 32 + 32 + 4 ] "only the vna_flags byte of the third entry changes"
                Expect.equal image[256 + 32 + 32 + 4] 2uy "VER_FLG_WEAK is 0x2"
                Expect.equal (needsOf image |> List.map (fun (_, _, w) -> w)) [ false; false; true ] "weak flags"
            }

            test "weakening is idempotent and ignores versions the file does not need" {
                let image = syntheticElf ()
                ElfVersions.WeakenNeed(image, "GLIBCXX_3.4.32", "synthetic") |> ignore
                let once = Array.copy image

                Expect.equal
                    (ElfVersions.WeakenNeed(image, "GLIBCXX_3.4.32", "synthetic"))
                    WeakenOutcome.AlreadyWeak
                    "again"

                Expect.equal
                    (ElfVersions.WeakenNeed(image, "GLIBCXX_9.9", "synthetic"))
                    WeakenOutcome.NotNeeded
                    "absent"

                Expect.equal image once "unchanged"
            }

            test "a file that is not ELF is refused with a message naming it" {
                let e =
                    catchT<InvalidDataException> (fun () ->
                        ElfVersions.ReadNeeds(Encoding.ASCII.GetBytes(String('x', 100)), "notes.txt")
                        |> ignore)

                Expect.equal e.Message "notes.txt is not an ELF file." "message"
            }

            test "a version record pointing outside its section is refused, not read past" {
                let image = syntheticElf ()
                BitConverter.TryWriteBytes(Span(image, 256 + 8, 4), 4000u) |> ignore
                let e = catchT<InvalidDataException> (fun () -> needsOf image |> ignore)
                Expect.stringContains e.Message "runs outside its section" "message"
            }

            test "weakening a file replaces it through a temporary file and leaves no temporary behind" {
                let dir = Directory.CreateTempSubdirectory("himar-elf-")

                try
                    let path = Path.Combine(dir.FullName, "lib.so")
                    File.WriteAllBytes(path, syntheticElf ())
                    Expect.equal (ElfVersions.WeakenNeed(path, "GLIBCXX_3.4.32")) WeakenOutcome.Patched "patched"
                    Expect.equal (Directory.GetFiles dir.FullName |> Array.map Path.GetFileName) [| "lib.so" |] "files"
                    Expect.isTrue (ElfVersions.ReadNeeds(path) |> Seq.last).IsWeak "weak on disk"
                finally
                    dir.Delete true
            }

            test "the system libstdc++ defines its GLIBCXX versions, read from .gnu.version_d" {
                let lib =
                    match ElfVersions.FindSystemLibStdCxx() with
                    | null -> failtest "no libstdc++.so.6 on this Linux machine"
                    | l -> l

                let defs = ElfVersions.ReadDefinitions(lib)
                Expect.contains defs "GLIBCXX_3.4" "the base version"
                Expect.contains defs "GLIBCXX_3.4.30" "GCC 12 or newer (Debian 12)"
            }

            test "the glue library this process loads has no libstdc++ need that the system lacks" {
                let glue = TorchNative.InspectGlueLibrary()
                Expect.isNotNull glue.Path "libLibTorchSharp.so beside the tests"
                Expect.isEmpty glue.MissingNeeds "unmet needs"

                let system =
                    match glue.SystemLibStdCxx with
                    | null -> failtest "no system libstdc++ found"
                    | l -> l

                let defs = ElfVersions.ReadDefinitions(system) |> Set.ofSeq

                if not (defs.Contains "GLIBCXX_3.4.32") then
                    Expect.equal (List.ofSeq glue.WeakenedNeeds) [ "GLIBCXX_3.4.32" ] "the build's patch"
            }

            test "libtorch loads and multiplies two known matrices" {
                TorchNative.EnsureLoaded()
                use a = torch.tensor([| 1.0f; 2.0f; 3.0f; 4.0f |]).reshape (2L, 2L)
                use b = torch.tensor([| 5.0f; 6.0f; 7.0f; 8.0f |]).reshape (2L, 2L)
                use c = torch.matmul (a, b)

                Expect.sequenceEqual
                    (c.data<float32>().ToArray())
                    [| 19.0f; 22.0f; 43.0f; 50.0f |]
                    "[[1,2],[3,4]] x [[5,6],[7,8]]"
            }

            test "one SGD step on a least-squares loss gives the hand-computed gradient and weights" {
                TorchNative.EnsureLoaded()
                // loss = sum((w * x - y)^2), w = [1, 2], x = [3, 4], y = [2, 10]
                // residual r = [1, -2]; dloss/dw = 2 r x = [6, -16]; w - 0.1 grad = [0.4, 3.6]
                use w = torch.tensor ([| 1.0; 2.0 |], requires_grad = true)
                use x = torch.tensor ([| 3.0; 4.0 |])
                use y = torch.tensor ([| 2.0; 10.0 |])
                use loss = (w * x - y).square().sum ()
                loss.backward ()
                Expect.floatClose Accuracy.high (loss.item<float> ()) 5.0 "loss"

                let grad =
                    match w.grad with
                    | null -> failtest "no gradient after backward"
                    | g -> g

                Expect.sequenceEqual (grad.data<float>().ToArray()) [| 6.0; -16.0 |] "gradient"
                use _ = torch.no_grad ()
                use updated = w - grad * 0.1
                let u = updated.data<float>().ToArray()
                Expect.floatClose Accuracy.high u[0] 0.4 "w0"
                Expect.floatClose Accuracy.high u[1] 3.6 "w1"
            }

            test "himar sets OpenMP's wait policy to PASSIVE when the variable is unset, and says so" {
                let r = himarWith [ "OMP_WAIT_POLICY", None ] [ "info"; "--no-probe" ]
                Expect.equal r.Code 0 r.Err
                Expect.stringContains r.Out "PASSIVE (set by himar: OMP_WAIT_POLICY was unset)" "info's wait row"
            }

            test "a wait policy the user set is kept and reported as theirs" {
                let r = himarWith [ "OMP_WAIT_POLICY", Some "ACTIVE" ] [ "info"; "--no-probe" ]
                Expect.equal r.Code 0 r.Err
                Expect.stringContains r.Out "ACTIVE (OMP_WAIT_POLICY from the environment)" "info's wait row"
            }

            test "himar quiets libtorch's warnings to ERROR when TORCH_CPP_LOG_LEVEL is unset, and says so" {
                // On CPUs where NNPACK cannot start, libtorch warns on every convolution; the level is what stops it.
                let r = himarWith [ "TORCH_CPP_LOG_LEVEL", None ] [ "info"; "--no-probe" ]
                Expect.equal r.Code 0 r.Err

                Expect.stringContains
                    r.Out
                    "ERROR and up (set by himar: TORCH_CPP_LOG_LEVEL was unset)"
                    "info's log row"
            }

            test "a libtorch log level the user set is applied and reported as theirs" {
                let r = himarWith [ "TORCH_CPP_LOG_LEVEL", Some "info" ] [ "info"; "--no-probe" ]
                Expect.equal r.Code 0 r.Err
                Expect.stringContains r.Out "INFO and up (TORCH_CPP_LOG_LEVEL from the environment)" "info's log row"
                let n = himarWith [ "TORCH_CPP_LOG_LEVEL", Some "1" ] [ "info"; "--no-probe" ]
                Expect.stringContains n.Out "WARNING and up (TORCH_CPP_LOG_LEVEL from the environment)" "numeric level"
                let bad = himarWith [ "TORCH_CPP_LOG_LEVEL", Some "loud" ] [ "info"; "--no-probe" ]
                Expect.equal bad.Code 0 bad.Err

                Expect.stringContains
                    bad.Out
                    "ERROR and up (set by himar: TORCH_CPP_LOG_LEVEL 'LOUD' is not"
                    "a value that is no level"
            }

            test "the loaded libc10 exposes the log level himar sets (in this process too)" {
                TorchNative.EnsureLoaded()
                let l = TorchNative.LogLevel()
                Expect.notEqual l.Value "unknown" "FLAGS_caffe2_log_level found in libc10"

                if isNull (Environment.GetEnvironmentVariable "TORCH_CPP_LOG_LEVEL") then
                    Expect.equal l.Value "ERROR" "level in the test process"
                    Expect.isTrue l.SetByHimar "set by himar"
            }

            test "the matmul probe reports a positive GFLOP/s figure" {
                let g = TorchNative.MatmulGflops(0.2, 256L)
                Expect.isGreaterThan g 0.1 "GFLOP/s"
            }

            // Sequenced: the switch is process-wide, and other tests' trainers open scopes of their own.
            testSequenced
            <| test "OneDnn.Off switches libtorch's oneDNN off for its scope, nests, and restores the switch" {
                Expect.isTrue OneDnn.Available "libtorch exports the switch"
                Expect.isTrue OneDnn.Enabled "on by default"

                do
                    use outer = OneDnn.Off()
                    Expect.isFalse OneDnn.Enabled "off in the scope"

                    do
                        use inner = OneDnn.Off()
                        Expect.isFalse OneDnn.Enabled "off in a nested scope"

                    Expect.isFalse OneDnn.Enabled "still off after the nested scope"
                    outer.Dispose()
                    outer.Dispose()

                Expect.isTrue OneDnn.Enabled "back on after the last scope"
            }

            test
                "a one-output-channel convolution's backward pass in OneDnn.Off gives finite input gradients, 2 threads" {
                // Outside the scope, libtorch 2.10's oneDNN backward gave NaN in 3 to 8 of 100 such passes on a
                // 2-core AVX-512 machine (84 of 100 in bf16); ATen's own kernels give none.
                let bad =
                    [
                        for dtype in [ torch.ScalarType.Float32; torch.ScalarType.BFloat16 ] do
                            for i in 1..40 do
                                use _scope = torch.NewDisposeScope()
                                let x = torch.randn(8L, 32L, 32L, 32L).``to``(dtype).requires_grad_ true
                                let w = torch.randn(1L, 32L, 3L, 3L).``to``(dtype).requires_grad_ true
                                let y = torch.nn.functional.conv2d (x, w, padding = [| 1L; 1L |])

                                do
                                    use _ = OneDnn.Off()
                                    y.float().abs().mean().backward ()

                                if not ((nonNull x.grad).isfinite().all().item<bool> ()) then
                                    yield dtype, i
                    ]

                Expect.isEmpty bad "passes with a non-finite input gradient"
            }

            test "inside a GcPause no collection runs, even while another thread allocates 10 MB" {
                let allocate () =
                    let t =
                        Threading.Thread(fun () ->
                            for _ in 1..100_000 do
                                GC.KeepAlive(Array.zeroCreate<byte> 100))

                    t.Start()
                    t.Join()

                let paused (budget: int64) =
                    use _pause = GcPause.Begin budget
                    Expect.isTrue GcPause.Holding "holding"
                    let before = GC.CollectionCount 0
                    allocate ()
                    before, GC.CollectionCount 0

                let before, after = paused GcPause.DefaultBudget
                Expect.equal after before "collections inside the pause"
                Expect.isFalse GcPause.Holding "released"
                // A pause whose budget (1 MB) the same allocations outgrow does collect: the test tells the two apart.
                let before, after = paused (1L <<< 20)
                Expect.isGreaterThan after before "collections past a 1 MB budget"
            }

            test "GcPause nests, and a stretch that outgrows its budget ends without an error and counts a lapse" {
                do
                    use _outer = GcPause.Begin()

                    do
                        use _inner = GcPause.Begin()
                        Expect.isTrue GcPause.Holding "inner"

                    Expect.isTrue GcPause.Holding "still held after the inner pause"

                Expect.isFalse GcPause.Holding "released after the outer pause"
                let lapses = GcPause.Lapses

                do
                    use _small = GcPause.Begin(1L <<< 20)

                    for _ in 1..200 do
                        GC.KeepAlive(Array.zeroCreate<byte> 100_000)

                Expect.equal GcPause.Lapses (lapses + 1L) "lapses"
                Expect.isFalse GcPause.Holding "released after the lapse"
            }
        ]
