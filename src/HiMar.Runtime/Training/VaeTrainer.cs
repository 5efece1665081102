using System.Diagnostics;
using System.Text.Json;
using HiMar.Model;
using HiMar.Runtime.Checkpoints;
using HiMar.Runtime.Data;
using HiMar.Runtime.Imaging;
using HiMar.Runtime.Native;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Training;

/// <summary>How a KL autoencoder is trained (`himar train-vae`).</summary>
/// <param name="Steps">Optimiser steps.</param>
/// <param name="Batch">Images per step.</param>
/// <param name="Lr">Peak learning rate (linear warm-up, then cosine to 0).</param>
/// <param name="Warmup">Warm-up steps.</param>
/// <param name="KlWeight">Weight of the KL term in the latent-diffusion convention: the per-image KL sum against the
/// per-image L1 sum (here both divided by the pixel count).</param>
/// <param name="Seed">Initialisation, batch order and posterior noise.</param>
/// <param name="Precision">The products' precision (weights and AdamW stay fp32).</param>
/// <param name="PaddedSide">Images are padded with the background (-1) to this side before encoding (28 -> 32: a
/// side divisible by the autoencoder's stride).</param>
/// <param name="LogEvery">Steps between progress reports.</param>
public sealed record VaeTrainingOptions(
    int Steps = 3000,
    int Batch = 64,
    double Lr = 1e-3,
    int Warmup = 100,
    double KlWeight = 1e-6,
    long Seed = 1,
    Precision Precision = Precision.Fp32,
    int PaddedSide = 32,
    int LogEvery = 50);

/// <summary>What a trained autoencoder achieves on held-out images.</summary>
/// <param name="TestMse">Mean squared reconstruction error in [0, 1] pixel units over the unpadded image.</param>
/// <param name="TestPsnr">10 log10(1 / TestMse), in dB.</param>
/// <param name="TestL1">Mean absolute reconstruction error in [0, 1] pixel units.</param>
/// <param name="LatentScale">The factor folded into the weights so that latents times the tokenizer's scale factor have
/// unit standard deviation.</param>
/// <param name="TokenStd">The standard deviation of the tokens (scaled posterior means) after folding: about 1.</param>
/// <param name="Seconds">Training wall time.</param>
public sealed record VaeTrainingReport(double TestMse, double TestPsnr, double TestL1, double LatentScale, double TokenStd, double Seconds);

/// <summary>
/// Trains the KL autoencoder of MAR's tokenizer (the same <see cref="AutoencoderKL"/> layers) on a small image set:
/// L1 reconstruction plus a small KL term, AdamW, warm-up and cosine decay. No perceptual or adversarial loss: on
/// 28x28 grey images the L1 decoder is already sharp, and neither network could be downloaded here.
/// </summary>
public static class VaeTrainer
{
    /// <summary>The Fashion-MNIST autoencoder: width 32, levels (1, 2, 2) (stride 4: a 32x32 image gives 8x8 latents,
    /// its 16x16 pivot image 4x4), one residual block per level, grey in and out, no attention but the middle's.
    /// The nominal resolution is KL-16's so that the layout reads back from the weights' shapes.</summary>
    public static VaeConfig FashionConfig(int latentChannels) =>
        new(latentChannels, 32, [1, 2, 2], 1, VaeConfigModule.Kl16.Resolution, 1, 1, [], latentChannels, true, VaeConfigModule.Kl16.ScaleFactor);

    /// <summary>Images (B, 1, s, s) padded with -1 to <paramref name="side"/>.</summary>
    public static Tensor Pad(Tensor images, int side)
    {
        var s = (int)images.shape[^1];
        if (s == side)
            return images.alias();
        int a = (side - s) / 2, b = side - s - a;
        return nn.functional.pad(images, [a, b, a, b], value: -1.0);
    }

    /// <summary>Trains <paramref name="vae"/> in place on <paramref name="train"/>, folds the latent scale into its
    /// weights and measures it on <paramref name="test"/>. <paramref name="onLog"/> gets (step, loss, L1, KL) every
    /// LogEvery steps.</summary>
    public static VaeTrainingReport Train(AutoencoderKL vae, IImageDataset train, IImageDataset test, VaeTrainingOptions o,
        Action<int, double, double, double>? onLog = null, CancellationToken cancel = default)
    {
        if (o.Steps < 1 || o.Batch < 1 || o.Lr <= 0 || o.KlWeight < 0)
            throw new BadInputException($"train-vae: steps, batch and lr must be positive and the KL weight >= 0 (got {o.Steps}, {o.Batch}, {o.Lr}, {o.KlWeight}).");
        var clock = Stopwatch.StartNew();
        var rng = new Random((int)o.Seed);
        using var gen = new torch.Generator((ulong)o.Seed);
        vae.train();
        using var opt = new NamedAdamW(vae, 0.0, 0.9, 0.999);
        var order = Enumerable.Range(0, train.Count).ToArray();
        var cursor = order.Length;
        for (var step = 1; step <= o.Steps; step++)
        {
            cancel.ThrowIfCancellationRequested();
            var idx = new int[o.Batch];
            for (var i = 0; i < o.Batch; i++)
            {
                if (cursor == order.Length)
                {
                    rng.Shuffle(order);
                    cursor = 0;
                }
                idx[i] = order[cursor++];
            }
            var flips = idx.Select(_ => rng.Next(2) == 1).ToArray();
            using var scope = torch.NewDisposeScope();
            using var gcPause = GcPause.Begin(); // libtorch reads TorchSharp's temporary Scalars: no collection mid-call
            using var mixed = MixedPrecision.ForTraining(vae, o.Precision);
            var x = Pad(train.Batch(idx, flips), o.PaddedSide);
            var moments = vae.Encode(x).to(ScalarType.Float32);
            using var posterior = vae.Posterior(moments);
            var noise = torch.randn(posterior.Mean.shape, generator: gen);
            var recon = vae.Decode(posterior.Sample(noise)).to(ScalarType.Float32);
            var pixels = (double)(x.shape[1] * x.shape[2] * x.shape[3]);
            var l1 = (recon - x).abs().mean();
            var kl = posterior.Kl().mean() / pixels;
            var loss = l1 + o.KlWeight * kl;
            opt.ZeroGrad();
            // oneDNN's convolution backward returns NaN now and then for few output channels (see OneDnn).
            using (Native.OneDnn.Off())
                loss.backward();
            var lr = LearningRate(o, step);
            opt.Step(lr);
            if (onLog is not null && (step % o.LogEvery == 0 || step == o.Steps))
                onLog(step, loss.item<float>(), l1.item<float>() / 2, kl.item<float>());
        }
        vae.eval();
        var scale = FoldLatentScale(vae, test, o.PaddedSide);
        var (mse, l1Test, tokenStd) = Measure(vae, test, o.PaddedSide);
        return new VaeTrainingReport(mse, 10 * Math.Log10(1 / mse), l1Test, scale, tokenStd, clock.Elapsed.TotalSeconds);
    }

    static double LearningRate(VaeTrainingOptions o, int step) =>
        step <= o.Warmup ? o.Lr * step / Math.Max(1, o.Warmup)
        : o.Lr * 0.5 * (1 + Math.Cos(Math.PI * (step - o.Warmup) / Math.Max(1, o.Steps - o.Warmup)));

    static IEnumerable<int[]> Chunks(int count, int size, int limit) =>
        Enumerable.Range(0, Math.Min(count, limit)).Chunk(size);

    /// <summary>Scales the latents by s so that tokens (latents x the config's scale factor) have unit standard
    /// deviation over up to 2,000 images of <paramref name="data"/>: quant_conv's mean rows x s, its log-variance
    /// biases + 2 ln s, post_quant_conv's weight / s. The autoencoder computes the same images; returns s.</summary>
    public static double FoldLatentScale(AutoencoderKL vae, IImageDataset data, int paddedSide)
    {
        using var noGrad = torch.no_grad();
        var sum = 0.0;
        var sumSq = 0.0;
        long n = 0;
        foreach (var chunk in Chunks(data.Count, 250, 2000))
        {
            using var scope = torch.NewDisposeScope();
            using var gcPause = GcPause.Begin(); // libtorch reads TorchSharp's temporary Scalars: no collection mid-call
            var x = Pad(data.Batch(chunk, new bool[chunk.Length]), paddedSide);
            using var posterior = vae.Posterior(vae.Encode(x));
            var m = posterior.Mean.to(ScalarType.Float64);
            sum += m.sum().item<double>();
            sumSq += m.square().sum().item<double>();
            n += m.numel();
        }
        var mean = sum / n;
        var std = Math.Sqrt(Math.Max(sumSq / n - mean * mean, 1e-12));
        var s = 1.0 / (vae.Config.ScaleFactor * std);
        var state = vae.state_dict();
        var e = vae.Config.EmbedDim;
        var qw = state["quant_conv.weight"];
        var qb = state["quant_conv.bias"];
        qw.narrow(0, 0, e).mul_(s);
        qb.narrow(0, 0, e).mul_(s);
        qb.narrow(0, e, e).add_(2 * Math.Log(s));
        state["post_quant_conv.weight"].div_(s);
        return s;
    }

    /// <summary>Reconstruction error through the posterior mean (MSE and L1 in [0, 1] units over the unpadded image)
    /// and the standard deviation of the scaled tokens, over up to 2,000 images.</summary>
    public static (double Mse, double L1, double TokenStd) Measure(AutoencoderKL vae, IImageDataset data, int paddedSide)
    {
        using var noGrad = torch.no_grad();
        double se = 0, ae = 0, t = 0, tt = 0;
        long pixels = 0, tokens = 0;
        foreach (var chunk in Chunks(data.Count, 250, 2000))
        {
            using var scope = torch.NewDisposeScope();
            using var gcPause = GcPause.Begin(); // libtorch reads TorchSharp's temporary Scalars: no collection mid-call
            var raw = data.Batch(chunk, new bool[chunk.Length]);
            var side = raw.shape[^1];
            var x = Pad(raw, paddedSide);
            using var posterior = vae.Posterior(vae.Encode(x));
            var z = posterior.Mean * vae.Config.ScaleFactor;
            t += z.sum().item<float>();
            tt += z.square().sum().item<float>();
            tokens += z.numel();
            var y = vae.Decode(posterior.Mean).clamp(-1, 1);
            var a = (paddedSide - (int)side) / 2;
            var d = (y.narrow(2, a, side).narrow(3, a, side) - raw) / 2;
            se += d.square().sum().item<float>();
            ae += d.abs().sum().item<float>();
            pixels += raw.numel();
        }
        var mu = t / tokens;
        return (se / pixels, ae / pixels, Math.Sqrt(tt / tokens - mu * mu));
    }

    /// <summary>Writes a trained autoencoder's folder: <c>weights.safetensors</c> (loadable by every <c>--vae</c>
    /// flag), <c>train-vae.json</c> (settings and test errors) and <c>reconstructions.png</c> (rows of 10 test images
    /// over their reconstructions through the posterior mean).</summary>
    public static void WriteRun(string dir, AutoencoderKL vae, VaeTrainingOptions o, VaeTrainingReport report, IImageDataset test)
    {
        Directory.CreateDirectory(dir);
        ModelFiles.Save(vae, Path.Combine(dir, "weights.safetensors"));
        var json = JsonSerializer.Serialize(new
        {
            latent_channels = vae.Config.EmbedDim,
            steps = o.Steps,
            batch = o.Batch,
            lr = o.Lr,
            warmup = o.Warmup,
            kl_weight = o.KlWeight,
            seed = o.Seed,
            precision = o.Precision.ToString().ToLowerInvariant(),
            test_mse = report.TestMse,
            test_psnr_db = report.TestPsnr,
            test_l1 = report.TestL1,
            latent_scale = report.LatentScale,
            token_std = report.TokenStd,
            seconds = report.Seconds,
        }, new JsonSerializerOptions { WriteIndented = true });
        AtomicFile.WriteText(Path.Combine(dir, "train-vae.json"), json + "\n");
        using var scope = torch.NewDisposeScope();
        using var gcPause = GcPause.Begin(); // libtorch reads TorchSharp's temporary Scalars: no collection mid-call
        using var noGrad = torch.no_grad();
        var count = Math.Min(20, test.Count) / 10 * 10;
        if (count == 0)
            return;
        var raw = test.Batch(Enumerable.Range(0, count).ToArray(), new bool[count]);
        var side = raw.shape[^1];
        var a = (o.PaddedSide - side) / 2;
        using var posterior = vae.Posterior(vae.Encode(Pad(raw, o.PaddedSide)));
        var recon = vae.Decode(posterior.Mean).narrow(2, a, side).narrow(3, a, side).clamp(-1, 1);
        var rows = Enumerable.Range(0, count / 10).SelectMany(r => new[] { raw.narrow(0, r * 10, 10), recon.narrow(0, r * 10, 10) }).ToArray();
        var tiles = Images.FromTensor(torch.cat(rows, 0)).Select(t => Images.Resize(t, 56)).ToArray();
        Images.SavePng(Images.Grid(tiles, null, 10), Path.Combine(dir, "reconstructions.png"));
    }
}
