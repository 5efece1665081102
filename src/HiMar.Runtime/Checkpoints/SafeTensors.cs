using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Checkpoints;

/// <summary>A checkpoint or weight file could not be read or does not fit; the message names the file and the problem.</summary>
public sealed class CheckpointFormatException(string message, Exception? inner = null) : BadInputException(message, inner);

/// <summary>One tensor of a safetensors header: its name, dtype (code and type), shape and byte range, relative to
/// the start of the data section.</summary>
public sealed record SafeTensorsEntry(string Name, string DType, ScalarType Type, long[] Shape, long Begin, long End);

/// <summary>
/// Reads and writes the safetensors format: an 8-byte little-endian header length, a JSON header mapping each
/// name to its dtype, shape and byte range, then the raw little-endian data. Written here rather than taken
/// from TorchSharp.PyBridge, which would add a pickle library and its own TorchSharp pin for a format this
/// small; the reference `.pth` reader (a safe pickle subset) lives beside this file.
/// </summary>
public static class SafeTensors
{
    static readonly Dictionary<string, (ScalarType Type, int Size)> Types = new()
    {
        ["F64"] = (ScalarType.Float64, 8),
        ["F32"] = (ScalarType.Float32, 4),
        ["F16"] = (ScalarType.Float16, 2),
        ["BF16"] = (ScalarType.BFloat16, 2),
        ["I64"] = (ScalarType.Int64, 8),
        ["I32"] = (ScalarType.Int32, 4),
        ["I16"] = (ScalarType.Int16, 2),
        ["I8"] = (ScalarType.Int8, 1),
        ["U8"] = (ScalarType.Byte, 1),
        ["BOOL"] = (ScalarType.Bool, 1),
    };

    static string Code(ScalarType t) => Types.First(kv => kv.Value.Type == t).Key;

    /// <summary>Reads every tensor of a safetensors file, on the CPU, in the file's dtypes.</summary>
    public static Dictionary<string, Tensor> Load(string path) => Load(path, null, out _);

    /// <summary>Reads the tensors of a safetensors file whose names pass <paramref name="filter"/> (all when null),
    /// and returns the header's `__metadata__` strings.</summary>
    public static Dictionary<string, Tensor> Load(string path, Func<string, bool>? filter, out Dictionary<string, string> metadata)
    {
        byte[] bytes;
        try
        {
            bytes = File.ReadAllBytes(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new CheckpointFormatException($"{path}: cannot be read ({e.Message}).", e);
        }
        return Parse(bytes, path, filter, out metadata);
    }

    /// <summary>The largest header read, as in the reference reader: 100 MB of JSON.</summary>
    public const long MaxHeaderLength = 100_000_000;

    /// <summary>The most dimensions a tensor of the header may have.</summary>
    public const int MaxDimensions = 64;

    /// <summary>Parses safetensors bytes; <paramref name="what"/> names the source in error messages.</summary>
    public static Dictionary<string, Tensor> Parse(byte[] bytes, string what, Func<string, bool>? filter, out Dictionary<string, string> metadata)
    {
        if (bytes.Length < 8)
            throw new CheckpointFormatException($"{what}: too short for a safetensors file ({bytes.Length} bytes).");
        var headerLength = BinaryPrimitives.ReadUInt64LittleEndian(bytes);
        if (headerLength == 0 || headerLength > (ulong)(bytes.Length - 8) || headerLength > MaxHeaderLength)
            throw new CheckpointFormatException($"{what}: not a safetensors file (header length {headerLength} does not fit in {bytes.Length} bytes).");
        long dataStart = 8 + (long)headerLength;
        var entries = ParseHeader(bytes.AsMemory(8, (int)headerLength), bytes.Length - dataStart, what, out metadata);
        var result = new Dictionary<string, Tensor>();
        try
        {
            foreach (var e in entries)
            {
                if (filter != null && !filter(e.Name))
                    continue;
                var t = torch.empty(e.Shape, e.Type);
                if (e.End > e.Begin)
                    bytes.AsSpan((int)(dataStart + e.Begin), (int)(e.End - e.Begin)).CopyTo(t.bytes);
                result[e.Name] = t;
            }
        }
        catch
        {
            foreach (var t in result.Values)
                t.Dispose();
            throw;
        }
        return result;
    }

    /// <summary>
    /// Parses and checks a safetensors header (the JSON after the 8-byte length) for a data section of
    /// <paramref name="dataLength"/> bytes: a JSON object whose `__metadata__` maps strings to strings and whose other
    /// entries each have a known dtype, a shape of non-negative integers and two integer data offsets; each entry's byte
    /// count (computed with overflow checks) equals its offsets' difference, and the entries tile the data section
    /// exactly, without gaps or overlaps. Entries come back in the header's order, offsets relative to the data section.
    /// </summary>
    public static IReadOnlyList<SafeTensorsEntry> ParseHeader(ReadOnlyMemory<byte> header, long dataLength, string what, out Dictionary<string, string> metadata)
    {
        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(header);
        }
        catch (JsonException e)
        {
            throw new CheckpointFormatException($"{what}: the safetensors header is not valid JSON ({e.Message.Split('\n')[0]}).", e);
        }
        using (doc)
        {
            try
            {
                return Entries(doc.RootElement, dataLength, what, out metadata);
            }
            catch (Exception e) when (e is InvalidOperationException or ArgumentException or FormatException)
            {
                // GetString on text that is not valid UTF-8, and the like: whatever the checks above let through.
                throw new CheckpointFormatException($"{what}: malformed safetensors header ({e.Message.Split('\n')[0]}).", e);
            }
        }
    }

    static List<SafeTensorsEntry> Entries(JsonElement root, long dataLength, string what, out Dictionary<string, string> metadata)
    {
        if (root.ValueKind != JsonValueKind.Object)
            throw new CheckpointFormatException($"{what}: the safetensors header is a JSON {Kind(root)}, not an object of tensors.");
        metadata = [];
        var entries = new List<SafeTensorsEntry>();
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (var property in root.EnumerateObject())
        {
            var name = property.Name;
            if (!names.Add(name))
                throw new CheckpointFormatException($"{what}: the safetensors header names '{name}' twice.");
            var node = property.Value;
            if (name == "__metadata__")
            {
                if (node.ValueKind != JsonValueKind.Object)
                    throw new CheckpointFormatException($"{what}: the safetensors __metadata__ is a JSON {Kind(node)}, not an object of strings.");
                foreach (var m in node.EnumerateObject())
                    metadata[m.Name] = m.Value.ValueKind == JsonValueKind.String ? m.Value.GetString()!
                        : throw new CheckpointFormatException($"{what}: the safetensors __metadata__ entry '{m.Name}' is a JSON {Kind(m.Value)}, not a string.");
                continue;
            }
            entries.Add(Entry(name, node, dataLength, what));
        }
        // The entries must tile the data section: sorted by offset, each starts where the previous ends.
        long covered = 0;
        foreach (var e in entries.OrderBy(e => e.Begin).ThenBy(e => e.End))
        {
            if (e.Begin < covered)
                throw new CheckpointFormatException($"{what}: tensor '{e.Name}' (bytes {e.Begin} to {e.End}) overlaps another tensor's data, which reaches byte {covered}.");
            if (e.Begin > covered)
                throw new CheckpointFormatException($"{what}: the safetensors data has a gap: no tensor holds bytes {covered} to {e.Begin} (tensor '{e.Name}' starts after it).");
            covered = e.End;
        }
        if (covered != dataLength)
            throw new CheckpointFormatException($"{what}: the tensors hold {covered} bytes, but the data section after the header has {dataLength}.");
        return entries;
    }

    static SafeTensorsEntry Entry(string name, JsonElement node, long dataLength, string what)
    {
        CheckpointFormatException Bad(string problem) => new($"{what}: tensor '{name}' {problem}.");
        if (node.ValueKind != JsonValueKind.Object)
            throw Bad($"is a JSON {Kind(node)}, not an object with dtype, shape and data_offsets");
        if (!node.TryGetProperty("dtype", out var dtypeNode) || dtypeNode.ValueKind != JsonValueKind.String)
            throw Bad("has no dtype string");
        var dtype = dtypeNode.GetString()!;
        if (!Types.TryGetValue(dtype, out var type))
            throw Bad($"has unsupported dtype '{dtype}'");
        if (!node.TryGetProperty("shape", out var shapeNode) || shapeNode.ValueKind != JsonValueKind.Array)
            throw Bad("has no shape array");
        if (shapeNode.GetArrayLength() > MaxDimensions)
            throw Bad($"has {shapeNode.GetArrayLength()} dimensions (at most {MaxDimensions} are read)");
        var shape = shapeNode.EnumerateArray().Select(d => d.ValueKind == JsonValueKind.Number && d.TryGetInt64(out var v) ? v : -1).ToArray();
        var shown = $"[{string.Join(", ", shapeNode.EnumerateArray().Select(d => d.GetRawText()))}]";
        if (shape.Any(d => d < 0))
            throw Bad($"has shape {shown}: dimensions must be integers >= 0");
        if (!node.TryGetProperty("data_offsets", out var offsetsNode) || offsetsNode.ValueKind != JsonValueKind.Array
            || offsetsNode.GetArrayLength() != 2
            || offsetsNode.EnumerateArray().Any(o => o.ValueKind != JsonValueKind.Number || !o.TryGetInt64(out var v) || v < 0))
            throw Bad("has data_offsets that are not two integers >= 0");
        long begin = offsetsNode[0].GetInt64(), end = offsetsNode[1].GetInt64();
        if (end < begin || end > dataLength)
            throw Bad($"has data offsets outside the file (truncated?): bytes {begin} to {end} of a {dataLength}-byte data section");
        if (!TryByteCount(shape, type.Size, out var bytes))
            throw Bad($"has shape {shown}: its byte count overflows 64 bits");
        if (end - begin != bytes)
            throw Bad($"has {end - begin} bytes for shape {shown} of {dtype}, which needs {bytes}");
        return new SafeTensorsEntry(name, dtype, type.Type, shape, begin, end);
    }

    /// <summary>
    /// The bytes of a tensor of <paramref name="shape"/>, false when the count overflows 64 bits. Zero dimensions count as
    /// one while multiplying, so that a shape like [0, 2^62, 2^62] is refused, as libtorch refuses it.
    /// </summary>
    internal static bool TryByteCount(IReadOnlyList<long> shape, int elementSize, out long bytes)
    {
        long product = elementSize;
        var empty = false;
        try
        {
            foreach (var d in shape)
            {
                empty |= d == 0;
                product = checked(product * Math.Max(d, 1));
            }
        }
        catch (OverflowException)
        {
            bytes = -1;
            return false;
        }
        bytes = empty ? 0 : product;
        return true;
    }

    static string Kind(JsonElement e) => e.ValueKind switch
    {
        JsonValueKind.Object => "object",
        JsonValueKind.Array => "array",
        JsonValueKind.String => "string",
        JsonValueKind.Number => "number",
        JsonValueKind.True or JsonValueKind.False => "boolean",
        _ => "null",
    };

    /// <summary>
    /// Writes tensors (sorted by name, contiguous CPU copies) as safetensors, atomically: to a temporary file
    /// beside <paramref name="path"/>, then renamed over it.
    /// </summary>
    public static void Save(string path, IReadOnlyDictionary<string, Tensor> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        var header = new JsonObject();
        if (metadata is { Count: > 0 })
        {
            var meta = new JsonObject();
            foreach (var (k, v) in metadata.OrderBy(kv => kv.Key, StringComparer.Ordinal))
                meta[k] = v;
            header["__metadata__"] = meta;
        }
        var blobs = new List<byte[]>();
        long offset = 0;
        foreach (var (name, tensor) in tensors.OrderBy(kv => kv.Key, StringComparer.Ordinal))
        {
            using var cpu = tensor.detach().cpu().contiguous();
            var data = cpu.bytes.ToArray();
            header[name] = new JsonObject
            {
                ["dtype"] = Code(cpu.dtype),
                ["shape"] = new JsonArray(cpu.shape.Select(s => (JsonNode)s).ToArray()),
                ["data_offsets"] = new JsonArray(offset, offset + data.Length),
            };
            offset += data.Length;
            blobs.Add(data);
        }
        var json = Encoding.UTF8.GetBytes(header.ToJsonString());
        // Pad the header with spaces to a multiple of 8 bytes, as the reference writer does.
        var padded = (json.Length + 7) / 8 * 8;
        AtomicFile.Write(path, stream =>
        {
            Span<byte> len = stackalloc byte[8];
            BinaryPrimitives.WriteUInt64LittleEndian(len, (ulong)padded);
            stream.Write(len);
            stream.Write(json);
            for (var i = json.Length; i < padded; i++)
                stream.WriteByte((byte)' ');
            foreach (var b in blobs)
                stream.Write(b);
        });
    }
}

/// <summary>Writes files so that a reader sees the old contents or the new, never half: temp file, flush, rename.</summary>
public static class AtomicFile
{
    /// <summary>Writes <paramref name="path"/> through a temporary file in the same folder.</summary>
    public static void Write(string path, Action<Stream> write)
    {
        var full = Path.GetFullPath(path);
        var dir = Path.GetDirectoryName(full) ?? ".";
        Directory.CreateDirectory(dir);
        var temp = Path.Combine(dir, $".{Path.GetFileName(full)}.{Guid.NewGuid():N}.tmp");
        try
        {
            using (var stream = new FileStream(temp, FileMode.CreateNew, FileAccess.Write))
            {
                write(stream);
                stream.Flush(flushToDisk: true);
            }
            File.Move(temp, full, overwrite: true);
        }
        finally
        {
            if (File.Exists(temp))
                File.Delete(temp);
        }
    }

    /// <summary>Writes text atomically.</summary>
    public static void WriteText(string path, string text) =>
        Write(path, s => s.Write(Encoding.UTF8.GetBytes(text)));
}
