/// Tests of the text-to-image path: word vocabulary and Fashion-MNIST captions, text configs and their JSON,
/// the model's text conditioning (built-in encoder, external context, null contexts, caption dropout, Beta(4, 1)
/// mask ratios), prompt sampling, caption training with exact resume, COCO captions and caption embeddings.
module HiMar.Tests.TextToImageTests

open System
open System.IO
open System.Text.Json.Nodes
open Expecto
open TorchSharp
open HiMar.Model
open HiMar.Runtime.Checkpoints
open HiMar.Runtime.Data
open HiMar.Runtime.Parity
open HiMar.Runtime.Sampling
open HiMar.Runtime.Text
open HiMar.Runtime.Training
open HiMar.Tests.TestUtil

/// The training tests' tiny model with the fashion-text preset's conditioning (captions, buffer, mask rule) through
/// a tiny built-in encoder.
let tinyText =
    let preset = HiMarConfig.fashionText

    { TrainingTests.tinyConfig with
        Backbone.BufferSize = preset.Backbone.BufferSize
        Training.MaskRule = preset.Training.MaskRule
        Text =
            { preset.Text with
                Width = 16
                Depth = 1
                Heads = 2
            }
    }

/// The same with an external encoder's 12 x 16 context.
let tinyExternal =
    { tinyText with
        Text.Encoder = TextEncoderKind.External
        Text.ExternalWidth = 16
        Text.Vocabulary = [||]
        Text.Width = 0
        Text.Depth = 0
        Text.Heads = 0
    }

let private build (config: HiMarConfig) =
    torch.manual_seed 3L |> ignore
    let m = new HiMAR(config)
    Init.himar m
    m

let private ids (m: HiMAR) (captions: string list) =
    match Prompts.Encode(m, ResizeArray captions) with
    | Condition.Tokens t -> t
    | _ -> failtest "expected word ids"

let private options = TrainingTests.options

let private quick =
    SamplerOptions(
        Phase1Steps = Nullable 2,
        Phase2Steps = 2,
        Cfg = 2.0,
        ReCfg = 2.0,
        MlpHeadSteps = "ddim3",
        DitHeadSteps = "ddim3"
    )

let tests =
    testList
        "TextToImage"
        [
            test "captions split into lower-case words; ids pad with 0; unknown and excess words are named" {
                Expect.equal
                    (WordVocabulary.words "A Photo of a T-shirt!")
                    [| "a"; "photo"; "of"; "a"; "t-shirt" |]
                    "words"

                let vocab = [| "a"; "boot"; "photo" |]

                match WordVocabulary.tryEncode vocab 5 "a BOOT" with
                | Ok v -> Expect.equal v [| 1L; 2L; 0L; 0L; 0L |] "ids"
                | Error e -> failtest e

                match WordVocabulary.tryEncode vocab 5 "a red boot" with
                | Error e ->
                    Expect.stringContains e "does not know the word 'red'" "unknown word"
                    Expect.stringContains e "It knows these 3 words: a boot photo" "vocabulary listed"
                | Ok _ -> failtest "unknown word accepted"

                match WordVocabulary.tryEncode vocab 2 "a photo boot" with
                | Error e -> Expect.stringContains e "has 3 words; this model reads at most 2" "too long"
                | Ok _ -> failtest "too long accepted"
            }

            test "Fashion-MNIST captions: five distinct per image naming its class; held-out phrasings are new" {
                let caps = FashionCaptions.forImage 17 9
                Expect.equal caps.Length 5 "five captions"
                Expect.equal (Array.distinct caps).Length 5 "distinct"

                for c in caps do
                    Expect.isTrue
                        (FashionCaptions.classPhrases.[9] |> Array.exists (fun p -> c.EndsWith p))
                        (sprintf "'%s' names an ankle boot" c)

                Expect.equal
                    (FashionCaptions.fill "a photo of {a} {x}" "ankle boot")
                    "a photo of an ankle boot"
                    "article"

                Expect.equal (FashionCaptions.forImage 17 9) caps "the same in every run"

                for t in FashionCaptions.heldOutTemplates do
                    Expect.isFalse (Array.contains t FashionCaptions.trainTemplates) t

                Expect.isLessThanOrEqual
                    FashionCaptions.maxWords
                    HiMarConfig.fashionText.Backbone.BufferSize
                    "fits the context"

                Expect.equal
                    FashionCaptions.vocabulary.Length
                    42
                    "42 distinct words over the training and held-out captions"
            }

            test "a text config survives its JSON; class configs write no text keys" {
                let json = ConfigCodec.toJson HiMarConfig.fashionText

                let back =
                    ConfigCodec.fromReferenceArgs HiMarConfig.hiMarB (ReferenceArgs.FromJson json)

                Expect.equal back HiMarConfig.fashionText "fashion-text round trip"
                let s = ConfigCodec.toJson HiMarConfig.hiMarS

                let backS =
                    ConfigCodec.fromReferenceArgs HiMarConfig.hiMarB (ReferenceArgs.FromJson s)

                Expect.equal backS HiMarConfig.hiMarS "hi-mar-s round trip"
                let b = ConfigCodec.toJson HiMarConfig.hiMarB
                Expect.isNull b.["conditioning"] "no text keys for class models"
                Expect.isNull b.["mask_ratio"] "no mask-ratio key for the reference rule"

                let bad = JsonObject()
                bad.["conditioning"] <- JsonValue.Create "audio"

                let e =
                    catchT<ArgumentException> (fun () ->
                        ConfigCodec.fromReferenceArgs HiMarConfig.hiMarB (ReferenceArgs.FromJson bad)
                        |> ignore)

                Expect.stringContains e.Message "conditioning must be one of class, text, not 'audio'" "message"
            }

            test "parameter counts: hi-mar-s 95,080,752 (documented); fashion-text 4,270,576" {
                // fashion-text = fashion (4,155,952) - class_emb and fake_latent (1,408) + 8 more buffer positions in
                // the encoder and decoder tables (4,096) + context_proj 64 -> 128 (8,320) + the text encoder
                // (words 43 x 64 + positions 12 x 64 + 2 blocks of 49,984 + final norm 128 = 103,616).
                let _, s = Anatomy.parameterCounts HiMarConfig.hiMarS
                let _, f = Anatomy.parameterCounts HiMarConfig.fashionText
                Expect.equal s 95080752L "hi-mar-s"
                Expect.equal f 4270576L "fashion-text"
            }

            test "a built-in text model: keys, context shapes, the empty caption as null, labels refused" {
                use m = build tinyText
                let keys = Weights.stateDict m |> Seq.map (fun kv -> kv.Key) |> Set.ofSeq
                Expect.isTrue (keys.Contains "text_encoder.token_embed.weight") "text encoder"
                Expect.isTrue (keys.Contains "context_proj.weight") "context projection"
                Expect.isFalse (keys.Contains "class_emb.weight") "no class embedding"
                Expect.isFalse (keys.Contains "fake_latent") "no null class"
                use t = ids m [ "a sandal"; "" ]
                Expect.equal t.shape [| 2L; 12L |] "ids"
                use emb = m.ConditionEmbedding(Condition.Tokens t)
                Expect.equal emb.shape [| 2L; 12L; 32L |] "(B, L, E)"
                use nul = m.NullEmbedding 2L
                Expect.equal nul.shape [| 2L; 12L; 32L |] "null (B, L, E)"
                Expect.isLessThan (maxAbsDiff emb.[1] nul.[0]) 1e-6 "the empty caption is the null context"
                Expect.isGreaterThan (maxAbsDiff emb.[0] nul.[0]) 1e-3 "a caption differs from the null"
                use labels = torch.tensor [| 1L |]

                let e =
                    catchT<ArgumentException> (fun () -> m.ConditionEmbedding(Condition.Labels labels) |> ignore)

                Expect.stringContains e.Message "conditioned on captions, not class labels" "message"
            }

            test "external context: a fixed, untrained empty context, or a learned null" {
                use m = build tinyExternal
                let p = m.named_parameters () |> Seq.find (fun struct (n, _) -> n = "empty_context")
                let struct (_, empty) = p
                Expect.isFalse empty.requires_grad "not trained"
                use ctx = torch.randn (1L, 12L, 16L)
                m.SetEmptyContext ctx
                use nul = m.NullEmbedding 1L
                use direct = m.ConditionEmbedding(Condition.Context ctx)
                Expect.isLessThan (maxAbsDiff nul direct) 1e-6 "null = projected empty context"
                use wrong = torch.randn (2L, 12L, 8L)

                let e =
                    catchT<ArgumentException> (fun () -> m.ConditionEmbedding(Condition.Context wrong) |> ignore)

                Expect.stringContains e.Message "expected (B, 12, 16)" "shape named"

                use learned =
                    build
                        { tinyExternal with
                            Text.NullContext = NullContextKind.Learned
                        }

                let names =
                    learned.named_parameters () |> Seq.map (fun struct (n, _) -> n) |> Set.ofSeq

                Expect.isTrue (names.Contains "fake_context") "learned null context"
                Expect.isFalse (names.Contains "empty_context") "no fixed one"
            }

            test "caption dropout replaces the whole context with the null context" {
                // Default (not zeroed) head init, so that the context reaches the loss.
                let loss (cfg: HiMarConfig) (captions: string list) =
                    torch.manual_seed 3L |> ignore
                    use m = new HiMAR(cfg)
                    m.train ()
                    use g = new torch.Generator(2UL)
                    use tokens = torch.randn ([| 4L; 64L; 16L |], generator = g)
                    use cond = torch.randn ([| 4L; 16L; 16L |], generator = g)
                    use c = ids m captions
                    torch.manual_seed 11L |> ignore
                    let r = m.TrainingLosses(tokens, cond, Condition.Tokens c, 5.0)
                    r.Total.item<float32> () |> float

                let captions = [ "a sandal"; "a coat"; "the bag"; "a boot" ]
                let empty = [ ""; ""; ""; "" ]

                let dropAll =
                    { tinyText with
                        Training.LabelDropProb = 1.0
                    }

                let keepAll =
                    { tinyText with
                        Training.LabelDropProb = 0.0
                    }

                Expect.equal (loss dropAll captions) (loss dropAll empty) "every caption dropped: the text is ignored"
                Expect.isGreaterThan (abs (loss keepAll captions - loss keepAll empty)) 1e-6 "kept: the text matters"

                Expect.isGreaterThan
                    (abs (loss dropAll captions - loss keepAll captions))
                    1e-6
                    "dropping changes the loss"
            }

            test "Beta(4, 1) mask ratios: mean 0.8, P(r < 0.5) = 1/16, never 0" {
                torch.manual_seed 5L |> ignore
                let rs = Array.init 4000 (fun _ -> Masking.betaRate 4.0)
                Expect.floatClose { absolute = 0.01; relative = 0.0 } (Array.average rs) 0.8 "mean"
                let below = rs |> Array.filter (fun r -> r < 0.5) |> Array.length
                Expect.floatClose { absolute = 0.012; relative = 0.0 } (float below / 4000.0) 0.0625 "CDF at 0.5"
                Expect.isTrue (rs |> Array.forall (fun r -> r > 0.0 && r <= 1.0)) "in (0, 1]"
            }

            test "prompt sampling: shapes, the same image for a seed, guidance on, captions change the image" {
                // Default init (Init.himar zeroes the heads' modulations, which would hide the condition).
                torch.manual_seed 3L |> ignore
                use m = new HiMAR(tinyText)

                let run (captions: string list) =
                    use c = Prompts.Encode(m, ResizeArray captions)
                    use noise = new SeededNoise(4L, 0, captions.Length)
                    HiMarSampler.Sample(m, c, noise, quick)

                use a = run [ "a sandal"; "a coat" ]
                use b = run [ "a sandal"; "a coat" ]
                use c = run [ "a bag"; "a coat" ]
                Expect.equal a.Dense.shape [| 2L; 16L; 8L; 8L |] "dense tokens"
                Expect.equal (maxAbsDiff a.Dense b.Dense) 0.0 "deterministic"
                Expect.isGreaterThan (maxAbsDiff a.Dense.[0] c.Dense.[0]) 1e-4 "the prompt matters"
            }

            test "the sample job names files after prompts and refuses an unknown word before any work" {
                withTempDir (fun dir ->
                    use m = build tinyText

                    let req (prompts: string list) =
                        SampleRequest(
                            Prompts = ResizeArray prompts,
                            OutDir = dir,
                            Options =
                                SamplerOptions(
                                    Phase1Steps = Nullable 1,
                                    Phase2Steps = 1,
                                    MlpHeadSteps = "ddim2",
                                    DitHeadSteps = "ddim2"
                                )
                        )

                    let out =
                        SampleJob.Run(m, PixelPatchTokenizer.Fashion, req [ "a sandal"; "an ankle boot" ])

                    Expect.equal
                        (out.Images |> Seq.map Path.GetFileName |> List.ofSeq)
                        [ "0000-a-sandal.png"; "0001-an-ankle-boot.png" ]
                        "files"

                    let e =
                        catchT<PromptException> (fun () ->
                            SampleJob.Run(m, PixelPatchTokenizer.Fashion, req [ "a coat"; "a purple hat" ])
                            |> ignore)

                    Expect.stringContains e.Message "does not know the words 'purple', 'hat'" "message"

                    let labelled =
                        catchT<PromptException> (fun () ->
                            SampleJob.Run(
                                m,
                                PixelPatchTokenizer.Fashion,
                                SampleRequest(Labels = ResizeArray [ 1L ], OutDir = dir)
                            )
                            |> ignore)

                    Expect.stringContains labelled.Message "give prompts" "labels on a text model")
            }

            test "caption training resumes exactly and draws its captions from the run seed" {
                withTempDir (fun dir ->
                    let data = TrainingTests.SyntheticData()

                    let caps () =
                        CaptionTexts.FashionMnist((data :> IImageDataset).Labels)

                    let straight = Path.Combine(dir, "a")
                    let split = Path.Combine(dir, "b")

                    use a =
                        new Trainer(
                            tinyText,
                            data,
                            PixelPatchTokenizer.Fashion,
                            options straight 4,
                            captions = caps ()
                        )

                    a.Run()

                    use b =
                        new Trainer(tinyText, data, PixelPatchTokenizer.Fashion, options split 2, captions = caps ())

                    b.Run()

                    use c =
                        new Trainer(
                            tinyText,
                            data,
                            PixelPatchTokenizer.Fashion,
                            options split 4,
                            resume = true,
                            captions = caps ()
                        )

                    c.Run()
                    let wa, wc = Weights.stateDict a.Model, Weights.stateDict c.Model

                    for KeyValue(k, t) in wa do
                        Expect.equal (maxAbsDiff t wc.[k]) 0.0 k

                    Expect.isTrue (wa.ContainsKey "text_encoder.blocks.0.attn.qkv.weight") "the encoder is trained too"

                    let noCaptions =
                        catchT<ArgumentException> (fun () ->
                            new Trainer(
                                tinyText,
                                data,
                                PixelPatchTokenizer.Fashion,
                                options (Path.Combine(dir, "c")) 1
                            )
                            |> ignore)

                    Expect.stringContains noCaptions.Message "trains on captions" "captions required"

                    let bad =
                        CaptionTexts(
                            ResizeArray
                                [
                                    for i in 0..47 ->
                                        ResizeArray [ (if i = 7 then "a red coat" else "a coat") ]
                                        :> Collections.Generic.IReadOnlyList<string>
                                ]
                        )

                    let unknown =
                        catchT<PromptException> (fun () ->
                            new Trainer(
                                tinyText,
                                data,
                                PixelPatchTokenizer.Fashion,
                                options (Path.Combine(dir, "d")) 1,
                                captions = bad
                            )
                            |> ignore)

                    Expect.stringContains unknown.Message "caption 7" "the caption is named before training")
            }

            test "text evaluation prompts with held-out templates and reports accuracy per class" {
                withTempDir (fun dir ->
                    let models = Path.Combine(repoRoot, "models")
                    use m = build tinyText

                    use clf =
                        HiMar.Runtime.Evaluation.ClassifierRuns.Load(Path.Combine(models, "fashion-classifier"))

                    let stats = Path.Combine(models, "fashion-classifier", "train-stats.npz")
                    let ckpt = Path.Combine(dir, "ckpt")
                    Directory.CreateDirectory ckpt |> ignore
                    ModelFiles.Save(m, Path.Combine(ckpt, "weights.safetensors"))

                    let options =
                        SamplerOptions(
                            Phase1Steps = Nullable 1,
                            Phase2Steps = 1,
                            MlpHeadSteps = "2",
                            DitHeadSteps = "2",
                            ClipDenoised = true
                        )

                    let r =
                        HiMar.Runtime.Evaluation.EvalJob.Run(
                            m,
                            ckpt,
                            true,
                            clf,
                            stats,
                            20,
                            options,
                            0L,
                            Path.Combine(dir, "eval")
                        )

                    let report = r.Report
                    let node (n: JsonNode | null) = nonNull n
                    Expect.equal ((node report.["conditioning"]).GetValue<string>()) "text" "conditioning"

                    let prompts =
                        (node report.["example_prompts"]).AsArray()
                        |> Seq.map (fun p -> (node p).GetValue<string>())
                        |> List.ofSeq

                    Expect.equal prompts.[0] "the t-shirt" "image 0: class 0, first held-out template"
                    Expect.equal prompts.[19] "a picture of the ankle boot" "image 19: class 9, second template"

                    Expect.equal
                        (HiMar.Runtime.Evaluation.EvalJob.HeldOutPrompt 59)
                        "the boot"
                        "templates, then phrases"

                    Expect.equal
                        (HiMar.Runtime.Evaluation.EvalJob.Prompt(FashionCaptions.trainTemplates, 10))
                        "a photo of a t-shirt"
                        "--training-templates"

                    Expect.equal ((node report.["class_accuracy_per_class"]).AsObject().Count) 10 "ten classes"
                    let acc = (node (node report.["metrics"]).["class_accuracy"]).GetValue<float>()
                    Expect.isTrue (acc >= 0.0 && acc <= 1.0) "accuracy in [0, 1]")
            }

            test "COCO captions: images in file order with their captions; malformed files are named" {
                withTempDir (fun dir ->
                    let path = Path.Combine(dir, "captions.json")

                    File.WriteAllText(
                        path,
                        """{"images":[{"id":5,"file_name":"b.jpg"},{"id":2,"file_name":"a.jpg"},{"id":9,"file_name":"c.jpg"}],
                            "annotations":[{"image_id":2,"caption":"a cat "},{"image_id":5,"caption":"a dog"},{"image_id":2,"caption":"the cat"}]}"""
                    )

                    let coco = CocoCaptions.Load path
                    Expect.equal (List.ofSeq coco.Files) [ "b.jpg"; "a.jpg" ] "files, uncaptioned left out"
                    Expect.equal (List.ofSeq coco.Captions.[1]) [ "a cat"; "the cat" ] "captions"
                    Expect.equal coco.WithoutCaptions 1 "c.jpg has none"

                    File.WriteAllText(
                        path,
                        """{"images":[{"id":1,"file_name":"a.jpg"}],"annotations":[{"image_id":4,"caption":"x"}]}"""
                    )

                    let e = catchT<InvalidDataException> (fun () -> CocoCaptions.Load path |> ignore)

                    Expect.stringContains
                        e.Message
                        "annotations[0] names image 4, which `images` does not list"
                        "message"

                    Expect.stringContains e.Message path "file named"
                    File.WriteAllText(path, """{"annotations":[]}""")
                    let e2 = catchT<InvalidDataException> (fun () -> CocoCaptions.Load path |> ignore)
                    Expect.stringContains e2.Message "no `images` list" "message")
            }

            test "a COCO-style folder caches with its file names and trains on captions or on their embeddings" {
                withTempDir (fun dir ->
                    let images = Path.Combine(dir, "train2017")
                    Directory.CreateDirectory images |> ignore

                    for i in 1..3 do
                        use img =
                            new SixLabors.ImageSharp.Image<SixLabors.ImageSharp.PixelFormats.Rgb24>(70, 64)

                        img.[10 * i, 9] <- SixLabors.ImageSharp.PixelFormats.Rgb24(250uy, 20uy, 20uy)
                        SixLabors.ImageSharp.ImageExtensions.SaveAsPng(img, Path.Combine(images, sprintf "%03d.png" i))

                    let captionsFile = Path.Combine(dir, "captions.json")

                    File.WriteAllText(
                        captionsFile,
                        """{"images":[{"id":3,"file_name":"003.png"},{"id":1,"file_name":"001.png"},{"id":2,"file_name":"002.png"}],
                            "annotations":[{"image_id":1,"caption":"a coat"},{"image_id":3,"caption":"a bag"},{"image_id":3,"caption":"the bag"},
                                           {"image_id":2,"caption":"a boot"}]}"""
                    )

                    let coco = CocoCaptions.Load captionsFile
                    let folder = ImageFolder.FromFiles(images, coco.Files, 64)
                    use fixture = ParityFixture.Open tinyFixture
                    use vae = VaeParityCases.Build fixture
                    let out = Path.Combine(dir, "cache")
                    LatentCache.Build(folder, vae, out, 2) |> ignore
                    use cache = LatentCache.Open out

                    Expect.equal
                        (List.ofSeq (nonNull cache.Files))
                        [ "003.png"; "001.png"; "002.png" ]
                        "keys in caption order"

                    let captions = CaptionTexts.ForKeys(coco, nonNull cache.Files, captionsFile)
                    Expect.equal (captions.Text(0, 1)) "the bag" "aligned"

                    let config =
                        { tinyText with
                            Backbone.ImageSize = 64
                            Backbone.VaeStride = 16
                            Pivots.GridSide = 2
                        }

                    use t =
                        new Trainer(config, cache, null, options (Path.Combine(dir, "run")) 2, captions = captions)

                    t.Run()
                    Expect.equal t.Step 2 "trained on captions"

                    let missing =
                        catchT<InvalidDataException> (fun () ->
                            CaptionTexts.ForKeys(coco, ResizeArray [ "004.png" ], captionsFile) |> ignore)

                    Expect.stringContains missing.Message "no captions for the image '004.png'" "named"

                    // Embeddings made from the captions file train a model with an external encoder on the same cache.
                    use encoder = new ModelTextEncoder(t.Model)
                    let emb = Path.Combine(dir, "emb")

                    CaptionEmbeddings.Build(coco.Files, coco.Captions, encoder, "builtin", emb)
                    |> ignore

                    let external =
                        { tinyExternal with
                            Backbone.ImageSize = 64
                            Backbone.VaeStride = 16
                            Pivots.GridSide = 2
                            Text.ExternalWidth = 16
                        }

                    use t2 =
                        new Trainer(
                            external,
                            cache,
                            null,
                            options (Path.Combine(dir, "run2")) 2,
                            captions = CaptionEmbeddings.Open(emb, nonNull cache.Files)
                        )

                    t2.Run()
                    Expect.equal t2.Step 2 "trained on embeddings")
            }

            test "embed-captions reads a CLIP folder too: its 77-token context goes into the shards" {
                withTempDir (fun dir ->
                    let clipDir = Path.Combine(dir, "clip")
                    Directory.CreateDirectory clipDir |> ignore
                    torch.manual_seed 1L |> ignore
                    use clip = new ClipTextModel(TextTests.tiny)
                    TextTests.writeFolder clipDir clip [] []
                    use encoder = TextEncoders.Load clipDir
                    Expect.isTrue (encoder :? ClipTextEncoder) "a CLIP folder loads CLIP"
                    let out = Path.Combine(dir, "emb")

                    let captions =
                        ResizeArray [ ResizeArray [ "a cat"; "cat" ] :> Collections.Generic.IReadOnlyList<string> ]

                    CaptionEmbeddings.Build(ResizeArray [ "cat.jpg" ], captions, encoder, "clip", out, float16 = false)
                    |> ignore

                    use emb = CaptionEmbeddings.Open out
                    Expect.equal (emb.ContextLength, emb.Width) (77, 32) "CLIP's 77 x width"
                    use want = encoder.Encode(ResizeArray [ "cat" ])

                    let model =
                        { tinyExternal with
                            Backbone.BufferSize = 77
                            Text.ExternalWidth = 32
                        }

                    emb.CheckFits model
                    use m = build model
                    use got = emb.Batch(m, [| 0 |], [| 1 |])
                    Expect.isLessThan (maxAbsDiff got.Tensor want) 1e-6 "the encoder's context")
            }

            test "caption embeddings: shards give back the encoder's rows, in the data's order; training reads them" {
                withTempDir (fun dir ->
                    use textModel = build tinyText
                    use encoder = new ModelTextEncoder(textModel)
                    let keys = ResizeArray [ for i in 0..47 -> sprintf "train/%d" i ]

                    let captions =
                        ResizeArray
                            [
                                for i in 0..47 ->
                                    FashionCaptions.forImage i (i % 10) |> Array.take 2
                                    :> Collections.Generic.IReadOnlyList<string>
                            ]

                    let out = Path.Combine(dir, "emb")

                    CaptionEmbeddings.Build(
                        keys,
                        captions,
                        encoder,
                        "tiny",
                        out,
                        float16 = false,
                        shardRows = 40,
                        batchSize = 16
                    )
                    |> ignore

                    Expect.equal (Directory.GetFiles(out, "shard-*.safetensors").Length) 3 "96 rows in shards of 40"
                    use emb = CaptionEmbeddings.Open out
                    Expect.equal emb.Count 48 "images"
                    Expect.equal (emb.CaptionsOf 5) 2 "captions per image"
                    Expect.equal (emb.Text(5, 1)) captions.[5].[1] "text kept"
                    use got = emb.Batch(textModel, [| 45; 3 |], [| 1; 0 |])
                    use want = encoder.Encode(ResizeArray [ captions.[45].[1]; captions.[3].[0] ])
                    Expect.isLessThan (maxAbsDiff got.Tensor want) 1e-6 "rows"
                    use e0 = encoder.EncodeEmpty()
                    use e1 = nonNull emb.EmptyContext
                    Expect.isLessThan (maxAbsDiff e0 e1) 1e-6 "empty caption"
                    use reordered = CaptionEmbeddings.Open(out, ResizeArray [ "train/3"; "train/45" ])
                    use r = reordered.Batch(textModel, [| 1 |], [| 1 |])
                    use w = encoder.Encode(ResizeArray [ captions.[45].[1] ])
                    Expect.isLessThan (maxAbsDiff r.Tensor w) 1e-6 "aligned to the data's keys"

                    let missing =
                        catchT<InvalidDataException> (fun () ->
                            CaptionEmbeddings.Open(out, ResizeArray [ "train/99" ]) |> ignore)

                    Expect.stringContains missing.Message "no embeddings for image 'train/99'" "missing key named"

                    // float16 storage: the same rows to half precision
                    let out16 = Path.Combine(dir, "emb16")
                    CaptionEmbeddings.Build(keys, captions, encoder, "tiny", out16) |> ignore
                    use emb16 = CaptionEmbeddings.Open out16
                    use h = emb16.Batch(textModel, [| 45 |], [| 1 |])
                    Expect.isLessThan (maxAbsDiff h.Tensor (want.narrow (0L, 0L, 1L))) 5e-3 "float16"

                    // An external-encoder model trains on them and keeps their empty caption as its null context.
                    use t =
                        new Trainer(
                            tinyExternal,
                            TrainingTests.SyntheticData(),
                            PixelPatchTokenizer.Fashion,
                            options (Path.Combine(dir, "run")) 2,
                            captions = CaptionEmbeddings.Open out
                        )

                    t.Run()

                    Expect.isLessThan
                        (maxAbsDiff (Weights.stateDict t.Model).["empty_context"] e0)
                        1e-6
                        "the null context is the encoder's empty caption"

                    let wrong =
                        catchT<ArgumentException> (fun () ->
                            new Trainer(
                                { tinyExternal with
                                    Text.ExternalWidth = 8
                                },
                                TrainingTests.SyntheticData(),
                                PixelPatchTokenizer.Fashion,
                                options (Path.Combine(dir, "run2")) 1,
                                captions = CaptionEmbeddings.Open out
                            )
                            |> ignore)

                    Expect.stringContains
                        wrong.Message
                        "embeddings are 12 x 16, the model reads 12 (buffer_size) x 8"
                        "message")
            }
        ]
