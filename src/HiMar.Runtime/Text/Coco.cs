using System.Text.Json;
using System.Text.Json.Nodes;

namespace HiMar.Runtime.Text;

/// <summary>
/// COCO-style captions: a JSON file with `images` (`id`, `file_name`) and `annotations` (`image_id`,
/// `caption`), as MS-COCO's captions_train2017.json (five captions per image). Images keep the file's order;
/// images without a caption are left out (counted in <see cref="WithoutCaptions"/>).
/// </summary>
public sealed class CocoCaptions
{
    CocoCaptions(IReadOnlyList<string> files, IReadOnlyList<IReadOnlyList<string>> captions, int without)
    {
        Files = files;
        Captions = captions;
        WithoutCaptions = without;
    }

    /// <summary>Image file names (relative to the images folder), one per example.</summary>
    public IReadOnlyList<string> Files { get; }

    /// <summary>The captions of each example.</summary>
    public IReadOnlyList<IReadOnlyList<string>> Captions { get; }

    /// <summary>Images listed without any caption (skipped).</summary>
    public int WithoutCaptions { get; }

    /// <summary>Reads a captions file; a malformed file raises <see cref="InvalidDataException"/> naming it and the problem.</summary>
    public static CocoCaptions Load(string path)
    {
        if (!File.Exists(path))
            throw new FileNotFoundException($"{path}: no such captions file (COCO layout: images + annotations).", path);
        JsonObject root;
        try
        {
            root = JsonNode.Parse(File.ReadAllText(path))?.AsObject() ?? throw new InvalidDataException($"{path}: empty.");
        }
        catch (Exception e) when (e is JsonException or InvalidOperationException)
        {
            throw new InvalidDataException($"{path}: not a JSON object ({e.Message}).", e);
        }
        var images = root["images"] as JsonArray ?? throw new InvalidDataException($"{path}: no `images` list.");
        var annotations = root["annotations"] as JsonArray ?? throw new InvalidDataException($"{path}: no `annotations` list.");
        var byId = new Dictionary<long, List<string>>();
        var order = new List<(long Id, string File)>();
        for (var i = 0; i < images.Count; i++)
        {
            var img = images[i] as JsonObject ?? throw new InvalidDataException($"{path}: images[{i}] is not an object.");
            var id = Number(img, "id", path, $"images[{i}]");
            var file = img["file_name"]?.GetValue<string>() ?? throw new InvalidDataException($"{path}: images[{i}] has no `file_name`.");
            if (!byId.TryAdd(id, []))
                throw new InvalidDataException($"{path}: image id {id} is listed twice.");
            order.Add((id, file));
        }
        for (var i = 0; i < annotations.Count; i++)
        {
            var a = annotations[i] as JsonObject ?? throw new InvalidDataException($"{path}: annotations[{i}] is not an object.");
            var id = Number(a, "image_id", path, $"annotations[{i}]");
            var caption = a["caption"]?.GetValue<string>() ?? throw new InvalidDataException($"{path}: annotations[{i}] has no `caption`.");
            if (!byId.TryGetValue(id, out var list))
                throw new InvalidDataException($"{path}: annotations[{i}] names image {id}, which `images` does not list.");
            list.Add(caption.Trim());
        }
        var kept = order.Where(o => byId[o.Id].Count > 0).ToList();
        return new CocoCaptions(kept.Select(k => k.File).ToList(), kept.Select(k => (IReadOnlyList<string>)byId[k.Id]).ToList(), order.Count - kept.Count);
    }

    static long Number(JsonObject o, string key, string path, string where)
    {
        if (o[key] is JsonValue v && v.TryGetValue<long>(out var n))
            return n;
        throw new InvalidDataException($"{path}: {where} has no integer `{key}`.");
    }
}
