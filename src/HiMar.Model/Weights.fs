namespace HiMar.Model

open System
open System.Collections.Generic
open TorchSharp

/// A state_dict did not fit a model: every missing, unexpected and shape-mismatched key, in one message.
type WeightMismatchException
    (missing: string list, unexpected: string list, mismatched: (string * int64[] * int64[]) list) =
    inherit
        Exception(
            let shape (s: int64[]) = "[" + String.Join(", ", s) + "]"

            let lines =
                [
                    if not missing.IsEmpty then
                        sprintf "%d missing: %s" missing.Length (String.Join(", ", missing))
                    if not unexpected.IsEmpty then
                        sprintf "%d unexpected: %s" unexpected.Length (String.Join(", ", unexpected))
                    if not mismatched.IsEmpty then
                        sprintf
                            "%d with other shapes: %s"
                            mismatched.Length
                            (String.Join(
                                ", ",
                                mismatched
                                |> List.map (fun (k, m, f) -> sprintf "%s (model %s, file %s)" k (shape m) (shape f))
                            ))
                ]

            "the weights do not fit the model: " + String.Join("; ", lines)
        )

    /// Keys the model has and the weights lack.
    member _.Missing = missing
    /// Keys the weights have and the model lacks.
    member _.Unexpected = unexpected
    /// Keys present in both with different shapes: (key, model shape, file shape).
    member _.Mismatched = mismatched

/// Loading and saving weights by reference state_dict names, and parameter counts. No IO: callers read and
/// write the files (safetensors in HiMar.Runtime).
module Weights =
    /// The model's state_dict (parameters and persistent buffers) by reference key.
    [<CompiledName("StateDict")>]
    let stateDict (model: torch.nn.Module) : IReadOnlyDictionary<string, torch.Tensor> =
        let d = Dictionary<string, torch.Tensor>()

        for KeyValue(k, v) in model.state_dict () do
            d.[k] <- v

        d

    /// How `weights` differ from a model's state_dict `own`: keys the model has and the weights lack, keys the
    /// weights have and the model lacks (sorted), and keys whose shapes differ (key, model shape, file shape).
    let private differences
        (own: IReadOnlyDictionary<string, torch.Tensor>)
        (weights: IReadOnlyDictionary<string, torch.Tensor>)
        =
        let missing = own.Keys |> Seq.filter (weights.ContainsKey >> not) |> List.ofSeq

        let unexpected =
            weights.Keys |> Seq.filter (own.ContainsKey >> not) |> Seq.sort |> List.ofSeq

        let mismatched =
            [
                for KeyValue(k, t) in own do
                    match weights.TryGetValue k with
                    | true, w when w.shape <> t.shape -> yield k, t.shape, w.shape
                    | _ -> ()
            ]

        missing, unexpected, mismatched

    /// Raises one WeightMismatchException listing every missing, unexpected and shape-mismatched key when
    /// `weights` do not fit the state_dict `own` exactly (the check of strict loading and of import).
    [<CompiledName("RequireFit")>]
    let requireFit
        (own: IReadOnlyDictionary<string, torch.Tensor>)
        (weights: IReadOnlyDictionary<string, torch.Tensor>)
        =
        let missing, unexpected, mismatched = differences own weights

        if not (missing.IsEmpty && unexpected.IsEmpty && mismatched.IsEmpty) then
            raise (WeightMismatchException(missing, unexpected, mismatched))

    /// Copies `weights` into the model by key, casting to each parameter's dtype and device. Strict (the
    /// default everywhere) raises one WeightMismatchException listing every missing, unexpected and
    /// shape-mismatched key; non-strict loads the keys that fit and returns the ones it skipped.
    [<CompiledName("Load")>]
    let load (model: torch.nn.Module) (weights: IReadOnlyDictionary<string, torch.Tensor>) (strict: bool) =
        let own = stateDict model

        if strict then
            requireFit own weights

        let missing, unexpected, mismatched = differences own weights

        use _ = torch.no_grad ()
        let bad = mismatched |> List.map (fun (k, _, _) -> k) |> Set.ofList

        for KeyValue(k, t) in own do
            match weights.TryGetValue k with
            | true, w when not (bad.Contains k) ->
                use cast = w.``to`` (t.dtype, t.device)
                t.copy_ cast |> ignore
            | _ -> ()

        missing @ unexpected @ (Set.toList bad)

    /// The number of elements of every parameter (trainable and frozen), as `sum(p.numel())` in the reference.
    [<CompiledName("ParameterCount")>]
    let parameterCount (model: torch.nn.Module) =
        model.parameters () |> Seq.sumBy (fun p -> p.numel ())

    /// Parameter counts per direct child (and the module's own parameters under their names), in order.
    [<CompiledName("ParameterCounts")>]
    let parameterCounts (model: torch.nn.Module) =
        [|
            for struct (name, p) in model.named_parameters (false) -> name, p.numel ()
            for struct (name, child) in model.named_children () -> name, parameterCount child
        |]
