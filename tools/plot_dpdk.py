#!/usr/bin/python3
"""Plots the vnicd vs DPDK vhost benchmark (CSV from the dpdk_vhost bench):
frames per second and busy cycles per frame, per direction and size."""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    labels = [f'{r["direction"]}\n{r["size"]} B' for r in rows]
    x = range(len(rows))
    width = 0.4
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (v, d, title) in zip(
        axes,
        [
            ("vnicd_mpps", "dpdk_mpps", "Mpps (higher is better)"),
            ("vnicd_cycles", "dpdk_cycles", "busy cycles per frame (lower is better)"),
        ],
    ):
        ax.bar([i - width / 2 for i in x], [float(r[v]) for r in rows], width, label="vnicd")
        ax.bar([i + width / 2 for i in x], [float(r[d]) for r in rows], width, label="DPDK vhost")
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle("testpmd virtio-user (core 0) against vnicd and DPDK's vhost PMD (core 1)")
    fig.tight_layout()
    fig.savefig(dst, dpi=100)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
