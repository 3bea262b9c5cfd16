//! Middle: the device's TOE as the stack sees it. The queues (one lock,
//! taken per command and per event batch), the connections by id with
//! their ring offsets, the listeners' accept queues, and the thread that
//! takes the device's events and wakes the sockets waiting on them.
//!
//! Lock order: a socket never holds a connection's state while it runs a
//! command, and the event thread lets go of the queues before it takes a
//! connection's state.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Condvar, Mutex, MutexGuard,
    },
    time::Duration,
};

use vm_memory::GuestMemoryMmap;
use vnic_protocol::toe::{CloseReason, Command, Completion, Event, RingSpec, Status, VERSION};

use super::wait::{lock_err, WaitQueue};
use crate::{net, toe::ToeQueues};

/// A connection's side of the rings and what the device said of it.
#[derive(Debug)]
pub(crate) struct ConnState {
    pub id: u32,
    pub rx: RingSpec,
    pub tx: RingSpec,
    pub local: Option<SocketAddr>,
    pub remote: SocketAddr,
    pub connected: bool,
    pub rx_head: u32,
    pub rx_tail: u32,
    /// The head last given back with RECVD.
    pub rx_given: u32,
    pub tx_tail: u32,
    pub tx_acked: u32,
    pub peer_closed: bool,
    pub closed: Option<CloseReason>,
    /// The socket is gone: the id and rings go back at CLOSED.
    pub user_gone: bool,
}

#[derive(Debug)]
pub(crate) struct ToeConn {
    pub st: Mutex<ConnState>,
    pub cond: Condvar,
}

/// Connections waiting for ACCEPT on a listener: (handle, remote).
pub(crate) type AcceptQueue = WaitQueue<(u32, SocketAddr)>;

/// The TOE's counters.
#[derive(Debug, Default)]
pub(crate) struct ToeCounters {
    pub connects: AtomicU64,
    pub accepts: AtomicU64,
    /// Connections that went to the stack's own TCP: the device's table
    /// (or the rings) ran out.
    pub fallbacks: AtomicU64,
    pub events: AtomicU64,
}

#[derive(Debug)]
struct Table {
    conns: Vec<Option<Arc<ToeConn>>>,
    free: Vec<u32>,
    listeners: HashMap<u32, Arc<AcceptQueue>>,
    free_listeners: Vec<u32>,
}

/// The stack's handle on the device's TOE.
#[derive(Debug)]
pub(crate) struct ToeCore {
    q: Mutex<ToeQueues>,
    pub mem: GuestMemoryMmap,
    table: Mutex<Table>,
    pub counters: ToeCounters,
    pub v4: Option<IpAddr>,
    pub v6: Option<IpAddr>,
    stop: AtomicBool,
}

impl ToeCore {
    /// Sets the TOE up: HELLO for as many connections as there are rings,
    /// then the stack's addresses.
    pub fn start(
        mut q: ToeQueues,
        v4: Option<(IpAddr, u8)>,
        v6: Option<(IpAddr, u8)>,
    ) -> crate::Result<ToeCore> {
        let want = u32::from(q.opts.conns);
        let c = q.command(&Command::Hello {
            version: VERSION,
            conns: want,
        })?;
        if c.status != Status::Ok {
            return Err(crate::Error::Negotiation(format!(
                "the TOE refused HELLO: {:?}",
                c.status
            )));
        }
        let granted = c.value.min(want);
        for (addr, prefix) in [v4, v6].into_iter().flatten() {
            let c = q.command(&Command::IfConfig {
                addr,
                prefix,
                gateway: None,
            })?;
            if c.status != Status::Ok {
                return Err(crate::Error::Negotiation(format!(
                    "the TOE refused {addr}/{prefix}: {:?}",
                    c.status
                )));
            }
        }
        let mem = q.memory().clone();
        Ok(ToeCore {
            q: Mutex::new(q),
            mem,
            table: Mutex::new(Table {
                conns: (0..granted).map(|_| None).collect(),
                free: (0..granted).rev().collect(),
                listeners: HashMap::new(),
                free_listeners: (0..granted).rev().collect(),
            }),
            counters: ToeCounters::default(),
            v4: v4.map(|a| a.0),
            v6: v6.map(|a| a.0),
            stop: AtomicBool::new(false),
        })
    }

    fn queues(&self) -> std::io::Result<MutexGuard<'_, ToeQueues>> {
        self.q.lock().map_err(|_| lock_err())
    }

    fn table(&self) -> std::io::Result<MutexGuard<'_, Table>> {
        self.table.lock().map_err(|_| lock_err())
    }

    /// Runs one command.
    pub fn command(&self, c: &Command) -> std::io::Result<Completion> {
        self.queues()?.command(c).map_err(std::io::Error::other)
    }

    /// Posts a command without waiting for its completion.
    pub fn post(&self, c: &Command) -> std::io::Result<()> {
        self.queues()?.post(c).map_err(std::io::Error::other)
    }

    /// Posted commands the device refused.
    pub fn failed(&self) -> u64 {
        self.q.lock().map_or(0, |q| q.failed())
    }

    /// A free id and rings for a new connection, registered; None when
    /// either ran out.
    pub fn open(&self, remote: SocketAddr) -> std::io::Result<Option<Arc<ToeConn>>> {
        let Some(rings) = self.queues()?.take_rings() else {
            return Ok(None);
        };
        let mut t = self.table()?;
        let Some(id) = t.free.pop() else {
            drop(t);
            self.queues()?.give_rings(rings);
            return Ok(None);
        };
        let c = Arc::new(ToeConn {
            st: Mutex::new(ConnState {
                id,
                rx: rings.0,
                tx: rings.1,
                local: None,
                remote,
                connected: false,
                rx_head: 0,
                rx_tail: 0,
                rx_given: 0,
                tx_tail: 0,
                tx_acked: 0,
                peer_closed: false,
                closed: None,
                user_gone: false,
            }),
            cond: Condvar::new(),
        });
        t.conns[id as usize] = Some(c.clone());
        Ok(Some(c))
    }

    /// Gives a connection's id and rings back (the device let go of them,
    /// or never had them).
    pub fn release(&self, id: u32) {
        let conn = self.table.lock().ok().and_then(|mut t| {
            let c = t.conns.get_mut(id as usize)?.take()?;
            t.free.push(id);
            Some(c)
        });
        if let Some(c) = conn {
            let rings = c.st.lock().ok().map(|s| (s.rx, s.tx));
            if let (Some(r), Ok(mut q)) = (rings, self.q.lock()) {
                q.give_rings(r);
            }
        }
    }

    /// A listener id and its accept queue, registered.
    pub fn listener(&self, backlog: usize) -> std::io::Result<Option<(u32, Arc<AcceptQueue>)>> {
        let mut t = self.table()?;
        let Some(id) = t.free_listeners.pop() else {
            return Ok(None);
        };
        let q = Arc::new(AcceptQueue::new(backlog));
        t.listeners.insert(id, q.clone());
        Ok(Some((id, q)))
    }

    pub fn drop_listener(&self, id: u32) {
        if let Ok(mut t) = self.table.lock() {
            if t.listeners.remove(&id).is_some() {
                t.free_listeners.push(id);
            }
        }
    }

    /// Takes the device's events and passes each to its connection or
    /// listener. Returns how many there were.
    fn take_events(&self, notify: &dyn Fn()) -> usize {
        let mut evs = Vec::new();
        match self.q.lock() {
            Ok(mut q) => {
                if let Err(e) = q.events(&mut |e| evs.push(e)) {
                    log::warn!("TOE events: {e}");
                }
            }
            Err(_) => return 0,
        }
        for e in &evs {
            self.dispatch(*e);
        }
        if !evs.is_empty() {
            self.counters
                .events
                .fetch_add(evs.len() as u64, Ordering::Relaxed);
            notify();
        }
        evs.len()
    }

    fn dispatch(&self, e: Event) {
        if let Event::Incoming {
            listener,
            handle,
            remote,
        } = e
        {
            let q = self
                .table
                .lock()
                .ok()
                .and_then(|t| t.listeners.get(&listener).cloned());
            let taken = q.is_some_and(|q| q.push((handle, remote)));
            if !taken {
                log::debug!("TOE: no room for a connection from {remote}");
            }
            return;
        }
        let conn = self
            .table
            .lock()
            .ok()
            .and_then(|t| t.conns.get(e.id() as usize).cloned().flatten());
        let Some(c) = conn else {
            return;
        };
        let free = {
            let Ok(mut s) = c.st.lock() else {
                return;
            };
            match e {
                Event::Connected { local_port, .. } => {
                    s.connected = true;
                    let ip = if s.remote.is_ipv4() { self.v4 } else { self.v6 };
                    s.local = ip.map(|ip| SocketAddr::new(ip, local_port));
                }
                Event::Data { tail, .. } => s.rx_tail = tail,
                Event::Sent { acked, .. } => s.tx_acked = acked,
                Event::PeerClosed { .. } => s.peer_closed = true,
                Event::Closed { reason, .. } => s.closed = Some(reason),
                Event::Incoming { .. } => {}
            }
            s.closed.is_some() && s.user_gone
        };
        c.cond.notify_all();
        if free {
            self.release(e.id());
        }
    }

    /// The event thread: sleeps on the event queue's interrupt, then
    /// takes what the device wrote.
    pub fn run(&self, notify: &dyn Fn()) {
        let call = match self.q.lock() {
            Ok(q) => q.evt_call().try_clone(),
            Err(_) => return,
        };
        let Ok(call) = call else {
            log::warn!("TOE: no interrupt to wait on");
            return;
        };
        while !self.stop.load(Ordering::Relaxed) {
            if self.take_events(notify) == 0 {
                net::wait_any(&[Some(&call)], Duration::from_millis(50));
                let _ = call.read();
            }
        }
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
