/// Tests of src/HiMar.Runtime/Parity: every case of the shared tiny fixture, through the runner that
/// `himar verify-parity` uses.
module HiMar.Tests.ParityTests

open Expecto
open HiMar.Runtime.Parity
open HiMar.Tests.TestUtil

let private fixture = lazy (ParityFixture.Open tinyFixture)

let tests =
    testList
        "Parity"
        [
            for c in (ParityFixture.Open tinyFixture).Cases do
                if c.Kind <> "sample_tokens" then
                    test (sprintf "case %s (%s) matches the reference within its tolerance" c.Name c.Kind) {
                        let r = ParityRunner.Run(fixture.Force(), c)

                        Expect.equal
                            r.Status
                            ParityStatus.Pass
                            (sprintf "%s: error %g, allowed %g (%s)" c.Name r.WorstError r.Allowed r.Detail)
                    }

            test "a folder without a manifest is refused with a message naming the file" {
                let e =
                    catchT<System.IO.FileNotFoundException> (fun () -> ParityFixture.Open "/nonexistent/dir" |> ignore)

                Expect.stringContains e.Message "/nonexistent/dir/manifest.json: no such file" "message"
            }
        ]
