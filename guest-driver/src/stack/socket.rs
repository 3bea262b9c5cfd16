//! Sockets: blocking calls for simple programs and non-blocking ones with
//! [`Stack::poll`] for event loops.

use std::{
    collections::VecDeque,
    io,
    net::SocketAddr,
    sync::{atomic::Ordering, Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use vnic_protocol::{
    tcp::{Connection, State, Stats},
    virtio::VirtioNetHdr,
};

use super::{
    frames,
    shard::{self, insert, TcpEntry},
    Inner, Stack, EPHEMERAL,
};

/// What a poll entry waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Interest {
    pub read: bool,
    pub write: bool,
}

impl Interest {
    pub const READ: Interest = Interest {
        read: true,
        write: false,
    };
    pub const WRITE: Interest = Interest {
        read: false,
        write: true,
    };
}

/// What a socket is ready for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Readiness {
    /// Data (or a connection, or end of stream) is there to read.
    pub readable: bool,
    /// Send-buffer space is free.
    pub writable: bool,
    /// The connection is gone (reset, timed out, closed).
    pub closed: bool,
}

impl Readiness {
    pub fn matches(&self, i: Interest) -> bool {
        self.closed || (i.read && self.readable) || (i.write && self.writable)
    }
}

/// Anything [`Stack::poll`] can wait on.
pub trait Pollable {
    fn readiness(&self) -> Readiness;
}

/// One socket in a [`Stack::poll`] call.
pub struct PollEntry<'a> {
    pub socket: &'a dyn Pollable,
    pub interest: Interest,
    pub ready: Readiness,
}

impl std::fmt::Debug for PollEntry<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PollEntry")
            .field("interest", &self.interest)
            .field("ready", &self.ready)
            .finish()
    }
}

impl<'a> PollEntry<'a> {
    pub fn new(socket: &'a dyn Pollable, interest: Interest) -> PollEntry<'a> {
        PollEntry {
            socket,
            interest,
            ready: Readiness::default(),
        }
    }
}

/// How long to sleep before looking again: at most 100 ms, never past
/// `deadline`; None once it has passed.
pub(crate) fn wait_slice(deadline: Option<Instant>) -> Option<Duration> {
    const STEP: Duration = Duration::from_millis(100);
    match deadline {
        Some(d) => {
            let now = Instant::now();
            (now < d).then(|| (d - now).min(STEP))
        }
        None => Some(STEP),
    }
}

fn lock_err() -> io::Error {
    io::Error::other("stack lock poisoned")
}

/// A bounded queue the shards fill and an application thread waits on:
/// accepted connections of a listener, datagrams of a UDP socket.
#[derive(Debug)]
pub(crate) struct WaitQueue<T> {
    q: Mutex<VecDeque<T>>,
    cond: Condvar,
    limit: usize,
}

impl<T> WaitQueue<T> {
    fn new(limit: usize) -> WaitQueue<T> {
        WaitQueue {
            q: Mutex::new(VecDeque::new()),
            cond: Condvar::new(),
            limit,
        }
    }

    /// Queues `item` and wakes the waiters; false when the queue is full.
    pub fn push(&self, item: T) -> bool {
        let Ok(mut q) = self.q.lock() else {
            return false;
        };
        if q.len() >= self.limit {
            return false;
        }
        q.push_back(item);
        drop(q);
        self.cond.notify_all();
        true
    }

    /// The oldest item, waiting until `deadline` (None: forever); None
    /// when the deadline passed first.
    fn pop(&self, deadline: Option<Instant>) -> io::Result<Option<T>> {
        let mut g = self.q.lock().map_err(|_| lock_err())?;
        loop {
            if let Some(item) = g.pop_front() {
                return Ok(Some(item));
            }
            let Some(wait) = wait_slice(deadline) else {
                return Ok(None);
            };
            g = self.cond.wait_timeout(g, wait).map_err(|_| lock_err())?.0;
        }
    }

    fn is_empty(&self) -> bool {
        self.q.lock().map(|q| q.is_empty()).unwrap_or(true)
    }
}

// ----- TCP -----

/// An established (or establishing) TCP connection.
#[derive(Debug)]
pub struct TcpStream {
    inner: Arc<Inner>,
    shard: usize,
    slot: usize,
    id: u64,
    timeout: Option<Duration>,
}

impl TcpStream {
    /// Connects to `remote`, waiting up to `timeout` for the handshake.
    /// The local port is chosen so that the device steers the flow's
    /// packets to the shard the connection lives on.
    pub fn connect(stack: &Stack, remote: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        let inner = stack.inner().clone();
        let lip = inner.local_ip(remote.ip()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                "no local address of that family",
            )
        })?;
        let n = inner.shards.len();
        let want = inner.next_shard.fetch_add(1, Ordering::Relaxed) % n;
        let span = usize::from(EPHEMERAL.end() - EPHEMERAL.start()) + 1;
        let start = inner.next_port.fetch_add(1, Ordering::Relaxed);
        let mut chosen = None;
        for k in 0..span {
            let port =
                EPHEMERAL.start() + ((usize::from(start - EPHEMERAL.start()) + k) % span) as u16;
            let local = SocketAddr::new(lip, port);
            let owner = inner.owner(local, remote);
            if owner != want && k < 4096 {
                continue;
            }
            let busy = inner.shards[owner]
                .st
                .lock()
                .map_err(|_| lock_err())?
                .p
                .flows
                .contains_key(&(local, remote));
            if !busy {
                chosen = Some((local, owner));
                break;
            }
        }
        let (local, owner) =
            chosen.ok_or_else(|| io::Error::new(io::ErrorKind::AddrInUse, "no free port"))?;
        inner.next_port.store(
            local.port().wrapping_add(1).max(*EPHEMERAL.start()),
            Ordering::Relaxed,
        );
        let id = inner.next_conn.fetch_add(1, Ordering::Relaxed);
        let now = inner.now();
        let conn = Connection::connect(
            inner.tcp_cfg(remote),
            now,
            local.port(),
            remote.port(),
            inner.iss(local, remote),
        );
        let slot = {
            let shard = &inner.shards[owner];
            let mut g = shard.st.lock().map_err(|_| lock_err())?;
            let st = &mut *g;
            let slot = insert(
                &mut st.p,
                TcpEntry {
                    conn,
                    local,
                    remote,
                    listener: None,
                    user_gone: false,
                    id,
                },
            );
            shard::flush(&inner, &mut st.p, &mut st.tx, slot, now);
            st.tx.kick().map_err(io::Error::other)?;
            slot
        };
        let _ = inner.shards[owner].wake.write(1);
        let s = TcpStream {
            inner,
            shard: owner,
            slot,
            id,
            timeout: None,
        };
        let deadline = Instant::now() + timeout;
        s.wait(Some(deadline), |c| {
            c.state() != State::SynSent && c.state() != State::SynReceived
        })?;
        s.with(|c| match c.state() {
            State::Closed => Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "connection refused or timed out",
            )),
            State::SynSent | State::SynReceived => {
                Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
            }
            _ => Ok(()),
        })??;
        Ok(s)
    }

    /// Runs `f` on the connection under its shard lock, then sends what
    /// the connection has to send.
    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> T) -> io::Result<T> {
        let shard = &self.inner.shards[self.shard];
        let mut g = shard.st.lock().map_err(|_| lock_err())?;
        let st = &mut *g;
        let e = match st.p.conns.get_mut(self.slot) {
            Some(Some(e)) if e.id == self.id => e,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "connection gone",
                ))
            }
        };
        let r = f(&mut e.conn);
        let now = self.inner.now();
        shard::flush(&self.inner, &mut st.p, &mut st.tx, self.slot, now);
        st.tx.kick().map_err(io::Error::other)?;
        let wake = std::mem::take(&mut st.p.wake_users);
        drop(g);
        let _ = shard.wake.write(1);
        if wake {
            shard.cond.notify_all();
            self.inner.notify();
        }
        Ok(r)
    }

    /// Blocks until `ready` holds for the connection or `deadline`.
    fn wait(
        &self,
        deadline: Option<Instant>,
        ready: impl Fn(&Connection) -> bool,
    ) -> io::Result<()> {
        let shard = &self.inner.shards[self.shard];
        let mut g = shard.st.lock().map_err(|_| lock_err())?;
        loop {
            match g.p.conns.get(self.slot) {
                Some(Some(e)) if e.id == self.id => {
                    if ready(&e.conn) || e.conn.is_closed() {
                        return Ok(());
                    }
                }
                _ => return Ok(()),
            }
            let Some(wait) = wait_slice(deadline) else {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
            };
            g = shard.cond.wait_timeout(g, wait).map_err(|_| lock_err())?.0;
        }
    }

    /// A read or write blocks at most this long (None: forever).
    pub fn set_timeout(&mut self, t: Option<Duration>) {
        self.timeout = t;
    }

    fn deadline(&self) -> Option<Instant> {
        self.timeout.map(|t| Instant::now() + t)
    }

    /// Reads what is there without blocking (WouldBlock when nothing).
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.with(|c| {
            let n = c.recv(buf);
            // End of stream only after the peer's FIN; a connection that
            // ended any other way (reset, timeout) is an error.
            if n > 0 || buf.is_empty() || c.fin_received() {
                Ok(n)
            } else if c.is_closed() {
                Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "connection reset or timed out",
                ))
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            }
        })?
    }

    /// Queues what fits without blocking (WouldBlock when nothing does).
    pub fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        self.with(|c| {
            if !c.may_send() {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "connection closed for sending",
                ));
            }
            match c.send(data) {
                0 if !data.is_empty() => Err(io::ErrorKind::WouldBlock.into()),
                n => Ok(n),
            }
        })?
    }

    /// Closes the sending direction (FIN after the queued data).
    pub fn shutdown_write(&self) -> io::Result<()> {
        self.with(|c| c.close())
    }

    /// Blocks until every byte written has been acknowledged.
    pub fn flush_acked(&self, timeout: Duration) -> io::Result<()> {
        self.wait(Some(Instant::now() + timeout), |c| c.send_queued() == 0)
    }

    pub fn tcp_stats(&self) -> io::Result<Stats> {
        self.with(|c| *c.stats())
    }

    pub fn state(&self) -> io::Result<State> {
        self.with(|c| c.state())
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        let g = self.inner.shards[self.shard]
            .st
            .lock()
            .map_err(|_| lock_err())?;
        match g.p.conns.get(self.slot) {
            Some(Some(e)) if e.id == self.id => Ok(e.local),
            _ => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        let g = self.inner.shards[self.shard]
            .st
            .lock()
            .map_err(|_| lock_err())?;
        match g.p.conns.get(self.slot) {
            Some(Some(e)) if e.id == self.id => Ok(e.remote),
            _ => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// The shard (queue pair) the connection lives on.
    pub fn shard(&self) -> usize {
        self.shard
    }
}

impl Pollable for TcpStream {
    fn readiness(&self) -> Readiness {
        let Ok(g) = self.inner.shards[self.shard].st.lock() else {
            return Readiness {
                closed: true,
                ..Readiness::default()
            };
        };
        match g.p.conns.get(self.slot) {
            Some(Some(e)) if e.id == self.id => Readiness {
                readable: e.conn.recv_available() > 0 || e.conn.recv_finished(),
                writable: e.conn.send_space() > 0,
                closed: e.conn.is_closed(),
            },
            _ => Readiness {
                closed: true,
                ..Readiness::default()
            },
        }
    }
}

impl io::Read for TcpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let deadline = self.deadline();
        loop {
            match self.try_read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait(deadline, |c| c.recv_available() > 0 || c.recv_finished())?;
                }
                r => return r,
            }
        }
    }
}

impl io::Write for TcpStream {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let deadline = self.deadline();
        loop {
            match self.try_write(data) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait(deadline, |c| c.send_space() > 0 || !c.may_send())?;
                }
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        if let Ok(mut g) = self.inner.shards[self.shard].st.lock() {
            if let Some(Some(e)) = g.p.conns.get_mut(self.slot) {
                if e.id == self.id {
                    e.user_gone = true;
                    e.conn.close();
                }
            }
        }
        let _ = self.inner.shards[self.shard].wake.write(1);
    }
}

/// Established connections waiting for accept(): (id, slot); accept()
/// finds the shard by id.
pub(crate) type ListenQueue = WaitQueue<(u64, usize)>;

/// Connections waiting for accept() per listener at most; past it they
/// are reset and counted (`tcp_backlog_full`).
pub(crate) const BACKLOG: usize = 1024;

/// A listening TCP port (on every shard).
#[derive(Debug)]
pub struct TcpListener {
    inner: Arc<Inner>,
    port: u16,
    q: Arc<ListenQueue>,
}

impl TcpListener {
    pub fn bind(stack: &Stack, port: u16) -> io::Result<TcpListener> {
        TcpListener::bind_with_backlog(stack, port, BACKLOG)
    }

    /// [`TcpListener::bind`] with at most `backlog` connections waiting
    /// for accept(); more are reset.
    pub fn bind_with_backlog(stack: &Stack, port: u16, backlog: usize) -> io::Result<TcpListener> {
        let inner = stack.inner().clone();
        let q = Arc::new(ListenQueue::new(backlog));
        let mut m = inner.listeners.lock().map_err(|_| lock_err())?;
        if m.contains_key(&port) {
            return Err(io::ErrorKind::AddrInUse.into());
        }
        m.insert(port, q.clone());
        drop(m);
        Ok(TcpListener { inner, port, q })
    }

    /// Waits up to `timeout` (None: forever) for an established connection.
    pub fn accept(&self, timeout: Option<Duration>) -> io::Result<TcpStream> {
        let deadline = timeout.map(|t| Instant::now() + t);
        while let Some((id, slot)) = self.q.pop(deadline)? {
            for (k, sh) in self.inner.shards.iter().enumerate() {
                let st = sh.st.lock().map_err(|_| lock_err())?;
                if matches!(st.p.conns.get(slot), Some(Some(e)) if e.id == id) {
                    return Ok(TcpStream {
                        inner: self.inner.clone(),
                        shard: k,
                        slot,
                        id,
                        timeout: None,
                    });
                }
            }
        }
        Err(io::Error::new(io::ErrorKind::TimedOut, "no connection"))
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Pollable for TcpListener {
    fn readiness(&self) -> Readiness {
        Readiness {
            readable: !self.q.is_empty(),
            ..Readiness::default()
        }
    }
}

impl Drop for TcpListener {
    fn drop(&mut self) {
        if let Ok(mut m) = self.inner.listeners.lock() {
            m.remove(&self.port);
        }
    }
}

// ----- UDP -----

/// Datagrams received for a bound port: (from, payload).
pub(crate) type UdpQueue = WaitQueue<(SocketAddr, Vec<u8>)>;

/// Datagrams queued per socket at most; more are dropped and counted.
const UDP_QUEUE: usize = 4096;

/// A bound UDP port.
#[derive(Debug)]
pub struct UdpSocket {
    inner: Arc<Inner>,
    port: u16,
    q: Arc<UdpQueue>,
}

impl UdpSocket {
    /// Binds `port` (0: an ephemeral one).
    pub fn bind(stack: &Stack, port: u16) -> io::Result<UdpSocket> {
        let inner = stack.inner().clone();
        let q = Arc::new(UdpQueue::new(UDP_QUEUE));
        let mut m = inner.udp.lock().map_err(|_| lock_err())?;
        let port = if port == 0 {
            (0..16384u16)
                .map(|k| {
                    49152
                        + (inner
                            .next_port
                            .fetch_add(1, Ordering::Relaxed)
                            .wrapping_add(k)
                            % 16384)
                })
                .find(|p| !m.contains_key(p))
                .ok_or_else(|| io::Error::from(io::ErrorKind::AddrInUse))?
        } else {
            port
        };
        if m.contains_key(&port) {
            return Err(io::ErrorKind::AddrInUse.into());
        }
        m.insert(port, q.clone());
        drop(m);
        Ok(UdpSocket { inner, port, q })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sends one datagram (checksum offloaded when the device can). One
    /// longer than the MTU allows goes as IP fragments, up to the largest
    /// UDP datagram (65507 bytes over IPv4, 65527 over IPv6).
    pub fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<usize> {
        let inner = &self.inner;
        let src = inner.local_ip(to.ip()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                "no local address of that family",
            )
        })?;
        let iph = if to.is_ipv6() { 40 } else { 20 };
        // The IPv4 total length, or the IPv6 payload length, is 16 bits.
        let limit = if to.is_ipv6() { 65535 } else { 65535 - iph };
        if data.len() + 8 > limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "datagram larger than UDP allows",
            ));
        }
        let fits = data.len() + 8 + iph <= inner.mtu;
        let local = SocketAddr::new(src, self.port);
        let owner = inner.owner(local, to);
        let mut buf = Vec::with_capacity(64 + data.len());
        frames::eth(&mut buf, None, inner.mac, frames::ethertype_of(to.ip()));
        let len = 8 + data.len();
        let ident = inner.ip_ident.fetch_add(1, Ordering::Relaxed);
        frames::ip(&mut buf, src, to.ip(), frames::UDP, len, ident, 64);
        let l4 = buf.len();
        buf.extend_from_slice(&self.port.to_be_bytes());
        buf.extend_from_slice(&to.port().to_be_bytes());
        buf.extend_from_slice(&(len as u16).to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(data);
        let ps = frames::pseudo(src, to.ip(), frames::UDP, len);
        // A datagram sent as fragments carries its checksum in the first
        // one only, so it is computed here rather than by the device.
        let hdr: VirtioNetHdr = frames::l4_checksum(&mut buf, l4, 6, ps, inner.csum_tx && fits);
        shard::with_tx(inner, owner, |tx| {
            shard::send_ip(inner, tx, to.ip(), hdr, &mut buf)
        })
        .map_err(io::Error::other)?;
        Ok(data.len())
    }

    /// Receives one datagram, waiting up to `timeout` (None: forever).
    pub fn recv_from(
        &self,
        buf: &mut [u8],
        timeout: Option<Duration>,
    ) -> io::Result<(usize, SocketAddr)> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let (from, d) = self
            .q
            .pop(deadline)?
            .ok_or(io::Error::from(io::ErrorKind::WouldBlock))?;
        let n = d.len().min(buf.len());
        buf[..n].copy_from_slice(&d[..n]);
        Ok((n, from))
    }
}

impl Pollable for UdpSocket {
    fn readiness(&self) -> Readiness {
        Readiness {
            readable: !self.q.is_empty(),
            writable: true,
            closed: false,
        }
    }
}

impl Drop for UdpSocket {
    fn drop(&mut self) {
        if let Ok(mut m) = self.inner.udp.lock() {
            m.remove(&self.port);
        }
    }
}
