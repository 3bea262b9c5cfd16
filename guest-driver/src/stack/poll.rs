//! Leaf: what [`Stack::poll`](super::Stack::poll) waits on and reports.

use std::fmt;

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

    /// What a socket whose state cannot be read any more is ready for.
    pub(crate) const GONE: Readiness = Readiness {
        readable: false,
        writable: false,
        closed: true,
    };
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

impl fmt::Debug for PollEntry<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
