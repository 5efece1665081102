// Hello, tensors: the first FSI session with HiMarFunctional.
// Build once (`dotnet build -c Release`), then run: dotnet fsi examples/00-hello-tensors.fsx
// The build folder of the `himar` command holds TorchSharp, libtorch and the patched glue library.
#r "../src/HiMar.Cli/bin/Release/net10.0/TorchSharp.dll"
#r "../src/HiMar.Cli/bin/Release/net10.0/HiMar.Runtime.dll"

open TorchSharp
open HiMar.Runtime.Native

// Load libtorch, or stop with one sentence saying why it cannot load.
TorchNative.EnsureLoaded()
let engine = TorchNative.Describe()
printfn "TorchSharp %s, libtorch %s, %d threads" engine.TorchSharpVersion engine.LibTorchVersion engine.Threads

// A matrix product whose answer you can check by hand.
let a = torch.tensor([| 1.0f; 2.0f; 3.0f; 4.0f |]).reshape (2L, 2L)
let b = torch.tensor([| 5.0f; 6.0f; 7.0f; 8.0f |]).reshape (2L, 2L)
let c = torch.matmul (a, b)
printfn "[[1,2],[3,4]] @ [[5,6],[7,8]] = %A" (c.data<float32>().ToArray())

// Autograd: d/dw sum((w x - y)^2) = 2 (w x - y) x.
let w = torch.tensor ([| 1.0; 2.0 |], requires_grad = true)
let x = torch.tensor [| 3.0; 4.0 |]
let y = torch.tensor [| 2.0; 10.0 |]
let loss = (w * x - y).square().sum ()
loss.backward ()
printfn "loss = %g, gradient = %A (expected [6, -16])" (loss.item<float> ()) (w.grad.data<float>().ToArray())

// How fast is this machine at fp32 matrix work?
printfn "matmul: %.1f GFLOP/s" (TorchNative.MatmulGflops(1.0))
