using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Sampling;

/// <summary>What a noise draw is for, in the order the reference sampler draws them.</summary>
public enum NoiseRole
{
    /// <summary>Start noise of one phase-1 MLP-head loop (half size with guidance: both halves share it).</summary>
    Phase1Init,

    /// <summary>Noise of one phase-1 diffusion step (the whole, possibly doubled, batch).</summary>
    Phase1Step,

    /// <summary>Start noise of one phase-2 Transformer-head loop (half size with guidance).</summary>
    Phase2Init,

    /// <summary>Noise of one phase-2 diffusion step.</summary>
    Phase2Step,
}

/// <summary>
/// Where the sampler's randomness comes from: generation orders and every noise draw. A draw is laid out as
/// [half][image][row]: `halves` copies (2 for the guided batch's conditional and
/// unconditional halves) of each image's `rowsPerImage` rows of shape `rowShape`.
/// </summary>
public interface INoiseSource
{
    /// <summary>Generation orders (B, S + N): a permutation of the pivots, then of the dense positions.</summary>
    Tensor Orders(long pivots, long dense, Device device);

    /// <summary>One draw: (halves * B * rowsPerImage, rowShape...).</summary>
    Tensor Draw(NoiseRole role, int halves, long rowsPerImage, long[] rowShape, Device device);
}

/// <summary>
/// The default source: one seeded torch generator per image (seeded from the run seed and the image's index in
/// the run), so image i of a run with seed s is the same whatever the batch size, and no two images share noise.
/// </summary>
public sealed class SeededNoise : INoiseSource, IDisposable
{
    readonly torch.Generator[] generators;

    /// <summary>Generators for images <paramref name="firstImage"/> .. + <paramref name="count"/> - 1 of a run.</summary>
    public SeededNoise(long seed, long firstImage, int count)
    {
        generators = new torch.Generator[count];
        for (var i = 0; i < count; i++)
            generators[i] = new torch.Generator(ImageSeed(seed, firstImage + i));
    }

    /// <summary>The seed of image <paramref name="image"/> in a run with seed <paramref name="seed"/> (SplitMix64).</summary>
    public static ulong ImageSeed(long seed, long image)
    {
        var z = unchecked((ulong)seed * 0x9E3779B97F4A7C15UL + (ulong)image + 0x632BE59BD9B4E019UL);
        z = unchecked((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL);
        z = unchecked((z ^ (z >> 27)) * 0x94D049BB133111EBUL);
        return z ^ (z >> 31);
    }

    /// <inheritdoc/>
    public Tensor Orders(long pivots, long dense, Device device)
    {
        using var scope = torch.NewDisposeScope();
        var rows = generators.Select(g =>
        {
            var p = torch.randperm(pivots, generator: g);
            var d = torch.randperm(dense, generator: g) + pivots;
            return torch.cat([p, d]);
        }).ToArray();
        return torch.stack(rows).to(device).MoveToOuterDisposeScope();
    }

    /// <inheritdoc/>
    public Tensor Draw(NoiseRole role, int halves, long rowsPerImage, long[] rowShape, Device device)
    {
        using var scope = torch.NewDisposeScope();
        var shape = new[] { rowsPerImage }.Concat(rowShape).ToArray();
        // Per image, the conditional rows are drawn before the unconditional ones.
        var perImage = generators.Select(g => Enumerable.Range(0, halves).Select(_ => torch.randn(shape, generator: g)).ToArray()).ToArray();
        var parts = Enumerable.Range(0, halves).SelectMany(h => perImage.Select(img => img[h])).ToArray();
        return torch.cat(parts, 0).to(device).MoveToOuterDisposeScope();
    }

    /// <summary>Disposes the generators.</summary>
    public void Dispose()
    {
        foreach (var g in generators)
            g.Dispose();
    }
}

/// <summary>
/// Replays recorded orders and noise (a parity fixture's `sample_tokens` case): each draw returns the next
/// recorded tensor of the requested role, skipping the reference's unused draws, and checks its shape.
/// </summary>
public sealed class ReplayNoise(Tensor orders, IReadOnlyList<(string Role, Tensor Noise)> recorded) : INoiseSource
{
    int next;

    /// <summary>How many recorded draws were consumed or skipped.</summary>
    public int Position => next;

    static string RoleName(NoiseRole role) => role switch
    {
        NoiseRole.Phase1Init => "p1_init",
        NoiseRole.Phase1Step => "p1_step",
        NoiseRole.Phase2Init => "p2_init",
        _ => "p2_step",
    };

    /// <inheritdoc/>
    public Tensor Orders(long pivots, long dense, Device device) => orders.to(device).clone();

    /// <inheritdoc/>
    public Tensor Draw(NoiseRole role, int halves, long rowsPerImage, long[] rowShape, Device device)
    {
        while (next < recorded.Count && recorded[next].Role == "p2_unused")
            next++;
        if (next >= recorded.Count)
            throw new InvalidOperationException($"the replay ran out of recorded noise at a {RoleName(role)} draw");
        var (name, noise) = recorded[next];
        if (name != RoleName(role))
            throw new InvalidOperationException($"recorded draw {next} is {name}, the sampler asked for {RoleName(role)}");
        next++;
        return noise.to(device).clone();
    }
}
