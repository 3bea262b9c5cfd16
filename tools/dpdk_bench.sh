#!/usr/bin/env bash
# vnicd against DPDK's own vhost-user backend, with DPDK's testpmd
# (virtio-user) as the frontend of both, side by side: frames per second
# and busy cycles per frame each way, 64 and 1500 bytes. Writes
# target/dpdk_vhost.csv and the plot target/dpdk_vhost.png.
# Installs what it needs (Debian's dpdk-dev for dpdk-testpmd, matplotlib);
# needs root. Uses cores 0 (testpmd's generator) and 1 (the backend).
#
#   VNIC_DPDK_SECONDS   measurement window per case (default 4)
#   VNIC_DPDK_ROUNDS    runs per case, the backends alternating; medians (default 1)
#   VNIC_DPDK_PACKED=1  packed rings instead of split (target/dpdk_vhost_packed.*)
#   VNIC_DPDK_POLL_US   vnicd's --poll-us (default 50)
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for p in dpdk-dev python3-matplotlib util-linux; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
cargo bench -q -p vnic-backend --bench dpdk_vhost
out=target/dpdk_vhost
[[ "${VNIC_DPDK_PACKED:-}" == 1 ]] && out=target/dpdk_vhost_packed
# Debian's interpreter, which has its matplotlib (a python3 earlier on
# PATH may not).
/usr/bin/python3 tools/plot.py dpdk "$out.csv" "$out.png"
echo "plot: $out.png"
