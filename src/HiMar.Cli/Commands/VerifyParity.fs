/// `himar verify-parity`: our implementation against a reference parity fixture, one line per case.
module HiMar.Cli.Commands.VerifyParity

open System
open Argu
open HiMar.Runtime.Native
open HiMar.Cli.Commands.Common


/// Arguments of `himar verify-parity`.
type VerifyParityArgs =
    | [<MainCommand; ExactlyOnce>] Dir of dir: string
    | Kind of kind: string
    | Bf16

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Dir _ -> "a parity fixture folder (manifest.json, weights and cases; see shared/fixtures/parity)."
            | Bf16 ->
                "run every case a second time with bf16 products and report its error against the same reference, allowed 2^-5 of the output's scale (failures count)."
            | Kind _ -> "run only the cases of this kind (e.g. mlp_head_forward)."


/// Runs `himar verify-parity`.
let run (args: ParseResults<VerifyParityArgs>) =
    TorchNative.EnsureLoaded()
    let dir = args.GetResult Dir
    let only = args.TryGetResult Kind
    use fixture = HiMar.Runtime.Parity.ParityFixture.Open dir
    let mutable failed = 0
    let mutable passed = 0
    let mutable pending = 0

    let runAll (precision: HiMar.Model.Precision) =
        fixture.Precision <- precision
        printfn "%-28s %-24s %12s %12s  %s" "case" "kind" "worst error" "allowed" "result"

        for c in fixture.Cases do
            if only.IsNone || only = Some c.Kind then
                let r = HiMar.Runtime.Parity.ParityRunner.Run(fixture, c)

                let status =
                    match r.Status with
                    | HiMar.Runtime.Parity.ParityStatus.Pass ->
                        passed <- passed + 1
                        "pass"
                    | HiMar.Runtime.Parity.ParityStatus.Pending ->
                        pending <- pending + 1
                        "pending"
                    | _ ->
                        failed <- failed + 1
                        "FAIL"

                let num (x: float) =
                    if Double.IsNaN x then "-" else x.ToString("0.000e+00")

                printfn
                    "%-28s %-24s %12s %12s  %-7s %s"
                    r.Name
                    r.Kind
                    (num r.WorstError)
                    (num r.Allowed)
                    status
                    r.Detail

    runAll HiMar.Model.Precision.Fp32

    if args.Contains Bf16 then
        printfn
            "\nbf16 products (allowed: atol + max(rtol, %.4f) x max |reference|; see ParityRunner.Bf16Rtol)"
            HiMar.Runtime.Parity.ParityRunner.Bf16Rtol

        runAll HiMar.Model.Precision.Bf16

    printfn "%d passed, %d failed, %d pending" passed failed pending
    if failed > 0 then 1 else 0
