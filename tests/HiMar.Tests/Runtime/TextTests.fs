/// Tests of the text encoders: src/HiMar.Runtime/Text/ClipTokenizer.cs, src/HiMar.Model/Clip.fs and
/// src/HiMar.Runtime/Text/ClipTextEncoder.cs. CLIP's published files cannot be downloaded here, so the tests build
/// vocabularies and models of their own; ids of CLIP's vocabulary are asserted where they follow from its construction.
module HiMar.Tests.TextTests

open System
open System.Collections.Generic
open System.IO
open System.IO.Compression
open System.Text.Json
open Expecto
open TorchSharp
open HiMar.Model
open HiMar.Runtime.Checkpoints
open HiMar.Runtime.Text
open HiMar.Tests.TestUtil

/// The ids of a text (no start, end or padding) as a list.
let private ids (tok: ClipTokenizer) (text: string) = List.ofSeq (tok.Tokenize text)

/// Writes a vocabulary and merges in HF's layout (vocab.json, merges.txt with its `#version` header).
let private writeHfTokenizer (dir: string) (vocab: IEnumerable<KeyValuePair<string, int>>) (merges: string list) =
    let vocab = Dictionary<string, int>(vocab)
    File.WriteAllText(Path.Combine(dir, ClipTokenizer.VocabFile), JsonSerializer.Serialize vocab)
    File.WriteAllLines(Path.Combine(dir, ClipTokenizer.MergesFile), "#version: 0.2" :: merges)

/// An excerpt of CLIP's published vocabulary with every entry "a photo of a cat" needs. The byte symbols take
/// their published ids (ids 0-511 follow bytes-to-unicode order: 'a' is 64, "a</w>" 256 + 64 = 320), and so do
/// the four words and the two special tokens; the intermediate merges ("ca", "ph", "pho", "to</w>") get ids of our
/// own (49000-49003), since only the merges' order matters to the algorithm. The full files must be supplied by
/// the user.
let private publishedExcerpt =
    let vocab =
        dict
            [
                "a", 64
                "c", 66
                "f", 69
                "h", 71
                "o", 78
                "p", 79
                "t", 83
                "a</w>", 320
                "f</w>", 325
                "o</w>", 334
                "t</w>", 339
                "of</w>", 539
                "photo</w>", 1125
                "cat</w>", 2368
                "ca", 49000
                "ph", 49001
                "pho", 49002
                "to</w>", 49003
                "<|startoftext|>", 49406
                "<|endoftext|>", 49407
            ]

    let merges =
        [ "o f</w>"; "c a"; "ca t</w>"; "p h"; "ph o"; "t o</w>"; "pho to</w>" ]

    vocab, merges

let tokenizerTests =
    testList
        "Text tokenizer"
        [
            test "byte symbols follow CLIP's bytes-to-unicode order and the special tokens follow the merges" {
                let tok = ClipTokenizer.FromMerges []
                Expect.equal ClipTokenizer.ByteToUnicode.[int 'a'] 'a' "printable bytes stand for themselves"
                Expect.equal ClipTokenizer.ByteToUnicode.[0] '\u0100' "byte 0"
                Expect.equal ClipTokenizer.ByteToUnicode.[32] '\u0120' "space is 'Ġ'"
                Expect.equal ClipTokenizer.BaseSymbols.[0] '!' "first symbol"
                Expect.equal (ids tok "a") [ 320 ] "a</w> = 256 + 64, as published"
                Expect.equal (ids tok "!") [ 256 ] "!</w>"
                Expect.equal (tok.StartId, tok.EndId) (512, 513) "start and end after 512 symbols and no merges"
            }

            test "merges apply lowest rank first, not left to right" {
                let byRank = ClipTokenizer.FromMerges [ "b c</w>"; "a b" ]
                Expect.equal (ids byRank "abc") [ 64; 512 ] "'b c</w>' (rank 0) wins over 'a b': a, bc</w>"
                let reversed = ClipTokenizer.FromMerges [ "a b"; "b c</w>" ]
                Expect.equal (ids reversed "abc") [ 512; 322 ] "'a b' first: ab, c</w>"
            }

            test "the end-of-word suffix marks only the last symbol of each word" {
                let tok = ClipTokenizer.FromMerges [ "a b</w>"; "a b" ]
                Expect.equal (ids tok "abab") [ 513; 512 ] "ab then ab</w>"
                Expect.equal (ids tok "ab ab") [ 512; 512 ] "two words, each ending in ab</w>"
            }

            test "non-ASCII text is split into UTF-8 bytes mapped to printable characters" {
                // é is C3 A9: 'Ã' (id 127) and '©' (id 102), the last one with </w> (256 + 102)
                Expect.equal (ids (ClipTokenizer.FromMerges []) "café") [ 66; 64; 69; 127; 358 ] "bytes"
                Expect.equal (ids (ClipTokenizer.FromMerges [ "Ã ©</w>" ]) "café") [ 66; 64; 69; 512 ] "merged"
            }

            test "digits are words of one digit each" {
                let tok = ClipTokenizer.FromMerges [ "2 0"; "2 0</w>" ]
                Expect.equal (ids tok "2024") [ 273; 271; 273; 275 ] "2</w> 0</w> 2</w> 4</w>, never merged"

                Expect.equal
                    (List.ofSeq (ClipTokenizer.PreTokenize "x2²"))
                    [ "x"; "2"; "²" ]
                    "letters, then single numbers"
            }

            test "contractions are split off as words of their own" {
                let tok = ClipTokenizer.FromMerges [ "i t</w>"; "' s</w>" ]
                Expect.equal (ids tok "it's") [ 512; 513 ] "it</w> 's</w>"

                Expect.equal
                    (List.ofSeq (ClipTokenizer.PreTokenize "we'll don't i'm they've you're he'd rock'n"))
                    [
                        "we"
                        "'ll"
                        "don"
                        "'t"
                        "i"
                        "'m"
                        "they"
                        "'ve"
                        "you"
                        "'re"
                        "he"
                        "'d"
                        "rock"
                        "'"
                        "n"
                    ]
                    "contractions; other apostrophes are symbols"
            }

            test "the pre-tokenizer splits like CLIP's regex, beyond the Basic Multilingual Plane too" {
                Expect.equal
                    (List.ofSeq (ClipTokenizer.PreTokenize "a photo of 2 cats, <|endoftext|>!!..'s x!<|endoftext|>"))
                    [
                        "a"
                        "photo"
                        "of"
                        "2"
                        "cats"
                        ","
                        "<|endoftext|>"
                        "!!..'"
                        "s"
                        "x"
                        "!<|"
                        "endoftext"
                        "|>"
                    ]
                    "words, special tokens and greedy symbol runs"

                // U+1D41A (mathematical bold small a) is a letter and U+1D7CE a digit: one word, then one number
                Expect.equal
                    (List.ofSeq (ClipTokenizer.PreTokenize "b\U0001D41Ac\U0001D7CE"))
                    [ "b\U0001D41Ac"; "\U0001D7CE" ]
                    "code points, not UTF-16 halves"
            }

            test "normalisation unescapes HTML, cleans whitespace and lower-cases" {
                Expect.equal
                    (ClipTokenizer.Normalize "  A\tPhoto\n\n OF &amp;amp; Cats\u00a0 ")
                    "a photo of & cats"
                    "normalised"

                let tok = ClipTokenizer.FromMerges [ "c a"; "ca t</w>" ]
                Expect.equal (ids tok "  CAT ") (ids tok "cat") "same ids"
            }

            test "special tokens in the text map to their ids" {
                let tok = ClipTokenizer.FromMerges []
                Expect.equal (ids tok "<|startoftext|>a<|endoftext|>") [ 512; 320; 513 ] "start, a</w>, end"
            }

            test "captions are padded to 77 with the end token and truncated keeping the end token" {
                let tok = ClipTokenizer.FromMerges []
                let row = tok.Encode "a"
                Expect.equal row.Length 77 "length"
                Expect.equal row.[..2] [| 512L; 320L; 513L |] "start, a, end"
                Expect.isTrue (row.[3..] |> Array.forall ((=) 513L)) "padded with the end token (HF)"

                let zeros = ClipTokenizer.FromMerges([], padId = 0)
                Expect.isTrue ((zeros.Encode "a").[3..] |> Array.forall ((=) 0L)) "padded with 0 (openai)"

                let long = tok.Encode(String.replicate 100 "a ")
                Expect.equal long.Length 77 "truncated length"
                Expect.equal long.[0] 512L "start"
                Expect.isTrue (long.[1..75] |> Array.forall ((=) 320L)) "the first 75 tokens"
                Expect.equal long.[76] 513L "still ends with the end token"

                use batch = tok.Encode([| "a"; "a a"; "" |])
                Expect.equal (shapeOf batch) [ 3L; 77L ] "batch shape"
                Expect.equal batch.dtype torch.int64 "int64"
                Expect.equal (batch.[2L, 1L].item<int64> ()) 513L "the empty caption is start, end"
            }

            test "'a photo of a cat' gives the published ids from vocab.json and merges.txt" {
                withTempDir (fun dir ->
                    let vocab, merges = publishedExcerpt
                    writeHfTokenizer dir vocab merges
                    let tok = ClipTokenizer.FromFolder dir
                    let expected = [ 49406L; 320L; 1125L; 539L; 320L; 2368L; 49407L ]
                    Expect.equal (List.ofArray (tok.Encode "a photo of a cat").[..6]) expected "published ids"
                    Expect.equal (List.ofArray (tok.Encode "A Photo  of a CAT").[..6]) expected "after normalisation"
                    Expect.equal (tok.Encode "a photo of a cat").[7] 49407L "padding")
            }

            test "openai's bpe_simple_vocab_16e6.txt.gz gives the same ids as vocab.json and merges.txt" {
                withTempDir (fun dir ->
                    let merges =
                        [
                            "o f</w>"
                            "c a"
                            "ca t</w>"
                            "p h"
                            "ph o"
                            "t o</w>"
                            "pho to</w>"
                            "Ã ©</w>"
                        ]

                    let built = ClipTokenizer.FromMerges merges

                    do
                        use gz =
                            new GZipStream(
                                File.Create(Path.Combine(dir, ClipTokenizer.OpenAiBpeFile)),
                                CompressionLevel.Fastest
                            )

                        use w = new StreamWriter(gz)
                        w.Write(String.Join("\n", "\"bpe_simple_vocab_16e6.txt#version: 0.2" :: merges) + "\n")

                    let openai = ClipTokenizer.FromFolder dir
                    let hfDir = Directory.CreateDirectory(Path.Combine(dir, "hf")).FullName
                    writeHfTokenizer hfDir built.Vocabulary merges
                    let hf = ClipTokenizer.FromFolder hfDir
                    let text = "a photo of a café cat"
                    Expect.equal (ids openai text) (ids built text) "openai layout"
                    Expect.equal (ids hf text) (ids built text) "HF layout"
                    Expect.equal (ids hf "of") [ 512 ] "of</w> is the first merge")
            }

            test "a folder without tokenizer files is refused naming the files to supply" {
                withTempDir (fun dir ->
                    let e =
                        catchT<CheckpointFormatException> (fun () -> ClipTokenizer.FromFolder dir |> ignore)

                    Expect.stringContains e.Message "vocab.json and merges.txt" "HF files"
                    Expect.stringContains e.Message "bpe_simple_vocab_16e6.txt.gz" "openai file"
                    Expect.stringContains e.Message "not downloaded" "nothing is downloaded")
            }
        ]

/// A tiny random CLIP text configuration.
let tiny =
    { ClipTextConfig.vitL14 with
        VocabSize = 100L
        Width = 32L
        Layers = 2
        Heads = 4L
        MlpWidth = 64L
    }

/// Random ids (B, 77) below 99 with the end token (99, the largest id) at `ends`.
let private randomIds (ends: int64 list) =
    let b = int64 ends.Length
    let t = torch.randint (0L, 99L, [| b; 77L |], dtype = torch.int64)

    ends |> List.iteri (fun i e -> t.[int64 i, e] <- torch.tensor 99L)

    t

/// HF's `CLIPTextTransformer.forward` written out from the state_dict with an explicit causal mask.
let private referenceForward
    (config: ClipTextConfig)
    (sd: IReadOnlyDictionary<string, torch.Tensor>)
    (ids: torch.Tensor)
    =
    let p k = sd.["text_model." + k]
    let b, l, d = ids.shape.[0], ids.shape.[1], config.Width
    let hd = d / config.Heads

    let lin (x: torch.Tensor) k =
        torch.nn.functional.linear (x, p (k + ".weight"), p (k + ".bias"))

    let ln (x: torch.Tensor) k =
        torch.nn.functional.layer_norm (x, [| d |], p (k + ".weight"), p (k + ".bias"), config.LayerNormEps)

    let heads (x: torch.Tensor) =
        x.reshape(b, l, config.Heads, hd).transpose (1L, 2L)

    let tokens =
        p("embeddings.token_embedding.weight").index_select(0L, ids.flatten ()).reshape (b, l, d)

    let mutable x =
        tokens + p("embeddings.position_embedding.weight").narrow (0L, 0L, l)

    let future = torch.ones(l, l, dtype = torch.bool).triu (1L)

    for i in 0 .. config.Layers - 1 do
        let pre = sprintf "encoder.layers.%d." i
        let h = ln x (pre + "layer_norm1")
        let q = heads (lin h (pre + "self_attn.q_proj") * Math.Pow(float hd, -0.5))
        let k = heads (lin h (pre + "self_attn.k_proj"))
        let v = heads (lin h (pre + "self_attn.v_proj"))

        let w =
            (q.matmul (k.transpose (-1L, -2L))).masked_fill(future, scalar Double.NegativeInfinity).softmax (-1L)

        let o = w.matmul(v).transpose(1L, 2L).reshape (b, l, d)
        x <- x + lin o (pre + "self_attn.out_proj")
        let m = lin (ln x (pre + "layer_norm2")) (pre + "mlp.fc1")
        x <- x + lin (m * (m * 1.702).sigmoid ()) (pre + "mlp.fc2")

    ln x "final_layer_norm"

let modelTests =
    testList
        "Text model"
        [
            test "a tiny configuration gives (B, L, D) hidden states and pooled states at the end tokens" {
                use _ = torch.NewDisposeScope()
                use m = new ClipTextModel(tiny)
                let ids = randomIds [ 5L; 76L ]
                let hidden = m.call ids
                let pooled = m.Pool(hidden, ids)
                Expect.equal (shapeOf hidden) [ 2L; 77L; 32L ] "last hidden state"
                Expect.equal (shapeOf pooled) [ 2L; 32L ] "pooled"
                Expect.equal (maxAbsDiff pooled.[0] hidden.[0L, 5L]) 0.0 "caption 0 pooled at position 5"
                Expect.equal (maxAbsDiff pooled.[1] hidden.[1L, 76L]) 0.0 "caption 1 pooled at position 76"
                Expect.equal (shapeOf (m.call (ids.narrow (1L, 0L, 10L)))) [ 2L; 10L; 32L ] "shorter sequences"
            }

            test "the state_dict keys and shapes are HF CLIPTextModel's" {
                let d, v, c, mw = 32L, 100L, 77L, 64L

                let expected =
                    [
                        "text_model.embeddings.token_embedding.weight", [ v; d ]
                        "text_model.embeddings.position_embedding.weight", [ c; d ]
                        for i in 0..1 do
                            let pre = sprintf "text_model.encoder.layers.%d." i

                            for proj in [ "q_proj"; "k_proj"; "v_proj"; "out_proj" ] do
                                pre + "self_attn." + proj + ".weight", [ d; d ]
                                pre + "self_attn." + proj + ".bias", [ d ]

                            for norm in [ "layer_norm1"; "layer_norm2" ] do
                                pre + norm + ".weight", [ d ]
                                pre + norm + ".bias", [ d ]

                            pre + "mlp.fc1.weight", [ mw; d ]
                            pre + "mlp.fc1.bias", [ mw ]
                            pre + "mlp.fc2.weight", [ d; mw ]
                            pre + "mlp.fc2.bias", [ d ]
                        "text_model.final_layer_norm.weight", [ d ]
                        "text_model.final_layer_norm.bias", [ d ]
                    ]
                    |> Map.ofList

                use m = new ClipTextModel(tiny)

                let own =
                    Weights.stateDict m |> Seq.map (fun kv -> kv.Key, shapeOf kv.Value) |> Map.ofSeq

                Expect.equal own expected "keys and shapes"
                use withProjection = new ClipTextModel({ tiny with ProjectionDim = 16L })

                Expect.equal
                    (shapeOf (Weights.stateDict withProjection).["text_projection.weight"])
                    [ 16L; 32L ]
                    "CLIPTextModelWithProjection's text_projection (no bias)"
            }

            test "the forward equals HF's equations with an explicit causal mask, in float64" {
                use _ = torch.NewDisposeScope()
                use m = new ClipTextModel(tiny)
                m.``to`` torch.float64 |> ignore
                let ids = randomIds [ 30L; 60L ]
                let ours = m.call ids
                let reference = referenceForward tiny (Weights.stateDict m) ids
                Expect.equal ours.dtype torch.float64 "float64"
                Expect.isLessThan (maxAbsDiff ours reference) 1e-10 "max |ours - reference|"
            }

            test "a float32 model agrees with its float64 copy" {
                use _ = torch.NewDisposeScope()
                use m = new ClipTextModel(tiny)
                let ids = randomIds [ 20L ]
                let single = m.call ids
                m.``to`` torch.float64 |> ignore
                Expect.isLessThan (maxAbsDiff single (m.call ids)) 1e-4 "max |float32 - float64|"
            }

            test "the mask is causal: changing a later token leaves earlier positions unchanged" {
                use _ = torch.NewDisposeScope()
                use m = new ClipTextModel(tiny)
                let a = randomIds [ 40L ]
                let b = a.clone ()
                b.[0L, 10L] <- torch.tensor ((a.[0L, 10L].item<int64> () + 1L) % 99L)
                let ha, hb = m.call a, m.call b
                Expect.equal (maxAbsDiff (ha.narrow (1L, 0L, 10L)) (hb.narrow (1L, 0L, 10L))) 0.0 "positions 0-9"

                Expect.isGreaterThan
                    (maxAbsDiff (ha.narrow (1L, 10L, 67L)) (hb.narrow (1L, 10L, 67L)))
                    1e-3
                    "positions 10-76 see the change"
            }

            test "quick_gelu is x sigmoid(1.702 x)" {
                use x = torch.tensor [| -2.0; 0.0; 1.0 |]
                use y = ClipMlp.QuickGelu x
                let expected = [| -2.0 / (1.0 + exp 3.404); 0.0; 1.0 / (1.0 + exp -1.702) |]
                use e = torch.tensor expected
                Expect.isLessThan (maxAbsDiff y e) 1e-12 "values"
            }

            test "the ViT-L/14 text tower has 123,060,480 parameters, as computed from its layer shapes" {
                let c = ClipTextConfig.vitL14
                let d, v, ctx, mw = c.Width, c.VocabSize, c.ContextLength, c.MlpWidth
                let attention = 4L * (d * d + d)
                let norms = 2L * (2L * d)
                let mlp = (d * mw + mw) + (mw * d + d)

                let fromShapes =
                    v * d + ctx * d + int64 c.Layers * (attention + norms + mlp) + 2L * d

                Expect.equal fromShapes 123_060_480L "embeddings + 12 blocks + final norm"
                use m = Anatomy.onMeta (fun () -> new ClipTextModel(c))
                Expect.equal (Weights.parameterCount m) fromShapes "the model built on the meta device"
            }

            test "more ids than positions are refused with a message" {
                use m = new ClipTextModel(tiny)
                use ids = torch.zeros ([| 1L; 78L |], dtype = torch.int64)
                let e = catchT<ArgumentException> (fun () -> m.call ids |> ignore)
                Expect.stringContains e.Message "78 tokens per caption; the model has 77 positions" "message"
            }
        ]

/// A tiny tokenizer whose ids fit `tiny`'s vocabulary of 100: "a", "cat" and the two special tokens.
let private tinyVocab =
    dict
        [
            "a", 3
            "c", 2
            "a</w>", 1
            "t</w>", 4
            "ca", 5
            "cat</w>", 6
            "<|startoftext|>", 98
            "<|endoftext|>", 99
        ],
    [ "c a"; "ca t</w>" ]

/// Writes `model` as model.safetensors (plus `extra` tensors), the tiny tokenizer and a config.json with 4 heads.
let writeFolder (dir: string) (model: ClipTextModel) (extra: (string * torch.Tensor) list) (drop: string list) =
    let state = Dictionary<string, torch.Tensor>(Weights.stateDict model)

    for k, t in extra do
        state.[k] <- t

    for k in drop do
        state.Remove k |> ignore

    SafeTensors.Save(Path.Combine(dir, ClipTextEncoder.WeightsFile), state)

    File.WriteAllText(
        Path.Combine(dir, ClipTextEncoder.ConfigFile),
        """{"text_config": {"num_attention_heads": 4, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05}}"""
    )

    writeHfTokenizer dir (fst tinyVocab) (snd tinyVocab)

let encoderTests =
    testList
        "Text encoder"
        [
            test "a tiny model and vocabulary written to a folder load back and encode as the original" {
                withTempDir (fun dir ->
                    use _ = torch.NewDisposeScope()
                    use original = new ClipTextModel(tiny)
                    writeFolder dir original [] []
                    use enc = ClipTextEncoder.Load dir
                    let asInterface = enc :> ITextEncoder
                    Expect.equal (asInterface.ContextLength, asInterface.Width) (77, 32) "context length and width"
                    Expect.equal enc.Model.Config tiny "configuration read off the shapes and config.json"
                    let captions = [| "a cat"; "A CAT a"; "" |]
                    let hidden = asInterface.Encode captions
                    let ids = enc.Tokenizer.Encode captions
                    Expect.equal (ids.[0L].narrow(0L, 0L, 4L).data<int64> () |> List.ofSeq) [ 98L; 1L; 6L; 99L ] "ids"
                    Expect.equal (shapeOf hidden) [ 3L; 77L; 32L ] "(B, L, D)"
                    Expect.equal (maxAbsDiff hidden (original.call ids)) 0.0 "same outputs as the saved model"
                    let struct (_, pooled) = enc.EncodeWithPooled captions
                    Expect.equal (maxAbsDiff pooled.[0] hidden.[0L, 3L]) 0.0 "pooled at the end token"
                    let empty = asInterface.EncodeEmpty()
                    Expect.equal (shapeOf empty) [ 1L; 77L; 32L ] "empty caption shape"
                    Expect.equal (maxAbsDiff empty (hidden.narrow (0L, 2L, 1L))) 0.0 "the empty caption's context")
            }

            test "keys other than text_model.* are ignored, so a full CLIP checkpoint loads" {
                withTempDir (fun dir ->
                    use _ = torch.NewDisposeScope()
                    use original = new ClipTextModel(tiny)

                    let extra =
                        [
                            "vision_model.embeddings.patch_embedding.weight", torch.zeros (8L, 3L, 2L, 2L)
                            "logit_scale", torch.zeros ([||])
                            "text_model.embeddings.position_ids", torch.arange(77L).reshape (1L, 77L)
                            "text_projection.weight", torch.randn (16L, 32L)
                        ]

                    writeFolder dir original extra []
                    let file = Path.Combine(dir, ClipTextEncoder.WeightsFile)
                    use withProjection = ClipTextEncoder.Load file
                    Expect.equal withProjection.Model.Config.ProjectionDim 16L "text_projection found"
                    use plain = ClipTextEncoder.Load(file, config = tiny)
                    Expect.equal plain.Model.Config.ProjectionDim 0L "text_projection ignored"
                    let captions = [| "a cat" |]
                    Expect.equal (maxAbsDiff (plain.Encode captions) (withProjection.Encode captions)) 0.0 "same tower")
            }

            test "a missing or mismatched key is refused with a message naming the file and the key" {
                withTempDir (fun dir ->
                    use original = new ClipTextModel(tiny)
                    writeFolder dir original [] [ "text_model.encoder.layers.1.mlp.fc2.bias" ]
                    let file = Path.Combine(dir, ClipTextEncoder.WeightsFile)

                    let missing =
                        catchT<CheckpointFormatException> (fun () -> ClipTextEncoder.Load dir |> ignore)

                    Expect.stringContains missing.Message file "file"
                    Expect.stringContains missing.Message "1 missing: text_model.encoder.layers.1.mlp.fc2.bias" "key"

                    writeFolder dir original [] []

                    let mismatched =
                        catchT<CheckpointFormatException> (fun () ->
                            ClipTextEncoder.Load(dir, config = { tiny with MlpWidth = 48L }) |> ignore)

                    Expect.stringContains mismatched.Message file "file"

                    Expect.stringContains
                        mismatched.Message
                        "text_model.encoder.layers.0.mlp.fc1.weight (model [48, 32], file [64, 32])"
                        "shape")
            }

            test "missing weights or tokenizer files are refused naming what to supply" {
                withTempDir (fun dir ->
                    let noWeights =
                        catchT<CheckpointFormatException> (fun () -> ClipTextEncoder.Load dir |> ignore)

                    Expect.stringContains noWeights.Message "model.safetensors" "weights file"
                    Expect.stringContains noWeights.Message "nothing is downloaded" "no download"
                    use original = new ClipTextModel(tiny)
                    writeFolder dir original [] []
                    File.Delete(Path.Combine(dir, ClipTokenizer.MergesFile))

                    let noMerges =
                        catchT<CheckpointFormatException> (fun () -> ClipTextEncoder.Load dir |> ignore)

                    Expect.stringContains noMerges.Message "vocab.json and merges.txt" "tokenizer files")
            }

            test "a vocabulary larger than the model's embedding is refused" {
                use m = new ClipTextModel(tiny)
                let tok = ClipTokenizer.FromMerges []

                let e = catchT<ArgumentException> (fun () -> new ClipTextEncoder(m, tok) |> ignore)

                Expect.stringContains e.Message "the tokenizer's ids reach 513; the model embeds 100 tokens" "message"
            }
        ]
