using System.Text.Json.Nodes;
using HiMar.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace HiMar.Runtime.Parity;

/// <summary>
/// The evaluators of the fixture's VAE cases (`vae_cases` in the manifest): the KL autoencoder built from
/// `vae_config`, loaded from vae-weights.safetensors, and run on the case inputs.
/// </summary>
public static class VaeParityCases
{
    /// <summary>`vae_encode`: image (B, 3, H, W) → moments = quant_conv(encoder(image)).</summary>
    public static Dictionary<string, Tensor> Encode(ParityFixture fixture, ParityCase c)
    {
        using var vae = Build(fixture);
        using var mixed = MixedPrecision.ForInference(vae, fixture.Precision);
        using var _ = torch.no_grad();
        return new() { ["moments"] = vae.Encode(fixture.Tensor(c, "image")) };
    }

    /// <summary>`vae_decode`: latent (B, z, h, w) → image = decoder(post_quant_conv(latent)).</summary>
    public static Dictionary<string, Tensor> Decode(ParityFixture fixture, ParityCase c)
    {
        using var vae = Build(fixture);
        using var mixed = MixedPrecision.ForInference(vae, fixture.Precision);
        using var _ = torch.no_grad();
        return new() { ["image"] = vae.Decode(fixture.Tensor(c, "latent")) };
    }

    /// <summary>The fixture's autoencoder in eval mode, with vae-weights.safetensors loaded.</summary>
    public static AutoencoderKL Build(ParityFixture fixture)
    {
        var json = fixture.VaeConfig ?? throw new InvalidDataException($"{fixture.Directory}: the manifest has no vae_config.");
        var vae = new AutoencoderKL(Config(json, fixture.Directory));
        try
        {
            HiMar.Model.Weights.Load(vae, fixture.Load("vae-weights.safetensors"), strict: true);
        }
        catch
        {
            vae.Dispose();
            throw;
        }
        vae.eval();
        return vae;
    }

    /// <summary>A <see cref="VaeConfig"/> from the reference's keyword arguments (a manifest's `vae_config`).</summary>
    public static VaeConfig Config(JsonObject json, string what = "vae_config")
    {
        JsonNode Field(string key) => json[key] ?? throw new InvalidDataException($"{what}: vae_config has no '{key}'.");
        int Int(string key) => Field(key).GetValue<int>();
        int[] Ints(string key) => Field(key).AsArray().Select(x => x!.GetValue<int>()).ToArray();
        return new VaeConfig(
            embedDim: Int("embed_dim"),
            ch: Int("ch"),
            chMult: Ints("ch_mult"),
            numResBlocks: Int("num_res_blocks"),
            resolution: Int("resolution"),
            inChannels: Int("in_channels"),
            outCh: Int("out_ch"),
            attnResolutions: Ints("attn_resolutions"),
            zChannels: Int("z_channels"),
            doubleZ: Field("double_z").GetValue<bool>(),
            scaleFactor: Field("scale_factor").GetValue<double>());
    }
}
