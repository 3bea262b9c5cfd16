#!/usr/bin/python3
"""Plots vnic's benchmark CSVs as grouped bar charts.

  plot.py sweep CSV PNG   the coalescing sweep (coalesce_sweep bench):
                          guest interrupts/s, throughput and ping per
                          setting, RSC off and on side by side
  plot.py dpdk CSV PNG    vnicd against DPDK's vhost PMD (dpdk_vhost
                          bench): Mpps and busy cycles per frame
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def grouped(ax, labels, series, title):
    """One bar per (label, series); `series` is [(name, values)]."""
    width = 0.8 / len(series)
    x = range(len(labels))
    for k, (name, values) in enumerate(series):
        ax.bar([i + (k - (len(series) - 1) / 2) * width for i in x], values, width, label=name)
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, rotation=30 if max(map(len, labels)) > 8 else 0)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)


def sweep(rows):
    settings = [r["setting"] for r in rows if r["rsc"] == "off"]
    by = {(r["setting"], r["rsc"]): r for r in rows}
    panels = [
        ("irq_per_s", "guest interrupts / s"),
        ("gbps", "host -> guest Gbit/s"),
        ("rtt_us", "ping median (us)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.5))
    for ax, (key, title) in zip(axes, panels):
        series = [(f"RSC {rsc}", [float(by[(s, rsc)][key]) for s in settings]) for rsc in ["off", "on"]]
        grouped(ax, settings, series, title)
    axes[0].legend()
    fig.suptitle("vnicd notification coalescing (rx-usecs/rx-frames) and RSC, Linux guest under QEMU")
    return fig


def dpdk(rows):
    labels = [f'{r["direction"]}\n{r["size"]} B' for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (v, d, title) in zip(
        axes,
        [
            ("vnicd_mpps", "dpdk_mpps", "Mpps (higher is better)"),
            ("vnicd_cycles", "dpdk_cycles", "busy cycles per frame (lower is better)"),
        ],
    ):
        series = [("vnicd", [float(r[v]) for r in rows]), ("DPDK vhost", [float(r[d]) for r in rows])]
        grouped(ax, labels, series, title)
    axes[0].legend()
    fig.suptitle("testpmd virtio-user (core 0) against vnicd and DPDK's vhost PMD (core 1)")
    return fig


def main(kind, src, dst):
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    fig = {"sweep": sweep, "dpdk": dpdk}[kind](rows)
    fig.tight_layout()
    fig.savefig(dst, dpi=100)


if __name__ == "__main__":
    main(*sys.argv[1:4])
