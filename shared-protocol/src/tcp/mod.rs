//! A sans-IO TCP engine: segments and time in; segments, timer deadlines
//! and events out. The guest stack drives it from its receive and
//! transmit paths; the device's TOE can drive the same engine.
//!
//! What it implements: the RFC 9293 state machine (simultaneous open and
//! close, TIME-WAIT), the RFC 6298 retransmission timer with Karn's rule
//! and backoff, NewReno fast retransmit and recovery (RFC 5681, RFC 6582)
//! that skips data the peer has SACKed (RFC 2018), window scaling and
//! timestamps with PAWS (RFC 7323), out-of-order reassembly within a
//! byte limit, MSS negotiation, delayed ACKs, keepalive, zero-window
//! probes and the RST/SYN/ACK validation of RFC 5961.
//!
//! Time is an [`Instant`] in microseconds chosen by the caller; the engine
//! never reads a clock.

mod assembler;
mod conn;
pub mod rtt;
pub mod seq;
#[cfg(test)]
mod tests;

pub use assembler::Assembler;
pub use conn::{reply_to_stray, Connection, Segment};

/// A point in time, microseconds since an origin the caller chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Instant(pub u64);

impl Instant {
    pub fn add_micros(self, us: u64) -> Instant {
        Instant(self.0.saturating_add(us))
    }

    pub fn micros_since(self, earlier: Instant) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// Connection states (RFC 9293, 3.3.2). LISTEN lives in the caller: a
/// listener makes a connection with [`Connection::accept`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    SynSent,
    SynReceived,
    Established,
    FinWait1,
    FinWait2,
    CloseWait,
    Closing,
    LastAck,
    TimeWait,
    Closed,
}

impl State {
    /// Both SYNs have been seen.
    pub fn is_synchronized(self) -> bool {
        !matches!(self, State::SynSent | State::SynReceived | State::Closed)
    }
}

/// What the application learns from the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The three-way handshake completed.
    Connected,
    /// In-order data is waiting in the receive buffer.
    Readable,
    /// Send-buffer space was freed.
    Writable,
    /// The peer sent FIN: no more data will arrive.
    PeerClosed,
    /// The connection ended normally (both FINs acknowledged).
    Closed,
    /// The peer reset the connection.
    Reset,
    /// Retransmissions or keepalive probes went unanswered.
    TimedOut,
}

/// Keepalive (RFC 9293, 3.8.4): after `idle` without a segment from the
/// peer, send up to `probes` probes `interval` apart, then give up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub idle: u64,
    pub interval: u64,
    pub probes: u32,
}

/// Per-connection settings. Durations are in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// The MSS we announce (MTU minus IP and TCP headers).
    pub mss: u16,
    /// MSS assumed when the peer announces none (536 for IPv4, 1220 for
    /// IPv6).
    pub default_peer_mss: u16,
    pub send_buffer: usize,
    pub recv_buffer: usize,
    /// Out-of-order bytes held at most.
    pub ooo_limit: usize,
    pub window_scaling: bool,
    pub timestamps: bool,
    pub sack: bool,
    pub rto_initial: u64,
    pub rto_min: u64,
    pub rto_max: u64,
    /// Delayed-ACK timeout (RFC 9293 3.8.6.3: under 0.5 s).
    pub delayed_ack: u64,
    /// Maximum segment lifetime; TIME-WAIT lasts 2 MSL.
    pub msl: u64,
    /// Retransmissions of one segment before giving up.
    pub max_retries: u32,
    /// Retransmissions of the SYN before giving up.
    pub max_syn_retries: u32,
    pub keepalive: Option<Keepalive>,
    /// Challenge ACKs per second at most (RFC 5961, 7).
    pub challenge_ack_limit: u32,
    /// Initial congestion window in segments (RFC 6928).
    pub initial_window: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mss: 1460,
            default_peer_mss: 536,
            send_buffer: 4 << 20,
            recv_buffer: 4 << 20,
            ooo_limit: 4 << 20,
            window_scaling: true,
            timestamps: true,
            sack: true,
            rto_initial: 1_000_000,
            rto_min: 200_000,
            rto_max: 60_000_000,
            delayed_ack: 40_000,
            msl: 30_000_000,
            max_retries: 15,
            max_syn_retries: 6,
            keepalive: None,
            challenge_ack_limit: 1000,
            initial_window: 10,
        }
    }
}

/// Counters one connection keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    pub segs_in: u64,
    pub segs_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Segments sent again (each MSS-sized piece counts once).
    pub retransmits: u64,
    pub fast_retransmits: u64,
    pub timeouts: u64,
    pub dup_acks: u64,
    pub ooo_segments: u64,
    /// Out-of-order segments dropped over the limit.
    pub ooo_dropped: u64,
    pub challenge_acks: u64,
    /// Segments dropped as unacceptable (sequence, PAWS, bad ACK).
    pub dropped: u64,
    pub keepalive_probes: u64,
    pub window_probes: u64,
}
