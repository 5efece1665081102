using System.IO.Compression;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Checkpoints;

/// <summary>
/// A PyTorch <c>torch.save</c> checkpoint (<c>.pth</c>, <c>.ckpt</c>) read without Python: the zip format PyTorch
/// writes since 1.6, holding <c>&lt;prefix&gt;/data.pkl</c> (the pickled object), <c>&lt;prefix&gt;/data/&lt;key&gt;</c>
/// (raw little-endian storages) and <c>&lt;prefix&gt;/version</c>; and the legacy stream of PyTorch 0.4 to 1.5
/// (published weights of that era, such as pytorch-fid's Inception file): four pickles (the magic number, the
/// protocol version 1001, a dict of system facts, the object) and a pickled list of storage keys, then each
/// storage as an int64 element count and its raw little-endian data. The pickles run through <see cref="SafeUnpickler"/>,
/// which accepts only tensors, dicts, lists, tuples, scalars and <c>argparse.Namespace</c> (reference
/// <c>util/misc.save_model</c> writes <c>{model, model_ema, optimizer, epoch, scaler, args}</c>).
/// The checkpoint owns its tensors (CPU, contiguous, no grad) and disposes them with itself; views of one storage
/// share its memory, as after <c>torch.load</c>.
/// </summary>
public sealed class TorchCheckpoint : IDisposable
{
    readonly List<Tensor> tensors;

    TorchCheckpoint(string path, object? root, List<Tensor> tensors)
    {
        Path = path;
        Root = root;
        this.tensors = tensors;
    }

    /// <summary>The file the checkpoint was read from.</summary>
    public string Path { get; }

    /// <summary>
    /// The unpickled object: <c>Dictionary&lt;string, object?&gt;</c> for dicts (insertion order kept; int keys
    /// written in decimal), <c>List&lt;object?&gt;</c> for lists and sets, <c>object?[]</c> for tuples,
    /// <c>long</c>, <c>double</c>, <c>string</c>, <c>bool</c>, <c>byte[]</c>, null, <see cref="Tensor"/> and
    /// <see cref="PickledNamespace"/>.
    /// </summary>
    public object? Root { get; }

    /// <summary>Reads a <c>torch.save</c> checkpoint, zip or legacy; any problem is a
    /// <see cref="CheckpointFormatException"/> naming the file.</summary>
    public static TorchCheckpoint Read(string path)
    {
        FileStream stream;
        try
        {
            stream = File.OpenRead(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new CheckpointFormatException($"{path}: cannot be read ({e.Message}).", e);
        }
        using (stream)
        {
            Span<byte> magic = stackalloc byte[4];
            var n = stream.Read(magic);
            stream.Position = 0;
            var budget = new TensorBudget(path, stream.Length);
            if (n >= 2 && magic[0] == 0x80 && !magic[..Math.Min(n, 4)].SequenceEqual("PK\u0003\u0004"u8))
                return new LegacyReader(ReadAll(stream, path), path, budget).Run();
            var zip = OpenZip(stream, path, n == 4 && magic.SequenceEqual("PK\u0003\u0004"u8));
            using (zip)
            {
                try
                {
                    return new Reader(zip, path, stream.Length, budget).Run();
                }
                catch (Exception e) when (e is InvalidDataException or IOException or NotSupportedException)
                {
                    // The central directory is read lazily: a corrupt one shows up at the first look at the entries.
                    throw new CheckpointFormatException($"{path}: the checkpoint zip is truncated or corrupt ({e.Message.Split('\n')[0]}).", e);
                }
            }
        }
    }

    static byte[] ReadAll(FileStream stream, string path)
    {
        if (stream.Length > Array.MaxLength)
            throw new CheckpointFormatException($"{path}: {stream.Length} bytes is too large for a legacy-format checkpoint.");
        var bytes = new byte[stream.Length];
        try
        {
            stream.ReadExactly(bytes);
        }
        catch (IOException e)
        {
            throw new CheckpointFormatException($"{path}: cannot be read ({e.Message}).", e);
        }
        return bytes;
    }

    static ZipArchive OpenZip(FileStream stream, string path, bool isZip)
    {
        try
        {
            return new ZipArchive(stream, ZipArchiveMode.Read, leaveOpen: true);
        }
        catch (Exception e) when (e is InvalidDataException or IOException or ArgumentException or NotSupportedException)
        {
            throw new CheckpointFormatException(isZip
                ? $"{path}: the checkpoint zip is truncated or corrupt ({e.Message})."
                : $"{path}: not a torch.save checkpoint (neither a zip archive nor the legacy pickle stream of PyTorch before 1.6).", e);
        }
    }

    /// <summary>
    /// The tensors of a state dict: the entry <paramref name="key"/> of the root dict (<c>"model"</c>,
    /// <c>"model_ema"</c>), or the root itself when it is a state dict without that key. The tensors belong to the
    /// checkpoint; copy what outlives it.
    /// </summary>
    public Dictionary<string, Tensor> StateDict(string key)
    {
        var root = Root as Dictionary<string, object?>
            ?? throw new CheckpointFormatException($"{Path}: the checkpoint holds a {Describe(Root)}, not a dict, so it has no state dict '{key}'.");
        Dictionary<string, object?> dict;
        if (root.TryGetValue(key, out var entry))
            dict = entry as Dictionary<string, object?>
                ?? throw new CheckpointFormatException($"{Path}: '{key}' is a {Describe(entry)}, not a state dict.");
        else if (root.Count > 0 && root.Values.All(v => v is Tensor))
            dict = root;
        else
            throw new CheckpointFormatException(
                $"{Path}: has no state dict '{key}' (its top-level keys are {string.Join(", ", root.Keys.Select(k => $"'{k}'"))}).");
        var result = new Dictionary<string, Tensor>();
        foreach (var (name, value) in dict)
            result[name] = value as Tensor
                ?? throw new CheckpointFormatException($"{Path}: state dict '{key}' entry '{name}' is a {Describe(value)}, not a tensor.");
        return result;
    }

    /// <summary>
    /// The reference's training arguments (the root's <c>args</c>, an <c>argparse.Namespace</c>), for inferring the
    /// model configuration; null when the checkpoint has none. Attributes whose value is None are left out.
    /// </summary>
    public IReadOnlyDictionary<string, object>? Args()
    {
        if (Root is not Dictionary<string, object?> root || !root.TryGetValue("args", out var args) || args is null)
            return null;
        var values = args switch
        {
            PickledNamespace ns => ns.Values,
            Dictionary<string, object?> d => d,
            _ => throw new CheckpointFormatException($"{Path}: 'args' is a {Describe(args)}, not an argparse.Namespace."),
        };
        var result = new Dictionary<string, object>();
        foreach (var (k, v) in values)
            if (v is not null)
                result[k] = v;
        return result;
    }

    static string Describe(object? value) => value switch
    {
        null => "None",
        Dictionary<string, object?> => "dict",
        List<object?> => "list",
        object?[] => "tuple",
        Tensor => "tensor",
        PickledNamespace => "argparse.Namespace",
        _ => value.GetType().Name,
    };

    /// <summary>Disposes every tensor of the checkpoint.</summary>
    public void Dispose()
    {
        foreach (var t in tensors)
            t.Dispose();
        tensors.Clear();
    }

    /// <summary>One storage of the zip, read once and shared by every tensor that views it.</summary>
    sealed record Storage(string Key, StorageType Type, Tensor Data);

    /// <summary>
    /// How many bytes of tensors one read may build: <see cref="Multiple"/> times the file's size, plus
    /// <see cref="Slack"/>. A state dict views each storage about once (tied weights twice), so this is generous for
    /// real checkpoints, while a stride-0 view stretching a few bytes over gigabytes, or one storage rebuilt ten thousand
    /// times, is refused before anything is allocated.
    /// </summary>
    internal sealed class TensorBudget(string path, long fileLength)
    {
        /// <summary>The multiple of the file size that the built tensors may reach.</summary>
        public const long Multiple = 4;

        /// <summary>Bytes allowed beyond the multiple, for tiny files.</summary>
        public const long Slack = 16L << 20;

        readonly long limit = fileLength > (long.MaxValue - Slack) / Multiple ? long.MaxValue : fileLength * Multiple + Slack;
        long spent;

        /// <summary>Accounts for <paramref name="bytes"/> more bytes of tensors, or refuses them.</summary>
        public void Spend(long bytes, string what)
        {
            if (bytes < 0 || bytes > limit - spent)
                throw new CheckpointFormatException(
                    $"{path}: {what} would bring the tensors built to more than {limit} bytes ({Multiple} times the file's {fileLength} bytes, plus {Slack}); refused as a view bomb.");
            spent += bytes;
        }
    }

    /// <summary>One read: the zip entries, the storages read so far and the tensors built.</summary>
    sealed class Reader(ZipArchive zip, string path, long fileLength, TensorBudget budget)
    {
        readonly Dictionary<string, Storage> storages = [];
        readonly List<Tensor> built = [];
        string prefix = "";

        public TorchCheckpoint Run()
        {
            var pickles = zip.Entries.Where(e => e.FullName.EndsWith("/data.pkl", StringComparison.Ordinal)
                && e.FullName.IndexOf('/') == e.FullName.Length - "/data.pkl".Length).ToList();
            if (pickles.Count != 1)
                throw new CheckpointFormatException(pickles.Count == 0
                    ? $"{path}: the zip has no <prefix>/data.pkl entry, so it is not a torch.save checkpoint."
                    : $"{path}: the zip has {pickles.Count} data.pkl entries ({string.Join(", ", pickles.Select(e => e.FullName))}).");
            prefix = pickles[0].FullName[..^"data.pkl".Length];
            if (zip.GetEntry(prefix + "byteorder") is { } order && System.Text.Encoding.ASCII.GetString(ZipEntries.ReadAll(order, path, fileLength, 64)).Trim() != "little")
                throw new CheckpointFormatException($"{path}: the storages are big-endian; only little-endian checkpoints are read.");
            var pickle = ReadAll(pickles[0]);
            // Intermediate tensors (whole storages, strided views) die with this scope; the built ones are detached.
            using var scope = torch.NewDisposeScope();
            var root = new SafeUnpickler(pickle, $"{path} ({pickles[0].FullName})", PersistentLoad, RebuildTensor).Load();
            foreach (var t in built)
                t.DetachFromDisposeScope();
            return new TorchCheckpoint(path, root, built);
        }

        byte[] ReadAll(ZipArchiveEntry entry) => ZipEntries.ReadAll(entry, path, fileLength, Array.MaxLength);

        /// <summary>torch.save's persistent id for a storage: ('storage', storage type, key, location, numel).</summary>
        object PersistentLoad(object?[] pid)
        {
            if (pid is not ["storage", StorageType type, string key, string, long numel])
                throw new CheckpointFormatException(
                    $"{path}: unexpected persistent id ({string.Join(", ", pid.Select(p => p?.ToString() ?? "None"))}); expected ('storage', type, key, location, numel).");
            if (storages.TryGetValue(key, out var known))
            {
                if (known.Type != type)
                    throw new CheckpointFormatException($"{path}: storage '{key}' is referred to as both {known.Type.Name} and {type.Name}.");
                return known;
            }
            var name = prefix + "data/" + key;
            var entry = zip.GetEntry(name)
                ?? throw new CheckpointFormatException($"{path}: storage '{key}' ({name}) is missing from the zip.");
            var needed = numel < 0 || numel > long.MaxValue / type.ElementSize ? -1 : numel * type.ElementSize;
            if (needed < 0)
                throw new CheckpointFormatException($"{path}: storage '{key}' ({name}) claims {numel} elements of {type.Name}, which no file can hold.");
            if (entry.Length != needed)
                throw new CheckpointFormatException(
                    $"{path}: storage '{key}' ({name}) holds {entry.Length} bytes, but {numel} elements of {type.Name} need {needed}.");
            if (entry.Length > int.MaxValue)
                throw new CheckpointFormatException($"{path}: storage '{key}' is {entry.Length} bytes; storages over 2 GiB are not read.");
            ZipEntries.CheckDeclaredSize(entry, path, fileLength, int.MaxValue);
            var data = torch.empty([numel], type.DType);
            ZipEntries.ReadInto(entry, data.bytes, path);
            var storage = new Storage(key, type, data);
            storages[key] = storage;
            return storage;
        }

        object RebuildTensor(object?[] args) => Rebuild(path, built, args, budget);
    }

    /// <summary>_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata]):
    /// a contiguous copy of the strided view, added to <paramref name="built"/>.</summary>
    static Tensor Rebuild(string path, List<Tensor> built, object?[] args, TensorBudget budget)
    {
        if (args is not [Storage storage, long offset, object?[] size, object?[] stride, ..] || args.Length is < 5 or > 7)
            throw new CheckpointFormatException($"{path}: _rebuild_tensor_v2 called with unexpected arguments.");
        var shape = Longs(size, "size", storage.Key);
        var strides = Longs(stride, "stride", storage.Key);
        if (shape.Length != strides.Length)
            throw new CheckpointFormatException($"{path}: a tensor of storage '{storage.Key}' has {shape.Length} sizes but {strides.Length} strides.");
        if (shape.Length > SafeTensors.MaxDimensions)
            throw new CheckpointFormatException($"{path}: a tensor of storage '{storage.Key}' has {shape.Length} dimensions (at most {SafeTensors.MaxDimensions} are read).");
        // The byte count, refused when it overflows (even with a zero size, as libtorch refuses [0, 2^62, 2^62]).
        if (!SafeTensors.TryByteCount(shape, storage.Type.ElementSize, out var count))
            throw new CheckpointFormatException(
                $"{path}: a tensor of storage '{storage.Key}' has shape [{string.Join(", ", shape)}], whose byte count overflows 64 bits.");
        Tensor tensor;
        if (shape.Contains(0))
            tensor = torch.empty(shape, storage.Type.DType);
        else
        {
            // The last element viewed: offset + sum((size_i - 1) * stride_i), which must lie inside the storage.
            long last;
            try
            {
                last = checked(offset + shape.Zip(strides, (n, s) => checked((n - 1) * s)).Aggregate(0L, (a, b) => checked(a + b)));
            }
            catch (OverflowException)
            {
                last = long.MaxValue;
            }
            var numel = storage.Data.shape[0];
            if (offset < 0 || last >= numel)
                throw new CheckpointFormatException(
                    $"{path}: a tensor of shape [{string.Join(", ", shape)}] at offset {offset} reaches element {last} of storage '{storage.Key}', which holds {numel}.");
            budget.Spend(count, $"a tensor of shape [{string.Join(", ", shape)}] (strides [{string.Join(", ", strides)}]) over storage '{storage.Key}' of {numel} elements");
            tensor = storage.Data.as_strided(shape, strides, offset).contiguous();
        }
        built.Add(tensor);
        return tensor;

        long[] Longs(object?[] values, string what, string key) =>
            values.Select(v => v is long l && l >= 0 ? l
                : throw new CheckpointFormatException($"{path}: a tensor of storage '{key}' has a {what} that is not a non-negative int.")).ToArray();
    }

    /// <summary>
    /// One read of the legacy stream. The storages follow the object's pickle, whose length is known only once it
    /// has been run, so the pickle runs twice: first to find where it ends and which storages (type, element count) it
    /// refers to, then, with every storage's place in the file known, to build the object from storages read on
    /// demand, as the zip reader does.
    /// </summary>
    sealed class LegacyReader(byte[] data, string path, TensorBudget budget)
    {
        /// <summary>torch.save's legacy magic number, pickled first.</summary>
        static readonly System.Numerics.BigInteger Magic = System.Numerics.BigInteger.Parse("1950a86a20f9469cfc6c", System.Globalization.NumberStyles.HexNumber);
        const long ProtocolVersion = 1001;

        readonly Dictionary<string, (StorageType Type, long Numel)> referenced = [];
        readonly Dictionary<string, long> offsets = [];
        readonly Dictionary<string, Storage> storages = [];
        readonly List<Tensor> built = [];

        public TorchCheckpoint Run()
        {
            var pos = 0;
            object? Next(string what)
            {
                var unpickler = new SafeUnpickler(data, $"{path} ({what})", _ => throw Bad($"the {what} refers to a storage"),
                    _ => throw Bad($"the {what} holds a tensor"), pos);
                var value = unpickler.Load();
                pos = unpickler.Position;
                return value;
            }
            var magic = Next("magic number");
            if (magic is not System.Numerics.BigInteger m || m != Magic)
                throw Bad("not a torch.save checkpoint (the legacy stream starts with a different magic number)");
            if (Next("protocol version") is not long protocol || protocol != ProtocolVersion)
                throw Bad($"legacy protocol version other than {ProtocolVersion} is not read");
            if (Next("system information") is not Dictionary<string, object?> sysInfo)
                throw Bad("the system information is not a dict");
            if (sysInfo.TryGetValue("little_endian", out var little) && little is false)
                throw Bad("the storages are big-endian; only little-endian checkpoints are read");

            // Pass 1: where the object's pickle ends, and the storages it refers to.
            var objectStart = pos;
            using (torch.NewDisposeScope())
            {
                var unpickler = new SafeUnpickler(data, $"{path} (object)", Refer, _ => torch.empty(0), objectStart);
                unpickler.Load();
                pos = unpickler.Position;
            }
            if (Next("storage keys") is not List<object?> keys || keys.Any(k => k is not string))
                throw Bad("the storage keys are not a list of strings");
            foreach (var key in keys.Cast<string>())
            {
                if (!referenced.TryGetValue(key, out var r))
                    throw Bad($"storage '{key}' is listed but no tensor refers to it");
                if (data.Length - pos < 8)
                    throw Bad($"truncated: storage '{key}' starts at byte {pos} of {data.Length}");
                var numel = BitConverter.ToInt64(data, pos);
                if (numel != r.Numel)
                    throw Bad($"storage '{key}' holds {numel} elements, but the pickle says {r.Numel}");
                if (numel < 0 || numel > (data.Length - pos - 8) / r.Type.ElementSize)
                    throw Bad($"truncated: storage '{key}' needs {(System.Numerics.BigInteger)numel * r.Type.ElementSize} bytes at byte {pos + 8} of {data.Length}");
                var length = numel * r.Type.ElementSize;
                if (length > int.MaxValue)
                    throw Bad($"storage '{key}' is {length} bytes; storages over 2 GiB are not read");
                offsets[key] = pos + 8;
                pos += 8 + (int)length;
            }
            foreach (var key in referenced.Keys)
                if (!offsets.ContainsKey(key))
                    throw Bad($"storage '{key}' is referred to but missing from the storage list");

            // Pass 2: the object, from the storages now located.
            using var scope = torch.NewDisposeScope();
            var root = new SafeUnpickler(data, $"{path} (object)", Load, args => Rebuild(path, built, args, budget), objectStart).Load();
            foreach (var t in built)
                t.DetachFromDisposeScope();
            return new TorchCheckpoint(path, root, built);
        }

        CheckpointFormatException Bad(string message) => new($"{path}: {message}.");

        /// <summary>The legacy persistent id: ('storage', storage type, root key, location, root numel, view metadata),
        /// where the view metadata is None or (view key, offset, view numel).</summary>
        static (StorageType Type, string Key, long Numel, object? View)? Parse(object?[] pid) =>
            pid is ["storage", StorageType type, string key, string, long numel, var view] ? (type, key, numel, view) : null;

        object Refer(object?[] pid)
        {
            var (type, key, numel, _) = Parse(pid) ?? throw Bad(
                $"unexpected persistent id ({string.Join(", ", pid.Select(p => p?.ToString() ?? "None"))}); expected ('storage', type, key, location, numel, view)");
            if (numel < 0)
                throw Bad($"storage '{key}' has a negative element count");
            if (referenced.TryGetValue(key, out var known) && (known.Type != type || known.Numel != numel))
                throw Bad($"storage '{key}' is referred to as both {known.Numel} {known.Type.Name} and {numel} {type.Name}");
            referenced[key] = (type, numel);
            return type;
        }

        object Load(object?[] pid)
        {
            var (type, key, numel, view) = Parse(pid)!.Value;
            if (!storages.TryGetValue(key, out var root))
            {
                var tensor = torch.empty([numel], type.DType);
                data.AsSpan(checked((int)offsets[key]), checked((int)(numel * type.ElementSize))).CopyTo(tensor.bytes);
                root = new Storage(key, type, tensor);
                storages[key] = root;
            }
            switch (view)
            {
                case null:
                    return root;
                case object?[] { Length: 3 } v when v[0] is string viewKey && v[1] is long offset && v[2] is long size:
                    if (offset < 0 || size < 0 || offset > numel || size > numel - offset)
                        throw Bad($"view '{viewKey}' of storage '{key}' ({size} elements at {offset}) lies outside its {numel} elements");
                    budget.Spend(size * type.ElementSize, $"view '{viewKey}' of storage '{key}'");
                    // A copy: Rebuild's as_strided offsets count from the start of the view, not of its root.
                    return new Storage(viewKey, type, root.Data.narrow(0, offset, size).clone());
                default:
                    throw Bad($"storage '{key}' has view metadata that is not (key, offset, size)");
            }
        }
    }
}
