#!/usr/bin/env bash
# vnic's whole test suite: formatting, lints, every crate's tests (the
# whole-system tests in network namespaces and the QEMU guest tests
# included) and every fuzz target for a bounded time. On a fresh machine it
# first installs what it needs (a C++ compiler for libFuzzer, iproute2,
# ping, iperf3, QEMU and the guest image's packages, cargo-fuzz) and
# builds the guest image.
#
#   VNIC_FUZZ_SECONDS   seconds per fuzz target (default 20)
#   VNIC_SKIP_NETNS=1   skip the tests that need root, /dev/net/tun, ip netns
#   VNIC_SKIP_DPDK=1    skip the tests that need DPDK's testpmd
set -euo pipefail
cd "$(dirname "$0")/.."

fuzz_seconds=${VNIC_FUZZ_SECONDS:-20}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

step() { printf '\n==> %s\n' "$*"; }

install_apt() {
    local missing=()
    for p in "$@"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    if ((${#missing[@]})); then
        step "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
}

step "prerequisites"
install_apt g++ make iproute2 iputils-ping iperf3 qemu-system-x86 busybox-static ethtool cpio xz-utils kmod nftables dpdk-dev
if ! cargo fuzz --version >/dev/null 2>&1; then
    step "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
cargo --version
cargo fuzz --version

step "guest image"
bash tests/guest/build.sh

step "cargo fmt --check"
cargo fmt --all -- --check
(cd fuzz && cargo fmt -- --check)

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test"
timeout 1800 cargo test --workspace 2>&1 | tee "$log"
tests=$(awk '/^test result:/ { n += $4 } END { print n + 0 }' "$log")

step "fuzz targets, ${fuzz_seconds}s each"
targets=$(cd fuzz && cargo fuzz list)
fuzzed=0
for t in $targets; do
    echo "--> $t"
    (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" -- \
        -max_total_time="$fuzz_seconds" -timeout=30 -print_final_stats=1 2>&1 | tail -n 25)
    fuzzed=$((fuzzed + 1))
done

echo
echo "suite: $((tests + fuzzed)) passed, 0 failed"
