#!/usr/bin/env python3
"""The report of bench/run.sh: medians, spreads and ratios from its samples.

Reads the samples run.sh collected (one JSON object per line, as
bench/workloads.py printed them plus "run" and "system", or an "error"),
and bench/sync.sh's output when given; prints the tables; writes the JSON
(every sample, the medians, min and max, and the cost ratio of every system
to every other); and, with --doc, draws the chart with keibi-bench-chart and
writes the Markdown report.

A cost ratio a/b is a's median time over b's (for a rate, MB/s or IOPS,
b's rate over a's): above 1, a is slower than b.
"""

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys


def workload_meta(a):
    return [
        ("create", f"create {a.files:,} files of 100 bytes (python)", "s"),
        ("ls", f"`ls -l` of those {a.files:,}", "s"),
        ("stat", "`stat` each", "s"),
        ("read", "read each (open, read, close)", "s"),
        ("rm", "`rm -rf` them", "s"),
        ("extract", f"extract a {a.tarball_files}-file source tarball", "s"),
        ("git", "`git init`, 200 files, `add`, `commit`, `status`", "s"),
        ("seqwrite", f"sequential write {a.size_mib:,} MiB + fsync", "MB/s"),
        ("seqread", f"sequential read {a.size_mib:,} MiB, cold cache", "MB/s"),
        ("fio", f"fio random 4 KiB reads ({a.fio_size_mib} MiB file, {a.fio_seconds} s)", "IOPS"),
    ]


def fmt(v, unit):
    if v is None:
        return "fail"
    if unit == "s":
        return f"{v:.3g}" if v < 100 else f"{v:.0f}"
    return f"{v:,.0f}"


def fmt_ratio(r):
    if r is None:
        return "-"
    return f"{r:.0f}x" if r >= 10 else f"{r:.2f}x"


def cost(w, a, b):
    """a's cost relative to b's for workload w (None if either is missing)."""
    x, y = w["median"].get(a), w["median"].get(b)
    if not x or not y:
        return None
    return y / x if w["higher_is_better"] else x / y


def machine(a):
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            mem_kib = int(next(l for l in f if l.startswith("MemTotal")).split()[1])
        with open("/proc/loadavg") as f:
            load_after = " ".join(f.read().split()[:3])
    except (OSError, StopIteration, ValueError) as e:
        sys.exit(f"report.py: cannot read the machine description: {e}")
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(mem_kib / 1048576, 1),
        "kernel": platform.release(),
        "state_fs": a.state_fs,
        "load_before": a.load_before,
        "load_after": load_after,
        "keibi_passthrough": a.keibi_passthrough,
    }


def parse_sync(path):
    text = open(path, errors="replace").read()
    out = {}
    m = re.search(r"propagation ms: p50 ([0-9.]+)\s+p90 ([0-9.]+)\s+p99 ([0-9.]+)\s+max ([0-9.]+)\s+\(n=(\d+)\)", text)
    if m:
        out["propagation_ms"] = {
            "p50": float(m.group(1)), "p90": float(m.group(2)), "p99": float(m.group(3)),
            "max": float(m.group(4)), "n": int(m.group(5)),
        }
    m = re.search(r"cold read through bob: ([0-9.]+) MB/s(?:; sshfs ([0-9.]+) MB/s)?", text)
    if m:
        out["cold_read_mbps"] = {"keibi": float(m.group(1))}
        if m.group(2):
            out["cold_read_mbps"]["sshfs"] = float(m.group(2))
    m = re.search(r"one-chunk edit of a (\d+) MiB file: (\d+) bytes on the wire", text)
    if m:
        out["one_chunk_edit"] = {"file_mib": int(m.group(1)), "bytes": int(m.group(2))}
    if not out:
        sys.exit(f"report.py: found none of bench/sync.sh's figures in {path}")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--samples", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--systems", required=True, help="space-separated, native first")
    p.add_argument("--runs", type=int, required=True)
    p.add_argument("--files", type=int, required=True)
    p.add_argument("--size-mib", type=int, required=True)
    p.add_argument("--fio-size-mib", type=int, required=True)
    p.add_argument("--fio-seconds", type=int, required=True)
    p.add_argument("--tarball-name", required=True)
    p.add_argument("--tarball-files", type=int, required=True)
    p.add_argument("--state-fs", default="")
    p.add_argument("--load-before", default="")
    p.add_argument("--keibi-passthrough", default="-")
    p.add_argument("--versions", default="")
    p.add_argument("--commit", default="?")
    p.add_argument("--command", default="bash bench/run.sh")
    p.add_argument("--note", default="")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sync-log")
    p.add_argument("--doc")
    p.add_argument("--chart")
    p.add_argument("--chart-bin")
    a = p.parse_args()

    systems = a.systems.split()
    rows = []
    with open(a.samples) as f:
        rows = [json.loads(line) for line in f if line.strip()]

    workloads = []
    for wid, label, unit in workload_meta(a):
        w = {"id": wid, "label": label, "unit": unit, "higher_is_better": unit != "s",
             "samples": {}, "errors": {}, "median": {}, "min": {}, "max": {}}
        for s in systems:
            vals = [r["value"] for r in rows if r.get("workload") == wid and r.get("system") == s and "value" in r]
            errs = [r["error"] for r in rows if r.get("workload") == wid and r.get("system") == s and "error" in r]
            w["samples"][s] = vals
            if errs:
                w["errors"][s] = errs
            # A system with any failed run has no median: a median of the
            # runs that happened to work would hide the failure.
            ok = vals and not errs
            w["median"][s] = statistics.median(vals) if ok else None
            w["min"][s] = min(vals) if ok else None
            w["max"][s] = max(vals) if ok else None
        w["ratios"] = {x: {y: cost(w, x, y) for y in systems if y != x} for x in systems}
        workloads.append(w)

    scale = [r for r in rows if r.get("workload", "").startswith("scale_")]
    sync = parse_sync(a.sync_log) if a.sync_log else None
    versions = dict(v.split(": ", 1) for v in a.versions.split(";") if ": " in v)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": a.commit,
        "command": a.command,
        "quick": a.quick,
        "note": a.note,
        "machine": machine(a),
        "versions": versions,
        "params": {"runs": a.runs, "files": a.files, "size_mib": a.size_mib, "fio_size_mib": a.fio_size_mib,
                   "fio_seconds": a.fio_seconds, "tarball": a.tarball_name, "tarball_files": a.tarball_files},
        "systems": systems,
        "workloads": workloads,
        "scale": scale,
        "sync": sync,
    }
    with open(a.json, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")

    main_table = table_main(result)
    pair_table = table_pairs(result)
    scale_table = table_scale(result)
    print()
    print(f"keibi {a.commit}, {result['machine']['kernel']}, {result['machine']['cpus']} CPUs; "
          f"median (min-max) of {a.runs} runs; ratio = cost / native's (above 1 is slower)")
    for t in (main_table, pair_table, scale_table):
        if t:
            print()
            print(plain(t))
    if sync:
        print()
        print(sync_text(sync))
    for w in workloads:
        for s, errs in w["errors"].items():
            print(f"FAILED: {w['label']} on {s} ({len(errs)} of {a.runs} runs): {errs[0].strip()[-200:]}")
    print(f"\nJSON: {a.json}")

    if a.doc:
        os.makedirs(os.path.dirname(os.path.abspath(a.chart)), exist_ok=True)
        os.makedirs(os.path.dirname(os.path.abspath(a.doc)), exist_ok=True)
        r = subprocess.run([a.chart_bin, a.json, a.chart])
        if r.returncode != 0:
            sys.exit("report.py: keibi-bench-chart failed")
        write_doc(a, result, main_table, pair_table, scale_table)
        print(f"report: {a.doc}, chart: {a.chart}")


def table_main(r):
    systems = r["systems"]
    head = ["workload", "unit"]
    for s in systems:
        head.append(s)
        if s != "native":
            head.append(f"{s}/native")
    body = []
    for w in r["workloads"]:
        line = [w["label"], w["unit"]]
        for s in systems:
            med = w["median"][s]
            if med is None:
                cell = "fail" if w["errors"].get(s) else "-"
            else:
                cell = f"{fmt(med, w['unit'])} ({fmt(w['min'][s], w['unit'])}-{fmt(w['max'][s], w['unit'])})"
            line.append(cell)
            if s != "native":
                line.append(fmt_ratio(w["ratios"][s]["native"]))
        body.append(line)
    return [head] + body


def table_pairs(r):
    others = [s for s in r["systems"] if s not in ("native", "keibi")]
    if "keibi" not in r["systems"] or not others:
        return None
    head = ["workload"] + [f"keibi/{s}" for s in others]
    body = [[w["label"]] + [fmt_ratio(w["ratios"]["keibi"][s]) for s in others] for w in r["workloads"]]
    return [head] + body


def table_scale(r):
    if not r["scale"]:
        return None
    sizes = sorted({x["entries"] for x in r["scale"]})

    def val(system, wl, n):
        for x in r["scale"]:
            if x["system"] == system and x["workload"] == wl and x["entries"] == n:
                if "error" in x:
                    return "fail"
                if wl == "scale_rss":
                    return x
                return f"{x['value']:.3g}"
        return "-"

    head = ["entries", "native create (s)", "keibi create (s)", "native `ls -l` (s)", "keibi `ls -l` (s)",
            "syncd RSS (MiB)", "mountd RSS (MiB)"]
    body = []
    for n in sizes:
        rss = val("keibi", "scale_rss", n)
        body.append([f"{n:,}", val("native", "scale_create", n), val("keibi", "scale_create", n),
                     val("native", "scale_ls", n), val("keibi", "scale_ls", n),
                     f"{rss['syncd_kib'] / 1024:.1f}" if isinstance(rss, dict) else rss,
                     f"{rss['mountd_kib'] / 1024:.1f}" if isinstance(rss, dict) else rss])
    return [head] + body


def sync_text(s):
    out = []
    if "propagation_ms" in s:
        p = s["propagation_ms"]
        out.append(f"propagation (close on one peer until stat on the other shows the size), {p['n']} files: "
                   f"p50 {p['p50']} ms, p90 {p['p90']} ms, p99 {p['p99']} ms, max {p['max']} ms")
    if "cold_read_mbps" in s:
        c = s["cold_read_mbps"]
        line = f"cold sequential read of the other peer's file: keibi {c['keibi']:.0f} MB/s"
        if "sshfs" in c:
            line += f", sshfs {c['sshfs']:.0f} MB/s, keibi/sshfs {c['keibi'] / c['sshfs']:.2f}x (rate ratio)"
        out.append(line)
    if "one_chunk_edit" in s:
        e = s["one_chunk_edit"]
        out.append(f"a 4 KiB edit of a {e['file_mib']} MiB file moved {e['bytes']:,} bytes")
    return "\n".join(out)


def plain(t):
    widths = [max(len(str(row[i])) for row in t) for i in range(len(t[0]))]
    lines = []
    for j, row in enumerate(t):
        cells = [str(c).ljust(widths[i]) if i == 0 else str(c).rjust(widths[i]) for i, c in enumerate(row)]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(t):
    lines = ["| " + " | ".join(t[0]) + " |", "|" + "---|" * len(t[0])]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in t[1:]]
    return "\n".join(lines)


def write_doc(a, r, main_t, pair_t, scale_t):
    m = r["machine"]
    chart_rel = os.path.relpath(a.chart, os.path.dirname(os.path.abspath(a.doc)))
    v = r["versions"]
    out = [
        "# Benchmarks",
        "",
        "Generated by `bash bench/run.sh` (see its `--help` and the README's",
        "\"Benchmarks\" section); do not edit by hand, run it again. The same figures,",
        f"every single run included, are in `{os.path.relpath(a.json, os.path.dirname(os.path.dirname(os.path.abspath(a.doc))))}`.",
        "",
        f"- date: {r['date']}, keibi commit {r['commit']}, release build",
        f"- command: `{r['command']}`" + (" (a smoke run: fewer files, smaller files)" if r["quick"] else ""),
        f"- machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['mem_gib']} GiB RAM, Linux {m['kernel']}",
        f"- native and keibi's state directory: `{m['state_fs']}`",
        f"- load average before the run {m['load_before']}, after {m['load_after']}",
    ]
    if r["note"]:
        out.append(f"- conditions: {r['note']}")
    out += [
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "",
        "Systems: **native**, a directory on the filesystem of keibi's state",
        "directory; **keibi**, a keibi mount (release build; FUSE passthrough in",
        f"use: {m['keibi_passthrough']}); **bindfs**, a bindfs mirror of a directory of the same",
        "filesystem; **sshfs**, sshfs over an sshd on 127.0.0.1; **rclone**,",
        "`rclone mount --vfs-cache-mode full` of an sftp remote on that sshd (its",
        "figures leave out the uploads it makes in the background after a file is",
        "closed: run.sh waits for them, untimed, after each workload).",
        f"Every workload ran {r['params']['runs']} times on every system, the",
        "systems interleaved within each run. Each cell is the median, with the",
        "fastest and slowest run in brackets; \"x/native\" is the cost ratio to",
        "native (time over native's time; for MB/s and IOPS native's rate over",
        "the system's), so above 1 is slower than native. A \"fail\" cell means",
        "at least one run of that workload failed on that system (the error is in",
        "the JSON).",
        "",
        markdown(main_t),
        "",
        f"![cost relative to native, log scale]({chart_rel})",
        "",
    ]
    if pair_t:
        out += ["keibi against each other system (cost ratio, above 1 is slower than it):", "", markdown(pair_t), ""]
    if scale_t:
        out += ["## Scale", "",
                "`ls -l` of larger directories (one run each, files of 100 bytes made by",
                "python), and the resident memory of keibi-syncd and keibi-mountd right",
                "after `ls -l` of the largest listing so far:", "", markdown(scale_t), ""]
    if r["sync"]:
        out += ["## Two peers on this machine", "",
                "From `bash bench/sync.sh` (two complete keibi peers on 127.0.0.1):", ""]
        out += [f"- {line}" for line in sync_text(r["sync"]).splitlines()]
        out.append("")
    out += [
        "The machine is a virtual machine; every figure moves from run to run, the",
        "small-file figures of the FUSE systems and all MB/s figures most. Compare",
        "columns of the same run, not figures of different runs.",
        "",
    ]
    with open(a.doc, "w") as f:
        f.write("\n".join(out))


if __name__ == "__main__":
    main()
