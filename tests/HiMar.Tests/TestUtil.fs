/// Helpers shared by the test lists: fixture location, exception capture, tensor comparison.
module HiMar.Tests.TestUtil

open System
open System.IO
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
