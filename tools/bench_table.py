#!/usr/bin/env python3
"""Prints criterion's latest results as a Markdown table.

Each row shows the mean time, the throughput, and the ratio against the
row of the same group and parameter whose name starts with "baseline".
"""
import json
import pathlib
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
rows = []
for bj in sorted(root.glob("**/new/benchmark.json")):
    b = json.loads(bj.read_text())
    est = json.loads((bj.parent / "estimates.json").read_text())
    ns = est["mean"]["point_estimate"]
    rows.append((b["group_id"], b["function_id"], b["value_str"] or "", ns, b.get("throughput")))

baseline = {(g, v): ns for g, f, v, ns, _ in rows if f.startswith("baseline")}


def fmt_time(ns):
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.2f} ns"


def fmt_tp(tp, ns):
    if not tp:
        return ""
    if "Bytes" in tp:
        return f"{tp['Bytes'] / ns:.2f} GB/s"
    if "Elements" in tp:
        return f"{tp['Elements'] / ns * 1e3:.1f} M/s"
    return ""


print("| benchmark | case | mean | throughput | vs baseline |")
print("|---|---|---|---|---|")
for g, f, v, ns, tp in sorted(rows, key=lambda r: (r[0], r[2].zfill(8), r[1].startswith("baseline"), r[1])):
    base = baseline.get((g, v))
    ratio = "" if base is None or f.startswith("baseline") else f"{base / ns:.2f}x"
    case = f"{f} {v}".strip()
    print(f"| {g} | {case} | {fmt_time(ns)} | {fmt_tp(tp, ns)} | {ratio} |")
