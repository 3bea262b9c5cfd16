//! The software provider: TCP connections on `vnic_protocol::tcp` in the
//! stack's shards. A connection lives in the table of the shard the
//! device steers its packets to; a socket call takes that shard's lock,
//! runs the engine, and sends what the engine has to send.

use std::{
    io,
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use vnic_protocol::tcp::{Connection, State, Stats};

use super::{Listener, Stream};
use crate::stack::{
    output,
    poll::{Interest, Readiness},
    state::{insert, Inner, ListenQueue, TcpEntry, EPHEMERAL},
    wait::{lock_err, wait_slice},
};

/// A connection in shard `shard`'s table at `slot`, while its entry
/// still carries `id` (a slot is reused once a connection is gone).
#[derive(Debug)]
struct SoftStream {
    inner: Arc<Inner>,
    shard: usize,
    slot: usize,
    id: u64,
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection gone")
}

/// Opens a connection to `remote` and waits up to `timeout` for the
/// handshake. The local port is chosen so that the device steers the
/// flow's packets to the shard the connection lives on.
pub(super) fn connect(
    inner: &Arc<Inner>,
    remote: SocketAddr,
    timeout: Duration,
) -> io::Result<Box<dyn Stream>> {
    let inner = inner.clone();
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
        let port = EPHEMERAL.start() + ((usize::from(start - EPHEMERAL.start()) + k) % span) as u16;
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
        output::flush(&inner, &mut st.p, &mut st.tx, slot, now);
        st.tx.kick().map_err(io::Error::other)?;
        slot
    };
    let _ = inner.shards[owner].wake.write(1);
    let s = SoftStream {
        inner,
        shard: owner,
        slot,
        id,
    };
    let deadline = Instant::now() + timeout;
    s.wait_until(Some(deadline), |c| {
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
    Ok(Box::new(s))
}

impl SoftStream {
    /// Runs `f` on the connection under its shard lock, then sends what
    /// the connection has to send.
    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> T) -> io::Result<T> {
        let shard = &self.inner.shards[self.shard];
        let mut g = shard.st.lock().map_err(|_| lock_err())?;
        let st = &mut *g;
        let e = match st.p.conns.get_mut(self.slot) {
            Some(Some(e)) if e.id == self.id => e,
            _ => return Err(gone()),
        };
        let r = f(&mut e.conn);
        let now = self.inner.now();
        output::flush(&self.inner, &mut st.p, &mut st.tx, self.slot, now);
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

    /// Reads the connection's entry under the shard lock without running
    /// the engine.
    fn peek<T>(&self, f: impl FnOnce(&TcpEntry) -> T) -> io::Result<T> {
        let g = self.inner.shards[self.shard]
            .st
            .lock()
            .map_err(|_| lock_err())?;
        match g.p.conns.get(self.slot) {
            Some(Some(e)) if e.id == self.id => Ok(f(e)),
            _ => Err(gone()),
        }
    }

    /// Blocks until `ready` holds for the connection, it is closed or
    /// gone, or `deadline` (TimedOut).
    fn wait_until(
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
}

impl Stream for SoftStream {
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
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

    fn try_write(&self, data: &[u8]) -> io::Result<usize> {
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

    fn wait(&self, i: Interest, deadline: Option<Instant>) -> io::Result<()> {
        self.wait_until(deadline, |c| {
            (i.read && (c.recv_available() > 0 || c.recv_finished()))
                || (i.write && (c.send_space() > 0 || !c.may_send()))
        })
    }

    fn shutdown_write(&self) -> io::Result<()> {
        self.with(|c| c.close())
    }

    fn flush_acked(&self, deadline: Instant) -> io::Result<()> {
        self.wait_until(Some(deadline), |c| c.send_queued() == 0)
    }

    fn readiness(&self) -> Readiness {
        self.peek(|e| Readiness {
            readable: e.conn.recv_available() > 0 || e.conn.recv_finished(),
            writable: e.conn.send_space() > 0,
            closed: e.conn.is_closed(),
        })
        .unwrap_or(Readiness::GONE)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.peek(|e| e.local)
    }

    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.peek(|e| e.remote)
    }

    fn tcp_stats(&self) -> io::Result<Stats> {
        self.with(|c| *c.stats())
    }

    fn state(&self) -> io::Result<State> {
        self.with(|c| c.state())
    }

    fn shard(&self) -> usize {
        self.shard
    }
}

impl Drop for SoftStream {
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

/// A port in the stack's listener table: every shard's input puts
/// connections that reach Established on its queue.
#[derive(Debug)]
struct SoftListener {
    inner: Arc<Inner>,
    port: u16,
    q: Arc<ListenQueue>,
}

/// Listens on `port` with at most `backlog` connections waiting.
pub(super) fn listen(
    inner: &Arc<Inner>,
    port: u16,
    backlog: usize,
) -> io::Result<Box<dyn Listener>> {
    let q = Arc::new(ListenQueue::new(backlog));
    let mut m = inner.listeners.lock().map_err(|_| lock_err())?;
    if m.contains_key(&port) {
        return Err(io::ErrorKind::AddrInUse.into());
    }
    m.insert(port, q.clone());
    drop(m);
    Ok(Box::new(SoftListener {
        inner: inner.clone(),
        port,
        q,
    }))
}

impl Listener for SoftListener {
    fn accept(&self, deadline: Option<Instant>) -> io::Result<Option<Box<dyn Stream>>> {
        while let Some((id, slot)) = self.q.pop(deadline)? {
            for (k, sh) in self.inner.shards.iter().enumerate() {
                let st = sh.st.lock().map_err(|_| lock_err())?;
                if matches!(st.p.conns.get(slot), Some(Some(e)) if e.id == id) {
                    return Ok(Some(Box::new(SoftStream {
                        inner: self.inner.clone(),
                        shard: k,
                        slot,
                        id,
                    })));
                }
            }
        }
        Ok(None)
    }

    fn readiness(&self) -> Readiness {
        self.q.readiness()
    }
}

impl Drop for SoftListener {
    fn drop(&mut self) {
        if let Ok(mut m) = self.inner.listeners.lock() {
            m.remove(&self.port);
        }
    }
}
