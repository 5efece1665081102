// This file is compiled twice: into HiMar.Runtime (HIMAR_RUNTIME defined), where it reads ELF files for
// `himar info` and the native check, and into the build's inline MSBuild task (build/HiMar.Native.targets),
// which weakens libLibTorchSharp.so's need for GLIBCXX_3.4.32 in each executable's output folder.
// It uses nothing outside netstandard2.0's base class library, which is what MSBuild's code task factory
// compiles against.
// Written by hand because no served package edits ELF version tables (patchelf is a C++ program, not a library).
#nullable enable
using System;
using System.Collections.Generic;
using System.IO;
using System.Text;

namespace HiMar.Runtime.Native
{
    /// <summary>One entry of an ELF `.gnu.version_r` table: a version that the file needs from a library.</summary>
    public sealed class ElfVersionNeed
    {
        /// <summary>Creates an entry.</summary>
        public ElfVersionNeed(string library, string version, ushort flags, long flagsOffset)
        {
            Library = library;
            Version = version;
            Flags = flags;
            FlagsOffset = flagsOffset;
        }

        /// <summary>The library that must provide the version, e.g. `libstdc++.so.6`.</summary>
        public string Library { get; }

        /// <summary>The version name, e.g. `GLIBCXX_3.4.32`.</summary>
        public string Version { get; }

        /// <summary>The entry's `vna_flags`; bit 0x2 (`VER_FLG_WEAK`) makes the need optional for the loader.</summary>
        public ushort Flags { get; }

        /// <summary>The file offset of `vna_flags`.</summary>
        public long FlagsOffset { get; }

        /// <summary>Whether the loader treats a missing version as acceptable.</summary>
        public bool IsWeak => (Flags & ElfVersions.VerFlgWeak) != 0;
    }

    /// <summary>What `ElfVersions.WeakenNeed` did to a file.</summary>
    public enum WeakenOutcome
    {
        /// <summary>The flag was set and the file rewritten.</summary>
        Patched,

        /// <summary>The entry already carried the weak flag; the file was left as it was.</summary>
        AlreadyWeak,

        /// <summary>The file does not need that version; nothing to do.</summary>
        NotNeeded,
    }

    /// <summary>
    /// Reads and edits the symbol-version tables of 64-bit little-endian ELF shared libraries
    /// (`.gnu.version_r` needs and `.gnu.version_d` definitions), as the glibc loader checks them.
    /// </summary>
    public static class ElfVersions
    {
        /// <summary>`VER_FLG_WEAK`: a version need that the loader accepts when the library lacks it.</summary>
        public const ushort VerFlgWeak = 0x2;

        const uint ShtGnuVerdef = 0x6ffffffd;
        const uint ShtGnuVerneed = 0x6ffffffe;

        struct Section
        {
            public uint Type;
            public long Offset;
            public long Size;
            public int Link;
            public int Info;
        }

        static ushort U16(byte[] b, long o) => (ushort)(b[o] | (b[o + 1] << 8));

        static uint U32(byte[] b, long o) => (uint)(b[o] | (b[o + 1] << 8) | (b[o + 2] << 16) | (b[o + 3] << 24));

        static long U64(byte[] b, long o) => (long)(U32(b, o) | ((ulong)U32(b, o + 4) << 32));

        static Section[] Sections(byte[] b, string what)
        {
            if (b.Length < 64 || b[0] != 0x7f || b[1] != (byte)'E' || b[2] != (byte)'L' || b[3] != (byte)'F')
                throw new InvalidDataException($"{what} is not an ELF file.");
            if (b[4] != 2 || b[5] != 1)
                throw new InvalidDataException($"{what} is not a 64-bit little-endian ELF file.");
            long shoff = U64(b, 0x28);
            int shentsize = U16(b, 0x3A);
            int shnum = U16(b, 0x3C);
            if (shoff <= 0 || shentsize < 64 || shoff + (long)shnum * shentsize > b.Length)
                throw new InvalidDataException($"{what} has no readable section header table.");
            var result = new Section[shnum];
            for (int i = 0; i < shnum; i++)
            {
                long h = shoff + (long)i * shentsize;
                result[i] = new Section
                {
                    Type = U32(b, h + 4),
                    Offset = U64(b, h + 0x18),
                    Size = U64(b, h + 0x20),
                    Link = (int)U32(b, h + 0x28),
                    Info = (int)U32(b, h + 0x2C),
                };
                if (result[i].Type != 8 && result[i].Offset + result[i].Size > b.Length)
                    throw new InvalidDataException($"{what}: section {i} lies outside the file.");
            }
            return result;
        }

        static string CString(byte[] b, Section strtab, long index, string what)
        {
            long start = strtab.Offset + index;
            long end = start;
            long limit = strtab.Offset + strtab.Size;
            if (index < 0 || start >= limit)
                throw new InvalidDataException($"{what}: a version string index points outside its string table.");
            while (end < limit && b[end] != 0)
                end++;
            return Encoding.ASCII.GetString(b, (int)start, (int)(end - start));
        }

        static void CheckRecord(long offset, long size, Section s, string what)
        {
            if (offset < s.Offset || offset + size > s.Offset + s.Size)
                throw new InvalidDataException($"{what}: a version record runs outside its section.");
        }

        /// <summary>Every version need of an ELF image, in table order.</summary>
        public static IReadOnlyList<ElfVersionNeed> ReadNeeds(byte[] image, string what)
        {
            var sections = Sections(image, what);
            var needs = new List<ElfVersionNeed>();
            foreach (var s in sections)
            {
                if (s.Type != ShtGnuVerneed)
                    continue;
                if (s.Link <= 0 || s.Link >= sections.Length)
                    throw new InvalidDataException($"{what}: .gnu.version_r links to no string table.");
                var strtab = sections[s.Link];
                long entry = s.Offset;
                // Verneed: vn_version u16, vn_cnt u16, vn_file u32, vn_aux u32, vn_next u32 (16 bytes).
                for (int n = 0; n < s.Info; n++)
                {
                    CheckRecord(entry, 16, s, what);
                    int count = U16(image, entry + 2);
                    string file = CString(image, strtab, U32(image, entry + 4), what);
                    long aux = entry + U32(image, entry + 8);
                    // Vernaux: vna_hash u32, vna_flags u16, vna_other u16, vna_name u32, vna_next u32 (16 bytes).
                    for (int a = 0; a < count; a++)
                    {
                        CheckRecord(aux, 16, s, what);
                        string name = CString(image, strtab, U32(image, aux + 8), what);
                        needs.Add(new ElfVersionNeed(file, name, U16(image, aux + 4), aux + 4));
                        uint nextAux = U32(image, aux + 12);
                        if (nextAux == 0)
                            break;
                        aux += nextAux;
                    }
                    uint next = U32(image, entry + 12);
                    if (next == 0)
                        break;
                    entry += next;
                }
            }
            return needs;
        }

        /// <summary>Every version an ELF image defines (its `.gnu.version_d` names), e.g. the GLIBCXX_* of libstdc++.</summary>
        public static IReadOnlyList<string> ReadDefinitions(byte[] image, string what)
        {
            var sections = Sections(image, what);
            var defs = new List<string>();
            foreach (var s in sections)
            {
                if (s.Type != ShtGnuVerdef)
                    continue;
                if (s.Link <= 0 || s.Link >= sections.Length)
                    throw new InvalidDataException($"{what}: .gnu.version_d links to no string table.");
                var strtab = sections[s.Link];
                long entry = s.Offset;
                // Verdef: vd_version u16, vd_flags u16, vd_ndx u16, vd_cnt u16, vd_hash u32, vd_aux u32, vd_next u32.
                for (int n = 0; n < s.Info; n++)
                {
                    CheckRecord(entry, 20, s, what);
                    long aux = entry + U32(image, entry + 12);
                    // The first Verdaux (vda_name u32, vda_next u32) names the version itself.
                    CheckRecord(aux, 8, s, what);
                    defs.Add(CString(image, strtab, U32(image, aux), what));
                    uint next = U32(image, entry + 16);
                    if (next == 0)
                        break;
                    entry += next;
                }
            }
            return defs;
        }

        /// <summary>Every version need of the ELF file at <paramref name="path"/>.</summary>
        public static IReadOnlyList<ElfVersionNeed> ReadNeeds(string path) => ReadNeeds(File.ReadAllBytes(path), path);

        /// <summary>Every version defined by the ELF file at <paramref name="path"/>.</summary>
        public static IReadOnlyList<string> ReadDefinitions(string path) =>
            ReadDefinitions(File.ReadAllBytes(path), path);

        /// <summary>
        /// Sets `VER_FLG_WEAK` on the need for <paramref name="version"/> in an ELF image, in place.
        /// Returns what it found; the image is changed only for <see cref="WeakenOutcome.Patched"/>.
        /// </summary>
        public static WeakenOutcome WeakenNeed(byte[] image, string version, string what)
        {
            var outcome = WeakenOutcome.NotNeeded;
            foreach (var need in ReadNeeds(image, what))
            {
                if (need.Version != version)
                    continue;
                if (need.IsWeak)
                {
                    if (outcome == WeakenOutcome.NotNeeded)
                        outcome = WeakenOutcome.AlreadyWeak;
                    continue;
                }
                ushort flags = (ushort)(need.Flags | VerFlgWeak);
                image[need.FlagsOffset] = (byte)(flags & 0xff);
                image[need.FlagsOffset + 1] = (byte)(flags >> 8);
                outcome = WeakenOutcome.Patched;
            }
            return outcome;
        }

        /// <summary>
        /// Weakens the need for <paramref name="version"/> in the file at <paramref name="path"/>. The new
        /// contents go to a temporary file beside it, which then replaces it, so a hard link into a package
        /// cache is never written through and an interrupted run leaves the old file whole.
        /// </summary>
        public static WeakenOutcome WeakenNeed(string path, string version)
        {
            var image = File.ReadAllBytes(path);
            var outcome = WeakenNeed(image, version, path);
            if (outcome != WeakenOutcome.Patched)
                return outcome;
            string temp = path + ".weaken-" + Guid.NewGuid().ToString("N") + ".tmp";
            try
            {
                File.WriteAllBytes(temp, image);
#if NET7_0_OR_GREATER
                if (!OperatingSystem.IsWindows())
                    File.SetUnixFileMode(temp, File.GetUnixFileMode(path));
#endif
                // On Unix File.Replace is one rename(2): readers see the old file or the new one, never half.
                File.Replace(temp, path, null);
            }
            finally
            {
                if (File.Exists(temp))
                    File.Delete(temp);
            }
            return outcome;
        }

        /// <summary>The directories the glibc loader searches for system libraries on common Linux layouts.</summary>
        public static IEnumerable<string> SystemLibraryDirectories()
        {
            var ldPath = Environment.GetEnvironmentVariable("LD_LIBRARY_PATH");
            if (!string.IsNullOrEmpty(ldPath))
                foreach (var d in ldPath.Split(':'))
                    if (d.Length > 0)
                        yield return d;
            yield return "/usr/lib/x86_64-linux-gnu";
            yield return "/lib/x86_64-linux-gnu";
            yield return "/usr/lib/aarch64-linux-gnu";
            yield return "/lib/aarch64-linux-gnu";
            yield return "/usr/lib64";
            yield return "/lib64";
            yield return "/usr/lib";
            yield return "/lib";
        }

        /// <summary>The first `libstdc++.so.6` in <see cref="SystemLibraryDirectories"/>, or null.</summary>
        public static string? FindSystemLibStdCxx()
        {
            foreach (var dir in SystemLibraryDirectories())
            {
                var candidate = Path.Combine(dir, "libstdc++.so.6");
                if (File.Exists(candidate))
                    return candidate;
            }
            return null;
        }
    }
}

#if !HIMAR_RUNTIME
/// <summary>
/// MSBuild task: weakens each given library's need for a libstdc++ version that the system's libstdc++
/// lacks. Does nothing where the system provides the version or has no libstdc++ (macOS, Windows).
/// </summary>
public class WeakenLibStdCxxNeed : Microsoft.Build.Utilities.Task
{
    /// <summary>The libraries to check (copies in an output folder, never the package cache).</summary>
    [Microsoft.Build.Framework.Required]
    public Microsoft.Build.Framework.ITaskItem[] Libraries { get; set; } = Array.Empty<Microsoft.Build.Framework.ITaskItem>();

    /// <summary>The version to weaken, e.g. GLIBCXX_3.4.32.</summary>
    [Microsoft.Build.Framework.Required]
    public string Version { get; set; } = "";

    /// <summary>The system libstdc++ to compare against; found on the usual paths when empty.</summary>
    public string? SystemLibStdCxx { get; set; }

    /// <summary>Runs the task.</summary>
    public override bool Execute()
    {
        if (!System.Runtime.InteropServices.RuntimeInformation.IsOSPlatform(System.Runtime.InteropServices.OSPlatform.Linux))
            return true;
        var system = string.IsNullOrEmpty(SystemLibStdCxx) ? HiMar.Runtime.Native.ElfVersions.FindSystemLibStdCxx() : SystemLibStdCxx;
        if (system == null || !File.Exists(system))
        {
            Log.LogMessage(Microsoft.Build.Framework.MessageImportance.Normal, "HiMar: no system libstdc++.so.6 found; libraries left as they are.");
            return true;
        }
        try
        {
            var defined = HiMar.Runtime.Native.ElfVersions.ReadDefinitions(system);
            if (((IList<string>)defined).Contains(Version))
            {
                Log.LogMessage(Microsoft.Build.Framework.MessageImportance.Normal, $"HiMar: {system} provides {Version}; no patch needed.");
                return true;
            }
            foreach (var lib in Libraries)
            {
                var outcome = HiMar.Runtime.Native.ElfVersions.WeakenNeed(lib.ItemSpec, Version);
                Log.LogMessage(Microsoft.Build.Framework.MessageImportance.High, $"HiMar: {lib.ItemSpec}: need for {Version} {(outcome == HiMar.Runtime.Native.WeakenOutcome.Patched ? "marked weak" : outcome == HiMar.Runtime.Native.WeakenOutcome.AlreadyWeak ? "already weak" : "not present")} ({system} lacks it).");
            }
            return true;
        }
        catch (Exception e) when (e is IOException || e is InvalidDataException || e is UnauthorizedAccessException)
        {
            Log.LogError($"HiMar: could not weaken the {Version} need: {e.Message}");
            return false;
        }
    }
}
#endif
