/// Tests of the shipped models in models/ (src/HiMar.Runtime/Catalog/ShippedModels.cs): what they generate is
/// measured with the shipped classifier, through the same EvalJob as `himar eval`.
module HiMar.Tests.ShippedModelTests

open System.IO
open Expecto
open TorchSharp
open HiMar.Runtime.Catalog
open HiMar.Runtime.Checkpoints
open HiMar.Runtime.Evaluation
open HiMar.Runtime.Sampling
open HiMar.Tests.TestUtil

/// Class-balanced samples of the floor test: 10 per class.
let private floorImages = 100

/// The floors on the class accuracy of `floorImages` samples of each shipped model (seed 0, its sampling.json, fp32;
/// the text model prompted with the held-out templates, as `himar eval` does). The models shipped before these
/// tests scored 67% (`fashion`, N = 500) and 64% (`fashion-text`, N = 1000); the current ones score 96% and
/// 94% here, and the plain MAR model `fashion-mar` 99%. The draw is fixed (seed 0), so a number only moves with floating-point rounding between CPUs,
/// which changes a few samples at most; each floor sits 10 points (10 samples) below the measured value, several
/// times that.
let private floors = [ "fashion", 0.86; "fashion-text", 0.84; "fashion-mar", 0.89 ]

let private floorTest (name: string) (floor: float) =
    test
        $"models/{name}'s samples at N = 100 (seed 0, its sampling.json) are read as their class at least {floor * 100.0:F0}%% of the time" {
        withTempDir (fun dir ->
            let ckpt = ShippedModels.Find name
            use model = ReferenceImport.LoadModel(ckpt, true)
            let clfDir = ShippedModels.ClassifierDir
            use classifier = ClassifierRuns.Load clfDir

            let options =
                SamplerFlags().Over(SamplerDefaults.ForModel(ckpt, model.Config).Clipped())

            let result =
                EvalJob.Run(
                    model,
                    ckpt,
                    true,
                    classifier,
                    Path.Combine(clfDir, "train-stats.npz"),
                    floorImages,
                    options,
                    0L,
                    Path.Combine(dir, "eval")
                )

            let metrics = nonNull result.Report.["metrics"]
            let acc = (nonNull metrics.["class_accuracy"]).GetValue<float>()
            let images = (nonNull result.Report.["images"]).GetValue<int>()
            Expect.equal images floorImages "images"
            Expect.isGreaterThanOrEqual acc floor "class accuracy")
    }

let tests =
    testList "ShippedModels" [ for name, floor in floors -> floorTest name floor ]
