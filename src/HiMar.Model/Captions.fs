namespace HiMar.Model

open System
open System.Text.RegularExpressions

/// The built-in text encoder's word-level tokenization: lower-case words (letters and digits, joined by inner
/// hyphens or apostrophes: "t-shirt", "men's"), id = position in the vocabulary + 1, 0 = padding.
module WordVocabulary =
    let private word =
        Regex(@"[\p{L}\p{N}]+(?:['\-][\p{L}\p{N}]+)*", RegexOptions.Compiled)

    /// The words of a caption, lower-cased, in order.
    [<CompiledName("Words")>]
    let words (caption: string) =
        [| for m in word.Matches(caption.ToLowerInvariant()) -> m.Value |]

    /// The sorted distinct words of some captions: a vocabulary.
    [<CompiledName("Build")>]
    let build (captions: seq<string>) =
        captions |> Seq.collect words |> Seq.distinct |> Seq.sort |> Array.ofSeq

    /// The most characters of a caption that an error message quotes.
    [<Literal>]
    let QuotedLength = 80

    let private quoteWith (mark: string) (caption: string) =
        let escaped = Text.StringBuilder()

        for ch in caption do
            match ch with
            | '\n' -> escaped.Append "\\n" |> ignore
            | '\r' -> escaped.Append "\\r" |> ignore
            | '\t' -> escaped.Append "\\t" |> ignore
            | c when Char.IsControl c -> escaped.AppendFormat("\\x{0:x2}", int c) |> ignore
            | c -> escaped.Append c |> ignore

        let s = escaped.ToString()

        if s.Length <= QuotedLength then
            mark + s + mark
        else
            sprintf "%s%s...%s (%d characters)" mark (s.Substring(0, QuotedLength)) mark caption.Length

    /// A caption as an error message quotes it: in double quotes, control characters escaped (\n, \t, \x1b), cut
    /// after `QuotedLength` characters with the count of them all.
    [<CompiledName("Quote")>]
    let quote (caption: string) = quoteWith "\"" caption

    /// Token ids (L,) of a caption, padded with 0 to `length`; or a message naming the unknown words or the
    /// excess length (quoting at most `QuotedLength` characters of the caption and of each word).
    [<CompiledName("TryEncode")>]
    let tryEncode (vocab: string[]) (length: int) (caption: string) : Result<int64[], string> =
        let ws = words caption
        let index = vocab |> Array.mapi (fun i w -> w, int64 (i + 1)) |> dict

        match ws |> Array.filter (fun w -> not (index.ContainsKey w)) |> Array.distinct with
        | [||] when ws.Length > length ->
            Error(sprintf "%s has %d words; this model reads at most %d" (quote caption) ws.Length length)
        | [||] -> Ok(Array.init length (fun i -> if i < ws.Length then index.[ws.[i]] else 0L))
        | unknown ->
            let listed =
                unknown |> Array.truncate 5 |> Array.map (quoteWith "'") |> String.concat ", "

            let shown =
                if unknown.Length > 5 then
                    sprintf "%s and %d more" listed (unknown.Length - 5)
                else
                    listed

            Error(
                sprintf
                    "%s: the model does not know %s %s. It knows these %d words: %s"
                    (quote caption)
                    (if unknown.Length = 1 then "the word" else "the words")
                    shown
                    vocab.Length
                    (if vocab.Length <= 60 then
                         String.Join(" ", vocab)
                     else
                         String.Join(" ", Array.truncate 60 vocab) + " ...")
            )

/// Captions for Fashion-MNIST made from its labels and simple templates ("a photo of a sneaker", "an ankle
/// boot", "a pair of trousers"). Training uses `TrainTemplates`; evaluation prompts with `HeldOutTemplates`,
/// which recombine the same words in phrasings never seen in training.
module FashionCaptions =
    /// The ways each class (0..9, Fashion-MNIST's order) is named.
    [<CompiledName("ClassPhrases")>]
    let classPhrases =
        [|
            [| "t-shirt"; "top"; "tee" |]
            [| "pair of trousers"; "pair of pants"; "trousers" |]
            [| "pullover"; "sweater"; "jumper" |]
            [| "dress"; "summer dress"; "long dress" |]
            [| "coat"; "jacket"; "winter coat" |]
            [| "sandal"; "pair of sandals"; "summer sandal" |]
            [| "shirt"; "button-up shirt"; "blouse" |]
            [| "sneaker"; "trainer"; "running shoe" |]
            [| "bag"; "handbag"; "purse" |]
            [| "ankle boot"; "boot"; "pair of ankle boots" |]
        |]

    /// Training templates: "{a}" is the indefinite article of the phrase, "{x}" the phrase.
    [<CompiledName("TrainTemplates")>]
    let trainTemplates =
        [|
            "{a} {x}"
            "a photo of {a} {x}"
            "a picture of {a} {x}"
            "an image of {a} {x}"
            "a black and white photo of {a} {x}"
            "a small photo of {a} {x}"
            "a product photo of {a} {x}"
            "a photo of the {x}"
        |]

    /// Evaluation templates: the training words in new phrasings.
    [<CompiledName("HeldOutTemplates")>]
    let heldOutTemplates =
        [|
            "the {x}"
            "a picture of the {x}"
            "an image of the {x}"
            "a small picture of {a} {x}"
            "a black and white image of {a} {x}"
        |]

    let private article (phrase: string) =
        if "aeiou".Contains phrase.[0] then "an" else "a"

    /// A template filled with a phrase.
    [<CompiledName("Fill")>]
    let fill (template: string) (phrase: string) =
        template.Replace("{a}", article phrase).Replace("{x}", phrase)

    /// Every caption of a class under some templates.
    [<CompiledName("All")>]
    let all (templates: string[]) (label: int) =
        [|
            for t in templates do
                for p in classPhrases.[label] -> fill t p
        |]

    /// The five captions of training image `index` of class `label` (COCO gives five per image): distinct
    /// template and phrase pairs picked by a hash of the index, the same in every run.
    [<CompiledName("ForImage")>]
    let forImage (index: int) (label: int) =
        let pool = all trainTemplates label
        let rng = Random(index * 7919 + label)
        let order = Array.init pool.Length id
        rng.Shuffle order
        order |> Array.take (min 5 pool.Length) |> Array.map (fun i -> pool.[i])

    /// The vocabulary of every training and held-out caption.
    [<CompiledName("Vocabulary")>]
    let vocabulary =
        WordVocabulary.build (
            [ 0..9 ]
            |> Seq.collect (fun c -> Seq.append (all trainTemplates c) (all heldOutTemplates c))
        )

    /// The longest caption in words.
    [<CompiledName("MaxWords")>]
    let maxWords =
        [ 0..9 ]
        |> Seq.collect (fun c -> Seq.append (all trainTemplates c) (all heldOutTemplates c))
        |> Seq.map (WordVocabulary.words >> Array.length)
        |> Seq.max
