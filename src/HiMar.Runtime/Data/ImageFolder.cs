using SixLabors.ImageSharp;
using SixLabors.ImageSharp.PixelFormats;
using SixLabors.ImageSharp.Processing;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Data;

/// <summary>
/// Images in the ImageNet layout (one subfolder per class, JPEG or PNG), preprocessed as the reference: the
/// ADM centre crop (halve with a box filter while the short side is at least twice the target, resize bicubic
/// so the short side fits, crop the centre). A file that cannot be decoded, or whose header declares more than
/// <see cref="Imaging.ImageFiles.MaxPixels"/> pixels (checked before decoding), is skipped with a warning naming it.
/// </summary>
public sealed class ImageFolder : IImageDataset
{
    static readonly string[] Extensions = [".jpg", ".jpeg", ".png", ".JPEG", ".JPG", ".PNG"];
    readonly List<(string Path, long Label)> files = [];
    readonly List<string> skipped = [];
    readonly Dictionary<int, float[]> decoded = [];

    /// <summary>Scans <paramref name="root"/>; class labels follow the sorted subfolder names.</summary>
    public ImageFolder(string root, int imageSize = 256)
    {
        if (!System.IO.Directory.Exists(root))
            throw new DirectoryNotFoundException($"{root}: no such folder (expected one subfolder of images per class).");
        Root = root;
        ImageSize = imageSize;
        Classes = System.IO.Directory.GetDirectories(root).Select(Path.GetFileName).OfType<string>().OrderBy(x => x, StringComparer.Ordinal).ToList();
        for (var c = 0; c < Classes.Count; c++)
            foreach (var f in System.IO.Directory.GetFiles(Path.Combine(root, Classes[c])).Where(f => Extensions.Contains(Path.GetExtension(f))).OrderBy(x => x, StringComparer.Ordinal))
                files.Add((f, c));
        if (files.Count == 0)
            throw new InvalidDataException($"{root}: no JPEG or PNG images in class subfolders.");
    }

    ImageFolder(string root, IReadOnlyList<string> relativeFiles, int imageSize)
    {
        if (!System.IO.Directory.Exists(root))
            throw new DirectoryNotFoundException($"{root}: no such images folder.");
        Root = root;
        ImageSize = imageSize;
        Classes = ["image"];
        foreach (var f in relativeFiles)
            files.Add((Path.Combine(root, f), 0));
        var missing = files.Where(f => !File.Exists(f.Path)).Select(f => f.Path).ToList();
        if (missing.Count > 0)
            throw new FileNotFoundException($"{missing[0]}: no such image ({missing.Count} of the {files.Count} listed are missing).", missing[0]);
        if (files.Count == 0)
            throw new InvalidDataException($"{root}: no images listed.");
    }

    /// <summary>Listed images of one folder (COCO's train2017/ and a captions file): one class, label 0.</summary>
    public static ImageFolder FromFiles(string root, IReadOnlyList<string> relativeFiles, int imageSize = 256) => new(root, relativeFiles, imageSize);

    /// <summary>The path of image <paramref name="index"/> relative to <see cref="Root"/>, '/'-separated (its key).</summary>
    public string Key(int index) => Path.GetRelativePath(Root, files[index].Path).Replace('\\', '/');

    /// <summary>The folder.</summary>
    public string Root { get; }

    /// <summary>The side of the centre crop.</summary>
    public int ImageSize { get; }

    /// <summary>Class names (subfolder names), in label order.</summary>
    public IReadOnlyList<string> Classes { get; }

    /// <summary>Files that could not be decoded, as "path: reason".</summary>
    public IReadOnlyList<string> Skipped => skipped;

    /// <inheritdoc/>
    public int Count => files.Count;

    /// <inheritdoc/>
    public IReadOnlyList<long> Labels => files.Select(f => f.Label).ToList();

    /// <inheritdoc/>
    public int ClassCount => Classes.Count;

    /// <summary>The ADM centre crop of an image to <paramref name="size"/> x <paramref name="size"/>.</summary>
    public static Image<Rgb24> CenterCrop(Image<Rgb24> image, int size)
    {
        var img = image.Clone();
        while (Math.Min(img.Width, img.Height) >= 2 * size)
            img.Mutate(x => x.Resize(img.Width / 2, img.Height / 2, KnownResamplers.Box));
        var scale = (double)size / Math.Min(img.Width, img.Height);
        img.Mutate(x => x.Resize((int)Math.Round(img.Width * scale), (int)Math.Round(img.Height * scale), KnownResamplers.Bicubic));
        int cx = (img.Width - size) / 2, cy = (img.Height - size) / 2;
        img.Mutate(x => x.Crop(new Rectangle(cx, cy, size, size)));
        return img;
    }

    /// <summary>Decodes and crops image <paramref name="index"/>; false (with a warning, counted in <see cref="Skipped"/>) when it cannot be read.</summary>
    public bool TryLoad(int index, out float[]? pixels, Action<string>? warn = null)
    {
        if (decoded.TryGetValue(index, out pixels))
            return true;
        var path = files[index].Path;
        try
        {
            using var image = Imaging.ImageFiles.Load<Rgb24>(path);
            using var crop = CenterCrop(image, ImageSize);
            var data = new float[3 * ImageSize * ImageSize];
            crop.ProcessPixelRows(rows =>
            {
                for (var y = 0; y < rows.Height; y++)
                {
                    var row = rows.GetRowSpan(y);
                    for (var x = 0; x < row.Length; x++)
                    {
                        var o = y * ImageSize + x;
                        data[o] = row[x].R / 127.5f - 1f;
                        data[ImageSize * ImageSize + o] = row[x].G / 127.5f - 1f;
                        data[2 * ImageSize * ImageSize + o] = row[x].B / 127.5f - 1f;
                    }
                }
            });
            if (decoded.Count > 256)
                decoded.Clear();
            decoded[index] = data;
            pixels = data;
            return true;
        }
        catch (BadInputException e)
        {
            var reason = e.Message.StartsWith(path + ": ", StringComparison.Ordinal) ? e.Message[(path.Length + 2)..].TrimEnd('.') : e.Message;
            var message = $"{path}: skipped, cannot be decoded ({reason})";
            if (!skipped.Contains(message))
            {
                skipped.Add(message);
                warn?.Invoke(message);
            }
            pixels = null;
            return false;
        }
    }

    /// <inheritdoc/>
    public Tensor Batch(IReadOnlyList<int> indices, IReadOnlyList<bool> flips)
    {
        using var scope = torch.NewDisposeScope();
        var rows = new List<Tensor>();
        for (var i = 0; i < indices.Count; i++)
        {
            if (!TryLoad(indices[i], out var px))
                throw new BadInputException(skipped[^1]);
            var t = torch.tensor(px!, [3, ImageSize, ImageSize]);
            rows.Add(flips[i] ? t.flip(2) : t);
        }
        return torch.stack(rows).MoveToOuterDisposeScope();
    }
}
