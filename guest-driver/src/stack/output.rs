//! Middle: what leaves the stack. A connection's segments and events,
//! IP packets to their next hop (held while its link address is asked
//! for), fragments for datagrams past the MTU, ARP and neighbour
//! solicitations, echo requests.

use std::{net::IpAddr, sync::atomic::Ordering, time::Instant};

use log::debug;
use vnic_protocol::{
    frag::fragment,
    offload::csum::complete_checksum,
    tcp::{self, Event},
    virtio::{hdr::GsoType, HdrFlags, VirtioNetHdr},
    wire::{
        emit::{self as frames, ETH_LEN},
        icmpv4, icmpv6, ipv4,
    },
};

use super::{
    neigh::Lookup,
    state::{Inner, Proto},
};
use crate::{net::TxQueue, Error, QueueError, Result};

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
            frames::TSO_MAX_PAYLOAD
        } else {
            e.conn.send_mss()
        };
        let Some(seg) = e.conn.poll_transmit(now, max) else {
            break;
        };
        let (local, remote) = (e.local, e.remote);
        let buf = &mut p.buf;
        let ident = inner.ip_ident.fetch_add(1, Ordering::Relaxed);
        let Some(hdr) =
            frames::tcp_segment(buf, inner.mac, local, remote, &seg, ident, inner.csum_tx)
        else {
            inner.counters.rx_malformed.fetch_add(1, Ordering::Relaxed);
            continue;
        };
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

pub(crate) fn post(inner: &Inner, tx: &mut TxQueue, hdr: &VirtioNetHdr, frame: &[u8]) {
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
    match (ip, inner.cfg.ipv4, inner.cfg.ipv6) {
        (IpAddr::V4(t), Some((me, _)), _) => frames::arp_request(&mut buf, inner.mac, me, t),
        (IpAddr::V6(t), _, Some((me, _))) => frames::neighbor_solicit(&mut buf, inner.mac, me, t),
        _ => return,
    }
    post(inner, tx, &VirtioNetHdr::default(), &buf);
}

/// Sends an echo request (for `Stack::ping`).
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
            frames::icmpv4_append(
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
            frames::icmpv6_append(&mut buf, s, d, &r, 64);
        }
        _ => return Err(Error::NoAddress(dst)),
    }
    with_tx(inner, 0, |tx| {
        send_ip(inner, tx, dst, VirtioNetHdr::default(), &mut buf)
    })
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
