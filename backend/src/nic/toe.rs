//! The TOE: TCP connections the device runs for its driver, in the wire
//! format of `vnic_protocol::toe`.
//!
//! Sans-IO. Commands, received frames and time go in; frames to send,
//! events for the driver and the bytes of the driver's payload rings come
//! out, the rings through [`RingMemory`]. Connections run on
//! `vnic_protocol::tcp`, frames are built with `vnic_protocol::wire::emit`.
//!
//! Bounds: connections (accepted or waiting for ACCEPT) and listeners are
//! at most the table size HELLO granted; each listener holds at most its
//! backlog of connections waiting; the event queue holds at most five
//! events per connection and one per waiting one (DATA and SENT are
//! merged: one queued event carries the newest offset when taken); frames
//! waiting for a neighbour are at most [`HELD_PER_NEIGHBOUR`] per next hop.
//! Past any of these the work is refused and counted.
//!
//! A port runs one engine per RX queue (`vhost/toe.rs` routes commands
//! and frames to them); the engines share a [`ToeTable`], so the bound on
//! connections is the port's, and a waiting connection's handle names its
//! engine ([`engine_of_handle`]).
//!
//! Not yet: TIME-WAIT after the driver closed (the flow is forgotten once
//! CLOSED is taken), and zero-copy transmit (a byte goes from the TX ring
//! into the engine's buffer, and leaves from there in a vectored write).

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
};

use vnic_protocol::{
    frag::{self, Outcome, Reassembler},
    tcp::{self, Connection, State},
    toe::{
        spans, CloseReason, Command, Completion, Event, Family, RingSpec, SockOpt, Status, VERSION,
    },
    virtio::VirtioNetHdr,
    wire::{
        arp,
        emit::{self, ETH_LEN},
        ethernet::{ethertype, Address},
        icmpv6, ip_proto, ipv4, ipv6, tcp as wtcp,
    },
};

/// Frames kept per next hop while its link address is asked for.
pub const HELD_PER_NEIGHBOUR: usize = 16;
/// Bytes moved between a ring and the engine per step.
const CHUNK: usize = 64 << 10;
/// Engine buffers of a connection waiting for ACCEPT, and at most of an
/// open one (whose rings may be larger): the device's memory per
/// connection stays within twice this.
const PENDING_BUFFER: u32 = 256 << 10;
const MAX_BUFFER: u32 = 1 << 20;
/// Ports the device picks for CONNECT without a local port.
const EPHEMERAL: std::ops::RangeInclusive<u16> = 49152..=65535;

/// Every ephemeral port once, in the order CONNECT tries them: from
/// `first` on (the start of the range when `first` is outside it),
/// wrapping round.
pub fn ephemeral_from(first: u16) -> impl Iterator<Item = u16> {
    let (lo, hi) = (*EPHEMERAL.start(), *EPHEMERAL.end());
    let span = u32::from(hi - lo) + 1;
    let at = u32::from(first.clamp(lo, hi) - lo);
    (0..span).map(move |k| lo + ((at + k) % span) as u16)
}

/// The ephemeral port a search goes on from after taking `p`.
pub fn ephemeral_after(p: u16) -> u16 {
    p.checked_add(1)
        .filter(|n| EPHEMERAL.contains(n))
        .unwrap_or(*EPHEMERAL.start())
}

/// The driver's memory, where the payload rings live.
pub trait RingMemory {
    /// Whether `len` bytes from `addr` are all driver memory.
    fn contains(&self, addr: u64, len: u64) -> bool;
    /// Reads `buf.len()` bytes at `addr`; false when they are not there.
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool;
    /// Writes `data` at `addr`; false when the memory is not there.
    fn write(&self, addr: u64, data: &[u8]) -> bool;
}

/// Where a data segment goes when it can go as it is: its virtio-net
/// header, its headers (Ethernet to TCP), then its payload in two pieces
/// straight from the connection's buffer, to be written without copying
/// it (a vectored write).
pub type SendPieces<'a> = dyn FnMut(&VirtioNetHdr, &[u8], [&[u8]; 2]) + 'a;

/// How a port's TOE is set up.
#[derive(Debug, Clone, Copy)]
pub struct ToeConfig {
    pub mac: Address,
    pub mtu: usize,
    /// Connections (and listeners) a driver may have at most.
    pub max_conns: u32,
    /// Leave checksums (and segmentation of super-segments) to the
    /// port's transmit path, which completes them for destinations that
    /// cannot.
    pub offload: bool,
    pub tcp: tcp::Config,
    /// Limits of the reassembly of TCP datagrams sent in IP fragments.
    pub reassembly: frag::Limits,
}

/// What the TOE counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ToeStats {
    pub commands: u64,
    /// Commands answered with an error status.
    pub commands_refused: u64,
    /// CONNECTs refused because the table was full.
    pub table_full: u64,
    pub connects: u64,
    pub accepts: u64,
    /// SYNs to a listener dropped: its backlog or the table was full.
    pub syn_dropped: u64,
    /// Connections that ended (CLOSED events).
    pub closed: u64,
    /// Connections failed because a ring could not be read or written.
    pub ring_faults: u64,
    pub segments_in: u64,
    /// TCP segments for the TOE dropped: bad checksum or malformed.
    pub segments_bad: u64,
    pub frames_out: u64,
    /// Frames dropped while waiting for a neighbour (over the hold limit).
    pub neighbour_drops: u64,
    /// TCP datagrams put together from IP fragments, and fragments the
    /// reassembler dropped (malformed, overlapping, over its limits,
    /// timed out).
    pub reassembled: u64,
    pub fragments_dropped: u64,
}

/// An open connection of the driver's.
#[derive(Debug)]
struct Conn {
    tcp: Connection,
    local: SocketAddr,
    remote: SocketAddr,
    rx: RingSpec,
    tx: RingSpec,
    /// The TX ring's tail as the driver last set it, and how far its bytes
    /// have gone into the engine.
    tx_tail: u32,
    tx_pulled: u32,
    /// The acknowledged offset last reported.
    tx_acked: u32,
    /// The RX ring's tail (written up to) and head (the driver consumed).
    rx_tail: u32,
    rx_head: u32,
    /// The driver asked for FIN (SHUTDOWN or CLOSE); given to the engine
    /// once every byte of the ring is in it.
    fin_asked: bool,
    fin_given: bool,
    /// The driver closed: what arrives is dropped, no DATA follows.
    closing: bool,
    peer_closed_told: bool,
    /// A DATA or SENT event is queued (it takes the newest offset).
    data_queued: bool,
    sent_queued: bool,
    /// CLOSED is queued: the id is freed when it is taken.
    closed_queued: bool,
    reason: Option<CloseReason>,
    was_connected: bool,
}

/// A connection to a listener, before the driver accepts it.
#[derive(Debug)]
struct Pending {
    tcp: Connection,
    local: SocketAddr,
    remote: SocketAddr,
    listener: u32,
    announced: bool,
}

#[derive(Debug)]
struct Listener {
    port: u16,
    family: Family,
    backlog: usize,
    waiting: usize,
}

/// Where a flow's segments go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Conn(u32),
    Pending(u32),
}

/// One local address.
#[derive(Debug, Clone, Copy)]
struct Iface {
    addr: IpAddr,
    prefix: u8,
    gateway: Option<IpAddr>,
}

impl Iface {
    /// The next hop toward `dst`: itself on the link, else the gateway.
    fn next_hop(&self, dst: IpAddr) -> IpAddr {
        let on_link = match (self.addr, dst) {
            (IpAddr::V4(a), IpAddr::V4(d)) => {
                let m = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(a) & m == u32::from(d) & m
            }
            (IpAddr::V6(a), IpAddr::V6(d)) => {
                let m = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(a) & m == u128::from(d) & m
            }
            _ => false,
        };
        if on_link {
            dst
        } else {
            self.gateway.unwrap_or(dst)
        }
    }
}

/// Frames waiting for a next hop's link address.
#[derive(Debug, Default)]
struct Held {
    frames: Vec<(VirtioNetHdr, Vec<u8>)>,
}

/// The connection table a port's engines share: every connection open
/// or waiting for ACCEPT on any of them counts against the size HELLO
/// granted. An engine takes a slot before it makes a connection and gives
/// it back when the connection is forgotten, so the bound holds however
/// the engines' threads interleave.
#[derive(Debug, Default)]
pub struct ToeTable {
    live: AtomicU32,
}

impl ToeTable {
    /// Connections open or waiting for ACCEPT on all the engines.
    pub fn connections(&self) -> u32 {
        self.live.load(Ordering::Relaxed)
    }
}

/// Handles of waiting connections carry their engine in the low bits.
const HANDLE_ENGINE_BITS: u32 = 8;

/// The engine that made waiting connection `handle` (an INCOMING's).
pub fn engine_of_handle(handle: u32) -> usize {
    (handle & ((1 << HANDLE_ENGINE_BITS) - 1)) as usize
}

/// A port's TOE engine: one per RX queue, each owning the connections RSS
/// steers to its queue (one alone in the unit tests).
#[derive(Debug)]
pub struct Toe {
    cfg: ToeConfig,
    /// This engine's number among the port's, in its handles.
    index: u8,
    table: Arc<ToeTable>,
    /// Slots of `table` this engine holds.
    live: u32,
    /// The table size HELLO granted; None before HELLO.
    granted: Option<u32>,
    v4: Option<Iface>,
    v6: Option<Iface>,
    /// By connection id, as many as HELLO granted (boxed: every engine
    /// of a port has the whole table's slots).
    conns: Vec<Option<Box<Conn>>>,
    pending: HashMap<u32, Pending>,
    next_handle: u32,
    listeners: HashMap<u32, Listener>,
    /// Listening port -> listener id.
    ports: HashMap<u16, u32>,
    flows: HashMap<(SocketAddr, SocketAddr), Key>,
    /// Flows with work to do since the last `transmit`.
    touched: Vec<Key>,
    neigh: HashMap<IpAddr, Address>,
    held: HashMap<IpAddr, Held>,
    events: VecDeque<Event>,
    next_port: u16,
    iss_seed: u32,
    /// Frames made outside `transmit` (resets to strays), sent by the
    /// next one.
    outbox: Vec<(IpAddr, VirtioNetHdr, Vec<u8>)>,
    scratch: Vec<u8>,
    frame: Vec<u8>,
    stats: ToeStats,
    /// IP fragments of TCP datagrams to the TOE's addresses.
    frag: Reassembler,
    /// The reassembler's counts already added to `stats`.
    frag_seen: frag::Stats,
    /// A datagram reassembled here that no TOE flow owns: the driver's
    /// (see [`Toe::take_whole`]).
    whole: Option<Vec<u8>>,
}

/// Frames kept for the next `transmit` at most.
const OUTBOX: usize = 256;

impl ToeStats {
    /// Each counter with its name, as `vnicd ctl stats` shows it.
    pub fn fields(&self) -> [(&'static str, u64); 14] {
        [
            ("commands", self.commands),
            ("commands_refused", self.commands_refused),
            ("table_full", self.table_full),
            ("connects", self.connects),
            ("accepts", self.accepts),
            ("syn_dropped", self.syn_dropped),
            ("closed", self.closed),
            ("ring_faults", self.ring_faults),
            ("segments_in", self.segments_in),
            ("segments_bad", self.segments_bad),
            ("frames_out", self.frames_out),
            ("neighbour_drops", self.neighbour_drops),
            ("reassembled", self.reassembled),
            ("fragments_dropped", self.fragments_dropped),
        ]
    }
}

impl Toe {
    /// A port's only engine.
    pub fn new(cfg: ToeConfig) -> Toe {
        Toe::engine(cfg, 0, Arc::new(ToeTable::default()))
    }

    /// Engine `index` of a port whose engines share `table`.
    pub fn engine(cfg: ToeConfig, index: u8, table: Arc<ToeTable>) -> Toe {
        Toe {
            cfg,
            index,
            table,
            live: 0,
            granted: None,
            v4: None,
            v6: None,
            conns: Vec::new(),
            pending: HashMap::new(),
            next_handle: 1,
            listeners: HashMap::new(),
            ports: HashMap::new(),
            flows: HashMap::new(),
            touched: Vec::new(),
            neigh: HashMap::new(),
            held: HashMap::new(),
            events: VecDeque::new(),
            next_port: *EPHEMERAL.start(),
            iss_seed: 0x6d2b_79f5,
            outbox: Vec::new(),
            frag: Reassembler::new(cfg.reassembly),
            frag_seen: frag::Stats::default(),
            whole: None,
            scratch: vec![0; CHUNK],
            frame: Vec::with_capacity(2048),
            stats: ToeStats::default(),
        }
    }

    pub fn stats(&self) -> ToeStats {
        self.stats
    }

    /// The counts since the last call (for the port's counters, which
    /// outlive a frontend connection's engine).
    pub fn take_stats(&mut self) -> ToeStats {
        let s = self.stats;
        self.stats = ToeStats::default();
        s
    }

    /// Connections open or waiting for ACCEPT: the table slots this
    /// engine holds.
    pub fn connections(&self) -> usize {
        debug_assert_eq!(
            self.live as usize,
            self.conns.iter().flatten().count() + self.pending.len(),
            "table slots held and connections differ"
        );
        self.live as usize
    }

    /// The earliest engine deadline.
    pub fn poll_timeout(&self) -> Option<tcp::Instant> {
        let conns = self.conns.iter().flatten().map(|c| &c.tcp);
        conns
            .chain(self.pending.values().map(|p| &p.tcp))
            .filter_map(Connection::poll_timeout)
            .min()
    }

    /// The driver went away or reset the device: every connection is
    /// reset on the wire (send what `transmit` gives after this), and
    /// everything is forgotten.
    pub fn reset(&mut self, now: tcp::Instant, send: &mut dyn FnMut(&VirtioNetHdr, &[u8])) {
        for c in self.conns.iter_mut().flatten() {
            c.tcp.abort();
        }
        for p in self.pending.values_mut() {
            p.tcp.abort();
        }
        let keys: Vec<Key> = self.flows.values().copied().collect();
        for k in keys {
            self.send_segments(k, now, send, None);
        }
        self.start_over();
    }

    /// Forgets everything but the counts, and gives back its table slots.
    fn start_over(&mut self) {
        self.release(self.live);
        let mut fresh = Toe::engine(self.cfg, self.index, self.table.clone());
        fresh.stats = self.stats;
        *self = fresh;
    }

    /// Takes a slot of the shared table; false when it is full.
    fn admit(&mut self) -> bool {
        let limit = self.conns.len() as u32;
        let took = self
            .table
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok();
        if took {
            self.live += 1;
        } else {
            self.stats.table_full += 1;
        }
        took
    }

    fn release(&mut self, n: u32) {
        let n = n.min(self.live);
        self.live -= n;
        self.table.live.fetch_sub(n, Ordering::AcqRel);
    }

    // ----- commands -----

    /// Runs one command and says how it went.
    pub fn command(
        &mut self,
        cmd: &Command,
        now: tcp::Instant,
        mem: &dyn RingMemory,
    ) -> Completion {
        self.stats.commands += 1;
        let r = self.run(cmd, now, mem);
        if r.status != Status::Ok {
            self.stats.commands_refused += 1;
        }
        r
    }

    fn run(&mut self, cmd: &Command, now: tcp::Instant, mem: &dyn RingMemory) -> Completion {
        let granted = match (cmd, self.granted) {
            (Command::Hello { version, conns }, _) => {
                if *version != VERSION {
                    return Completion::err(Status::Invalid);
                }
                let n = (*conns).min(self.cfg.max_conns);
                self.start_over();
                self.granted = Some(n);
                self.conns.resize_with(n as usize, || None);
                return Completion::ok(n);
            }
            (_, None) => return Completion::err(Status::NotReady),
            (_, Some(n)) => n,
        };
        match *cmd {
            Command::Hello { .. } => Completion::err(Status::Invalid),
            Command::IfConfig {
                addr,
                prefix,
                gateway,
            } => {
                let i = Some(Iface {
                    addr,
                    prefix,
                    gateway,
                });
                if addr.is_ipv4() {
                    self.v4 = i;
                } else {
                    self.v6 = i;
                }
                Completion::ok(0)
            }
            Command::Connect {
                conn,
                remote,
                local_port,
                rx,
                tx,
            } => self.connect(conn, remote, local_port, rx, tx, now, mem),
            Command::Listen {
                id,
                port,
                family,
                backlog,
            } => {
                if id >= granted || self.listeners.contains_key(&id) {
                    return Completion::err(Status::BadId);
                }
                if self.ports.contains_key(&port) {
                    return Completion::err(Status::PortInUse);
                }
                self.listeners.insert(
                    id,
                    Listener {
                        port,
                        family,
                        backlog: usize::from(backlog.max(1)),
                        waiting: 0,
                    },
                );
                self.ports.insert(port, id);
                Completion::ok(0)
            }
            Command::Unlisten { id } => {
                let Some(l) = self.listeners.remove(&id) else {
                    return Completion::err(Status::BadId);
                };
                self.ports.remove(&l.port);
                // Connections nobody will accept now are reset.
                let gone: Vec<u32> = self
                    .pending
                    .iter()
                    .filter(|(_, p)| p.listener == id)
                    .map(|(h, _)| *h)
                    .collect();
                for h in gone {
                    if let Some(p) = self.pending.get_mut(&h) {
                        p.tcp.abort();
                        self.touch(Key::Pending(h));
                    }
                }
                Completion::ok(0)
            }
            Command::Accept {
                conn,
                handle,
                rx,
                tx,
            } => self.accept(conn, handle, rx, tx, mem),
            Command::Send { conn, tail } => self.on_conn(conn, |c| {
                // Never more than a ring of unacknowledged bytes, and the
                // tail only moves forward.
                let ahead = tail.wrapping_sub(c.tx_pulled);
                let unacked = tail.wrapping_sub(c.tx_acked);
                if unacked > c.tx.size || ahead > c.tx.size || c.fin_asked {
                    return Status::Invalid;
                }
                c.tx_tail = tail;
                Status::Ok
            }),
            Command::Recvd { conn, head } => self.on_conn(conn, |c| {
                if head.wrapping_sub(c.rx_head) > c.rx_tail.wrapping_sub(c.rx_head) {
                    return Status::Invalid;
                }
                c.rx_head = head;
                Status::Ok
            }),
            Command::Shutdown { conn } => self.on_conn(conn, |c| {
                c.fin_asked = true;
                Status::Ok
            }),
            Command::Close { conn } => self.on_conn(conn, |c| {
                c.fin_asked = true;
                c.closing = true;
                Status::Ok
            }),
            Command::Abort { conn } => self.on_conn(conn, |c| {
                c.tcp.abort();
                c.closing = true;
                c.reason.get_or_insert(CloseReason::Aborted);
                Status::Ok
            }),
            Command::SetOpt { conn, opt, .. } => self.on_conn(conn, |_| match opt {
                // The engine sends what it has at once: no Nagle.
                SockOpt::NoDelay => Status::Ok,
                SockOpt::KeepAlive | SockOpt::MaxSeg => Status::Invalid,
            }),
        }
    }

    /// Runs `f` on open connection `conn` and gives it a turn at the next
    /// `transmit`; BAD_ID when there is no such connection.
    fn on_conn(&mut self, conn: u32, f: impl FnOnce(&mut Conn) -> Status) -> Completion {
        let Some(c) = self.conn_mut(conn) else {
            return Completion::err(Status::BadId);
        };
        match f(c) {
            Status::Ok => {
                self.touch(Key::Conn(conn));
                Completion::ok(0)
            }
            s => Completion::err(s),
        }
    }

    /// An open connection the driver may use (not one whose CLOSED is
    /// queued).
    fn conn_mut(&mut self, id: u32) -> Option<&mut Conn> {
        self.conns
            .get_mut(id as usize)?
            .as_deref_mut()
            .filter(|c| !c.closed_queued)
    }

    fn iface(&self, remote: IpAddr) -> Option<Iface> {
        if remote.is_ipv4() {
            self.v4
        } else {
            self.v6
        }
    }

    fn tcp_cfg(&self, remote: SocketAddr, rx: u32, tx: u32) -> tcp::Config {
        let mut c = self.cfg.tcp;
        let ip_tcp = if remote.is_ipv6() { 60 } else { 40 };
        c.mss = self.cfg.mtu.saturating_sub(ip_tcp).clamp(536, 65495) as u16;
        if remote.is_ipv6() {
            c.default_peer_mss = 1220;
        }
        c.recv_buffer = rx.min(MAX_BUFFER) as usize;
        c.send_buffer = tx.min(MAX_BUFFER) as usize;
        c.ooo_limit = c.ooo_limit.min(c.recv_buffer);
        c
    }

    fn iss(&mut self, local: SocketAddr, remote: SocketAddr, now: tcp::Instant) -> u32 {
        let mut h: u32 = self.iss_seed;
        for b in format!("{local}{remote}").bytes() {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        self.iss_seed = self
            .iss_seed
            .wrapping_mul(0x2c1b_3c6d)
            .wrapping_add(0x297a_2d39);
        h.wrapping_add((now.0 / 4) as u32)
    }

    fn rings_ok(mem: &dyn RingMemory, rx: RingSpec, tx: RingSpec) -> bool {
        mem.contains(rx.addr, u64::from(rx.size)) && mem.contains(tx.addr, u64::from(tx.size))
    }

    #[allow(clippy::too_many_arguments)]
    fn connect(
        &mut self,
        id: u32,
        remote: SocketAddr,
        local_port: u16,
        rx: RingSpec,
        tx: RingSpec,
        now: tcp::Instant,
        mem: &dyn RingMemory,
    ) -> Completion {
        if !matches!(self.conns.get(id as usize), Some(None)) {
            return Completion::err(Status::BadId);
        }
        let Some(ifc) = self.iface(remote.ip()) else {
            return Completion::err(Status::NoAddress);
        };
        if !Self::rings_ok(mem, rx, tx) {
            return Completion::err(Status::BadRing);
        }
        let port = if local_port != 0 {
            let local = SocketAddr::new(ifc.addr, local_port);
            if self.flows.contains_key(&(local, remote)) {
                return Completion::err(Status::PortInUse);
            }
            local_port
        } else {
            let free = ephemeral_from(self.next_port)
                .find(|&p| self.pair_free(SocketAddr::new(ifc.addr, p), remote));
            let Some(p) = free else {
                return Completion::err(Status::PortInUse);
            };
            self.next_port = ephemeral_after(p);
            p
        };
        if !self.admit() {
            return Completion::err(Status::TableFull);
        }
        let local = SocketAddr::new(ifc.addr, port);
        let iss = self.iss(local, remote, now);
        let tcp = Connection::connect(
            self.tcp_cfg(remote, rx.size, tx.size),
            now,
            port,
            remote.port(),
            iss,
        );
        self.conns[id as usize] = Some(Box::new(Conn::new(tcp, local, remote, rx, tx)));
        self.flows.insert((local, remote), Key::Conn(id));
        self.stats.connects += 1;
        self.touch(Key::Conn(id));
        Completion::ok(u32::from(port))
    }

    fn accept(
        &mut self,
        id: u32,
        handle: u32,
        rx: RingSpec,
        tx: RingSpec,
        mem: &dyn RingMemory,
    ) -> Completion {
        if !matches!(self.conns.get(id as usize), Some(None)) {
            return Completion::err(Status::BadId);
        }
        if !self.pending.get(&handle).is_some_and(|p| p.announced) {
            return Completion::err(Status::NoSuchHandle);
        }
        if !Self::rings_ok(mem, rx, tx) {
            return Completion::err(Status::BadRing);
        }
        let Some(p) = self.pending.remove(&handle) else {
            return Completion::err(Status::NoSuchHandle);
        };
        if let Some(l) = self.listeners.get_mut(&p.listener) {
            l.waiting = l.waiting.saturating_sub(1);
        }
        let mut c = Conn::new(p.tcp, p.local, p.remote, rx, tx);
        c.was_connected = true;
        self.flows.insert((p.local, p.remote), Key::Conn(id));
        self.conns[id as usize] = Some(Box::new(c));
        self.stats.accepts += 1;
        self.touch(Key::Conn(id));
        Completion::ok(0)
    }

    fn touch(&mut self, k: Key) {
        if !self.touched.contains(&k) {
            self.touched.push(k);
        }
    }

    // ----- events -----

    /// Whether events wait for the driver.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// Events waiting for the driver.
    pub fn queued_events(&self) -> usize {
        self.events.len()
    }

    /// The next event for the driver.
    pub fn pop_event(&mut self) -> Option<Event> {
        let e = self.events.pop_front()?;
        Some(match e {
            Event::Data { conn, .. } => match self.conns.get_mut(conn as usize) {
                Some(Some(c)) => {
                    c.data_queued = false;
                    Event::Data {
                        conn,
                        tail: c.rx_tail,
                    }
                }
                _ => return self.pop_event(),
            },
            Event::Sent { conn, .. } => match self.conns.get_mut(conn as usize) {
                Some(Some(c)) => {
                    c.sent_queued = false;
                    Event::Sent {
                        conn,
                        acked: c.tx_acked,
                    }
                }
                _ => return self.pop_event(),
            },
            Event::Closed { conn, reason } => {
                if let Some(slot) = self.conns.get_mut(conn as usize) {
                    if let Some(c) = slot.take() {
                        self.release(1);
                        if self.flows.get(&(c.local, c.remote)) == Some(&Key::Conn(conn)) {
                            self.flows.remove(&(c.local, c.remote));
                        }
                    }
                }
                Event::Closed { conn, reason }
            }
            e => e,
        })
    }

    // ----- receive -----

    /// A frame from the wire. True when it was for the TOE (taken, even
    /// if then dropped and counted); false when it goes on to the driver.
    /// `verified`: the checksums were checked already.
    pub fn input(
        &mut self,
        frame: &[u8],
        verified: bool,
        now: tcp::Instant,
        mem: &dyn RingMemory,
    ) -> bool {
        self.input_as(frame, verified, now, mem, false)
    }

    /// [`Toe::input`] for a frame another engine passed on: taken only
    /// when it is a TCP segment of a flow of this engine (nothing is
    /// learnt, reassembled or answered otherwise).
    pub fn input_owned(
        &mut self,
        frame: &[u8],
        verified: bool,
        now: tcp::Instant,
        mem: &dyn RingMemory,
    ) -> bool {
        self.input_as(frame, verified, now, mem, true)
    }

    fn input_as(
        &mut self,
        frame: &[u8],
        verified: bool,
        now: tcp::Instant,
        mem: &dyn RingMemory,
        owned_only: bool,
    ) -> bool {
        if frame.len() < ETH_LEN || self.granted.is_none() {
            return false;
        }
        let src_mac = Address([frame[6], frame[7], frame[8], frame[9], frame[10], frame[11]]);
        let body = &frame[ETH_LEN..];
        match u16::from_be_bytes([frame[12], frame[13]]) {
            ethertype::ARP => {
                if !owned_only {
                    self.arp_learn(body);
                }
                false
            }
            ethertype::IPV4 => {
                let Ok(p) = ipv4::Packet::new_checked(body) else {
                    return false;
                };
                let Ok(ip) = ipv4::Repr::parse(&p) else {
                    return false;
                };
                let mine = self.v4.is_some_and(|i| i.addr == IpAddr::V4(ip.dst_addr));
                if !mine || ip.protocol != ip_proto::TCP {
                    return false;
                }
                if ip.more_frags || ip.frag_offset != 0 {
                    return !owned_only && self.reassemble(frame, now, mem);
                }
                let (s, d) = (IpAddr::V4(ip.src_addr), IpAddr::V4(ip.dst_addr));
                self.tcp_input(s, d, p.payload(), verified, now, owned_only)
            }
            ethertype::IPV6 => {
                let Ok(p) = ipv6::Packet::new_checked(body) else {
                    return false;
                };
                let Ok(ip) = ipv6::Repr::parse(&p) else {
                    return false;
                };
                let (s, d) = (IpAddr::V6(ip.src_addr), IpAddr::V6(ip.dst_addr));
                match ip.next_header {
                    ip_proto::ICMPV6 => {
                        if !owned_only {
                            self.nd_learn(s, d, p.payload(), src_mac);
                        }
                        false
                    }
                    ip_proto::TCP if self.v6.is_some_and(|i| i.addr == d) => {
                        self.tcp_input(s, d, p.payload(), verified, now, owned_only)
                    }
                    h if !owned_only
                        && ipv6::is_extension_header(h)
                        && self.v6.is_some_and(|i| i.addr == d)
                        && ipv6::walk(&p).is_ok_and(|w| {
                            w.fragment
                                .is_some_and(|f| f.repr.next_header == ip_proto::TCP)
                        }) =>
                    {
                        self.reassemble(frame, now, mem)
                    }
                    _ => false,
                }
            }
            _ => false,
        }
    }

    /// A fragment of a TCP datagram to a TOE address: held until the
    /// datagram is whole, which then goes through `input` (checksums
    /// checked here). One that no TOE flow owns is the driver's: it is
    /// kept for [`Toe::take_whole`]. Fragments are always taken.
    fn reassemble(&mut self, frame: &[u8], now: tcp::Instant, mem: &dyn RingMemory) -> bool {
        let whole = match self.frag.push(now.0 / 1000, &frame[ETH_LEN..]) {
            Ok(Outcome::Complete(d)) => {
                let mut w = Vec::with_capacity(ETH_LEN + d.len());
                w.extend_from_slice(&frame[..ETH_LEN]);
                w.extend_from_slice(d);
                Some(w)
            }
            Ok(Outcome::Held | Outcome::NotFragment) | Err(_) => None,
        };
        let st = self.frag.stats();
        let seen = std::mem::replace(&mut self.frag_seen, st);
        self.stats.reassembled += st.completed - seen.completed;
        let dropped = |s: &frag::Stats| {
            s.malformed
                + s.too_large
                + s.overlaps
                + s.inconsistent
                + s.too_many_fragments
                + s.discarded
                + s.timeouts
                + s.evictions
                + s.no_memory
        };
        self.stats.fragments_dropped += dropped(&st).saturating_sub(dropped(&seen));
        if let Some(w) = whole {
            // Not a fragment any more, so this goes one level deep.
            if !self.input(&w, false, now, mem) {
                self.whole = Some(w);
            }
        }
        true
    }

    /// A datagram that came in fragments, put together by the TOE, that
    /// is not the TOE's: the driver gets it whole (Ethernet header first)
    /// in place of the fragment just taken.
    pub fn take_whole(&mut self) -> Option<Vec<u8>> {
        self.whole.take()
    }

    fn tcp_input(
        &mut self,
        s: IpAddr,
        d: IpAddr,
        l4: &[u8],
        verified: bool,
        now: tcp::Instant,
        owned_only: bool,
    ) -> bool {
        let Ok(pkt) = wtcp::Packet::new_checked(l4) else {
            return false;
        };
        let local = SocketAddr::new(d, pkt.dst_port());
        let remote = SocketAddr::new(s, pkt.src_port());
        let key = self.flows.get(&(local, remote)).copied();
        let listener = self.ports.get(&local.port()).copied();
        if key.is_none() && (owned_only || listener.is_none()) {
            return false;
        }
        let ps = (!verified).then(|| emit::pseudo(s, d, emit::TCP, l4.len()));
        let Ok(repr) = wtcp::Repr::parse(&pkt, ps) else {
            self.stats.segments_bad += 1;
            return true;
        };
        self.stats.segments_in += 1;
        let payload = pkt.payload();
        match key {
            Some(Key::Conn(id)) => {
                if let Some(Some(c)) = self.conns.get_mut(id as usize) {
                    c.tcp.on_segment(now, &repr, payload);
                }
                self.touch(Key::Conn(id));
            }
            Some(Key::Pending(h)) => {
                if let Some(p) = self.pending.get_mut(&h) {
                    p.tcp.on_segment(now, &repr, payload);
                }
                self.touch(Key::Pending(h));
            }
            None => {
                let Some(lid) = listener else {
                    return false;
                };
                return self.syn_input(lid, local, remote, &repr, payload.len(), now);
            }
        }
        true
    }

    /// A segment to a listening port that matches no flow: a SYN makes a
    /// waiting connection. With the table full the SYN goes on to the
    /// driver, whose own TCP may take the connection; so do segments of
    /// no flow, which may be that TCP's. Returns whether the TOE took it.
    fn syn_input(
        &mut self,
        lid: u32,
        local: SocketAddr,
        remote: SocketAddr,
        repr: &wtcp::Repr,
        payload_len: usize,
        now: tcp::Instant,
    ) -> bool {
        let Some(l) = self.listeners.get(&lid) else {
            return false;
        };
        let family_ok = match l.family {
            Family::Both => true,
            Family::V4 => local.is_ipv4(),
            Family::V6 => local.is_ipv6(),
        };
        let is_syn = repr.flags & (wtcp::Flags::SYN | wtcp::Flags::ACK | wtcp::Flags::RST)
            == wtcp::Flags::SYN;
        let full_backlog = l.waiting >= l.backlog;
        if family_ok && is_syn {
            if !self.admit() {
                // No room in the table: the driver's own TCP may take it.
                return false;
            }
            if full_backlog {
                self.release(1);
                self.stats.syn_dropped += 1;
                return true;
            }
            let cfg = self.tcp_cfg(remote, PENDING_BUFFER, PENDING_BUFFER);
            let iss = self.iss(local, remote, now);
            if let Some(tcp) = Connection::accept(cfg, now, repr, iss) {
                let h = (self.next_handle << HANDLE_ENGINE_BITS) | u32::from(self.index);
                self.next_handle =
                    ((self.next_handle + 1) & (u32::MAX >> HANDLE_ENGINE_BITS)).max(1);
                self.pending.insert(
                    h,
                    Pending {
                        tcp,
                        local,
                        remote,
                        listener: lid,
                        announced: false,
                    },
                );
                if let Some(l) = self.listeners.get_mut(&lid) {
                    l.waiting += 1;
                }
                self.flows.insert((local, remote), Key::Pending(h));
                self.touch(Key::Pending(h));
                return true;
            }
            self.release(1);
        }
        if !is_syn {
            return false;
        }
        if let Some(rst) = tcp::reply_to_stray(repr, payload_len) {
            let seg = tcp::Segment {
                repr: rst,
                payload: [&[], &[]],
                mss: 0,
            };
            let mut f = Vec::with_capacity(96);
            match emit::tcp_segment(&mut f, self.cfg.mac, local, remote, &seg, 0, false) {
                Some(hdr) if self.outbox.len() < OUTBOX => {
                    self.outbox.push((remote.ip(), hdr, f));
                }
                _ => self.stats.neighbour_drops += 1,
            }
        }
        true
    }

    fn arp_learn(&mut self, body: &[u8]) {
        let Some(me) = self.v4.map(|i| i.addr) else {
            return;
        };
        let Ok(p) = arp::Packet::new_checked(body) else {
            return;
        };
        let Ok(r) = arp::Repr::parse(&p) else {
            return;
        };
        let from = IpAddr::V4(r.source_protocol_addr);
        if IpAddr::V4(r.target_protocol_addr) == me || self.neigh.contains_key(&from) {
            self.neigh.insert(from, r.source_hardware_addr);
        }
    }

    fn nd_learn(&mut self, s: IpAddr, d: IpAddr, l4: &[u8], src_mac: Address) {
        let Some(me) = self.v6.map(|i| i.addr) else {
            return;
        };
        let Ok(ic) = icmpv6::Packet::new_checked(l4) else {
            return;
        };
        let Ok(m) = icmpv6::Repr::parse(&ic, emit::pseudo(s, d, ip_proto::ICMPV6, l4.len())) else {
            return;
        };
        match m {
            icmpv6::Repr::NeighborAdvert {
                target,
                target_lladdr,
                ..
            } if d == me => {
                self.neigh
                    .insert(IpAddr::V6(target), target_lladdr.unwrap_or(src_mac));
            }
            icmpv6::Repr::NeighborSolicit {
                target,
                source_lladdr: Some(mac),
            } if IpAddr::V6(target) == me && !s.is_unspecified() => {
                self.neigh.insert(s, mac);
            }
            _ => {}
        }
    }

    // ----- transmit -----

    /// Moves payload between the rings and the engines of every flow with
    /// work, queues the events that follow, and sends what the engines
    /// have to send (and frames whose neighbour became known) to `send`.
    pub fn transmit(
        &mut self,
        now: tcp::Instant,
        mem: &dyn RingMemory,
        send: &mut dyn FnMut(&VirtioNetHdr, &[u8]),
    ) {
        self.transmit_pieces(now, mem, send, None);
    }

    /// [`Toe::transmit`], with data segments whose next hop is known
    /// handed to `pieces` as headers and payload rather than copied into
    /// a frame (with the checksum offload on).
    pub fn transmit_pieces(
        &mut self,
        now: tcp::Instant,
        mem: &dyn RingMemory,
        send: &mut dyn FnMut(&VirtioNetHdr, &[u8]),
        mut pieces: Option<&mut SendPieces<'_>>,
    ) {
        self.release_held(send);
        for (ip, hdr, f) in std::mem::take(&mut self.outbox) {
            self.route(ip, hdr, &f, send);
        }
        for k in std::mem::take(&mut self.touched) {
            match k {
                Key::Conn(id) => self.pump(id, mem),
                Key::Pending(h) => self.pump_pending(h),
            }
            self.send_segments(k, now, send, pieces.as_deref_mut());
            if let Key::Conn(id) = k {
                self.after_send(id);
            }
        }
    }

    /// Runs the timers that are due and sends what follows.
    pub fn on_timer(
        &mut self,
        now: tcp::Instant,
        mem: &dyn RingMemory,
        send: &mut dyn FnMut(&VirtioNetHdr, &[u8]),
    ) {
        let due = |t: &Connection| t.poll_timeout().is_some_and(|d| d <= now);
        let mut keys = Vec::new();
        for (i, c) in self.conns.iter_mut().enumerate() {
            if let Some(c) = c.as_mut().filter(|c| due(&c.tcp)) {
                c.tcp.on_timer(now);
                keys.push(Key::Conn(i as u32));
            }
        }
        for (h, p) in self.pending.iter_mut() {
            if due(&p.tcp) {
                p.tcp.on_timer(now);
                keys.push(Key::Pending(*h));
            }
        }
        for k in keys {
            self.touch(k);
        }
        self.transmit(now, mem, send);
    }

    /// TX ring -> engine, engine -> RX ring, and the events of both.
    fn pump(&mut self, id: u32, mem: &dyn RingMemory) {
        let Some(Some(c)) = self.conns.get_mut(id as usize) else {
            return;
        };
        if c.closed_queued {
            return;
        }
        let mut fault = false;
        // Driver bytes into the engine.
        while c.tx_pulled != c.tx_tail && c.tcp.may_send() {
            let n = (c.tx_tail.wrapping_sub(c.tx_pulled) as usize)
                .min(c.tcp.send_space())
                .min(CHUNK);
            if n == 0 {
                break;
            }
            if !read_ring(mem, c.tx, c.tx_pulled, &mut self.scratch[..n]) {
                fault = true;
                break;
            }
            let took = c.tcp.send(&self.scratch[..n]);
            c.tx_pulled = c.tx_pulled.wrapping_add(took as u32);
            if took < n {
                break;
            }
        }
        if c.fin_asked && !c.fin_given && c.tx_pulled == c.tx_tail {
            c.tcp.close();
            c.fin_given = true;
        }
        // Engine bytes into the driver's ring.
        if c.closing {
            let n = c.tcp.recv_available();
            c.tcp.consume(n);
        } else {
            loop {
                let free = c.rx.size - c.rx_tail.wrapping_sub(c.rx_head);
                let n = c.tcp.recv_available().min(free as usize).min(CHUNK);
                if n == 0 {
                    break;
                }
                let got = c.tcp.recv(&mut self.scratch[..n]);
                if !write_ring(mem, c.rx, c.rx_tail, &self.scratch[..got]) {
                    fault = true;
                    break;
                }
                c.rx_tail = c.rx_tail.wrapping_add(got as u32);
                if !c.data_queued {
                    c.data_queued = true;
                    self.events.push_back(Event::Data { conn: id, tail: 0 });
                }
            }
        }
        if fault {
            self.stats.ring_faults += 1;
            c.tcp.abort();
            c.closing = true;
            c.reason.get_or_insert(CloseReason::Failed);
        }
        self.events_of(id);
    }

    /// The engine's news for connection `id`: connected, acknowledged
    /// bytes, the peer's FIN, the end.
    fn events_of(&mut self, id: u32) {
        let Some(Some(c)) = self.conns.get_mut(id as usize) else {
            return;
        };
        while let Some(e) = c.tcp.poll_event() {
            match e {
                tcp::Event::Connected if !c.was_connected => {
                    c.was_connected = true;
                    self.events.push_back(Event::Connected {
                        conn: id,
                        local_port: c.local.port(),
                        mss: c.tcp.send_mss() as u16,
                    });
                }
                tcp::Event::Reset => {
                    let r = if c.was_connected {
                        CloseReason::Reset
                    } else {
                        CloseReason::Refused
                    };
                    c.reason.get_or_insert(r);
                }
                tcp::Event::TimedOut => {
                    c.reason.get_or_insert(CloseReason::TimedOut);
                }
                _ => {}
            }
        }
        // SENT once a quarter of the ring is freed, or everything the
        // driver wrote is acknowledged: not per ACK, each of which would
        // wake the driver.
        let acked = c.tx_pulled.wrapping_sub(c.tcp.send_queued() as u32);
        let freed = acked.wrapping_sub(c.tx_acked);
        if freed > 0 && (freed >= c.tx.size / 4 || acked == c.tx_tail) {
            c.tx_acked = acked;
            if !c.sent_queued {
                c.sent_queued = true;
                self.events.push_back(Event::Sent { conn: id, acked: 0 });
            }
        }
        if c.tcp.fin_received() && c.tcp.recv_available() == 0 && !c.peer_closed_told && !c.closing
        {
            c.peer_closed_told = true;
            self.events.push_back(Event::PeerClosed { conn: id });
        }
    }

    /// After sending: a connection that has ended is reported CLOSED once
    /// the driver closed it or it ended on its own (reset, timeout).
    fn after_send(&mut self, id: u32) {
        let Some(Some(c)) = self.conns.get_mut(id as usize) else {
            return;
        };
        if c.closed_queued {
            return;
        }
        let ended =
            c.tcp.is_closed() || (c.closing && c.fin_given && c.tcp.state() == State::TimeWait);
        if !ended {
            return;
        }
        c.closed_queued = true;
        let reason = c.reason.unwrap_or(CloseReason::Done);
        self.stats.closed += 1;
        self.events.push_back(Event::Closed { conn: id, reason });
    }

    fn pump_pending(&mut self, h: u32) {
        let Some(p) = self.pending.get_mut(&h) else {
            return;
        };
        while let Some(e) = p.tcp.poll_event() {
            if e == tcp::Event::Connected && !p.announced {
                p.announced = true;
                self.events.push_back(Event::Incoming {
                    listener: p.listener,
                    handle: h,
                    remote: p.remote,
                });
            }
        }
    }

    /// Sends what flow `k`'s engine has to send; a waiting connection
    /// that has ended is forgotten after.
    fn send_segments(
        &mut self,
        k: Key,
        now: tcp::Instant,
        send: &mut dyn FnMut(&VirtioNetHdr, &[u8]),
        mut pieces: Option<&mut SendPieces<'_>>,
    ) {
        let offload = self.cfg.offload;
        let mac = self.cfg.mac;
        let remote_ip = match k {
            Key::Conn(id) => self
                .conns
                .get(id as usize)
                .and_then(|c| c.as_ref())
                .map(|c| c.remote.ip()),
            Key::Pending(h) => self.pending.get(&h).map(|p| p.remote.ip()),
        };
        let Some(remote_ip) = remote_ip else {
            return;
        };
        // With the next hop known, each segment goes out as it is built;
        // otherwise it is kept for `route`, which holds it and asks.
        let hop = self.iface(remote_ip).map(|i| i.next_hop(remote_ip));
        let dst = hop.and_then(|h| self.neigh.get(&h).copied());
        let mut f = std::mem::take(&mut self.frame);
        let mut out: Vec<(VirtioNetHdr, Vec<u8>)> = Vec::new();
        let mut sent = 0;
        {
            let (tcp, local, remote) = match k {
                Key::Conn(id) => match self.conns.get_mut(id as usize) {
                    Some(Some(c)) => (&mut c.tcp, c.local, c.remote),
                    _ => return,
                },
                Key::Pending(h) => match self.pending.get_mut(&h) {
                    Some(p) => (&mut p.tcp, p.local, p.remote),
                    None => return,
                },
            };
            let max = if offload {
                emit::TSO_MAX_PAYLOAD
            } else {
                tcp.send_mss()
            };
            while let Some(seg) = tcp.poll_transmit(now, max) {
                // With the next hop known and a vectored sink, a data
                // segment's payload goes from the engine's buffer to the
                // wire as it is: only its headers are built.
                let vectored =
                    offload && dst.is_some() && pieces.is_some() && seg.payload_len() > 0;
                let hdr = if vectored {
                    emit::tcp_headers(&mut f, mac, local, remote, &seg, 0)
                } else {
                    emit::tcp_segment(&mut f, mac, local, remote, &seg, 0, offload)
                };
                let Some(hdr) = hdr else {
                    continue;
                };
                let Some(d) = dst else {
                    out.push((hdr, f.clone()));
                    continue;
                };
                f[..6].copy_from_slice(d.as_bytes());
                match pieces.as_deref_mut().filter(|_| vectored) {
                    Some(p) => p(&hdr, &f, seg.payload),
                    None => send(&hdr, &f),
                }
                sent += 1;
            }
        }
        self.frame = f;
        self.stats.frames_out += sent;
        for (hdr, frame) in out {
            self.route(remote_ip, hdr, &frame, send);
        }
        if let Key::Pending(h) = k {
            if self.pending.get(&h).is_some_and(|p| p.tcp.is_closed()) {
                if let Some(p) = self.pending.remove(&h) {
                    self.release(1);
                    self.flows.remove(&(p.local, p.remote));
                    if let Some(l) = self.listeners.get_mut(&p.listener) {
                        l.waiting = l.waiting.saturating_sub(1);
                    }
                }
            }
        }
    }

    /// Puts a frame to `dst` on the wire once its next hop's link address
    /// is known; until then it is held and the address asked for.
    fn route(
        &mut self,
        dst: IpAddr,
        hdr: VirtioNetHdr,
        frame: &[u8],
        send: &mut dyn FnMut(&VirtioNetHdr, &[u8]),
    ) {
        let Some(ifc) = self.iface(dst) else {
            return;
        };
        let hop = ifc.next_hop(dst);
        if let Some(mac) = self.neigh.get(&hop) {
            let mut f = frame.to_vec();
            f[..6].copy_from_slice(mac.as_bytes());
            self.stats.frames_out += 1;
            send(&hdr, &f);
            return;
        }
        let held = self.held.entry(hop).or_default();
        let ask = held.frames.is_empty();
        if held.frames.len() >= HELD_PER_NEIGHBOUR {
            self.stats.neighbour_drops += 1;
        } else {
            held.frames.push((hdr, frame.to_vec()));
        }
        if ask {
            let mut q = Vec::with_capacity(96);
            match (hop, ifc.addr) {
                (IpAddr::V4(t), IpAddr::V4(me)) => emit::arp_request(&mut q, self.cfg.mac, me, t),
                (IpAddr::V6(t), IpAddr::V6(me)) => {
                    emit::neighbor_solicit(&mut q, self.cfg.mac, me, t)
                }
                _ => return,
            }
            self.stats.frames_out += 1;
            send(&VirtioNetHdr::default(), &q);
        }
    }

    /// Sends the frames whose next hop became known.
    fn release_held(&mut self, send: &mut dyn FnMut(&VirtioNetHdr, &[u8])) {
        let known: Vec<IpAddr> = self
            .held
            .keys()
            .filter(|ip| self.neigh.contains_key(ip))
            .copied()
            .collect();
        for ip in known {
            let (Some(h), Some(mac)) = (self.held.remove(&ip), self.neigh.get(&ip).copied()) else {
                continue;
            };
            for (hdr, mut f) in h.frames {
                f[..6].copy_from_slice(mac.as_bytes());
                self.stats.frames_out += 1;
                send(&hdr, &f);
            }
        }
    }

    /// Whether connection id `conn` is taken here (open, or its CLOSED not
    /// yet taken by the driver).
    pub fn has_conn(&self, conn: u32) -> bool {
        matches!(self.conns.get(conn as usize), Some(Some(_)))
    }

    /// Whether a CONNECT from `local` to `remote` would find the pair
    /// free here: no flow of it, and `local`'s port not a listener's.
    pub fn pair_free(&self, local: SocketAddr, remote: SocketAddr) -> bool {
        !self.ports.contains_key(&local.port()) && !self.flows.contains_key(&(local, remote))
    }

    /// Whether frames wait here for a neighbour's link address.
    pub fn holds_frames(&self) -> bool {
        !self.held.is_empty()
    }

    /// Runs a command sent to every engine of the port (HELLO, IFCONFIG,
    /// LISTEN, UNLISTEN) on one that is not the first, whose counts alone
    /// stand for it.
    pub fn replicate(
        &mut self,
        cmd: &Command,
        now: tcp::Instant,
        mem: &dyn RingMemory,
    ) -> Completion {
        self.run(cmd, now, mem)
    }

    /// The local address of a family, for tests and the management view.
    pub fn address(&self, v6: bool) -> Option<IpAddr> {
        if v6 {
            self.v6.map(|i| i.addr)
        } else {
            self.v4.map(|i| i.addr)
        }
    }
}

impl Conn {
    fn new(
        tcp: Connection,
        local: SocketAddr,
        remote: SocketAddr,
        rx: RingSpec,
        tx: RingSpec,
    ) -> Conn {
        Conn {
            tcp,
            local,
            remote,
            rx,
            tx,
            tx_tail: 0,
            tx_pulled: 0,
            tx_acked: 0,
            rx_tail: 0,
            rx_head: 0,
            fin_asked: false,
            fin_given: false,
            closing: false,
            peer_closed_told: false,
            data_queued: false,
            sent_queued: false,
            closed_queued: false,
            reason: None,
            was_connected: false,
        }
    }
}

/// Reads `buf.len()` ring bytes from ring offset `at`.
fn read_ring(mem: &dyn RingMemory, r: RingSpec, at: u32, buf: &mut [u8]) -> bool {
    let [(s0, l0), (_, l1)] = spans(at, buf.len() as u32, r.size);
    mem.read(r.addr + s0 as u64, &mut buf[..l0]) && mem.read(r.addr, &mut buf[l0..l0 + l1])
}

/// Writes `data` into the ring from ring offset `at`.
fn write_ring(mem: &dyn RingMemory, r: RingSpec, at: u32, data: &[u8]) -> bool {
    let [(s0, l0), (_, l1)] = spans(at, data.len() as u32, r.size);
    mem.write(r.addr + s0 as u64, &data[..l0]) && mem.write(r.addr, &data[l0..l0 + l1])
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, net::Ipv6Addr};

    use vnic_protocol::{
        toe::RING_MIN,
        wire::{arp, build, emit::arp_append},
    };

    use super::*;

    const DEV_MAC: Address = Address([2, 0, 0, 0, 0, 1]);
    const PEER_MAC: Address = Address([2, 0, 0, 0, 0, 2]);
    const BASE: u64 = 0x10_0000;
    const RING: u32 = 1 << 16;

    /// Driver memory: 1 MiB from `BASE`.
    struct Mem(RefCell<Vec<u8>>);

    impl RingMemory for Mem {
        fn contains(&self, addr: u64, len: u64) -> bool {
            let end = BASE + self.0.borrow().len() as u64;
            addr >= BASE && addr.checked_add(len).is_some_and(|e| e <= end)
        }
        fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
            if !self.contains(addr, buf.len() as u64) {
                return false;
            }
            let o = (addr - BASE) as usize;
            buf.copy_from_slice(&self.0.borrow()[o..o + buf.len()]);
            true
        }
        fn write(&self, addr: u64, data: &[u8]) -> bool {
            if !self.contains(addr, data.len() as u64) {
                return false;
            }
            let o = (addr - BASE) as usize;
            self.0.borrow_mut()[o..o + data.len()].copy_from_slice(data);
            true
        }
    }

    fn rings(k: u64) -> (RingSpec, RingSpec) {
        let rx = RingSpec {
            addr: BASE + k * 2 * u64::from(RING),
            size: RING,
        };
        let tx = RingSpec {
            addr: rx.addr + u64::from(RING),
            size: RING,
        };
        (rx, tx)
    }

    /// The far end: one host answering ARP and ND, with one TCP engine
    /// (listening on `listen` or connecting), its received bytes kept.
    struct Peer {
        ip: IpAddr,
        listen: Option<u16>,
        conn: Option<(Connection, SocketAddr, SocketAddr)>,
        got: Vec<u8>,
        /// Segments it saw with RST set.
        resets: usize,
    }

    struct Net {
        toe: Toe,
        mem: Mem,
        peer: Peer,
        now: u64,
        events: Vec<Event>,
        /// Checksum offload on: data segments leave as headers and
        /// payload pieces (`transmit_pieces`), counted here.
        offload: bool,
        pieces: usize,
    }

    /// A frame the TOE sent with the checksum left to the device, as the
    /// device sends it: the checksum completed.
    fn completed(h: &VirtioNetHdr, mut f: Vec<u8>) -> Vec<u8> {
        if h.flags
            .contains(vnic_protocol::virtio::HdrFlags::NEEDS_CSUM)
        {
            vnic_protocol::offload::csum::complete_checksum(
                &mut f,
                usize::from(h.csum_start),
                usize::from(h.csum_offset),
            )
            .unwrap();
        }
        f
    }

    impl Net {
        fn new(v6: bool, conns: u32) -> Net {
            Net::with(v6, conns, false)
        }

        fn with(v6: bool, conns: u32, offload: bool) -> Net {
            let mut toe = Toe::new(ToeConfig {
                mac: DEV_MAC,
                mtu: 1500,
                max_conns: 64,
                offload,
                tcp: tcp::Config::default(),
                reassembly: frag::Limits::default(),
            });
            let mem = Mem(RefCell::new(vec![0; 1 << 20]));
            let t = tcp::Instant(0);
            let c = toe.command(&Command::Hello { version: 1, conns }, t, &mem);
            assert_eq!(c, Completion::ok(conns));
            let (addr, peer, prefix): (IpAddr, IpAddr, u8) = if v6 {
                (
                    "2001:db8::2".parse().unwrap(),
                    "2001:db8::1".parse().unwrap(),
                    64,
                )
            } else {
                (
                    "192.0.2.2".parse().unwrap(),
                    "192.0.2.1".parse().unwrap(),
                    24,
                )
            };
            let c = toe.command(
                &Command::IfConfig {
                    addr,
                    prefix,
                    gateway: None,
                },
                t,
                &mem,
            );
            assert_eq!(c.status, Status::Ok);
            Net {
                toe,
                mem,
                peer: Peer {
                    ip: peer,
                    listen: None,
                    conn: None,
                    got: Vec::new(),
                    resets: 0,
                },
                now: 0,
                events: Vec::new(),
                offload,
                pieces: 0,
            }
        }

        fn cmd(&mut self, c: Command) -> Completion {
            self.toe.command(&c, tcp::Instant(self.now), &self.mem)
        }

        fn toe_addr(&self) -> IpAddr {
            self.toe.address(self.peer.ip.is_ipv6()).unwrap()
        }

        /// One round: the TOE sends, the peer answers, time moves 1 ms.
        fn step(&mut self) {
            let now = tcp::Instant(self.now);
            let mut frames = Vec::new();
            if self.offload {
                let out = RefCell::new(Vec::new());
                let mut pieces = 0;
                self.toe.transmit_pieces(
                    now,
                    &self.mem,
                    &mut |h, f| out.borrow_mut().push(completed(h, f.to_vec())),
                    Some(&mut |h, head, p| {
                        pieces += 1;
                        out.borrow_mut()
                            .push(completed(h, [head, p[0], p[1]].concat()));
                    }),
                );
                self.pieces += pieces;
                frames = out.into_inner();
            } else {
                self.toe
                    .transmit(now, &self.mem, &mut |_, f| frames.push(f.to_vec()));
            }
            if self.toe.poll_timeout().is_some_and(|t| t <= now) {
                self.toe
                    .on_timer(now, &self.mem, &mut |_, f| frames.push(f.to_vec()));
            }
            let mut replies = Vec::new();
            for f in frames {
                self.peer_input(&f, &mut replies);
            }
            if let Some((c, local, remote)) = self.peer.conn.as_mut() {
                if c.poll_timeout().is_some_and(|t| t <= now) {
                    c.on_timer(now);
                }
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    let n = c.recv(&mut buf);
                    if n == 0 {
                        break;
                    }
                    self.peer.got.extend_from_slice(&buf[..n]);
                }
                while let Some(seg) = c.poll_transmit(now, 1460) {
                    let mut f = Vec::new();
                    emit::tcp_segment(&mut f, PEER_MAC, *local, *remote, &seg, 1, false).unwrap();
                    f[..6].copy_from_slice(DEV_MAC.as_bytes());
                    replies.push(f);
                }
            }
            for f in replies {
                self.toe.input(&f, false, now, &self.mem);
            }
            while let Some(e) = self.toe.pop_event() {
                self.events.push(e);
            }
            self.now += 1000;
        }

        /// What the peer does with a frame from the TOE.
        fn peer_input(&mut self, f: &[u8], replies: &mut Vec<Vec<u8>>) {
            let now = tcp::Instant(self.now);
            let body = &f[ETH_LEN..];
            match u16::from_be_bytes([f[12], f[13]]) {
                ethertype::ARP => {
                    let r = arp::Repr::parse(&arp::Packet::new_checked(body).unwrap()).unwrap();
                    if r.operation == arp::OP_REQUEST
                        && IpAddr::V4(r.target_protocol_addr) == self.peer.ip
                    {
                        let mut out = Vec::new();
                        emit::eth(&mut out, Some(DEV_MAC), PEER_MAC, ethertype::ARP);
                        arp_append(
                            &mut out,
                            &arp::Repr {
                                operation: arp::OP_REPLY,
                                source_hardware_addr: PEER_MAC,
                                source_protocol_addr: r.target_protocol_addr,
                                target_hardware_addr: r.source_hardware_addr,
                                target_protocol_addr: r.source_protocol_addr,
                            },
                        );
                        replies.push(out);
                    }
                }
                ethertype::IPV4 | ethertype::IPV6 => {
                    let (s, d, proto, l4) = if f[12] == 0x08 {
                        let p = ipv4::Packet::new_checked(body).unwrap();
                        let r = ipv4::Repr::parse(&p).unwrap();
                        let l4 = p.payload().to_vec();
                        (
                            IpAddr::V4(r.src_addr),
                            IpAddr::V4(r.dst_addr),
                            r.protocol,
                            l4,
                        )
                    } else {
                        let p = ipv6::Packet::new_checked(body).unwrap();
                        let r = ipv6::Repr::parse(&p).unwrap();
                        let l4 = p.payload().to_vec();
                        (
                            IpAddr::V6(r.src_addr),
                            IpAddr::V6(r.dst_addr),
                            r.next_header,
                            l4,
                        )
                    };
                    if proto == ip_proto::ICMPV6 {
                        let ps = emit::pseudo(s, d, ip_proto::ICMPV6, l4.len());
                        let ic = icmpv6::Packet::new_checked(&l4[..]).unwrap();
                        if let icmpv6::Repr::NeighborSolicit { target, .. } =
                            icmpv6::Repr::parse(&ic, ps).unwrap()
                        {
                            let (IpAddr::V6(me), IpAddr::V6(to)) = (self.peer.ip, s) else {
                                unreachable!()
                            };
                            assert_eq!(target, me);
                            let mut out = Vec::new();
                            emit::eth(&mut out, Some(DEV_MAC), PEER_MAC, ethertype::IPV6);
                            let na = icmpv6::Repr::NeighborAdvert {
                                flags: icmpv6::NA_SOLICITED,
                                target,
                                target_lladdr: Some(PEER_MAC),
                            };
                            emit::icmpv6_append(&mut out, me, to, &na, 255);
                            replies.push(out);
                        }
                        return;
                    }
                    assert_eq!(proto, ip_proto::TCP);
                    assert_eq!(&f[..6], PEER_MAC.as_bytes(), "to the resolved neighbour");
                    let ps = emit::pseudo(s, d, emit::TCP, l4.len());
                    let p = wtcp::Packet::new_checked(&l4[..]).unwrap();
                    let r = wtcp::Repr::parse(&p, Some(ps)).expect("a valid checksum");
                    if r.flags.contains(wtcp::Flags::RST) {
                        self.peer.resets += 1;
                    }
                    let here = SocketAddr::new(d, r.dst_port);
                    let there = SocketAddr::new(s, r.src_port);
                    match self.peer.conn.as_mut() {
                        Some((c, l, rm)) if *l == here && *rm == there => {
                            c.on_segment(now, &r, p.payload())
                        }
                        _ if self.peer.listen == Some(r.dst_port) => {
                            let c = Connection::accept(tcp::Config::default(), now, &r, 99);
                            if let Some(c) = c {
                                self.peer.conn = Some((c, here, there));
                            }
                        }
                        _ => {
                            if let Some(rst) = tcp::reply_to_stray(&r, p.payload().len()) {
                                let seg = tcp::Segment {
                                    repr: rst,
                                    payload: [&[], &[]],
                                    mss: 0,
                                };
                                let mut out = Vec::new();
                                emit::tcp_segment(&mut out, PEER_MAC, here, there, &seg, 0, false);
                                out[..6].copy_from_slice(DEV_MAC.as_bytes());
                                replies.push(out);
                            }
                        }
                    }
                }
                _ => {}
            }
        }

        fn run_until(&mut self, what: &str, mut done: impl FnMut(&mut Net) -> bool) {
            for _ in 0..20_000 {
                if done(self) {
                    return;
                }
                self.step();
            }
            panic!("{what}: not after 20 s; events {:?}", self.events);
        }

        fn take(&mut self, pick: impl Fn(&Event) -> bool) -> Option<Event> {
            let i = self.events.iter().position(pick)?;
            Some(self.events.remove(i))
        }

        /// Driver side: puts `data` into connection `id`'s TX ring and
        /// moves the tail as far as the ring allows; returns bytes taken.
        fn driver_send(
            &mut self,
            id: u32,
            tx: RingSpec,
            tail: &mut u32,
            acked: u32,
            data: &[u8],
        ) -> usize {
            let room = (tx.size - tail.wrapping_sub(acked)) as usize;
            let n = room.min(data.len());
            if n == 0 {
                return 0;
            }
            assert!(write_ring(&self.mem, tx, *tail, &data[..n]));
            *tail = tail.wrapping_add(n as u32);
            assert_eq!(
                self.cmd(Command::Send {
                    conn: id,
                    tail: *tail
                }),
                Completion::ok(0)
            );
            n
        }
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
            .collect()
    }

    /// CONNECT to a kernel-like peer over IPv4 and IPv6: the neighbour is
    /// asked for, the handshake ends in CONNECTED, 300 kB go each way
    /// through 64 KiB rings byte for byte, SENT reaches the last byte,
    /// and both FINs end in PEER_CLOSED and CLOSED (done).
    /// With checksum offload, data segments leave as headers and payload
    /// pieces (and TSO super-segments): the same bytes arrive.
    #[test]
    fn connect_moves_bytes_both_ways() {
        for (v6, offload) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut n = Net::with(v6, 8, offload);
            n.peer.listen = Some(5201);
            let (rx, tx) = rings(1);
            let remote = SocketAddr::new(n.peer.ip, 5201);
            let c = n.cmd(Command::Connect {
                conn: 3,
                remote,
                local_port: 0,
                rx,
                tx,
            });
            assert_eq!(c.status, Status::Ok);
            assert!(EPHEMERAL.contains(&(c.value as u16)));
            n.run_until("connected", |n| {
                n.take(|e| matches!(e, Event::Connected { conn: 3, .. }))
                    .is_some()
            });
            let up = pattern(300_000, 1);
            let down = pattern(300_000, 2);
            let (mut tail, mut acked, mut sent, mut fed) = (0u32, 0u32, 0usize, 0usize);
            let (mut head, mut got) = (0u32, Vec::new());
            n.run_until("transfers", |n| {
                sent += n.driver_send(3, tx, &mut tail, acked, &up[sent..]);
                while let Some(e) = n.take(|e| matches!(e, Event::Sent { .. } | Event::Data { .. }))
                {
                    match e {
                        Event::Sent { acked: a, .. } => acked = a,
                        Event::Data { tail: t, .. } => {
                            let mut buf = vec![0; t.wrapping_sub(head) as usize];
                            assert!(read_ring(&n.mem, rx, head, &mut buf));
                            got.extend_from_slice(&buf);
                            head = t;
                            assert_eq!(n.cmd(Command::Recvd { conn: 3, head }), Completion::ok(0));
                        }
                        _ => unreachable!(),
                    }
                }
                if let Some((c, ..)) = n.peer.conn.as_mut() {
                    fed += c.send(&down[fed..]);
                }
                acked as usize == up.len()
                    && got.len() == down.len()
                    && n.peer.got.len() == up.len()
            });
            assert!(n.peer.got == up, "bytes to the peer differ");
            assert!(got == down, "bytes to the driver differ");
            assert_eq!(n.pieces > 0, offload, "{} segments in pieces", n.pieces);
            assert_eq!(n.cmd(Command::Close { conn: 3 }), Completion::ok(0));
            n.peer.conn.as_mut().unwrap().0.close();
            n.run_until("closed", |n| {
                n.events.iter().any(|e| matches!(e, Event::Closed { .. }))
            });
            assert_eq!(
                n.take(|e| matches!(e, Event::Closed { .. })),
                Some(Event::Closed {
                    conn: 3,
                    reason: CloseReason::Done
                })
            );
            assert_eq!(n.toe.connections(), 0);
            // The id is the driver's again.
            let (rx, tx) = rings(2);
            let c = n.cmd(Command::Connect {
                conn: 3,
                remote,
                local_port: 0,
                rx,
                tx,
            });
            assert_eq!(c.status, Status::Ok);
            let s = n.toe.stats();
            assert_eq!(
                (s.connects, s.closed, s.ring_faults, s.segments_bad),
                (2, 1, 0, 0)
            );
        }
    }

    /// LISTEN, a peer connects: INCOMING names it, ACCEPT binds it to an
    /// id with rings, and what the peer sent before the accept arrives.
    #[test]
    fn listen_and_accept() {
        let mut n = Net::new(false, 8);
        let me = n.toe_addr();
        assert_eq!(
            n.cmd(Command::Listen {
                id: 1,
                port: 8080,
                family: Family::Both,
                backlog: 4,
            }),
            Completion::ok(0)
        );
        let here = SocketAddr::new(n.peer.ip, 40000);
        let there = SocketAddr::new(me, 8080);
        let c = Connection::connect(tcp::Config::default(), tcp::Instant(0), 40000, 8080, 5);
        n.peer.conn = Some((c, here, there));
        // The TOE learns the peer's address from its ARP request.
        let mut req = Vec::new();
        let IpAddr::V4(pip) = n.peer.ip else {
            unreachable!()
        };
        let IpAddr::V4(mip) = me else { unreachable!() };
        emit::arp_request(&mut req, PEER_MAC, pip, mip);
        assert!(
            !n.toe.input(&req, false, tcp::Instant(0), &n.mem),
            "ARP goes on to the driver"
        );
        let hello = pattern(5000, 3);
        n.peer.conn.as_mut().unwrap().0.send(&hello);
        n.run_until("incoming", |n| {
            n.events.iter().any(|e| matches!(e, Event::Incoming { .. }))
        });
        let Some(Event::Incoming {
            listener,
            handle,
            remote,
        }) = n.take(|e| matches!(e, Event::Incoming { .. }))
        else {
            unreachable!()
        };
        assert_eq!((listener, remote), (1, here));
        let (rx, tx) = rings(0);
        assert_eq!(
            n.cmd(Command::Accept {
                conn: 2,
                handle,
                rx,
                tx
            }),
            Completion::ok(0)
        );
        assert_eq!(
            n.cmd(Command::Accept {
                conn: 4,
                handle,
                rx,
                tx
            }),
            Completion::err(Status::NoSuchHandle),
            "a handle is taken once"
        );
        n.run_until("data", |n| {
            n.events
                .iter()
                .any(|e| matches!(e, Event::Data { conn: 2, .. }))
        });
        let Some(Event::Data { tail, .. }) = n.take(|e| matches!(e, Event::Data { .. })) else {
            unreachable!()
        };
        assert_eq!(tail as usize, hello.len());
        let mut buf = vec![0; hello.len()];
        assert!(read_ring(&n.mem, rx, 0, &mut buf));
        assert_eq!(buf, hello);
        assert_eq!(n.toe.stats().accepts, 1);
    }

    /// Commands the device must refuse, each with its status, and the
    /// table's bound: a waiting connection counts, and past the table a
    /// CONNECT is refused (counted) and a SYN dropped (counted).
    #[test]
    fn bounds_and_refusals() {
        let mem = Mem(RefCell::new(vec![0; 1 << 20]));
        let mut toe = Toe::new(ToeConfig {
            mac: DEV_MAC,
            mtu: 1500,
            max_conns: 2,
            offload: false,
            tcp: tcp::Config::default(),
            reassembly: frag::Limits::default(),
        });
        let t = tcp::Instant(0);
        let (rx, tx) = rings(0);
        let remote: SocketAddr = "192.0.2.1:80".parse().unwrap();
        let connect = |conn, rx, tx| Command::Connect {
            conn,
            remote,
            local_port: 0,
            rx,
            tx,
        };
        assert_eq!(
            toe.command(&connect(0, rx, tx), t, &mem),
            Completion::err(Status::NotReady)
        );
        assert_eq!(
            toe.command(
                &Command::Hello {
                    version: 2,
                    conns: 4
                },
                t,
                &mem
            ),
            Completion::err(Status::Invalid)
        );
        assert_eq!(
            toe.command(
                &Command::Hello {
                    version: 1,
                    conns: 100
                },
                t,
                &mem
            ),
            Completion::ok(2),
            "the device grants what it has"
        );
        assert_eq!(
            toe.command(&connect(0, rx, tx), t, &mem),
            Completion::err(Status::NoAddress)
        );
        toe.command(
            &Command::IfConfig {
                addr: "192.0.2.2".parse().unwrap(),
                prefix: 24,
                gateway: None,
            },
            t,
            &mem,
        );
        assert_eq!(
            toe.command(&connect(2, rx, tx), t, &mem),
            Completion::err(Status::BadId)
        );
        let outside = RingSpec {
            addr: BASE + (1 << 20) - u64::from(RING_MIN) + 1,
            size: RING_MIN,
        };
        assert_eq!(
            toe.command(&connect(0, outside, tx), t, &mem),
            Completion::err(Status::BadRing)
        );
        assert_eq!(
            toe.command(&Command::Send { conn: 1, tail: 1 }, t, &mem),
            Completion::err(Status::BadId)
        );
        let six: SocketAddr = "[2001:db8::1]:80".parse().unwrap();
        assert_eq!(
            toe.command(
                &Command::Connect {
                    conn: 0,
                    remote: six,
                    local_port: 0,
                    rx,
                    tx
                },
                t,
                &mem
            ),
            Completion::err(Status::NoAddress)
        );
        assert_eq!(
            toe.command(
                &Command::Listen {
                    id: 0,
                    port: 80,
                    family: Family::V4,
                    backlog: 1
                },
                t,
                &mem
            ),
            Completion::ok(0)
        );
        assert_eq!(
            toe.command(
                &Command::Listen {
                    id: 1,
                    port: 80,
                    family: Family::V4,
                    backlog: 1
                },
                t,
                &mem
            ),
            Completion::err(Status::PortInUse)
        );
        // A SYN to the listener: one connection waiting.
        let syn = |port: u16| {
            let mut c = Connection::connect(tcp::Config::default(), t, port, 80, 1);
            let seg = c.poll_transmit(t, 1460).unwrap();
            let mut f = Vec::new();
            let (l, r): (SocketAddr, SocketAddr) = (
                SocketAddr::new(remote.ip(), port),
                "192.0.2.2:80".parse().unwrap(),
            );
            emit::tcp_segment(&mut f, PEER_MAC, l, r, &seg, 0, false).unwrap();
            f[..6].copy_from_slice(DEV_MAC.as_bytes());
            f
        };
        assert!(toe.input(&syn(1000), false, t, &mem));
        assert_eq!(toe.connections(), 1);
        assert!(toe.input(&syn(1001), false, t, &mem), "taken, then dropped");
        assert_eq!(toe.stats().syn_dropped, 1, "past the backlog of 1");
        assert_eq!(toe.command(&connect(0, rx, tx), t, &mem).status, Status::Ok);
        let (rx1, tx1) = rings(1);
        assert_eq!(
            toe.command(&connect(1, rx1, tx1), t, &mem),
            Completion::err(Status::TableFull)
        );
        assert_eq!(toe.stats().table_full, 1);
        assert!(
            !toe.input(&syn(1004), false, t, &mem),
            "with the table full a SYN goes on to the driver"
        );
        assert_eq!(toe.stats().table_full, 2);
        // Frames that are not the TOE's go on to the driver.
        let mut other = syn(1002);
        other[ETH_LEN + 20 + 2..ETH_LEN + 20 + 4].copy_from_slice(&81u16.to_be_bytes());
        assert!(!toe.input(&other, true, t, &mem), "no flow, no listener");
        let mut bad = syn(1003);
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        assert!(toe.input(&bad, false, t, &mem));
        assert_eq!(toe.stats().segments_bad, 1);
        let s = toe.stats();
        assert_eq!(s.commands_refused, 9);
    }

    /// A peer with nothing on the port refuses (CLOSED, refused); an
    /// established connection the peer resets ends CLOSED, reset; and a
    /// device reset sends a RST for every connection.
    #[test]
    fn refused_reset_and_device_reset() {
        let mut n = Net::new(false, 8);
        let (rx, tx) = rings(0);
        let remote = SocketAddr::new(n.peer.ip, 9);
        n.cmd(Command::Connect {
            conn: 0,
            remote,
            local_port: 0,
            rx,
            tx,
        });
        n.run_until("refused", |n| {
            n.events.iter().any(|e| matches!(e, Event::Closed { .. }))
        });
        assert_eq!(
            n.take(|e| matches!(e, Event::Closed { .. })),
            Some(Event::Closed {
                conn: 0,
                reason: CloseReason::Refused
            })
        );

        n.peer.listen = Some(9);
        n.cmd(Command::Connect {
            conn: 0,
            remote,
            local_port: 0,
            rx,
            tx,
        });
        n.run_until("connected", |n| {
            n.take(|e| matches!(e, Event::Connected { .. })).is_some()
        });
        n.peer.conn.as_mut().unwrap().0.abort();
        n.run_until("reset", |n| {
            n.events.iter().any(|e| matches!(e, Event::Closed { .. }))
        });
        assert_eq!(
            n.take(|e| matches!(e, Event::Closed { .. })),
            Some(Event::Closed {
                conn: 0,
                reason: CloseReason::Reset
            })
        );

        n.peer.conn = None;
        n.cmd(Command::Connect {
            conn: 1,
            remote,
            local_port: 0,
            rx,
            tx,
        });
        n.run_until("connected again", |n| {
            n.take(|e| matches!(e, Event::Connected { .. })).is_some()
        });
        let before = n.peer.resets;
        let mut frames = Vec::new();
        n.toe
            .reset(tcp::Instant(n.now), &mut |_, f| frames.push(f.to_vec()));
        let mut replies = Vec::new();
        for f in &frames {
            n.peer_input(f, &mut replies);
        }
        assert_eq!(n.peer.resets, before + 1, "one RST for the one connection");
        assert_eq!(n.toe.connections(), 0);
        assert_eq!(
            n.cmd(Command::Shutdown { conn: 1 }),
            Completion::err(Status::NotReady)
        );
    }

    /// `frame` cut into fragments of a 1280-byte MTU, last first (IPv4's
    /// don't-fragment cleared first).
    fn fragments(frame: &[u8]) -> Vec<Vec<u8>> {
        let mut whole = frame.to_vec();
        if whole[ETH_LEN] >> 4 == 4 {
            let mut p = ipv4::Packet::new_unchecked(&mut whole[ETH_LEN..]);
            p.set_frag(false, false, 0);
            p.fill_checksum();
        }
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        let n = frag::fragment(&whole, ETH_LEN, 1280, 77, &mut scratch, &mut |f| {
            out.push(f.to_vec())
        })
        .expect("fragments");
        assert!(n >= 3);
        out.reverse();
        out
    }

    /// A TCP segment that arrives in IP fragments (IPv4 and IPv6, out of
    /// order) is put together and its bytes reach the driver's ring; one
    /// of no TOE flow comes back whole for the driver.
    #[test]
    fn fragmented_segments_are_reassembled() {
        for v6 in [false, true] {
            let mut n = Net::new(v6, 8);
            n.peer.listen = Some(5201);
            let (rx, tx) = rings(1);
            let remote = SocketAddr::new(n.peer.ip, 5201);
            n.cmd(Command::Connect {
                conn: 1,
                remote,
                local_port: 0,
                rx,
                tx,
            });
            n.run_until("connected", |n| {
                n.take(|e| matches!(e, Event::Connected { .. })).is_some()
            });
            let now = tcp::Instant(n.now);
            let data = pattern(3000, 5);
            let (frame, here, there) = {
                let (c, here, there) = n.peer.conn.as_mut().unwrap();
                assert_eq!(c.send(&data), 3000);
                let seg = c.poll_transmit(now, 3000).unwrap();
                assert_eq!(seg.payload_len(), 3000);
                let mut f = Vec::new();
                emit::tcp_segment(&mut f, PEER_MAC, *here, *there, &seg, 9, false).unwrap();
                f[..6].copy_from_slice(DEV_MAC.as_bytes());
                (f, *here, *there)
            };
            for f in fragments(&frame) {
                assert!(n.toe.input(&f, false, now, &n.mem), "a fragment is taken");
            }
            assert!(n.toe.take_whole().is_none(), "the TOE's own");
            n.run_until("data", |n| {
                n.events.iter().any(|e| matches!(e, Event::Data { .. }))
            });
            let Some(Event::Data { tail, .. }) = n.take(|e| matches!(e, Event::Data { .. })) else {
                unreachable!()
            };
            assert_eq!(tail, 3000);
            let mut got = vec![0; 3000];
            assert!(read_ring(&n.mem, rx, 0, &mut got));
            assert_eq!(got, data);
            assert_eq!(n.toe.stats().reassembled, 1);

            // The same datagram to a port the TOE has nothing on.
            let iphl = if v6 { 40 } else { 20 };
            let l4 = ETH_LEN + iphl;
            let mut stray = frame.clone();
            stray[l4 + 2..l4 + 4].copy_from_slice(&9999u16.to_be_bytes());
            let ps = emit::pseudo(here.ip(), there.ip(), emit::TCP, stray.len() - l4);
            emit::l4_checksum(&mut stray, l4, wtcp::CHECKSUM_OFFSET, ps, false);
            let mut whole = None;
            for f in fragments(&stray) {
                assert!(n.toe.input(&f, false, now, &n.mem), "a fragment is taken");
                whole = whole.or(n.toe.take_whole());
            }
            let whole = whole.expect("the driver's datagram comes back whole");
            assert_eq!(&whole[l4..], &stray[l4..], "TCP header and payload");
            assert_eq!(n.toe.stats().reassembled, 2);
        }
    }

    #[test]
    fn next_hop_is_the_gateway_off_link() {
        let i = Iface {
            addr: "192.0.2.2".parse().unwrap(),
            prefix: 24,
            gateway: Some("192.0.2.254".parse().unwrap()),
        };
        assert_eq!(
            i.next_hop("192.0.2.9".parse().unwrap()),
            "192.0.2.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            i.next_hop("198.51.100.1".parse().unwrap()),
            "192.0.2.254".parse::<IpAddr>().unwrap()
        );
        let i = Iface {
            addr: IpAddr::V6("2001:db8::2".parse::<Ipv6Addr>().unwrap()),
            prefix: 64,
            gateway: None,
        };
        let far: IpAddr = "2001:db8:1::1".parse().unwrap();
        assert_eq!(i.next_hop(far), far, "no gateway: on the link");
    }

    /// Engines of one port share the table: a slot one takes is not the
    /// other's, and one given back is. A segment of one engine's flow is
    /// the other's only to pass on, and a waiting connection's handle
    /// names its engine.
    #[test]
    fn engines_share_the_table_and_own_their_flows() {
        let mem = Mem(RefCell::new(vec![0; 1 << 20]));
        let cfg = ToeConfig {
            mac: DEV_MAC,
            mtu: 1500,
            max_conns: 2,
            offload: false,
            tcp: tcp::Config::default(),
            reassembly: frag::Limits::default(),
        };
        let table = Arc::new(ToeTable::default());
        let mut a = Toe::engine(cfg, 0, table.clone());
        let mut b = Toe::engine(cfg, 3, table.clone());
        let t = tcp::Instant(0);
        let me: IpAddr = "192.0.2.2".parse().unwrap();
        let remote: SocketAddr = "192.0.2.1:80".parse().unwrap();
        // HELLO, an address and a listener, as the device sends each to
        // every engine.
        let setup = |e: &mut Toe| {
            let hello = Command::Hello {
                version: VERSION,
                conns: 2,
            };
            assert_eq!(e.command(&hello, t, &mem), Completion::ok(2));
            let ifc = Command::IfConfig {
                addr: me,
                prefix: 24,
                gateway: None,
            };
            assert_eq!(e.command(&ifc, t, &mem), Completion::ok(0));
            let listen = Command::Listen {
                id: 0,
                port: 7000,
                family: Family::Both,
                backlog: 4,
            };
            assert_eq!(e.replicate(&listen, t, &mem), Completion::ok(0));
        };
        setup(&mut a);
        setup(&mut b);
        let connect = |conn, k| {
            let (rx, tx) = rings(k);
            Command::Connect {
                conn,
                remote,
                local_port: 0,
                rx,
                tx,
            }
        };
        let port = a.command(&connect(0, 0), t, &mem);
        assert_eq!(port.status, Status::Ok);
        // Engine b picks its own port: the device's CONNECT picks one
        // free on the engine the pair lands on.
        let (rx, tx) = rings(1);
        let b_conn = Command::Connect {
            conn: 1,
            remote,
            local_port: 50000,
            rx,
            tx,
        };
        assert_eq!(b.command(&b_conn, t, &mem), Completion::ok(50000));
        assert_eq!(table.connections(), 2);
        assert_eq!(
            a.command(&connect(1, 2), t, &mem),
            Completion::err(Status::TableFull),
            "the other engine holds the table's last slot"
        );
        assert_eq!(a.stats().table_full, 1);
        assert!(a.has_conn(0) && !a.has_conn(1) && b.has_conn(1));
        let local = SocketAddr::new(me, port.value as u16);
        assert!(!a.pair_free(local, remote) && b.pair_free(local, remote));
        assert!(!a.pair_free(SocketAddr::new(me, 7000), "192.0.2.9:1".parse().unwrap()));

        // The peer's SYN-ACK to engine a's connection.
        let flow = build::Flow {
            src_mac: PEER_MAC,
            dst_mac: DEV_MAC,
            src_ip: remote.ip(),
            dst_ip: me,
            src_port: remote.port(),
            dst_port: local.port(),
        };
        let mut seg = build::data_segment(99, 0, wtcp::Flags::SYN | wtcp::Flags::ACK);
        seg.timestamp = None;
        let f = build::tcp_frame(&flow, seg, &build::IpFields::default(), &[]).unwrap();
        assert!(!b.input_owned(&f, false, t, &mem), "not b's flow");
        assert!(a.input_owned(&f, false, t, &mem));
        assert_eq!(a.stats().segments_in, 1);

        // Engine b gives its slot back (a device reset, or a HELLO): a may
        // take it.
        b.reset(t, &mut |_, _| {});
        assert_eq!(table.connections(), 1);
        setup(&mut b);
        assert_eq!(table.connections(), 1);
        assert_eq!(a.command(&connect(1, 2), t, &mem).status, Status::Ok);
        assert_eq!(table.connections(), 2);

        // A SYN to the listener on b with the table full goes on to the
        // driver; with room, b makes a waiting connection whose handle
        // names engine 3.
        let syn_flow = build::Flow {
            src_port: 41000,
            dst_port: 7000,
            ..flow
        };
        let mut syn = build::data_segment(500, 0, wtcp::Flags::SYN);
        syn.timestamp = None;
        let f = build::tcp_frame(&syn_flow, syn, &build::IpFields::default(), &[]).unwrap();
        assert!(!b.input(&f, false, t, &mem), "no room: the driver's");
        a.reset(t, &mut |_, _| {});
        assert_eq!(table.connections(), 0);
        assert!(b.input(&f, false, t, &mem));
        assert_eq!(table.connections(), 1);
        let h = *b.pending.keys().next().unwrap();
        assert_eq!(engine_of_handle(h), 3);
    }
}
