using System.Text.Json;
using System.Text.Json.Nodes;

namespace HiMar.Runtime.Parity;

/// <summary>Reference keyword arguments (JSON or a checkpoint's argparse Namespace) as boxed .NET values.</summary>
public static class ReferenceArgs
{
    /// <summary>Numbers become long or double, strings, booleans, lists of strings string arrays; other values
    /// (null, objects, mixed lists) are skipped, so config files are checked first with
    /// <see cref="Checkpoints.ModelConfigs.CheckArguments"/>, which names them.</summary>
    public static Dictionary<string, object> FromJson(JsonObject o)
    {
        var d = new Dictionary<string, object>();
        foreach (var (k, v) in o)
        {
            if (v is JsonArray array && array.All(x => x is JsonValue xv && xv.GetValueKind() == JsonValueKind.String))
            {
                d[k] = array.Select(x => x!.GetValue<string>()).ToArray();
                continue;
            }
            if (v is not JsonValue value)
                continue;
            switch (value.GetValueKind())
            {
                case JsonValueKind.String:
                    d[k] = value.GetValue<string>();
                    break;
                case JsonValueKind.True:
                case JsonValueKind.False:
                    d[k] = value.GetValue<bool>();
                    break;
                case JsonValueKind.Number:
                    // Parsed numbers convert freely; values built in memory keep their .NET type.
                    d[k] = value.TryGetValue<long>(out var l) ? l
                        : value.TryGetValue<int>(out var i) ? i
                        : value.TryGetValue<double>(out var x) ? x
                        : Convert.ToDouble(value.GetValue<object>(), System.Globalization.CultureInfo.InvariantCulture);
                    break;
            }
        }
        return d;
    }
}
