namespace HiMar.Runtime.Checkpoints;

/// <summary>
/// CRC-32 as zip, gzip and PNG use it (IEEE 802.3 polynomial, reflected, initial and final value 0xFFFFFFFF),
/// table-driven, one byte at a time. Written here because the base class library keeps its own copy internal
/// (System.IO.Compression) and the public one lives in the System.IO.Hashing package, which this project does not
/// reference; the checkpoints it checks are read once, so byte-at-a-time speed (hundreds of MB/s) is enough.
/// </summary>
public static class Crc32
{
    static readonly uint[] Table = BuildTable();

    static uint[] BuildTable()
    {
        var table = new uint[256];
        for (uint i = 0; i < 256; i++)
        {
            var c = i;
            for (var k = 0; k < 8; k++)
                c = (c & 1) != 0 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            table[i] = c;
        }
        return table;
    }

    /// <summary>Continues a CRC-32 over <paramref name="data"/>: pass the previous result (0 to start).</summary>
    public static uint Append(uint crc, ReadOnlySpan<byte> data)
    {
        var c = ~crc;
        foreach (var b in data)
            c = Table[(c ^ b) & 0xFF] ^ (c >> 8);
        return ~c;
    }

    /// <summary>The CRC-32 of <paramref name="data"/>.</summary>
    public static uint Compute(ReadOnlySpan<byte> data) => Append(0, data);
}
