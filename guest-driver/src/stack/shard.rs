//! A shard: one queue pair, its thread, and the TCP connections whose
//! packets the device steers to it.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{atomic::Ordering, Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use log::{debug, warn};
use vmm_sys_util::eventfd::EventFd;
use vnic_protocol::{
    frag::{self, fragment, Outcome, Reassembler},
    offload::csum::complete_checksum,
    tcp::{self, Connection, Event},
    virtio::{hdr::GsoType, HdrFlags, VirtioNetHdr},
    wire::{
        arp,
        ethernet::{ethertype, Address},
        icmpv4, icmpv6, ipv4, ipv6, tcp as wtcp, udp,
    },
};

use super::{
    frames::{self, ETH_LEN},
    neigh::Lookup,
    socket::ListenQueue,
    Inner,
};
use crate::{
    net::{self, QueuePair, RxQueue, TxQueue},
    Error, QueueError, Result,
};

/// Frames waiting in one shard's inbox at most; past it they are dropped
/// and counted (`rx_inbox_full`).
const INBOX_LIMIT: usize = 4096;

/// A TCP connection and what the stack keeps with it.
#[derive(Debug)]
pub(crate) struct TcpEntry {
    pub conn: Connection,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub listener: Option<Arc<ListenQueue>>,
    /// The application dropped its handle.
    pub user_gone: bool,
    pub id: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Proto {
    pub conns: Vec<Option<TcpEntry>>,
    pub flows: HashMap<(SocketAddr, SocketAddr), usize>,
    pub buf: Vec<u8>,
    /// IP fragments of datagrams for this host that RSS steers here (it
    /// hashes fragments on addresses alone, so they all come to one shard).
    pub frag: Reassembler,
    /// A reassembled datagram behind the received frame's Ethernet header.
    pub whole: Vec<u8>,
    /// A socket event happened: wake waiters when the lock is released.
    pub wake_users: bool,
}

#[derive(Debug)]
pub(crate) struct ShardState {
    pub rx: RxQueue,
    pub tx: TxQueue,
    pub p: Proto,
}

#[derive(Debug)]
pub(crate) struct Shard {
    pub st: Mutex<ShardState>,
    /// Socket waiters of this shard.
    pub cond: Condvar,
    /// Wakes the shard thread (new work from an application thread).
    pub wake: EventFd,
    /// The RX interrupt, to sleep on outside the lock.
    call: EventFd,
    /// The TX interrupt, armed while the TX ring is full.
    tx_call: EventFd,
    /// Frames other shards received for flows of this one.
    pub inbox: Mutex<Vec<(VirtioNetHdr, Vec<u8>)>>,
}

impl Shard {
    pub fn new(qp: QueuePair, wake: EventFd, reassembly: frag::Limits) -> Shard {
        let clone = |e: &EventFd| {
            e.try_clone()
                .unwrap_or_else(|_| EventFd::new(0).unwrap_or_else(|_| std::process::abort()))
        };
        let call = clone(qp.rx.call());
        let tx_call = clone(qp.tx.call());
        Shard {
            st: Mutex::new(ShardState {
                rx: qp.rx,
                tx: qp.tx,
                p: Proto {
                    frag: Reassembler::new(reassembly),
                    ..Proto::default()
                },
            }),
            cond: Condvar::new(),
            wake,
            call,
            tx_call,
            inbox: Mutex::new(Vec::new()),
        }
    }
}

/// The shard thread: NAPI-style receive, timers, then sleep on the RX
/// interrupt (or the wake fd) until the next timer.
pub(crate) fn run(inner: &Arc<Inner>, idx: usize) {
    let shard = &inner.shards[idx];
    let budget = inner.cfg.budget.max(1);
    let busy = inner.cfg.busy_poll;
    while !inner.stop.load(Ordering::Relaxed) {
        let now = inner.now();
        let (n, next, tx_armed, tx_raced) = {
            let Ok(mut g) = shard.st.lock() else {
                return;
            };
            let st = &mut *g;
            let inbox = shard
                .inbox
                .lock()
                .map(|mut v| std::mem::take(&mut *v))
                .unwrap_or_default();
            for (h, f) in inbox {
                input(inner, idx, &mut st.p, &mut st.tx, &h, &f, now);
            }
            let (p, tx) = (&mut st.p, &mut st.tx);
            let n = match st.rx.napi_poll(budget, busy.is_none(), &mut |h, f| {
                input(inner, idx, p, tx, h, f, now)
            }) {
                Ok(n) => n,
                Err(e) => {
                    warn!("shard {idx}: receive failed: {e}");
                    0
                }
            };
            inner.shard_rx[idx].fetch_add(n as u64, Ordering::Relaxed);
            let next = service(inner, st, now);
            if let Err(e) = st.tx.kick() {
                warn!("shard {idx}: kick failed: {e}");
            }
            // With the TX ring full, output waits for the device to hand
            // chains back: sleep on the TX interrupt too, armed now (and
            // if chains came back meanwhile, do not sleep at all).
            let (mut tx_armed, mut tx_raced) = (false, false);
            if let Ok(false) = st.tx.has_room() {
                match st.tx.arm() {
                    Ok(raced) => (tx_armed, tx_raced) = (true, raced),
                    Err(e) => warn!("shard {idx}: arming TX: {e}"),
                }
            }
            let wake = std::mem::take(&mut st.p.wake_users);
            drop(g);
            if wake {
                shard.cond.notify_all();
                inner.notify();
            }
            (n, next, tx_armed, tx_raced)
        };
        if n >= budget || tx_raced {
            disarm_tx(shard, tx_armed);
            continue;
        }
        if let Some(b) = busy {
            // Spin with interrupts still off; only before sleeping are
            // they re-armed (and a frame that raced in is polled).
            let until = Instant::now() + b;
            let mut got = false;
            while Instant::now() < until && !got {
                got = shard.st.lock().map(|s| s.rx.pending()).unwrap_or(false);
                std::hint::spin_loop();
            }
            let raced = got
                || shard
                    .st
                    .lock()
                    .map(|s| s.rx.rearm().unwrap_or(true))
                    .unwrap_or(false);
            if raced {
                disarm_tx(shard, tx_armed);
                continue;
            }
        }
        let now2 = inner.now();
        let sleep = next.map_or(Duration::from_millis(200), |t| {
            Duration::from_micros(t.0.saturating_sub(now2.0))
        });
        if sleep.is_zero() {
            disarm_tx(shard, tx_armed);
            continue;
        }
        let tx_call = tx_armed.then_some(&shard.tx_call);
        net::wait_any(
            &[Some(&shard.call), Some(&shard.wake), tx_call],
            sleep.clamp(Duration::from_millis(1), Duration::from_millis(200)),
        );
        disarm_tx(shard, tx_armed);
    }
}

/// Turns the TX interrupt off again after a wait for room.
fn disarm_tx(shard: &Shard, armed: bool) {
    if armed {
        if let Ok(mut st) = shard.st.lock() {
            let _ = st.tx.disarm();
        }
    }
}

/// Timers and output of every connection; removes finished ones.
/// Returns the earliest deadline left.
fn service(inner: &Inner, st: &mut ShardState, now: tcp::Instant) -> Option<tcp::Instant> {
    st.p.frag.expire(now.0 / 1000);
    let mut next: Option<tcp::Instant> = None;
    for slot in 0..st.p.conns.len() {
        let Some(e) = st.p.conns[slot].as_mut() else {
            continue;
        };
        if e.conn.poll_timeout().is_some_and(|t| t <= now) {
            e.conn.on_timer(now);
        }
        flush(inner, &mut st.p, &mut st.tx, slot, now);
        let Some(e) = st.p.conns[slot].as_mut() else {
            continue;
        };
        if e.conn.is_closed() && e.user_gone {
            let key = (e.local, e.remote);
            st.p.flows.remove(&key);
            st.p.conns[slot] = None;
            continue;
        }
        if let Some(t) = e.conn.poll_timeout() {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
    }
    while matches!(st.p.conns.last(), Some(None)) {
        st.p.conns.pop();
    }
    next
}

/// Passes connection `slot`'s events on, then sends whatever it has to send.
pub(crate) fn flush(
    inner: &Inner,
    p: &mut Proto,
    tx: &mut TxQueue,
    slot: usize,
    now: tcp::Instant,
) {
    // Events first: handing a connection to its listener may reset it,
    // and the RST goes out below.
    drain_events(inner, p, slot);
    let Some(Some(e)) = p.conns.get_mut(slot) else {
        return;
    };
    let v6 = e.remote.is_ipv6();
    let tso = if v6 { inner.tso6 } else { inner.tso4 };
    loop {
        match tx.has_room() {
            Ok(true) => {}
            _ => {
                inner.counters.tx_ring_full.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
        let max = if tso {
            65535 - ETH_LEN - 40 - 60
        } else {
            e.conn.send_mss()
        };
        let Some(seg) = e.conn.poll_transmit(now, max) else {
            break;
        };
        let (local, remote) = (e.local, e.remote);
        let buf = &mut p.buf;
        frames::eth(buf, None, inner.mac, frames::ethertype_of(remote.ip()));
        let hl = seg.repr.header_len();
        let l4_len = hl + seg.payload_len();
        let ident = inner.ip_ident.fetch_add(1, Ordering::Relaxed);
        let iphl = frames::ip(buf, local.ip(), remote.ip(), frames::TCP, l4_len, ident, 64);
        let l4 = buf.len();
        buf.resize(l4 + hl, 0);
        let mut repr = seg.repr;
        repr.payload_len = 0;
        if repr
            .emit(&mut wtcp::Packet::new_unchecked(&mut buf[l4..]), None)
            .is_err()
        {
            inner.counters.rx_malformed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        buf.extend_from_slice(seg.payload[0]);
        buf.extend_from_slice(seg.payload[1]);
        let ps = frames::pseudo(local.ip(), remote.ip(), frames::TCP, l4_len);
        let mut hdr = frames::l4_checksum(buf, l4, wtcp::CHECKSUM_OFFSET, ps, inner.csum_tx);
        if seg.payload_len() > seg.mss {
            frames::tso(&mut hdr, v6, ETH_LEN + iphl + hl, seg.mss);
        }
        send_ip(inner, tx, remote.ip(), hdr, buf);
    }
}

/// Passes a connection's events to its listener and waiters.
fn drain_events(inner: &Inner, p: &mut Proto, slot: usize) {
    let Some(Some(e)) = p.conns.get_mut(slot) else {
        return;
    };
    let mut any = false;
    while let Some(ev) = e.conn.poll_event() {
        any = true;
        if matches!(ev, Event::Reset | Event::TimedOut) {
            debug!(
                "tcp {} -> {}: {ev:?}; {:?}",
                e.local,
                e.remote,
                e.conn.stats()
            );
        }
        if ev == Event::Connected {
            if let Some(l) = e.listener.take() {
                if !l.push((e.id, slot)) {
                    // Nobody will accept it: reset it rather than keep it.
                    e.conn.abort();
                    e.user_gone = true;
                    inner
                        .counters
                        .tcp_backlog_full
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    if any {
        p.wake_users = true;
    }
}

/// Puts an IP frame on the wire once its next hop's address is known.
pub(crate) fn send_ip(
    inner: &Inner,
    tx: &mut TxQueue,
    next_hop: IpAddr,
    hdr: VirtioNetHdr,
    frame: &mut [u8],
) {
    let now = Instant::now();
    let look = match inner.neigh.lock() {
        Ok(mut n) => {
            let l = n.lookup(next_hop, now);
            if let Lookup::Unknown { .. } = l {
                n.hold(next_hop, (hdr, frame.to_vec()));
            }
            l
        }
        Err(_) => return,
    };
    match look {
        Lookup::Known { mac, refresh } => {
            frame[..6].copy_from_slice(mac.as_bytes());
            post(inner, tx, &hdr, frame);
            if refresh {
                solicit(inner, tx, next_hop);
            }
        }
        Lookup::Unknown { ask } => {
            if ask {
                solicit(inner, tx, next_hop);
            }
        }
    }
}

fn post(inner: &Inner, tx: &mut TxQueue, hdr: &VirtioNetHdr, frame: &[u8]) {
    if frame.len() > ETH_LEN + inner.mtu && hdr.gso_type == GsoType::None as u8 {
        post_fragments(inner, tx, hdr, frame);
        return;
    }
    post_one(inner, tx, hdr, frame);
}

fn post_one(inner: &Inner, tx: &mut TxQueue, hdr: &VirtioNetHdr, frame: &[u8]) {
    match tx.post(hdr, frame) {
        Ok(true) => {
            inner.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
        }
        Ok(false) => {
            inner.counters.tx_ring_full.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            debug!("tx: {e}");
            inner.counters.tx_ring_full.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Sends an IP packet longer than the MTU as fragments: completes a
/// checksum left to the device (it covers the whole datagram, which no
/// fragment holds), clears IPv4's don't-fragment (this host is the
/// source) and cuts. The datagram goes whole or not at all: without room
/// in the ring for every piece it is dropped and counted as ring-full.
fn post_fragments(inner: &Inner, tx: &mut TxQueue, hdr: &VirtioNetHdr, frame: &[u8]) {
    let c = &inner.counters;
    let mut whole = frame.to_vec();
    if hdr.flags.contains(HdrFlags::NEEDS_CSUM)
        && complete_checksum(
            &mut whole,
            usize::from(hdr.csum_start),
            usize::from(hdr.csum_offset),
        )
        .is_err()
    {
        c.tx_unfragmentable.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if let Some(ip) = whole
        .get_mut(ETH_LEN..)
        .filter(|b| b.first() == Some(&0x45))
    {
        // Only a plain header: options are never sent by this stack.
        let mut p = ipv4::Packet::new_unchecked(ip);
        if p.dont_frag() {
            p.set_frag(false, p.more_frags(), p.frag_offset());
            p.fill_checksum();
        }
    }
    // Pieces needed at most (IPv4 with the longest header, or IPv6 with a
    // fragment header and room to spare).
    let per = (inner
        .mtu
        .saturating_sub(ipv4::HEADER_LEN + ipv4::MAX_OPTIONS_LEN + 8)
        & !7)
        .max(8);
    let need = (whole.len() - ETH_LEN).div_ceil(per);
    if need > tx.capacity() {
        // It would never fit, however long it waited.
        c.tx_unfragmentable.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if tx.room().unwrap_or(0) < need {
        c.tx_ring_full.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let ident = inner.frag_ident.fetch_add(1, Ordering::Relaxed);
    let mut scratch = Vec::with_capacity(ETH_LEN + inner.mtu);
    let plain = VirtioNetHdr::default();
    match fragment(&whole, ETH_LEN, inner.mtu, ident, &mut scratch, &mut |f| {
        post_one(inner, tx, &plain, f)
    }) {
        Ok(n) => {
            c.tx_fragmented.fetch_add(1, Ordering::Relaxed);
            c.tx_fragments.fetch_add(n as u64, Ordering::Relaxed);
        }
        Err(e) => {
            debug!("tx: cannot fragment: {e}");
            c.tx_unfragmentable.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// An ARP request or a neighbour solicitation for `ip`.
fn solicit(inner: &Inner, tx: &mut TxQueue, ip: IpAddr) {
    let mut buf = Vec::with_capacity(128);
    match ip {
        IpAddr::V4(t) => {
            let Some((me, _)) = inner.cfg.ipv4 else {
                return;
            };
            frames::eth(
                &mut buf,
                Some(Address::BROADCAST),
                inner.mac,
                ethertype::ARP,
            );
            let r = arp::Repr {
                operation: arp::OP_REQUEST,
                source_hardware_addr: inner.mac,
                source_protocol_addr: me,
                target_hardware_addr: Address([0; 6]),
                target_protocol_addr: t,
            };
            arp_append(&mut buf, &r);
        }
        IpAddr::V6(t) => {
            let Some((me, _)) = inner.cfg.ipv6 else {
                return;
            };
            let group = icmpv6::solicited_node(t);
            frames::eth(
                &mut buf,
                Some(frames::ipv6_multicast_mac(group)),
                inner.mac,
                ethertype::IPV6,
            );
            let m = icmpv6::Repr::NeighborSolicit {
                target: t,
                source_lladdr: Some(inner.mac),
            };
            icmpv6_append(&mut buf, me, group, &m, 255);
        }
    }
    post(inner, tx, &VirtioNetHdr::default(), &buf);
}

fn arp_append(buf: &mut Vec<u8>, r: &arp::Repr) {
    let at = buf.len();
    buf.resize(at + r.buffer_len(), 0);
    let _ = r.emit(&mut arp::Packet::new_unchecked(&mut buf[at..]));
}

/// Appends an IPv6 header and the ICMPv6 message `m` with its checksum
/// (neighbour discovery needs hop limit 255).
fn icmpv6_append(buf: &mut Vec<u8>, src: Ipv6Addr, dst: Ipv6Addr, m: &icmpv6::Repr<'_>, hop: u8) {
    let len = m.buffer_len();
    frames::ip(buf, IpAddr::V6(src), IpAddr::V6(dst), 58, len, 0, hop);
    let at = buf.len();
    buf.resize(at + len, 0);
    let ps = frames::pseudo(IpAddr::V6(src), IpAddr::V6(dst), 58, len);
    let _ = m.emit(&mut icmpv6::Packet::new_unchecked(&mut buf[at..]), ps);
}

/// Sends an echo request (used by [`super::Stack::ping`]).
pub(crate) fn send_echo(
    inner: &Inner,
    dst: IpAddr,
    ident: u16,
    seq_no: u16,
    data: &[u8],
) -> Result<()> {
    let src = inner.local_ip(dst).ok_or(Error::NoAddress(dst))?;
    let mut buf = Vec::with_capacity(64 + data.len());
    frames::eth(&mut buf, None, inner.mac, frames::ethertype_of(dst));
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let r = icmpv4::Repr::EchoRequest {
                ident,
                seq_no,
                data,
            };
            icmpv4_append(
                &mut buf,
                s,
                d,
                &r,
                inner.ip_ident.fetch_add(1, Ordering::Relaxed),
            );
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let r = icmpv6::Repr::EchoRequest {
                ident,
                seq_no,
                data,
            };
            icmpv6_append(&mut buf, s, d, &r, 64);
        }
        _ => return Err(Error::NoAddress(dst)),
    }
    with_tx(inner, 0, |tx| {
        send_ip(inner, tx, dst, VirtioNetHdr::default(), &mut buf)
    })
}

fn icmpv4_append(buf: &mut Vec<u8>, s: Ipv4Addr, d: Ipv4Addr, r: &icmpv4::Repr<'_>, ident: u16) {
    let len = r.buffer_len();
    frames::ip(buf, IpAddr::V4(s), IpAddr::V4(d), 1, len, ident, 64);
    let at = buf.len();
    buf.resize(at + len, 0);
    let _ = r.emit(&mut icmpv4::Packet::new_unchecked(&mut buf[at..]));
}

/// Runs `f` with shard `idx`'s TX queue and kicks it after.
pub(crate) fn with_tx<T>(
    inner: &Inner,
    idx: usize,
    f: impl FnOnce(&mut TxQueue) -> T,
) -> Result<T> {
    let shard = inner.shards.get(idx).ok_or(QueueError::NoSuchPair(idx))?;
    let mut g = shard.st.lock().map_err(|_| Error::Poisoned("shard"))?;
    let r = f(&mut g.tx);
    g.tx.kick()?;
    Ok(r)
}

/// One received frame.
#[allow(clippy::too_many_arguments)]
fn input(
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

pub(crate) fn insert(p: &mut Proto, e: TcpEntry) -> usize {
    let key = (e.local, e.remote);
    let slot = match p.conns.iter().position(Option::is_none) {
        Some(i) => {
            p.conns[i] = Some(e);
            i
        }
        None => {
            p.conns.push(Some(e));
            p.conns.len() - 1
        }
    };
    p.flows.insert(key, slot);
    slot
}

impl Inner {
    /// The TCP settings for a peer: MSS from the MTU and family.
    pub(crate) fn tcp_cfg(&self, remote: SocketAddr) -> tcp::Config {
        let mut c = self.cfg.tcp;
        let ip_tcp = if remote.is_ipv6() { 60 } else { 40 };
        c.mss = (self.mtu.saturating_sub(ip_tcp)).clamp(536, 65495) as u16;
        if remote.is_ipv6() {
            c.default_peer_mss = 1220;
        }
        c
    }
}

impl RxQueue {
    /// Whether frames wait in the ring (for busy polling).
    pub fn pending(&self) -> bool {
        self.has_used().unwrap_or(false)
    }
}
