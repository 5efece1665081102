using System.Buffers.Binary;
using System.Numerics;
using System.Text;

namespace HiMar.Runtime.Checkpoints;

/// <summary>
/// A strict interpreter for the pickle subset (protocols 2 to 5) that <c>torch.save</c> writes. It builds dicts as
/// <c>Dictionary&lt;string, object?&gt;</c> (insertion order kept), lists as <c>List&lt;object?&gt;</c>, tuples as
/// <c>object?[]</c>, ints as <c>long</c> (<c>BigInteger</c> past 64 bits), floats as <c>double</c>, and accepts only
/// the globals of an allow-list. We write our own rather than take Razorvine.Pickle: that library constructs any
/// registered class a pickle names and materialises everything eagerly, while a checkpoint reader needs a strict
/// allow-list (a pickle is a program, and <c>os.system</c> is one GLOBAL away) and tensors built from storages that
/// are read from the zip only when a persistent id refers to them.
/// <para>A pickle is also a compression format: a few bytes can append a memoized list to itself or copy it into a
/// set, so a small file could build gigabytes. Every value pushed, container slot filled, memo entry and character
/// decoded is counted against budgets proportional to the pickle's length (<see cref="CellsPerByte"/>,
/// <see cref="CharsPerByte"/>), and the finished object may nest at most <see cref="MaxDepth"/> containers deep and
/// may not contain itself.</para>
/// </summary>
internal sealed partial class SafeUnpickler(
    byte[] data,
    string what,
    Func<object?[], object> persistentLoad,
    Func<object?[], object> rebuildTensor,
    int start = 0)
{
    /// <summary>Values, container slots and memo entries the pickle may create per byte of its length: a pickle of
    /// nested empty lists, the densest honest one, needs about six.</summary>
    public const long CellsPerByte = 8;

    /// <summary>Characters and bytes of strings the pickle may create per byte of its length (each string is
    /// decoded once from its own bytes; `_codecs.encode` copies one).</summary>
    public const long CharsPerByte = 2;

    /// <summary>Budgets' allowance for tiny pickles.</summary>
    public const long Slack = 65536;

    /// <summary>How deep containers may nest in the object built (a state dict inside a checkpoint is three).</summary>
    public const int MaxDepth = 64;

    readonly List<object?> stack = [];
    readonly Stack<int> marks = new();
    readonly Dictionary<long, object?> memo = [];
    readonly long length = data.Length - start;
    readonly long maxCells = (data.Length - start) * CellsPerByte + Slack;
    readonly long maxChars = (data.Length - start) * CharsPerByte + Slack;
    long cells;
    long chars;
    int pos = start;

    /// <summary>The byte after the last one read: after <see cref="Load"/>, where the next pickle of a stream starts.</summary>
    public int Position => pos;

    /// <summary>Runs the pickle program to its STOP opcode and returns the value it built.</summary>
    public object? Load()
    {
        while (true)
        {
            var at = pos;
            var op = Byte();
            try
            {
                if (op == '.')
                {
                    if (stack.Count != 1 || marks.Count != 0)
                        throw Bad($"STOP with {stack.Count} values on the stack");
                    var root = Pop();
                    CheckNesting(root);
                    return root;
                }
                Step(op);
            }
            catch (PickleException e)
            {
                throw new CheckpointFormatException($"{what}: bad pickle at byte {at} (opcode 0x{op:x2}): {e.Message}.");
            }
        }
    }

    sealed class PickleException(string message) : Exception(message);

    static PickleException Bad(string message) => new(message);

    void Step(byte op)
    {
        switch (op)
        {
            case 0x80: // PROTO
                var proto = Byte();
                if (proto is < 2 or > 5)
                    throw Bad($"pickle protocol {proto} is not read (2 to 5 are)");
                break;
            case 0x95: // FRAME: a length prefix for the opcodes that follow; nothing to do in memory.
                Take(8);
                break;
            case (byte)'}': // EMPTY_DICT
                Spend(ContainerCells);
                Push(new Dictionary<string, object?>());
                break;
            case (byte)']': // EMPTY_LIST
                Spend(ContainerCells);
                Push(new List<object?>());
                break;
            case (byte)')': // EMPTY_TUPLE
                Push(Array.Empty<object?>());
                break;
            case 0x8f: // EMPTY_SET (read as a list)
                Spend(ContainerCells);
                Push(new List<object?>());
                break;
            case (byte)'(': // MARK
                Spend(1);
                marks.Push(stack.Count);
                break;
            case (byte)'0': // POP
                Pop();
                break;
            case (byte)'1': // POP_MARK
                PopMark();
                break;
            case (byte)'2': // DUP
                Push(Peek());
                break;
            case (byte)'X': // BINUNICODE
                Push(Utf8(Length(4)));
                break;
            case 0x8c: // SHORT_BINUNICODE
                Push(Utf8(Byte()));
                break;
            case 0x8d: // BINUNICODE8
                Push(Utf8(Length(8)));
                break;
            case (byte)'C': // SHORT_BINBYTES
                Push(Bytes(Byte()));
                break;
            case (byte)'B': // BINBYTES
                Push(Bytes(Length(4)));
                break;
            case 0x8e: // BINBYTES8
                Push(Bytes(Length(8)));
                break;
            case (byte)'q': // BINPUT
                Spend(MemoCells);
                memo[Byte()] = Peek();
                break;
            case (byte)'r': // LONG_BINPUT
                Spend(MemoCells);
                memo[BinaryPrimitives.ReadUInt32LittleEndian(Take(4))] = Peek();
                break;
            case 0x94: // MEMOIZE
                Spend(MemoCells);
                memo[memo.Count] = Peek();
                break;
            case (byte)'h': // BINGET
                Push(Memo(Byte()));
                break;
            case (byte)'j': // LONG_BINGET
                Push(Memo(BinaryPrimitives.ReadUInt32LittleEndian(Take(4))));
                break;
            case (byte)'J': // BININT
                Push((long)BinaryPrimitives.ReadInt32LittleEndian(Take(4)));
                break;
            case (byte)'K': // BININT1
                Push((long)Byte());
                break;
            case (byte)'M': // BININT2
                Push((long)BinaryPrimitives.ReadUInt16LittleEndian(Take(2)));
                break;
            case 0x8a: // LONG1
                Push(Long(Take(Byte())));
                break;
            case 0x8b: // LONG4
                Push(Long(Take(Length(4))));
                break;
            case (byte)'G': // BINFLOAT
                Push(BinaryPrimitives.ReadDoubleBigEndian(Take(8)));
                break;
            case (byte)'N': // NONE
                Push(null);
                break;
            case 0x88: // NEWTRUE
                Push(true);
                break;
            case 0x89: // NEWFALSE
                Push(false);
                break;
            case (byte)'t': // TUPLE
                {
                    var items = PopMark();
                    Spend(ContainerCells + items.Count);
                    Push(items.ToArray());
                    break;
                }
            case 0x85: // TUPLE1
                Spend(ContainerCells + 1);
                Push(new[] { Pop() });
                break;
            case 0x86: // TUPLE2
                {
                    Spend(ContainerCells + 2);
                    var b = Pop();
                    var a = Pop();
                    Push(new[] { a, b });
                    break;
                }
            case 0x87: // TUPLE3
                {
                    Spend(ContainerCells + 3);
                    var c = Pop();
                    var b = Pop();
                    var a = Pop();
                    Push(new[] { a, b, c });
                    break;
                }
            case (byte)'s': // SETITEM
                {
                    var value = Pop();
                    var key = Pop();
                    SetItem(Peek(), key, value);
                    break;
                }
            case (byte)'u': // SETITEMS
                {
                    var items = PopMark();
                    if (items.Count % 2 != 0)
                        throw Bad("SETITEMS with an odd number of values");
                    var dict = Peek();
                    for (var i = 0; i < items.Count; i += 2)
                        SetItem(dict, items[i], items[i + 1]);
                    break;
                }
            case (byte)'a': // APPEND
                {
                    Spend(1);
                    var value = Pop();
                    AsList(Peek(), "APPEND").Add(value);
                    break;
                }
            case (byte)'e': // APPENDS
            case 0x90: // ADDITEMS (sets are read as lists)
                {
                    var items = PopMark();
                    Spend(items.Count);
                    AsList(Peek(), "APPENDS").AddRange(items);
                    break;
                }
            case 0x91: // FROZENSET
                {
                    var items = PopMark();
                    Spend(ContainerCells + items.Count);
                    Push(items);
                    break;
                }
            case (byte)'c': // GLOBAL
                {
                    var module = Line();
                    var name = Line();
                    Push(Global(module, name));
                    break;
                }
            case 0x93: // STACK_GLOBAL
                {
                    var name = Pop() as string ?? throw Bad("STACK_GLOBAL without a string name");
                    var module = Pop() as string ?? throw Bad("STACK_GLOBAL without a string module");
                    Push(Global(module, name));
                    break;
                }
            case (byte)'R': // REDUCE
                {
                    var args = Pop() as object?[] ?? throw Bad("REDUCE without an argument tuple");
                    Push(Call(Pop(), args));
                    break;
                }
            case 0x81: // NEWOBJ: cls.__new__(cls, *args)
                {
                    var args = Pop() as object?[] ?? throw Bad("NEWOBJ without an argument tuple");
                    Push(New(Pop(), args));
                    break;
                }
            case 0x92: // NEWOBJ_EX
                {
                    Pop();
                    var args = Pop() as object?[] ?? throw Bad("NEWOBJ_EX without an argument tuple");
                    Push(New(Pop(), args));
                    break;
                }
            case (byte)'b': // BUILD
                {
                    var state = Pop();
                    Build(Peek(), state);
                    break;
                }
            case (byte)'Q': // BINPERSID
                {
                    var pid = Pop() as object?[] ?? throw Bad("BINPERSID without a tuple persistent id");
                    Push(persistentLoad(pid));
                    break;
                }
            default:
                throw Bad("unsupported opcode (torch.save does not write it)");
        }
    }

    object? Memo(long index) =>
        memo.TryGetValue(index, out var value) ? value : throw Bad($"memo slot {index} was never stored");

    void Push(object? value)
    {
        Spend(1);
        stack.Add(value);
    }

    /// <summary>What a new container costs beyond its slots (its object header and bookkeeping).</summary>
    const long ContainerCells = 4;

    /// <summary>What a memo entry costs (a dictionary entry: key, value, hash and link).</summary>
    const long MemoCells = 3;

    void Spend(long n)
    {
        cells += n;
        if (cells > maxCells)
            throw Bad($"the pickle builds more than {maxCells} values, container slots and memo entries from its {length} bytes (a container bomb?)");
    }

    void SpendChars(long n)
    {
        chars += n;
        if (chars > maxChars)
            throw Bad($"the pickle builds more than {maxChars} characters of strings and bytes from its {length} bytes");
    }

    byte[] Bytes(int count)
    {
        SpendChars(count);
        return Take(count).ToArray();
    }

    object? Pop()
    {
        var value = Peek();
        stack.RemoveAt(stack.Count - 1);
        return value;
    }

    List<object?> PopMark()
    {
        if (marks.Count == 0)
            throw Bad("no MARK on the stack");
        var start = marks.Pop();
        var items = stack.GetRange(start, stack.Count - start);
        stack.RemoveRange(start, stack.Count - start);
        return items;
    }

    byte Byte() => Take(1)[0];

    ReadOnlySpan<byte> Take(int count)
    {
        if (count < 0 || count > data.Length - pos)
            throw new CheckpointFormatException($"{what}: the pickle is truncated (needs {count} bytes at byte {pos} of {data.Length}).");
        var span = data.AsSpan(pos, count);
        pos += count;
        return span;
    }

    int Length(int width)
    {
        var raw = width == 4 ? BinaryPrimitives.ReadUInt32LittleEndian(Take(4)) : BinaryPrimitives.ReadUInt64LittleEndian(Take(8));
        return raw <= (ulong)(data.Length - pos) ? (int)raw : throw new CheckpointFormatException(
            $"{what}: the pickle is truncated (a {raw}-byte value at byte {pos} of {data.Length}).");
    }

    string Utf8(int count)
    {
        SpendChars(count);
        try
        {
            return new UTF8Encoding(false, true).GetString(Take(count));
        }
        catch (DecoderFallbackException)
        {
            throw Bad("a string that is not valid UTF-8");
        }
    }

    string Line()
    {
        var end = Array.IndexOf(data, (byte)'\n', pos);
        if (end < 0)
            throw new CheckpointFormatException($"{what}: the pickle is truncated (a GLOBAL name without its newline).");
        return Encoding.ASCII.GetString(Take(end - pos + 1)[..^1]);
    }

    static object Long(ReadOnlySpan<byte> bytes)
    {
        var value = new BigInteger(bytes, isUnsigned: false, isBigEndian: false);
        return value >= long.MinValue && value <= long.MaxValue ? (object)(long)value : value;
    }
}
