//! Command-line pieces the tools share: how to reach vnicd and which
//! addresses and offloads the stack uses.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Duration,
};

use clap::Args;
use vnic_protocol::{frag, virtio::Features};

use crate::{
    net::{NetOptions, VirtioNet},
    stack::{Stack, StackConfig},
    toe::ToeOptions,
    Error, Result,
};

/// Where the NIC is and how the stack on it is set up.
#[derive(Debug, Clone, Args)]
pub struct NetArgs {
    /// vnicd's vhost-user socket.
    #[arg(long, required_unless_present = "pci", conflicts_with = "pci")]
    pub socket: Option<PathBuf>,
    /// Inside a VM: the virtio-net PCI function to drive from user space
    /// (e.g. 0000:00:02.0), through uio_pci_generic and hugepages.
    #[arg(long, value_name = "BDF")]
    pub pci: Option<String>,
    /// IPv4 address and prefix of this end, e.g. 192.0.2.2/24.
    #[arg(long)]
    pub addr: Option<String>,
    /// IPv6 address and prefix, e.g. 2001:db8::2/64.
    #[arg(long)]
    pub addr6: Option<String>,
    /// Queue pairs (one stack shard each).
    #[arg(long, default_value_t = 1)]
    pub queues: u16,
    /// Entries per virtqueue.
    #[arg(long, default_value_t = 256)]
    pub queue_size: u16,
    /// Do not use TSO (the stack cuts segments at the MSS).
    #[arg(long)]
    pub no_tso: bool,
    /// Do not use checksum offload either way (implies --no-tso).
    #[arg(long)]
    pub no_csum: bool,
    /// Busy-poll this many microseconds before sleeping.
    #[arg(long)]
    pub busy_poll_us: Option<u64>,
    /// Memory IP reassembly may hold, in KiB, across all shards (4096).
    #[arg(long, default_value_t = 4096)]
    pub reassembly_kib: usize,
    /// Run TCP on the device's TOE (vnicd offers it to drivers that own
    /// all queues); connections past its table use the stack's TCP.
    #[arg(long)]
    pub toe: bool,
    /// TOE connections with rings of their own.
    #[arg(long, default_value_t = 64)]
    pub toe_conns: u16,
    /// Bytes of each TOE payload ring, in KiB (a power of two, 4 to 2048):
    /// the socket's buffer each way.
    #[arg(long, default_value_t = 2048)]
    pub toe_ring_kib: u32,
}

fn prefix<T: std::str::FromStr>(s: &str, max: u8) -> Result<(T, u8)> {
    let (a, p) = s.split_once('/').unwrap_or((s, ""));
    let addr = a
        .parse()
        .map_err(|_| Error::Argument(format!("bad address {a}")))?;
    let len = if p.is_empty() {
        max
    } else {
        p.parse()
            .ok()
            .filter(|&l| l <= max)
            .ok_or_else(|| Error::Argument(format!("bad prefix length {p}")))?
    };
    Ok((addr, len))
}

impl NetArgs {
    /// The features asked of the device.
    pub fn features(&self) -> Features {
        let mut f = NetOptions::DEFAULT_FEATURES
            | Features::CTRL_VQ
            | Features::MQ
            | Features::RSS
            | Features::CTRL_RX
            | Features::CTRL_VLAN
            | Features::NOTF_COAL
            | Features::VQ_NOTF_COAL
            | Features::EVENT_IDX;
        let tso = Features::HOST_TSO4
            | Features::HOST_TSO6
            | Features::GUEST_TSO4
            | Features::GUEST_TSO6
            | Features::HOST_ECN
            | Features::GUEST_ECN;
        if self.no_tso || self.no_csum {
            f -= tso;
        }
        if self.no_csum {
            f -= Features::CSUM | Features::GUEST_CSUM;
        }
        if self.toe {
            f |= Features::VNIC_TOE;
        }
        f
    }

    /// Connects to vnicd and starts the stack.
    pub fn start(&self) -> Result<Stack> {
        let ipv4 = self
            .addr
            .as_deref()
            .map(|s| prefix::<Ipv4Addr>(s, 32))
            .transpose()?;
        let ipv6 = self
            .addr6
            .as_deref()
            .map(|s| prefix::<Ipv6Addr>(s, 128))
            .transpose()?;
        if ipv4.is_none() && ipv6.is_none() {
            return Err(Error::Argument("give --addr or --addr6".into()));
        }
        let opts = NetOptions {
            pairs: self.queues.max(1),
            queue_size: self.queue_size,
            features: self.features(),
            rx_buf_len: 2048,
            enabled_pairs: None,
            toe: self.toe.then_some(ToeOptions {
                conns: self.toe_conns,
                ring: self.toe_ring_kib.saturating_mul(1024),
            }),
        };
        let dev = match (&self.pci, &self.socket) {
            (Some(bdf), _) => VirtioNet::open_pci(bdf, opts)?,
            (None, Some(socket)) => VirtioNet::connect(socket, opts)?,
            (None, None) => return Err(Error::Argument("give --socket or --pci".into())),
        };
        Stack::start(
            dev,
            StackConfig {
                ipv4,
                ipv6,
                tso: !self.no_tso && !self.no_csum,
                csum: !self.no_csum,
                busy_poll: self.busy_poll_us.map(Duration::from_micros),
                reassembly: frag::Limits {
                    max_memory: self.reassembly_kib.saturating_mul(1024),
                    ..frag::Limits::default()
                },
                toe: self.toe,
                ..StackConfig::default()
            },
        )
    }
}
