using System.Globalization;
using System.Text;
using static TorchSharp.torch;

namespace HiMar.Runtime.Checkpoints;

/// <summary>A storage class named by a pickled global (`torch.FloatStorage`, ...): only a dtype marker here.</summary>
internal sealed record StorageType(string Name, ScalarType DType, int ElementSize);

/// <summary>The callable globals the unpickler accepts; everything else is refused when the GLOBAL opcode is read.</summary>
internal enum PickleCallable
{
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Namespace,
    Set,
    FrozenSet,
    TorchSize,
    CodecsEncode,
}

/// <summary>The pickled form of <c>argparse.Namespace</c>: its attributes, in the order they were pickled.</summary>
public sealed record PickledNamespace(Dictionary<string, object?> Values);

/// <summary>The unpickler's object model: the allow-list of globals, what calling or constructing them builds, and
/// the check of the finished object's nesting.</summary>
internal sealed partial class SafeUnpickler
{
    static readonly Dictionary<string, StorageType> StorageTypes = new[]
    {
        new StorageType("FloatStorage", ScalarType.Float32, 4),
        new StorageType("HalfStorage", ScalarType.Float16, 2),
        new StorageType("BFloat16Storage", ScalarType.BFloat16, 2),
        new StorageType("DoubleStorage", ScalarType.Float64, 8),
        new StorageType("LongStorage", ScalarType.Int64, 8),
        new StorageType("IntStorage", ScalarType.Int32, 4),
        new StorageType("ShortStorage", ScalarType.Int16, 2),
        new StorageType("CharStorage", ScalarType.Int8, 1),
        new StorageType("ByteStorage", ScalarType.Byte, 1),
        new StorageType("BoolStorage", ScalarType.Bool, 1),
    }.ToDictionary(s => "torch." + s.Name);

    static readonly Dictionary<string, PickleCallable> Callables = new()
    {
        ["collections.OrderedDict"] = PickleCallable.OrderedDict,
        ["torch._utils._rebuild_tensor_v2"] = PickleCallable.RebuildTensorV2,
        ["torch._utils._rebuild_parameter"] = PickleCallable.RebuildParameter,
        ["argparse.Namespace"] = PickleCallable.Namespace,
        ["builtins.set"] = PickleCallable.Set,
        ["builtins.frozenset"] = PickleCallable.FrozenSet,
        ["torch.Size"] = PickleCallable.TorchSize,
        ["_codecs.encode"] = PickleCallable.CodecsEncode,
    };

    object Global(string module, string name)
    {
        // Protocol 2 spells builtins the Python 2 way; Python's own unpickler maps it back the same way.
        var full = (module == "__builtin__" ? "builtins" : module) + "." + name;
        if (StorageTypes.TryGetValue(full, out var storage))
            return storage;
        if (Callables.TryGetValue(full, out var callable))
            return callable;
        throw new CheckpointFormatException(
            $"{what}: refuses to load the pickled global '{full}' (only tensors, dicts, lists and argparse.Namespace are read).");
    }

    object? Call(object? callable, object?[] args)
    {
        switch (callable)
        {
            case PickleCallable.OrderedDict:
                Spend(ContainerCells);
                var dict = new Dictionary<string, object?>();
                if (args.Length == 1)
                    foreach (var pair in AsList(args[0], "OrderedDict"))
                    {
                        var kv = pair as object?[] ?? (pair as List<object?>)?.ToArray();
                        if (kv is not { Length: 2 })
                            throw Bad("OrderedDict built from something other than pairs");
                        SetItem(dict, kv[0], kv[1]);
                    }
                else if (args.Length != 0)
                    throw Bad($"OrderedDict called with {args.Length} arguments");
                return dict;
            case PickleCallable.RebuildTensorV2:
                return rebuildTensor(args);
            case PickleCallable.RebuildParameter:
                // _rebuild_parameter(data, requires_grad, backward_hooks): the parameter is its data here.
                if (args.Length < 1 || args[0] is not Tensor)
                    throw Bad("_rebuild_parameter without a tensor");
                return args[0];
            case PickleCallable.Set:
            case PickleCallable.FrozenSet:
                {
                    var items = args.Length == 0 ? [] : AsList(args[0], "set");
                    Spend(ContainerCells + items.Count);
                    return new List<object?>(items);
                }
            case PickleCallable.TorchSize:
                return args.Length == 1 && args[0] is object?[] dims ? dims : throw Bad("torch.Size called without a tuple");
            case PickleCallable.CodecsEncode:
                // Protocol 2 pickles a bytes object as _codecs.encode(text, 'latin1').
                if (args is [string text, "latin1" or "latin-1"])
                {
                    SpendChars(text.Length);
                    return Encoding.Latin1.GetBytes(text);
                }
                throw Bad("_codecs.encode called with something other than (str, 'latin1')");
            default:
                throw Bad($"cannot call {Describe(callable)}");
        }
    }

    object New(object? cls, object?[] args)
    {
        Spend(ContainerCells);
        return NewObject(cls, args);
    }

    object NewObject(object? cls, object?[] args) => (cls, args.Length) switch
    {
        (PickleCallable.Namespace, 0) => new PickledNamespace([]),
        (PickleCallable.OrderedDict, 0) => new Dictionary<string, object?>(),
        _ => throw Bad($"cannot construct {Describe(cls)} with {args.Length} arguments"),
    };

    void Build(object? target, object? state)
    {
        switch (target)
        {
            case PickledNamespace ns:
                // Namespace pickles its __dict__ as the BUILD state.
                if (state is not Dictionary<string, object?> attributes)
                    throw Bad("argparse.Namespace built from something other than a dict");
                Spend(attributes.Count);
                foreach (var (k, v) in attributes)
                    ns.Values[k] = v;
                break;
            case Dictionary<string, object?>:
                // An OrderedDict's state holds its instance attributes: a state_dict's `_metadata` (module versions),
                // which nothing here needs. Its items come through SETITEMS, not through BUILD.
                break;
            default:
                throw Bad($"BUILD on {Describe(target)} is not supported");
        }
    }

    void SetItem(object? target, object? key, object? value)
    {
        if (target is not Dictionary<string, object?> dict)
            throw Bad($"SETITEM on {Describe(target)}");
        Spend(2);
        // Dict keys become strings: state dicts use names, and an optimizer state keys its entries by parameter index.
        dict[key switch
        {
            string s => s,
            long l => l.ToString(CultureInfo.InvariantCulture),
            _ => throw Bad($"dict key of type {Describe(key)} (only str and int keys are read)"),
        }] = value;
    }

    List<object?> AsList(object? value, string op) =>
        value as List<object?> ?? throw Bad($"{op} on {Describe(value)}");

    static string Describe(object? value) => value switch
    {
        null => "None",
        PickleCallable c => $"the global {c}",
        StorageType s => $"torch.{s.Name}",
        _ => value.GetType().Name,
    };

    /// <summary>
    /// Refuses an object that nests containers more than <see cref="MaxDepth"/> deep or contains itself; walks each
    /// container once (iteratively, so depth cannot overflow this walk's stack), so shared sub-objects cost nothing extra.
    /// </summary>
    void CheckNesting(object? root)
    {
        // depth[c]: 0 while c is on the walk's path (seeing it again is a cycle), else the depth below it, plus one.
        var depth = new Dictionary<object, int>(ReferenceEqualityComparer.Instance);
        var path = new Stack<(object Container, IEnumerator<object?> Children, int Deepest)>();
        if (!IsContainer(root))
            return;
        Enter(root!);
        while (path.Count > 0)
        {
            var (container, children, deepest) = path.Peek();
            if (children.MoveNext())
            {
                var child = children.Current;
                if (!IsContainer(child))
                    continue;
                if (depth.TryGetValue(child!, out var d))
                {
                    if (d == 0)
                        throw new CheckpointFormatException($"{what}: the pickled object contains itself (a {ContainerKind(child!)} holds itself); recursive structures are not read.");
                    path.Pop();
                    path.Push((container, children, Math.Max(deepest, d)));
                    continue;
                }
                if (path.Count >= MaxDepth)
                    throw new CheckpointFormatException($"{what}: the pickled object nests containers more than {MaxDepth} deep.");
                Enter(child!);
                continue;
            }
            path.Pop();
            depth[container] = deepest + 1;
            if (path.Count > 0)
            {
                var parent = path.Pop();
                path.Push((parent.Container, parent.Children, Math.Max(parent.Deepest, deepest + 1)));
            }
        }

        void Enter(object container)
        {
            depth[container] = 0;
            path.Push((container, Children(container).GetEnumerator(), 0));
        }
    }

    static string ContainerKind(object container) => container switch
    {
        List<object?> => "list",
        object?[] => "tuple",
        Dictionary<string, object?> => "dict",
        _ => "argparse.Namespace",
    };

    static bool IsContainer(object? value) => value is List<object?> or object?[] or Dictionary<string, object?> or PickledNamespace;

    static IEnumerable<object?> Children(object container) => container switch
    {
        List<object?> list => list,
        object?[] tuple => tuple,
        Dictionary<string, object?> dict => dict.Values,
        PickledNamespace ns => ns.Values.Values,
        _ => [],
    };

    object? Peek() => stack.Count > (marks.Count > 0 ? marks.Peek() : 0) ? stack[^1] : throw Bad("stack underflow");
}
