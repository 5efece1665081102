/// The flag -> options mapping behind `himar sample`, `eval`, `bench sample`, `ablation` and `train`: a model's
/// sampling.json merged with the flags in one place (SamplerDefaults / SamplerFlags), `--weights`, class names,
/// the training set-up's checks, and the help and progress the command line shows.
module HiMar.Tests.CliOptionsTests

open System
open System.IO
open System.Text.Json.Nodes
open Expecto
open HiMar.Model
open HiMar.Runtime
open HiMar.Runtime.Catalog
open HiMar.Runtime.Sampling
open HiMar.Tests.TestUtil

/// The shipped fashion model's folder and its sampling.json, read (not copied) so the tests follow the file.
let private fashionDir = Path.Combine(repoRoot, "models", "fashion")

let private shippedSampling =
    JsonNode.Parse(File.ReadAllText(Path.Combine(fashionDir, "sampling.json")))
    |> nonNull

let private shipped (key: string) =
    (nonNull shippedSampling.[key]).GetValue<double>()

let private badInput (f: unit -> 'T) =
    let e = catchT<BadInputException> (fun () -> f () |> ignore)
    e.Message


let tests =
    testList
        "CliOptions"
        [
            test
                "sample --preset fashion takes cfg, re_cfg, temperature, num_iter, head steps and clipping from its sampling.json" {
                let o =
                    SamplerFlags().Over(SamplerDefaults.ForModel(fashionDir, HiMarConfig.fashion))

                Expect.equal o.Cfg (shipped "cfg") "cfg"
                Expect.equal o.ReCfg (shipped "re_cfg") "re_cfg"
                Expect.equal o.Temperature (shipped "temperature") "temperature"
                Expect.equal o.Phase2Steps (int (shipped "num_iter")) "num_iter"
                Expect.isTrue o.ClipDenoised "clip_denoised"
                Expect.equal o.MlpHeadSteps (string (int (shipped "mlp_head_steps"))) "mlp_head_steps"
                Expect.equal o.DitHeadSteps (string (int (shipped "dit_head_steps"))) "dit_head_steps"
                Expect.equal o.Schedule CfgSchedule.Linear "linear schedule"
                Expect.isFalse o.ReCfgSchedule.HasValue "phase 1 follows --schedule"
            }

            test "sampling.json's head steps become the heads' respacing; a fraction or 0 is refused naming the file" {
                withTempDir (fun dir ->
                    let path = Path.Combine(dir, "sampling.json")
                    File.WriteAllText(path, """{"cfg": 2.0, "mlp_head_steps": 30}""")
                    let o = SamplerFlags().Over(SamplerDefaults.ForModel(dir, HiMarConfig.fashion))
                    Expect.equal o.MlpHeadSteps "30" "mlp_head_steps"
                    Expect.isNull o.DitHeadSteps "the model's own Transformer-head respacing"

                    let flagged =
                        SamplerFlags(MlpHeadSteps = "ddim5").Over(SamplerDefaults.ForModel(dir, HiMarConfig.fashion))

                    Expect.equal flagged.MlpHeadSteps "ddim5" "--mlp-steps wins"

                    for bad in [ "2.5"; "0" ] do
                        File.WriteAllText(path, $"""{{"dit_head_steps": {bad}}}""")

                        Expect.equal
                            (badInput (fun () -> SamplerDefaults.ForModel(dir, HiMarConfig.fashion)))
                            $"{path}: 'dit_head_steps' must be a whole number of steps from 1 to 1000, not {bad}."
                            bad)
            }

            test "the defaults name sampling.json as their source" {
                let d = SamplerDefaults.ForModel(fashionDir, HiMarConfig.fashion)
                Expect.equal d.Source (Path.Combine(fashionDir, "sampling.json")) "source"
            }

            test "explicit flags override the model's sampling.json, the rest still comes from it" {
                let flags =
                    SamplerFlags(
                        Cfg = Nullable 1.5,
                        Temperature = Nullable 0.7,
                        Phase1Steps = Nullable 3,
                        MlpHeadSteps = "ddim5",
                        Schedule = "constant",
                        ReSchedule = "linear",
                        Precision = Precision.Bf16
                    )

                let o = flags.Over(SamplerDefaults.ForModel(fashionDir, HiMarConfig.fashion))
                Expect.equal o.Cfg 1.5 "--cfg"
                Expect.equal o.Temperature 0.7 "--temperature"
                Expect.equal o.ReCfg (shipped "re_cfg") "re_cfg from sampling.json"
                Expect.equal o.Phase1Steps (Nullable 3) "--phase1-steps"
                Expect.equal o.MlpHeadSteps "ddim5" "--mlp-steps"
                Expect.equal o.Schedule CfgSchedule.Constant "--schedule"
                Expect.equal o.ReCfgSchedule (Nullable CfgSchedule.Linear) "--re-schedule"
                Expect.equal o.Precision Precision.Bf16 "precision"
            }

            test "--guidance no-phase2 turns phase-2 guidance off and keeps phase 1; off turns both off" {
                let d = SamplerDefaults.ForModel(fashionDir, HiMarConfig.fashion)
                let noPhase2 = SamplerFlags(Guidance = "no-phase2").Over d
                Expect.equal (noPhase2.Cfg, noPhase2.ReCfg) (1.0, shipped "re_cfg") "no-phase2"
                let off = SamplerFlags(Guidance = "OFF", Cfg = Nullable 5.0).Over d
                Expect.equal (off.Cfg, off.ReCfg) (1.0, 1.0) "off"
            }

            test "an unknown --guidance or --schedule is refused with the accepted values" {
                let d = SamplerDefaults.BuiltIn

                Expect.equal
                    (badInput (fun () -> SamplerFlags(Guidance = "half").Over d))
                    "--guidance must be full, no-phase2 or off, not 'half'"
                    "guidance"

                Expect.equal
                    (badInput (fun () -> SamplerFlags(ReSchedule = "cosine").Over d))
                    "--re-schedule must be linear or constant, not 'cosine'"
                    "schedule"
            }

            test "a folder without sampling.json samples unguided at temperature 1, clipping only pixel-space models" {
                withTempDir (fun dir ->
                    let pixel = SamplerFlags().Over(SamplerDefaults.ForModel(dir, HiMarConfig.fashion))
                    Expect.equal (pixel.Cfg, pixel.ReCfg, pixel.Temperature) (1.0, 1.0, 1.0) "built-in guidance"
                    Expect.equal pixel.Phase2Steps 4 "built-in phase-2 steps"
                    Expect.isTrue pixel.ClipDenoised "pixel patches clip"

                    let latent = SamplerDefaults.ForModel(dir, HiMarConfig.hiMarB)
                    Expect.isFalse latent.ClipDenoised "VAE latents do not clip"
                    Expect.equal latent.Source "built-in" "source"
                    Expect.isTrue (SamplerFlags(Clip = true).Over(latent).ClipDenoised) "--clip turns it on")
            }

            test "a .pth file has no sampling.json: the built-in defaults apply" {
                let d =
                    SamplerDefaults.ForModel(Path.Combine(fashionDir, "weights.safetensors"), HiMarConfig.hiMarB)

                Expect.equal (d.Cfg, d.Temperature, d.Phase2Steps) (1.0, 1.0, 4) "built-in"
            }

            test "bench sample and the ablation have their own fixed defaults" {
                let b = SamplerFlags().Over SamplerDefaults.Benchmark
                Expect.equal (b.Cfg, b.ReCfg, b.MlpHeadSteps, b.DitHeadSteps) (2.5, 2.7, "ddim10", "ddim10") "bench"
                let a = SamplerFlags(Cfg = Nullable 2.0).Over SamplerDefaults.Ablation
                Expect.equal (a.Cfg, a.ReCfg, a.Temperature, a.MlpHeadSteps) (2.0, 3.0, 0.9, "25") "ablation"
                Expect.isTrue a.ClipDenoised "the ablation clips"
            }

            test "--weights takes ema (the default) or model in any case, and refuses anything else" {
                Expect.isTrue (WeightsChoice.UseEma null) "default"
                Expect.isTrue (WeightsChoice.UseEma "EMA") "ema"
                Expect.isFalse (WeightsChoice.UseEma " model ") "model"

                Expect.equal
                    (badInput (fun () -> WeightsChoice.UseEma "foo"))
                    "--weights: 'foo' is not a choice of weights; give ema or model."
                    "foo"
            }

            test "class names are read in any case and spelling; numbers still work" {
                let labels =
                    ModelTraits.ParseClasses(HiMarConfig.fashion, "sneaker, Ankle boot,ankle-boot,T-shirt,top,3")

                Expect.equal (List.ofArray labels) [ 7L; 9L; 9L; 0L; 0L; 3L ] "labels"
            }

            test "an unknown class lists the valid ones in one line" {
                Expect.equal
                    (badInput (fun () -> ModelTraits.ParseClasses(HiMarConfig.fashion, "7,zebra")))
                    "--classes: 'zebra' is not a class of this model; give a number 0..9 or a name: t-shirt/top, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, ankle boot."
                    "zebra"

                Expect.equal
                    (badInput (fun () -> ModelTraits.ParseClasses(HiMarConfig.fashion, "10")))
                    "--classes: '10' is not a class of this model; give a number 0..9 or a name: t-shirt/top, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, ankle boot."
                    "10"
            }

            test "a model without class names takes numbers only" {
                Expect.equal
                    (List.ofArray (ModelTraits.ParseClasses(HiMarConfig.hiMarB, "207,974")))
                    [ 207L; 974L ]
                    "ok"

                Expect.equal
                    (badInput (fun () -> ModelTraits.ParseClasses(HiMarConfig.hiMarB, "sneaker")))
                    "--classes: 'sneaker' is not a class of this model; give a number 0..999."
                    "no names"
            }

            test "the pixel-patch rule and the tokenizer a config needs" {
                Expect.isTrue (ModelTraits.UsesPixelPatches HiMarConfig.fashion) "fashion"
                Expect.isTrue (ModelTraits.IsFashionMnist HiMarConfig.fashionSmall) "fashion-small"
                Expect.isFalse (ModelTraits.UsesPixelPatches HiMarConfig.hiMarB) "hi-mar-b"
                Expect.isNull (ModelTraits.BuiltinTokenizer HiMarConfig.hiMarB) "hi-mar-b needs a VAE"
                Expect.isNotNull (ModelTraits.BuiltinTokenizer HiMarConfig.fashion) "fashion decodes itself"
                Expect.equal (ModelTraits.LabelText(HiMarConfig.fashion, 7L)) "sneaker" "named"
                Expect.equal (ModelTraits.LabelText(HiMarConfig.hiMarB, 7L)) "class 7" "numbered"
            }

            test "the shipped models are found by name; the classifier is not one of them" {
                Expect.equal (List.ofSeq (ShippedModels.Names())) [ "fashion"; "fashion-mar"; "fashion-text" ] "names"
                Expect.stringEnds (ShippedModels.Find "Fashion") (Path.Combine("models", "fashion")) "found"

                Expect.equal
                    (badInput (fun () -> ShippedModels.Find "fashion-classifier"))
                    "--preset: no shipped model 'fashion-classifier' (shipped: fashion, fashion-mar, fashion-text)"
                    "classifier"
            }

            test "training on IDX data refuses a config that is not pixel patches, naming --cache and --vae" {
                withTempDir (fun dir ->
                    let message =
                        badInput (fun () ->
                            Training.TrainingSetup.Create(
                                HiMarConfig.hiMarB,
                                Training.TrainingData(),
                                Training.TrainOptions(OutDir = dir),
                                false,
                                Distributed.SingleProcess.Instance
                            ))

                    Expect.stringContains message "pass --cache and --vae" "names the flags")
            }

            test "sample --preset fashion with no class flags makes six images of every class, six columns" {
                let c = SampleConditions.Resolve(HiMarConfig.fashion, SampleAsk(Shipped = true))
                Expect.equal c.Count 60 "images"
                Expect.equal (c.Labels |> Seq.distinct |> List.ofSeq) [ 0L .. 9L ] "every class in order"
                Expect.equal c.Columns 6 "columns"
                Expect.isNull c.Prompts "no captions"
            }

            test "--classes with --per-class repeats each class; without a preset the grid is square-ish" {
                let c =
                    SampleConditions.Resolve(
                        HiMarConfig.fashion,
                        SampleAsk(Classes = "sneaker,2", PerClass = Nullable 2)
                    )

                Expect.equal (List.ofSeq c.Labels) [ 7L; 7L; 2L; 2L ] "labels"
                Expect.equal c.Columns 0 "square-ish"
            }

            test "a shipped text model without --prompt gets one caption per class; --prompt gets 8 images each" {
                let shown =
                    SampleConditions.Resolve(HiMarConfig.fashionText, SampleAsk(Shipped = true))

                Expect.equal (nonNull shown.Prompts).Count 60 "6 x 10 captions"
                Expect.isEmpty shown.Labels "no labels"

                let asked =
                    SampleConditions.Resolve(
                        HiMarConfig.fashionText,
                        SampleAsk(Shipped = true, Prompts = ResizeArray [ "a sandal" ])
                    )

                Expect.equal (List.ofSeq (nonNull asked.Prompts)) (List.replicate 8 "a sandal") "8 of the caption"
            }

            test "class flags on a text model, captions on a class model and --unconditional with classes are refused" {
                Expect.equal
                    (badInput (fun () ->
                        SampleConditions.Resolve(HiMarConfig.fashion, SampleAsk(Prompts = ResizeArray [ "a bag" ]))))
                    "this model is conditioned on class labels, not captions: use --classes or --n"
                    "captions on a class model"

                Expect.equal
                    (badInput (fun () ->
                        SampleConditions.Resolve(HiMarConfig.fashion, SampleAsk(Unconditional = true, Classes = "1"))))
                    "--unconditional samples the null condition: give it without --prompt or --classes"
                    "unconditional with classes"

                Expect.stringContains
                    (badInput (fun () -> SampleConditions.Resolve(HiMarConfig.fashionText, SampleAsk())))
                    "give a caption with --prompt"
                    "text model without a caption"
            }

            test "sample --help states the defaults a preset uses and where they come from" {
                let { Code = code; Out = out } = himar [ "sample"; "--help" ]
                Expect.equal code 0 "help succeeds"

                let flat =
                    String.Join(" ", out.Split([| ' '; '\n' |], StringSplitOptions.RemoveEmptyEntries))

                Expect.stringContains flat "images per class (default 6 with --preset, else 1)" "--per-class"
                Expect.stringContains flat "auto (default), fp32 or bf16" "--precision"

                Expect.stringContains
                    flat
                    "(default: the model's sampling.json, 7 for the shipped models; 1 without one)"
                    "--cfg"

                Expect.stringContains flat "(default: <preset>.png with --preset, else samples/)" "--out"

                Expect.stringContains
                    flat
                    "(default: the model's sampling.json, 100 for the shipped models; without one, the model's num_sampling_steps)"
                    "--mlp-steps"

                Expect.isFalse (flat.Contains "cond_scale") "no jargon"
            }

            test
                "help lists what the commands accept: bench sample names fashion, info the shipped models, train --device" {
                let bench = (himar [ "bench"; "sample"; "--help" ]).Out
                Expect.stringContains bench "fashion" "bench sample"
                let info = (himar [ "info"; "--help" ]).Out
                Expect.stringContains info "fashion-text" "info --model"
                let train = (himar [ "train"; "--help" ]).Out
                Expect.stringContains train "--device <device>" "train --device"
            }

            test "himar sample --weights foo is refused with exit code 2" {
                let { Code = code; Err = err } =
                    himar [ "sample"; "--preset"; "fashion"; "--weights"; "foo" ]

                Expect.equal code 2 "exit code"

                Expect.equal
                    (err.Trim())
                    "himar: --weights: 'foo' is not a choice of weights; give ema or model."
                    "message"
            }

            test "himar train --device cuda is refused in one line (CPU training only)" {
                let { Code = code; Err = err } = himar [ "train"; "--device"; "cuda" ]
                Expect.isTrue (code = 2 || code = 3) "bad input, or no CUDA device here"
                Expect.equal (err.Trim().Split('\n').Length) 1 "one line"
            }

            test "sample progress written to a pipe is plain lines that count images and reach 100%" {
                withTempDir (fun dir ->
                    let grid = Path.Combine(dir, "g.png")

                    let { Code = code; Out = out; Err = err } =
                        himar
                            [
                                "sample"
                                "--preset"
                                "fashion"
                                "--classes"
                                "sneaker,bag"
                                "--per-class"
                                "1"
                                "--batch"
                                "1"
                                "--phase1-steps"
                                "1"
                                "--num-iter"
                                "1"
                                "--mlp-steps"
                                "2"
                                "--dit-steps"
                                "2"
                                "-o"
                                grid
                            ]

                    Expect.equal code 0 (sprintf "sample succeeds: %s" err)
                    Expect.isFalse (out.Contains "\u001b") "no ANSI codes"
                    Expect.isFalse (out.Contains "\r") "no carriage returns"
                    let lines = out.Split('\n', StringSplitOptions.RemoveEmptyEntries)

                    Expect.equal
                        (lines
                         |> Array.filter (fun l -> l.StartsWith "sampling 2 images")
                         |> List.ofArray)
                        [
                            "sampling 2 images: 0/2 (0%)"
                            "sampling 2 images: 1/2 (50%)"
                            "sampling 2 images: 2/2 (100%)"
                        ]
                        "one line per tenth, real units, 100% at the end"

                    // The default precision is auto: one line says what it picked and what it found on the CPU.
                    let picked =
                        lines |> Array.filter (fun l -> l.StartsWith "precision ") |> List.ofArray

                    let bf16Cpu =
                        HiMar.Runtime.Native.Precisions
                            .Decide(HiMar.Runtime.Native.PrecisionChoice.Auto, TorchSharp.torch.CPU)
                            .Name = "bf16"

                    Expect.equal picked.Length 1 "one precision line"

                    Expect.stringStarts
                        picked.Head
                        (if bf16Cpu then
                             "precision bf16 (auto; cpu: "
                         else
                             "precision fp32 (auto; cpu: ")
                        "the auto line"

                    Expect.isTrue (File.Exists grid) "the grid")
            }
        ]
