namespace HiMar.Model

open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn

/// Looking at a model's structure without paying for its weights.
module Anatomy =
    /// Builds a module with every tensor on the meta device: shapes and counts without memory or
    /// initialisation cost. Sets TorchSharp's default device for the duration, so call it from one thread.
    [<CompiledName("OnMeta")>]
    let onMeta (build: unit -> 'M) =
        let previous = torch.get_default_device ()
        torch.set_default_device torch.META

        try
            build ()
        finally
            torch.set_default_device previous

    /// Parameter counts of a configuration: per top-level module (in registration order) and in total.
    [<CompiledName("ParameterCounts")>]
    let parameterCounts (config: HiMarConfig) =
        use m = onMeta (fun () -> new HiMAR(config))
        Weights.parameterCounts m, Weights.parameterCount m

/// From-scratch initialisation as the reference does it before training (MAE/DiT recipes): Linear layers
/// xavier-uniform with zero bias, LayerNorms 1/0, tokens and learned positions N(0, 0.02), the patch
/// embeddings xavier on their flattened kernels, the timestep MLPs N(0, 0.02), and the diffusion heads'
/// adaLN modulations and output layers zero (so each head starts by predicting zero noise).
module Init =
    let private zeroLinear (m: torch.nn.Module) =
        for struct (_, p) in m.named_parameters () do
            p.zero_ () |> ignore

    /// Initialises every parameter of a Hi-MAR model in place.
    [<CompiledName("HiMar")>]
    let himar (model: HiMAR) =
        use _ = torch.no_grad ()

        for struct (name, m) in model.named_modules () do
            match m with
            | :? Mixed.Linear as lin ->
                torch.nn.init.xavier_uniform_ lin.Weight |> ignore

                match lin.Bias with
                | null -> ()
                | b -> b.zero_ () |> ignore
            | :? LayerNorm as ln ->
                ln.weight.fill_ (scalar 1.0) |> ignore

                match ln.bias with
                | null -> ()
                | b -> b.zero_ () |> ignore
            | :? Mixed.Conv2d as conv when name.EndsWith "proj" ->
                // xavier on the (out, in * k * k) view of the kernel, as DiT does for its patch embedding
                let w = conv.Weight
                use flat = w.view (w.shape.[0], -1L)
                torch.nn.init.xavier_uniform_ flat |> ignore
                conv.Bias.zero_ () |> ignore
            | _ -> ()

        for struct (name, p) in model.named_parameters () do
            let isToken =
                name = "fake_latent"
                || name = "fake_context"
                || name = "text_encoder.pos_embed"
                || name = "text_encoder.token_embed.weight"
                || name = "cond_tokens"
                || name = "mask_token"
                || name.EndsWith "pos_embed_learned"

            if isToken || name = "class_emb.weight" then
                torch.nn.init.normal_ (p, 0.0, 0.02) |> ignore
            elif
                (name.Contains "time_embed.mlp." || name.Contains "t_embedder.mlp.")
                && name.EndsWith ".weight"
            then
                torch.nn.init.normal_ (p, 0.0, 0.02) |> ignore

        for struct (name, m) in model.named_modules () do
            let zero =
                (name.StartsWith "diffloss.net.res_blocks." && name.EndsWith "adaLN_modulation.1")
                || (name.StartsWith "cond_diffloss.net.blocks."
                    && name.EndsWith "adaLN_modulation.1")
                || name.EndsWith "net.final_layer.adaLN_modulation.1"
                || name.EndsWith "net.final_layer.linear"

            if zero then
                zeroLinear m
