//! The TOE provider: TCP connections the device runs. A socket call
//! moves bytes between the caller and the connection's rings in the
//! driver's memory and tells the device with a command (SEND, RECVD);
//! the stack's TOE thread takes the device's events and wakes waiters.

use std::{
    io,
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use vnic_protocol::{
    tcp::{State, Stats},
    toe::{CloseReason, Command, Family, Status},
};

use super::{Listener, Stream};
use crate::{
    stack::{
        poll::{Interest, Readiness},
        toe::{AcceptQueue, ConnState, ToeConn, ToeCore},
        wait::{lock_err, wait_slice},
    },
    toe::{read_ring, write_ring},
};

/// What a connect or listen on the TOE came to.
pub(super) enum Opened<T> {
    Toe(T),
    /// The device's table (or the rings) ran out: use the stack's own TCP.
    Full,
}

#[derive(Debug)]
struct ToeStream {
    core: Arc<ToeCore>,
    conn: Arc<ToeConn>,
    id: u32,
}

fn refused(c: io::ErrorKind, what: &str) -> io::Error {
    io::Error::new(c, what.to_owned())
}

fn status_err(s: Status) -> io::Error {
    io::Error::other(format!("the TOE refused the command: {s:?}"))
}

/// Opens a connection on the TOE and waits up to `timeout` for it.
pub(super) fn connect(
    core: &Arc<ToeCore>,
    remote: SocketAddr,
    timeout: Duration,
) -> io::Result<Opened<Box<dyn Stream>>> {
    let Some(conn) = core.open(remote)? else {
        core.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
        return Ok(Opened::Full);
    };
    let (id, rx, tx) = {
        let s = conn.st.lock().map_err(|_| lock_err())?;
        (s.id, s.rx, s.tx)
    };
    let c = core.command(&Command::Connect {
        conn: id,
        remote,
        local_port: 0,
        rx,
        tx,
    })?;
    match c.status {
        Status::Ok => {}
        Status::TableFull => {
            core.release(id);
            core.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
            return Ok(Opened::Full);
        }
        s => {
            core.release(id);
            return Err(status_err(s));
        }
    }
    core.counters.connects.fetch_add(1, Ordering::Relaxed);
    let s = ToeStream {
        core: core.clone(),
        conn,
        id,
    };
    s.wait_until(Some(Instant::now() + timeout), |s| s.connected)?;
    let st = s.conn.st.lock().map_err(|_| lock_err())?;
    match (st.connected, st.closed) {
        (true, _) => {}
        (false, Some(CloseReason::Refused)) => {
            return Err(refused(
                io::ErrorKind::ConnectionRefused,
                "connection refused",
            ))
        }
        (false, Some(_)) => {
            return Err(refused(io::ErrorKind::ConnectionReset, "connection failed"))
        }
        (false, None) => return Err(refused(io::ErrorKind::TimedOut, "connect timed out")),
    }
    drop(st);
    Ok(Opened::Toe(Box::new(s)))
}

impl ToeStream {
    /// Blocks until `ready` holds, the connection ended, or `deadline`
    /// (TimedOut).
    fn wait_until(
        &self,
        deadline: Option<Instant>,
        ready: impl Fn(&ConnState) -> bool,
    ) -> io::Result<()> {
        let mut g = self.conn.st.lock().map_err(|_| lock_err())?;
        loop {
            if ready(&g) || g.closed.is_some() {
                return Ok(());
            }
            let Some(wait) = wait_slice(deadline) else {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
            };
            g = self
                .conn
                .cond
                .wait_timeout(g, wait)
                .map_err(|_| lock_err())?
                .0;
        }
    }

    fn command(&self, c: Command) -> io::Result<()> {
        match self.core.command(&c)?.status {
            Status::Ok => Ok(()),
            s => Err(status_err(s)),
        }
    }
}

/// Whether a read would return something (data, end of stream, error).
fn readable(s: &ConnState) -> bool {
    s.rx_tail != s.rx_head || s.peer_closed || s.closed.is_some()
}

fn writable(s: &ConnState) -> bool {
    s.tx_tail.wrapping_sub(s.tx_acked) < s.tx.size
}

impl Stream for ToeStream {
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut s = self.conn.st.lock().map_err(|_| lock_err())?;
        let avail = s.rx_tail.wrapping_sub(s.rx_head) as usize;
        if avail == 0 {
            return match s.closed {
                _ if buf.is_empty() || s.peer_closed => Ok(0),
                Some(CloseReason::Done) => Ok(0),
                Some(_) => Err(refused(
                    io::ErrorKind::ConnectionReset,
                    "connection reset or timed out",
                )),
                None => Err(io::ErrorKind::WouldBlock.into()),
            };
        }
        let n = avail.min(buf.len());
        read_ring(&self.core.mem, s.rx, s.rx_head, &mut buf[..n]).map_err(io::Error::other)?;
        s.rx_head = s.rx_head.wrapping_add(n as u32);
        // Space goes back once an eighth of the ring is read, or all of
        // what was there: the device's window is the free space.
        let pending = s.rx_head.wrapping_sub(s.rx_given);
        let give = (pending >= s.rx.size / 8 || s.rx_head == s.rx_tail) && s.closed.is_none();
        let head = s.rx_head;
        if give {
            s.rx_given = head;
        }
        drop(s);
        if give {
            self.core.post(&Command::Recvd {
                conn: self.id,
                head,
            })?;
        }
        Ok(n)
    }

    fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        let mut s = self.conn.st.lock().map_err(|_| lock_err())?;
        if s.closed.is_some() {
            return Err(refused(io::ErrorKind::BrokenPipe, "connection closed"));
        }
        let space = (s.tx.size - s.tx_tail.wrapping_sub(s.tx_acked)) as usize;
        if space == 0 && !data.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = space.min(data.len());
        write_ring(&self.core.mem, s.tx, s.tx_tail, &data[..n]).map_err(io::Error::other)?;
        s.tx_tail = s.tx_tail.wrapping_add(n as u32);
        let tail = s.tx_tail;
        drop(s);
        if n > 0 {
            self.core.post(&Command::Send {
                conn: self.id,
                tail,
            })?;
        }
        Ok(n)
    }

    fn wait(&self, i: Interest, deadline: Option<Instant>) -> io::Result<()> {
        self.wait_until(deadline, |s| {
            (i.read && readable(s)) || (i.write && writable(s))
        })
    }

    fn shutdown_write(&self) -> io::Result<()> {
        self.command(Command::Shutdown { conn: self.id })
    }

    fn flush_acked(&self, deadline: Instant) -> io::Result<()> {
        self.wait_until(Some(deadline), |s| s.tx_acked == s.tx_tail)
    }

    fn readiness(&self) -> Readiness {
        match self.conn.st.lock() {
            Ok(s) => Readiness {
                readable: readable(&s),
                writable: writable(&s) && s.closed.is_none(),
                closed: s.closed.is_some_and(|r| r != CloseReason::Done),
            },
            Err(_) => Readiness::GONE,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        let s = self.conn.st.lock().map_err(|_| lock_err())?;
        s.local.ok_or_else(|| io::ErrorKind::NotConnected.into())
    }

    fn peer_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.conn.st.lock().map_err(|_| lock_err())?.remote)
    }

    fn tcp_stats(&self) -> io::Result<Stats> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the device keeps a TOE connection's counters",
        ))
    }

    fn state(&self) -> io::Result<State> {
        let s = self.conn.st.lock().map_err(|_| lock_err())?;
        Ok(match (s.connected, s.closed, s.peer_closed) {
            (_, Some(_), _) => State::Closed,
            (false, None, _) => State::SynSent,
            (true, None, true) => State::CloseWait,
            (true, None, false) => State::Established,
        })
    }

    fn shard(&self) -> usize {
        0
    }

    fn on_toe(&self) -> bool {
        true
    }
}

impl Drop for ToeStream {
    fn drop(&mut self) {
        let closed = match self.conn.st.lock() {
            Ok(mut s) => {
                s.user_gone = true;
                s.closed.is_some()
            }
            Err(_) => return,
        };
        if closed {
            self.core.release(self.id);
        } else if let Err(e) = self.core.command(&Command::Close { conn: self.id }) {
            log::debug!("TOE close of {}: {e}", self.id);
        }
    }
}

/// A port the TOE listens on.
#[derive(Debug)]
struct ToeListener {
    core: Arc<ToeCore>,
    id: u32,
    port: u16,
    q: Arc<AcceptQueue>,
}

/// Listens on `port` on the TOE.
pub(super) fn listen(
    core: &Arc<ToeCore>,
    port: u16,
    backlog: usize,
) -> io::Result<Opened<Box<dyn Listener>>> {
    let Some((id, q)) = core.listener(backlog)? else {
        return Ok(Opened::Full);
    };
    let c = core.command(&Command::Listen {
        id,
        port,
        family: Family::Both,
        backlog: backlog.min(usize::from(u16::MAX)) as u16,
    })?;
    match c.status {
        Status::Ok => Ok(Opened::Toe(Box::new(ToeListener {
            core: core.clone(),
            id,
            port,
            q,
        }))),
        s => {
            core.drop_listener(id);
            if s == Status::PortInUse {
                return Err(io::ErrorKind::AddrInUse.into());
            }
            Err(status_err(s))
        }
    }
}

impl Listener for ToeListener {
    fn accept(&self, deadline: Option<Instant>) -> io::Result<Option<Box<dyn Stream>>> {
        while let Some((handle, remote)) = self.q.pop(deadline)? {
            // Ids and rings come back as the device's CLOSED events are
            // taken: wait for one (the device holds the connection).
            let conn = loop {
                if let Some(c) = self.core.open(remote)? {
                    break Some(c);
                }
                if wait_slice(deadline).is_none() {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(1));
            };
            let Some(conn) = conn else {
                // Still none: the device resets it when the listener goes.
                self.core.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            };
            let (id, rx, tx) = {
                let mut s = conn.st.lock().map_err(|_| lock_err())?;
                s.connected = true;
                let ip = if remote.is_ipv4() {
                    self.core.v4
                } else {
                    self.core.v6
                };
                s.local = ip.map(|ip| SocketAddr::new(ip, self.port));
                (s.id, s.rx, s.tx)
            };
            let c = self.core.command(&Command::Accept {
                conn: id,
                handle,
                rx,
                tx,
            })?;
            if c.status != Status::Ok {
                self.core.release(id);
                log::debug!("TOE accept of {remote}: {:?}", c.status);
                continue;
            }
            self.core.counters.accepts.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(Box::new(ToeStream {
                core: self.core.clone(),
                conn,
                id,
            })));
        }
        Ok(None)
    }

    fn readiness(&self) -> Readiness {
        self.q.readiness()
    }
}

impl Drop for ToeListener {
    fn drop(&mut self) {
        if let Err(e) = self.core.command(&Command::Unlisten { id: self.id }) {
            log::debug!("TOE unlisten {}: {e}", self.id);
        }
        self.core.drop_listener(self.id);
    }
}
