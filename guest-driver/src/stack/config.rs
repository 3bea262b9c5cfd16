//! Leaf: how a stack is set up.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use vnic_protocol::{frag, tcp};

/// How the stack is set up.
#[derive(Debug, Clone, Copy)]
pub struct StackConfig {
    pub ipv4: Option<(Ipv4Addr, u8)>,
    pub ipv6: Option<(Ipv6Addr, u8)>,
    /// Use TSO when the device offers it.
    pub tso: bool,
    /// Use checksum offload (both ways) when the device offers it.
    pub csum: bool,
    /// Frames a shard takes per poll before it looks at timers.
    pub budget: usize,
    /// Keep polling this long after the ring ran dry before sleeping.
    pub busy_poll: Option<Duration>,
    pub tcp: tcp::Config,
    /// Program the device's RSS (key, table over all pairs).
    pub rss: bool,
    /// IP reassembly limits for the whole stack; each shard gets its share
    /// of `max_memory` and `max_datagrams`.
    pub reassembly: frag::Limits,
    /// Run TCP connections on the device's TOE when the device has one
    /// (the driver took its queues); the stack's own TCP takes a
    /// connection the TOE has no room for.
    pub toe: bool,
}

impl Default for StackConfig {
    fn default() -> Self {
        StackConfig {
            ipv4: None,
            ipv6: None,
            tso: true,
            csum: true,
            budget: 64,
            busy_poll: None,
            tcp: tcp::Config::default(),
            rss: true,
            reassembly: frag::Limits::default(),
            toe: false,
        }
    }
}
