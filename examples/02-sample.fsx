// Sampling from F# Interactive: the shipped Fashion-MNIST model (models/fashion, trained here), every class, with
// a strip per image that shows both phases step by step. Build first (`dotnet build -c Release`), then:
//   dotnet fsi examples/02-sample.fsx
// With the published weights, import them once (`himar import checkpoint-last.pth --out hi-mar-b`,
// `himar import kl16.ckpt --out kl16`), load them with ReferenceImport.LoadModel "hi-mar-b" and decode with
// VaeTokenizer(ReferenceImport.LoadVae "kl16") instead of the pixel patches below.
#r "../src/HiMar.Cli/bin/Release/net10.0/TorchSharp.dll"
#r "../src/HiMar.Cli/bin/Release/net10.0/HiMar.Model.dll"
#r "../src/HiMar.Cli/bin/Release/net10.0/HiMar.Runtime.dll"

open HiMar.Runtime.Catalog
open HiMar.Runtime.Checkpoints
open HiMar.Runtime.Sampling

HiMar.Runtime.Native.TorchNative.EnsureLoaded()

// The shipped model: config.json, weights.safetensors and sampling.json (its recommended guidance and temperature).
let modelDir =
    System.IO.Path.Combine(__SOURCE_DIRECTORY__, "..", "models", "fashion")

let model = ReferenceImport.LoadModel modelDir

// Its tokens are 4x4 pixel patches: no VAE to load (ModelTraits knows which models decode themselves).
let tokenizer = ModelTraits.BuiltinTokenizer model.Config

// The model's recommended settings (sampling.json) with nothing overridden: what `himar sample --preset fashion`
// uses. Set a field of SamplerFlags (Cfg = Nullable 1.5, ...) to override one, as a flag does.
let options = SamplerFlags().Over(SamplerDefaults.ForModel(modelDir, model.Config))

printfn "sampling with %O" (SamplerSettings.Describe(options, model.Config))

let request =
    SampleRequest(
        Labels =
            ModelTraits.ParseClasses(
                model.Config,
                "t-shirt,trouser,pullover,dress,coat,sandal,shirt,sneaker,bag,ankle boot"
            ),
        ClassNames = ModelTraits.ClassNames model.Config,
        Columns = 5,
        Seed = 0L,
        OutDir = "samples-fsi",
        Explain = true,
        Options = options
    )

let output = SampleJob.Run(model, tokenizer, request)

printfn "%d images in %.1f s; grid: %s" output.Images.Count output.Seconds output.Grid
printfn "strips (the pivots after every phase-1 step, then every dense step; decided tokens outlined):"

for strip in output.Explanations do
    printfn "  %s" strip
