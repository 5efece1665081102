/// The flags' checks, made after parsing and before any work: every numeric flag against its range, respacings,
/// `--device` against the devices that exist, `--out` against what is on disk. Each failure is one line naming the
/// flag (exit code 2; 3 for an absent device; 5 for an output folder that cannot be written).
module HiMar.Cli.Flags

open System
open System.Globalization
open System.IO
open Microsoft.FSharp.Reflection
open HiMar.Runtime

/// What a numeric flag accepts.
type private Range =
    /// Whole numbers from lo to hi.
    | Whole of lo: int64 * hi: int64
    /// Finite numbers above lo (or from lo, when closed) and below hi (or up to hi, when closed).
    | Real of lo: float * loClosed: bool * hi: float * hiClosed: bool

/// Ranges by flag (the Argu case name), the same in every command unless `command/Flag` overrides it.
let private ranges: Map<string, Range> =
    Map.ofList
        [
            "N", Whole(1L, 100000L)
            "sample/N", Whole(1L, int64 HiMar.Runtime.Sampling.SampleJob.MaxImages)
            "Per_Class", Whole(1L, int64 HiMar.Runtime.Sampling.SampleJob.MaxImages)
            "Batch", Whole(1L, 4096L)
            "Accumulation", Whole(1L, 1024L)
            "Steps", Whole(1L, 100_000_000L)
            "bench train/Steps", Whole(1L, 10000L)
            "Warmup", Whole(0L, 100_000_000L)
            "Checkpoint_Every", Whole(1L, 100_000_000L)
            "Keep", Whole(1L, 10000L)
            "Sample_Every", Whole(0L, 100_000_000L)
            "Log_Every", Whole(1L, 100_000_000L)
            "Num_Iter", Whole(1L, 4096L)
            "Phase1_Steps", Whole(1L, 4096L)
            "Images", Whole(1L, 4096L)
            "Repeat", Whole(1L, 10000L)
            "Size", Whole(8L, 8192L)
            "Cfg", Real(0.0, true, 1000.0, true)
            "Re_Cfg", Real(0.0, true, 1000.0, true)
            "Temperature", Real(0.0, false, 100.0, true)
            "Blr", Real(0.0, false, 10.0, true)
            "Weight_Decay", Real(0.0, true, 10.0, true)
            "Grad_Clip", Real(0.0, false, 1e6, true)
            "Ema", Real(0.0, true, 1.0, false)
            "Probe_Seconds", Real(0.0, false, 600.0, true)
        ]

/// `--checkpoint-every` for Checkpoint_Every, `-n` for N.
let private flagName (case: string) =
    if case.Length = 1 then
        "-" + case.ToLowerInvariant()
    else
        "--" + case.ToLowerInvariant().Replace('_', '-')

let private text (x: float) =
    x.ToString(CultureInfo.InvariantCulture)

let private bad (message: string) = raise (BadInputException message)

let private checkWhole (flag: string) (value: int64) (lo: int64) (hi: int64) =
    if value < lo || value > hi then
        bad (sprintf "%s: %d is out of range; give a whole number from %d to %d." flag value lo hi)

let private checkReal (flag: string) (value: float) (lo, loClosed, hi, hiClosed) =
    if not (Double.IsFinite value) then
        bad (sprintf "%s: %s is not a finite number." flag (text value))

    let above = if loClosed then value >= lo else value > lo
    let below = if hiClosed then value <= hi else value < hi

    if not (above && below) then
        bad (
            sprintf
                "%s: %s is out of range; give a number %s %s and %s %s."
                flag
                (text value)
                (if loClosed then ">=" else ">")
                (text lo)
                (if hiClosed then "<=" else "<")
                (text hi)
        )

/// `cpu`, `cuda` or `cuda:N`, and the CUDA device must exist (exit code 3 when it does not).
let private checkDevice (flag: string) (name: string) =
    let d = name.Trim().ToLowerInvariant()

    let index =
        if d = "cpu" then
            None
        elif d = "cuda" then
            Some 0
        elif d.StartsWith "cuda:" then
            match Int32.TryParse(d.Substring 5, NumberStyles.None, CultureInfo.InvariantCulture) with
            | true, i -> Some i
            | _ -> bad (sprintf "%s: '%s' is not a device; give cpu, cuda or cuda:N." flag name)
        else
            bad (sprintf "%s: '%s' is not a device; give cpu, cuda or cuda:N." flag name)

    match index with
    | None -> ()
    | Some i ->
        Native.TorchNative.EnsureLoaded()

        if not (TorchSharp.torch.cuda.is_available ()) then
            raise (
                EnvironmentException(
                    sprintf
                        "%s %s: no CUDA device is available here (`himar info` lists the devices); use --device cpu."
                        flag
                        name
                )
            )

        let count = TorchSharp.torch.cuda.device_count ()

        if i >= count then
            raise (
                EnvironmentException(
                    sprintf
                        "%s %s: there %s %d CUDA device%s (cuda:0..cuda:%d)."
                        flag
                        name
                        (if count = 1 then "is" else "are")
                        count
                        (if count = 1 then "" else "s")
                        (count - 1)
                )
            )

/// A respacing ("100", "ddim25", "10,20,30") of the 1000-step training diffusion.
let private checkRespacing (flag: string) (spec: string) =
    let ok =
        try
            (HiMar.Model.Schedule.spaceTimesteps 1000 spec).Length > 0
        with
        | :? ArgumentException
        | :? FormatException
        | :? OverflowException -> false

    if not ok then
        bad (
            sprintf
                "%s: '%s' is not a respacing of the 1000 diffusion steps; give N (e.g. 100), ddimN (e.g. ddim25) or N1,N2,... ."
                flag
                spec
        )

/// The nearest folder on the path that exists (the path itself when it does); a file on the way is named.
let rec private existingFolder (flag: string) (path: string) (full: string) =
    if Directory.Exists full then
        full
    elif File.Exists full then
        bad (sprintf "%s %s: '%s' is a file, not a folder." flag path full)
    else
        match Path.GetDirectoryName full with
        | null -> full
        | parent -> existingFolder flag path parent

/// An output path: a file where a folder is wanted (or the reverse) is bad input; a folder where nothing can be
/// written is a storage failure. Nothing is created: a probe file is made and deleted in the nearest existing folder.
let private checkOut (flag: string) (path: string) (wantsFile: bool) =
    if String.IsNullOrWhiteSpace path then
        bad (sprintf "%s: the path is empty." flag)

    let full =
        try
            Path.GetFullPath path
        with :? ArgumentException as e ->
            bad (sprintf "%s %s: not a usable path (%s)." flag path e.Message)

    if wantsFile && Directory.Exists full then
        bad (sprintf "%s %s: is a folder; give a file name." flag path)

    if not wantsFile && File.Exists full then
        bad (sprintf "%s %s: is a file; give a folder (created when missing)." flag path)

    let folder =
        if wantsFile then
            match Path.GetDirectoryName full with
            | null -> full
            | d -> d
        else
            full

    let existing = existingFolder flag path folder

    try
        use _ =
            new FileStream(
                Path.Combine(existing, sprintf ".himar-write-test-%s" (Guid.NewGuid().ToString "N")),
                FileMode.CreateNew,
                FileAccess.Write,
                FileShare.None,
                1,
                FileOptions.DeleteOnClose
            )

        ()
    with
    | :? UnauthorizedAccessException
    | :? IOException as e ->
        raise (
            StorageException(sprintf "%s %s: cannot write in %s (%s)." flag path existing (e.Message.Split('\n').[0]))
        )

/// Whether an --out path names a file: flags declared `Out of dir` want a folder (sample's also takes a .png grid
/// path), the others (`Out of file`, `Out of npz`) a file.
let private outIsFile (field: string) (path: string) =
    field <> "dir" || path.EndsWith(".png", StringComparison.OrdinalIgnoreCase)

let private check (command: string) (case: string) (field: string) (value: obj) =
    let flag = flagName case

    let range =
        match ranges.TryFind(command + "/" + case) with
        | Some r -> Some r
        | None -> ranges.TryFind case

    match range, value with
    | Some(Whole(lo, hi)), (:? int as v) -> checkWhole flag (int64 v) lo hi
    | Some(Whole(lo, hi)), (:? int64 as v) -> checkWhole flag v lo hi
    | Some(Real(lo, lc, hi, hc)), (:? float as v) -> checkReal flag v (lo, lc, hi, hc)
    | _, (:? string as s) when case = "Device" -> checkDevice flag s
    | _, (:? string as s) when case = "Mlp_Steps" || case = "Dit_Steps" -> checkRespacing flag s
    | _, (:? string as s) when case = "Out" -> checkOut flag s (outIsFile field s)
    | _ -> ()

/// `Verify_Parity` -> `verify-parity`.
let private commandName (case: string) =
    case.ToLowerInvariant().Replace('_', '-')

/// Checks every flag of the parsed command line (subcommands included) before any work starts.
let rec private checkAll (command: string) (results: obj) =
    let all =
        match results.GetType().GetMethod("GetAllResults") with
        | null -> Seq.empty
        | m ->
            match m.Invoke(results, [| null |]) with
            | :? Collections.IEnumerable as e -> Seq.cast<obj> e
            | _ -> Seq.empty

    for r in all do
        let info, fields = FSharpValue.GetUnionFields(r, r.GetType())

        let names = info.GetFields() |> Array.map _.Name

        for j, f in Array.indexed fields do
            match f with
            | null -> ()
            | f when f.GetType().Name = "ParseResults`1" ->
                let sub = commandName info.Name
                checkAll (if command = "" then sub else command + " " + sub) f
            | f -> check command info.Name names.[j] f

/// Checks every flag of a parsed command line: ranges, respacings, --device and --out (see the module summary).
let checkCommandLine (results: Argu.ParseResults<'T>) = checkAll "" (results :> obj)
