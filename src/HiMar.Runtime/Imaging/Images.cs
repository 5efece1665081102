using HiMar.Runtime.Checkpoints;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.PixelFormats;
using SixLabors.ImageSharp.Processing;
using SkiaSharp;
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
    /// A grid of equally sized tiles, <paramref name="columns"/> wide, each with its caption written underneath in
    /// <see cref="TextFont"/> (a band of 5 x scale + 4 pixels, scale = tile width / 96, at least 1; descenders may reach
    /// into the padding below it). The tiles and the layout do not depend on the captions' text.
    /// </summary>
    public static Image<Rgb24> Grid(IReadOnlyList<Image<Rgb24>> tiles, IReadOnlyList<string>? captions, int columns, int padding = 4)
    {
        if (tiles.Count == 0)
            throw new ArgumentException("a grid needs at least one tile");
        int tw = tiles.Max(t => t.Width), th = tiles.Max(t => t.Height);
        var scale = Math.Max(1, tw / 96);
        var captionHeight = captions == null ? 0 : CaptionBand(scale);
        columns = Math.Max(1, Math.Min(columns, tiles.Count));
        var rows = (tiles.Count + columns - 1) / columns;
        var grid = new Image<Rgb24>(columns * (tw + padding) + padding, rows * (th + captionHeight + padding) + padding, new Rgb24(255, 255, 255));
        for (var i = 0; i < tiles.Count; i++)
        {
            int x = padding + i % columns * (tw + padding), y = padding + i / columns * (th + captionHeight + padding);
            var tile = tiles[i];
            grid.Mutate(c => c.DrawImage(tile, new Point(x, y), 1f));
            if (captions != null && i < captions.Count)
                DrawCaption(grid, captions[i], x + 1, y + th, tw - 1, captionHeight + padding, captionHeight);
        }
        return grid;
    }

    /// <summary>The height of a grid's caption band at a tile scale (5 x scale + 4 pixels: the band of the former pixel font).</summary>
    public static int CaptionBand(int scale) => 5 * scale + 4;

    /// <summary>Writes one line of text in <see cref="TextFont"/> at <paramref name="size"/> pixels, dark grey on the
    /// white area (x, y, width, height) of <paramref name="image"/>, baseline near the top; clipped to the area.</summary>
    public static void DrawCaption(Image<Rgb24> image, string text, int x, int y, int width, int height, float size)
    {
        width = Math.Min(width, image.Width - x);
        height = Math.Min(height, image.Height - y);
        if (width <= 0 || height <= 0 || text.Length == 0)
            return;
        TextFont.RequireNative();
        using var bitmap = new SKBitmap(new SKImageInfo(width, height, SKColorType.Rgba8888, SKAlphaType.Premul));
        using (var canvas = new SKCanvas(bitmap))
        {
            canvas.Clear(SKColors.White);
            using var font = new SKFont(TextFont.Typeface, size) { Edging = SKFontEdging.Antialias, Subpixel = true };
            using var paint = new SKPaint { Color = new SKColor(20, 20, 20), IsAntialias = true };
            // Baseline one pixel below the top plus the height of ascenders (about 0.76 of the size in DejaVu Sans).
            canvas.DrawText(text, 0, 1 + MathF.Ceiling(0.76f * size), font, paint);
        }
        var pixels = bitmap.GetPixelSpan();
        for (var row = 0; row < height; row++)
            for (var col = 0; col < width; col++)
            {
                var k = 4 * (row * width + col);
                image[x + col, y + row] = new Rgb24(pixels[k], pixels[k + 1], pixels[k + 2]);
            }
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
