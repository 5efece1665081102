/// Tests of src/HiMar.Model/Masking.fs: the sampler's schedules, masks from orders, training ratios.
module HiMar.Tests.MaskingTests

open Expecto
open TorchSharp
open HiMar.Model

/// Clamped mask lengths of a whole run, each with the count predicted at that step.
let private run n steps =
    let mutable remaining = n

    [
        for step in 0 .. steps - 1 ->
            let len = Masking.nextMaskLength n step steps remaining
            let next = if step = steps - 1 then 0 else int len
            let predicted = remaining - next
            remaining <- next
            int len, predicted
    ]

let tests =
    testList
        "Masking"
        [
            test "phase 1 with 64 pivots and 32 steps predicts the reference's counts" {
                let r = run 64 32
                Expect.equal (r |> List.take 3) [ 63, 1; 62, 1; 61, 1 ] "start"
                Expect.equal (r |> List.skip 12 |> List.take 5) [ 51, 1; 49, 2; 47, 2; 45, 2; 42, 3 ] "middle"
                Expect.equal (List.last r) (1, 3) "last step"
                Expect.equal (r |> List.sumBy snd) 64 "every pivot once"
            }

            test "phase 2 with 256 tokens and 4 steps predicts 20, 55, 84 and 97 tokens" {
                Expect.equal (run 256 4) [ 236, 20; 181, 55; 97, 84; 1, 97 ] "lengths"
            }

            test "the linear guidance schedule grows from 1 to the full scale" {
                Expect.floatClose Accuracy.high (Masking.linearCfg 3.0 64 64.0f) 1.0 "nothing known"
                Expect.floatClose Accuracy.high (Masking.linearCfg 3.0 64 0.0f) 3.0 "everything known"
                Expect.floatClose Accuracy.high (Masking.linearCfg 3.0 64 32.0f) 2.0 "half"
            }

            testProperty "a mask from an order marks exactly the order's first k positions"
            <| fun (seed: int) (k0: byte) ->
                torch.manual_seed (int64 seed) |> ignore
                let k = int64 (k0 % 21uy)
                use orders = Masking.randomOrders 3L 8L 12L torch.CPU
                use m = Masking.maskByOrder k orders 20L torch.float32
                use counts = m.sum (1L)

                let firstMarked =
                    [
                        for b in 0L .. 2L do
                            for j in 0L .. k - 1L do
                                yield m.[b, orders.[b, j].item<int64> ()].item<float32> ()
                    ]

                counts.data<float32>().ToArray() = Array.create 3 (float32 k)
                && List.forall ((=) 1.0f) firstMarked

            testProperty "random orders put a permutation of the pivots before a permutation of the dense tokens"
            <| fun (seed: int) ->
                torch.manual_seed (int64 seed) |> ignore
                use o = Masking.randomOrders 2L 5L 7L torch.CPU
                let rows = [ for b in 0L .. 1L -> o.[b].data<int64>().ToArray() ]

                rows
                |> List.forall (fun r -> Array.sort r.[..4] = [| 0L .. 4L |] && Array.sort r.[5..] = [| 5L .. 11L |])

            test "training mask ratios stay in their ranges" {
                torch.manual_seed 5L |> ignore

                for _ in 1..200 do
                    let r = Masking.truncatedNormalRate 0.7
                    Expect.isTrue (r >= 0.7 && r <= 1.0) "truncated normal in [0.7, 1]"
                    let c = Masking.cosineRate ()
                    Expect.isTrue (c > 0.0 && c <= 1.0) "cosine rate in (0, 1]"
            }
        ]
