#!/usr/bin/env bash
# vnic's main job: attach vnicd to a QEMU guest with its own virtio_net
# driver and run iperf3 both ways against the host kernel, beside QEMU's
# own virtio-net with a TAP on the same guest image; then measure vnicd's
# data path over vhost-user and the packet core against their baselines.
# Builds whatever is missing first (packages, the guest image, release
# binaries). Needs root (TAP devices, network namespaces).
#
#   VNIC_IPERF_SECONDS   iperf3 run length each way (default 10)
#   VNIC_BENCH_SECONDS   measurement time per micro-benchmark (default 3)
#   VNIC_BENCH_ROUNDS    rounds of the offload and switch benchmarks
#                        (default 1 here; README's tables use 5)
#   VNIC_BENCH_CALLGRIND=1  add instructions per packet to the data-path
#                           table (callgrind runs; takes many minutes)
#   VNIC_MAIN_GUEST_ONLY=1  stop after the guest table
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${VNIC_BENCH_SECONDS:-3}
rounds=${VNIC_BENCH_ROUNDS:-1}
missing=()
for p in python3 valgrind iproute2 iputils-ping iperf3 qemu-system-x86 busybox-static ethtool cpio xz-utils kmod; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
bash tests/guest/build.sh
cargo build --release --workspace

echo
echo "## iperf3 in a QEMU guest: vnicd vs QEMU's virtio-net + TAP"
cargo bench -q -p vnic-backend --bench guest_iperf
[ "${VNIC_MAIN_GUEST_ONLY:-0}" = 1 ] && exit 0

echo
echo "## vnic-iperf on the vnic-guest stack vs the kernel's iperf3, by offload"
VNIC_BENCH_SECS="$secs" VNIC_BENCH_ROUNDS="$rounds" cargo bench -q -p vnic-guest --bench stack_offloads

echo
echo "## guest to guest: VF to VF through vnicd's switch vs two vnicd TAPs on a Linux bridge"
VNIC_BENCH_SECONDS="$secs" VNIC_BENCH_ROUNDS="$rounds" cargo bench -q -p vnic-backend --bench vf_switch

VNIC_BENCH_SECONDS="$secs" cargo bench -q -p vnic-backend --bench datapath > target/datapath.md
cargo bench -q -p vnic-protocol --bench protocol -- \
    --warm-up-time 1 --measurement-time "$secs" --noplot > /dev/null
echo
echo "## vnicd data path over vhost-user"
cat target/datapath.md
echo
echo "## packet core"
python3 tools/bench_table.py target/criterion
