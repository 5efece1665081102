/// `himar serve`: a page that shows Hi-MAR generate step by step (src/HiMar.Runtime/Serving).
module HiMar.Cli.Commands.Serve

open System
open Argu
open HiMar.Runtime
open HiMar.Runtime.Serving

/// Arguments of `himar serve`.
type ServeArgs =
    | [<AltCommandLine("-p")>] Port of port: int
    | Host of address: string
    | Preset of name: string
    | [<AltCommandLine("-c")>] Checkpoint of path: string
    | Vae of path: string
    | Text_Encoder of dir: string
    | Weights of ``ema|model``: string
    | Device of device: string
    | Queue of waiting: int

    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Port _ -> "the port to listen on (default 8080; 0 picks a free one)."
            | Host _ ->
                "the address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)."
            | Preset _ ->
                "a shipped model to serve (repeatable; default: every shipped one: fashion, fashion-mar and fashion-text)."
            | Checkpoint _ ->
                "serve this model instead: an imported folder, a training checkpoint folder or a reference .pth."
            | Vae _ -> "the KL autoencoder of a --checkpoint whose tokens are VAE latents."
            | Text_Encoder _ -> "the external text encoder of a --checkpoint text model that has no built-in one."
            | Weights _ -> Common.WeightsHelp
            | Device _ -> Common.DeviceHelp
            | Queue _ -> "generations that may wait per model while one runs (default 2); more get 503."

/// Loads the models, serves until Ctrl+C, and returns the exit code.
let run (args: ParseResults<ServeArgs>) =
    Native.TorchNative.EnsureLoaded()

    let dev =
        match args.GetResult(Device, defaultValue = "cpu").ToLowerInvariant() with
        | "cpu" -> TorchSharp.torch.CPU
        | d when d.StartsWith "cuda" -> TorchSharp.torch.device d
        | other -> raise (BadInputException(sprintf "--device: unknown device '%s' (cpu, cuda, cuda:N)." other))

    let useEma = Catalog.WeightsChoice.UseEma(args.TryGetResult Weights |> Option.toObj)

    // The address is checked before the models load (seconds); the port is taken only once they have.
    let host = args.GetResult(Host, defaultValue = "127.0.0.1")
    let port = args.GetResult(Port, defaultValue = 8080)
    DemoServer.ParseHost host |> ignore

    if port < 0 || port > 65535 then
        raise (BadInputException(sprintf "--port: %d is not a port number (0..65535)." port))

    let waiting = args.GetResult(Queue, defaultValue = 2)

    if waiting < 0 || waiting > 64 then
        raise (BadInputException(sprintf "--queue: %d is outside 0..64." waiting))

    let vae = args.TryGetResult Vae |> Option.toObj
    let textEncoder = args.TryGetResult Text_Encoder |> Option.toObj

    let sources: (string * string * (string | null) * (string | null)) list =
        match args.TryGetResult Checkpoint, args.GetResults Preset with
        | Some path, [] ->
            let name =
                match IO.Path.GetFileNameWithoutExtension(IO.Path.TrimEndingDirectorySeparator path) with
                | null
                | "" -> "model"
                | n -> n

            [ name, path, vae, textEncoder ]
        | Some _, _ -> raise (BadInputException "--checkpoint and --preset: give one or the other.")
        | None, presets ->
            let available = Array.ofSeq (Catalog.ShippedModels.Names())

            let names =
                if presets.IsEmpty then
                    List.ofArray available
                else
                    presets |> List.map (fun p -> p.ToLowerInvariant()) |> List.distinct

            for n in names do
                if not (Array.contains n available) then
                    raise (
                        BadInputException(
                            sprintf "--preset: no shipped model '%s' (shipped: %s)." n (String.Join(", ", available))
                        )
                    )

            if names.IsEmpty then
                raise (
                    EnvironmentException(
                        sprintf "%s: no shipped models; give one with --checkpoint." Catalog.ShippedModels.Root
                    )
                )

            [
                for n in names -> n, IO.Path.Combine(Catalog.ShippedModels.Root, n), null, null
            ]

    let models = ResizeArray<ServedModel>()

    try
        for name, path, v, t in sources do
            models.Add(ServedModel.Load(name, path, v, t, dev, useEma, waiting))

        let server = DemoServer.StartAsync(models, host, port).GetAwaiter().GetResult()

        use stop = new Threading.CancellationTokenSource()

        Console.CancelKeyPress.Add(fun e ->
            e.Cancel <- true
            stop.Cancel())

        let names = String.Join(", ", models |> Seq.map (fun m -> m.Name))
        printfn "himar serve: %s on %s (Ctrl+C stops)" names (server.Address.ToString())
        server.WaitAsync(stop.Token).GetAwaiter().GetResult()
        server.DisposeAsync().AsTask().GetAwaiter().GetResult()
        0
    finally
        for m in models do
            m.Dispose()
