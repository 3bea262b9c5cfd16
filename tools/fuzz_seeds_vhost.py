#!/usr/bin/env python3
"""Writes the seed inputs of the vhost_queues and vhost_relay fuzz targets
(fuzz/corpus/<target>/seed-*): short programs in each target's input
encoding (see the targets' sources) that reach the TX, RX and control paths
and a QEMU-like vhost-user start-up, so that a short fuzzing run starts
past the trivial inputs."""
import os
import struct
import sys

A = 0x1_0000
DATA = A + 3 * 4096  # where the target's buffer area starts
MAC = bytes([0x52, 0x54, 0, 0x12, 0x34, 0x56])


def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def udp_frame(payload_len, dst=MAC):
    payload = bytes([0x5A]) * payload_len
    udp = struct.pack("!HHHH", 40000, 5201, 8 + payload_len, 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0x4000, 64, 17, 0,
                     bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]))
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    return dst + bytes([2, 0, 0, 0, 0, 1]) + b"\x08\x00" + ip + udp


def op(code, q):
    return bytes([(q << 6) | code])


def desc(q, slot, addr, length, flags, nxt=0, raw_addr=False):
    # slot bit 7 clear: the address is taken modulo region A, from A.
    a = addr if raw_addr else addr - A
    s = slot | (0x80 if raw_addr else 0)
    return op(0, q) + bytes([s]) + struct.pack("<QIHH", a, length, flags, nxt)


def publish(q, head):
    return op(1, q) + struct.pack("<H", head)


def kick(q):
    return op(2, q)


def uplink(frame):
    return op(3, 0) + struct.pack("<H", len(frame)) + frame


def poke(offset, data):
    return op(4, 0) + struct.pack("<HB", offset, len(data)) + data


def tx_frame(q, frame):
    return op(7, q) + struct.pack("<H", len(frame)) + frame


def queues_seeds():
    seeds = {}
    cfg_all = bytes([0x3F])
    # TX: two well-formed frames, one kick.
    seeds["tx"] = cfg_all + tx_frame(1, udp_frame(100)) + tx_frame(1, udp_frame(1000)) + kick(1)
    # RX: a writable buffer, a frame from the uplink, a kick; with and
    # without mergeable buffers.
    rx = desc(0, 0, DATA + 2048, 2048, 2) + publish(0, 0) + uplink(bytes(12) + udp_frame(200)) + kick(0)
    seeds["rx"] = cfg_all + rx
    seeds["rx-plain"] = bytes([0x20]) + rx
    # RX over two chained buffers.
    seeds["rx-chain"] = (cfg_all + desc(0, 0, DATA + 1024, 30, 2 | 1, 1)
                         + desc(0, 1, DATA + 4096, 2048, 2) + publish(0, 0)
                         + uplink(bytes(12) + udp_frame(300)) + kick(0))
    # Control: RX promiscuous on, ack in its own buffer.
    cmd = bytes([0, 0, 1])
    seeds["ctrl"] = (cfg_all + poke(0, cmd) + desc(2, 0, DATA, 3, 1, 1)
                     + desc(2, 1, DATA + 64, 1, 2) + publish(2, 0) + kick(2))
    # VQ_GET with the ack and the answer in one buffer.
    get = bytes([6, 3, 0, 0, 0, 0])
    seeds["ctrl-get"] = (cfg_all + poke(0, get) + desc(2, 3, DATA, 6, 1, 4)
                         + desc(2, 4, DATA + 64, 9, 2) + publish(2, 3) + kick(2))
    # TX through an indirect table.
    frame = bytes(20) + udp_frame(64)
    table = struct.pack("<QIHH", DATA + 512, len(frame), 0, 0)
    seeds["tx-indirect"] = (cfg_all + poke(512, frame) + poke(256, table)
                            + desc(1, 2, DATA + 256, 16, 4) + publish(1, 2) + kick(1))
    # A loop, then a head past the queue, then a good frame.
    seeds["tx-bad"] = (cfg_all + desc(1, 5, DATA, 20, 1, 6) + desc(1, 6, DATA, 20, 1, 5)
                       + publish(1, 5) + publish(1, 0x8000 | 300)
                       + tx_frame(1, udp_frame(80)) + kick(1))
    return seeds


def relay_seeds():
    def msg(sel, fl, payload=b""):
        # sel picks the request; payload taken as len*4 bytes unless the
        # target builds it (region and enable messages with fl bit 1 clear).
        assert len(payload) % 4 == 0
        return bytes([1, sel, fl, len(payload) // 4]) + payload

    SET_FEATURES, SET_PROTOCOL_FEATURES, SET_VRING_ENABLE, SET_MEM_TABLE, ADD, REM, GET_FEATURES = range(7)
    seeds = {}
    # GET_FEATURES first (and its answer), as QEMU starts.
    start = (msg(GET_FEATURES, 0) + b"\x00"
             + msg(SET_VRING_ENABLE, 1 | (0 << 3)) + msg(SET_VRING_ENABLE, 1 | (1 << 3))
             + msg(SET_PROTOCOL_FEATURES, 2, struct.pack("<Q", 0x8 | 0x200))
             + msg(SET_FEATURES, 2, struct.pack("<Q", 1 << 30 | 1 << 32)))
    regions = (msg(ADD, 1 | (1 << 4)) + b"\x00" + msg(ADD, 1 | (1 << 4))
               + msg(ADD, 1 | (2 << 4)) + b"\x00" + msg(REM, 1 | (1 << 4))
               + msg(REM, 1 | (1 << 4)) + b"\x00")
    seeds["qemu-start"] = start + regions
    seeds["no-reply-ack"] = msg(ADD, 0 | (3 << 4)) + msg(ADD, 1 | (3 << 4)) + msg(REM, 0 | (3 << 4))
    seeds["mem-table"] = start + msg(ADD, 1 | (4 << 4)) + msg(SET_MEM_TABLE, 2, bytes(8)) + b"\x00"
    return seeds


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "fuzz/corpus"
    for target, seeds in (("vhost_queues", queues_seeds()), ("vhost_relay", relay_seeds())):
        d = os.path.join(root, target)
        os.makedirs(d, exist_ok=True)
        for name, data in seeds.items():
            with open(os.path.join(d, "seed-" + name), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    main()
