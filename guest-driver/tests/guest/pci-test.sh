#!/bin/sh
# Run inside the QEMU guest by qemu_pci.rs: vnic-guest's tools over the
# virtio-net PCI function, taken from the kernel through uio_pci_generic,
# against the host's kernel at 192.0.2.1; then the same function back
# with the guest kernel's virtio_net and iperf3, measured beside it.
# Markers on the console tell the host when to act (PING-LINGER,
# SERVER-READY) and delimit each report.

wait_for() { # FILE TEXT: up to 120 s
    i=0
    while ! grep -q "$2" "$1" 2>/dev/null && [ $i -lt 120 ]; do
        sleep 1
        i=$((i + 1))
    done
}

bdf=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor")" = 0x1af4 ] || continue
    case "$(cat "$d/device")" in 0x1041 | 0x1000) bdf=${d##*/} ;; esac
done
dev=/sys/bus/pci/devices/$bdf
nic=$(ls "$dev"/virtio*/net)
echo "BDF=$bdf DRIVER=$(basename "$(readlink "$dev/driver")") NIC=$nic"
A="--pci $bdf --addr 192.0.2.2/24 --queues 2"

# What is missing gets one line each, and the function stays the kernel's.
vnic-ping $A -c 1 192.0.2.1
echo "NOUIO-RC=$?"
for m in $(cat /modules/extra); do
    insmod /modules/$m || echo "INSMOD-FAILED $m"
done
ip link set "$nic" up
vnic-ping $A -c 1 192.0.2.1
echo "INUSE-RC=$?"
ip link set "$nic" down
vnic-ping --pci 0000:00:00.0 --addr 192.0.2.2/24 -c 1 192.0.2.1
echo "WRONG-RC=$?"
vnic-ping $A -c 1 192.0.2.1
echo "NOMOUNT-RC=$?"
mkdir -p /dev/hugepages
mount -t hugetlbfs none /dev/hugepages
vnic-ping $A -c 1 192.0.2.1
echo "NOPAGES-RC=$?"
echo "STILL DRIVER=$(basename "$(readlink "$dev/driver")")"
echo 48 > /proc/sys/vm/nr_hugepages
grep HugePages_Free /proc/meminfo

# Ping both ways: ours, then the host's while ours lingers.
vnic-ping $A -c 3 --linger 20 192.0.2.1 > /tmp/ping 2>&1 &
p=$!
wait_for /tmp/ping "3 received"
echo PING-LINGER
wait $p
echo "PING-RC=$?"
cat /tmp/ping

# Client: two streams to the host, then the host sending (-R).
vnic-iperf $A -c 192.0.2.1 -t 3 -P 2 -J > /tmp/c.json 2> /tmp/c.err
echo "C-RC=$?"
echo C-BEGIN; cat /tmp/c.json; echo C-END; cat /tmp/c.err
vnic-iperf $A -c 192.0.2.1 -t 3 -R -J > /tmp/r.json 2> /tmp/r.err
echo "R-RC=$?"
echo R-BEGIN; cat /tmp/r.json; echo R-END; cat /tmp/r.err

# Server: the host's iperf3 connects once it sees SERVER-READY.
vnic-iperf $A -s -1 > /tmp/s 2>&1 &
p=$!
wait_for /tmp/s listening
echo SERVER-READY
wait $p
echo "S-RC=$?"
cat /tmp/s
# Stopped by a signal, it gives the function back all the same.
vnic-iperf $A -s > /tmp/sig 2>&1 &
p=$!
wait_for /tmp/sig listening
kill -INT $p
wait $p
echo "SIG-RC=$? SIG-DRIVER=$(basename "$(readlink "$dev/driver")")"

# The host reads vnicd's queue counters for the PCI runs now.
echo VNIC-DONE
sleep 3

# Given back to virtio_net: the same function, the kernel's stack.
nic=$(ls "$dev"/virtio*/net 2>/dev/null)
echo "AFTER DRIVER=$(basename "$(readlink "$dev/driver")") NIC=$nic"
ip link set "$nic" up
ip addr add 192.0.2.2/24 dev "$nic"
i=0
while ! ping -c 1 -W 1 192.0.2.1 > /dev/null && [ $i -lt 30 ]; do
    i=$((i + 1))
done
echo "KERNEL-PING-TRIES=$i"
iperf3 -c 192.0.2.1 -t 3 -P 2 -J > /tmp/k.json
echo "K-RC=$?"
echo K-BEGIN; cat /tmp/k.json; echo K-END
iperf3 -c 192.0.2.1 -t 3 -R -J > /tmp/kr.json
echo "KR-RC=$?"
echo KR-BEGIN; cat /tmp/kr.json; echo KR-END

# For a failed run: what the guest kernel said about the function.
echo DIAG-BEGIN
dmesg | grep -i -e uio -e virtio -e "$bdf" | tail -n 20
grep -e uio -e virtio /proc/interrupts
ip -s link show "$nic"
ip neigh
echo "COMMAND=$(od -An -tx1 -j4 -N2 "$dev/config")"
echo DIAG-END
