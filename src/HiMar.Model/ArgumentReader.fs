namespace HiMar.Model

open System.Collections.Generic

/// Reads boxed reference arguments (int, float, string, bool or string[] by name) with exact types: whole numbers
/// must be integral (128.5 is not 128), text is not a number, null is absent. A wrong value raises an
/// ArgumentException naming the field.
type internal ArgumentReader(args: IReadOnlyDictionary<string, obj>) =
    let get name =
        match args.TryGetValue name with
        | true, v when not (obj.ReferenceEquals(v, null)) -> Some v
        | _ -> None

    let fail (message: string) =
        raise (System.ArgumentException message)

    let invariant = System.Globalization.CultureInfo.InvariantCulture

    /// How a wrong value reads in a message: text quoted (at most 40 characters), numbers invariant.
    let shown (v: obj) =
        match v with
        | :? string as t when t.Length > 40 -> sprintf "the text \"%s...\"" (t.Substring(0, 40))
        | :? string as t -> sprintf "the text \"%s\"" t
        | :? bool as b -> if b then "true" else "false"
        | :? System.IConvertible as n -> n.ToString invariant
        | v -> v.GetType().Name

    /// A boxed number as a double, or None for text, booleans and other objects.
    let number (v: obj) =
        match v with
        | :? string
        | :? bool
        | :? char -> None
        | :? System.IConvertible as n ->
            match n.GetTypeCode() with
            | System.TypeCode.SByte
            | System.TypeCode.Byte
            | System.TypeCode.Int16
            | System.TypeCode.UInt16
            | System.TypeCode.Int32
            | System.TypeCode.UInt32
            | System.TypeCode.Int64
            | System.TypeCode.UInt64
            | System.TypeCode.Single
            | System.TypeCode.Double
            | System.TypeCode.Decimal -> Some(n.ToDouble invariant)
            | _ -> None
        | _ -> None

    // Types are exact: whole numbers must be integral (128.5 is not 128), text is not a number, null is absent.
    let int' name dflt =
        match get name with
        | None -> dflt
        | Some v ->
            match number v with
            | Some x when System.Double.IsFinite x && System.Math.Floor x = x ->
                if x < float System.Int32.MinValue || x > float System.Int32.MaxValue then
                    fail (sprintf "%s: %s is out of range" name (shown v))

                int x
            | Some _ -> fail (sprintf "%s must be a whole number, not %s" name (shown v))
            | None -> fail (sprintf "%s must be a whole number, not %s" name (shown v))

    let float' name dflt =
        match get name with
        | None -> dflt
        | Some v ->
            match number v with
            | Some x when System.Double.IsFinite x -> x
            | _ -> fail (sprintf "%s must be a finite number, not %s" name (shown v))

    let str' name dflt =
        match get name with
        | None -> dflt
        | Some(:? string as t) -> t
        | Some v -> fail (sprintf "%s must be text (a string such as \"100\"), not %s" name (shown v))

    let bool' name dflt =
        match get name with
        | None -> dflt
        | Some(:? bool as b) -> b
        | Some v -> fail (sprintf "%s must be true or false, not %s" name (shown v))

    let choice name (table: (string * 'T) list) (dflt: 'T) =
        match get name with
        | None -> dflt
        | Some v ->
            let key = (string v).Trim().ToLowerInvariant().Replace("-", "_")

            match v, List.tryFind (fun (k, _) -> k = key) table with
            | :? string, Some(_, x) -> x
            | _ ->
                fail (
                    sprintf
                        "%s must be one of %s, not %s"
                        name
                        (table |> List.map fst |> String.concat ", ")
                        (match v with
                         | :? string as t -> sprintf "'%s'" t
                         | v -> shown v)
                )

    member _.Whole(name, dflt) = int' name dflt
    member _.Real(name, dflt) = float' name dflt
    member _.Text(name, dflt) = str' name dflt
    member _.Flag(name, dflt) = bool' name dflt
    member _.Choice(name, table, dflt) = choice name table dflt

    member _.Words(name, dflt: string[]) =
        match get name with
        | None -> dflt
        | Some(:? (string[]) as words) -> words
        | Some(:? seq<string> as words) -> Array.ofSeq words
        | Some v -> fail (sprintf "%s must be a list of words, not %s" name (shown v))
