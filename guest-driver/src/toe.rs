//! The driver side of the TOE's virtqueues (`vnic_protocol::toe`):
//! commands and their completions, events, and the per-connection payload
//! rings in the driver's DMA memory.

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vnic_protocol::toe::{
    spans, Command, Completion, Event, RingSpec, CMD_LEN, COMPLETION_LEN, EVENT_LEN,
};

use crate::{net::Pool, transport::Doorbell, QueueError, Result};

/// How much the TOE gets of the driver's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToeOptions {
    /// Connections with rings of their own at most.
    pub conns: u16,
    /// Bytes of each ring (RX and TX each), a power of two from 4 KiB to
    /// 2 MiB.
    pub ring: u32,
}

impl Default for ToeOptions {
    /// 64 connections with rings of 2 MiB each way: a ring is the
    /// socket's buffer, and a smaller one means more events (and
    /// wake-ups) per byte. The memory is only touched as it is used.
    fn default() -> Self {
        ToeOptions {
            conns: 64,
            ring: 2 << 20,
        }
    }
}

/// Entries of the command queue.
pub(crate) const CMD_QUEUE: u16 = 64;
/// Entries of the event queue (and event buffers posted).
pub(crate) const EVT_QUEUE: u16 = 256;

/// The TOE's queues and ring memory.
pub struct ToeQueues {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) cmd: Pool,
    pub(crate) cmd_bell: Doorbell,
    pub(crate) evt: Pool,
    pub(crate) evt_bell: Doorbell,
    pub(crate) evt_call: EventFd,
    /// Free ring pairs (RX, TX).
    pub(crate) rings: Vec<(RingSpec, RingSpec)>,
    pub(crate) opts: ToeOptions,
    /// Posted commands the device refused.
    pub(crate) failed: u64,
}

impl std::fmt::Debug for ToeQueues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToeQueues")
            .field("rings_free", &self.rings.len())
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl ToeQueues {
    /// Bytes of DMA memory the TOE needs beyond its queues.
    pub fn ring_memory(o: ToeOptions) -> usize {
        2 * usize::from(o.conns) * o.ring as usize
    }

    /// Runs one command and waits (up to 5 s) for its completion.
    pub fn command(&mut self, c: &Command) -> Result<Completion> {
        let out = self.publish(c)?;
        let done = self.reap_until(Some(out))?;
        let answer = GuestAddress(out.0 + CMD_LEN as u64);
        let mut b = [0u8; COMPLETION_LEN];
        if done {
            self.mem.read_slice(&mut b, answer)?;
        }
        Completion::parse(&b).map_err(|e| crate::Error::Negotiation(format!("TOE completion: {e}")))
    }

    /// Posts a command without waiting for its completion (SEND and
    /// RECVD, which the device refuses only for a driver's mistake): the
    /// completions of earlier ones are taken first, and one that failed
    /// is counted in [`ToeQueues::failed`].
    pub fn post(&mut self, c: &Command) -> Result<()> {
        self.reap_until(None)?;
        self.publish(c).map(drop)
    }

    /// Posted commands the device refused.
    pub fn failed(&self) -> u64 {
        self.failed
    }

    /// Writes `c` into a free buffer and publishes it; returns the buffer.
    fn publish(&mut self, c: &Command) -> Result<GuestAddress> {
        // A chain takes two descriptors and a buffer: with all of them
        // with the device, wait for the oldest to come back.
        while self.cmd.free.is_empty() || self.cmd.q.free() < 2 {
            self.reap_one()?;
        }
        let out = *self.cmd.free.last().ok_or(QueueError::CtrlBusy)?;
        let mem = &self.mem;
        mem.write_slice(&c.to_bytes(), out)?;
        let answer = GuestAddress(out.0 + CMD_LEN as u64);
        mem.write_slice(&[0xff; COMPLETION_LEN], answer)?;
        self.cmd.add_chain(
            mem,
            &[(out, CMD_LEN, false), (answer, COMPLETION_LEN, true)],
        )?;
        // A device still at work on earlier commands needs no kick.
        if self.cmd.q.device_wants_kick(mem)? {
            self.cmd_bell.ring()?;
        }
        Ok(out)
    }

    /// Takes completions: with `want`, until that buffer's (waiting up to
    /// 5 s; whether it came), else those already there.
    fn reap_until(&mut self, want: Option<GuestAddress>) -> Result<bool> {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            while let Some((addr, _)) = self.cmd.used(&self.mem)? {
                if Some(addr) == want {
                    return Ok(true);
                }
                self.check(addr)?;
            }
            let Some(_) = want else {
                return Ok(false);
            };
            if start.elapsed() > Duration::from_secs(5) {
                return Err(QueueError::CtrlTimeout.into());
            }
            spins += 1;
            if spins > 2000 {
                std::thread::sleep(Duration::from_micros(20));
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Waits for one completion of a posted command.
    fn reap_one(&mut self) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some((addr, _)) = self.cmd.used(&self.mem)? {
                return self.check(addr);
            }
            if start.elapsed() > Duration::from_secs(5) {
                return Err(QueueError::CtrlTimeout.into());
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    }

    /// Counts a posted command the device refused.
    fn check(&mut self, out: GuestAddress) -> Result<()> {
        let mut b = [0u8; COMPLETION_LEN];
        self.mem
            .read_slice(&mut b, GuestAddress(out.0 + CMD_LEN as u64))?;
        if Completion::parse(&b).map_or(true, |c| c.status != vnic_protocol::toe::Status::Ok) {
            self.failed += 1;
            log::debug!("a posted TOE command was refused: {b:?}");
        }
        Ok(())
    }

    /// Posts every free event buffer and notifies the device.
    pub fn post_event_buffers(&mut self) -> Result<()> {
        let mut posted = false;
        while !self.evt.free.is_empty() {
            self.evt.add(&self.mem, EVENT_LEN, true)?;
            posted = true;
        }
        if posted {
            self.evt_bell.ring()?;
        }
        Ok(())
    }

    /// Passes every event the device wrote to `f`, then posts the buffers
    /// again and asks for an interrupt at the next event. Returns how
    /// many there were.
    pub fn events(&mut self, f: &mut dyn FnMut(Event)) -> Result<usize> {
        let mut n = 0;
        let mut b = [0u8; EVENT_LEN];
        loop {
            let Some((addr, len)) = self.evt.used(&self.mem)? else {
                // Interrupts on again; an event that raced in is taken now.
                if self.evt.q.enable_interrupts(&self.mem)? {
                    continue;
                }
                break;
            };
            if len as usize == EVENT_LEN {
                self.mem.read_slice(&mut b, addr)?;
                match Event::parse(&b) {
                    Ok(e) => {
                        f(e);
                        n += 1;
                    }
                    Err(e) => log::warn!("TOE event does not parse: {e}"),
                }
            }
        }
        self.post_event_buffers()?;
        Ok(n)
    }

    /// The interrupt of the event queue.
    pub fn evt_call(&self) -> &EventFd {
        &self.evt_call
    }

    /// A free pair of rings (RX, TX).
    pub fn take_rings(&mut self) -> Option<(RingSpec, RingSpec)> {
        self.rings.pop()
    }

    /// Gives rings back once the device let go of them (CLOSED).
    pub fn give_rings(&mut self, r: (RingSpec, RingSpec)) {
        self.rings.push(r);
    }

    /// The memory the rings live in.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

/// Reads `buf.len()` bytes of ring `r` from ring offset `at`.
pub fn read_ring(mem: &GuestMemoryMmap, r: RingSpec, at: u32, buf: &mut [u8]) -> Result<()> {
    let [(s0, l0), (_, l1)] = spans(at, buf.len() as u32, r.size);
    mem.read_slice(&mut buf[..l0], GuestAddress(r.addr + s0 as u64))?;
    mem.read_slice(&mut buf[l0..l0 + l1], GuestAddress(r.addr))?;
    Ok(())
}

/// Writes `data` into ring `r` from ring offset `at`.
pub fn write_ring(mem: &GuestMemoryMmap, r: RingSpec, at: u32, data: &[u8]) -> Result<()> {
    let [(s0, l0), (_, l1)] = spans(at, data.len() as u32, r.size);
    mem.write_slice(&data[..l0], GuestAddress(r.addr + s0 as u64))?;
    mem.write_slice(&data[l0..l0 + l1], GuestAddress(r.addr))?;
    Ok(())
}
