/// Tests of src/HiMar.Runtime/Parity: every case of the shared tiny fixture and of the project's generic
/// fixture, through the runner that `himar verify-parity` uses.
module HiMar.Tests.ParityTests

open Expecto
open HiMar.Runtime.Parity
open HiMar.Tests.TestUtil

let private tiny = lazy (ParityFixture.Open tinyFixture)
let private generic = lazy (ParityFixture.Open genericFixture)

let private cases (label: string) (dir: string) (fixture: Lazy<ParityFixture>) =
    [
        for c in (ParityFixture.Open dir).Cases ->
            test (sprintf "%s case %s (%s) matches the reference within its tolerance" label c.Name c.Kind) {
                let r = ParityRunner.Run(fixture.Force(), c)

                Expect.equal
                    r.Status
                    ParityStatus.Pass
                    (sprintf "%s: error %g, allowed %g (%s)" c.Name r.WorstError r.Allowed r.Detail)
            }
    ]

let tests =
    testList
        "Parity"
        [
            yield! cases "tiny" tinyFixture tiny
            yield! cases "generic" genericFixture generic

            test "a folder without a manifest is refused with a message naming the file" {
                let e =
                    catchT<System.IO.FileNotFoundException> (fun () -> ParityFixture.Open "/nonexistent/dir" |> ignore)

                Expect.stringContains e.Message "/nonexistent/dir/manifest.json: no such file" "message"
            }

            test "a case whose computation fails is reported as a failure with the reason" {
                use f = ParityFixture.Open tinyFixture
                let c = f.Cases |> Seq.find (fun c -> c.Kind = "parameter")

                let bogus =
                    ParityCase("no_such_parameter", c.Kind, c.Inputs, c.Outputs, c.Atol, c.Rtol, c.Spec)

                let r = ParityRunner.Run(f, bogus)
                Expect.equal r.Status ParityStatus.Fail "status"
                Expect.stringContains r.Detail "no_such_parameter" "detail"
            }
        ]
