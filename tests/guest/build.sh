#!/usr/bin/env bash
# Builds the Linux guest that vnic's QEMU tests boot, from Debian's
# packages only: the 6.12 cloud kernel, and an initramfs with busybox,
# iperf3 and ethtool (with their libraries), the virtio_net module with
# its dependencies (loaded at boot) and uio_pci_generic with its (listed
# in /modules/extra, loaded by the tests that want them). The guest runs
# the shell commands it is given on the kernel command line (see init)
# and powers off. Tests add files of their own (vnic-guest's tools) as a
# second archive (tests/src/qemu.rs).
#
# Output in $VNIC_GUEST_DIR (default .cache/guest): vmlinuz and
# initramfs.cpio.gz. Nothing is rebuilt while the inputs (package
# versions, this script, init) are unchanged.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${VNIC_GUEST_DIR:-$root/.cache/guest}
mkdir -p "$out"

pkgs=(busybox-static iperf3 ethtool cpio xz-utils kmod qemu-system-x86)
missing=()
for p in "${pkgs[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

kpkg=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64-unsigned$' |
    awk '{print $1}' | sort -V | tail -n 1)
if [ -z "$kpkg" ]; then
    apt-get update -qq
    kpkg=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64-unsigned$' |
        awk '{print $1}' | sort -V | tail -n 1)
fi
[ -n "$kpkg" ] || { echo "no linux-image-6.12.*+deb12-cloud-amd64-unsigned package" >&2; exit 1; }
inputs="$kpkg $(dpkg-query -W -f='${Package}=${Version} ' busybox-static iperf3 ethtool libc6)
$(sha256sum "$here/build.sh" "$here/init" | awk '{print $1}')"
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$inputs" ] &&
    [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.cpio.gz" ]; then
    echo "guest image up to date in $out"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
(cd "$work" && apt-get download -qq "$kpkg")
dpkg -x "$work"/*.deb "$work/k"
kver=$(ls "$work/k/lib/modules")
mods="$work/k/lib/modules/$kver"
# The package ships no modules.dep (installation makes it): make it.
/sbin/depmod -b "$work/k" "$kver"

r="$work/root"
mkdir -p "$r"/{bin,sbin,lib,lib64,proc,sys,dev,tmp,etc,run,modules}
cp /bin/busybox "$r/bin/busybox"
for applet in $("$r/bin/busybox" --list); do
    [ -e "$r/bin/$applet" ] || ln -s busybox "$r/bin/$applet"
done
copy_with_libs() {
    cp "$1" "$r/bin/"
    ldd "$1" | awk '/=>/ {print $3} $1 ~ /^\// {print $1}' | while read -r lib; do
        [ -n "$lib" ] && [ -e "$lib" ] || continue
        mkdir -p "$r$(dirname "$lib")"
        cp -L "$lib" "$r$lib"
    done
}
copy_with_libs "$(command -v iperf3)"
copy_with_libs "$(command -v ethtool)"

# virtio_net and what it needs, in load order (unless built in), and
# virtio_rng (the random pool is ready at boot, see tests/src/qemu.rs); the
# modules a test loads itself (uio_pci_generic, for vnic-guest's PCI
# transport) go in a list of their own.
: > "$r/modules/order"
: > "$r/modules/extra"
list=order
add_module() {
    local name=$1 path dep
    grep -q "/$name.ko" "$mods/modules.builtin" && return 0
    path=$(grep -E "(^|/)$name\.ko(\.xz|\.zst)?:" "$mods/modules.dep" | head -n 1) || true
    [ -n "$path" ] || { echo "module $name not found" >&2; exit 1; }
    for dep in ${path#*:}; do
        dep=$(basename "$dep")
        add_module "${dep%%.ko*}"
    done
    path=${path%%:*}
    local base
    base=$(basename "$path")
    base=${base%%.ko*}.ko
    grep -qx "$base" "$r/modules/order" "$r/modules/extra" && return 0
    case "$path" in
        *.xz) xz -dc "$mods/$path" > "$r/modules/$base" ;;
        *.zst) zstd -qdc "$mods/$path" > "$r/modules/$base" ;;
        *) cp "$mods/$path" "$r/modules/$base" ;;
    esac
    echo "$base" >> "$r/modules/$list"
}
for m in virtio_pci virtio_net virtio-rng; do
    add_module "$m"
done
list=extra
for m in uio uio_pci_generic; do
    add_module "$m"
done

cp "$here/init" "$r/init"
chmod 755 "$r/init"
(cd "$r" && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initramfs.cpio.gz.new"
cp "$work/k/boot/vmlinuz-$kver" "$out/vmlinuz.new"
mv "$out/vmlinuz.new" "$out/vmlinuz"
mv "$out/initramfs.cpio.gz.new" "$out/initramfs.cpio.gz"
echo "$inputs" > "$out/stamp"
echo "guest image built in $out (kernel $kver, modules: $(tr '\n' ' ' < "$r/modules/order"), on demand: $(tr '\n' ' ' < "$r/modules/extra"))"
