using HiMar.Model;
using HiMar.Runtime.Data;
using HiMar.Runtime.Native;
using HiMar.Runtime.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Evaluation;

/// <summary>Trains and applies the Fashion-MNIST classifier behind FD-FMNIST and the class accuracy of samples.</summary>
public static class ClassifierRuns
{
    /// <summary>Trains a classifier on <paramref name="train"/> (AdamW, seeded order, flips off) and returns it in eval mode.</summary>
    public static FashionClassifier Train(IImageDataset train, int epochs, int batch = 128, double lr = 1e-3, long seed = 1, Action<int, double>? progress = null)
    {
        torch.manual_seed(seed);
        var model = new FashionClassifier(train.ClassCount);
        using var opt = new NamedAdamW(model, 0.0);
        var rng = new Random((int)seed);
        model.train();
        for (var epoch = 0; epoch < epochs; epoch++)
        {
            var order = Enumerable.Range(0, train.Count).ToArray();
            rng.Shuffle(order);
            double lossSum = 0;
            var batches = 0;
            for (var start = 0; start + batch <= order.Length; start += batch)
            {
                using var scope = torch.NewDisposeScope();
                using var gcPause = GcPause.Begin(); // libtorch reads TorchSharp's temporary Scalars: no collection mid-call
                var idx = order[start..(start + batch)];
                var x = train.Batch(idx, idx.Select(_ => false).ToArray());
                var y = torch.tensor(idx.Select(i => train.Labels[i]).ToArray());
                opt.ZeroGrad();
                var loss = torch.nn.functional.cross_entropy(model.call(x), y);
                // oneDNN's convolution backward returns NaN now and then for few output channels (see OneDnn).
                using (Native.OneDnn.Off())
                    loss.backward();
                opt.Step(lr);
                lossSum += loss.item<float>();
                batches++;
            }
            progress?.Invoke(epoch + 1, lossSum / Math.Max(1, batches));
        }
        model.eval();
        return model;
    }

    /// <summary>The shipped feature network from its folder (weights.safetensors), in eval mode.</summary>
    public static FashionClassifier Load(string dir, int classes = 10)
    {
        var model = new FashionClassifier(classes);
        Checkpoints.ModelFiles.Load(model, Path.Combine(dir, "weights.safetensors"));
        model.eval();
        return model;
    }

    /// <summary>Penultimate features (n, 128) and class probabilities (n, classes) of images (n, 1, 28, 28) in [-1, 1].</summary>
    public static (Tensor Features, Tensor Probabilities) Apply(FashionClassifier model, Tensor images, int batch = 512)
    {
        using var noGrad = torch.no_grad();
        var feats = new List<Tensor>();
        var probs = new List<Tensor>();
        for (long s = 0; s < images.shape[0]; s += batch)
        {
            using var scope = torch.NewDisposeScope();
            using var gcPause = GcPause.Begin(); // libtorch reads TorchSharp's temporary Scalars: no collection mid-call
            var x = images.narrow(0, s, Math.Min(batch, images.shape[0] - s));
            var f = model.Features(x);
            feats.Add(f.MoveToOuterDisposeScope());
            probs.Add(torch.nn.functional.softmax(model.call(x), 1).MoveToOuterDisposeScope());
        }
        var result = (torch.cat(feats), torch.cat(probs));
        foreach (var t in feats.Concat(probs))
            t.Dispose();
        return result;
    }

    /// <summary>All images of a data set as one tensor (n, 1, H, W).</summary>
    public static Tensor All(IImageDataset data) => data.Batch(Enumerable.Range(0, data.Count).ToArray(), new bool[data.Count]);

    /// <summary>Accuracy of the classifier on a labelled data set.</summary>
    public static double Accuracy(FashionClassifier model, IImageDataset data)
    {
        using var scope = torch.NewDisposeScope();
        using var gcPause = GcPause.Begin(); // libtorch reads TorchSharp's temporary Scalars: no collection mid-call
        var (_, p) = Apply(model, All(data));
        var labels = torch.tensor(data.Labels.ToArray());
        return p.argmax(1).eq(labels).to(ScalarType.Float64).mean().item<double>();
    }
}
