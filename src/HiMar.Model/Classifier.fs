namespace HiMar.Model

open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn

/// A small CNN for 28x28 grey images (Fashion-MNIST), the feature network of FD-FMNIST: two 3x3 convolutions
/// (32 and 64 channels, ReLU, 2x2 max-pooling), a 128-unit hidden layer whose activations are the features,
/// and a linear classifier. Input (B, 1, 28, 28) in [-1, 1].
type FashionClassifier(classes: int64) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("FashionClassifier")
    let conv1 = this.Child("conv1", Conv2d(1L, 32L, 3L, padding = 1L))
    let conv2 = this.Child("conv2", Conv2d(32L, 64L, 3L, padding = 1L))
    let fc1 = this.Child("fc1", Linear(64L * 7L * 7L, 128L))
    let fc2 = this.Child("fc2", Linear(128L, classes))

    let pool (x: torch.Tensor) = torch.nn.functional.max_pool2d (x, 2L)

    /// The penultimate features (B, 128): ReLU of the hidden layer.
    member _.Features(x: torch.Tensor) =
        use h1 = conv1.call x |> torch.nn.functional.relu |> pool
        use h2 = conv2.call h1 |> torch.nn.functional.relu |> pool
        // (B, 64, 7, 7) -> (B, 3136)
        use flat = h2.flatten (1L)
        fc1.call flat |> torch.nn.functional.relu

    /// Class logits (B, classes).
    override this.forward x =
        use f = this.Features x
        fc2.call (dropout 0.2 this.training f)
