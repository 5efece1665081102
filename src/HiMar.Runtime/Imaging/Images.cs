using HiMar.Runtime.Checkpoints;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.PixelFormats;
using SixLabors.ImageSharp.Processing;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Imaging;

/// <summary>Tensors to pictures: decoded images as PNG files, labelled grids and strips.</summary>
public static class Images
{
    /// <summary>(B, 3, H, W) in [-1, 1] (or (B, 1, H, W) grey) -> one RGB image per row, rounded as the reference saves them.</summary>
    public static Image<Rgb24>[] FromTensor(Tensor images)
    {
        using var scope = torch.NewDisposeScope();
        var x = images.detach().cpu().to(ScalarType.Float32);
        if (x.shape[1] == 1)
            x = x.expand(-1, 3, -1, -1);
        // [-1, 1] -> [0, 255], (B, 3, H, W) -> (B, H, W, 3)
        var bytes = ((x + 1.0) / 2.0 * 255.0).round().clamp(0, 255).to(ScalarType.Byte).permute(0, 2, 3, 1).contiguous();
        long b = bytes.shape[0], h = bytes.shape[1], w = bytes.shape[2];
        var data = bytes.bytes.ToArray();
        var result = new Image<Rgb24>[b];
        var size = (int)(h * w * 3);
        for (var i = 0; i < b; i++)
            result[i] = Image.LoadPixelData<Rgb24>(data.AsSpan(i * size, size), (int)w, (int)h);
        return result;
    }

    /// <summary>Saves a PNG atomically (temp file, then rename).</summary>
    public static void SavePng(Image image, string path) => AtomicFile.Write(path, s => image.SaveAsPng(s));

    /// <summary>Nearest-neighbour resize to a square side (keeps pixels crisp for small latents and pivots).</summary>
    public static Image<Rgb24> Resize(Image<Rgb24> image, int side) =>
        image.Clone(c => c.Resize(new ResizeOptions { Size = new SixLabors.ImageSharp.Size(side, side), Sampler = KnownResamplers.NearestNeighbor }));

    /// <summary>
    /// A grid of equally sized tiles, <paramref name="columns"/> wide, each with its caption drawn underneath
    /// in a small built-in pixel font (ImageSharp's text drawing needs SixLabors.Fonts, which is not served here).
    /// </summary>
    public static Image<Rgb24> Grid(IReadOnlyList<Image<Rgb24>> tiles, IReadOnlyList<string>? captions, int columns, int padding = 4)
    {
        if (tiles.Count == 0)
            throw new ArgumentException("a grid needs at least one tile");
        int tw = tiles.Max(t => t.Width), th = tiles.Max(t => t.Height);
        var scale = Math.Max(1, tw / 96);
        var captionHeight = captions == null ? 0 : PixelFont.Height * scale + 4;
        columns = Math.Max(1, Math.Min(columns, tiles.Count));
        var rows = (tiles.Count + columns - 1) / columns;
        var grid = new Image<Rgb24>(columns * (tw + padding) + padding, rows * (th + captionHeight + padding) + padding, new Rgb24(255, 255, 255));
        for (var i = 0; i < tiles.Count; i++)
        {
            int x = padding + i % columns * (tw + padding), y = padding + i / columns * (th + captionHeight + padding);
            var tile = tiles[i];
            grid.Mutate(c => c.DrawImage(tile, new Point(x, y), 1f));
            if (captions != null && i < captions.Count)
                PixelFont.Draw(grid, captions[i], x + 1, y + th + 2, scale, new Rgb24(20, 20, 20), tw);
        }
        return grid;
    }

    /// <summary>
    /// Outlines tokens on an image decoded from a <paramref name="grid"/> x <paramref name="grid"/> token grid:
    /// <paramref name="marked"/> holds grid x grid flags, row-major; token (r, c) covers the pixels from
    /// (offset + c x cell) x scale to (offset + (c + 1) x cell) x scale, and likewise for rows, where
    /// <paramref name="scale"/> is the factor by which the decoded image was enlarged. Draws in place, clipped.
    /// </summary>
    public static void OutlineTokens(Image<Rgb24> image, ReadOnlySpan<bool> marked, int grid, double offset, double cell, double scale, Rgb24 color, int thickness = 2)
    {
        for (var r = 0; r < grid; r++)
            for (var c = 0; c < grid; c++)
            {
                if (!marked[r * grid + c])
                    continue;
                int x0 = (int)Math.Round((offset + c * cell) * scale), x1 = (int)Math.Round((offset + (c + 1) * cell) * scale) - 1;
                int y0 = (int)Math.Round((offset + r * cell) * scale), y1 = (int)Math.Round((offset + (r + 1) * cell) * scale) - 1;
                for (var y = y0; y <= y1; y++)
                    for (var x = x0; x <= x1; x++)
                    {
                        var edge = x - x0 < thickness || x1 - x < thickness || y - y0 < thickness || y1 - y < thickness;
                        if (edge && x >= 0 && y >= 0 && x < image.Width && y < image.Height)
                            image[x, y] = color;
                    }
            }
    }

    /// <summary>A horizontal strip of tiles (each resized to <paramref name="side"/>) with captions, for `--explain`.</summary>
    public static Image<Rgb24> Strip(IReadOnlyList<Image<Rgb24>> tiles, IReadOnlyList<string> captions, int side)
    {
        var resized = tiles.Select(t => t.Width == side && t.Height == side ? t.Clone() : Resize(t, side)).ToList();
        try
        {
            return Grid(resized, captions, resized.Count);
        }
        finally
        {
            foreach (var r in resized)
                r.Dispose();
        }
    }
}

/// <summary>A 3x5 pixel font for captions (digits, letters, a few signs), drawn by hand: no font library is served here.</summary>
public static class PixelFont
{
    /// <summary>Glyph height in pixels at scale 1.</summary>
    public const int Height = 5;

    // Each glyph: 5 rows of 3 bits, top row first (bit 2 = left column).
    static readonly Dictionary<char, int[]> Glyphs = new()
    {
        ['0'] = [7, 5, 5, 5, 7],
        ['1'] = [2, 6, 2, 2, 7],
        ['2'] = [7, 1, 7, 4, 7],
        ['3'] = [7, 1, 7, 1, 7],
        ['4'] = [5, 5, 7, 1, 1],
        ['5'] = [7, 4, 7, 1, 7],
        ['6'] = [7, 4, 7, 5, 7],
        ['7'] = [7, 1, 1, 1, 1],
        ['8'] = [7, 5, 7, 5, 7],
        ['9'] = [7, 5, 7, 1, 7],
        ['a'] = [2, 5, 7, 5, 5],
        ['b'] = [6, 5, 6, 5, 6],
        ['c'] = [3, 4, 4, 4, 3],
        ['d'] = [6, 5, 5, 5, 6],
        ['e'] = [7, 4, 6, 4, 7],
        ['f'] = [7, 4, 6, 4, 4],
        ['g'] = [3, 4, 5, 5, 3],
        ['h'] = [5, 5, 7, 5, 5],
        ['i'] = [7, 2, 2, 2, 7],
        ['j'] = [1, 1, 1, 5, 2],
        ['k'] = [5, 5, 6, 5, 5],
        ['l'] = [4, 4, 4, 4, 7],
        ['m'] = [5, 7, 7, 5, 5],
        ['n'] = [6, 5, 5, 5, 5],
        ['o'] = [2, 5, 5, 5, 2],
        ['p'] = [6, 5, 6, 4, 4],
        ['q'] = [2, 5, 5, 6, 3],
        ['r'] = [6, 5, 6, 5, 5],
        ['s'] = [3, 4, 2, 1, 6],
        ['t'] = [7, 2, 2, 2, 2],
        ['u'] = [5, 5, 5, 5, 7],
        ['v'] = [5, 5, 5, 5, 2],
        ['w'] = [5, 5, 7, 7, 5],
        ['x'] = [5, 5, 2, 5, 5],
        ['y'] = [5, 5, 2, 2, 2],
        ['z'] = [7, 1, 2, 4, 7],
        ['-'] = [0, 0, 7, 0, 0],
        ['.'] = [0, 0, 0, 0, 2],
        [':'] = [0, 2, 0, 2, 0],
        ['/'] = [1, 1, 2, 4, 4],
        ['='] = [0, 7, 0, 7, 0],
        ['+'] = [0, 2, 7, 2, 0],
        ['('] = [1, 2, 2, 2, 1],
        [')'] = [4, 2, 2, 2, 4],
        [' '] = [0, 0, 0, 0, 0],
    };

    /// <summary>Draws text (case-insensitive; unknown characters as blanks), clipped to <paramref name="maxWidth"/>.</summary>
    public static void Draw(Image<Rgb24> image, string text, int x, int y, int scale, Rgb24 color, int maxWidth)
    {
        var cx = x;
        foreach (var ch in text.ToLowerInvariant())
        {
            if (cx + 3 * scale > x + maxWidth)
                break;
            var glyph = Glyphs.TryGetValue(ch, out var g) ? g : Glyphs[' '];
            for (var r = 0; r < Height; r++)
                for (var col = 0; col < 3; col++)
                    if ((glyph[r] >> (2 - col) & 1) != 0)
                        for (var dy = 0; dy < scale; dy++)
                            for (var dx = 0; dx < scale; dx++)
                            {
                                int px = cx + col * scale + dx, py = y + r * scale + dy;
                                if (px >= 0 && py >= 0 && px < image.Width && py < image.Height)
                                    image[px, py] = color;
                            }
            cx += 4 * scale;
        }
    }
}
