#!/usr/bin/env bash
# Sweeps vnicd's notification coalescing (rx-usecs/rx-frames, adaptive)
# with receive segment coalescing off and on, under a Linux guest in QEMU,
# and plots it: target/coalesce_sweep.csv and target/coalesce_sweep.png.
# Builds whatever is missing first; needs root (TAP, network namespaces).
#
#   VNIC_SWEEP_SECONDS   iperf3 run length per setting (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for p in python3-matplotlib iproute2 iperf3 qemu-system-x86 busybox-static ethtool cpio xz-utils kmod; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
bash tests/guest/build.sh
cargo bench -q -p vnic-backend --bench coalesce_sweep
# Debian's interpreter, which has its matplotlib (a python3 earlier on
# PATH may not).
/usr/bin/python3 tools/plot.py sweep target/coalesce_sweep.csv target/coalesce_sweep.png
echo "plot: target/coalesce_sweep.png"
