namespace HiMar.Runtime.Checkpoints;

/// <summary>
/// CRC-32 as zip, gzip and PNG use it (IEEE 802.3 polynomial, reflected, initial and final value 0xFFFFFFFF),
/// table-driven, eight bytes at a time ("slicing-by-8", about 1-2 GB/s). Written here because the base class library
/// keeps its own copy internal (System.IO.Compression) and the public one lives in the System.IO.Hashing package,
/// which this project does not reference.
/// </summary>
public static class Crc32
{
    // Tables[0] is the classic byte table; Tables[k][i] is the CRC of byte i followed by k zero bytes.
    static readonly uint[][] Tables = BuildTables();

    static uint[][] BuildTables()
    {
        var tables = new uint[8][];
        for (var k = 0; k < 8; k++)
            tables[k] = new uint[256];
        for (uint i = 0; i < 256; i++)
        {
            var c = i;
            for (var bit = 0; bit < 8; bit++)
                c = (c & 1) != 0 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            tables[0][i] = c;
        }
        for (var k = 1; k < 8; k++)
            for (var i = 0; i < 256; i++)
                tables[k][i] = (tables[k - 1][i] >> 8) ^ tables[0][tables[k - 1][i] & 0xFF];
        return tables;
    }

    /// <summary>Continues a CRC-32 over <paramref name="data"/>: pass the previous result (0 to start).</summary>
    public static uint Append(uint crc, ReadOnlySpan<byte> data)
    {
        var c = ~crc;
        uint[] t0 = Tables[0], t1 = Tables[1], t2 = Tables[2], t3 = Tables[3], t4 = Tables[4], t5 = Tables[5], t6 = Tables[6], t7 = Tables[7];
        while (data.Length >= 8)
        {
            var a = c ^ System.Buffers.Binary.BinaryPrimitives.ReadUInt32LittleEndian(data);
            var b = System.Buffers.Binary.BinaryPrimitives.ReadUInt32LittleEndian(data[4..]);
            c = t7[a & 0xFF] ^ t6[(a >> 8) & 0xFF] ^ t5[(a >> 16) & 0xFF] ^ t4[a >> 24]
                ^ t3[b & 0xFF] ^ t2[(b >> 8) & 0xFF] ^ t1[(b >> 16) & 0xFF] ^ t0[b >> 24];
            data = data[8..];
        }
        foreach (var x in data)
            c = t0[(c ^ x) & 0xFF] ^ (c >> 8);
        return ~c;
    }

    /// <summary>The CRC-32 of <paramref name="data"/>.</summary>
    public static uint Compute(ReadOnlySpan<byte> data) => Append(0, data);
}
