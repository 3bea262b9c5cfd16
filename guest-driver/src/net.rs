//! `VirtioNet`: negotiation, RX buffer posting, frame transmit and receive
//! over a vhost-user connection.
//!
//! Queue pairs are set up as the device reports them through the
//! transport; without a control queue the driver does not negotiate MQ
//! (it depends on CTRL_VQ) but the vhost-user device serves every queue
//! that is set up.

use std::{
    os::{fd::AsRawFd, unix::net::UnixListener},
    path::Path,
    time::{Duration, Instant},
};

use vm_memory::{Bytes, GuestAddress};
use vnic_protocol::virtio::{
    config::{VirtioNetConfig, CONFIG_LEN},
    ctrl::CtrlCommand,
    hdr::HDR_LEN_HASH,
    validate::MAX_FRAME_LEN,
    Features, VirtioNetHdr,
};

use crate::{
    transport::vhost_user::VhostUserTransport,
    virtqueue::{Buf, RawDesc, SplitQueue},
    Error, Result,
};

/// What to ask of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetOptions {
    pub pairs: u16,
    pub queue_size: u16,
    pub features: Features,
    /// Size of each RX buffer. Zero without MRG_RXBUF means buffers that
    /// hold a whole 64 KiB frame.
    pub rx_buf_len: usize,
    /// Pairs to enable; the rest are set up but left disabled, as a VMM
    /// does for pairs the guest has not asked for. `None`: all.
    pub enabled_pairs: Option<u16>,
}

impl NetOptions {
    /// The features a Linux guest asks for, minus the control queue ones.
    pub const DEFAULT_FEATURES: Features = Features::VERSION_1
        .union(Features::MRG_RXBUF)
        .union(Features::MAC)
        .union(Features::MTU)
        .union(Features::STATUS)
        .union(Features::CSUM)
        .union(Features::GUEST_CSUM)
        .union(Features::HOST_TSO4)
        .union(Features::HOST_TSO6)
        .union(Features::HOST_ECN)
        .union(Features::GUEST_TSO4)
        .union(Features::GUEST_TSO6)
        .union(Features::GUEST_ECN)
        .union(Features::HASH_REPORT);
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            pairs: 1,
            queue_size: 256,
            features: Self::DEFAULT_FEATURES,
            rx_buf_len: 2048,
            enabled_pairs: None,
        }
    }
}

#[derive(Debug)]
struct Pool {
    q: SplitQueue,
    buf_len: usize,
    free: Vec<GuestAddress>,
    /// Buffer of each chain in flight, by head.
    inflight: Vec<Option<GuestAddress>>,
    /// Chains with the device.
    in_flight: usize,
}

impl Pool {
    fn new(t: &mut VhostUserTransport, size: u16, buf_len: usize) -> Result<Pool> {
        let q = SplitQueue::new(&mut t.dma, size)?;
        let mut free = Vec::with_capacity(usize::from(size));
        for _ in 0..size {
            free.push(t.dma.alloc(buf_len, 64)?);
        }
        Ok(Pool {
            q,
            buf_len,
            free,
            inflight: vec![None; usize::from(size)],
            in_flight: 0,
        })
    }

    fn add(&mut self, t: &VhostUserTransport, len: usize, writable: bool) -> Result<GuestAddress> {
        let addr = self.free.pop().ok_or(Error::Queue("no free buffers"))?;
        match self.q.add(
            &t.dma.mem,
            &[Buf {
                addr,
                len: len as u32,
                writable,
            }],
        ) {
            Ok(head) => {
                self.inflight[usize::from(head)] = Some(addr);
                self.in_flight += 1;
                Ok(addr)
            }
            Err(e) => {
                self.free.push(addr);
                Err(e)
            }
        }
    }

    /// The next used buffer of this pool; chains published raw (which
    /// carry no pool buffer) are reclaimed and passed over.
    fn used(&mut self, t: &VhostUserTransport) -> Result<Option<(GuestAddress, u32)>> {
        while let Some((head, len)) = self.q.pop_used(&t.dma.mem)? {
            if let Some(addr) = self.inflight[usize::from(head)].take() {
                self.free.push(addr);
                self.in_flight -= 1;
                return Ok(Some((addr, len)));
            }
        }
        Ok(None)
    }
}

/// A received frame and the header the device wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub hdr: VirtioNetHdr,
    pub frame: Vec<u8>,
    /// RX buffers the frame came in.
    pub buffers: u16,
}

/// A virtio-net device driven over vhost-user.
#[derive(Debug)]
pub struct VirtioNet {
    t: VhostUserTransport,
    pub features: Features,
    hdr_len: usize,
    rx: Vec<Pool>,
    tx: Vec<Pool>,
    /// The control queue and its one command buffer, with CTRL_VQ.
    ctrl: Option<Pool>,
    /// RX buffers returned shorter than a header.
    pub rx_length_errors: u64,
}

/// Bytes of a control command buffer (class, command, data, answer, ack).
const CTRL_BUF: usize = 4096;

impl VirtioNet {
    /// Connects to vnicd's socket and brings the device up.
    pub fn connect(socket: &Path, opts: NetOptions) -> Result<VirtioNet> {
        Self::start(opts, |max_queues, mem| {
            VhostUserTransport::connect(socket, max_queues, mem)
        })
    }

    /// Waits on `listener` for a device that connects to us (`vnicd
    /// --client`) and brings it up.
    pub fn accept(listener: &UnixListener, opts: NetOptions) -> Result<VirtioNet> {
        Self::start(opts, |max_queues, mem| {
            VhostUserTransport::accept(listener, max_queues, mem)
        })
    }

    fn start(
        opts: NetOptions,
        transport: impl FnOnce(usize, usize) -> Result<VhostUserTransport>,
    ) -> Result<VirtioNet> {
        let pairs = usize::from(opts.pairs.max(1));
        let mergeable = opts.features.contains(Features::MRG_RXBUF);
        let rx_len = if mergeable || opts.rx_buf_len > 0 {
            opts.rx_buf_len.max(HDR_LEN_HASH)
        } else {
            MAX_FRAME_LEN + HDR_LEN_HASH
        };
        let tx_len = MAX_FRAME_LEN + HDR_LEN_HASH;
        let n = usize::from(opts.queue_size);
        let mem = pairs * n * (rx_len.div_ceil(64) * 64 + tx_len.div_ceil(64) * 64)
            + pairs * 2 * (16 * n + 16 * n + 64)
            + (1 << 20);
        let mut t = transport(2 * pairs + 1, mem)?;
        let features = t.negotiate(opts.features)?;
        let hdr_len = features.hdr_len();
        let mut rx = Vec::with_capacity(pairs);
        let mut tx = Vec::with_capacity(pairs);
        for i in 0..pairs {
            let r = Pool::new(&mut t, opts.queue_size, rx_len)?;
            let w = Pool::new(&mut t, opts.queue_size, tx_len)?;
            let on = opts.enabled_pairs.is_none_or(|n| i < usize::from(n));
            t.setup_queue_enabled(2 * i, &r.q, on)?;
            t.setup_queue_enabled(2 * i + 1, &w.q, on)?;
            rx.push(r);
            tx.push(w);
        }
        let ctrl = if features.contains(Features::CTRL_VQ) {
            let c = Pool::new(&mut t, 64, CTRL_BUF)?;
            t.setup_queue(2 * pairs, &c.q)?;
            Some(c)
        } else {
            None
        };
        let mut dev = VirtioNet {
            t,
            features,
            hdr_len,
            rx,
            tx,
            ctrl,
            rx_length_errors: 0,
        };
        for i in 0..pairs {
            dev.fill_rx(i)?;
        }
        Ok(dev)
    }

    pub fn pairs(&self) -> usize {
        self.rx.len()
    }

    /// The device's config space.
    pub fn config(&mut self) -> Result<VirtioNetConfig> {
        let b = self.t.read_config(0, CONFIG_LEN as u32)?;
        let arr: [u8; CONFIG_LEN] = b
            .get(..CONFIG_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(Error::Queue("short config space"))?;
        Ok(VirtioNetConfig::from_bytes(&arr))
    }

    /// Sends a control command and waits for the device's answer: the ack
    /// (`ACK_OK` or `ACK_ERR`) and the answer bytes before it.
    pub fn ctrl(&mut self, cmd: &CtrlCommand) -> Result<(u8, Vec<u8>)> {
        let bytes = cmd
            .to_bytes()
            .map_err(|_| Error::Queue("command cannot be encoded"))?;
        self.ctrl_raw(&bytes, cmd.response_len())
    }

    /// Sends raw command bytes (class, command, data) with room for
    /// `response_len` answer bytes and the ack.
    pub fn ctrl_raw(&mut self, bytes: &[u8], response_len: usize) -> Result<(u8, Vec<u8>)> {
        let vq = 2 * self.pairs();
        let pool = self.ctrl.as_mut().ok_or(Error::Queue("no control queue"))?;
        if bytes.len() + response_len + 1 > CTRL_BUF {
            return Err(Error::Queue("control command too long"));
        }
        let out = *pool.free.last().ok_or(Error::Queue("control queue busy"))?;
        let mem = &self.t.dma.mem;
        mem.write_slice(bytes, out)?;
        let answer = out.unchecked_add_len(bytes.len());
        let mut fill = vec![0xffu8; response_len + 1];
        mem.write_slice(&fill, answer)?;
        let head = pool.q.add(
            mem,
            &[
                Buf {
                    addr: out,
                    len: bytes.len() as u32,
                    writable: false,
                },
                Buf {
                    addr: answer,
                    len: (response_len + 1) as u32,
                    writable: true,
                },
            ],
        )?;
        pool.inflight[usize::from(head)] = pool.free.pop();
        pool.in_flight += 1;
        self.t.kick(vq)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if pool.used(&self.t)?.is_some() {
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::Queue("device did not answer the control command"));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        self.t.dma.mem.read_slice(&mut fill, answer)?;
        let ack = fill.pop().unwrap_or(0xff);
        Ok((ack, fill))
    }

    /// Posts every free RX buffer of queue `q` and notifies the device,
    /// unless it asked not to be (VRING_USED_F_NO_NOTIFY).
    pub fn fill_rx(&mut self, q: usize) -> Result<()> {
        let pool = self.rx.get_mut(q).ok_or(Error::Queue("no such queue"))?;
        let mut added = false;
        while !pool.free.is_empty() && pool.q.free() > 0 {
            let len = pool.buf_len;
            pool.add(&self.t, len, true)?;
            added = true;
        }
        if added && pool.q.device_wants_kick(&self.t.dma.mem)? {
            self.t.kick(2 * q)?;
        }
        Ok(())
    }

    /// Sends one frame with its header on TX queue `q`. The header's
    /// `num_buffers` is ignored by the device.
    pub fn send(&mut self, q: usize, hdr: &VirtioNetHdr, frame: &[u8]) -> Result<()> {
        self.reclaim_tx(q)?;
        if !self.post_tx(q, hdr, frame)? {
            return Err(Error::Queue("tx queue full"));
        }
        self.t.kick(2 * q + 1)
    }

    /// Makes a frame available on TX queue `q` without notifying the
    /// device; false when the queue is full. See [`VirtioNet::kick_tx`].
    pub fn post_tx(&mut self, q: usize, hdr: &VirtioNetHdr, frame: &[u8]) -> Result<bool> {
        if frame.len() > MAX_FRAME_LEN {
            return Err(Error::Queue("frame too long"));
        }
        let pool = self.tx.get_mut(q).ok_or(Error::Queue("no such queue"))?;
        if pool.free.is_empty() || pool.q.free() == 0 {
            return Ok(false);
        }
        let mut hb = [0u8; HDR_LEN_HASH];
        let hl = hdr
            .emit(&mut hb, self.hdr_len == HDR_LEN_HASH)
            .map_err(|_| Error::Queue("header"))?;
        let addr = *pool.free.last().ok_or(Error::Queue("tx queue full"))?;
        let mem = &self.t.dma.mem;
        mem.write_slice(&hb[..hl], addr)?;
        mem.write_slice(frame, addr.unchecked_add_len(hl))?;
        pool.add(&self.t, hl + frame.len(), false)?;
        Ok(true)
    }

    /// Notifies the device of frames posted on TX queue `q`.
    pub fn kick_tx(&self, q: usize) -> Result<()> {
        self.t.kick(2 * q + 1)
    }

    /// Sends raw descriptor bytes: `bytes` is header and frame as the
    /// device will read them, with no checks (for tests of bad input).
    pub fn send_raw(&mut self, q: usize, bytes: &[u8]) -> Result<()> {
        self.reclaim_tx(q)?;
        let pool = self.tx.get_mut(q).ok_or(Error::Queue("no such queue"))?;
        let addr = *pool.free.last().ok_or(Error::Queue("tx queue full"))?;
        let n = bytes.len().min(pool.buf_len);
        self.t.dma.mem.write_slice(&bytes[..n], addr)?;
        pool.add(&self.t, n, false)?;
        self.t.kick(2 * q + 1)
    }

    /// Publishes raw descriptors on virtqueue `vq` (see
    /// [`SplitQueue::add_raw`]) and kicks it.
    pub fn send_raw_chain(&mut self, vq: usize, descs: &[RawDesc]) -> Result<u16> {
        let pools = if vq % 2 == 0 {
            &mut self.rx
        } else {
            &mut self.tx
        };
        let pool = pools.get_mut(vq / 2).ok_or(Error::Queue("no such queue"))?;
        let head = pool.q.add_raw(&self.t.dma.mem, descs)?;
        self.t.kick(vq)?;
        Ok(head)
    }

    /// A guest address inside the shared memory with `len` bytes the
    /// driver does not otherwise use (for raw chains).
    pub fn scratch(&mut self, len: usize) -> Result<GuestAddress> {
        self.t.dma.alloc(len, 64)
    }

    /// TX chains the device has consumed on queue `q`.
    pub fn reclaim_tx(&mut self, q: usize) -> Result<usize> {
        let pool = self.tx.get_mut(q).ok_or(Error::Queue("no such queue"))?;
        let mut n = 0;
        while pool.used(&self.t)?.is_some() {
            n += 1;
        }
        Ok(n)
    }

    /// Number of TX chains still with the device.
    pub fn tx_in_flight(&self, q: usize) -> usize {
        self.tx.get(q).map_or(0, |p| p.in_flight)
    }

    /// Takes one received frame from RX queue `q`, if there is one, and
    /// posts its buffers again.
    pub fn recv(&mut self, q: usize) -> Result<Option<Received>> {
        let r = self.recv_one(q)?;
        if r.is_some() {
            self.fill_rx(q)?;
        }
        Ok(r)
    }

    /// Takes up to `budget` frames from RX queue `q`, handing each to `f`,
    /// then posts the buffers again with one notification. Returns how
    /// many frames there were.
    pub fn recv_batch(
        &mut self,
        q: usize,
        budget: usize,
        f: &mut dyn FnMut(Received),
    ) -> Result<usize> {
        let mut n = 0;
        while n < budget {
            match self.recv_one(q)? {
                Some(r) => {
                    f(r);
                    n += 1;
                }
                None => break,
            }
        }
        if n > 0 {
            self.fill_rx(q)?;
        }
        Ok(n)
    }

    fn recv_one(&mut self, q: usize) -> Result<Option<Received>> {
        let mergeable = self.features.contains(Features::MRG_RXBUF);
        let hash = self.hdr_len == HDR_LEN_HASH;
        let pool = self.rx.get_mut(q).ok_or(Error::Queue("no such queue"))?;
        let Some((addr, len)) = pool.used(&self.t)? else {
            return Ok(None);
        };
        let mem = &self.t.dma.mem;
        let len = len as usize;
        if len < self.hdr_len {
            // The device handed the buffer back unused (a frame it had to
            // drop): count it, as Linux counts rx_length_errors, and go on.
            self.rx_length_errors += 1;
            return self.recv_one(q);
        }
        let mut hb = [0u8; HDR_LEN_HASH];
        mem.read_slice(&mut hb[..self.hdr_len], addr)?;
        let hdr = VirtioNetHdr::parse(&hb[..self.hdr_len], hash)
            .map_err(|_| Error::Queue("bad rx header"))?;
        let mut frame = vec![0u8; len - self.hdr_len];
        mem.read_slice(&mut frame, addr.unchecked_add_len(self.hdr_len))?;
        let buffers = if mergeable { hdr.num_buffers.max(1) } else { 1 };
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut got = 1;
        while got < buffers {
            match pool.used(&self.t)? {
                Some((a, l)) => {
                    let at = frame.len();
                    frame.resize(at + l as usize, 0);
                    mem.read_slice(&mut frame[at..], a)?;
                    got += 1;
                }
                None if Instant::now() < deadline => std::hint::spin_loop(),
                None => return Err(Error::Queue("device did not complete a merged frame")),
            }
        }
        Ok(Some(Received {
            hdr,
            frame,
            buffers,
        }))
    }

    /// Waits up to `timeout` for a frame on RX queue `q`.
    pub fn recv_timeout(&mut self, q: usize, timeout: Duration) -> Result<Option<Received>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.recv(q)? {
                return Ok(Some(r));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            if let Some(call) = self.t.call_fd(2 * q) {
                let mut pfd = libc::pollfd {
                    fd: call.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                let ms = (deadline - now).as_millis().clamp(1, 50) as libc::c_int;
                // SAFETY: `pfd` is one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, ms) };
                let _ = call.read();
            }
        }
    }
}

trait AddLen {
    fn unchecked_add_len(self, n: usize) -> GuestAddress;
}

impl AddLen for GuestAddress {
    fn unchecked_add_len(self, n: usize) -> GuestAddress {
        GuestAddress(self.0 + n as u64)
    }
}
