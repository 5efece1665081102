using HiMar.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Data;

/// <summary>Turns images into Hi-MAR's two token grids and back.</summary>
public interface ITokenizer
{
    /// <summary>Dense tokens (B, N, C) and pivot tokens (B, S, C) of images (B, ch, H, W) in [-1, 1].</summary>
    (Tensor Tokens, Tensor Pivots) Encode(Tensor images);

    /// <summary>As <see cref="Encode(Tensor)"/> for one process's rows of a global batch: sampling noise, if any, is
    /// drawn for every row of the global batch and narrowed to <paramref name="rows"/> (data-parallel training).
    /// Deterministic tokenizers ignore the window.</summary>
    (Tensor Tokens, Tensor Pivots) Encode(Tensor images, RowWindow rows) => Encode(images);

    /// <summary>Images (B, ch, H, W) in [-1, 1] from a token grid (B, C, g, g): dense tokens or pivots.</summary>
    Tensor Decode(Tensor grid);

    /// <summary>As <see cref="Decode(Tensor)"/> with the decoder's products in <paramref name="precision"/>;
    /// tokenizers without a network ignore it.</summary>
    Tensor Decode(Tensor grid, Precision precision) => Decode(grid);

    /// <summary>Where the tokens of a <paramref name="grid"/> x <paramref name="grid"/> token grid lie in its decoded
    /// image of side <paramref name="imageSide"/>: token (row, col) covers pixels from Offset + col x Cell (and the
    /// same for rows), Cell wide. A VAE's tokens tile the image evenly.</summary>
    (double Offset, double Cell) TokenCells(long grid, int imageSide) => (0.0, (double)imageSide / grid);
}

/// <summary>
/// Tokens that are pixel patches, needing no weights: the image padded to <c>side</c> (background -1) gives a
/// (side/p)^2 grid of p x p patches; the pivot image, the padded image average-pooled by 2, gives a grid with a
/// quarter of the tokens. For Fashion-MNIST (28 padded to 32, p = 4): 8x8 tokens and 4x4 pivots of 16 values.
/// </summary>
public sealed class PixelPatchTokenizer(int imageSide, int paddedSide, int patch, int channels = 1) : ITokenizer
{
    /// <summary>The tokenizer of the `fashion` preset.</summary>
    public static PixelPatchTokenizer Fashion => new(28, 32, 4);

    /// <summary>Values per token: channels x patch x patch.</summary>
    public int TokenChannels => channels * patch * patch;

    // (B, c, H, W) -> (B, (H/p)(W/p), c p p), token index row * (W/p) + col, features (c, pi, pj)
    Tensor Patchify(Tensor x)
    {
        long b = x.shape[0], h = x.shape[2] / patch, w = x.shape[3] / patch;
        return x.reshape(b, channels, h, patch, w, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, TokenChannels);
    }

    /// <inheritdoc/>
    public (Tensor Tokens, Tensor Pivots) Encode(Tensor images)
    {
        using var scope = torch.NewDisposeScope();
        var pad = (paddedSide - imageSide) / 2;
        var padded = torch.nn.functional.pad(images, [pad, paddedSide - imageSide - pad, pad, paddedSide - imageSide - pad], value: -1.0);
        var small = torch.nn.functional.avg_pool2d(padded, 2);
        return (Patchify(padded).MoveToOuterDisposeScope(), Patchify(small).MoveToOuterDisposeScope());
    }

    /// <inheritdoc/>
    public Tensor Decode(Tensor grid)
    {
        using var scope = torch.NewDisposeScope();
        long b = grid.shape[0], g = grid.shape[2];
        // (B, c p p, g, g) -> (B, c, g p, g p)
        var img = grid.reshape(b, channels, patch, patch, g, g).permute(0, 1, 4, 2, 5, 3).reshape(b, channels, g * patch, g * patch);
        var full = g * patch;
        // Crop the padding back off (pivot grids are half the size: crop half as much).
        var crop = (int)((paddedSide - imageSide) / 2 * full / paddedSide);
        var side = full - 2 * crop;
        return img.narrow(2, crop, side).narrow(3, crop, side).clamp(-1, 1).MoveToOuterDisposeScope();
    }

    /// <inheritdoc/>
    public (double Offset, double Cell) TokenCells(long grid, int imageSide)
    {
        // Decode crops the padding: the grid's first token starts that many pixels left of the image.
        var full = grid * patch;
        return (-(full - imageSide) / 2.0, patch);
    }
}

/// <summary>The KL autoencoder as a tokenizer: latents of the image and of its half-size pivot image, scaled.</summary>
public sealed class VaeTokenizer(AutoencoderKL vae) : ITokenizer
{
    /// <summary>The autoencoder.</summary>
    public AutoencoderKL Vae => vae;

    static Tensor Grid(Tensor latents) => latents.flatten(2).transpose(1, 2); // (B, C, h, w) -> (B, h w, C)

    /// <inheritdoc/>
    public (Tensor Tokens, Tensor Pivots) Encode(Tensor images) => Encode(images, RowWindow.Whole(images.shape[0]));

    /// <inheritdoc/>
    public (Tensor Tokens, Tensor Pivots) Encode(Tensor images, RowWindow rows)
    {
        using var scope = torch.NewDisposeScope();
        using var noGrad = torch.no_grad();
        var small = torch.nn.functional.interpolate(images, [images.shape[2] / 2, images.shape[3] / 2], mode: InterpolationMode.Bicubic, align_corners: false);
        Tensor Latent(Tensor x)
        {
            using var posterior = vae.Posterior(vae.Encode(x));
            var mean = posterior.Mean;
            var noise = rows.Draw(mean.shape[0], mean.shape[1..], shape => torch.randn(shape, dtype: mean.dtype, device: mean.device));
            return posterior.Sample(noise) * vae.Config.ScaleFactor;
        }
        return (Grid(Latent(images)).MoveToOuterDisposeScope(), Grid(Latent(small)).MoveToOuterDisposeScope());
    }

    /// <inheritdoc/>
    public Tensor Decode(Tensor grid) => Decode(grid, Precision.Fp32);

    /// <inheritdoc/>
    public Tensor Decode(Tensor grid, Precision precision)
    {
        using var noGrad = torch.no_grad();
        using var mixed = MixedPrecision.ForInference(vae, precision);
        using var scope = torch.NewDisposeScope();
        var z = grid.to(vae.parameters().First().device) / vae.Config.ScaleFactor;
        return vae.Decode(z).MoveToOuterDisposeScope();
    }
}
