using System.IO.Compression;
using System.Net;
using System.Text;
using System.Text.Json;
using HiMar.Runtime.Checkpoints;
using Microsoft.ML.Tokenizers;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Text;

/// <summary>
/// CLIP's tokenizer (openai/CLIP `clip/simple_tokenizer.py`, HF `CLIPTokenizer`): byte-level BPE with an
/// end-of-word suffix. A caption is normalised (<see cref="Normalize"/>), split into words (<see cref="PreTokenize"/>),
/// each word's UTF-8 bytes are mapped to printable characters (<see cref="ByteToUnicode"/>), `&lt;/w&gt;` is appended to
/// its last symbol, and the merges are applied lowest rank first. A caption becomes
/// [&lt;|startoftext|&gt;, tokens..., &lt;|endoftext|&gt;, padding] of <see cref="ContextLength"/> ids.
/// The BPE itself is Microsoft.ML.Tokenizers' <see cref="BpeTokenizer"/> (byte level, suffix `&lt;/w&gt;`, CLIP's two
/// special tokens) with this class's normaliser and pre-tokeniser plugged in. Its regex pre-tokeniser cannot
/// reproduce CLIP's split exactly: .NET regexes see UTF-16 code units, so a letter or digit outside the Basic
/// Multilingual Plane (a CJK Extension B ideograph, a mathematical letter) would fall into the "other symbols"
/// alternative, whereas Python's `regex` sees code points. The pre-tokeniser here scans code points instead.
/// </summary>
public sealed class ClipTokenizer
{
    /// <summary>The start token, id 49406 in CLIP's vocabulary.</summary>
    public const string StartToken = "<|startoftext|>";

    /// <summary>The end token, id 49407 in CLIP's vocabulary (also HF's padding token).</summary>
    public const string EndToken = "<|endoftext|>";

    /// <summary>The end-of-word suffix of the last symbol of each word.</summary>
    public const string EndOfWord = "</w>";

    /// <summary>Merges CLIP uses: the first 49152 - 256 - 2 = 48894 lines after the header (the openai file has more).</summary>
    public const int MaxMerges = 49152 - 256 - 2;

    /// <summary>CLIP's context length: 77 ids per caption.</summary>
    public const int DefaultContextLength = 77;

    /// <summary>The HF file names of the vocabulary and the merges.</summary>
    public const string VocabFile = "vocab.json", MergesFile = "merges.txt";

    /// <summary>The openai/CLIP file holding only the merges (the vocabulary is derived from them).</summary>
    public const string OpenAiBpeFile = "bpe_simple_vocab_16e6.txt.gz";

    readonly BpeTokenizer bpe;
    readonly Dictionary<string, int> vocab;

    ClipTokenizer(Dictionary<string, int> vocab, IReadOnlyList<string> merges, int contextLength, int? padId, string what)
    {
        if (contextLength < 2)
            throw new ArgumentOutOfRangeException(nameof(contextLength), "a caption needs room for the start and end tokens");
        if (!vocab.TryGetValue(StartToken, out var start) || !vocab.TryGetValue(EndToken, out var end))
            throw new CheckpointFormatException($"{what}: the vocabulary lacks {StartToken} or {EndToken}; is it CLIP's?");
        this.vocab = vocab;
        StartId = start;
        EndId = end;
        PadId = padId ?? end;
        ContextLength = contextLength;
        try
        {
            bpe = BpeTokenizer.Create(new BpeOptions(vocab)
            {
                Merges = merges,
                SpecialTokens = new Dictionary<string, int> { [StartToken] = start, [EndToken] = end },
                Normalizer = new ClipNormalizer(),
                PreTokenizer = new ClipPreTokenizer(),
                EndOfWordSuffix = EndOfWord,
                ByteLevel = true,
            });
        }
        catch (InvalidOperationException e)
        {
            throw new CheckpointFormatException($"{what}: the merges do not fit the vocabulary ({e.Message})", e);
        }
    }

    /// <summary>Ids per caption (77): captions are padded or truncated to it.</summary>
    public int ContextLength { get; }

    /// <summary>The id of <see cref="StartToken"/>.</summary>
    public int StartId { get; }

    /// <summary>The id of <see cref="EndToken"/>.</summary>
    public int EndId { get; }

    /// <summary>The id after the end token: the end token itself as in HF and Stable Diffusion (default), or 0 as openai's `clip.tokenize`.</summary>
    public int PadId { get; }

    /// <summary>The vocabulary, token to id.</summary>
    public IReadOnlyDictionary<string, int> Vocabulary => vocab;

    /// <summary>
    /// Reads the HF layout: `vocab.json` (token to id) and `merges.txt` (a `#version` line, then one "left right"
    /// pair per line, by rank). Only the first <see cref="MaxMerges"/> merges are used, as CLIP does.
    /// </summary>
    public static ClipTokenizer FromFiles(string vocabPath, string mergesPath, int contextLength = DefaultContextLength, int? padId = null)
    {
        Dictionary<string, int> vocab;
        try
        {
            using var stream = File.OpenRead(vocabPath);
            vocab = JsonSerializer.Deserialize<Dictionary<string, int>>(stream)
                ?? throw new CheckpointFormatException($"{vocabPath}: the vocabulary is empty.");
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new CheckpointFormatException($"{vocabPath}: cannot be read ({e.Message}).", e);
        }
        catch (JsonException e)
        {
            throw new CheckpointFormatException($"{vocabPath}: not a JSON object of token ids ({e.Message}).", e);
        }
        return new ClipTokenizer(vocab, ReadMerges(mergesPath, File.OpenRead), contextLength, padId, $"{vocabPath}, {mergesPath}");
    }

    /// <summary>
    /// Reads openai/CLIP's `bpe_simple_vocab_16e6.txt.gz`, which holds only the merges: the vocabulary is built as
    /// CLIP builds it (<see cref="FromMerges"/>).
    /// </summary>
    public static ClipTokenizer FromOpenAiBpe(string path, int contextLength = DefaultContextLength, int? padId = null) =>
        FromMerges(ReadMerges(path, p => new GZipStream(File.OpenRead(p), CompressionMode.Decompress)), contextLength, padId);

    /// <summary>
    /// CLIP's vocabulary built from its merges (`SimpleTokenizer.__init__`): the 256 byte symbols in
    /// <see cref="ByteToUnicode"/> order (ids 0-255), the same with `&lt;/w&gt;` (256-511), one token per merge (512 + rank),
    /// then the start and end tokens. With CLIP's 48894 merges the ids are those of HF's `vocab.json`.
    /// </summary>
    public static ClipTokenizer FromMerges(IEnumerable<string> merges, int contextLength = DefaultContextLength, int? padId = null)
    {
        var list = merges.Take(MaxMerges).ToList();
        var tokens = new List<string>(BaseSymbols.Select(c => c.ToString()));
        tokens.AddRange(BaseSymbols.Select(c => c + EndOfWord));
        foreach (var m in list)
            tokens.Add(m.Replace(" ", "", StringComparison.Ordinal));
        tokens.Add(StartToken);
        tokens.Add(EndToken);
        var vocab = new Dictionary<string, int>(tokens.Count);
        for (var i = 0; i < tokens.Count; i++)
            vocab.TryAdd(tokens[i], i);
        return new ClipTokenizer(vocab, list, contextLength, padId, "CLIP merges");
    }

    /// <summary>
    /// The tokenizer files of a folder: `vocab.json` and `merges.txt` (HF openai/clip-vit-large-patch14), or
    /// `bpe_simple_vocab_16e6.txt.gz` (openai/CLIP). Nothing is downloaded: the user supplies them.
    /// </summary>
    public static ClipTokenizer FromFolder(string folder, int contextLength = DefaultContextLength, int? padId = null)
    {
        string vocab = Path.Combine(folder, VocabFile), merges = Path.Combine(folder, MergesFile), openai = Path.Combine(folder, OpenAiBpeFile);
        if (File.Exists(vocab) && File.Exists(merges))
            return FromFiles(vocab, merges, contextLength, padId);
        if (File.Exists(openai))
            return FromOpenAiBpe(openai, contextLength, padId);
        throw new CheckpointFormatException(
            $"{folder}: no CLIP tokenizer files: expected {VocabFile} and {MergesFile} (HF openai/clip-vit-large-patch14) " +
            $"or {OpenAiBpeFile} (openai/CLIP). They are not downloaded: copy them into the folder.");
    }

    // CLIP (and HF) drop the first line, a `#version` header, and keep at most MaxMerges pairs.
    static List<string> ReadMerges(string path, Func<string, Stream> open)
    {
        try
        {
            using var reader = new StreamReader(open(path), Encoding.UTF8);
            var lines = new List<string>();
            var first = true;
            while (reader.ReadLine() is { } line)
            {
                if (first && line.Contains("#version", StringComparison.Ordinal))
                {
                    first = false;
                    continue;
                }
                first = false;
                if (line.Length == 0)
                    continue;
                if (line.Split(' ').Length != 2)
                    throw new CheckpointFormatException($"{path}: line '{line}' is not a merge \"left right\".");
                lines.Add(line);
                if (lines.Count == MaxMerges)
                    break;
            }
            return lines;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or InvalidDataException)
        {
            throw new CheckpointFormatException($"{path}: cannot be read ({e.Message}).", e);
        }
    }

    /// <summary>The BPE ids of a text, without start, end or padding.</summary>
    public IReadOnlyList<int> Tokenize(string text) => bpe.EncodeToIds(text);

    /// <summary>
    /// The <see cref="ContextLength"/> ids of one caption: start, the text's tokens (truncated to leave room),
    /// end, then <see cref="PadId"/>. A truncated caption still ends with the end token, as `clip.tokenize(truncate=True)`.
    /// </summary>
    public long[] Encode(string caption)
    {
        var ids = Tokenize(caption);
        var n = Math.Min(ids.Count, ContextLength - 2);
        var row = new long[ContextLength];
        Array.Fill(row, PadId);
        row[0] = StartId;
        for (var i = 0; i < n; i++)
            row[i + 1] = ids[i];
        row[n + 1] = EndId;
        return row;
    }

    /// <summary>The ids (B, <see cref="ContextLength"/>) of B captions, int64 on the CPU.</summary>
    public Tensor Encode(IReadOnlyList<string> captions)
    {
        var flat = captions.SelectMany(c => Encode(c)).ToArray();
        return torch.tensor(flat, [captions.Count, ContextLength], ScalarType.Int64);
    }

    /// <summary>
    /// GPT-2's and CLIP's `bytes_to_unicode`: each byte as a printable character. The printable bytes
    /// ('!'-'~', '¡'-'¬', '®'-'ÿ') stand for themselves; the other 68 take U+0100 onwards in byte order.
    /// </summary>
    public static IReadOnlyList<char> ByteToUnicode { get; } = BuildByteToUnicode();

    /// <summary>The 256 byte symbols in vocabulary order (ids 0-255): the printable bytes first, then the others.</summary>
    public static IReadOnlyList<char> BaseSymbols { get; } =
        Enumerable.Range(0, 256).Where(IsPrintable).Concat(Enumerable.Range(0, 256).Where(b => !IsPrintable(b)))
            .Select(b => ByteToUnicode[b]).ToArray();

    static bool IsPrintable(int b) => b is >= '!' and <= '~' or >= 0xA1 and <= 0xAC or >= 0xAE and <= 0xFF;

    static char[] BuildByteToUnicode()
    {
        var map = new char[256];
        var next = 256;
        for (var b = 0; b < 256; b++)
            map[b] = IsPrintable(b) ? (char)b : (char)next++;
        return map;
    }

    /// <summary>CLIP's text normalisation (<see cref="ClipNormalizer"/>).</summary>
    public static string Normalize(string text) => ClipNormalizer.Clean(text);

    /// <summary>The words of a normalised text as CLIP's pre-tokenisation regex splits it (<see cref="ClipPreTokenizer"/>).</summary>
    public static IReadOnlyList<string> PreTokenize(string text) =>
        ClipPreTokenizer.Split(text).Select(s => text.Substring(s.Offset, s.Length)).ToArray();
}

/// <summary>
/// CLIP's `basic_clean` and `whitespace_clean`, then `lower()`: HTML entities unescaped twice, every run of
/// whitespace made one space, the ends trimmed, lower case. Not reproduced: ftfy's repairs (mojibake, curly quotes,
/// ligatures, character widths) and its NFC composition (this project runs in .NET's invariant globalization mode,
/// which has no Unicode normalisation data); .NET lower-cases by Unicode's simple mapping, so 'İ' and a word-final
/// 'Σ' differ from Python's `str.lower()`. Plain precomposed captions, the usual case, come out identical.
/// </summary>
public sealed class ClipNormalizer : Normalizer
{
    // Python's str.isspace() (what `\s` and strip() use): .NET's white space plus the separators U+001C-U+001F.
    static bool IsSpace(char c) => char.IsWhiteSpace(c) || c is >= '\u001c' and <= '\u001f';

    /// <summary>The normalised text.</summary>
    public static string Clean(string text)
    {
        var unescaped = WebUtility.HtmlDecode(WebUtility.HtmlDecode(text));
        var sb = new StringBuilder(unescaped.Length);
        var pendingSpace = false;
        foreach (var c in unescaped)
        {
            if (IsSpace(c))
            {
                pendingSpace = sb.Length > 0;
                continue;
            }
            if (pendingSpace)
                sb.Append(' ');
            pendingSpace = false;
            sb.Append(c);
        }
        return sb.ToString().ToLowerInvariant();
    }

    /// <inheritdoc/>
    public override string Normalize(string original) => Clean(original);

    /// <inheritdoc/>
    public override string Normalize(ReadOnlySpan<char> original) => Clean(original.ToString());
}

/// <summary>
/// CLIP's pre-tokenisation, the regex (case-insensitive)
/// `&lt;\|startoftext\|&gt;|&lt;\|endoftext\|&gt;|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`, written as a
/// scan over Unicode code points: at each position the first alternative that matches wins, whitespace is skipped.
/// A .NET Regex would class the two UTF-16 halves of a letter or digit beyond U+FFFF as symbols.
/// </summary>
public sealed class ClipPreTokenizer : PreTokenizer
{
    static readonly string[] Specials = [ClipTokenizer.StartToken, ClipTokenizer.EndToken];
    static readonly string[] Contractions = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"];

    enum Kind { Letter, Number, Space, Other }

    static Kind KindAt(ReadOnlySpan<char> text, int i, out int length)
    {
        Rune.DecodeFromUtf16(text[i..], out var rune, out length);
        if (Rune.IsWhiteSpace(rune))
            return Kind.Space;
        return Rune.GetUnicodeCategory(rune) switch
        {
            System.Globalization.UnicodeCategory.UppercaseLetter or System.Globalization.UnicodeCategory.LowercaseLetter
                or System.Globalization.UnicodeCategory.TitlecaseLetter or System.Globalization.UnicodeCategory.ModifierLetter
                or System.Globalization.UnicodeCategory.OtherLetter => Kind.Letter,
            System.Globalization.UnicodeCategory.DecimalDigitNumber or System.Globalization.UnicodeCategory.LetterNumber
                or System.Globalization.UnicodeCategory.OtherNumber => Kind.Number,
            _ => Kind.Other,
        };
    }

    // The length of the special token or contraction that text starts with, or 0.
    static int LiteralAt(ReadOnlySpan<char> text)
    {
        foreach (var s in Specials)
            if (text.StartsWith(s, StringComparison.OrdinalIgnoreCase))
                return s.Length;
        foreach (var s in Contractions)
            if (text.StartsWith(s, StringComparison.OrdinalIgnoreCase))
                return s.Length;
        return 0;
    }

    // The end of the run of `kind` starting at i.
    static int RunEnd(ReadOnlySpan<char> text, int i, Kind kind)
    {
        while (i < text.Length && KindAt(text, i, out var length) == kind)
            i += length;
        return i;
    }

    /// <summary>The (offset, length) of each word of <paramref name="text"/>, in order.</summary>
    public static List<(int Offset, int Length)> Split(ReadOnlySpan<char> text)
    {
        var words = new List<(int, int)>();
        var i = 0;
        while (i < text.Length)
        {
            var literal = LiteralAt(text[i..]);
            if (literal > 0)
            {
                words.Add((i, literal));
                i += literal;
                continue;
            }
            var kind = KindAt(text, i, out var length);
            var end = kind switch
            {
                Kind.Letter or Kind.Other => RunEnd(text, i, kind),
                _ => i + length,
            };
            if (kind != Kind.Space)
                words.Add((i, end - i));
            i = end;
        }
        return words;
    }

    /// <inheritdoc/>
    public override IEnumerable<(int Offset, int Length)> PreTokenize(string text) => Split(text);

    /// <inheritdoc/>
    public override IEnumerable<(int Offset, int Length)> PreTokenize(ReadOnlySpan<char> text) => Split(text);
}
