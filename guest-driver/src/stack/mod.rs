//! A small TCP/IP stack over [`VirtioNet`]: ARP, IPv4, IPv6 with
//! neighbour discovery, ICMP/ICMPv6 echo, UDP and TCP sockets on the
//! sans-IO engine in `vnic_protocol::tcp`.
//!
//! One shard per queue pair, each a thread that owns the pair's RX half
//! and shares its TX half with application threads under the shard lock.
//! A TCP or UDP flow belongs to the shard the device's RSS picks for its
//! incoming packets: the stack programs the RSS key and table itself and
//! picks ephemeral ports whose hash lands on the connecting shard, so a
//! flow stays on one queue and one thread. Frames that arrive elsewhere
//! (no RSS) are handed to the owner's inbox and counted.
//!
//! Offloads: TCP segments up to 64 KiB go to the device with a GSO header
//! (TSO) and partial checksums (NEEDS_CSUM); received frames marked
//! DATA_VALID or NEEDS_CSUM are not checked again, and coalesced (GRO'd)
//! receives are taken whole. Without the features the stack cuts at the
//! MSS and computes every checksum itself.
//!
//! Layers, each using only those below it:
//! - leaves: [`StackConfig`], `wait` (queues sockets wait on), `poll`
//!   (readiness), [`neigh`] (the neighbour cache), and frames built
//!   with `vnic_protocol::wire::emit`;
//! - middle: `state` (the shared core and each shard's connection
//!   table), `output` (segments, IP with neighbour resolution,
//!   fragmentation), `input` (demultiplexing, reassembly);
//! - top: `shard` (a queue pair's thread), [`socket`] (sockets over a
//!   provider: the stack's own TCP today), and [`Stack`] here.

mod config;
mod input;
pub mod neigh;
mod output;
mod poll;
mod shard;
pub mod socket;
mod state;
mod toe;
mod wait;

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering},
        Arc, Condvar, Mutex, MutexGuard,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vnic_protocol::{
    frag,
    rss::{HashTypes, Toeplitz, DEFAULT_KEY},
    virtio::{
        ctrl::{Coal, CtrlCommand, RssConfig, ACK_OK},
        Features,
    },
    wire::{ethernet::Address, icmpv6::solicited_node},
};

pub use config::StackConfig;
pub use poll::{Interest, PollEntry, Pollable, Readiness};
pub use socket::{TcpListener, TcpStream, UdpSocket};

use crate::{net::VirtioNet, Error, Result};
use state::{random_u32, Counters, Inner, RssView, Shard, EPHEMERAL};

/// A snapshot of [`Counters`] and the neighbour cache's numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StackStats {
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub rx_bad_checksum: u64,
    pub rx_malformed: u64,
    pub rx_not_ours: u64,
    pub rx_handed_over: u64,
    pub rx_inbox_full: u64,
    pub tx_ring_full: u64,
    pub tx_no_route: u64,
    pub tcp_rst_sent: u64,
    pub tcp_backlog_full: u64,
    pub echo_replied: u64,
    pub udp_dropped: u64,
    pub tx_fragmented: u64,
    pub tx_fragments: u64,
    pub tx_unfragmentable: u64,
    /// The shards' reassemblers, summed: their counters, and the bytes
    /// they hold now.
    pub reassembly: frag::Stats,
    pub reassembly_memory: u64,
    pub neigh_requests: u64,
    pub neigh_dropped: u64,
    /// Per shard: frames received on its queue.
    pub shard_rx: [u64; 16],
    /// Connections opened and accepted on the device's TOE, and those
    /// that went to the stack's own TCP because the TOE had no room.
    pub toe_connects: u64,
    pub toe_accepts: u64,
    pub toe_fallbacks: u64,
    /// SEND and RECVD commands the device refused (a driver's mistake).
    pub toe_refused: u64,
}

/// A running stack.
#[derive(Debug)]
pub struct Stack {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Stack {
    /// Takes over `dev`: programs queue pairs, RSS and the receive filter
    /// through the control queue when the device has one, and starts one
    /// thread per queue pair.
    pub fn start(mut dev: VirtioNet, cfg: StackConfig) -> Result<Stack> {
        let dc = dev.config()?;
        let f = dev.features;
        let mac = dc.mac;
        let mtu = if f.contains(Features::MTU) && dc.mtu >= 1280 {
            usize::from(dc.mtu)
        } else {
            1500
        };
        let pairs = dev.pairs();
        let mut control = Control { dev: &mut dev };
        if f.contains(Features::CTRL_VQ) && f.contains(Features::MQ) {
            control.set_queue_pairs(pairs as u16)?;
        }
        let rss = if cfg.rss && pairs > 1 && f.contains(Features::RSS) {
            let table: Vec<u16> = (0..128).map(|i| (i % pairs) as u16).collect();
            control.set_rss(&DEFAULT_KEY, &table, HashTypes::LINUX_DEFAULT)?;
            Some(RssView {
                toeplitz: Toeplitz::new(&DEFAULT_KEY)?,
                table,
            })
        } else {
            None
        };
        if f.contains(Features::CTRL_RX) {
            let mut multicast = vec![Address([0x33, 0x33, 0, 0, 0, 1])];
            if let Some((a, _)) = cfg.ipv6 {
                let o = solicited_node(a).octets();
                multicast.push(Address([0x33, 0x33, o[12], o[13], o[14], o[15]]));
            }
            control.set_mac_filter(Vec::new(), multicast)?;
        }
        let qps = dev.take_pairs();
        let toe = match dev.take_toe()? {
            Some(q) if cfg.toe => {
                let v4 = cfg.ipv4.map(|(a, p)| (IpAddr::V4(a), p));
                let v6 = cfg.ipv6.map(|(a, p)| (IpAddr::V6(a), p));
                Some(Arc::new(toe::ToeCore::start(q, v4, v6)?))
            }
            _ => None,
        };
        let csum = cfg.csum && f.contains(Features::CSUM);
        let mut shards = Vec::with_capacity(qps.len());
        let n = qps.len().max(1);
        let share = frag::Limits {
            max_memory: cfg.reassembly.max_memory / n,
            max_datagrams: (cfg.reassembly.max_datagrams / n).max(1),
            ..cfg.reassembly
        };
        for qp in qps {
            shards.push(Shard::new(qp, EventFd::new(EFD_NONBLOCK)?, share));
        }
        let inner = Arc::new(Inner {
            cfg,
            mac,
            mtu,
            tso4: cfg.tso && csum && f.contains(Features::HOST_TSO4),
            tso6: cfg.tso && csum && f.contains(Features::HOST_TSO6),
            csum_tx: csum,
            csum_rx: cfg.csum && f.contains(Features::GUEST_CSUM),
            shard_rx: (0..shards.len()).map(|_| AtomicU64::new(0)).collect(),
            shards,
            neigh: Mutex::new(neigh::Neighbours::default()),
            listeners: Mutex::new(HashMap::new()),
            udp: Mutex::new(HashMap::new()),
            echo: Mutex::new(HashMap::new()),
            echo_cond: Condvar::new(),
            events: Mutex::new(0),
            events_cond: Condvar::new(),
            rss,
            epoch: Instant::now(),
            stop: AtomicBool::new(false),
            counters: Counters::default(),
            dev: Mutex::new(dev),
            next_port: AtomicU16::new(*EPHEMERAL.start()),
            next_conn: AtomicU64::new(0),
            next_shard: AtomicUsize::new(0),
            ip_ident: AtomicU16::new(1),
            // Unpredictable identifications (RFC 7739): a random start.
            frag_ident: AtomicU32::new(random_u32()),
            toe,
        });
        let mut threads = Vec::new();
        if let Some(core) = inner.toe.clone() {
            let inn = inner.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("vnic-toe".into())
                    .spawn(move || core.run(&|| inn.notify()))?,
            );
        }
        for i in 0..inner.shards.len() {
            let inn = inner.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("vnic-shard{i}"))
                    .spawn(move || shard::run(&inn, i))?,
            );
        }
        Ok(Stack {
            inner,
            threads: Mutex::new(threads),
        })
    }

    pub fn mac(&self) -> Address {
        self.inner.mac
    }

    pub fn mtu(&self) -> usize {
        self.inner.mtu
    }

    pub fn shards(&self) -> usize {
        self.inner.shards.len()
    }

    /// Whether TSO and checksum offload are in use (v4 TSO, TX csum, RX csum).
    pub fn offloads(&self) -> (bool, bool, bool) {
        (self.inner.tso4, self.inner.csum_tx, self.inner.csum_rx)
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// The control queue, for commands beyond what the stack set up.
    pub fn control(&self) -> Result<ControlGuard<'_>> {
        let g = self
            .inner
            .dev
            .lock()
            .map_err(|_| Error::Poisoned("device"))?;
        Ok(ControlGuard { g })
    }

    pub fn stats(&self) -> StackStats {
        let c = &self.inner.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (nr, nd) = self
            .inner
            .neigh
            .lock()
            .map(|n| (n.requests, n.dropped))
            .unwrap_or((0, 0));
        let toe = self.inner.toe.as_ref().map(|t| &t.counters);
        let mut shard_rx = [0u64; 16];
        for (s, a) in shard_rx.iter_mut().zip(&self.inner.shard_rx) {
            *s = l(a);
        }
        let (mut reassembly, mut reassembly_memory) = (frag::Stats::default(), 0u64);
        for sh in &self.inner.shards {
            if let Ok(st) = sh.st.lock() {
                reassembly += st.p.frag.stats();
                reassembly_memory += st.p.frag.memory() as u64;
            }
        }
        StackStats {
            rx_frames: l(&c.rx_frames),
            tx_frames: l(&c.tx_frames),
            rx_bad_checksum: l(&c.rx_bad_checksum),
            rx_malformed: l(&c.rx_malformed),
            rx_not_ours: l(&c.rx_not_ours),
            rx_handed_over: l(&c.rx_handed_over),
            rx_inbox_full: l(&c.rx_inbox_full),
            tx_ring_full: l(&c.tx_ring_full),
            tx_no_route: l(&c.tx_no_route),
            tcp_rst_sent: l(&c.tcp_rst_sent),
            tcp_backlog_full: l(&c.tcp_backlog_full),
            echo_replied: l(&c.echo_replied),
            udp_dropped: l(&c.udp_dropped),
            tx_fragmented: l(&c.tx_fragmented),
            tx_fragments: l(&c.tx_fragments),
            tx_unfragmentable: l(&c.tx_unfragmentable),
            reassembly,
            reassembly_memory,
            neigh_requests: nr,
            neigh_dropped: nd,
            shard_rx,
            toe_connects: toe.map_or(0, |t| l(&t.connects)),
            toe_accepts: toe.map_or(0, |t| l(&t.accepts)),
            toe_fallbacks: toe.map_or(0, |t| l(&t.fallbacks)),
            toe_refused: self.inner.toe.as_ref().map_or(0, |t| t.failed()),
        }
    }

    /// Sends an ICMP or ICMPv6 echo request and waits for the reply;
    /// returns the round-trip time, or None on timeout.
    pub fn ping(
        &self,
        dst: IpAddr,
        ident: u16,
        seq_no: u16,
        size: usize,
        timeout: Duration,
    ) -> Result<Option<Duration>> {
        let inner = &self.inner;
        // The IP length field bounds the echo: 65535 less the IPv4 header
        // and the ICMP header, or the IPv6 payload less the ICMPv6 header.
        let max = if dst.is_ipv6() {
            65535 - 8
        } else {
            65535 - 20 - 8
        };
        if size > max {
            return Err(Error::Argument(format!(
                "an echo of {size} bytes does not fit an IP packet (at most {max})"
            )));
        }
        let payload: Vec<u8> = (0..size).map(|i| i as u8).collect();
        let sent = Instant::now();
        output::send_echo(inner, dst, ident, seq_no, &payload)?;
        let deadline = sent + timeout;
        let mut g = inner.echo.lock().map_err(|_| Error::Poisoned("echo"))?;
        loop {
            if let Some(v) = g.get_mut(&ident) {
                if let Some(i) = v
                    .iter()
                    .position(|&(s, from, _)| s == seq_no && from == dst)
                {
                    let (_, _, at) = v.remove(i);
                    return Ok(Some(at.duration_since(sent)));
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            g = inner
                .echo_cond
                .wait_timeout(g, deadline - now)
                .map_err(|_| Error::Poisoned("echo"))?
                .0;
        }
    }

    /// Waits until one of `entries` is ready for what it asks or
    /// `timeout` passes; fills in each entry's readiness and returns how
    /// many are ready (poll(2) for stack sockets).
    pub fn poll(&self, entries: &mut [PollEntry<'_>], timeout: Option<Duration>) -> usize {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let gen = self.inner.event_gen();
            let mut ready = 0;
            for e in entries.iter_mut() {
                e.ready = e.socket.readiness();
                if e.ready.matches(e.interest) {
                    ready += 1;
                }
            }
            if ready > 0 {
                return ready;
            }
            let Some(wait) = wait::wait_slice(deadline) else {
                return 0;
            };
            self.inner.wait_event(gen, wait);
        }
    }

    /// Stops the shard threads (sockets fail from then on).
    pub fn shutdown(&self) {
        self.inner.stop.store(true, Ordering::Relaxed);
        if let Some(t) = &self.inner.toe {
            t.stop();
        }
        for s in &self.inner.shards {
            let _ = s.wake.write(1);
        }
        if let Ok(mut t) = self.threads.lock() {
            for h in t.drain(..) {
                let _ = h.join();
            }
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The control queue, locked.
#[derive(Debug)]
pub struct ControlGuard<'a> {
    g: MutexGuard<'a, VirtioNet>,
}

impl ControlGuard<'_> {
    pub fn control(&mut self) -> Control<'_> {
        Control { dev: &mut self.g }
    }
}

/// Control-queue commands the driver sends (virtio 1.3, 5.1.6.5). Each
/// fails with a clear error when the device lacks the feature or says
/// ACK_ERR.
#[derive(Debug)]
pub struct Control<'a> {
    dev: &'a mut VirtioNet,
}

impl Control<'_> {
    fn need(&self, f: Features, what: &'static str) -> Result<()> {
        if self.dev.features.contains(f) {
            Ok(())
        } else {
            Err(Error::Negotiation(format!("device does not offer {what}")))
        }
    }

    fn run(&mut self, cmd: &CtrlCommand) -> Result<Vec<u8>> {
        let (ack, answer) = self.dev.ctrl(cmd)?;
        if ack != ACK_OK {
            return Err(Error::Negotiation(format!("device refused {cmd:?}")));
        }
        Ok(answer)
    }

    pub fn set_queue_pairs(&mut self, n: u16) -> Result<()> {
        self.need(Features::MQ, "MQ")?;
        self.run(&CtrlCommand::VqPairsSet(n)).map(drop)
    }

    pub fn set_rss(&mut self, key: &[u8], table: &[u16], types: HashTypes) -> Result<()> {
        self.need(Features::RSS, "RSS")?;
        let max_tx = table.iter().copied().max().unwrap_or(0) + 1;
        self.run(&CtrlCommand::RssConfig(RssConfig {
            hash_types: types.bits(),
            indirection_table: table.to_vec(),
            unclassified_queue: 0,
            max_tx_vq: max_tx,
            key: key.to_vec(),
        }))
        .map(drop)
    }

    pub fn set_rx_coalescing(&mut self, max_packets: u32, max_usecs: u32) -> Result<()> {
        self.need(Features::NOTF_COAL, "NOTF_COAL")?;
        self.run(&CtrlCommand::CoalRxSet(Coal {
            max_packets,
            max_usecs,
        }))
        .map(drop)
    }

    pub fn set_tx_coalescing(&mut self, max_packets: u32, max_usecs: u32) -> Result<()> {
        self.need(Features::NOTF_COAL, "NOTF_COAL")?;
        self.run(&CtrlCommand::CoalTxSet(Coal {
            max_packets,
            max_usecs,
        }))
        .map(drop)
    }

    /// One virtqueue's parameters (2i: RX of pair i, 2i+1: its TX).
    pub fn set_vq_coalescing(&mut self, vq: u16, max_packets: u32, max_usecs: u32) -> Result<()> {
        self.need(Features::VQ_NOTF_COAL, "VQ_NOTF_COAL")?;
        self.run(&CtrlCommand::CoalVqSet {
            vq_index: vq,
            coal: Coal {
                max_packets,
                max_usecs,
            },
        })
        .map(drop)
    }

    /// The parameters the device holds for one virtqueue: (max_packets,
    /// max_usecs).
    pub fn vq_coalescing(&mut self, vq: u16) -> Result<(u32, u32)> {
        self.need(Features::VQ_NOTF_COAL, "VQ_NOTF_COAL")?;
        let answer = self.run(&CtrlCommand::CoalVqGet { vq_index: vq })?;
        let c = Coal::from_bytes(&answer)
            .ok_or_else(|| Error::Negotiation(format!("short VQ_GET answer for {vq}")))?;
        Ok((c.max_packets, c.max_usecs))
    }

    pub fn set_mac_filter(&mut self, unicast: Vec<Address>, multicast: Vec<Address>) -> Result<()> {
        self.need(Features::CTRL_RX, "CTRL_RX")?;
        self.run(&CtrlCommand::MacTableSet { unicast, multicast })
            .map(drop)
    }

    pub fn vlan_add(&mut self, vid: u16) -> Result<()> {
        self.need(Features::CTRL_VLAN, "CTRL_VLAN")?;
        self.run(&CtrlCommand::VlanAdd(vid)).map(drop)
    }

    pub fn vlan_del(&mut self, vid: u16) -> Result<()> {
        self.need(Features::CTRL_VLAN, "CTRL_VLAN")?;
        self.run(&CtrlCommand::VlanDel(vid)).map(drop)
    }
}
