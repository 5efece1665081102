using System.Buffers.Binary;
using System.IO.Compression;
using HiMar.Runtime.Checkpoints;
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

    /// <summary>Fashion-MNIST's training (60,000) or test (10,000) split from a folder of the four IDX gzip files: 28x28
    /// images (the pixel tokenizer's size) and labels 0 to 9.</summary>
    public static IdxDataset FashionMnist(string? dir = null, bool train = true)
    {
        dir ??= FashionMnistDir;
        var prefix = train ? "train" : "t10k";
        var images = Path.Combine(dir, $"{prefix}-images-idx3-ubyte.gz");
        if (!File.Exists(images))
            throw new FileNotFoundException(
                $"{images}: no such file (install Fashion-MNIST with `apt-get install dataset-fashion-mnist`, or pass the folder holding the IDX files).", images);
        return Load(images, Path.Combine(dir, $"{prefix}-labels-idx1-ubyte.gz"), 28, FashionClasses.Count);
    }

    /// <summary>The largest IDX payload read: a byte array's limit (about 2 GiB, 2.7 million 28x28 images).</summary>
    public static long MaxBytes => Array.MaxLength;

    /// <summary>
    /// Reads one IDX file of unsigned bytes (gzip-compressed or not): the magic number (0x0000 08 <paramref name="rank"/>),
    /// <paramref name="rank"/> big-endian dimensions, then exactly as many bytes as they multiply to. The payload is
    /// allocated only once the dimensions are checked (positive, product within <see cref="MaxBytes"/> and within what the
    /// file can hold: its own length, or 1032 times it for gzip, deflate's largest ratio), and a gzip stream is read only
    /// up to the declared size plus one byte, so a small file that expands to gigabytes is refused after reading that much.
    /// </summary>
    static (int[] Dims, byte[] Data) ReadIdx(string path, int rank, string kind)
    {
        try
        {
            using var file = File.OpenRead(path);
            var fileLength = file.Length;
            var head = new byte[2];
            var n = file.ReadAtLeast(head, 2, throwOnEndOfStream: false);
            file.Position = 0;
            var gzip = n == 2 && head[0] == 0x1f && head[1] == 0x8b;
            // gzip's trailer: the CRC-32 and length (mod 2^32) of what it holds, checked here because the stream
            // reader does not notice a trailer that is cut off.
            uint trailerCrc = 0, trailerSize = 0;
            if (gzip)
            {
                if (fileLength < 18)
                    throw new BadInputException($"{path}: truncated ({fileLength} bytes is shorter than any gzip stream).");
                var trailer = new byte[8];
                file.Seek(-8, SeekOrigin.End);
                file.ReadExactly(trailer);
                file.Position = 0;
                trailerCrc = BinaryPrimitives.ReadUInt32LittleEndian(trailer);
                trailerSize = BinaryPrimitives.ReadUInt32LittleEndian(trailer.AsSpan(4));
            }
            using var s = gzip ? new GZipStream(file, CompressionMode.Decompress) : (Stream)file;
            var header = new byte[4 + 4 * rank];
            var got = s.ReadAtLeast(header, header.Length, throwOnEndOfStream: false);
            var magic = 0x800 | rank;
            if (got < 4 || BigEndian(header, 0) != magic)
                throw new BadInputException($"{path}: not an IDX {kind} file (magic 0x{magic:x8} expected).");
            if (got < header.Length)
                throw new BadInputException($"{path}: the IDX header is truncated ({got} of {header.Length} bytes).");
            var dims = Enumerable.Range(0, rank).Select(i => BigEndian(header, 4 + 4 * i)).ToArray();
            var shown = string.Join("x", dims);
            if (dims.Any(d => d <= 0))
                throw new BadInputException($"{path}: the IDX header declares dimensions {shown}; each must be positive.");
            // Stop multiplying once past the limit: a product below 2^31 times a factor below 2^31 cannot overflow.
            long size = 1;
            foreach (var d in dims)
                if ((size *= d) > MaxBytes)
                    throw new BadInputException($"{path}: the IDX header declares {shown} bytes, more than the {MaxBytes} read.");
            var room = gzip ? (fileLength > long.MaxValue / ZipEntries.MaxRatio ? long.MaxValue : fileLength * ZipEntries.MaxRatio) : fileLength - header.Length;
            if (size > room)
                throw new BadInputException(gzip
                    ? $"{path}: the IDX header declares {shown} = {size} bytes, more than a {fileLength}-byte gzip file can hold (truncated?)."
                    : $"{path}: {fileLength} bytes do not hold the {shown} = {size} bytes the IDX header declares (truncated?).");
            string Short(long held) => rank == 3
                ? $"{path}: {held} bytes do not hold {dims[0]} images of {dims[1]}x{dims[2]} (truncated?)."
                : $"{path}: {held} bytes do not hold {shown} {kind} (truncated?).";
            if (gzip && trailerSize != (uint)(header.Length + size))
                throw new BadInputException(trailerSize < header.Length + size
                    ? Short(trailerSize)
                    : $"{path}: the gzip trailer records {trailerSize} bytes (mod 2^32), but the IDX header declares {header.Length} + {size} (not one gzip stream?).");
            var data = new byte[size];
            var read = s.ReadAtLeast(data, data.Length, throwOnEndOfStream: false);
            if (read < size)
                throw new BadInputException(Short(header.Length + read));
            if (s.ReadByte() != -1)
                throw new BadInputException($"{path}: holds more than the {shown} = {size} bytes its IDX header declares.");
            if (gzip && Crc32.Append(Crc32.Compute(header), data) != trailerCrc)
                throw new BadInputException($"{path}: fails the gzip CRC-32 check: the file is corrupt.");
            return (dims, data);
        }
        catch (Exception e) when (e is IOException or InvalidDataException or UnauthorizedAccessException)
        {
            throw new BadInputException($"{path}: cannot be read ({e.Message.Split('\n')[0]}).", e);
        }
    }

    static int BigEndian(byte[] b, int offset) => b[offset] << 24 | b[offset + 1] << 16 | b[offset + 2] << 8 | b[offset + 3];

    /// <summary>
    /// Reads an images file and a labels file; a wrong magic number, size or count names the file. With
    /// <paramref name="side"/> the images must be side x side; labels must be below <paramref name="classes"/>.
    /// </summary>
    public static IdxDataset Load(string imagesPath, string labelsPath, int side = 0, int classes = 256)
    {
        var (dims, img) = ReadIdx(imagesPath, 3, "images");
        int count = dims[0], rows = dims[1], cols = dims[2];
        if (side > 0 && (rows != side || cols != side))
            throw new BadInputException($"{imagesPath}: holds {rows}x{cols} images; this loader expects {side}x{side}.");
        var (labelDims, lab) = ReadIdx(labelsPath, 1, "labels");
        if (labelDims[0] != count)
            throw new BadInputException($"{labelsPath}: holds {labelDims[0]} labels for {count} images.");
        var bad = Array.FindIndex(lab, b => b >= classes);
        if (bad >= 0)
            throw new BadInputException($"{labelsPath}: label {lab[bad]} of image {bad} is not one of the {classes} classes.");
        return new IdxDataset(img, lab.Select(b => (long)b).ToArray(), rows, cols);
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
