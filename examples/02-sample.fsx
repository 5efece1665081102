// Sampling from F# Interactive: load a model and a VAE, generate, look at the grid.
// Build first (`dotnet build -c Release`), then: dotnet fsi examples/02-sample.fsx
// With the published weights, import them once (`himar import checkpoint-last.pth --out hi-mar-b`,
// `himar import kl16.ckpt --out kl16`) and point the two paths below at those folders.
#r "../src/HiMar.Cli/bin/Release/net10.0/TorchSharp.dll"
#r "../src/HiMar.Cli/bin/Release/net10.0/HiMar.Model.dll"
#r "../src/HiMar.Cli/bin/Release/net10.0/HiMar.Runtime.dll"

open HiMar.Runtime.Checkpoints
open HiMar.Runtime.Sampling

HiMar.Runtime.Native.TorchNative.EnsureLoaded()

// The shared parity fixture: a tiny model with random-ish weights, so expect textures, not objects.
let fixture =
    System.IO.Path.Combine(__SOURCE_DIRECTORY__, "..", "..", "shared", "fixtures", "parity", "tiny")

let model =
    ReferenceImport.LoadModel(System.IO.Path.Combine(fixture, "checkpoint-last.pth"))

let vae = ReferenceImport.LoadVae(System.IO.Path.Combine(fixture, "vae.ckpt"))

let options =
    SamplerOptions(Cfg = 2.5, ReCfg = 2.7, MlpHeadSteps = "ddim10", DitHeadSteps = "ddim10")

let request =
    SampleRequest(
        Labels = ResizeArray [ 1L; 4L; 7L; 9L ],
        Seed = 0L,
        OutDir = "samples-fsi",
        Explain = true,
        Options = options
    )

let output = SampleJob.Run(model, HiMar.Runtime.Data.VaeTokenizer vae, request)
printfn "%d images in %.1f s; grid: %s" output.Images.Count output.Seconds output.Grid
