using System.IO.Compression;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Data;

/// <summary>A labelled image data set held as 8-bit pixels.</summary>
public interface IImageDataset
{
    /// <summary>Number of images.</summary>
    int Count { get; }

    /// <summary>Class label of each image.</summary>
    IReadOnlyList<long> Labels { get; }

    /// <summary>Number of classes (max label + 1).</summary>
    int ClassCount { get; }

    /// <summary>Images at <paramref name="indices"/> as (B, channels, H, W) in [-1, 1], mirrored where <paramref name="flips"/> says.</summary>
    Tensor Batch(IReadOnlyList<int> indices, IReadOnlyList<bool> flips);
}

/// <summary>
/// An IDX data set (the MNIST / Fashion-MNIST format): an images file (magic 0x00000803, count, rows, cols,
/// then bytes) and a labels file (magic 0x00000801, count, then bytes), each optionally gzip-compressed.
/// </summary>
public sealed class IdxDataset : IImageDataset
{
    readonly byte[] pixels;
    readonly long[] labels;

    IdxDataset(byte[] pixels, long[] labels, int rows, int cols)
    {
        this.pixels = pixels;
        this.labels = labels;
        Rows = rows;
        Cols = cols;
        ClassCount = (int)labels.Max() + 1;
    }

    /// <summary>Image height.</summary>
    public int Rows { get; }

    /// <summary>Image width.</summary>
    public int Cols { get; }

    /// <inheritdoc/>
    public int Count => labels.Length;

    /// <inheritdoc/>
    public IReadOnlyList<long> Labels => labels;

    /// <inheritdoc/>
    public int ClassCount { get; }

    /// <summary>Fashion-MNIST's class names, in label order.</summary>
    public static readonly IReadOnlyList<string> FashionClasses =
        ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"];

    /// <summary>Where Debian's dataset-fashion-mnist package puts the files.</summary>
    public const string FashionMnistDir = "/usr/share/datasets/fashion-mnist";

    /// <summary>Fashion-MNIST's training (60,000) or test (10,000) split from a folder of the four IDX gzip files.</summary>
    public static IdxDataset FashionMnist(string? dir = null, bool train = true)
    {
        dir ??= FashionMnistDir;
        var prefix = train ? "train" : "t10k";
        var images = Path.Combine(dir, $"{prefix}-images-idx3-ubyte.gz");
        if (!File.Exists(images))
            throw new FileNotFoundException(
                $"{images}: no such file (install Fashion-MNIST with `apt-get install dataset-fashion-mnist`, or pass the folder holding the IDX files).", images);
        return Load(images, Path.Combine(dir, $"{prefix}-labels-idx1-ubyte.gz"));
    }

    static byte[] ReadAll(string path)
    {
        try
        {
            using var file = File.OpenRead(path);
            Stream s = file;
            var head = new byte[2];
            var n = file.Read(head, 0, 2);
            file.Position = 0;
            if (n == 2 && head[0] == 0x1f && head[1] == 0x8b)
                s = new GZipStream(file, CompressionMode.Decompress);
            using var ms = new MemoryStream();
            s.CopyTo(ms);
            return ms.ToArray();
        }
        catch (Exception e) when (e is IOException or InvalidDataException or UnauthorizedAccessException)
        {
            throw new InvalidDataException($"{path}: cannot be read ({e.Message}).", e);
        }
    }

    static int BigEndian(byte[] b, int offset) => b[offset] << 24 | b[offset + 1] << 16 | b[offset + 2] << 8 | b[offset + 3];

    /// <summary>Reads an images file and a labels file; a wrong magic number, size or count names the file.</summary>
    public static IdxDataset Load(string imagesPath, string labelsPath)
    {
        var img = ReadAll(imagesPath);
        var lab = ReadAll(labelsPath);
        if (img.Length < 16 || BigEndian(img, 0) != 0x803)
            throw new InvalidDataException($"{imagesPath}: not an IDX images file (magic 0x00000803 expected).");
        if (lab.Length < 8 || BigEndian(lab, 0) != 0x801)
            throw new InvalidDataException($"{labelsPath}: not an IDX labels file (magic 0x00000801 expected).");
        int count = BigEndian(img, 4), rows = BigEndian(img, 8), cols = BigEndian(img, 12);
        if (count <= 0 || rows <= 0 || cols <= 0 || img.Length != 16 + (long)count * rows * cols)
            throw new InvalidDataException($"{imagesPath}: {img.Length} bytes do not hold {count} images of {rows}x{cols} (truncated?).");
        var labelCount = BigEndian(lab, 4);
        if (labelCount != count || lab.Length != 8 + count)
            throw new InvalidDataException($"{labelsPath}: holds {labelCount} labels in {lab.Length} bytes for {count} images.");
        return new IdxDataset(img[16..], lab[8..].Select(b => (long)b).ToArray(), rows, cols);
    }

    /// <inheritdoc/>
    public Tensor Batch(IReadOnlyList<int> indices, IReadOnlyList<bool> flips)
    {
        var size = Rows * Cols;
        var buffer = new byte[indices.Count * size];
        for (var i = 0; i < indices.Count; i++)
        {
            var src = pixels.AsSpan(indices[i] * size, size);
            var dst = buffer.AsSpan(i * size, size);
            if (!flips[i])
                src.CopyTo(dst);
            else
                for (var r = 0; r < Rows; r++)
                    for (var c = 0; c < Cols; c++)
                        dst[r * Cols + c] = src[r * Cols + (Cols - 1 - c)];
        }
        using var scope = torch.NewDisposeScope();
        var t = torch.tensor(buffer, [indices.Count, 1, Rows, Cols]).to(ScalarType.Float32);
        return (t / 127.5 - 1.0).MoveToOuterDisposeScope();
    }
}
