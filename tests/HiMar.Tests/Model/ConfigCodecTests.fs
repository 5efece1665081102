/// Tests of ConfigCodec.fs: the one codec between HiMarConfig records and the reference's argument JSON.
module HiMar.Tests.ConfigCodecTests

open System.IO
open System.Text.Json.Nodes
open Expecto
open HiMar.Model
open HiMar.Runtime.Checkpoints
open HiMar.Tests.TestUtil
open TorchSharp

/// A config written as JSON text and read back through the config-file path (key and type checks included).
let private roundTrip (c: HiMarConfig) =
    let text = (ConfigCodec.toJson c).ToJsonString()
    ModelConfigs.FromJson((nonNull (JsonNode.Parse text)).AsObject(), "roundtrip.json")

/// A JSON value as a comparable string: numbers by value (the reference writes 4.0 where we write 4).
let private valueText (n: JsonNode) =
    match n.GetValueKind() with
    | System.Text.Json.JsonValueKind.Number ->
        let invariant = System.Globalization.CultureInfo.InvariantCulture
        (System.Double.Parse(n.ToJsonString(), invariant)).ToString invariant
    | _ -> n.ToJsonString()

/// Every key of a fixture's `model_config` that describes the model, with our JSON of the same model.
let private fixtureKeys (manifest: string) =
    let root = (nonNull (JsonNode.Parse(File.ReadAllText manifest))).AsObject()
    let args = (nonNull root["model_config"]).AsObject()
    let written = ConfigCodec.toJson (ModelConfigs.Resolve manifest)

    [
        for KeyValue(k, v) in args do
            if k <> "two_diffloss" && k <> "global_dm" then
                k,
                valueText (nonNull v),
                (if written.ContainsKey k then
                     valueText (nonNull written[k])
                 else
                     "absent")
    ]

[<Tests>]
let tests =
    testList
        "ConfigCodec"
        [
            test "every preset written as JSON reads back as an equal record" {
                for name, preset in HiMarConfig.presets do
                    Expect.equal (roundTrip preset) preset name
            }

            test "ablation variants and a text model with an external encoder round-trip too" {
                let variants =
                    [
                        HiMarConfig.withAblation PivotSource.NoPivots Phase2Head.Mlp false HiMarConfig.fashionSmall
                        HiMarConfig.withAblation
                            PivotSource.LowResTokens
                            Phase2Head.Transformer
                            true
                            HiMarConfig.fashion
                        { HiMarConfig.hiMarS with
                            Text.ExternalWidth = 32
                            Text.NullContext = NullContextKind.Learned
                        }
                    ]

                for v in variants do
                    Expect.equal (roundTrip v) v "round trip"
            }

            test "Hi-MAR-B writes exactly the reference's 31 arguments, in the reference's order" {
                let keys =
                    ConfigCodec.toJson HiMarConfig.hiMarB
                    |> Seq.map (fun kv -> kv.Key)
                    |> List.ofSeq

                Expect.equal keys.Length 31 "argument count"
                Expect.equal keys.Head "img_size" "first"
                Expect.equal (List.last keys) "step_stage2_rate" "last"
                Expect.equal keys[26] "head" "the Transformer head's heads keep the reference name"
            }

            test "a text model writes our text settings after the reference's arguments" {
                let json = ConfigCodec.toJson HiMarConfig.fashionText
                let keys = json |> Seq.map (fun kv -> kv.Key) |> List.ofSeq
                Expect.equal keys.Length 39 "31 reference arguments, mask_ratio and 7 text settings"

                Expect.equal
                    (keys |> List.skip 31)
                    [
                        "mask_ratio"
                        "conditioning"
                        "text_encoder"
                        "null_context"
                        "text_width"
                        "text_depth"
                        "text_heads"
                        "text_vocab"
                    ]
                    "order"

                Expect.equal
                    ((nonNull json["text_vocab"]).AsArray().Count)
                    HiMarConfig.fashionText.Text.Vocabulary.Length
                    "vocabulary"
            }

            test "the parity fixtures' model_config reads and writes key for key" {
                for manifest in
                    [
                        Path.Combine(tinyFixture, "manifest.json")
                        Path.Combine(genericFixture, "manifest.json")
                    ] do
                    for key, theirs, ours in fixtureKeys manifest do
                        Expect.equal ours theirs (sprintf "%s: %s" manifest key)
            }

            test "the argument kinds are the codec's arguments plus model and three reference-only switches" {
                Expect.equal ConfigCodec.argumentKinds.Count 47 "argument count"
                Expect.equal ConfigCodec.argumentKinds["head"] ArgumentKind.WholeNumber "head"
                Expect.equal ConfigCodec.argumentKinds["text_vocab"] ArgumentKind.Words "text_vocab"
                Expect.equal ConfigCodec.argumentKinds["global_dm"] ArgumentKind.Boolean "global_dm"
            }

            test "absent decoder settings follow the encoder's, as the reference's defaults do" {
                let args =
                    dict
                        [
                            "encoder_embed_dim", (256L :> obj)
                            "encoder_depth", (3L :> obj)
                            "encoder_num_heads", (4L :> obj)
                        ]

                let c =
                    ConfigCodec.fromReferenceArgs
                        HiMarConfig.hiMarB
                        (args |> System.Collections.ObjectModel.ReadOnlyDictionary)

                Expect.equal
                    (c.Backbone.DecoderWidth, c.Backbone.DecoderDepth, c.Backbone.DecoderHeads)
                    (256, 3, 4)
                    "decoder"
            }

            test "a wrong type names the field" {
                let args =
                    dict [ "gdm_w", (128.5 :> obj) ]
                    |> System.Collections.ObjectModel.ReadOnlyDictionary

                let e =
                    catchT<System.ArgumentException> (fun () ->
                        ConfigCodec.fromReferenceArgs HiMarConfig.hiMarB args |> ignore)

                Expect.equal e.Message "gdm_w must be a whole number, not 128.5" "message"
            }

            test "weights that do not fit raise one message naming every key" {
                let own =
                    dict [ "a", torch.zeros 2L; "b", torch.zeros 3L ]
                    |> System.Collections.ObjectModel.ReadOnlyDictionary

                let file =
                    dict [ "b", torch.zeros 4L; "c", torch.zeros 1L ]
                    |> System.Collections.ObjectModel.ReadOnlyDictionary

                let e = catchT<WeightMismatchException> (fun () -> Weights.requireFit own file)

                Expect.equal
                    e.Message
                    "the weights do not fit the model: 1 missing: a; 1 unexpected: c; 1 with other shapes: b (model [3], file [4])"
                    "message"
            }
        ]
