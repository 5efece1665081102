using System.Net;
using System.Reflection;
using System.Text;
using System.Text.Json;
using System.Threading.Channels;
using Markdig;
using Markdig.Extensions.AutoIdentifiers;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Http.Features;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

namespace HiMar.Runtime.Serving;

/// <summary>
/// `himar serve`: one page (HTML, CSS and JavaScript shipped inside this assembly) that shows Hi-MAR generate step
/// by step, and its API: GET /api/models (the models, their defaults, limits and parts) and GET /api/generate
/// (server-sent events: a `frame` per generation step, then `done` with the image, or `error`). Requests name
/// models and settings only; nothing in a request reaches the file system.
/// </summary>
public sealed class DemoServer : IAsyncDisposable
{
    readonly WebApplication app;
    readonly IReadOnlyDictionary<string, ServedModel> models;

    static readonly JsonSerializerOptions Json = new() { PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower };

    /// <summary>The page and its assets: route -> (content type, bytes), read from the assembly's resources.</summary>
    static readonly IReadOnlyDictionary<string, (string Type, byte[] Body)> Assets = LoadAssets();

    DemoServer(WebApplication app, IReadOnlyDictionary<string, ServedModel> models, Uri address)
    {
        this.app = app;
        this.models = models;
        Address = address;
    }

    /// <summary>Where the page is (http://host:port/).</summary>
    public Uri Address { get; }

    /// <summary>The address a `--host` names: an IP address or `localhost` (the loopback address).</summary>
    public static IPAddress ParseHost(string host)
    {
        if (string.Equals(host, "localhost", StringComparison.OrdinalIgnoreCase))
            return IPAddress.Loopback;
        if (IPAddress.TryParse(host, out var ip))
            return ip;
        throw new BadInputException($"--host: '{host}' is not an IP address (use 127.0.0.1, the default, ::1, or 0.0.0.0 for every interface).");
    }

    /// <summary>Starts serving <paramref name="models"/> (the first is the page's default) on host:port (port 0: any free port).</summary>
    public static async Task<DemoServer> StartAsync(IReadOnlyList<ServedModel> models, string host = "127.0.0.1", int port = 8080)
    {
        if (models.Count == 0)
            throw new ArgumentException("himar serve needs at least one model");
        if (port is < 0 or > 65535)
            throw new BadInputException($"--port: {port} is not a port number (0..65535).");
        var ip = ParseHost(host);
        var builder = WebApplication.CreateSlimBuilder(new WebApplicationOptions { ApplicationName = "himar", ContentRootPath = AppContext.BaseDirectory });
        builder.Logging.ClearProviders();
        builder.WebHost.ConfigureKestrel(k => k.Listen(ip, port));
        builder.Services.Configure<HostOptions>(o => o.ShutdownTimeout = TimeSpan.FromSeconds(3));
        var app = builder.Build();
        var byName = models.ToDictionary(m => m.Name, StringComparer.Ordinal);
        var address = new Uri($"http://{(ip.AddressFamily == System.Net.Sockets.AddressFamily.InterNetworkV6 ? $"[{ip}]" : ip.ToString())}:{port}/");
        var server = new DemoServer(app, byName, address);
        server.Map(models);
        try
        {
            await app.StartAsync().ConfigureAwait(false);
        }
        catch (IOException e)
        {
            await app.DisposeAsync().ConfigureAwait(false);
            throw new EnvironmentException($"--port: cannot listen on {host} port {port} ({e.Message.TrimEnd('.')}); pick another port with --port.", e);
        }
        var bound = app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()?.Addresses.FirstOrDefault();
        return bound == null ? server : new DemoServer(app, byName, new Uri(bound.Replace("0.0.0.0", "127.0.0.1").Replace("[::]", "[::1]") + "/"));
    }

    void Map(IReadOnlyList<ServedModel> list)
    {
        foreach (var (route, asset) in Assets)
            app.MapGet(route, () => Results.Bytes(asset.Body, asset.Type));
        app.MapGet("/api/models", () => Results.Json(list.Select(Describe).ToList(), Json));
        app.MapGet("/api/generate", Generate);
    }

    static object Describe(ServedModel m)
    {
        var c = m.Model.Config;
        return new
        {
            name = m.Name,
            kind = m.IsText ? "text" : "class",
            classes = m.ClassNames,
            example_prompts = m.ExamplePrompts,
            vocabulary = m.Vocabulary,
            image_size = c.Backbone.ImageSize,
            pivot_grid = c.Pivots.GridSide,
            dense_grid = c.SeqH,
            defaults = m.Defaults,
            limits = new
            {
                guidance = new[] { 1.0, ServedModel.MaxGuidance },
                temperature = new[] { 0.0, ServedModel.MaxTemperature },
                steps1 = m.MaxSteps1,
                steps2 = Math.Min(ServedModel.MaxSteps2, c.DenseTokens),
                head_steps = Math.Min(ServedModel.MaxHeadSteps, c.Training.DiffusionSteps),
                prompt_length = ServedModel.MaxPromptLength,
            },
            parts = m.Parts,
            parameters = m.Parts.Sum(p => p.Parameters),
        };
    }

    async Task Generate(HttpContext context)
    {
        var query = context.Request.Query.ToDictionary(q => q.Key, q => q.Value.ToString(), StringComparer.Ordinal);
        var response = context.Response;
        ServedModel model;
        GenerateSettings settings;
        try
        {
            var name = query.GetValueOrDefault("model");
            model = string.IsNullOrEmpty(name) ? models.Values.First()
                : models.GetValueOrDefault(name) ?? throw new BadInputException($"model: '{(name.Length > 40 ? name[..40] + "..." : name)}' is not served here (served: {string.Join(", ", models.Keys)}).");
            settings = model.Parse(query);
        }
        catch (BadInputException e)
        {
            await Plain(response, StatusCodes.Status400BadRequest, e.Message).ConfigureAwait(false);
            return;
        }
        using var ticket = model.Queue.TryEnter();
        if (ticket == null)
        {
            response.Headers.RetryAfter = "5";
            await Plain(response, StatusCodes.Status503ServiceUnavailable, $"the model '{model.Name}' is busy: one generation runs and {model.Queue.Capacity - 1} wait; try again in a few seconds.").ConfigureAwait(false);
            return;
        }

        var token = context.RequestAborted;
        response.ContentType = "text/event-stream";
        response.Headers.CacheControl = "no-cache";
        context.Features.Get<IHttpResponseBodyFeature>()?.DisableBuffering();
        var events = Channel.CreateUnbounded<(string Event, string Data)>(new UnboundedChannelOptions { SingleReader = true });
        var ahead = model.Queue.Pending - 1;
        events.Writer.TryWrite(("queued", JsonSerializer.Serialize(new { ahead, settings }, Json)));
        var job = ticket.RunAsync(() => model.Generate(settings, f => events.Writer.TryWrite(("frame", FrameJson(f))), token), token);
        _ = job.ContinueWith(t =>
        {
            if (t.IsCompletedSuccessfully)
                events.Writer.TryWrite(("done", JsonSerializer.Serialize(new { image = DataUrl(t.Result.Png), seconds = t.Result.Seconds }, Json)));
            else if (t.Exception?.GetBaseException() is { } e and not OperationCanceledException)
                events.Writer.TryWrite(("error", JsonSerializer.Serialize(new { message = e is HiMarException or ArgumentException ? e.Message : $"generation failed: {e.GetType().Name}: {FirstLine(e.Message)}" }, Json)));
            events.Writer.TryComplete();
        }, TaskScheduler.Default);
        try
        {
            await foreach (var (name, data) in events.Reader.ReadAllAsync(token).ConfigureAwait(false))
            {
                await response.WriteAsync($"event: {name}\ndata: {data}\n\n", token).ConfigureAwait(false);
                await response.Body.FlushAsync(token).ConfigureAwait(false);
            }
        }
        catch (OperationCanceledException) when (token.IsCancellationRequested)
        {
            // The client went away: the job sees the same token and stops at its next diffusion step.
        }
        catch (IOException)
        {
            // The connection broke while writing; the request's token cancels the job.
        }
        try
        {
            await job.ConfigureAwait(false); // the place in the queue is given back only once the job has stopped
        }
        catch (Exception)
        {
            // Reported above as an `error` event, or a cancellation.
        }
    }

    static string FirstLine(string text) => text.Split('\n', 2)[0].Trim();

    static string DataUrl(byte[] png) => "data:image/png;base64," + Convert.ToBase64String(png);

    static string FrameJson(StepFrame f) => JsonSerializer.Serialize(new
    {
        phase = f.Phase,
        step = f.Step,
        steps = f.Steps,
        image = DataUrl(f.Png),
        grid = f.Grid,
        offset = f.Offset,
        cell = f.Cell,
        decided = f.Decided,
        known = f.Known,
    }, Json);

    static Task Plain(HttpResponse response, int status, string message)
    {
        response.StatusCode = status;
        response.ContentType = "text/plain; charset=utf-8";
        return response.WriteAsync(message + "\n");
    }

    static IReadOnlyDictionary<string, (string, byte[])> LoadAssets()
    {
        var assembly = typeof(DemoServer).Assembly;
        var result = new Dictionary<string, (string, byte[])>(StringComparer.Ordinal);
        const string prefix = "himar.wwwroot.";
        foreach (var resource in assembly.GetManifestResourceNames().Where(n => n.StartsWith(prefix, StringComparison.Ordinal)))
        {
            using var stream = assembly.GetManifestResourceStream(resource)!;
            using var copy = new MemoryStream();
            stream.CopyTo(copy);
            var file = resource[prefix.Length..];
            var type = Path.GetExtension(file) switch
            {
                ".html" => "text/html; charset=utf-8",
                ".js" => "text/javascript; charset=utf-8",
                ".css" => "text/css; charset=utf-8",
                ".md" => "text/markdown; charset=utf-8",
                ".png" => "image/png",
                _ => "application/octet-stream",
            };
            result[file == "index.html" ? "/" : "/" + file] = (type, copy.ToArray());
        }
        // The architecture page is docs/architecture.md rendered by Markdig (tables, code blocks, GitHub's heading
        // anchors, which the model panel links to) into the page's <!--doc--> slot.
        if (result.TryGetValue("/architecture.md", out var md) && result.TryGetValue("/architecture.html", out var page))
        {
            var pipeline = new MarkdownPipelineBuilder().UsePipeTables().UseAutoIdentifiers(AutoIdentifierOptions.GitHub).Build();
            var body = Markdown.ToHtml(System.Text.Encoding.UTF8.GetString(md.Item2), pipeline);
            var html = System.Text.Encoding.UTF8.GetString(page.Item2).Replace("<!--doc-->", body, StringComparison.Ordinal);
            result["/architecture.html"] = (page.Item1, System.Text.Encoding.UTF8.GetBytes(html));
        }
        return result;
    }

    /// <summary>Serves until <paramref name="token"/> is cancelled or the process is told to stop (Ctrl+C, SIGTERM).</summary>
    public async Task WaitAsync(CancellationToken token)
    {
        var stopping = app.Services.GetRequiredService<IHostApplicationLifetime>().ApplicationStopping;
        using var either = CancellationTokenSource.CreateLinkedTokenSource(token, stopping);
        try
        {
            await Task.Delay(Timeout.Infinite, either.Token).ConfigureAwait(false);
        }
        catch (OperationCanceledException)
        {
        }
    }

    /// <summary>Stops listening and waits for open requests (their jobs are cancelled).</summary>
    public async ValueTask DisposeAsync()
    {
        await app.StopAsync().ConfigureAwait(false);
        await app.DisposeAsync().ConfigureAwait(false);
    }
}
