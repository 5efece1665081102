using System.IO.Compression;
using System.Text;
using System.Text.RegularExpressions;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Evaluation;

/// <summary>Mean and covariance of a set of feature vectors (the statistics FID compares), float64.</summary>
/// <param name="Mu">(d,) mean.</param>
/// <param name="Sigma">(d, d) covariance (unbiased, as numpy.cov).</param>
public sealed record FeatureStats(Tensor Mu, Tensor Sigma) : IDisposable
{
    /// <summary>Statistics of features (n, d).</summary>
    public static FeatureStats Of(Tensor features)
    {
        using var scope = torch.NewDisposeScope();
        var f = features.to(ScalarType.Float64);
        var mu = f.mean([0]);
        var centred = f - mu;
        var sigma = centred.T.matmul(centred) / (f.shape[0] - 1);
        return new FeatureStats(mu.MoveToOuterDisposeScope(), sigma.MoveToOuterDisposeScope());
    }

    /// <summary>Disposes both tensors.</summary>
    public void Dispose()
    {
        Mu.Dispose();
        Sigma.Dispose();
    }
}

/// <summary>
/// The generative-model metrics computed as the standard tools compute them: Fréchet distance (FID's formula,
/// float64), Inception Score (10 splits) and precision/recall with k-nearest-neighbour manifolds (k = 3).
/// The feature network is separate: these take features and probabilities.
/// </summary>
public static class Metrics
{
    /// <summary>
    /// ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64. The trace of the matrix square root is taken as the
    /// sum of square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), which is symmetric positive semi-definite,
    /// so the result is real and stable where S1 S2 is near singular (no complex parts to discard).
    /// </summary>
    public static double FrechetDistance(FeatureStats a, FeatureStats b)
    {
        using var scope = torch.NewDisposeScope();
        var diff = (a.Mu - b.Mu).square().sum().item<double>();
        var (l1, v1) = torch.linalg.eigh(a.Sigma);
        var sqrt1 = v1.matmul(torch.diag(l1.clamp(min: 0).sqrt())).matmul(v1.T);
        var inner = sqrt1.matmul(b.Sigma).matmul(sqrt1);
        inner = (inner + inner.T) / 2;
        var traceSqrt = torch.linalg.eigvalsh(inner).clamp(min: 0).sqrt().sum().item<double>();
        return diff + a.Sigma.trace().item<double>() + b.Sigma.trace().item<double>() - 2 * traceSqrt;
    }

    /// <summary>Inception Score: exp(E_x KL(p(y|x) || p(y))) over <paramref name="splits"/> equal splits; (mean, std).</summary>
    public static (double Mean, double Std) InceptionScore(Tensor probabilities, int splits = 10)
    {
        using var scope = torch.NewDisposeScope();
        var p = probabilities.to(ScalarType.Float64);
        var n = p.shape[0];
        var scores = new List<double>();
        for (var k = 0; k < splits; k++)
        {
            long start = k * n / splits, end = (k + 1) * n / splits;
            var part = p.narrow(0, start, end - start);
            var py = part.mean([0], keepdim: true);
            var kl = (part * ((part + 1e-12).log() - (py + 1e-12).log())).sum(1);
            scores.Add(Math.Exp(kl.mean().item<double>()));
        }
        var mean = scores.Average();
        var std = Math.Sqrt(scores.Select(s => (s - mean) * (s - mean)).Average());
        return (mean, std);
    }

    /// <summary>
    /// Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the union of balls reaching
    /// every point's k-th nearest neighbour in the same set; precision is the share of generated features inside
    /// the real manifold, recall the share of real features inside the generated one.
    /// </summary>
    public static (double Precision, double Recall) PrecisionRecall(Tensor real, Tensor generated, int k = 3)
    {
        using var scope = torch.NewDisposeScope();
        var r = real.to(ScalarType.Float64);
        var g = generated.to(ScalarType.Float64);
        // Distances in blocks of rows, so 50,000 x 50,000 never exists at once (256 rows x 50k: 100 MB).
        const long block = 256;
        Tensor Radii(Tensor x)
        {
            var parts = new List<Tensor>();
            for (long s = 0; s < x.shape[0]; s += block)
            {
                using var inner = torch.NewDisposeScope();
                var d = torch.cdist(x.narrow(0, s, Math.Min(block, x.shape[0] - s)), x);
                // The k-th neighbour other than the point itself: index k of the ascending distances.
                parts.Add(d.topk(k + 1, 1, largest: false, sorted: true).values.select(1, k).MoveToOuterDisposeScope());
            }
            return torch.cat(parts);
        }
        double Coverage(Tensor manifold, Tensor radii, Tensor probe)
        {
            long covered = 0;
            for (long s = 0; s < probe.shape[0]; s += block)
            {
                using var inner = torch.NewDisposeScope();
                var d = torch.cdist(probe.narrow(0, s, Math.Min(block, probe.shape[0] - s)), manifold);
                covered += (d <= radii.unsqueeze(0)).any(1).sum().item<long>();
            }
            return (double)covered / probe.shape[0];
        }
        return (Coverage(r, Radii(r), g), Coverage(g, Radii(g), r));
    }

    /// <summary>Reads the usual reference statistics file: an `.npz` holding float64 or float32 `mu` (d) and `sigma`
    /// (d, d). Entries are read as <see cref="Checkpoints.ZipEntries"/> reads them (declared sizes checked, CRC-32
    /// verified); any problem is a <see cref="BadInputException"/> naming the file.</summary>
    public static FeatureStats ReadNpz(string path)
    {
        try
        {
            using var stream = File.OpenRead(path);
            using var zip = new ZipArchive(stream, ZipArchiveMode.Read);
            Tensor Read(string name)
            {
                var entry = zip.GetEntry(name + ".npy") ?? throw new BadInputException($"{path}: no '{name}' array.");
                return ParseNpy(Checkpoints.ZipEntries.ReadAll(entry, path, stream.Length, Array.MaxLength), $"{path}:{name}");
            }
            var mu = Read("mu");
            Tensor sigma;
            try
            {
                sigma = Read("sigma");
            }
            catch
            {
                mu.Dispose();
                throw;
            }
            if (mu.dim() != 1 || sigma.dim() != 2 || sigma.shape[0] != mu.shape[0] || sigma.shape[1] != mu.shape[0])
            {
                var shapes = $"mu ({string.Join(", ", mu.shape)}), sigma ({string.Join(", ", sigma.shape)})";
                mu.Dispose();
                sigma.Dispose();
                throw new BadInputException($"{path}: {shapes}; expected mu (d) and sigma (d, d).");
            }
            return new FeatureStats(mu, sigma);
        }
        catch (InvalidDataException e)
        {
            // The zip's own complaints (no central directory, a bad local header).
            throw new BadInputException($"{path}: not an .npz archive ({e.Message.Split('\n')[0]}).", e);
        }
    }

    /// <summary>Writes statistics as an `.npz` with float64 `mu` and `sigma` (atomically).</summary>
    public static void WriteNpz(FeatureStats stats, string path) =>
        Checkpoints.AtomicFile.Write(path, stream =>
        {
            using var zip = new ZipArchive(stream, ZipArchiveMode.Create, leaveOpen: true);
            foreach (var (name, t) in new[] { ("mu", stats.Mu), ("sigma", stats.Sigma) })
            {
                using var entry = zip.CreateEntry(name + ".npy").Open();
                var bytes = ToNpy(t);
                entry.Write(bytes);
            }
        });

    static Tensor ParseNpy(byte[] b, string what)
    {
        if (b.Length < 10 || b[0] != 0x93 || Encoding.ASCII.GetString(b, 1, 5) != "NUMPY")
            throw new BadInputException($"{what}: not a .npy array.");
        int offset = b[6] == 1 ? 10 : 12;
        long headerLen = b[6] == 1 ? BitConverter.ToUInt16(b, 8) : b.Length >= 12 ? BitConverter.ToUInt32(b, 8) : -1;
        if (headerLen < 0 || headerLen > b.Length - offset)
            throw new BadInputException($"{what}: the .npy header is truncated.");
        var header = Encoding.ASCII.GetString(b, offset, (int)headerLen);
        var descr = Regex.Match(header, @"'descr':\s*'([<>|]?[a-z]\d+)'").Groups[1].Value;
        if (Regex.IsMatch(header, @"'fortran_order':\s*True"))
            throw new BadInputException($"{what}: Fortran-ordered arrays are not read.");
        var shape = Regex.Match(header, @"'shape':\s*\(([^)]*)\)").Groups[1].Value
            .Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
            .Select(d => long.TryParse(d, out var v) && v >= 0 ? v : throw new BadInputException($"{what}: shape entry '{d}' is not an integer >= 0.")).ToArray();
        var (type, size) = descr switch
        {
            "<f8" => (ScalarType.Float64, 8),
            "<f4" => (ScalarType.Float32, 4),
            _ => throw new BadInputException($"{what}: dtype '{descr}' is not read (float32 or float64 little-endian)."),
        };
        var data = b.AsSpan(offset + (int)headerLen);
        if (!Checkpoints.SafeTensors.TryByteCount(shape, size, out var bytes) || data.Length < bytes)
            throw new BadInputException($"{what}: truncated ({data.Length} bytes for shape ({string.Join(", ", shape)}) of {descr}).");
        var t = torch.empty(shape, type);
        data[..(int)bytes].CopyTo(t.bytes);
        return t.to(ScalarType.Float64);
    }

    static byte[] ToNpy(Tensor t)
    {
        using var c = t.detach().cpu().to(ScalarType.Float64).contiguous();
        var shape = c.shape.Length == 1 ? $"({c.shape[0]},)" : $"({string.Join(", ", c.shape)})";
        var header = $"{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}, }}";
        var total = 10 + header.Length + 1;
        header = header.PadRight(header.Length + (64 - total % 64) % 64) + "\n";
        var ms = new MemoryStream();
        ms.Write([0x93]);
        ms.Write(Encoding.ASCII.GetBytes("NUMPY"));
        ms.Write([1, 0]);
        ms.Write(BitConverter.GetBytes((ushort)header.Length));
        ms.Write(Encoding.ASCII.GetBytes(header));
        ms.Write(c.bytes);
        return ms.ToArray();
    }
}
