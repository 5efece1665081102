namespace HiMar.Model

open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn

/// The pooling and chaining helpers of the Inception blocks.
module internal InceptionOps =
    /// Applies the layers in order, disposing every intermediate result (never the input).
    let through (layers: Module<torch.Tensor, torch.Tensor> list) (x: torch.Tensor) =
        let step (t: torch.Tensor, owned: bool) (layer: Module<torch.Tensor, torch.Tensor>) =
            let y = layer.call t

            if owned then
                t.Dispose()

            y, true

        match layers |> List.fold step (x, false) with
        | y, true -> y
        | y, false -> y.alias ()

    /// Concatenates the branch outputs along channels and disposes them.
    let catChannels (parts: torch.Tensor list) =
        let joined = torch.cat (Array.ofList parts, 1L)

        for p in parts do
            p.Dispose()

        joined

    /// 3x3 average pooling, stride 1, padding 1, averaging only the real pixels (TensorFlow's border rule:
    /// `count_include_pad=False`, the patch pytorch-fid applies to blocks A, C and E_1).
    let avgPoolSame (x: torch.Tensor) =
        torch.nn.functional.avg_pool2d (x, 3L, stride = 1L, padding = 1L, count_include_pad = false)

    /// 3x3 max pooling, stride 1, padding 1 (pytorch-fid's patch of the last block, E_2).
    let maxPoolSame (x: torch.Tensor) =
        torch.nn.functional.max_pool2d (x, 3L, stride = 1L, padding = 1L)

    /// 3x3 max pooling with stride 2 and no padding (the stem's maxpool1/2 and the reduction blocks B and D).
    let maxPoolReduce (x: torch.Tensor) =
        torch.nn.functional.max_pool2d (x, 3L, stride = 2L)

/// torchvision `BasicConv2d` (models/inception.py): a bias-free convolution, BatchNorm with eps 0.001 and ReLU
/// (keys `conv.weight`, `bn.{weight,bias,running_mean,running_var,num_batches_tracked}`).
type BasicConv2d
    (
        inChannels: int64,
        outChannels: int64,
        kernel: struct (int64 * int64),
        stride: int64,
        padding: struct (int64 * int64)
    ) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("BasicConv2d")

    let conv =
        this.Child(
            "conv",
            Conv2d(inChannels, outChannels, kernel, stride = struct (stride, stride), padding = padding, bias = false)
        )

    let bn = this.Child("bn", BatchNorm2d(outChannels, eps = 0.001))

    /// A square kernel with equal padding on every side.
    new(inChannels, outChannels, kernel: int64, ?stride: int64, ?padding: int64) =
        let p = defaultArg padding 0L
        new BasicConv2d(inChannels, outChannels, struct (kernel, kernel), defaultArg stride 1L, struct (p, p))

    override _.forward x =
        use c = conv.call x
        use n = bn.call c
        torch.nn.functional.relu n

/// pytorch-fid `FIDInceptionA` (torchvision `InceptionA` with TensorFlow's average pooling): 1x1, 5x5 and
/// double-3x3 branches and a pooled 1x1 branch of `poolFeatures` channels; out 224 + poolFeatures channels.
type FIDInceptionA(inChannels: int64, poolFeatures: int64) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("FIDInceptionA")
    let branch1x1 = this.Child("branch1x1", new BasicConv2d(inChannels, 64L, 1L))
    let branch5x5_1 = this.Child("branch5x5_1", new BasicConv2d(inChannels, 48L, 1L))

    let branch5x5_2 =
        this.Child("branch5x5_2", new BasicConv2d(48L, 64L, 5L, padding = 2L))

    let branch3x3dbl_1 =
        this.Child("branch3x3dbl_1", new BasicConv2d(inChannels, 64L, 1L))

    let branch3x3dbl_2 =
        this.Child("branch3x3dbl_2", new BasicConv2d(64L, 96L, 3L, padding = 1L))

    let branch3x3dbl_3 =
        this.Child("branch3x3dbl_3", new BasicConv2d(96L, 96L, 3L, padding = 1L))

    let branch_pool =
        this.Child("branch_pool", new BasicConv2d(inChannels, poolFeatures, 1L))

    override _.forward x =
        use pooled = InceptionOps.avgPoolSame x

        InceptionOps.catChannels
            [
                branch1x1.call x
                InceptionOps.through [ branch5x5_1; branch5x5_2 ] x
                InceptionOps.through [ branch3x3dbl_1; branch3x3dbl_2; branch3x3dbl_3 ] x
                branch_pool.call pooled
            ]

/// torchvision `InceptionB` (unpatched in pytorch-fid): the 35 -> 17 grid reduction, a strided 3x3, a strided
/// double 3x3 and a strided max pool; out 384 + 96 + inChannels channels.
type InceptionB(inChannels: int64) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("InceptionB")

    let branch3x3 =
        this.Child("branch3x3", new BasicConv2d(inChannels, 384L, 3L, stride = 2L))

    let branch3x3dbl_1 =
        this.Child("branch3x3dbl_1", new BasicConv2d(inChannels, 64L, 1L))

    let branch3x3dbl_2 =
        this.Child("branch3x3dbl_2", new BasicConv2d(64L, 96L, 3L, padding = 1L))

    let branch3x3dbl_3 =
        this.Child("branch3x3dbl_3", new BasicConv2d(96L, 96L, 3L, stride = 2L))

    override _.forward x =
        InceptionOps.catChannels
            [
                branch3x3.call x
                InceptionOps.through [ branch3x3dbl_1; branch3x3dbl_2; branch3x3dbl_3 ] x
                InceptionOps.maxPoolReduce x
            ]

/// pytorch-fid `FIDInceptionC` (torchvision `InceptionC` with TensorFlow's average pooling): factorised 7x7
/// branches of `channels7x7` inner channels; out 768 channels.
type FIDInceptionC(inChannels: int64, channels7x7: int64) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("FIDInceptionC")
    let c7 = channels7x7

    let row (cin: int64) (cout: int64) =
        new BasicConv2d(cin, cout, struct (1L, 7L), 1L, struct (0L, 3L))

    let col (cin: int64) (cout: int64) =
        new BasicConv2d(cin, cout, struct (7L, 1L), 1L, struct (3L, 0L))

    let branch1x1 = this.Child("branch1x1", new BasicConv2d(inChannels, 192L, 1L))
    let branch7x7_1 = this.Child("branch7x7_1", new BasicConv2d(inChannels, c7, 1L))
    let branch7x7_2 = this.Child("branch7x7_2", row c7 c7)
    let branch7x7_3 = this.Child("branch7x7_3", col c7 192L)

    let branch7x7dbl_1 =
        this.Child("branch7x7dbl_1", new BasicConv2d(inChannels, c7, 1L))

    let branch7x7dbl_2 = this.Child("branch7x7dbl_2", col c7 c7)
    let branch7x7dbl_3 = this.Child("branch7x7dbl_3", row c7 c7)
    let branch7x7dbl_4 = this.Child("branch7x7dbl_4", col c7 c7)
    let branch7x7dbl_5 = this.Child("branch7x7dbl_5", row c7 192L)
    let branch_pool = this.Child("branch_pool", new BasicConv2d(inChannels, 192L, 1L))

    override _.forward x =
        use pooled = InceptionOps.avgPoolSame x

        InceptionOps.catChannels
            [
                branch1x1.call x
                InceptionOps.through [ branch7x7_1; branch7x7_2; branch7x7_3 ] x
                InceptionOps.through
                    [
                        branch7x7dbl_1
                        branch7x7dbl_2
                        branch7x7dbl_3
                        branch7x7dbl_4
                        branch7x7dbl_5
                    ]
                    x
                branch_pool.call pooled
            ]

/// torchvision `InceptionD` (unpatched in pytorch-fid): the 17 -> 8 grid reduction; out 320 + 192 + inChannels.
type InceptionD(inChannels: int64) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("InceptionD")
    let branch3x3_1 = this.Child("branch3x3_1", new BasicConv2d(inChannels, 192L, 1L))

    let branch3x3_2 =
        this.Child("branch3x3_2", new BasicConv2d(192L, 320L, 3L, stride = 2L))

    let branch7x7x3_1 =
        this.Child("branch7x7x3_1", new BasicConv2d(inChannels, 192L, 1L))

    let branch7x7x3_2 =
        this.Child("branch7x7x3_2", new BasicConv2d(192L, 192L, struct (1L, 7L), 1L, struct (0L, 3L)))

    let branch7x7x3_3 =
        this.Child("branch7x7x3_3", new BasicConv2d(192L, 192L, struct (7L, 1L), 1L, struct (3L, 0L)))

    let branch7x7x3_4 =
        this.Child("branch7x7x3_4", new BasicConv2d(192L, 192L, 3L, stride = 2L))

    override _.forward x =
        InceptionOps.catChannels
            [
                InceptionOps.through [ branch3x3_1; branch3x3_2 ] x
                InceptionOps.through [ branch7x7x3_1; branch7x7x3_2; branch7x7x3_3; branch7x7x3_4 ] x
                InceptionOps.maxPoolReduce x
            ]

/// torchvision `InceptionE`, the 8x8 block with split 1x3/3x1 branches (out 320 + 768 + 768 + 192 = 2048
/// channels); its pooling branch differs between pytorch-fid's two patched copies, so it is a parameter here.
[<AbstractClass>]
type InceptionE(name: string, inChannels: int64, pool: torch.Tensor -> torch.Tensor) as this =
    inherit Layer<torch.Tensor, torch.Tensor>(name)

    let row (cin: int64) (cout: int64) =
        new BasicConv2d(cin, cout, struct (1L, 3L), 1L, struct (0L, 1L))

    let col (cin: int64) (cout: int64) =
        new BasicConv2d(cin, cout, struct (3L, 1L), 1L, struct (1L, 0L))

    let branch1x1 = this.Child("branch1x1", new BasicConv2d(inChannels, 320L, 1L))
    let branch3x3_1 = this.Child("branch3x3_1", new BasicConv2d(inChannels, 384L, 1L))
    let branch3x3_2a = this.Child("branch3x3_2a", row 384L 384L)
    let branch3x3_2b = this.Child("branch3x3_2b", col 384L 384L)

    let branch3x3dbl_1 =
        this.Child("branch3x3dbl_1", new BasicConv2d(inChannels, 448L, 1L))

    let branch3x3dbl_2 =
        this.Child("branch3x3dbl_2", new BasicConv2d(448L, 384L, 3L, padding = 1L))

    let branch3x3dbl_3a = this.Child("branch3x3dbl_3a", row 384L 384L)
    let branch3x3dbl_3b = this.Child("branch3x3dbl_3b", col 384L 384L)
    let branch_pool = this.Child("branch_pool", new BasicConv2d(inChannels, 192L, 1L))

    override _.forward x =
        use b3 = branch3x3_1.call x
        use bd = InceptionOps.through [ branch3x3dbl_1; branch3x3dbl_2 ] x
        use pooled = pool x

        InceptionOps.catChannels
            [
                branch1x1.call x
                branch3x3_2a.call b3
                branch3x3_2b.call b3
                branch3x3dbl_3a.call bd
                branch3x3dbl_3b.call bd
                branch_pool.call pooled
            ]

/// pytorch-fid `FIDInceptionE_1` (Mixed_7b): average pooling that ignores the zero padding.
type FIDInceptionE_1(inChannels: int64) =
    inherit InceptionE("FIDInceptionE_1", inChannels, InceptionOps.avgPoolSame)

/// pytorch-fid `FIDInceptionE_2` (Mixed_7c): max pooling in the pooling branch, as the TensorFlow graph has it
/// (other Inception models average there).
type FIDInceptionE_2(inChannels: int64) =
    inherit InceptionE("FIDInceptionE_2", inChannels, InceptionOps.maxPoolSame)

/// The FID Inception network of pytorch-fid (src/pytorch_fid/inception.py `fid_inception_v3`): torchvision's
/// `Inception3` without the auxiliary head, with a 1008-way `fc` and the FID-patched blocks, i.e. the TensorFlow
/// graph of 2015-12-05 that FID, IS and precision/recall are defined with. Its keys are those of the published
/// `pt_inception-2015-12-05-6726825d.pth` (`Conv2d_1a_3x3.conv.weight`, `Mixed_7c.branch_pool.bn.running_var`,
/// `fc.bias`, ...), not the `blocks.*` of pytorch-fid's wrapper class.
/// Images go in as (B, 3, H, W) RGB in [0, 1] (pytorch-fid's convention); they are resized to
/// `inputSize` x `inputSize` (299 for comparable numbers; smaller only in tests) and mapped to [-1, 1] inside.
type InceptionV3(inputSize: int64) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("InceptionV3")

    let Conv2d_1a_3x3 =
        this.Child("Conv2d_1a_3x3", new BasicConv2d(3L, 32L, 3L, stride = 2L))

    let Conv2d_2a_3x3 = this.Child("Conv2d_2a_3x3", new BasicConv2d(32L, 32L, 3L))

    let Conv2d_2b_3x3 =
        this.Child("Conv2d_2b_3x3", new BasicConv2d(32L, 64L, 3L, padding = 1L))

    let Conv2d_3b_1x1 = this.Child("Conv2d_3b_1x1", new BasicConv2d(64L, 80L, 1L))
    let Conv2d_4a_3x3 = this.Child("Conv2d_4a_3x3", new BasicConv2d(80L, 192L, 3L))
    let Mixed_5b = this.Child("Mixed_5b", new FIDInceptionA(192L, 32L))
    let Mixed_5c = this.Child("Mixed_5c", new FIDInceptionA(256L, 64L))
    let Mixed_5d = this.Child("Mixed_5d", new FIDInceptionA(288L, 64L))
    let Mixed_6a = this.Child("Mixed_6a", new InceptionB(288L))
    let Mixed_6b = this.Child("Mixed_6b", new FIDInceptionC(768L, 128L))
    let Mixed_6c = this.Child("Mixed_6c", new FIDInceptionC(768L, 160L))
    let Mixed_6d = this.Child("Mixed_6d", new FIDInceptionC(768L, 160L))
    let Mixed_6e = this.Child("Mixed_6e", new FIDInceptionC(768L, 192L))
    let Mixed_7a = this.Child("Mixed_7a", new InceptionD(768L))
    let Mixed_7b = this.Child("Mixed_7b", new FIDInceptionE_1(1280L))
    let Mixed_7c = this.Child("Mixed_7c", new FIDInceptionE_2(2048L))
    let fc = this.Child("fc", Linear(2048L, 1008L))

    /// The network at pytorch-fid's input size, 299.
    new() = new InceptionV3(299L)

    /// The side images are resized to before the network.
    member _.InputSize = inputSize

    /// Resizes (B, C, H, W) to (B, C, size, size) as pytorch-fid does: bilinear, `align_corners=False` (half-pixel
    /// centres), no antialiasing. An input already at that size comes back unchanged (as a new handle).
    static member Resize(images: torch.Tensor, size: int64) =
        if images.shape.[2] = size && images.shape.[3] = size then
            images.alias ()
        else
            torch.nn.functional.interpolate (
                images,
                size = [| size; size |],
                mode = torch.InterpolationMode.Bilinear,
                align_corners = false
            )

    /// The 2048-d pool3 features (B, 2048) of images (B, 3, H, W) in [0, 1]: the FID and precision/recall space.
    member _.Features(images: torch.Tensor) =
        use resized = InceptionV3.Resize(images, inputSize)
        use doubled = resized * 2.0
        // [0, 1] -> [-1, 1], the range the TensorFlow weights expect.
        use x = doubled - 1.0

        use stem1 = InceptionOps.through [ Conv2d_1a_3x3; Conv2d_2a_3x3; Conv2d_2b_3x3 ] x // (B, 64, 147, 147) at 299
        use pool1 = InceptionOps.maxPoolReduce stem1 // (B, 64, 73, 73)
        use stem2 = InceptionOps.through [ Conv2d_3b_1x1; Conv2d_4a_3x3 ] pool1 // (B, 192, 71, 71)
        use pool2 = InceptionOps.maxPoolReduce stem2 // (B, 192, 35, 35)

        use grid =
            InceptionOps.through
                [
                    Mixed_5b // (B, 256, 35, 35)
                    Mixed_5c // (B, 288, 35, 35)
                    Mixed_5d // (B, 288, 35, 35)
                    Mixed_6a // (B, 768, 17, 17)
                    Mixed_6b
                    Mixed_6c
                    Mixed_6d
                    Mixed_6e // (B, 768, 17, 17)
                    Mixed_7a // (B, 1280, 8, 8)
                    Mixed_7b // (B, 2048, 8, 8)
                    Mixed_7c // (B, 2048, 8, 8)
                ]
                pool2

        use pooled = torch.nn.functional.adaptive_avg_pool2d (grid, 1L)
        // (B, 2048, 1, 1) -> (B, 2048)
        pooled.flatten 1L

    /// The logits the Inception Score is computed from, (B, 1008): features times `fc.weight` without the bias,
    /// over all 1008 outputs, as torch-fidelity (`logits_unbiased`) and the guided-diffusion evaluator (the
    /// graph's `softmax/logits/MatMul` weights) both do.
    member _.ScoreLogits(features: torch.Tensor) = features.matmul (fc.weight.t ())

    /// The network's own 1008 logits (B, 1008) of images in [0, 1]: `fc` with its bias.
    override this.forward images =
        use f = this.Features images
        fc.call f
