#!/usr/bin/python3
"""Plots the coalescing sweep (CSV from the coalesce_sweep bench): guest
interrupts per second, throughput and ping round trip per setting, with
receive segment coalescing off and on side by side."""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    settings = [r["setting"] for r in rows if r["rsc"] == "off"]
    by = {(r["setting"], r["rsc"]): r for r in rows}
    panels = [
        ("irq_per_s", "guest interrupts / s"),
        ("gbps", "host -> guest Gbit/s"),
        ("rtt_us", "ping median (us)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.5))
    x = range(len(settings))
    width = 0.4
    for ax, (key, title) in zip(axes, panels):
        for k, rsc in enumerate(["off", "on"]):
            vals = [float(by[(s, rsc)][key]) for s in settings]
            ax.bar([i + (k - 0.5) * width for i in x], vals, width, label=f"RSC {rsc}")
        ax.set_xticks(list(x))
        ax.set_xticklabels(settings, rotation=30)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle("vnicd notification coalescing (rx-usecs/rx-frames) and RSC, Linux guest under QEMU")
    fig.tight_layout()
    fig.savefig(dst, dpi=100)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
