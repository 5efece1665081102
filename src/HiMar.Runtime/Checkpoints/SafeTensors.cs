using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Checkpoints;

/// <summary>A checkpoint or weight file could not be read or does not fit; the message names the file and the problem.</summary>
public sealed class CheckpointFormatException(string message, Exception? inner = null) : BadInputException(message, inner);

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

    /// <summary>Parses safetensors bytes; <paramref name="what"/> names the source in error messages.</summary>
    public static Dictionary<string, Tensor> Parse(byte[] bytes, string what, Func<string, bool>? filter, out Dictionary<string, string> metadata)
    {
        if (bytes.Length < 8)
            throw new CheckpointFormatException($"{what}: too short for a safetensors file ({bytes.Length} bytes).");
        var headerLength = BinaryPrimitives.ReadUInt64LittleEndian(bytes);
        if (headerLength == 0 || headerLength > (ulong)(bytes.Length - 8))
            throw new CheckpointFormatException($"{what}: not a safetensors file (header length {headerLength} does not fit in {bytes.Length} bytes).");
        JsonObject header;
        try
        {
            header = JsonNode.Parse(Encoding.UTF8.GetString(bytes, 8, (int)headerLength))?.AsObject()
                ?? throw new CheckpointFormatException($"{what}: the safetensors header is empty.");
        }
        catch (JsonException e)
        {
            throw new CheckpointFormatException($"{what}: the safetensors header is not valid JSON ({e.Message}).", e);
        }
        long dataStart = 8 + (long)headerLength;
        long dataLength = bytes.Length - dataStart;
        metadata = [];
        var result = new Dictionary<string, Tensor>();
        try
        {
            foreach (var (name, node) in header)
            {
                if (name == "__metadata__")
                {
                    foreach (var (k, v) in node?.AsObject() ?? [])
                        metadata[k] = v?.GetValue<string>() ?? "";
                    continue;
                }
                if (filter != null && !filter(name))
                    continue;
                var entry = node?.AsObject() ?? throw new CheckpointFormatException($"{what}: entry '{name}' is not an object.");
                var dtype = entry["dtype"]?.GetValue<string>() ?? "";
                if (!Types.TryGetValue(dtype, out var type))
                    throw new CheckpointFormatException($"{what}: tensor '{name}' has unsupported dtype '{dtype}'.");
                var shape = (entry["shape"]?.AsArray() ?? []).Select(s => s!.GetValue<long>()).ToArray();
                var offsets = (entry["data_offsets"]?.AsArray() ?? []).Select(s => s!.GetValue<long>()).ToArray();
                long count = shape.Aggregate(1L, (a, b) => a * b);
                if (offsets.Length != 2 || offsets[0] < 0 || offsets[1] < offsets[0] || offsets[1] > dataLength)
                    throw new CheckpointFormatException($"{what}: tensor '{name}' has data offsets outside the file (truncated?).");
                if (offsets[1] - offsets[0] != count * type.Size)
                    throw new CheckpointFormatException($"{what}: tensor '{name}' has {offsets[1] - offsets[0]} bytes for shape [{string.Join(", ", shape)}] of {dtype}.");
                var span = bytes.AsSpan((int)(dataStart + offsets[0]), (int)(offsets[1] - offsets[0]));
                var t = torch.empty(shape, type.Type);
                if (count > 0)
                    span.CopyTo(t.bytes);
                result[name] = t;
            }
        }
        catch (Exception e) when (e is InvalidOperationException or FormatException or JsonException)
        {
            foreach (var t in result.Values)
                t.Dispose();
            throw new CheckpointFormatException($"{what}: malformed safetensors header ({e.Message}).", e);
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
