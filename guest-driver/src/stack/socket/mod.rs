//! Top: sockets. Blocking calls for simple programs and non-blocking ones
//! with [`Stack::poll`](super::Stack::poll) for event loops.
//!
//! A TCP socket is a front over a provider: [`soft`] runs the connection
//! on the stack's own TCP engine in the shards. The provider traits
//! ([`Stream`], [`Listener`]) are the boundary a second provider, the
//! device's TOE, plugs into; the blocking loops, timeouts and poll
//! readiness here are the same for both.

mod soft;
mod toe;
mod udp;

use std::{
    fmt, io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use vnic_protocol::tcp::{State, Stats};

pub use udp::UdpSocket;

use super::{
    poll::{Interest, Pollable, Readiness},
    state::Inner,
    wait::wait_slice,
    Stack,
};

/// Connections waiting for accept() per listener at most; past it they
/// are reset and counted (`tcp_backlog_full`).
pub(crate) const BACKLOG: usize = 1024;

// ----- providers -----

/// A TCP connection as its provider runs it. Dropping it closes the
/// connection (FIN after queued data; the provider finishes it).
pub(crate) trait Stream: Send + Sync + fmt::Debug {
    /// Reads what is there: WouldBlock when nothing is, Ok(0) at the end
    /// of the stream, ConnectionReset when it ended any other way.
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Queues what fits: WouldBlock when nothing does, BrokenPipe once
    /// the sending direction is closed.
    fn try_write(&self, data: &[u8]) -> io::Result<usize>;
    /// Blocks until what `interest` asks for may make progress or the
    /// connection ended; TimedOut at `deadline`.
    fn wait(&self, interest: Interest, deadline: Option<Instant>) -> io::Result<()>;
    /// Closes the sending direction (FIN after the queued data).
    fn shutdown_write(&self) -> io::Result<()>;
    /// Blocks until every byte written has been acknowledged.
    fn flush_acked(&self, deadline: Instant) -> io::Result<()>;
    fn readiness(&self) -> Readiness;
    fn local_addr(&self) -> io::Result<SocketAddr>;
    fn peer_addr(&self) -> io::Result<SocketAddr>;
    fn tcp_stats(&self) -> io::Result<Stats>;
    fn state(&self) -> io::Result<State>;
    /// The queue pair the connection's packets travel on.
    fn shard(&self) -> usize;
    /// Whether the device's TOE runs it.
    fn on_toe(&self) -> bool {
        false
    }
}

/// A listening port as its provider runs it. Dropping it stops listening.
pub(crate) trait Listener: Send + Sync + fmt::Debug {
    /// The next established connection, waiting until `deadline` (None:
    /// forever); None when the deadline passed first.
    fn accept(&self, deadline: Option<Instant>) -> io::Result<Option<Box<dyn Stream>>>;
    fn readiness(&self) -> Readiness;
}

// ----- TCP -----

/// An established (or establishing) TCP connection.
#[derive(Debug)]
pub struct TcpStream {
    s: Box<dyn Stream>,
    timeout: Option<Duration>,
}

impl TcpStream {
    fn new(s: Box<dyn Stream>) -> TcpStream {
        TcpStream { s, timeout: None }
    }

    /// Connects to `remote`, waiting up to `timeout` for the handshake.
    /// The local port is chosen so that the device steers the flow's
    /// packets to the shard the connection lives on.
    pub fn connect(stack: &Stack, remote: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        if let Some(core) = &stack.inner().toe {
            if let toe::Opened::Toe(s) = toe::connect(core, remote, timeout)? {
                return Ok(TcpStream::new(s));
            }
        }
        soft::connect(stack.inner(), remote, timeout).map(TcpStream::new)
    }

    /// Whether the device's TOE runs this connection.
    pub fn on_toe(&self) -> bool {
        self.s.on_toe()
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
        self.s.try_read(buf)
    }

    /// Queues what fits without blocking (WouldBlock when nothing does).
    pub fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        self.s.try_write(data)
    }

    /// Closes the sending direction (FIN after the queued data).
    pub fn shutdown_write(&self) -> io::Result<()> {
        self.s.shutdown_write()
    }

    /// Blocks until every byte written has been acknowledged.
    pub fn flush_acked(&self, timeout: Duration) -> io::Result<()> {
        self.s.flush_acked(Instant::now() + timeout)
    }

    pub fn tcp_stats(&self) -> io::Result<Stats> {
        self.s.tcp_stats()
    }

    pub fn state(&self) -> io::Result<State> {
        self.s.state()
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.s.local_addr()
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.s.peer_addr()
    }

    /// The shard (queue pair) the connection lives on.
    pub fn shard(&self) -> usize {
        self.s.shard()
    }
}

impl Pollable for TcpStream {
    fn readiness(&self) -> Readiness {
        self.s.readiness()
    }
}

impl io::Read for TcpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let deadline = self.deadline();
        loop {
            match self.s.try_read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.s.wait(Interest::READ, deadline)?;
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
            match self.s.try_write(data) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.s.wait(Interest::WRITE, deadline)?;
                }
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening TCP port (on every shard). On the TOE it listens on the
/// stack's own TCP too, which takes the connections the device has no
/// room for.
#[derive(Debug)]
pub struct TcpListener {
    ls: Vec<Box<dyn Listener>>,
    port: u16,
    inner: Arc<Inner>,
}

impl TcpListener {
    pub fn bind(stack: &Stack, port: u16) -> io::Result<TcpListener> {
        TcpListener::bind_with_backlog(stack, port, BACKLOG)
    }

    /// [`TcpListener::bind`] with at most `backlog` connections waiting
    /// for accept(); more are reset.
    pub fn bind_with_backlog(stack: &Stack, port: u16, backlog: usize) -> io::Result<TcpListener> {
        let inner = stack.inner().clone();
        let mut ls = Vec::with_capacity(2);
        if let Some(core) = &inner.toe {
            if let toe::Opened::Toe(l) = toe::listen(core, port, backlog)? {
                ls.push(l);
            }
        }
        ls.push(soft::listen(&inner, port, backlog)?);
        Ok(TcpListener { ls, port, inner })
    }

    /// Waits up to `timeout` (None: forever) for an established connection.
    pub fn accept(&self, timeout: Option<Duration>) -> io::Result<TcpStream> {
        let deadline = timeout.map(|t| Instant::now() + t);
        if let [l] = &self.ls[..] {
            return match l.accept(deadline)? {
                Some(s) => Ok(TcpStream::new(s)),
                None => Err(io::Error::new(io::ErrorKind::TimedOut, "no connection")),
            };
        }
        loop {
            let gen = self.inner.event_gen();
            let now = Some(Instant::now());
            for l in &self.ls {
                if l.readiness().readable {
                    if let Some(s) = l.accept(now)? {
                        return Ok(TcpStream::new(s));
                    }
                }
            }
            let Some(wait) = wait_slice(deadline) else {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no connection"));
            };
            self.inner.wait_event(gen, wait);
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Pollable for TcpListener {
    fn readiness(&self) -> Readiness {
        Readiness {
            readable: self.ls.iter().any(|l| l.readiness().readable),
            ..Readiness::default()
        }
    }
}
