/// Runs every test list of the project.
module HiMar.Tests.Main

open System
open Expecto

[<EntryPoint>]
let main argv =
    HiMar.Runtime.Native.TorchNative.EnsureLoaded()
    // Sequenced: some tests build models on the meta device through TorchSharp's process-wide default device.
    // A log file (CI) gets plain lines: no colours, no spinner's cursor codes.
    let plain =
        if Console.IsOutputRedirected then
            [ CLIArguments.Colours 0; CLIArguments.No_Spinner ]
        else
            []

    Tests.runTestsWithCLIArgs
        (CLIArguments.Sequenced :: plain)
        argv
        (testList
            "HiMar"
            [
                NativeTests.tests
                DiffusionTests.tests
                MaskingTests.tests
                ModelTests.tests
                ModelTests.fileTests
                ParityTests.tests
                VaeTests.tests
                CheckpointTests.tests
                SamplingTests.tests
                ImportTests.tests
                TrainingTests.tests
                TrainingTests.cacheTests
                VaeTrainerTests.tests
                VaeTrainerTests.paddedTests
                ModelTraitsTests.tests
                EvaluationTests.tests
                ShippedModelTests.tests
                AblationTests.tests
                TextTests.tokenizerTests
                TextTests.modelTests
                TextTests.encoderTests
                TextToImageTests.tests
                InceptionTests.tests
                DistributedTests.tests
                PrecisionTests.tests
                ConfigCodecTests.tests
                HardeningTests.tests
                ReaderFuzzTests.tests
                ServeTests.tests
                BrowserTests.tests
                CliOptionsTests.tests
                ChartsTests.tests
            ])
