//! The TOE's virtqueues: commands in, completions and events out, the
//! payload rings read and written in guest memory, and the engines
//! (`nic::toe`) fed with the port's received frames and a timer.
//!
//! With VNIC_TOE negotiated the command queue follows the control queue
//! and the event queue follows that (`vnic_protocol::toe`). Both are
//! served by the control thread.
//!
//! A port has one engine per RX queue ([`ToeSet`]). A connection lives in
//! the engine of the queue RSS steers its segments to, so the worker of
//! that queue alone feeds it frames: the device picks the engine when it
//! makes the connection (CONNECT: by the RSS hash of the 4-tuple as its
//! segments will arrive; a SYN: the engine of the worker it came to).
//! Each engine has its own lock, taken by its worker per frame (and once
//! more per batch to settle), and by the control thread per command and
//! per timer expiry. Commands for a connection go to its engine; HELLO,
//! IFCONFIG, LISTEN and UNLISTEN to all of them. The connection table is
//! shared (`ToeTable`), and frames no engine's worker owns (ARP and
//! neighbour discovery) are shown to every engine.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, OnceLock, PoisonError,
    },
    time::Duration,
};

use vhost_user_backend::{VringRwLock, VringT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vnic_protocol::{
    tcp,
    toe::{Command, Completion, Status, CMD_LEN, COMPLETION_LEN, EVENT_LEN},
    virtio::{hdr::HDR_LEN, Features, HdrFlags, VirtioNetHdr},
    wire::{
        build::{self, Flow},
        emit::ETH_LEN,
        ethernet::{ethertype, Address},
        ip_proto, tcp as wtcp,
    },
};

use super::{
    chain::{split_chain, write_span},
    pop_chain, serve_packed,
    split::Regions,
    Request, VnicBackend,
};
use crate::nic::{
    stats::{DropReason, QueueStats},
    toe::{
        engine_of_handle, ephemeral_after, ephemeral_from, RingMemory, Toe, ToeConfig, ToeStats,
        ToeTable,
    },
    TxScratch,
};

/// Commands taken per wake-up before other events get their turn.
const TOE_BUDGET: usize = 256;

/// The driver's memory as the TOE's rings see it.
struct GuestRings<'a>(&'a GuestMemoryMmap);

impl RingMemory for GuestRings<'_> {
    fn contains(&self, addr: u64, len: u64) -> bool {
        len == 0
            || usize::try_from(len)
                .is_ok_and(|l| GuestMemoryBackend::check_range(self.0, GuestAddress(addr), l))
    }

    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        buf.is_empty() || self.0.read_slice(buf, GuestAddress(addr)).is_ok()
    }

    fn write(&self, addr: u64, data: &[u8]) -> bool {
        data.is_empty() || self.0.write_slice(data, GuestAddress(addr)).is_ok()
    }
}

impl VnicBackend {
    /// Whether the driver took the TOE.
    pub(super) fn toe_on(&self) -> bool {
        self.acked().contains(Features::VNIC_TOE)
    }

    fn toe_now(&self) -> tcp::Instant {
        tcp::Instant(self.nic.now() / 1000)
    }

    /// Engine `k`'s lock (engine 0 for a `k` past them).
    fn toe_lock(&self, k: usize) -> MutexGuard<'_, Toe> {
        let e = self.toe.engines.get(k).unwrap_or(&self.toe.engines[0]);
        e.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The engine of a connection from `local` to `remote`: that of the RX
    /// queue RSS steers its segments to, as the uplink or the switch
    /// would.
    fn toe_engine_for(&self, local: SocketAddr, remote: SocketAddr) -> usize {
        // Steering reads the addresses and ports alone: any MACs do.
        let flow = Flow {
            src_mac: Address([2, 0, 0, 0, 0, 1]),
            dst_mac: Address([2, 0, 0, 0, 0, 2]),
            src_ip: remote.ip(),
            dst_ip: local.ip(),
            src_port: remote.port(),
            dst_port: local.port(),
        };
        let seg = build::data_segment(0, 0, wtcp::Flags::ACK);
        let Ok(f) = build::tcp_frame(&flow, seg, &build::IpFields::default(), &[]) else {
            return 0;
        };
        let q = usize::from(self.nic.steer(self.port, &f).queue);
        self.dev()
            .rx_queue(q, 0)
            .min(self.toe.engines.len().saturating_sub(1))
    }

    /// Sends a frame engine `k` made through the port's transmit path, as
    /// if its driver had put it on TX queue `k` (counted there).
    fn toe_send(&self, k: usize, scratch: &mut TxScratch, hdr: &VirtioNetHdr, frame: &[u8]) {
        self.toe_send_pieces(k, scratch, hdr, frame, [&[], &[]]);
    }

    /// [`VnicBackend::toe_send`] for a segment's headers and its payload
    /// in the engine's buffer, which goes to the uplink without a copy.
    fn toe_send_pieces(
        &self,
        k: usize,
        scratch: &mut TxScratch,
        hdr: &VirtioNetHdr,
        head: &[u8],
        payload: [&[u8]; 2],
    ) {
        let mut h = [0u8; HDR_LEN];
        if hdr.emit(&mut h, false).is_err() {
            return;
        }
        if let Err(why) = self
            .nic
            .transmit_vectored(self.port, k, &h, head, &payload, scratch)
        {
            log::debug!("toe: frame not sent: {why:?}");
        }
    }

    /// After engine `k` moved: sends what it has, delivers its events and
    /// re-arms the timer.
    fn toe_settle(&self, k: usize, toe: &mut Toe, mem: &GuestMemoryMmap) {
        let now = self.toe_now();
        let scratch = std::cell::RefCell::new(TxScratch::default());
        toe.transmit_pieces(
            now,
            &GuestRings(mem),
            &mut |h, f| self.toe_send(k, &mut scratch.borrow_mut(), h, f),
            Some(&mut |h, f, p| self.toe_send_pieces(k, &mut scratch.borrow_mut(), h, f, p)),
        );
        if let Some((_, evt)) = self.toe.vrings.get() {
            if let Err(e) = self.toe_events(toe, evt, mem) {
                log::debug!("toe events: {e}");
            }
        }
        self.toe_arm(k, toe, now);
        self.toe_count(k, toe);
    }

    /// Moves engine `k`'s counts to the port's counters.
    fn toe_count(&self, k: usize, toe: &mut Toe) {
        let c = &self.dev().stats.toe;
        let s = toe.take_stats();
        c.add(&s);
        if let Some(e) = c.engines.get(k) {
            e.segments_in.fetch_add(s.segments_in, Ordering::Relaxed);
            e.opened
                .fetch_add(s.connects + s.accepts, Ordering::Relaxed);
            e.connections
                .store(toe.connections() as u64, Ordering::Relaxed);
        }
        c.connections
            .store(u64::from(self.toe.table.connections()), Ordering::Relaxed);
    }

    /// Sets the timer to the earliest deadline of all the engines, with
    /// engine `k`'s now that of `toe`.
    fn toe_arm(&self, k: usize, toe: &Toe, now: tcp::Instant) {
        self.toe_arm_with(Some((k, toe)), now);
    }

    /// Sets the timer to the earliest deadline of all the engines, first
    /// noting engine `k`'s (`toe`'s) if given.
    fn toe_arm_with(&self, engine: Option<(usize, &Toe)>, now: tcp::Instant) {
        let mut t = self
            .toe_timer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((d, toe)) = engine.and_then(|(k, toe)| Some((self.toe.due.get(k)?, toe))) {
            let at = toe.poll_timeout().map_or(u64::MAX, |at| at.0);
            d.store(at, Ordering::Relaxed);
        }
        let first = self
            .toe
            .due
            .iter()
            .map(|d| d.load(Ordering::Relaxed))
            .min()
            .unwrap_or(u64::MAX);
        let r = if first == u64::MAX {
            t.clear()
        } else {
            let us = first.saturating_sub(now.0).max(1);
            t.reset(Duration::from_micros(us), None)
        };
        if let Err(e) = r {
            log::warn!("toe timer: {e}");
        }
    }

    /// Writes queued events into the buffers the driver posted on the
    /// event queue, as many as there are, and notifies. One engine at a
    /// time writes (the queue's notification bookkeeping is not shared).
    fn toe_events(
        &self,
        toe: &mut Toe,
        evt: &VringRwLock,
        mem: &GuestMemoryMmap,
    ) -> io::Result<()> {
        if !toe.has_events() {
            return Ok(());
        }
        let _one = self
            .toe
            .events
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let stats = &self.dev().stats.ctrl;
        if self.acked().contains(Features::RING_PACKED) {
            let sink = self.packed_moved.get(2 * self.pairs() + 2);
            let (used, _) = serve_packed(evt, mem, stats, sink, usize::MAX, |r| {
                if !toe.has_events() {
                    return None;
                }
                Some(event_into(toe, mem, stats, r))
            })?;
            if used > 0 {
                self.notify(2 * self.pairs() + 2, evt, mem, stats)?;
            }
            return Ok(());
        }
        let (mut readable, mut writable) = (Vec::new(), Vec::new());
        let mut used = 0;
        while toe.has_events() {
            let Some(chain) = pop_chain(evt, &mem, stats) else {
                break;
            };
            let head = chain.head_index();
            let request = split_chain(mem, chain, &mut readable, &mut writable)
                .map(|()| (readable.as_slice(), writable.as_slice()));
            let len = event_into(toe, mem, stats, request);
            evt.add_used(head, len).map_err(io::Error::other)?;
            used += 1;
        }
        if used > 0 {
            self.notify(2 * self.pairs() + 2, evt, mem, stats)?;
        }
        Ok(())
    }

    /// Runs one command on the engines it is for; `touched[k]`: engine
    /// `k` has work to settle.
    fn toe_command(
        &self,
        cmd: &Command,
        mem: &GuestMemoryMmap,
        touched: &mut [bool],
    ) -> Completion {
        let now = self.toe_now();
        let rings = GuestRings(mem);
        let mut owners = self
            .toe
            .owners
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let on = |k: usize, touched: &mut [bool]| {
            if let Some(t) = touched.get_mut(k) {
                *t = true;
            }
        };
        match *cmd {
            Command::Hello { .. }
            | Command::IfConfig { .. }
            | Command::Listen { .. }
            | Command::Unlisten { .. } => {
                // Every engine keeps the same addresses and listeners; the
                // first one's answer (and counts) stand for all.
                let first = self.toe_lock(0).command(cmd, now, &rings);
                for k in 1..self.toe.engines.len() {
                    self.toe_lock(k).replicate(cmd, now, &rings);
                    on(k, touched);
                }
                on(0, touched);
                if matches!(cmd, Command::Hello { .. }) {
                    owners.clear();
                }
                first
            }
            Command::Connect {
                conn,
                remote,
                local_port,
                rx,
                tx,
            } => {
                if self.toe_conn_elsewhere(&owners, conn, usize::MAX) {
                    return self.toe_refuse(Status::BadId);
                }
                let local_ip = self.toe_lock(0).address(remote.is_ipv6());
                let Some(ip) = local_ip else {
                    return self.toe_lock(0).command(cmd, now, &rings);
                };
                let port = if local_port != 0 {
                    local_port
                } else {
                    match self.toe_ephemeral(SocketAddr::new(ip, 0), remote) {
                        Some(p) => p,
                        None => return self.toe_refuse(Status::PortInUse),
                    }
                };
                let k = self.toe_engine_for(SocketAddr::new(ip, port), remote);
                let c = Command::Connect {
                    conn,
                    remote,
                    local_port: port,
                    rx,
                    tx,
                };
                let r = self.toe_lock(k).command(&c, now, &rings);
                if r.status == Status::Ok {
                    owners.insert(conn, k as u8);
                }
                on(k, touched);
                r
            }
            Command::Accept { conn, handle, .. } => {
                let k = engine_of_handle(handle);
                if k >= self.toe.engines.len() {
                    return self.toe_refuse(Status::NoSuchHandle);
                }
                if self.toe_conn_elsewhere(&owners, conn, k) {
                    return self.toe_refuse(Status::BadId);
                }
                let r = self.toe_lock(k).command(cmd, now, &rings);
                if r.status == Status::Ok {
                    owners.insert(conn, k as u8);
                }
                on(k, touched);
                r
            }
            Command::Send { conn, .. }
            | Command::Recvd { conn, .. }
            | Command::Shutdown { conn }
            | Command::Close { conn }
            | Command::Abort { conn }
            | Command::SetOpt { conn, .. } => {
                let k = owners.get(&conn).map_or(0, |&k| usize::from(k));
                on(k, touched);
                self.toe_lock(k).command(cmd, now, &rings)
            }
        }
    }

    /// A command refused before any engine saw it, counted as an engine
    /// would count it.
    fn toe_refuse(&self, s: Status) -> Completion {
        let c = &self.dev().stats.toe;
        c.add(&crate::nic::toe::ToeStats {
            commands: 1,
            commands_refused: 1,
            ..Default::default()
        });
        Completion::err(s)
    }

    /// Whether connection id `conn` is still taken on an engine other
    /// than `k` (the last one it was given to).
    fn toe_conn_elsewhere(&self, owners: &HashMap<u32, u8>, conn: u32, k: usize) -> bool {
        match owners.get(&conn) {
            Some(&j) if usize::from(j) != k => self.toe_lock(usize::from(j)).has_conn(conn),
            _ => false,
        }
    }

    /// A free ephemeral port for a connection from `local`'s address to
    /// `remote`, looked for on the engine each candidate would land on.
    fn toe_ephemeral(&self, local: SocketAddr, remote: SocketAddr) -> Option<u16> {
        let first = self.toe.next_port.load(Ordering::Relaxed);
        let p = ephemeral_from(first).find(|&p| {
            let l = SocketAddr::new(local.ip(), p);
            self.toe_lock(self.toe_engine_for(l, remote))
                .pair_free(l, remote)
        })?;
        self.toe
            .next_port
            .store(ephemeral_after(p), Ordering::Relaxed);
        Some(p)
    }

    /// Runs the commands on the command queue (at most [`TOE_BUDGET`],
    /// then the resume event brings the thread back).
    pub(super) fn process_toe(&self, cmd: &VringRwLock, evt: &VringRwLock) -> io::Result<()> {
        let _ = self.toe.vrings.get_or_init(|| (cmd.clone(), evt.clone()));
        let mem = self.memory();
        let stats = &self.dev().stats.ctrl;
        let vq = 2 * self.pairs() + 1;
        let mut touched = vec![false; self.toe.engines.len()];
        let r = self.serve_requests(vq, cmd, &mem, TOE_BUDGET, |readable, writable| {
            if writable.iter().map(|w| w.1).sum::<usize>() < COMPLETION_LEN {
                stats.drop(DropReason::BadControl);
                return 0;
            }
            let c = if !self.toe_on() {
                Completion::err(Status::NotReady)
            } else {
                match Command::parse(readable.get(..CMD_LEN).unwrap_or(readable)) {
                    Ok(c) => self.toe_command(&c, &mem, &mut touched),
                    Err(e) => {
                        log::debug!("toe command does not parse: {e}");
                        Completion::err(Status::Invalid)
                    }
                }
            };
            match write_span(&mut Regions::new(&mem), writable, 0, &c.to_bytes()) {
                Ok(()) => {
                    stats.packet(readable.len());
                    COMPLETION_LEN as u32
                }
                Err(why) => {
                    stats.drop(why);
                    0
                }
            }
        });
        for (k, _) in touched.iter().enumerate().filter(|(_, t)| **t) {
            let mut toe = self.toe_lock(k);
            self.toe_settle(k, &mut toe, &mem);
        }
        r
    }

    /// The driver posted event buffers: events waiting go into them.
    pub(super) fn process_toe_events(
        &self,
        cmd: &VringRwLock,
        evt: &VringRwLock,
    ) -> io::Result<()> {
        let _ = self.toe.vrings.get_or_init(|| (cmd.clone(), evt.clone()));
        let mem = self.memory();
        for k in 0..self.toe.engines.len() {
            let mut toe = self.toe_lock(k);
            self.toe_events(&mut toe, evt, &mem)?;
            // A CLOSED taken gave back its table slot.
            self.toe_count(k, &mut toe);
        }
        Ok(())
    }

    /// The TOE's timer fired: the engines' timers that are due run.
    pub(super) fn toe_timer_fired(&self) {
        {
            let mut t = self
                .toe_timer
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // Expired: reading clears it (the fd does not block).
            let _ = t.wait();
        }
        let mem = self.memory();
        let now = self.toe_now();
        for k in 0..self.toe.engines.len() {
            if self.toe.due[k].load(Ordering::Relaxed) > now.0 {
                continue;
            }
            let mut toe = self.toe_lock(k);
            let mut scratch = TxScratch::default();
            toe.on_timer(now, &GuestRings(&mem), &mut |h, f| {
                self.toe_send(k, &mut scratch, h, f)
            });
            self.toe_settle(k, &mut toe, &mem);
        }
        // Engines that were not due yet (one's deadline may have moved
        // since the timer was set): the timer goes on for them.
        self.toe_arm_with(None, now);
    }

    /// Offers a frame that came to RX queue `i` (`buf`: the 12-byte
    /// header, then the frame) to queue `i`'s engine, which owns the
    /// connections RSS steers there. ARP and neighbour discovery are
    /// shown to every engine; a TCP segment engine `i` does not own goes
    /// to the engine that does, if any (counted: RSS changed since the
    /// connection was made, or a datagram put together from fragments).
    pub(super) fn toe_input(&self, i: usize, buf: &[u8]) -> ToeVerdict {
        let Some(frame) = buf.get(HDR_LEN..) else {
            return ToeVerdict::Pass;
        };
        let verified = VirtioNetHdr::parse(&buf[..HDR_LEN], false).is_ok_and(|h| {
            h.flags
                .intersects(HdrFlags::DATA_VALID | HdrFlags::NEEDS_CSUM)
        });
        let mem = self.memory();
        let rings = GuestRings(&mem);
        let now = self.toe_now();
        let k = i.min(self.toe.engines.len().saturating_sub(1));
        let (took, whole) = {
            let mut toe = self.toe_lock(k);
            let took = toe.input(frame, verified, now, &rings);
            if !took && toe.stats() != ToeStats::default() {
                // A frame passed on may still have been counted (a SYN
                // past the table).
                self.toe_count(k, &mut toe);
            }
            (took, toe.take_whole())
        };
        if took {
            // Settled once for the RX worker's batch (toe_settle_batch):
            // one DATA event, one notification and the ACKs for every
            // frame of it, rather than for each.
            self.toe.unsettled[k].store(true, Ordering::Release);
        }
        match (took, whole) {
            (true, None) => ToeVerdict::Taken,
            (true, Some(w)) => match self.toe_elsewhere(k, &w, false, now, &rings) {
                true => ToeVerdict::Taken,
                false => ToeVerdict::Whole(w),
            },
            (false, _) => match classify(frame) {
                Kind::Neighbour => {
                    for j in (0..self.toe.engines.len()).filter(|&j| j != k) {
                        let mut toe = self.toe_lock(j);
                        toe.input(frame, verified, now, &rings);
                        if toe.holds_frames() {
                            self.toe.unsettled[j].store(true, Ordering::Release);
                        }
                    }
                    ToeVerdict::Pass
                }
                Kind::Tcp if self.toe_elsewhere(k, frame, verified, now, &rings) => {
                    ToeVerdict::Taken
                }
                _ => ToeVerdict::Pass,
            },
        }
    }

    /// Offers a TCP segment engine `k` did not own to the other engines;
    /// true when one took it (counted in `toe.foreign`).
    fn toe_elsewhere(
        &self,
        k: usize,
        frame: &[u8],
        verified: bool,
        now: tcp::Instant,
        rings: &GuestRings<'_>,
    ) -> bool {
        let n = self.toe.engines.len();
        let Some(j) = (0..n)
            .filter(|&j| j != k)
            .find(|&j| self.toe_lock(j).input_owned(frame, verified, now, rings))
        else {
            return false;
        };
        self.toe.unsettled[j].store(true, Ordering::Release);
        self.dev().stats.toe.foreign.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// A frame queued for RX queue `i` (12-byte header first), offered to
    /// the port's TOE; what the TOE does not take goes to `up` (the
    /// driver), as it is or, for a fragment that completed a datagram no
    /// TOE flow owns, as that datagram. Returns what `up` returned
    /// (false: no buffers, the frame stays in the backlog and is offered
    /// again), or true when the TOE took it.
    pub(super) fn toe_then(
        &self,
        i: usize,
        f: &[u8],
        stats: &crate::nic::stats::QueueStats,
        up: impl FnOnce(&[u8]) -> bool,
    ) -> bool {
        match self.toe_input(i, f) {
            ToeVerdict::Taken => true,
            ToeVerdict::Pass => up(f),
            ToeVerdict::Whole(w) => {
                let mut whole = vec![0u8; HDR_LEN];
                whole.extend_from_slice(&w);
                if !up(&whole) {
                    // The fragments are gone into the datagram: it cannot
                    // wait for buffers as the last fragment would.
                    stats.drop(crate::nic::DropReason::RxNoBuffers);
                }
                true
            }
        }
    }

    /// At the end of an RX worker's batch: settles what the engines took
    /// in it (its own, and any other a frame of it went to).
    pub(super) fn toe_settle_batch(&self) {
        let mut mem = None;
        for (k, u) in self.toe.unsettled.iter().enumerate() {
            if !u.swap(false, Ordering::AcqRel) {
                continue;
            }
            let mem = mem.get_or_insert_with(|| self.memory());
            let mut toe = self.toe_lock(k);
            self.toe_settle(k, &mut toe, mem);
        }
    }

    /// The driver reset the device or went away: every TOE connection is
    /// reset on the wire and forgotten.
    pub fn toe_reset(&self) {
        let mut live = 0;
        for k in 0..self.toe.engines.len() {
            let mut toe = self.toe_lock(k);
            live += toe.connections();
            let mut scratch = TxScratch::default();
            toe.reset(self.toe_now(), &mut |h, f| {
                self.toe_send(k, &mut scratch, h, f)
            });
            self.toe_count(k, &mut toe);
        }
        self.toe
            .owners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        if live > 0 {
            log::info!("port {}: {live} TOE connections reset", self.port);
        }
    }
}

/// What a frame the queue's engine passed on may still be to the others.
enum Kind {
    /// ARP, or ICMPv6 (neighbour discovery): every engine learns from it.
    Neighbour,
    /// IPv4 or IPv6 carrying TCP.
    Tcp,
    Other,
}

fn classify(frame: &[u8]) -> Kind {
    match frame.get(12..14).map(|t| u16::from_be_bytes([t[0], t[1]])) {
        Some(ethertype::ARP) => Kind::Neighbour,
        Some(ethertype::IPV4) => match frame.get(ETH_LEN + 9) {
            Some(&ip_proto::TCP) => Kind::Tcp,
            _ => Kind::Other,
        },
        Some(ethertype::IPV6) => match frame.get(ETH_LEN + 6) {
            Some(&ip_proto::TCP) => Kind::Tcp,
            Some(&ip_proto::ICMPV6) => Kind::Neighbour,
            _ => Kind::Other,
        },
        _ => Kind::Other,
    }
}

/// A port's TOE engines, one per RX queue, and what they share.
pub(super) struct ToeSet {
    engines: Vec<Mutex<Toe>>,
    table: Arc<ToeTable>,
    /// Per engine: it took frames whose ACKs, events and timer are still
    /// to go out (at the end of an RX worker's batch).
    unsettled: Vec<AtomicBool>,
    /// Per engine: its next deadline (the engines' clock, µs; `u64::MAX`
    /// for none), written under the timer's lock.
    due: Vec<AtomicU64>,
    /// Connection id -> engine, as CONNECT and ACCEPT placed them (the
    /// control thread's).
    owners: Mutex<HashMap<u32, u8>>,
    /// Where the search for a free ephemeral port starts next.
    next_port: AtomicU16,
    /// Held while events are written to the event queue.
    events: Mutex<()>,
    vrings: ToeVrings,
}

impl ToeSet {
    /// `n` engines (one per RX queue) of the same configuration.
    pub(super) fn new(cfg: ToeConfig, n: usize) -> ToeSet {
        let n = n.clamp(1, 1 << 8);
        let table = Arc::new(ToeTable::default());
        ToeSet {
            engines: (0..n)
                .map(|k| Mutex::new(Toe::engine(cfg, k as u8, table.clone())))
                .collect(),
            table,
            unsettled: (0..n).map(|_| AtomicBool::new(false)).collect(),
            due: (0..n).map(|_| AtomicU64::new(u64::MAX)).collect(),
            owners: Mutex::new(HashMap::new()),
            next_port: AtomicU16::new(0),
            events: Mutex::new(()),
            vrings: OnceLock::new(),
        }
    }
}

/// What the TOE did with a frame from the uplink.
pub(super) enum ToeVerdict {
    /// Not the TOE's: on to the driver.
    Pass,
    Taken,
    /// A fragment completed a datagram the TOE does not own: the driver
    /// gets the whole datagram (Ethernet header first) instead.
    Whole(Vec<u8>),
}

/// The TOE's vrings once the control thread saw them.
pub(super) type ToeVrings = OnceLock<(VringRwLock, VringRwLock)>;

/// Writes the next queued TOE event into an event buffer `request` (no
/// readable part, room for an event); the bytes written. A bad buffer
/// is counted and goes back empty, and so does one for which every
/// queued event was stale (the driver posts it again).
fn event_into(
    toe: &mut Toe,
    mem: &GuestMemoryMmap,
    stats: &QueueStats,
    request: Request<'_>,
) -> u32 {
    match request {
        Ok((readable, writable))
            if readable.is_empty() && writable.iter().map(|w| w.1).sum::<usize>() >= EVENT_LEN =>
        {
            match toe.pop_event() {
                Some(e) => match write_span(&mut Regions::new(mem), writable, 0, &e.to_bytes()) {
                    Ok(()) => EVENT_LEN as u32,
                    Err(why) => {
                        stats.drop(why);
                        0
                    }
                },
                None => 0,
            }
        }
        Ok(_) => {
            stats.drop(DropReason::BadControl);
            0
        }
        Err(why) => {
            stats.drop(why);
            0
        }
    }
}
