//! The TOE's wire format: how a driver asks the device to run TCP
//! connections for it, and how the device answers.
//!
//! vnic's own extension of virtio-net, offered with feature bit 58
//! ([`FEATURE`], a bit virtio 1.3 leaves unassigned). Standard drivers do
//! not know the bit and never accept it; a VMM that keeps the control
//! queue masks it. With it negotiated (it needs CTRL_VQ), two virtqueues
//! follow the control queue:
//!
//! - **command queue** (`ctrl + 1`): each chain is one [`Command`] of
//!   [`CMD_LEN`] device-readable bytes, then [`COMPLETION_LEN`]
//!   device-writable bytes where the device puts a [`Completion`].
//! - **event queue** (`ctrl + 2`): the driver posts device-writable
//!   buffers of at least [`EVENT_LEN`] bytes; the device writes one
//!   [`Event`] into each.
//!
//! Connections and listeners are named by ids the driver picks, below the
//! table size the device reports in the completion of [`Command::Hello`].
//! An id is the driver's from the command that opens it until the
//! device's [`Event::Closed`] (connections) or [`Command::Unlisten`]'s
//! completion (listeners).
//!
//! **Payload** moves through two byte rings per connection in driver
//! memory ([`RingSpec`]: a guest-physical address and a power-of-two
//! size), so each byte is copied once by the device: out of the TX ring
//! onto the wire, off the wire into the RX ring. Positions are free-running
//! 32-bit offsets; byte `o` sits at `o % size` ([`spans`]).
//! - TX: the driver writes bytes and moves the tail ([`Command::Send`]);
//!   the device sends them and reports the acknowledged offset
//!   ([`Event::Sent`]), which frees the ring up to it. The driver never
//!   has more than `size` bytes unacknowledged.
//! - RX: the device writes in-order bytes and reports the tail
//!   ([`Event::Data`]); the driver consumes them and gives the space back
//!   ([`Command::Recvd`]). The device's receive window is the free space.
//!
//! The device owns the rings from the command that names them until
//! [`Event::Closed`]. Every field is little-endian; reserved bytes are
//! written as zero and ignored on read.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

/// The feature bit that offers the TOE.
pub const FEATURE: u32 = 58;
/// Bytes of a command.
pub const CMD_LEN: usize = 64;
/// Bytes of a completion.
pub const COMPLETION_LEN: usize = 8;
/// Bytes of an event.
pub const EVENT_LEN: usize = 32;
/// The version [`Command::Hello`] speaks.
pub const VERSION: u16 = 1;
/// Ring sizes the device takes: powers of two in this range.
pub const RING_MIN: u32 = 4096;
pub const RING_MAX: u32 = 1 << 24;

/// Command opcodes.
pub mod op {
    pub const HELLO: u8 = 1;
    pub const IFCONFIG: u8 = 2;
    pub const CONNECT: u8 = 3;
    pub const LISTEN: u8 = 4;
    pub const UNLISTEN: u8 = 5;
    pub const ACCEPT: u8 = 6;
    pub const SEND: u8 = 7;
    pub const RECVD: u8 = 8;
    pub const SHUTDOWN: u8 = 9;
    pub const CLOSE: u8 = 10;
    pub const ABORT: u8 = 11;
    pub const SETOPT: u8 = 12;
}

/// Event types.
pub mod ev {
    pub const CONNECTED: u8 = 1;
    pub const INCOMING: u8 = 2;
    pub const DATA: u8 = 3;
    pub const SENT: u8 = 4;
    pub const PEER_CLOSED: u8 = 5;
    pub const CLOSED: u8 = 6;
}

/// Address families.
const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;
/// A listener on both families.
const FAMILY_ANY: u8 = 0;

/// What the device says of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    /// Not a command this version knows, or malformed.
    Invalid = 1,
    /// An id past the table, or one not in the state the command needs
    /// (opening an id in use, using one that is not open).
    BadId = 2,
    /// The connection table is full: the driver runs this connection on
    /// its own TCP instead.
    TableFull = 3,
    /// No local address of the peer's family (no IFCONFIG yet).
    NoAddress = 4,
    /// A ring outside the driver's memory.
    BadRing = 5,
    /// The port is taken (listen, or an explicit local port).
    PortInUse = 6,
    /// ACCEPT of a handle that is not waiting (gone or already taken).
    NoSuchHandle = 7,
    /// The TOE was not set up: HELLO first.
    NotReady = 8,
}

impl Status {
    pub fn from_u8(v: u8) -> Option<Status> {
        use Status::*;
        [
            Ok,
            Invalid,
            BadId,
            TableFull,
            NoAddress,
            BadRing,
            PortInUse,
            NoSuchHandle,
            NotReady,
        ]
        .into_iter()
        .find(|s| *s as u8 == v)
    }
}

/// Why a connection ended ([`Event::Closed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseReason {
    /// Both sides finished.
    Done = 0,
    /// The peer reset it.
    Reset = 1,
    /// The peer stopped answering (retransmissions or keepalives ran out).
    TimedOut = 2,
    /// The peer refused the connection.
    Refused = 3,
    /// The driver aborted it.
    Aborted = 4,
    /// The device could not go on (a ring became unreadable, a reset).
    Failed = 5,
}

impl CloseReason {
    pub fn from_u8(v: u8) -> Option<CloseReason> {
        use CloseReason::*;
        [Done, Reset, TimedOut, Refused, Aborted, Failed]
            .into_iter()
            .find(|s| *s as u8 == v)
    }
}

/// Socket options of [`Command::SetOpt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum SockOpt {
    /// Value 1: send segments at once rather than waiting to fill them.
    NoDelay = 1,
    /// Value: seconds of idleness before keepalive probes (0: off).
    KeepAlive = 2,
    /// Value: the largest segment to send, at most the path's.
    MaxSeg = 3,
}

/// The families a listener takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Both,
    V4,
    V6,
}

/// A per-connection byte ring in driver memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingSpec {
    /// Guest-physical address of the first byte.
    pub addr: u64,
    /// Bytes; a power of two in [`RING_MIN`]..=[`RING_MAX`].
    pub size: u32,
}

/// The first byte of ring position `offset` and the runs (start, len)
/// that `len` bytes from there occupy in a ring of `size` bytes: one, or
/// two when they wrap. Nothing for a size that is not a power of two.
pub fn spans(offset: u32, len: u32, size: u32) -> [(usize, usize); 2] {
    if !size.is_power_of_two() {
        return [(0, 0); 2];
    }
    let mask = size.wrapping_sub(1);
    let start = (offset & mask) as usize;
    let len = len.min(size) as usize;
    let first = len.min(size as usize - start);
    [(start, first), (0, len - first)]
}

/// A driver's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Sets the TOE up: the version the driver speaks and the ids it
    /// wants. The completion's value is the table size the device grants.
    Hello {
        version: u16,
        conns: u32,
    },
    /// A local address of the port (one per family), its prefix and an
    /// optional gateway for peers outside it.
    IfConfig {
        addr: IpAddr,
        prefix: u8,
        gateway: Option<IpAddr>,
    },
    /// Opens connection `conn` to `remote` from `local_port` (0: the
    /// device picks). The completion says whether it started; the
    /// handshake's end is [`Event::Connected`] or [`Event::Closed`].
    Connect {
        conn: u32,
        remote: SocketAddr,
        local_port: u16,
        rx: RingSpec,
        tx: RingSpec,
    },
    /// Listens on `port` as listener `id`, with at most `backlog`
    /// connections waiting.
    Listen {
        id: u32,
        port: u16,
        family: Family,
        backlog: u16,
    },
    Unlisten {
        id: u32,
    },
    /// Takes the waiting connection `handle` ([`Event::Incoming`]) as
    /// connection `conn`.
    Accept {
        conn: u32,
        handle: u32,
        rx: RingSpec,
        tx: RingSpec,
    },
    /// The TX ring holds bytes up to `tail`.
    Send {
        conn: u32,
        tail: u32,
    },
    /// The driver consumed the RX ring up to `head`.
    Recvd {
        conn: u32,
        head: u32,
    },
    /// FIN after the bytes sent so far.
    Shutdown {
        conn: u32,
    },
    /// The driver is done: FIN after the bytes sent so far if not yet
    /// sent, then [`Event::Closed`] once the connection has ended.
    Close {
        conn: u32,
    },
    /// Reset at once; [`Event::Closed`] follows.
    Abort {
        conn: u32,
    },
    SetOpt {
        conn: u32,
        opt: SockOpt,
        value: u32,
    },
}

/// Why bytes are not a command or an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ToeError {
    #[error("{got} bytes, expected {expected}")]
    Length { expected: usize, got: usize },
    #[error("unknown opcode {0}")]
    Opcode(u8),
    #[error("unknown event type {0}")]
    EventType(u8),
    #[error("unknown address family {0}")]
    Family(u8),
    #[error("ring of {0} bytes: not a power of two from 4 KiB to 16 MiB")]
    RingSize(u32),
    #[error("prefix length {0} too long for its family")]
    Prefix(u8),
    #[error("unknown socket option {0}")]
    Option(u16),
    #[error("unknown status {0}")]
    Status(u8),
    #[error("unknown close reason {0}")]
    Reason(u8),
    #[error("port 0 where a port is needed")]
    Port,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// An address as family byte and 16 bytes (IPv4 in the first four).
fn put_addr(b: &mut [u8], fam_at: usize, addr_at: usize, a: IpAddr) {
    match a {
        IpAddr::V4(v) => {
            b[fam_at] = FAMILY_V4;
            b[addr_at..addr_at + 4].copy_from_slice(&v.octets());
        }
        IpAddr::V6(v) => {
            b[fam_at] = FAMILY_V6;
            b[addr_at..addr_at + 16].copy_from_slice(&v.octets());
        }
    }
}

fn get_addr(b: &[u8], fam_at: usize, addr_at: usize) -> Result<IpAddr, ToeError> {
    match b[fam_at] {
        FAMILY_V4 => Ok(IpAddr::V4(Ipv4Addr::new(
            b[addr_at],
            b[addr_at + 1],
            b[addr_at + 2],
            b[addr_at + 3],
        ))),
        FAMILY_V6 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&b[addr_at..addr_at + 16]);
            Ok(IpAddr::V6(Ipv6Addr::from(o)))
        }
        f => Err(ToeError::Family(f)),
    }
}

fn put_ring(b: &mut [u8], at: usize, r: RingSpec) {
    b[at..at + 8].copy_from_slice(&r.addr.to_le_bytes());
    b[at + 8..at + 12].copy_from_slice(&r.size.to_le_bytes());
}

fn get_ring(b: &[u8], at: usize) -> Result<RingSpec, ToeError> {
    let size = le32(b, at + 8);
    if !size.is_power_of_two() || !(RING_MIN..=RING_MAX).contains(&size) {
        return Err(ToeError::RingSize(size));
    }
    Ok(RingSpec {
        addr: le64(b, at),
        size,
    })
}

fn exact(b: &[u8], n: usize) -> Result<(), ToeError> {
    if b.len() == n {
        Ok(())
    } else {
        Err(ToeError::Length {
            expected: n,
            got: b.len(),
        })
    }
}

// Command layout: u8 op, u8 reserved, le16 reserved, le32 id, then the
// body from byte 8:
//   HELLO     le16 version, le16 reserved, le32 conns
//   IFCONFIG  u8 family, u8 prefix, u8 gateway family (0: none), u8 _,
//             addr[16] at 12, gateway[16] at 28
//   CONNECT   u8 family, u8 _, le16 remote port, le16 local port, le16 _,
//             addr[16] at 16, rx ring (le64 addr, le32 size) at 32, tx at 44
//   LISTEN    u8 family (0 both, 4, 6), u8 _, le16 port, le16 backlog
//   ACCEPT    le32 handle, le32 _, rx ring at 16, tx ring at 28
//   SEND      le32 tail;  RECVD le32 head
//   SETOPT    le16 option, le16 _, le32 value
impl Command {
    pub fn parse(b: &[u8]) -> Result<Command, ToeError> {
        exact(b, CMD_LEN)?;
        let id = le32(b, 4);
        Ok(match b[0] {
            op::HELLO => Command::Hello {
                version: le16(b, 8),
                conns: le32(b, 12),
            },
            op::IFCONFIG => {
                let addr = get_addr(b, 8, 12)?;
                let prefix = b[9];
                if prefix > if addr.is_ipv4() { 32 } else { 128 } {
                    return Err(ToeError::Prefix(prefix));
                }
                let gateway = match b[10] {
                    0 => None,
                    _ => Some(get_addr(b, 10, 28)?),
                };
                if gateway.is_some_and(|g| g.is_ipv4() != addr.is_ipv4()) {
                    return Err(ToeError::Family(b[10]));
                }
                Command::IfConfig {
                    addr,
                    prefix,
                    gateway,
                }
            }
            op::CONNECT => {
                let ip = get_addr(b, 8, 16)?;
                let port = le16(b, 10);
                if port == 0 {
                    return Err(ToeError::Port);
                }
                Command::Connect {
                    conn: id,
                    remote: SocketAddr::new(ip, port),
                    local_port: le16(b, 12),
                    rx: get_ring(b, 32)?,
                    tx: get_ring(b, 44)?,
                }
            }
            op::LISTEN => {
                let family = match b[8] {
                    FAMILY_ANY => Family::Both,
                    FAMILY_V4 => Family::V4,
                    FAMILY_V6 => Family::V6,
                    f => return Err(ToeError::Family(f)),
                };
                let port = le16(b, 10);
                if port == 0 {
                    return Err(ToeError::Port);
                }
                Command::Listen {
                    id,
                    port,
                    family,
                    backlog: le16(b, 12),
                }
            }
            op::UNLISTEN => Command::Unlisten { id },
            op::ACCEPT => Command::Accept {
                conn: id,
                handle: le32(b, 8),
                rx: get_ring(b, 16)?,
                tx: get_ring(b, 28)?,
            },
            op::SEND => Command::Send {
                conn: id,
                tail: le32(b, 8),
            },
            op::RECVD => Command::Recvd {
                conn: id,
                head: le32(b, 8),
            },
            op::SHUTDOWN => Command::Shutdown { conn: id },
            op::CLOSE => Command::Close { conn: id },
            op::ABORT => Command::Abort { conn: id },
            op::SETOPT => {
                let opt = match le16(b, 8) {
                    1 => SockOpt::NoDelay,
                    2 => SockOpt::KeepAlive,
                    3 => SockOpt::MaxSeg,
                    o => return Err(ToeError::Option(o)),
                };
                Command::SetOpt {
                    conn: id,
                    opt,
                    value: le32(b, 12),
                }
            }
            o => return Err(ToeError::Opcode(o)),
        })
    }

    pub fn to_bytes(&self) -> [u8; CMD_LEN] {
        let mut b = [0u8; CMD_LEN];
        let (code, id) = match *self {
            Command::Hello { version, conns } => {
                b[8..10].copy_from_slice(&version.to_le_bytes());
                b[12..16].copy_from_slice(&conns.to_le_bytes());
                (op::HELLO, 0)
            }
            Command::IfConfig {
                addr,
                prefix,
                gateway,
            } => {
                put_addr(&mut b, 8, 12, addr);
                b[9] = prefix;
                if let Some(g) = gateway {
                    put_addr(&mut b, 10, 28, g);
                }
                (op::IFCONFIG, 0)
            }
            Command::Connect {
                conn,
                remote,
                local_port,
                rx,
                tx,
            } => {
                put_addr(&mut b, 8, 16, remote.ip());
                b[10..12].copy_from_slice(&remote.port().to_le_bytes());
                b[12..14].copy_from_slice(&local_port.to_le_bytes());
                put_ring(&mut b, 32, rx);
                put_ring(&mut b, 44, tx);
                (op::CONNECT, conn)
            }
            Command::Listen {
                id,
                port,
                family,
                backlog,
            } => {
                b[8] = match family {
                    Family::Both => FAMILY_ANY,
                    Family::V4 => FAMILY_V4,
                    Family::V6 => FAMILY_V6,
                };
                b[10..12].copy_from_slice(&port.to_le_bytes());
                b[12..14].copy_from_slice(&backlog.to_le_bytes());
                (op::LISTEN, id)
            }
            Command::Unlisten { id } => (op::UNLISTEN, id),
            Command::Accept {
                conn,
                handle,
                rx,
                tx,
            } => {
                b[8..12].copy_from_slice(&handle.to_le_bytes());
                put_ring(&mut b, 16, rx);
                put_ring(&mut b, 28, tx);
                (op::ACCEPT, conn)
            }
            Command::Send { conn, tail } => {
                b[8..12].copy_from_slice(&tail.to_le_bytes());
                (op::SEND, conn)
            }
            Command::Recvd { conn, head } => {
                b[8..12].copy_from_slice(&head.to_le_bytes());
                (op::RECVD, conn)
            }
            Command::Shutdown { conn } => (op::SHUTDOWN, conn),
            Command::Close { conn } => (op::CLOSE, conn),
            Command::Abort { conn } => (op::ABORT, conn),
            Command::SetOpt { conn, opt, value } => {
                b[8..10].copy_from_slice(&(opt as u16).to_le_bytes());
                b[12..16].copy_from_slice(&value.to_le_bytes());
                (op::SETOPT, conn)
            }
        };
        b[0] = code;
        b[4..8].copy_from_slice(&id.to_le_bytes());
        b
    }
}

/// The device's answer to a command: u8 status, 3 reserved bytes, le32
/// value (HELLO: the table size granted; CONNECT: the local port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub status: Status,
    pub value: u32,
}

impl Completion {
    pub fn ok(value: u32) -> Completion {
        Completion {
            status: Status::Ok,
            value,
        }
    }

    pub fn err(status: Status) -> Completion {
        Completion { status, value: 0 }
    }

    pub fn parse(b: &[u8]) -> Result<Completion, ToeError> {
        exact(b, COMPLETION_LEN)?;
        Ok(Completion {
            status: Status::from_u8(b[0]).ok_or(ToeError::Status(b[0]))?,
            value: le32(b, 4),
        })
    }

    pub fn to_bytes(&self) -> [u8; COMPLETION_LEN] {
        let mut b = [0u8; COMPLETION_LEN];
        b[0] = self.status as u8;
        b[4..8].copy_from_slice(&self.value.to_le_bytes());
        b
    }
}

/// What the device tells the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Connection `conn`'s handshake finished; the peer's MSS.
    Connected {
        conn: u32,
        local_port: u16,
        mss: u16,
    },
    /// A connection to listener `listener` from `remote` is established
    /// and waits as `handle` for [`Command::Accept`].
    Incoming {
        listener: u32,
        handle: u32,
        remote: SocketAddr,
    },
    /// The RX ring holds bytes up to `tail`.
    Data { conn: u32, tail: u32 },
    /// The peer acknowledged the TX ring up to `acked`.
    Sent { conn: u32, acked: u32 },
    /// The peer sent FIN after the last [`Event::Data`].
    PeerClosed { conn: u32 },
    /// The connection ended; the id and its rings are the driver's again.
    Closed { conn: u32, reason: CloseReason },
}

// Event layout: u8 type, u8 reserved, le16 reserved, le32 id, then:
//   CONNECTED  le16 local port, le16 mss
//   INCOMING   le32 handle, u8 family, u8 _, le16 remote port, addr[16] at 16
//   DATA       le32 tail;  SENT le32 acked
//   CLOSED     u8 reason
impl Event {
    pub fn parse(b: &[u8]) -> Result<Event, ToeError> {
        exact(b, EVENT_LEN)?;
        let id = le32(b, 4);
        Ok(match b[0] {
            ev::CONNECTED => Event::Connected {
                conn: id,
                local_port: le16(b, 8),
                mss: le16(b, 10),
            },
            ev::INCOMING => Event::Incoming {
                listener: id,
                handle: le32(b, 8),
                remote: SocketAddr::new(get_addr(b, 12, 16)?, le16(b, 14)),
            },
            ev::DATA => Event::Data {
                conn: id,
                tail: le32(b, 8),
            },
            ev::SENT => Event::Sent {
                conn: id,
                acked: le32(b, 8),
            },
            ev::PEER_CLOSED => Event::PeerClosed { conn: id },
            ev::CLOSED => Event::Closed {
                conn: id,
                reason: CloseReason::from_u8(b[8]).ok_or(ToeError::Reason(b[8]))?,
            },
            t => return Err(ToeError::EventType(t)),
        })
    }

    pub fn to_bytes(&self) -> [u8; EVENT_LEN] {
        let mut b = [0u8; EVENT_LEN];
        let (t, id) = match *self {
            Event::Connected {
                conn,
                local_port,
                mss,
            } => {
                b[8..10].copy_from_slice(&local_port.to_le_bytes());
                b[10..12].copy_from_slice(&mss.to_le_bytes());
                (ev::CONNECTED, conn)
            }
            Event::Incoming {
                listener,
                handle,
                remote,
            } => {
                b[8..12].copy_from_slice(&handle.to_le_bytes());
                put_addr(&mut b, 12, 16, remote.ip());
                b[14..16].copy_from_slice(&remote.port().to_le_bytes());
                (ev::INCOMING, listener)
            }
            Event::Data { conn, tail } => {
                b[8..12].copy_from_slice(&tail.to_le_bytes());
                (ev::DATA, conn)
            }
            Event::Sent { conn, acked } => {
                b[8..12].copy_from_slice(&acked.to_le_bytes());
                (ev::SENT, conn)
            }
            Event::PeerClosed { conn } => (ev::PEER_CLOSED, conn),
            Event::Closed { conn, reason } => {
                b[8] = reason as u8;
                (ev::CLOSED, conn)
            }
        };
        b[0] = t;
        b[4..8].copy_from_slice(&id.to_le_bytes());
        b
    }

    /// The connection or listener the event is about.
    pub fn id(&self) -> u32 {
        match *self {
            Event::Connected { conn, .. }
            | Event::Data { conn, .. }
            | Event::Sent { conn, .. }
            | Event::PeerClosed { conn }
            | Event::Closed { conn, .. } => conn,
            Event::Incoming { listener, .. } => listener,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(addr: u64, size: u32) -> RingSpec {
        RingSpec { addr, size }
    }

    fn commands() -> Vec<Command> {
        let v4: SocketAddr = "192.0.2.1:5201".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        vec![
            Command::Hello {
                version: VERSION,
                conns: 1024,
            },
            Command::IfConfig {
                addr: "192.0.2.2".parse().unwrap(),
                prefix: 24,
                gateway: Some("192.0.2.254".parse().unwrap()),
            },
            Command::IfConfig {
                addr: "2001:db8::2".parse().unwrap(),
                prefix: 64,
                gateway: None,
            },
            Command::Connect {
                conn: 7,
                remote: v4,
                local_port: 0,
                rx: ring(0x1_0000_0000, 1 << 16),
                tx: ring(0x2000, 4096),
            },
            Command::Connect {
                conn: u32::MAX,
                remote: v6,
                local_port: 50000,
                rx: ring(u64::MAX - 4095, 4096),
                tx: ring(0, RING_MAX),
            },
            Command::Listen {
                id: 3,
                port: 5201,
                family: Family::Both,
                backlog: 128,
            },
            Command::Listen {
                id: 4,
                port: 80,
                family: Family::V6,
                backlog: 1,
            },
            Command::Unlisten { id: 3 },
            Command::Accept {
                conn: 9,
                handle: 0xdead_beef,
                rx: ring(0x10_0000, 1 << 20),
                tx: ring(0x20_0000, 1 << 20),
            },
            Command::Send {
                conn: 9,
                tail: u32::MAX,
            },
            Command::Recvd { conn: 9, head: 17 },
            Command::Shutdown { conn: 9 },
            Command::Close { conn: 9 },
            Command::Abort { conn: 9 },
            Command::SetOpt {
                conn: 9,
                opt: SockOpt::KeepAlive,
                value: 75,
            },
        ]
    }

    #[test]
    fn commands_round_trip() {
        for c in commands() {
            let b = c.to_bytes();
            assert_eq!(Command::parse(&b), Ok(c), "{b:?}");
        }
    }

    /// The layout, byte by byte, for one command and one event: the
    /// other side of the wire is written from this page, not from the
    /// code.
    #[test]
    fn connect_and_incoming_layouts() {
        let c = Command::Connect {
            conn: 0x0403_0201,
            remote: "198.51.100.7:5201".parse().unwrap(),
            local_port: 0x1234,
            rx: ring(0x1122_3344_5566_7000, 8192),
            tx: ring(0x8000, 4096),
        };
        let b = c.to_bytes();
        assert_eq!(&b[..8], &[op::CONNECT, 0, 0, 0, 1, 2, 3, 4]);
        assert_eq!(&b[8..16], &[4, 0, 0x51, 0x14, 0x34, 0x12, 0, 0]);
        assert_eq!(&b[16..20], &[198, 51, 100, 7]);
        assert_eq!(
            &b[32..44],
            &[0, 0x70, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0, 0x20, 0, 0]
        );
        assert_eq!(&b[44..56], &[0, 0x80, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0]);
        assert!(b[56..].iter().all(|&x| x == 0));
        let e = Event::Incoming {
            listener: 2,
            handle: 0x0a0b_0c0d,
            remote: "[2001:db8::9]:40000".parse().unwrap(),
        };
        let b = e.to_bytes();
        assert_eq!(
            &b[..16],
            &[
                ev::INCOMING,
                0,
                0,
                0,
                2,
                0,
                0,
                0,
                0x0d,
                0x0c,
                0x0b,
                0x0a,
                6,
                0,
                0x40,
                0x9c
            ]
        );
        assert_eq!(&b[16..18], &[0x20, 0x01]);
        assert_eq!(b[31], 9);
    }

    #[test]
    fn events_and_completions_round_trip() {
        let evs = [
            Event::Connected {
                conn: 1,
                local_port: 49152,
                mss: 1460,
            },
            Event::Incoming {
                listener: 3,
                handle: 77,
                remote: "192.0.2.9:33000".parse().unwrap(),
            },
            Event::Data {
                conn: 1,
                tail: 123_456,
            },
            Event::Sent { conn: 1, acked: 9 },
            Event::PeerClosed { conn: 1 },
            Event::Closed {
                conn: 1,
                reason: CloseReason::TimedOut,
            },
        ];
        for e in evs {
            assert_eq!(Event::parse(&e.to_bytes()), Ok(e));
        }
        for c in [Completion::ok(1024), Completion::err(Status::TableFull)] {
            assert_eq!(Completion::parse(&c.to_bytes()), Ok(c));
        }
    }

    #[test]
    fn bad_bytes_are_refused() {
        let good = commands()[3].to_bytes();
        assert_eq!(
            Command::parse(&good[..63]),
            Err(ToeError::Length {
                expected: 64,
                got: 63
            })
        );
        let mut b = good;
        b[0] = 99;
        assert_eq!(Command::parse(&b), Err(ToeError::Opcode(99)));
        let mut b = good;
        b[8] = 5;
        assert_eq!(Command::parse(&b), Err(ToeError::Family(5)));
        let mut b = good;
        b[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(Command::parse(&b), Err(ToeError::Port));
        for size in [0u32, 4095, 6000, RING_MAX * 2] {
            let mut b = good;
            b[40..44].copy_from_slice(&size.to_le_bytes());
            assert_eq!(Command::parse(&b), Err(ToeError::RingSize(size)));
        }
        let mut b = commands()[1].to_bytes();
        b[9] = 33;
        assert_eq!(Command::parse(&b), Err(ToeError::Prefix(33)));
        let mut b = commands()[1].to_bytes();
        b[10] = FAMILY_V6;
        assert_eq!(Command::parse(&b), Err(ToeError::Family(FAMILY_V6)));
        let mut b = commands()[14].to_bytes();
        b[8] = 9;
        assert_eq!(Command::parse(&b), Err(ToeError::Option(9)));
        let mut e = Event::PeerClosed { conn: 1 }.to_bytes();
        e[0] = 0;
        assert_eq!(Event::parse(&e), Err(ToeError::EventType(0)));
        let mut e = Event::Closed {
            conn: 1,
            reason: CloseReason::Done,
        }
        .to_bytes();
        e[8] = 6;
        assert_eq!(Event::parse(&e), Err(ToeError::Reason(6)));
        assert_eq!(
            Completion::parse(&[9, 0, 0, 0, 0, 0, 0, 0]),
            Err(ToeError::Status(9))
        );
    }

    #[test]
    fn spans_wrap_at_the_ring_end() {
        assert_eq!(spans(0, 100, 4096), [(0, 100), (0, 0)]);
        assert_eq!(spans(4000, 200, 4096), [(4000, 96), (0, 104)]);
        assert_eq!(spans(u32::MAX - 9, 20, 4096), [(4086, 10), (0, 10)]);
        assert_eq!(spans(8192 + 5, 4096, 4096), [(5, 4091), (0, 5)]);
        // Never more than the ring.
        assert_eq!(spans(1, 10_000, 4096), [(1, 4095), (0, 1)]);
        assert_eq!(spans(1, 10, 0), [(0, 0); 2]);
        assert_eq!(spans(1, 10, 3000), [(0, 0); 2]);
    }
}
