using HiMar.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Data;

/// <summary>
/// A tokenizer for images smaller than its input side: pads them with the background (-1) to
/// <paramref name="paddedSide"/> before encoding and crops the decoded images back to <paramref name="imageSide"/>
/// (pivot images, half the side, lose half as much). Fashion-MNIST's 28x28 images through a stride-4 autoencoder:
/// 32x32 in, 8x8 tokens and 4x4 pivots out.
/// </summary>
public sealed class PaddedTokenizer(ITokenizer inner, int imageSide, int paddedSide) : ITokenizer
{
    /// <summary>The wrapped tokenizer.</summary>
    public ITokenizer Inner => inner;

    Tensor Pad(Tensor images)
    {
        var a = (paddedSide - imageSide) / 2;
        var b = paddedSide - imageSide - a;
        return nn.functional.pad(images, [a, b, a, b], value: -1.0);
    }

    /// <inheritdoc/>
    public (Tensor Tokens, Tensor Pivots) Encode(Tensor images) => Encode(images, RowWindow.Whole(images.shape[0]));

    /// <inheritdoc/>
    public (Tensor Tokens, Tensor Pivots) Encode(Tensor images, RowWindow rows)
    {
        using var padded = Pad(images);
        return inner.Encode(padded, rows);
    }

    /// <inheritdoc/>
    public Tensor Decode(Tensor grid) => Decode(grid, Precision.Fp32);

    /// <inheritdoc/>
    public Tensor Decode(Tensor grid, Precision precision)
    {
        using var full = inner.Decode(grid, precision);
        var side = full.shape[^1];
        // A pivot grid decodes to half the side: crop in proportion.
        var crop = (paddedSide - imageSide) / 2 * side / paddedSide;
        var keep = side - 2 * crop;
        return full.narrow(2, crop, keep).narrow(3, crop, keep).clamp(-1, 1);
    }

    /// <inheritdoc/>
    public (double Offset, double Cell) TokenCells(long grid, int side)
    {
        // The tokens tile the padded image evenly (a pivot image is padded in proportion); the crop moves the first
        // token left of the shown image.
        var padded = (double)side * paddedSide / imageSide;
        return (-(padded - side) / 2, padded / grid);
    }
}
