namespace HiMar.Runtime.Catalog;

/// <summary>Which weights of a training checkpoint or reference .pth to take: the EMA weights (the default) or the raw model weights.</summary>
public static class WeightsChoice
{
    /// <summary>The accepted values, in the order help lists them.</summary>
    public static readonly IReadOnlyList<string> Values = ["ema", "model"];

    /// <summary>
    /// True for the EMA weights: null or `ema` (any case); false for `model`. Anything else is a
    /// <see cref="BadInputException"/> naming <paramref name="flag"/>: an unknown value never silently picks one.
    /// </summary>
    public static bool UseEma(string? text, string flag = "--weights") =>
        (text ?? "ema").Trim().ToLowerInvariant() switch
        {
            "ema" => true,
            "model" => false,
            _ => throw new BadInputException($"{flag}: '{text}' is not a choice of weights; give ema or model."),
        };
}
