#!/usr/bin/env bash
# vnic's main job as it stands today: build everything in release mode and
# measure the packet-processing core (vnic-protocol) against its baselines,
# printing the table README.md shows. The vhost-user device and the QEMU
# guest run join this command as they land.
#
#   VNIC_BENCH_SECONDS   measurement time per benchmark (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${VNIC_BENCH_SECONDS:-3}
command -v python3 >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3
}
cargo build --release --workspace
cargo bench -p vnic-protocol --bench protocol -- \
    --warm-up-time 1 --measurement-time "$secs" --noplot
echo
python3 tools/bench_table.py target/criterion
