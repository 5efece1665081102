using SixLabors.ImageSharp;
using SixLabors.ImageSharp.Formats.Gif;
using SixLabors.ImageSharp.Formats.Tiff;
using SixLabors.ImageSharp.Memory;
using SixLabors.ImageSharp.Metadata;
using SixLabors.ImageSharp.PixelFormats;

namespace HiMar.Runtime.Imaging;

/// <summary>
/// Decodes image files that come from elsewhere (data sets, generated folders, reference images) without letting one
/// file take the process's memory: the header is read first (<c>Image.Identify</c>) and an image of more than
/// <see cref="MaxPixels"/> pixels is refused before any pixel is decoded; GIF and TIFF decode their first frame only;
/// and the decoder's allocator refuses any single buffer over <see cref="MaxAllocationMegabytes"/>. Every failure is a
/// <see cref="BadInputException"/> naming the file.
/// </summary>
public static class ImageFiles
{
    /// <summary>The most pixels an image may have: 64 megapixels (8192 x 8192), far above any data set here.</summary>
    public const long MaxPixels = 64L << 20;

    /// <summary>The largest single buffer the decoder may allocate (an 8192 x 8192 RGBA image is 256 MB).</summary>
    public const int MaxAllocationMegabytes = 512;

    static readonly Configuration Config = CreateConfiguration();

    static Configuration CreateConfiguration()
    {
        var config = Configuration.Default.Clone();
        config.MemoryAllocator = MemoryAllocator.Create(new MemoryAllocatorOptions { AllocationLimitMegabytes = MaxAllocationMegabytes });
        config.ImageFormatsManager.SetDecoder(GifFormat.Instance, new GifDecoder { DecodingMode = FrameDecodingMode.First });
        config.ImageFormatsManager.SetDecoder(TiffFormat.Instance, new TiffDecoder { DecodingMode = FrameDecodingMode.First });
        return config;
    }

    /// <summary>The width and height an image file's header declares, refused when over <paramref name="maxPixels"/>.</summary>
    public static (int Width, int Height) Identify(string path, long maxPixels = MaxPixels) =>
        Guard(path, () =>
        {
            using var stream = File.OpenRead(path);
            return Check(path, Header(path, stream), maxPixels);
        });

    /// <summary>Decodes an image file (first frame) once its header passes <see cref="Identify"/>.</summary>
    public static Image<TPixel> Load<TPixel>(string path, long maxPixels = MaxPixels)
        where TPixel : unmanaged, IPixel<TPixel> =>
        Guard(path, () =>
        {
            using var stream = File.OpenRead(path);
            Check(path, Header(path, stream), maxPixels);
            stream.Position = 0;
            return Image.Load<TPixel>(Config, stream);
        });

    /// <summary>The image's header, without decoding pixels.</summary>
    static IImageInfo? Header(string path, Stream stream)
    {
        try
        {
            return Image.Identify(Config, stream);
        }
        catch (NullReferenceException e) when (FromDecoder(e))
        {
            // ImageSharp 2.1's JPEG Identify dereferences a missing frame header (a JPEG without its SOF marker, where
            // Load reports "No readable SOFn marker"); nothing of ours is null here, so this is that file's fault.
            throw new BadInputException($"{path}: not a readable image (its header cannot be parsed).", e);
        }
    }

    static (int, int) Check(string path, IImageInfo? info, long maxPixels)
    {
        if (info is null)
            throw new BadInputException($"{path}: not a readable image (unknown or unsupported format).");
        if (info.Width <= 0 || info.Height <= 0)
            throw new BadInputException($"{path}: the image header declares {info.Width}x{info.Height} pixels.");
        if ((long)info.Width * info.Height > maxPixels)
            throw new BadInputException(
                $"{path}: the image is {info.Width}x{info.Height} = {(long)info.Width * info.Height} pixels, more than the {maxPixels} read (a decompression bomb?).");
        return (info.Width, info.Height);
    }

    static T Guard<T>(string path, Func<T> read)
    {
        try
        {
            return read();
        }
        catch (UnknownImageFormatException e)
        {
            throw new BadInputException($"{path}: not a readable image (unknown or unsupported format).", e);
        }
        catch (Exception e) when (e is ImageFormatException or InvalidMemoryOperationException or NotSupportedException or IOException
            or UnauthorizedAccessException or ArgumentException or IndexOutOfRangeException or InvalidOperationException
            or ArithmeticException)
        {
            // One line: the decoders' messages can run over several. ImageSharp 2.1's decoders sometimes let an index or
            // argument check, or a division by a zero header field (seen with one flipped bit), escape on a corrupt file instead
            // of an ImageFormatException.
            throw new BadInputException($"{path}: not a readable image ({e.Message.Split('\n')[0].Trim()}).", e);
        }
        catch (NullReferenceException e) when (FromDecoder(e))
        {
            // ImageSharp 2.1's JPEG decoder dereferences a missing component buffer on a file cut inside its scan
            // (found by the fuzz property: the test JPEG cut at byte 173). The filter keeps our own null bugs loud.
            throw new BadInputException($"{path}: not a readable image (its data ends or breaks off early).", e);
        }
    }

    /// <summary>Whether an exception was thrown inside ImageSharp's own code, so that a damaged file caused it.</summary>
    static bool FromDecoder(Exception e) =>
        e.TargetSite?.DeclaringType?.Namespace?.StartsWith("SixLabors.ImageSharp", StringComparison.Ordinal) == true;
}
