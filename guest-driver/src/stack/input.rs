//! Middle: what comes in. A received frame is demultiplexed by
//! EtherType and protocol: ARP and neighbour discovery feed the
//! neighbour cache, echo requests are answered, fragments go to the
//! shard's reassembler, UDP to its socket's queue, TCP to its connection
//! (or a listener, or a reset), and a flow of another shard to that
//! shard's inbox.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::atomic::Ordering,
    time::Instant,
};

use vnic_protocol::{
    frag::Outcome,
    tcp::{self, Connection},
    virtio::{HdrFlags, VirtioNetHdr},
    wire::{
        arp,
        emit::{self as frames, arp_append, icmpv4_append, icmpv6_append, ETH_LEN},
        ethernet::{ethertype, Address},
        icmpv4, icmpv6, ipv4, ipv6, tcp as wtcp, udp,
    },
};

use super::{
    output::{flush, post, send_ip},
    state::{insert, Inner, Proto, TcpEntry},
};
use crate::net::TxQueue;

/// Frames waiting in one shard's inbox at most; past it they are dropped
/// and counted (`rx_inbox_full`).
const INBOX_LIMIT: usize = 4096;

/// One received frame.
#[allow(clippy::too_many_arguments)]
pub(crate) fn input(
    inner: &Inner,
    idx: usize,
    p: &mut Proto,
    tx: &mut TxQueue,
    hdr: &VirtioNetHdr,
    frame: &[u8],
    now: tcp::Instant,
) {
    let c = &inner.counters;
    c.rx_frames.fetch_add(1, Ordering::Relaxed);
    if frame.len() < ETH_LEN {
        c.rx_malformed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let dst = Address([frame[0], frame[1], frame[2], frame[3], frame[4], frame[5]]);
    if dst != inner.mac && !dst.is_multicast() {
        c.rx_not_ours.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let src_mac = Address([frame[6], frame[7], frame[8], frame[9], frame[10], frame[11]]);
    let et = u16::from_be_bytes([frame[12], frame[13]]);
    let body = &frame[ETH_LEN..];
    let verified = inner.csum_rx
        && hdr
            .flags
            .intersects(HdrFlags::DATA_VALID | HdrFlags::NEEDS_CSUM);
    let ok = match et {
        ethertype::ARP => arp_input(inner, tx, body),
        ethertype::IPV4 => ipv4_input(inner, idx, p, tx, hdr, frame, verified, now),
        ethertype::IPV6 => ipv6_input(inner, idx, p, tx, hdr, frame, src_mac, verified, now),
        _ => {
            c.rx_not_ours.fetch_add(1, Ordering::Relaxed);
            true
        }
    };
    if !ok {
        c.rx_malformed.fetch_add(1, Ordering::Relaxed);
    }
}

fn arp_input(inner: &Inner, tx: &mut TxQueue, body: &[u8]) -> bool {
    let Ok(p) = arp::Packet::new_checked(body) else {
        return false;
    };
    let Ok(r) = arp::Repr::parse(&p) else {
        return false;
    };
    let Some((me, _)) = inner.cfg.ipv4 else {
        return true;
    };
    let now = Instant::now();
    let from = IpAddr::V4(r.source_protocol_addr);
    let held = match inner.neigh.lock() {
        Ok(mut n) => {
            if r.target_protocol_addr == me {
                n.learn(from, r.source_hardware_addr, now)
            } else {
                n.refresh(from, r.source_hardware_addr, now)
            }
        }
        Err(_) => return true,
    };
    for (h, f) in held {
        post(inner, tx, &h, &f);
    }
    if r.operation == arp::OP_REQUEST && r.target_protocol_addr == me {
        let mut buf = Vec::with_capacity(64);
        frames::eth(
            &mut buf,
            Some(r.source_hardware_addr),
            inner.mac,
            ethertype::ARP,
        );
        arp_append(
            &mut buf,
            &arp::Repr {
                operation: arp::OP_REPLY,
                source_hardware_addr: inner.mac,
                source_protocol_addr: me,
                target_hardware_addr: r.source_hardware_addr,
                target_protocol_addr: r.source_protocol_addr,
            },
        );
        post(inner, tx, &VirtioNetHdr::default(), &buf);
    }
    true
}

#[allow(clippy::too_many_arguments)]
fn ipv4_input(
    inner: &Inner,
    idx: usize,
    p: &mut Proto,
    tx: &mut TxQueue,
    hdr: &VirtioNetHdr,
    frame: &[u8],
    verified: bool,
    now: tcp::Instant,
) -> bool {
    let body = &frame[ETH_LEN..];
    let Ok(pkt) = ipv4::Packet::new_checked(body) else {
        return false;
    };
    let Ok(ip) = ipv4::Repr::parse(&pkt) else {
        inner
            .counters
            .rx_bad_checksum
            .fetch_add(1, Ordering::Relaxed);
        return true;
    };
    if !inner.is_local(IpAddr::V4(ip.dst_addr)) {
        inner.counters.rx_not_ours.fetch_add(1, Ordering::Relaxed);
        return true;
    }
    if ip.more_frags || ip.frag_offset != 0 {
        return reassemble(inner, idx, p, tx, frame, now);
    }
    let l4 = pkt.payload();
    let (s, d) = (IpAddr::V4(ip.src_addr), IpAddr::V4(ip.dst_addr));
    match ip.protocol {
        1 => {
            let Ok(ip4) = icmpv4::Packet::new_checked(l4) else {
                return false;
            };
            let Ok(m) = icmpv4::Repr::parse(&ip4) else {
                inner
                    .counters
                    .rx_bad_checksum
                    .fetch_add(1, Ordering::Relaxed);
                return true;
            };
            match m {
                icmpv4::Repr::EchoRequest {
                    ident,
                    seq_no,
                    data,
                } => {
                    let mut buf = Vec::with_capacity(64 + data.len());
                    frames::eth(&mut buf, None, inner.mac, ethertype::IPV4);
                    let r = icmpv4::Repr::EchoReply {
                        ident,
                        seq_no,
                        data,
                    };
                    icmpv4_append(
                        &mut buf,
                        ip.dst_addr,
                        ip.src_addr,
                        &r,
                        inner.ip_ident.fetch_add(1, Ordering::Relaxed),
                    );
                    send_ip(inner, tx, s, VirtioNetHdr::default(), &mut buf);
                    inner.counters.echo_replied.fetch_add(1, Ordering::Relaxed);
                }
                icmpv4::Repr::EchoReply { ident, seq_no, .. } => {
                    echo_reply(inner, ident, seq_no, s)
                }
                _ => {}
            }
            true
        }
        6 => tcp_input(inner, idx, p, tx, hdr, frame, s, d, l4, verified, now),
        17 => udp_input(inner, s, d, l4, verified),
        _ => {
            inner.counters.rx_not_ours.fetch_add(1, Ordering::Relaxed);
            true
        }
    }
}

fn echo_reply(inner: &Inner, ident: u16, seq_no: u16, from: IpAddr) {
    if let Ok(mut m) = inner.echo.lock() {
        let v = m.entry(ident).or_default();
        if v.len() < 64 {
            v.push((seq_no, from, Instant::now()));
        }
    }
    inner.echo_cond.notify_all();
}

#[allow(clippy::too_many_arguments)]
fn ipv6_input(
    inner: &Inner,
    idx: usize,
    p: &mut Proto,
    tx: &mut TxQueue,
    hdr: &VirtioNetHdr,
    frame: &[u8],
    src_mac: Address,
    verified: bool,
    now: tcp::Instant,
) -> bool {
    let body = &frame[ETH_LEN..];
    let Ok(pkt) = ipv6::Packet::new_checked(body) else {
        return false;
    };
    let Ok(ip) = ipv6::Repr::parse(&pkt) else {
        return false;
    };
    let Some((me, _)) = inner.cfg.ipv6 else {
        return true;
    };
    let for_us = ip.dst_addr == me
        || ip.dst_addr == icmpv6::solicited_node(me)
        || ip.dst_addr == Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    if !for_us {
        inner.counters.rx_not_ours.fetch_add(1, Ordering::Relaxed);
        return true;
    }
    if ipv6::is_extension_header(ip.next_header)
        && ipv6::walk(&pkt).is_ok_and(|w| w.fragment.is_some())
    {
        return reassemble(inner, idx, p, tx, frame, now);
    }
    let l4 = pkt.payload();
    let (s, d) = (IpAddr::V6(ip.src_addr), IpAddr::V6(ip.dst_addr));
    match ip.next_header {
        58 => {
            let ps = frames::pseudo(s, d, 58, l4.len());
            let Ok(ic) = icmpv6::Packet::new_checked(l4) else {
                return false;
            };
            let Ok(m) = icmpv6::Repr::parse(&ic, ps) else {
                inner
                    .counters
                    .rx_bad_checksum
                    .fetch_add(1, Ordering::Relaxed);
                return true;
            };
            let nd_ok = ip.hop_limit == 255;
            match m {
                icmpv6::Repr::NeighborSolicit {
                    target,
                    source_lladdr,
                } if nd_ok && target == me => {
                    if ip.src_addr.is_unspecified() {
                        // Duplicate address detection by someone else.
                        return true;
                    }
                    let held = match inner.neigh.lock() {
                        Ok(mut n) => n.learn(s, source_lladdr.unwrap_or(src_mac), Instant::now()),
                        Err(_) => Vec::new(),
                    };
                    for (h, f) in held {
                        post(inner, tx, &h, &f);
                    }
                    let mut buf = Vec::with_capacity(96);
                    frames::eth(
                        &mut buf,
                        Some(source_lladdr.unwrap_or(src_mac)),
                        inner.mac,
                        ethertype::IPV6,
                    );
                    let na = icmpv6::Repr::NeighborAdvert {
                        flags: icmpv6::NA_SOLICITED | icmpv6::NA_OVERRIDE,
                        target: me,
                        target_lladdr: Some(inner.mac),
                    };
                    icmpv6_append(&mut buf, me, ip.src_addr, &na, 255);
                    post(inner, tx, &VirtioNetHdr::default(), &buf);
                }
                icmpv6::Repr::NeighborAdvert {
                    target,
                    target_lladdr,
                    ..
                } if nd_ok => {
                    let mac = target_lladdr.unwrap_or(src_mac);
                    let held = match inner.neigh.lock() {
                        Ok(mut n) => n.learn(IpAddr::V6(target), mac, Instant::now()),
                        Err(_) => Vec::new(),
                    };
                    for (h, f) in held {
                        post(inner, tx, &h, &f);
                    }
                }
                icmpv6::Repr::EchoRequest {
                    ident,
                    seq_no,
                    data,
                } if ip.dst_addr == me => {
                    let mut buf = Vec::with_capacity(96 + data.len());
                    frames::eth(&mut buf, None, inner.mac, ethertype::IPV6);
                    let r = icmpv6::Repr::EchoReply {
                        ident,
                        seq_no,
                        data,
                    };
                    icmpv6_append(&mut buf, me, ip.src_addr, &r, 64);
                    send_ip(inner, tx, s, VirtioNetHdr::default(), &mut buf);
                    inner.counters.echo_replied.fetch_add(1, Ordering::Relaxed);
                }
                icmpv6::Repr::EchoReply { ident, seq_no, .. } => {
                    echo_reply(inner, ident, seq_no, s)
                }
                _ => {}
            }
            true
        }
        6 if ip.dst_addr == me => tcp_input(inner, idx, p, tx, hdr, frame, s, d, l4, verified, now),
        17 if ip.dst_addr == me => udp_input(inner, s, d, l4, verified),
        _ => {
            inner.counters.rx_not_ours.fetch_add(1, Ordering::Relaxed);
            true
        }
    }
}

/// A fragment for this host: held until its datagram is whole, which then
/// goes through input again as one frame (its checksums checked in
/// software, since no device verified them). Drops are the reassembler's
/// to count. Returns true: the frame was taken.
fn reassemble(
    inner: &Inner,
    idx: usize,
    p: &mut Proto,
    tx: &mut TxQueue,
    frame: &[u8],
    now: tcp::Instant,
) -> bool {
    let mut whole = std::mem::take(&mut p.whole);
    match p.frag.push(now.0 / 1000, &frame[ETH_LEN..]) {
        Ok(Outcome::Complete(d)) => {
            whole.clear();
            whole.extend_from_slice(&frame[..ETH_LEN]);
            whole.extend_from_slice(d);
        }
        Ok(Outcome::Held | Outcome::NotFragment) | Err(_) => {
            p.whole = whole;
            return true;
        }
    }
    // A reassembled datagram is never a fragment, so this goes one level
    // deep.
    let plain = VirtioNetHdr::default();
    let ok = match whole.get(ETH_LEN).map(|b| b >> 4) {
        Some(4) => ipv4_input(inner, idx, p, tx, &plain, &whole, false, now),
        _ => {
            let src_mac = Address([frame[6], frame[7], frame[8], frame[9], frame[10], frame[11]]);
            ipv6_input(inner, idx, p, tx, &plain, &whole, src_mac, false, now)
        }
    };
    if !ok {
        inner.counters.rx_malformed.fetch_add(1, Ordering::Relaxed);
    }
    p.whole = whole;
    true
}

fn udp_input(inner: &Inner, s: IpAddr, d: IpAddr, l4: &[u8], verified: bool) -> bool {
    let Ok(pkt) = udp::Packet::new_checked(l4) else {
        return false;
    };
    let ps =
        (!verified && pkt.checksum() != 0).then(|| frames::pseudo(s, d, frames::UDP, pkt.len()));
    let Ok(r) = udp::Repr::parse(&pkt, ps) else {
        inner
            .counters
            .rx_bad_checksum
            .fetch_add(1, Ordering::Relaxed);
        return true;
    };
    let q = inner
        .udp
        .lock()
        .ok()
        .and_then(|m| m.get(&r.dst_port).cloned());
    match q {
        Some(q) => {
            if !q.push((SocketAddr::new(s, r.src_port), pkt.payload().to_vec())) {
                inner.counters.udp_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        None => {
            inner.counters.rx_not_ours.fetch_add(1, Ordering::Relaxed);
        }
    }
    true
}

#[allow(clippy::too_many_arguments)]
fn tcp_input(
    inner: &Inner,
    idx: usize,
    p: &mut Proto,
    tx: &mut TxQueue,
    hdr: &VirtioNetHdr,
    frame: &[u8],
    s: IpAddr,
    d: IpAddr,
    l4: &[u8],
    verified: bool,
    now: tcp::Instant,
) -> bool {
    let Ok(pkt) = wtcp::Packet::new_checked(l4) else {
        return false;
    };
    let local = SocketAddr::new(d, pkt.dst_port());
    let remote = SocketAddr::new(s, pkt.src_port());
    let owner = inner.owner(local, remote);
    if owner != idx {
        if let Some(o) = inner.shards.get(owner) {
            let c = &inner.counters;
            match o.inbox.lock() {
                Ok(mut ib) if ib.len() < INBOX_LIMIT => {
                    ib.push((*hdr, frame.to_vec()));
                    c.rx_handed_over.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    c.rx_inbox_full.fetch_add(1, Ordering::Relaxed);
                }
            }
            let _ = o.wake.write(1);
            return true;
        }
    }
    let ps = (!verified).then(|| frames::pseudo(s, d, frames::TCP, l4.len()));
    let Ok(repr) = wtcp::Repr::parse(&pkt, ps) else {
        inner
            .counters
            .rx_bad_checksum
            .fetch_add(1, Ordering::Relaxed);
        return true;
    };
    let payload = pkt.payload();
    if let Some(&slot) = p.flows.get(&(local, remote)) {
        if let Some(Some(e)) = p.conns.get_mut(slot) {
            e.conn.on_segment(now, &repr, payload);
        }
        flush(inner, p, tx, slot, now);
        return true;
    }
    let listener = inner
        .listeners
        .lock()
        .ok()
        .and_then(|m| m.get(&local.port()).cloned());
    if let Some(l) = listener {
        if let Some(conn) =
            Connection::accept(inner.tcp_cfg(remote), now, &repr, inner.iss(local, remote))
        {
            let id = inner.next_conn.fetch_add(1, Ordering::Relaxed);
            let slot = insert(
                p,
                TcpEntry {
                    conn,
                    local,
                    remote,
                    listener: Some(l),
                    user_gone: false,
                    id,
                },
            );
            flush(inner, p, tx, slot, now);
            return true;
        }
    }
    if let Some(rst) = tcp::reply_to_stray(&repr, payload.len()) {
        let mut buf = Vec::with_capacity(80);
        frames::eth(&mut buf, None, inner.mac, frames::ethertype_of(s));
        let hl = rst.header_len();
        frames::ip(&mut buf, d, s, frames::TCP, hl, 0, 64);
        let at = buf.len();
        buf.resize(at + hl, 0);
        let ps = frames::pseudo(d, s, frames::TCP, hl);
        let _ = rst.emit(&mut wtcp::Packet::new_unchecked(&mut buf[at..]), Some(ps));
        send_ip(inner, tx, s, VirtioNetHdr::default(), &mut buf);
        inner.counters.tcp_rst_sent.fetch_add(1, Ordering::Relaxed);
    }
    true
}
