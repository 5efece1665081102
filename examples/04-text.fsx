// Text-to-image from F# Interactive: tokenise a caption, embed it, sample from the prompt.
// Build first (`dotnet build -c Release`), then: dotnet fsi examples/04-text.fsx
// It uses the shipped `fashion-text` model (Fashion-MNIST with captions, a built-in text encoder).
#r "../src/HiMar.Cli/bin/Release/net10.0/TorchSharp.dll"
#r "../src/HiMar.Cli/bin/Release/net10.0/HiMar.Model.dll"
#r "../src/HiMar.Cli/bin/Release/net10.0/HiMar.Runtime.dll"

open System.IO
open TorchSharp
open HiMar.Model
open HiMar.Runtime.Checkpoints
open HiMar.Runtime.Sampling
open HiMar.Runtime.Text

HiMar.Runtime.Native.TorchNative.EnsureLoaded()

let model =
    ReferenceImport.LoadModel(Path.Combine(__SOURCE_DIRECTORY__, "..", "models", "fashion-text"))

let config = model.Config

printfn
    "%d context tokens of width %d; %d words known"
    config.ContextLength
    config.Text.Width
    config.Text.Vocabulary.Length

// 1. Tokenise: lower-case words, each the id of its place in the vocabulary (0 pads to the context length).
let prompt = "a photo of an ankle boot"
printfn "%A" (WordVocabulary.words prompt)

match WordVocabulary.tryEncode config.Text.Vocabulary config.ContextLength prompt with
| Ok ids -> printfn "ids: %A" ids
| Error message -> printfn "%s" message

// A word the model never saw gets a message, not a crash.
match WordVocabulary.tryEncode config.Text.Vocabulary config.ContextLength "a red boot" with
| Ok _ -> ()
| Error message -> printfn "%s" (message.Substring(0, min 60 message.Length))

// 2. Embed: the built-in encoder gives one context vector per position (1, L, width); the model projects them to
//    its width and puts them where a class model keeps its class embedding.
let encoder = new ModelTextEncoder(model)
let context = encoder.Encode(ResizeArray [ prompt ])
printfn "context %A, mean norm %.2f" context.shape (context.norm(dim = -1).mean().item<float32> ())

// Captions that name the same thing in other words land close together; different garments further apart.
let cosine (a: string) (b: string) =
    use x = encoder.Encode(ResizeArray [ a; b ])
    use flat = x.flatten (1L)
    torch.nn.functional.cosine_similarity(flat.[0].unsqueeze 0L, flat.[1].unsqueeze 0L).item<float32> ()

printfn "boot vs ankle boot %.3f; boot vs handbag %.3f" (cosine "a boot" "an ankle boot") (cosine "a boot" "a handbag")

// 3. Sample: four images for each of three prompts, guided as the shipped settings say (sampling.json).
let options =
    SamplerOptions(Cfg = 3.0, ReCfg = 3.0, Temperature = 0.9, ClipDenoised = true)

let prompts =
    [
        for p in [ "a sandal"; "a pair of trousers"; "a handbag" ] do
            for _ in 1..4 -> p
    ]

let output =
    SampleJob.Run(
        model,
        HiMar.Runtime.Data.PixelPatchTokenizer.Fashion,
        SampleRequest(
            Prompts = ResizeArray prompts,
            Seed = 0L,
            OutDir = "samples-text-fsi",
            Columns = 4,
            Options = options
        )
    )

printfn "%d images in %.1f s; grid: %s" output.Images.Count output.Seconds output.Grid
