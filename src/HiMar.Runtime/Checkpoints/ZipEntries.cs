using System.IO.Compression;

namespace HiMar.Runtime.Checkpoints;

/// <summary>
/// Reads zip entries with every check the format allows, for files that come from elsewhere (<c>.pth</c>, <c>.npz</c>):
/// an entry's declared size must be one its compressed bytes can hold, nothing is allocated before that check, the
/// bytes read must be exactly the declared size, and their CRC-32 must match the one the zip records (a flipped bit in
/// a weight is refused, not loaded). Failures are <see cref="CheckpointFormatException"/>s naming the file and entry.
/// </summary>
public static class ZipEntries
{
    /// <summary>Deflate expands at most about 1032:1; an entry declaring more than this many bytes per compressed byte
    /// (plus <see cref="Slack"/>) is lying about its size.</summary>
    public const long MaxRatio = 1032;

    /// <summary>Bytes any entry may declare beyond <see cref="MaxRatio"/> times its compressed size (tiny entries).</summary>
    public const long Slack = 4096;

    /// <summary>Refuses an entry whose declared size its compressed bytes cannot hold or that is larger than
    /// <paramref name="limit"/> bytes.</summary>
    public static void CheckDeclaredSize(ZipArchiveEntry entry, string path, long fileLength, long limit)
    {
        if (entry.CompressedLength < 0 || entry.CompressedLength > fileLength)
            throw new CheckpointFormatException(
                $"{path}: zip entry {entry.FullName} claims {entry.CompressedLength} compressed bytes in a {fileLength}-byte file (corrupt zip).");
        if (entry.Length < 0 || entry.Length > entry.CompressedLength * MaxRatio + Slack)
            throw new CheckpointFormatException(
                $"{path}: zip entry {entry.FullName} claims {entry.Length} bytes from {entry.CompressedLength} compressed bytes, more than deflate can produce (corrupt zip).");
        if (entry.Length > limit)
            throw new CheckpointFormatException($"{path}: zip entry {entry.FullName} is {entry.Length} bytes; at most {limit} are read.");
    }

    /// <summary>The bytes of an entry of at most <paramref name="limit"/> bytes, checked as the class says.</summary>
    public static byte[] ReadAll(ZipArchiveEntry entry, string path, long fileLength, long limit)
    {
        CheckDeclaredSize(entry, path, fileLength, Math.Min(limit, Array.MaxLength));
        var bytes = new byte[entry.Length];
        ReadInto(entry, bytes, path);
        return bytes;
    }

    /// <summary>Reads an entry into <paramref name="destination"/>, whose length must be the entry's declared size
    /// (check it first with <see cref="CheckDeclaredSize"/>), and checks the stream's end and the CRC-32.</summary>
    public static void ReadInto(ZipArchiveEntry entry, Span<byte> destination, string path)
    {
        if (destination.Length != entry.Length)
            throw new ArgumentException($"{entry.FullName}: destination of {destination.Length} bytes for a {entry.Length}-byte entry.", nameof(destination));
        try
        {
            using var s = entry.Open();
            s.ReadExactly(destination);
            if (s.ReadByte() != -1)
                throw new CheckpointFormatException(
                    $"{path}: zip entry {entry.FullName} holds more than the {entry.Length} bytes its header declares (corrupt zip).");
        }
        catch (Exception e) when (e is InvalidDataException or IOException or NotSupportedException)
        {
            throw new CheckpointFormatException($"{path}: zip entry {entry.FullName} is truncated or corrupt ({e.Message.Split('\n')[0]}).", e);
        }
        var crc = Crc32.Compute(destination);
        if (crc != entry.Crc32)
            throw new CheckpointFormatException(
                $"{path}: zip entry {entry.FullName} fails its CRC-32 check (recorded {entry.Crc32:x8}, computed {crc:x8}): the file is corrupt.");
    }
}
