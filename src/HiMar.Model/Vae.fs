namespace HiMar.Model

open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn

/// The settings of the KL autoencoder (LTH14/mar models/vae.py `AutoencoderKL` with its `Encoder` and
/// `Decoder` defaults). `AttnResolutions` applies to the encoder only: the reference's Decoder keeps its
/// default `attn_resolutions=()`, which `AutoencoderKL` does not override.
type VaeConfig =
    {
        /// Latent channels (16): the width of `quant_conv` (2x) and `post_quant_conv`.
        EmbedDim: int
        /// Base width of the convolutions (128 for KL-16; the parity fixture uses 32).
        Ch: int
        /// Width multiplier of each resolution level, full resolution first ((1, 1, 2, 2, 4)).
        ChMult: int[]
        /// ResnetBlocks per encoder level (the decoder has one more per level).
        NumResBlocks: int
        /// Nominal input side (256). Attention placement follows it, whatever the real input size.
        Resolution: int
        /// Image channels in (3) and out (3).
        InChannels: int
        OutCh: int
        /// Nominal resolutions at which encoder levels get AttnBlocks ((16): the last level of KL-16).
        AttnResolutions: int[]
        /// Channels of the encoder output and decoder input (equal to EmbedDim in `AutoencoderKL`).
        ZChannels: int
        /// The encoder emits mean and log-variance (2 * ZChannels channels).
        DoubleZ: bool
        /// The latent scale of the generative model (0.2325): tokens = posterior sample * ScaleFactor.
        ScaleFactor: float
    }

    /// The number of resolution levels (5 for KL-16): the spatial stride is 2^(levels - 1).
    member c.Levels = c.ChMult.Length

    /// The channel width of a resolution level: Ch x ChMult[level].
    member c.Width(level: int) = int64 c.Ch * int64 c.ChMult.[level]

    /// The width of the lowest resolution, where `mid` runs.
    member c.TopWidth = c.Width(c.Levels - 1)

/// Named VAE configurations.
module VaeConfig =
    /// KL-16 as released with MAR: ch 128, ch_mult (1,1,2,2,4), 2 res blocks, attention at 16, 16 latent channels.
    [<CompiledName("Kl16")>]
    let kl16 =
        {
            EmbedDim = 16
            Ch = 128
            ChMult = [| 1; 1; 2; 2; 4 |]
            NumResBlocks = 2
            Resolution = 256
            InChannels = 3
            OutCh = 3
            AttnResolutions = [| 16 |]
            ZChannels = 16
            DoubleZ = true
            ScaleFactor = 0.2325
        }

/// The building blocks of the autoencoder: `Normalize` and `nonlinearity` of models/vae.py.
module internal VaeOps =
    /// GroupNorm with 32 groups, eps 1e-6 (not the 1e-5 default), affine, normalising in the weights' dtype
    /// whatever the precision of the convolution before it.
    let normalize (channels: int64) =
        new Mixed.GroupNorm(32L, channels, 1e-6)

    /// swish(x) = x * sigmoid(x).
    let swish (x: torch.Tensor) = x * torch.sigmoid x

    /// A 3x3 convolution with padding 1.
    let conv3 (cin: int64) (cout: int64) =
        new Mixed.Conv2d(cin, cout, 3L, padding = 1L)

    /// A 1x1 convolution.
    let conv1 (cin: int64) (cout: int64) = new Mixed.Conv2d(cin, cout, 1L)

/// models/vae.py `ResnetBlock` without timestep embedding (temb_channels 0, so no `temb_proj`) and with
/// dropout 0: keys `norm1`, `conv1`, `norm2`, `conv2`, and `nin_shortcut` (1x1) when the width changes.
type ResnetBlock(inChannels: int64, outChannels: int64) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("ResnetBlock")
    let norm1 = this.Child("norm1", VaeOps.normalize inChannels)
    let conv1 = this.Child("conv1", VaeOps.conv3 inChannels outChannels)
    let norm2 = this.Child("norm2", VaeOps.normalize outChannels)
    let conv2 = this.Child("conv2", VaeOps.conv3 outChannels outChannels)

    let nin_shortcut =
        if inChannels <> outChannels then
            Some(this.Child("nin_shortcut", VaeOps.conv1 inChannels outChannels))
        else
            None

    override _.forward x =
        let h =
            x
            |> norm1.call
            |> VaeOps.swish
            |> conv1.call
            |> norm2.call
            |> VaeOps.swish
            |> conv2.call

        match nin_shortcut with
        | Some s -> s.call x + h
        | None -> x + h

/// models/vae.py `AttnBlock`: single-head self-attention over the h*w positions with 1x1-conv projections
/// (keys `norm`, `q`, `k`, `v`, `proj_out`), scaled by c^-0.5, added to the input.
type AttnBlock(channels: int64) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("AttnBlock")
    let norm = this.Child("norm", VaeOps.normalize channels)
    let q = this.Child("q", VaeOps.conv1 channels channels)
    let k = this.Child("k", VaeOps.conv1 channels channels)
    let v = this.Child("v", VaeOps.conv1 channels channels)
    let proj_out = this.Child("proj_out", VaeOps.conv1 channels channels)

    override _.forward x =
        let b, c, h, w = x.shape.[0], x.shape.[1], x.shape.[2], x.shape.[3]
        let hn = norm.call x
        // The 1x1 projections take the layer's precision, the attention itself the norm's dtype (fp32), as in
        // `Attention`: bf16 logits lose too much absolute precision for the softmax.
        let project (p: Mixed.Conv2d) = p.call hn |> castTo hn.dtype
        // (B, C, H, W) -> (B, HW, C)
        let qs = (project q).reshape(b, c, h * w).permute (0L, 2L, 1L)
        // (B, C, H, W) -> (B, C, HW)
        let ks = (project k).reshape (b, c, h * w)
        let vs = (project v).reshape (b, c, h * w)
        // weights[b, i, j] = softmax_j(sum_c q[b, c, i] k[b, c, j] / sqrt(C)): (B, HW, HW)
        let weights = (torch.bmm (qs, ks) * (1.0 / sqrt (float c))).softmax 2L
        // out[b, c, i] = sum_j v[b, c, j] weights[b, i, j]: (B, C, HW) -> (B, C, H, W)
        let out = torch.bmm(vs, weights.transpose (1L, 2L)).reshape (b, c, h, w)
        x + proj_out.call out

/// models/vae.py `Downsample` with `resamp_with_conv=True`: zero-pad right and bottom by one, then a 3x3
/// stride-2 convolution without padding (key `conv`). (B, C, H, W) -> (B, C, H/2, W/2).
type Downsample(channels: int64) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("Downsample")
    let conv = this.Child("conv", new Mixed.Conv2d(channels, channels, 3L, stride = 2L))

    override _.forward x =
        // (B, C, H, W) -> (B, C, H+1, W+1): pad (left 0, right 1, top 0, bottom 1)
        torch.nn.functional.pad (x, [| 0L; 1L; 0L; 1L |]) |> conv.call

/// models/vae.py `Upsample` with `resamp_with_conv=True`: nearest-neighbour x2, then a 3x3 convolution
/// (key `conv`). (B, C, H, W) -> (B, C, 2H, 2W).
type Upsample(channels: int64) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("Upsample")
    let conv = this.Child("conv", VaeOps.conv3 channels channels)

    override _.forward x =
        // (B, C, H, W) -> (B, C, 2H, 2W)
        torch.nn.functional.interpolate (x, scale_factor = [| 2.0; 2.0 |], mode = torch.InterpolationMode.Nearest)
        |> conv.call

/// What ends a resolution level: a `downsample` (encoder), an `upsample` (decoder), or nothing (the last level).
type Resampling =
    /// No resampling module.
    | Keep = 0
    /// A `Downsample` registered as `downsample`.
    | Down = 1
    /// An `Upsample` registered as `upsample`.
    | Up = 2

/// One resolution level of the encoder or decoder: the reference's anonymous `nn.Module()` holding `block`
/// (ResnetBlocks), `attn` (an AttnBlock after each block, or empty) and `downsample` or `upsample`.
type VaeLevel(inChannels: int64, outChannels: int64, blocks: int, withAttn: bool, resampling: Resampling) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("VaeLevel")

    let block =
        this.Child(
            "block",
            ModuleList<ResnetBlock>(
                [|
                    for j in 0 .. blocks - 1 ->
                        new ResnetBlock((if j = 0 then inChannels else outChannels), outChannels)
                |]
            )
        )

    let attn =
        this.Child(
            "attn",
            ModuleList<AttnBlock>(
                [|
                    if withAttn then
                        for _ in 1..blocks -> new AttnBlock(outChannels)
                |]
            )
        )

    let resample: Module<torch.Tensor, torch.Tensor> option =
        match resampling with
        | Resampling.Down -> Some(this.Child("downsample", new Downsample(outChannels)))
        | Resampling.Up -> Some(this.Child("upsample", new Upsample(outChannels)))
        | _ -> None

    override _.forward x =
        let h =
            Seq.indexed block
            |> Seq.fold
                (fun (h: torch.Tensor) (j, blk) ->
                    let h = blk.call h
                    if attn.Count > 0 then attn.[j].call h else h)
                x

        match resample with
        | Some r -> r.call h
        | None -> h

/// The middle of the encoder and decoder: the reference's anonymous `nn.Module()` with `block_1`, `attn_1`,
/// `block_2` at constant width.
type VaeMid(channels: int64) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("VaeMid")
    let block_1 = this.Child("block_1", new ResnetBlock(channels, channels))
    let attn_1 = this.Child("attn_1", new AttnBlock(channels))
    let block_2 = this.Child("block_2", new ResnetBlock(channels, channels))

    override _.forward x =
        x |> block_1.call |> attn_1.call |> block_2.call

/// models/vae.py `Encoder`: `conv_in`, `down.{level}` (NumResBlocks ResnetBlocks each; attention where the
/// nominal resolution is in AttnResolutions; a Downsample except at the last level), `mid`, `norm_out`,
/// swish, `conv_out`. (B, 3, H, W) -> (B, 2 z, H / 2^(levels-1), W / 2^(levels-1)) with DoubleZ.
type Encoder(cfg: VaeConfig) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("Encoder")
    let ch = int64 cfg.Ch
    let conv_in = this.Child("conv_in", VaeOps.conv3 (int64 cfg.InChannels) ch)

    let down =
        this.Child(
            "down",
            ModuleList<VaeLevel>(
                [|
                    for level in 0 .. cfg.Levels - 1 ->
                        // The nominal resolution of this level: Resolution halves after each Downsample.
                        let res = cfg.Resolution >>> level
                        let last = level = cfg.Levels - 1

                        new VaeLevel(
                            (if level = 0 then ch else cfg.Width(level - 1)),
                            cfg.Width level,
                            cfg.NumResBlocks,
                            Array.contains res cfg.AttnResolutions,
                            (if last then Resampling.Keep else Resampling.Down)
                        )
                |]
            )
        )

    let mid = this.Child("mid", new VaeMid(cfg.TopWidth))
    let norm_out = this.Child("norm_out", VaeOps.normalize cfg.TopWidth)

    let conv_out =
        this.Child(
            "conv_out",
            VaeOps.conv3 cfg.TopWidth (int64 (if cfg.DoubleZ then 2 * cfg.ZChannels else cfg.ZChannels))
        )

    override _.forward x =
        let h =
            Seq.fold (fun (h: torch.Tensor) (lvl: VaeLevel) -> lvl.call h) (conv_in.call x) down

        // The moments in the image's dtype (bf16 products under mixed precision).
        h
        |> mid.call
        |> norm_out.call
        |> VaeOps.swish
        |> conv_out.call
        |> castTo x.dtype

/// models/vae.py `Decoder` with its default `attn_resolutions=()`: `conv_in`, `mid`, then `up.{level}` for
/// level = last..0 (NumResBlocks + 1 ResnetBlocks each, an Upsample except at level 0; the reference
/// prepends to its ModuleList, so `up.0` is the full-resolution level and runs last), `norm_out`, swish,
/// `conv_out`. (B, z, h, w) -> (B, OutCh, h * 2^(levels-1), w * 2^(levels-1)).
type Decoder(cfg: VaeConfig) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("Decoder")
    let ch = int64 cfg.Ch
    let conv_in = this.Child("conv_in", VaeOps.conv3 (int64 cfg.ZChannels) cfg.TopWidth)
    let mid = this.Child("mid", new VaeMid(cfg.TopWidth))

    let up =
        this.Child(
            "up",
            ModuleList<VaeLevel>(
                [|
                    for level in 0 .. cfg.Levels - 1 ->
                        // Level l reads the output of level l + 1 (or of `mid` at the top).
                        let inWidth =
                            if level = cfg.Levels - 1 then
                                cfg.TopWidth
                            else
                                cfg.Width(level + 1)

                        new VaeLevel(
                            inWidth,
                            cfg.Width level,
                            cfg.NumResBlocks + 1,
                            false,
                            (if level = 0 then Resampling.Keep else Resampling.Up)
                        )
                |]
            )
        )

    let norm_out = this.Child("norm_out", VaeOps.normalize ch)
    // The pixels' own convolution stays fp32 under mixed precision: 3 output channels are ~1% of the decoder's
    // products, and each pixel is a sum of 9 x ch terms whose bf16 rounding would show directly in the image.
    let conv_out =
        this.Child("conv_out", new Mixed.Conv2d(ch, int64 cfg.OutCh, 3L, padding = 1L, fullPrecision = true))

    override _.forward z =
        let h = z |> conv_in.call |> mid.call
        let h = Seq.foldBack (fun (lvl: VaeLevel) (h: torch.Tensor) -> lvl.call h) up h
        // Under mixed precision the convolutions' products are bf16; the image comes back in the latents' dtype.
        h |> norm_out.call |> VaeOps.swish |> conv_out.call |> castTo z.dtype

/// models/vae.py `DiagonalGaussianDistribution` over moments (B, 2z, h, w): mean and log-variance are the
/// two halves of dim 1, the log-variance clamped to [-30, 20]. Sampling takes its noise explicitly (the
/// reference draws `torch.randn` itself). Owns Mean, Logvar, Std and Var; the moments stay the caller's.
type DiagonalGaussianDistribution(moments: torch.Tensor) =
    // (B, 2z, h, w) -> 2 x (B, z, h, w)
    let halves = moments.chunk (2L, 1L)
    let mean = halves.[0]
    let logvar = halves.[1].clamp (scalar -30.0, scalar 20.0)
    do halves.[1].Dispose()
    let std = (logvar * 0.5).exp ()
    let var = logvar.exp ()

    /// The first half of the moments.
    member _.Mean = mean
    /// The clamped second half of the moments.
    member _.Logvar = logvar
    /// exp(0.5 logvar).
    member _.Std = std
    /// exp(logvar).
    member _.Var = var

    /// mean + std * noise, for standard-normal noise shaped like the mean.
    member _.Sample(noise: torch.Tensor) = mean + std * noise

    /// The mean, as a fresh handle.
    member _.Mode() = mean.alias ()

    /// KL divergence to the standard normal, 0.5 sum(mean^2 + var - 1 - logvar) over dims (1, 2, 3): (B,).
    member _.Kl() =
        (0.5 * (mean.square () + var - 1.0 - logvar)).sum ([| 1L; 2L; 3L |])

    /// Negative log-likelihood of a sample, 0.5 sum(log 2 pi + logvar + (x - mean)^2 / var) over dims (1, 2, 3).
    member _.Nll(sample: torch.Tensor) =
        let log2Pi = System.Math.Log(2.0 * System.Math.PI)
        (0.5 * (logvar + log2Pi + (sample - mean).square () / var)).sum ([| 1L; 2L; 3L |])

    interface System.IDisposable with
        member _.Dispose() =
            for t in [ mean; logvar; std; var ] do
                t.Dispose()

/// models/vae.py `AutoencoderKL` (use_variational): `encoder`, `decoder`, `quant_conv` (2 embed -> 2 embed,
/// 1x1) and `post_quant_conv` (embed -> embed, 1x1). The generative model works on
/// posterior samples * ScaleFactor and decodes tokens / ScaleFactor.
type AutoencoderKL(cfg: VaeConfig) as this =
    inherit Layer<torch.Tensor, torch.Tensor>("AutoencoderKL")
    let embed = int64 cfg.EmbedDim
    let encoder = this.Child("encoder", new Encoder(cfg))
    let decoder = this.Child("decoder", new Decoder(cfg))
    let quant_conv = this.Child("quant_conv", VaeOps.conv1 (2L * embed) (2L * embed))
    let post_quant_conv = this.Child("post_quant_conv", VaeOps.conv1 embed embed)

    /// The configuration the autoencoder was built with.
    member _.Config = cfg

    /// The posterior moments quant_conv(encoder(x)): images (B, 3, H, W) in [-1, 1] -> (B, 2 embed, H/16, W/16).
    /// Intermediate activations are freed on return.
    member _.Encode(x: torch.Tensor) =
        use scope = torch.NewDisposeScope()
        x |> encoder.call |> quant_conv.call |> scope.MoveToOuter

    /// The posterior over latents for moments from `Encode`.
    member _.Posterior(moments: torch.Tensor) =
        new DiagonalGaussianDistribution(moments)

    /// Images decoder(post_quant_conv(z)): latents (B, embed, h, w) (unscaled) -> (B, 3, 16h, 16w).
    /// Intermediate activations are freed on return.
    member _.Decode(z: torch.Tensor) =
        use scope = torch.NewDisposeScope()
        z |> post_quant_conv.call |> decoder.call |> scope.MoveToOuter

    /// Reconstruction through the posterior mode: Decode(mean of Encode(x)).
    override this.forward x =
        use moments = this.Encode x
        use posterior = this.Posterior moments
        use z = posterior.Mode()
        this.Decode z
