using System.Text.Json.Nodes;
using HiMar.Model;
using static TorchSharp.torch;

namespace HiMar.Runtime.Native;

/// <summary>
/// Runs one benchmark in several precisions, one after the other in the same process (the only fair comparison:
/// absolute times vary between machines and runs), and reports each run, whether the device has bf16 units, and
/// the speed-up of bf16 over fp32 when both ran.
/// </summary>
public static class PrecisionComparison
{
    /// <summary>
    /// Runs <paramref name="run"/> once per precision and combines the reports. <paramref name="seconds"/> names the
    /// time field the speed-up is taken from (e.g. <c>seconds_per_image</c>). With one precision the report is that
    /// run's own, with the device's bf16 units added.
    /// </summary>
    public static JsonObject Run(IReadOnlyList<Precision> precisions, Device device, string seconds, Func<Precision, JsonObject> run)
    {
        if (precisions.Count == 0)
            throw new BadInputException("--precision: give at least one precision.");
        var (units, found) = Precisions.Bf16Units(device);
        var reports = precisions.Distinct().Select(p => (p, report: run(p))).ToList();
        JsonObject result;
        if (reports.Count == 1)
            result = reports[0].report;
        else
        {
            result = new JsonObject { ["benchmark"] = reports[0].report["benchmark"]?.DeepClone() };
            var runs = new JsonObject();
            foreach (var (p, r) in reports)
                runs[Precisions.Name(p)] = r;
            result["runs"] = runs;
            var fp32 = reports.FirstOrDefault(x => x.p == Precision.Fp32).report?[seconds]?.GetValue<double>();
            var bf16 = reports.FirstOrDefault(x => x.p == Precision.Bf16).report?[seconds]?.GetValue<double>();
            if (fp32 is { } a && bf16 is { } b && b > 0)
                result["bf16_speedup"] = a / b;
        }
        result["bf16_units"] = units;
        result["bf16_units_found"] = found;
        if (!units && reports.Any(x => x.p == Precision.Bf16))
            result["note"] = "this device has no bf16 units: bf16 products are emulated and the bf16 figure shows no gain to expect here";
        return result;
    }
}
