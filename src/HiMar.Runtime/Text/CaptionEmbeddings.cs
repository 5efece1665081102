using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using HiMar.Model;
using HiMar.Runtime.Checkpoints;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Text;

/// <summary>
/// Precomputed caption embeddings, so that training never runs the text encoder: a folder of safetensors shards
/// mapping (image key, caption index) to an L x D context, written by `himar embed-captions`.
/// <list type="bullet">
/// <item>`embeddings.json`: the encoder (name, context length L, width D), the storage dtype, the image keys in
/// example order, the captions' text, and the shards with their row counts.</item>
/// <item>`shard-NNNNN.safetensors`: `context` (M, L, D), `image` (M,) int64 (position in the keys), `caption`
/// (M,) int64 (the caption's index for that image).</item>
/// <item>`empty.safetensors`: `context` (1, L, D), the empty caption (the null context of guidance).</item>
/// </list>
/// Rows are read from the shards on demand (a COCO-sized set is far larger than memory), one seek per row.
/// </summary>
public sealed class CaptionEmbeddings : ICaptionSource, IDisposable
{
    /// <summary>The manifest's file name.</summary>
    public const string ManifestFile = "embeddings.json";

    readonly string dir;
    readonly IReadOnlyList<string> keys;
    readonly IReadOnlyList<IReadOnlyList<string>?> texts;
    readonly (int Shard, long Row)[][] rows; // per example, per caption index
    readonly List<(FileStream Stream, long DataStart)> shards = [];
    readonly ScalarType storage;
    readonly Tensor empty;

    CaptionEmbeddings(string dir, JsonObject manifest, int[]? order)
    {
        this.dir = dir;
        Manifest = manifest;
        string Where(string what) => $"{Path.Combine(dir, ManifestFile)}: {what}";
        ContextLength = manifest["context_length"]?.GetValue<int>() ?? throw new InvalidDataException(Where("no context_length"));
        Width = manifest["width"]?.GetValue<int>() ?? throw new InvalidDataException(Where("no width"));
        storage = manifest["dtype"]?.GetValue<string>() switch
        {
            "float16" => ScalarType.Float16,
            "float32" => ScalarType.Float32,
            var other => throw new InvalidDataException(Where($"dtype '{other}' is not float16 or float32")),
        };
        var allKeys = manifest["images"]?.AsArray().Select(k => k!.GetValue<string>()).ToList() ?? throw new InvalidDataException(Where("no images list"));
        var allTexts = manifest["captions"]?.AsArray().Select(a => (IReadOnlyList<string>?)a!.AsArray().Select(c => c!.GetValue<string>()).ToList()).ToList();
        var perImage = new List<(int Caption, int Shard, long Row)>[allKeys.Count];
        for (var i = 0; i < perImage.Length; i++)
            perImage[i] = [];
        var shardList = manifest["shards"]?.AsArray() ?? throw new InvalidDataException(Where("no shards list"));
        foreach (var node in shardList)
        {
            var file = Path.Combine(dir, node!["file"]!.GetValue<string>());
            var (stream, dataStart, header) = OpenShard(file);
            var shardIndex = shards.Count;
            var context = Entry(header, "context", file);
            if (context.DType != (storage == ScalarType.Float16 ? "F16" : "F32"))
                throw new InvalidDataException($"{file}: `context` is not stored as {manifest["dtype"]}.");
            shards.Add((stream, dataStart + context.Begin));
            var shape = context.Shape;
            if (shape.Length != 3 || shape[1] != ContextLength || shape[2] != Width)
                throw new InvalidDataException($"{file}: context of shape ({string.Join(", ", shape)}), the manifest says (M, {ContextLength}, {Width}).");
            var image = ReadWhole(stream, dataStart, header, "image", file);
            var caption = ReadWhole(stream, dataStart, header, "caption", file);
            if (image.Length != shape[0] || caption.Length != shape[0])
                throw new InvalidDataException($"{file}: {shape[0]} context rows, but {image.Length} `image` and {caption.Length} `caption` entries.");
            for (long r = 0; r < shape[0]; r++)
            {
                var e = image[r];
                if (e < 0 || e >= allKeys.Count)
                    throw new InvalidDataException($"{file}: row {r} names image {e}, outside the {allKeys.Count} keys.");
                perImage[e].Add(((int)caption[r], shardIndex, r));
            }
        }
        var ordered = order ?? Enumerable.Range(0, allKeys.Count).ToArray();
        keys = ordered.Select(i => allKeys[i]).ToList();
        texts = ordered.Select(i => allTexts?[i]).ToList();
        rows = ordered.Select(i =>
        {
            if (perImage[i].Count == 0)
                throw new InvalidDataException(Where($"image '{allKeys[i]}' has no embedded caption."));
            return perImage[i].OrderBy(x => x.Caption).Select(x => (x.Shard, x.Row)).ToArray();
        }).ToArray();
        var emptyFile = SafeTensors.Load(Path.Combine(dir, "empty.safetensors"));
        try
        {
            if (!emptyFile.TryGetValue("context", out var e) || e.dim() != 3 || e.shape[1] != ContextLength || e.shape[2] != Width)
                throw new InvalidDataException($"{Path.Combine(dir, "empty.safetensors")}: no (1, {ContextLength}, {Width}) `context`.");
            empty = e.to(ScalarType.Float32).clone();
        }
        finally
        {
            foreach (var t in emptyFile.Values)
                t.Dispose();
        }
    }

    /// <summary>The manifest.</summary>
    public JsonObject Manifest { get; }

    /// <summary>Context positions per caption L.</summary>
    public int ContextLength { get; }

    /// <summary>Context width D.</summary>
    public int Width { get; }

    /// <summary>The image keys, in example order.</summary>
    public IReadOnlyList<string> Keys => keys;

    /// <inheritdoc/>
    public int Count => keys.Count;

    /// <inheritdoc/>
    public int CaptionsOf(int example) => rows[example].Length;

    /// <inheritdoc/>
    public string? Text(int example, int caption) => texts[example] is { } t && caption < t.Count ? t[caption] : null;

    /// <inheritdoc/>
    public Tensor? EmptyContext => empty.clone();

    /// <summary>Opens a folder in the manifest's example order, or reordered to <paramref name="dataKeys"/> (the
    /// training data's keys, e.g. a latent cache's file names); a key without embeddings is an error naming it.</summary>
    public static CaptionEmbeddings Open(string dir, IReadOnlyList<string>? dataKeys = null)
    {
        var path = Path.Combine(dir, ManifestFile);
        if (!File.Exists(path))
            throw new FileNotFoundException($"{path}: no such file (make caption embeddings with `himar embed-captions`).", path);
        JsonObject manifest;
        try
        {
            manifest = JsonNode.Parse(File.ReadAllText(path))?.AsObject() ?? throw new InvalidDataException($"{path}: empty.");
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{path}: not JSON ({e.Message}).", e);
        }
        int[]? order = null;
        if (dataKeys != null)
        {
            var index = manifest["images"]!.AsArray().Select((k, i) => (k!.GetValue<string>(), i)).ToDictionary(x => x.Item1, x => x.i);
            order = dataKeys.Select(k => index.TryGetValue(k, out var i) ? i : throw new InvalidDataException($"{path}: no embeddings for image '{k}' of the training data.")).ToArray();
        }
        return new CaptionEmbeddings(dir, manifest, order);
    }

    /// <inheritdoc/>
    public Condition Batch(HiMAR model, IReadOnlyList<int> examples, IReadOnlyList<int> captions)
    {
        var elem = storage == ScalarType.Float16 ? 2 : 4;
        var rowBytes = (long)ContextLength * Width * elem;
        var buffer = new byte[rowBytes * examples.Count];
        for (var i = 0; i < examples.Count; i++)
        {
            var (shard, row) = rows[examples[i]][captions[i]];
            var (stream, start) = shards[shard];
            stream.Seek(start + row * rowBytes, SeekOrigin.Begin);
            stream.ReadExactly(buffer, (int)(i * rowBytes), (int)rowBytes);
        }
        using var raw = torch.empty([examples.Count, ContextLength, Width], storage);
        raw.bytes = buffer;
        return Condition.NewContext(raw.to(model.DType, model.Device));
    }

    /// <inheritdoc/>
    public void CheckFits(HiMarConfig config)
    {
        if (config.Text.Conditioning != Conditioning.Text || config.Text.Encoder != TextEncoderKind.External)
            throw new ArgumentException($"{dir}: precomputed embeddings condition a text model with an external encoder (conditioning text, text_encoder external)");
        if (config.ContextLength != ContextLength || config.Text.ExternalWidth != Width)
            throw new ArgumentException($"{dir}: embeddings are {ContextLength} x {Width}, the model reads {config.ContextLength} (buffer_size) x {config.Text.ExternalWidth} (context_dim)");
    }

    /// <summary>Closes the shards.</summary>
    public void Dispose()
    {
        foreach (var (s, _) in shards)
            s.Dispose();
        empty.Dispose();
    }

    /// <summary>
    /// Embeds every caption with <paramref name="encoder"/> into a new folder (written whole or not at all):
    /// shards of at most <paramref name="shardRows"/> rows, stored as float16 (or float32).
    /// <paramref name="progress"/> gets (captions done, total).
    /// </summary>
    public static JsonObject Build(IReadOnlyList<string> keys, IReadOnlyList<IReadOnlyList<string>> captions, ITextEncoder encoder, string encoderName, string outDir,
        bool float16 = true, int shardRows = 20_000, int batchSize = 64, Action<int, int>? progress = null)
    {
        if (keys.Count != captions.Count)
            throw new ArgumentException($"{keys.Count} image keys, {captions.Count} caption lists");
        if (keys.Distinct().Count() != keys.Count)
            throw new ArgumentException("image keys repeat");
        var full = Path.GetFullPath(outDir);
        var staging = full.TrimEnd('/') + $".embedding-{Guid.NewGuid():N}";
        Directory.CreateDirectory(staging);
        try
        {
            var items = captions.SelectMany((list, e) => list.Select((c, k) => (Image: e, Caption: k, Text: c))).ToList();
            var dtype = float16 ? ScalarType.Float16 : ScalarType.Float32;
            var shardNodes = new JsonArray();
            var done = 0;
            for (var s = 0; s * shardRows < items.Count; s++)
            {
                var part = items.Skip(s * shardRows).Take(shardRows).ToList();
                var chunks = new List<Tensor>();
                try
                {
                    for (var b = 0; b < part.Count; b += batchSize)
                    {
                        var batch = part.Skip(b).Take(batchSize).Select(x => x.Text).ToList();
                        using var ctx = encoder.Encode(batch);
                        chunks.Add(ctx.to(dtype, torch.CPU).contiguous());
                        done += batch.Count;
                        progress?.Invoke(done, items.Count);
                    }
                    var file = $"shard-{s:D5}.safetensors";
                    using var context = torch.cat(chunks, 0);
                    using var image = torch.tensor(part.Select(x => (long)x.Image).ToArray());
                    using var caption = torch.tensor(part.Select(x => (long)x.Caption).ToArray());
                    SafeTensors.Save(Path.Combine(staging, file), new Dictionary<string, Tensor> { ["context"] = context, ["image"] = image, ["caption"] = caption });
                    shardNodes.Add(new JsonObject { ["file"] = file, ["rows"] = part.Count });
                }
                finally
                {
                    foreach (var t in chunks)
                        t.Dispose();
                }
            }
            using (var e = encoder.EncodeEmpty())
            using (var e32 = e.to(ScalarType.Float32, torch.CPU).contiguous())
                SafeTensors.Save(Path.Combine(staging, "empty.safetensors"), new Dictionary<string, Tensor> { ["context"] = e32 });
            var manifest = new JsonObject
            {
                ["encoder"] = encoderName,
                ["context_length"] = encoder.ContextLength,
                ["width"] = encoder.Width,
                ["dtype"] = float16 ? "float16" : "float32",
                ["count"] = keys.Count,
                ["captions_total"] = items.Count,
                ["images"] = new JsonArray(keys.Select(k => (JsonNode)JsonValue.Create(k)).ToArray()),
                ["captions"] = new JsonArray(captions.Select(l => (JsonNode)new JsonArray(l.Select(c => (JsonNode)JsonValue.Create(c)).ToArray())).ToArray()),
                ["shards"] = shardNodes,
            };
            AtomicFile.WriteText(Path.Combine(staging, ManifestFile), manifest.ToJsonString(new JsonSerializerOptions { WriteIndented = false }));
            if (Directory.Exists(full))
                Directory.Delete(full, true);
            Directory.Move(staging, full);
            return manifest;
        }
        finally
        {
            if (Directory.Exists(staging))
                Directory.Delete(staging, true);
        }
    }

    /// <summary>Opens a shard and reads its safetensors header, checked as <see cref="SafeTensors.ParseHeader"/> checks it.</summary>
    static (FileStream, long, Dictionary<string, SafeTensorsEntry>) OpenShard(string file)
    {
        if (!File.Exists(file))
            throw new FileNotFoundException($"{file}: shard listed in the manifest is missing.", file);
        var stream = new FileStream(file, FileMode.Open, FileAccess.Read, FileShare.Read);
        try
        {
            Span<byte> len = stackalloc byte[8];
            stream.ReadExactly(len);
            var n = BinaryPrimitives.ReadInt64LittleEndian(len);
            if (n <= 0 || n > SafeTensors.MaxHeaderLength || n + 8 > stream.Length)
                throw new InvalidDataException($"{file}: not a safetensors file (header length {n}).");
            var headerBytes = new byte[n];
            stream.ReadExactly(headerBytes);
            var entries = SafeTensors.ParseHeader(headerBytes, stream.Length - 8 - n, file, out _);
            return (stream, 8 + n, entries.ToDictionary(e => e.Name));
        }
        catch (Exception e) when (e is EndOfStreamException)
        {
            stream.Dispose();
            throw new InvalidDataException($"{file}: not a safetensors file ({e.Message}).", e);
        }
        catch
        {
            stream.Dispose();
            throw;
        }
    }

    static SafeTensorsEntry Entry(Dictionary<string, SafeTensorsEntry> header, string name, string file) =>
        header.TryGetValue(name, out var entry) ? entry : throw new InvalidDataException($"{file}: no `{name}` tensor.");

    static long[] ReadWhole(FileStream stream, long dataStart, Dictionary<string, SafeTensorsEntry> header, string name, string file)
    {
        var entry = Entry(header, name, file);
        if (entry.DType != "I64")
            throw new InvalidDataException($"{file}: `{name}` is not int64.");
        if (entry.End - entry.Begin > Array.MaxLength)
            throw new InvalidDataException($"{file}: `{name}` is {entry.End - entry.Begin} bytes, too large to read.");
        var bytes = new byte[entry.End - entry.Begin];
        stream.Seek(dataStart + entry.Begin, SeekOrigin.Begin);
        stream.ReadExactly(bytes);
        var values = new long[bytes.Length / 8];
        Buffer.BlockCopy(bytes, 0, values, 0, bytes.Length);
        return values;
    }
}
