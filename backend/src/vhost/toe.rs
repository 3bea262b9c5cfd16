//! The TOE's virtqueues: commands in, completions and events out, the
//! payload rings read and written in guest memory, and the engine
//! (`nic::toe`) fed with the port's uplink frames and its own timer.
//!
//! With VNIC_TOE negotiated the command queue follows the control queue
//! and the event queue follows that (`vnic_protocol::toe`). Both are
//! served by the control thread; the PF's RX workers hand the engine the
//! uplink frames it may own. One lock (`VnicBackend::toe`) guards the
//! engine: taken per command batch, per timer expiry and, while the TOE
//! is negotiated, per frame read from the uplink.

use std::{
    io,
    sync::{OnceLock, PoisonError},
    time::Duration,
};

use vhost_user_backend::{VringRwLock, VringT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vnic_protocol::{
    tcp,
    toe::{Command, Completion, Status, CMD_LEN, COMPLETION_LEN, EVENT_LEN},
    virtio::{hdr::HDR_LEN, Features, HdrFlags, VirtioNetHdr},
};

use super::{
    chain::{split_chain, write_span},
    pop_chain,
    split::Regions,
    VnicBackend,
};
use crate::nic::{
    stats::DropReason,
    toe::{RingMemory, Toe, ToeStats},
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

    fn toe_lock(&self) -> std::sync::MutexGuard<'_, Toe> {
        self.toe.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends a frame the TOE made through the port's transmit path, as
    /// if its driver had put it on TX queue 0 (counted there).
    fn toe_send(&self, scratch: &mut TxScratch, hdr: &VirtioNetHdr, frame: &[u8]) {
        self.toe_send_pieces(scratch, hdr, frame, [&[], &[]]);
    }

    /// [`VnicBackend::toe_send`] for a segment's headers and its payload
    /// in the engine's buffer, which goes to the uplink without a copy.
    fn toe_send_pieces(
        &self,
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
            .transmit_vectored(self.port, 0, &h, head, &payload, scratch)
        {
            log::debug!("toe: frame not sent: {why:?}");
        }
    }

    /// After the engine moved: sends what it has, delivers its events
    /// and re-arms its timer.
    fn toe_settle(&self, toe: &mut Toe, mem: &GuestMemoryMmap) {
        let now = self.toe_now();
        let scratch = std::cell::RefCell::new(TxScratch::default());
        toe.transmit_pieces(
            now,
            &GuestRings(mem),
            &mut |h, f| self.toe_send(&mut scratch.borrow_mut(), h, f),
            Some(&mut |h, f, p| self.toe_send_pieces(&mut scratch.borrow_mut(), h, f, p)),
        );
        if let Some((_, evt)) = self.toe_vrings.get() {
            if let Err(e) = self.toe_events(toe, evt, mem) {
                log::debug!("toe events: {e}");
            }
        }
        self.toe_arm(toe, now);
        self.toe_count(toe);
    }

    /// Moves the engine's counts to the port's counters.
    fn toe_count(&self, toe: &mut Toe) {
        let c = &self.dev().stats.toe;
        c.add(&toe.take_stats());
        c.connections.store(
            toe.connections() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn toe_arm(&self, toe: &Toe, now: tcp::Instant) {
        let mut t = self
            .toe_timer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let r = match toe.poll_timeout() {
            Some(at) => {
                let us = at.0.saturating_sub(now.0).max(1);
                t.reset(Duration::from_micros(us), None)
            }
            None => t.clear(),
        };
        if let Err(e) = r {
            log::warn!("toe timer: {e}");
        }
    }

    /// Writes queued events into the buffers the driver posted on the
    /// event queue, as many as there are, and notifies.
    fn toe_events(
        &self,
        toe: &mut Toe,
        evt: &VringRwLock,
        mem: &GuestMemoryMmap,
    ) -> io::Result<()> {
        let stats = &self.dev().stats.ctrl;
        let (mut readable, mut writable) = (Vec::new(), Vec::new());
        let mut used = 0;
        while toe.has_events() {
            let Some(chain) = pop_chain(evt, &mem, stats) else {
                break;
            };
            let head = chain.head_index();
            let len = match split_chain(mem, chain, &mut readable, &mut writable) {
                Ok(())
                    if readable.is_empty()
                        && writable.iter().map(|w| w.1).sum::<usize>() >= EVENT_LEN =>
                {
                    match toe.pop_event() {
                        Some(e) => {
                            match write_span(&mut Regions::new(mem), &writable, 0, &e.to_bytes()) {
                                Ok(()) => EVENT_LEN as u32,
                                Err(why) => {
                                    stats.drop(why);
                                    0
                                }
                            }
                        }
                        // Every queued event was stale: a buffer of
                        // nothing, which the driver posts again.
                        None => 0,
                    }
                }
                Ok(()) => {
                    stats.drop(DropReason::BadControl);
                    0
                }
                Err(why) => {
                    stats.drop(why);
                    0
                }
            };
            evt.add_used(head, len).map_err(io::Error::other)?;
            used += 1;
        }
        if used > 0 {
            self.notify(2 * self.pairs() + 2, evt, mem, stats)?;
        }
        Ok(())
    }

    /// Runs the commands on the command queue (at most [`TOE_BUDGET`],
    /// then the resume event brings the thread back).
    pub(super) fn process_toe(&self, cmd: &VringRwLock, evt: &VringRwLock) -> io::Result<()> {
        let _ = self.toe_vrings.get_or_init(|| (cmd.clone(), evt.clone()));
        let mem = self.memory();
        let stats = &self.dev().stats.ctrl;
        let mut toe = self.toe_lock();
        let vq = 2 * self.pairs() + 1;
        let r = self.serve_requests(vq, cmd, &mem, TOE_BUDGET, |readable, writable| {
            if writable.iter().map(|w| w.1).sum::<usize>() < COMPLETION_LEN {
                stats.drop(DropReason::BadControl);
                return 0;
            }
            let c = if !self.toe_on() {
                Completion::err(Status::NotReady)
            } else {
                match Command::parse(readable.get(..CMD_LEN).unwrap_or(readable)) {
                    Ok(c) => toe.command(&c, self.toe_now(), &GuestRings(&mem)),
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
        self.toe_settle(&mut toe, &mem);
        r
    }

    /// The driver posted event buffers: events waiting go into them.
    pub(super) fn process_toe_events(
        &self,
        cmd: &VringRwLock,
        evt: &VringRwLock,
    ) -> io::Result<()> {
        let _ = self.toe_vrings.get_or_init(|| (cmd.clone(), evt.clone()));
        let mem = self.memory();
        let mut toe = self.toe_lock();
        self.toe_events(&mut toe, evt, &mem)
    }

    /// The TOE's timer fired: the engines' timers run.
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
        let mut toe = self.toe_lock();
        let now = self.toe_now();
        let mut scratch = TxScratch::default();
        toe.on_timer(now, &GuestRings(&mem), &mut |h, f| {
            self.toe_send(&mut scratch, h, f)
        });
        self.toe_settle(&mut toe, &mem);
    }

    /// Offers a frame read from the uplink (`buf`: the TAP's header, then
    /// the frame) to the TOE.
    pub(super) fn toe_input(&self, buf: &[u8]) -> ToeVerdict {
        let Some(frame) = buf.get(HDR_LEN..) else {
            return ToeVerdict::Pass;
        };
        let verified = VirtioNetHdr::parse(&buf[..HDR_LEN], false).is_ok_and(|h| {
            h.flags
                .intersects(HdrFlags::DATA_VALID | HdrFlags::NEEDS_CSUM)
        });
        let mem = self.memory();
        let mut toe = self.toe_lock();
        if !toe.input(frame, verified, self.toe_now(), &GuestRings(&mem)) {
            // A frame passed on may still have been counted (a SYN past
            // the table).
            if toe.stats() != ToeStats::default() {
                self.toe_count(&mut toe);
            }
            return ToeVerdict::Pass;
        }
        let whole = toe.take_whole();
        // Settled once for the RX worker's batch (toe_settle_batch): one
        // DATA event, one notification and the ACKs for every frame of
        // it, rather than for each.
        self.toe_unsettled
            .store(true, std::sync::atomic::Ordering::Release);
        match whole {
            Some(w) => ToeVerdict::Whole(w),
            None => ToeVerdict::Taken,
        }
    }

    /// A frame the switch put in a VF's backlog (12-byte header first),
    /// offered to the VF's TOE; what the TOE does not take goes to `up`
    /// (the driver), as it is or, for a fragment that completed a
    /// datagram no TOE flow owns, as that datagram. Returns what `up`
    /// returned (false: no buffers, the frame stays in the backlog and is
    /// offered again), or true when the TOE took it.
    pub(super) fn vf_toe_then(
        &self,
        f: &[u8],
        stats: &crate::nic::stats::QueueStats,
        up: impl FnOnce(&[u8]) -> bool,
    ) -> bool {
        match self.toe_input(f) {
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

    /// At the end of an RX worker's batch: settles what the TOE took in
    /// it, if anything.
    pub(super) fn toe_settle_batch(&self) {
        if !self
            .toe_unsettled
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let mem = self.memory();
        let mut toe = self.toe_lock();
        self.toe_settle(&mut toe, &mem);
    }

    /// The driver reset the device or went away: every TOE connection is
    /// reset on the wire and forgotten.
    pub fn toe_reset(&self) {
        let mut toe = self.toe_lock();
        let live = toe.connections();
        let mut scratch = TxScratch::default();
        toe.reset(self.toe_now(), &mut |h, f| {
            self.toe_send(&mut scratch, h, f)
        });
        self.toe_count(&mut toe);
        if live > 0 {
            log::info!("port {}: {live} TOE connections reset", self.port);
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
