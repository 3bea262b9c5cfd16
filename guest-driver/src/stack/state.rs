//! Middle: the state every layer above works on. The stack-wide core
//! ([`Inner`]: settings, shards, listener and UDP tables, neighbours,
//! counters) and each shard's connection table ([`Proto`]), with the
//! queues that hand connections and datagrams up to sockets.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering},
        Arc, Condvar, Mutex,
    },
    time::Instant,
};

use vmm_sys_util::eventfd::EventFd;
use vnic_protocol::{
    frag::{self, Reassembler},
    rss::{HashInput, HashReport, Toeplitz},
    tcp::{self, Connection},
    virtio::VirtioNetHdr,
    wire::ethernet::Address,
};

use super::{config::StackConfig, neigh, toe::ToeCore, wait::WaitQueue};
use crate::net::{QueuePair, RxQueue, TxQueue, VirtioNet};

/// Established connections waiting for accept(): (id, slot); accept()
/// finds the shard by id.
pub(crate) type ListenQueue = WaitQueue<(u64, usize)>;

/// Datagrams received for a bound port: (from, payload).
pub(crate) type UdpQueue = WaitQueue<(SocketAddr, Vec<u8>)>;

/// Stack-wide counters.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub rx_frames: AtomicU64,
    pub tx_frames: AtomicU64,
    /// Received frames dropped: bad checksum.
    pub rx_bad_checksum: AtomicU64,
    /// Received frames dropped: malformed or unsupported.
    pub rx_malformed: AtomicU64,
    /// Received frames not for this host (address, protocol, port).
    pub rx_not_ours: AtomicU64,
    /// Frames that arrived on another shard's queue and were handed over.
    pub rx_handed_over: AtomicU64,
    /// Frames for another shard dropped: its inbox was full.
    pub rx_inbox_full: AtomicU64,
    /// Frames not sent: the TX ring was full.
    pub tx_ring_full: AtomicU64,
    /// Frames not sent: no route (no address of that family).
    pub tx_no_route: AtomicU64,
    pub tcp_rst_sent: AtomicU64,
    /// Connections reset because the listener's backlog was full.
    pub tcp_backlog_full: AtomicU64,
    pub echo_replied: AtomicU64,
    pub udp_dropped: AtomicU64,
    /// Datagrams longer than the MTU sent as fragments, and the fragments.
    pub tx_fragmented: AtomicU64,
    pub tx_fragments: AtomicU64,
    /// Datagrams longer than the MTU dropped: they could not be cut.
    pub tx_unfragmentable: AtomicU64,
}

/// An echo reply: sequence number, from, when.
pub(crate) type EchoSeen = (u16, IpAddr, Instant);

/// The hash function of the device's RSS as the stack set it.
#[derive(Debug)]
pub(crate) struct RssView {
    pub(crate) toeplitz: Toeplitz,
    pub(crate) table: Vec<u16>,
}

/// What every shard and socket shares: the device's settings, the
/// shards, the tables of listeners and UDP ports, neighbours, counters.
pub(crate) struct Inner {
    pub(crate) cfg: StackConfig,
    pub(crate) mac: Address,
    pub(crate) mtu: usize,
    pub(crate) tso4: bool,
    pub(crate) tso6: bool,
    pub(crate) csum_tx: bool,
    pub(crate) csum_rx: bool,
    pub(crate) shards: Vec<Shard>,
    pub(crate) neigh: Mutex<neigh::Neighbours>,
    pub(crate) listeners: Mutex<HashMap<u16, Arc<ListenQueue>>>,
    pub(crate) udp: Mutex<HashMap<u16, Arc<UdpQueue>>>,
    pub(crate) echo: Mutex<HashMap<u16, Vec<EchoSeen>>>,
    pub(crate) echo_cond: Condvar,
    /// Bumped on every socket event; `Stack::poll` waits on it.
    pub(crate) events: Mutex<u64>,
    pub(crate) events_cond: Condvar,
    pub(crate) rss: Option<RssView>,
    pub(crate) epoch: Instant,
    pub(crate) stop: AtomicBool,
    pub(crate) counters: Counters,
    pub(crate) shard_rx: Vec<AtomicU64>,
    pub(crate) dev: Mutex<VirtioNet>,
    pub(crate) next_port: AtomicU16,
    pub(crate) next_conn: AtomicU64,
    /// The shard the next connection opened here goes to (round robin).
    pub(crate) next_shard: AtomicUsize,
    pub(crate) ip_ident: AtomicU16,
    /// IPv6 fragment identification.
    pub(crate) frag_ident: AtomicU32,
    /// The device's TOE, when the stack uses it for TCP.
    pub(crate) toe: Option<Arc<ToeCore>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("mac", &self.mac)
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

/// The ports a connecting socket picks from (RFC 6335).
pub(crate) const EPHEMERAL: std::ops::RangeInclusive<u16> = 49152..=65535;

impl Inner {
    pub(crate) fn now(&self) -> tcp::Instant {
        tcp::Instant(self.epoch.elapsed().as_micros() as u64)
    }

    /// The shard that owns a flow: the queue the device steers its
    /// incoming packets to (remote is the source there).
    pub(crate) fn owner(&self, local: SocketAddr, remote: SocketAddr) -> usize {
        let n = self.shards.len();
        if n <= 1 {
            return 0;
        }
        match &self.rss {
            Some(r) => {
                let input = HashInput::new(
                    remote.ip(),
                    local.ip(),
                    Some((remote.port(), local.port())),
                    HashReport::None,
                );
                let h = r.toeplitz.hash(input.as_bytes());
                let q = r
                    .table
                    .get(h as usize & (r.table.len() - 1))
                    .copied()
                    .unwrap_or(0);
                usize::from(q) % n
            }
            None => {
                let x = u64::from(local.port()) << 16 | u64::from(remote.port());
                (x.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) as usize % n
            }
        }
    }

    pub(crate) fn local_ip(&self, remote: IpAddr) -> Option<IpAddr> {
        match remote {
            IpAddr::V4(_) => self.cfg.ipv4.map(|(a, _)| IpAddr::V4(a)),
            IpAddr::V6(_) => self.cfg.ipv6.map(|(a, _)| IpAddr::V6(a)),
        }
    }

    pub(crate) fn is_local(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.cfg.ipv4.is_some_and(|(x, _)| x == a),
            IpAddr::V6(a) => self.cfg.ipv6.is_some_and(|(x, _)| x == a),
        }
    }

    pub(crate) fn iss(&self, local: SocketAddr, remote: SocketAddr) -> u32 {
        // RFC 6528 in spirit: a clock plus a per-flow scramble.
        let t = (self.epoch.elapsed().as_micros() / 4) as u32;
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in format!("{local}{remote}").bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        t.wrapping_add(h as u32)
            .wrapping_add(self.next_conn.fetch_add(1, Ordering::Relaxed) as u32 * 64_000)
    }

    /// The count of socket events so far.
    pub(crate) fn event_gen(&self) -> u64 {
        self.events.lock().map(|g| *g).unwrap_or(0)
    }

    /// Sleeps until a socket event after `seen` or `slice` passed.
    pub(crate) fn wait_event(&self, seen: u64, slice: std::time::Duration) {
        if let Ok(g) = self.events.lock() {
            if *g == seen {
                let _ = self.events_cond.wait_timeout(g, slice);
            }
        }
    }

    pub(crate) fn notify(&self) {
        if let Ok(mut g) = self.events.lock() {
            *g = g.wrapping_add(1);
        }
        self.events_cond.notify_all();
    }
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
    pub call: EventFd,
    /// The TX interrupt, armed while the TX ring is full.
    pub tx_call: EventFd,
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

/// A random number from the kernel (0 if it has none to give).
pub(crate) fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n == 4 {
        u32::from_ne_bytes(b)
    } else {
        0
    }
}
