#!/usr/bin/env bash
# vnic's main job as it stands today: build everything in release mode,
# measure vnicd's data path over vhost-user (guest -> vnicd -> sink and
# source -> vnicd -> guest, with instructions per packet from callgrind)
# and the packet-processing core, each against its baseline, and print
# the tables README.md shows. The QEMU guest run joins this command when
# it lands.
#
#   VNIC_BENCH_SECONDS   measurement time per benchmark (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${VNIC_BENCH_SECONDS:-3}
missing=()
command -v python3 >/dev/null || missing+=(python3)
command -v valgrind >/dev/null || missing+=(valgrind)
if ((${#missing[@]})); then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
cargo build --release --workspace
VNIC_BENCH_SECONDS="$secs" cargo bench -p vnic-backend --bench datapath > target/datapath.md
cargo bench -p vnic-protocol --bench protocol -- \
    --warm-up-time 1 --measurement-time "$secs" --noplot
echo
echo "## vnicd data path"
cat target/datapath.md
echo
echo "## packet core"
python3 tools/bench_table.py target/criterion
