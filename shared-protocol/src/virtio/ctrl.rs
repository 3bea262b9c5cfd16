//! Control-virtqueue commands (virtio 1.3, 5.1.6.5).
//!
//! A command is `u8 class; u8 command; data[]` in device-readable buffers,
//! followed by a device-writable part that ends in the `u8 ack`. Parsing
//! checks the format (exact lengths, power-of-two tables, VLAN ids); what a
//! particular device can accept (queue counts, key sizes) is its own check.

use thiserror::Error;

use crate::wire::ethernet::Address;

/// Command classes.
pub mod class {
    pub const RX: u8 = 0;
    pub const MAC: u8 = 1;
    pub const VLAN: u8 = 2;
    pub const ANNOUNCE: u8 = 3;
    pub const MQ: u8 = 4;
    pub const GUEST_OFFLOADS: u8 = 5;
    pub const NOTF_COAL: u8 = 6;
}

/// Commands of each class.
pub mod cmd {
    pub const RX_PROMISC: u8 = 0;
    pub const RX_ALLMULTI: u8 = 1;
    pub const RX_ALLUNI: u8 = 2;
    pub const RX_NOMULTI: u8 = 3;
    pub const RX_NOUNI: u8 = 4;
    pub const RX_NOBCAST: u8 = 5;
    pub const MAC_TABLE_SET: u8 = 0;
    pub const MAC_ADDR_SET: u8 = 1;
    pub const VLAN_ADD: u8 = 0;
    pub const VLAN_DEL: u8 = 1;
    pub const ANNOUNCE_ACK: u8 = 0;
    pub const MQ_VQ_PAIRS_SET: u8 = 0;
    pub const MQ_RSS_CONFIG: u8 = 1;
    pub const MQ_HASH_CONFIG: u8 = 2;
    pub const GUEST_OFFLOADS_SET: u8 = 0;
    pub const NOTF_COAL_TX_SET: u8 = 0;
    pub const NOTF_COAL_RX_SET: u8 = 1;
    pub const NOTF_COAL_VQ_SET: u8 = 2;
    pub const NOTF_COAL_VQ_GET: u8 = 3;
}

pub const ACK_OK: u8 = 0;
pub const ACK_ERR: u8 = 1;

/// Queue pairs a driver may ask for with VQ_PAIRS_SET.
pub const VQ_PAIRS_MIN: u16 = 1;
pub const VQ_PAIRS_MAX: u16 = 0x8000;

/// Why a command could not be parsed. The device answers ERR to each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum CtrlError {
    #[error("command shorter than its class and command bytes")]
    NoHeader,
    #[error("unknown class {0}")]
    UnknownClass(u8),
    #[error("unknown command {1} in class {0}")]
    UnknownCommand(u8, u8),
    #[error("command data is {got} bytes, expected {expected}")]
    Length { expected: usize, got: usize },
    #[error("vlan id {0} out of range")]
    VlanId(u16),
    #[error("queue pairs {0} out of range")]
    QueuePairs(u16),
    #[error("indirection table length {0} is not a power of two")]
    TableLength(u32),
}

/// The receive filter switches of the RX class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RxMode {
    Promisc,
    AllMulti,
    AllUni,
    NoMulti,
    NoUni,
    NoBcast,
}

impl RxMode {
    fn from_cmd(c: u8) -> Option<RxMode> {
        Some(match c {
            cmd::RX_PROMISC => RxMode::Promisc,
            cmd::RX_ALLMULTI => RxMode::AllMulti,
            cmd::RX_ALLUNI => RxMode::AllUni,
            cmd::RX_NOMULTI => RxMode::NoMulti,
            cmd::RX_NOUNI => RxMode::NoUni,
            cmd::RX_NOBCAST => RxMode::NoBcast,
            _ => return None,
        })
    }
    fn cmd(self) -> u8 {
        match self {
            RxMode::Promisc => cmd::RX_PROMISC,
            RxMode::AllMulti => cmd::RX_ALLMULTI,
            RxMode::AllUni => cmd::RX_ALLUNI,
            RxMode::NoMulti => cmd::RX_NOMULTI,
            RxMode::NoUni => cmd::RX_NOUNI,
            RxMode::NoBcast => cmd::RX_NOBCAST,
        }
    }
}

/// `struct virtio_net_rss_config`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RssConfig {
    pub hash_types: u32,
    /// `indirection_table_mask + 1` entries.
    pub indirection_table: Vec<u16>,
    pub unclassified_queue: u16,
    pub max_tx_vq: u16,
    pub key: Vec<u8>,
}

/// `struct virtio_net_hash_config` (hash report without RSS steering).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HashConfig {
    pub hash_types: u32,
    pub key: Vec<u8>,
}

/// `struct virtio_net_ctrl_coal`. Zero in either field means "notify for
/// every packet".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Coal {
    pub max_packets: u32,
    pub max_usecs: u32,
}

impl Coal {
    pub const LEN: usize = 8;
    fn parse(d: &[u8]) -> Coal {
        Coal {
            max_packets: le32(d, 0),
            max_usecs: le32(d, 4),
        }
    }
    pub fn to_bytes(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&self.max_packets.to_le_bytes());
        b[4..].copy_from_slice(&self.max_usecs.to_le_bytes());
        b
    }
    /// Reads the device-writable answer to VQ_GET.
    pub fn from_bytes(d: &[u8]) -> Option<Coal> {
        (d.len() >= Self::LEN).then(|| Coal::parse(d))
    }
}

/// One control command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CtrlCommand {
    Rx {
        mode: RxMode,
        on: bool,
    },
    MacTableSet {
        unicast: Vec<Address>,
        multicast: Vec<Address>,
    },
    MacAddrSet(Address),
    VlanAdd(u16),
    VlanDel(u16),
    AnnounceAck,
    VqPairsSet(u16),
    RssConfig(RssConfig),
    HashConfig(HashConfig),
    GuestOffloadsSet(u64),
    CoalTxSet(Coal),
    CoalRxSet(Coal),
    CoalVqSet {
        vq_index: u16,
        coal: Coal,
    },
    /// The device answers with a [`Coal`] in the device-writable part.
    CoalVqGet {
        vq_index: u16,
    },
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn exact(d: &[u8], expected: usize) -> Result<&[u8], CtrlError> {
    if d.len() == expected {
        Ok(d)
    } else {
        Err(CtrlError::Length {
            expected,
            got: d.len(),
        })
    }
}

fn at_least(d: &[u8], expected: usize) -> Result<(), CtrlError> {
    if d.len() < expected {
        Err(CtrlError::Length {
            expected,
            got: d.len(),
        })
    } else {
        Ok(())
    }
}

/// Reads one `struct virtio_net_ctrl_mac` (le32 entries, then the
/// addresses), returning the rest of `d`.
fn mac_table(d: &[u8]) -> Result<(Vec<Address>, &[u8]), CtrlError> {
    at_least(d, 4)?;
    let entries = le32(d, 0) as usize;
    let need = entries.checked_mul(6).and_then(|n| n.checked_add(4));
    let need = need.filter(|&n| n <= d.len()).ok_or(CtrlError::Length {
        expected: entries.saturating_mul(6).saturating_add(4),
        got: d.len(),
    })?;
    let macs = d[4..need]
        .chunks_exact(6)
        .map(|c| Address([c[0], c[1], c[2], c[3], c[4], c[5]]))
        .collect();
    Ok((macs, &d[need..]))
}

fn vlan(d: &[u8]) -> Result<u16, CtrlError> {
    let v = le16(exact(d, 2)?, 0);
    if v > 4095 {
        return Err(CtrlError::VlanId(v));
    }
    Ok(v)
}

impl CtrlCommand {
    /// Parses a command from its class, command and data bytes.
    pub fn parse(class: u8, command: u8, d: &[u8]) -> Result<CtrlCommand, CtrlError> {
        let unknown = CtrlError::UnknownCommand(class, command);
        Ok(match class {
            class::RX => {
                let mode = RxMode::from_cmd(command).ok_or(unknown)?;
                CtrlCommand::Rx {
                    mode,
                    on: exact(d, 1)?[0] != 0,
                }
            }
            class::MAC => match command {
                cmd::MAC_TABLE_SET => {
                    let (unicast, rest) = mac_table(d)?;
                    let (multicast, rest) = mac_table(rest)?;
                    if !rest.is_empty() {
                        return Err(CtrlError::Length {
                            expected: d.len() - rest.len(),
                            got: d.len(),
                        });
                    }
                    CtrlCommand::MacTableSet { unicast, multicast }
                }
                cmd::MAC_ADDR_SET => {
                    let b = exact(d, 6)?;
                    CtrlCommand::MacAddrSet(Address([b[0], b[1], b[2], b[3], b[4], b[5]]))
                }
                _ => return Err(unknown),
            },
            class::VLAN => match command {
                cmd::VLAN_ADD => CtrlCommand::VlanAdd(vlan(d)?),
                cmd::VLAN_DEL => CtrlCommand::VlanDel(vlan(d)?),
                _ => return Err(unknown),
            },
            class::ANNOUNCE => match command {
                cmd::ANNOUNCE_ACK => {
                    exact(d, 0)?;
                    CtrlCommand::AnnounceAck
                }
                _ => return Err(unknown),
            },
            class::MQ => match command {
                cmd::MQ_VQ_PAIRS_SET => {
                    let n = le16(exact(d, 2)?, 0);
                    if !(VQ_PAIRS_MIN..=VQ_PAIRS_MAX).contains(&n) {
                        return Err(CtrlError::QueuePairs(n));
                    }
                    CtrlCommand::VqPairsSet(n)
                }
                cmd::MQ_RSS_CONFIG => CtrlCommand::RssConfig(parse_rss(d)?),
                cmd::MQ_HASH_CONFIG => {
                    at_least(d, 13)?;
                    let klen = usize::from(d[12]);
                    exact(d, 13 + klen)?;
                    CtrlCommand::HashConfig(HashConfig {
                        hash_types: le32(d, 0),
                        key: d[13..].to_vec(),
                    })
                }
                _ => return Err(unknown),
            },
            class::GUEST_OFFLOADS => match command {
                cmd::GUEST_OFFLOADS_SET => {
                    let b = exact(d, 8)?;
                    CtrlCommand::GuestOffloadsSet(u64::from_le_bytes([
                        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
                    ]))
                }
                _ => return Err(unknown),
            },
            class::NOTF_COAL => match command {
                cmd::NOTF_COAL_TX_SET => CtrlCommand::CoalTxSet(Coal::parse(exact(d, 8)?)),
                cmd::NOTF_COAL_RX_SET => CtrlCommand::CoalRxSet(Coal::parse(exact(d, 8)?)),
                cmd::NOTF_COAL_VQ_SET => {
                    let b = exact(d, 12)?;
                    CtrlCommand::CoalVqSet {
                        vq_index: le16(b, 0),
                        coal: Coal::parse(&b[4..]),
                    }
                }
                cmd::NOTF_COAL_VQ_GET => CtrlCommand::CoalVqGet {
                    vq_index: le16(exact(d, 4)?, 0),
                },
                _ => return Err(unknown),
            },
            other => return Err(CtrlError::UnknownClass(other)),
        })
    }

    /// Parses `class, command, data` as one byte string (the device-readable
    /// part of a control request, gathered).
    pub fn parse_message(b: &[u8]) -> Result<CtrlCommand, CtrlError> {
        match b {
            [class, command, data @ ..] => CtrlCommand::parse(*class, *command, data),
            _ => Err(CtrlError::NoHeader),
        }
    }

    pub fn class_and_command(&self) -> (u8, u8) {
        match self {
            CtrlCommand::Rx { mode, .. } => (class::RX, mode.cmd()),
            CtrlCommand::MacTableSet { .. } => (class::MAC, cmd::MAC_TABLE_SET),
            CtrlCommand::MacAddrSet(_) => (class::MAC, cmd::MAC_ADDR_SET),
            CtrlCommand::VlanAdd(_) => (class::VLAN, cmd::VLAN_ADD),
            CtrlCommand::VlanDel(_) => (class::VLAN, cmd::VLAN_DEL),
            CtrlCommand::AnnounceAck => (class::ANNOUNCE, cmd::ANNOUNCE_ACK),
            CtrlCommand::VqPairsSet(_) => (class::MQ, cmd::MQ_VQ_PAIRS_SET),
            CtrlCommand::RssConfig(_) => (class::MQ, cmd::MQ_RSS_CONFIG),
            CtrlCommand::HashConfig(_) => (class::MQ, cmd::MQ_HASH_CONFIG),
            CtrlCommand::GuestOffloadsSet(_) => (class::GUEST_OFFLOADS, cmd::GUEST_OFFLOADS_SET),
            CtrlCommand::CoalTxSet(_) => (class::NOTF_COAL, cmd::NOTF_COAL_TX_SET),
            CtrlCommand::CoalRxSet(_) => (class::NOTF_COAL, cmd::NOTF_COAL_RX_SET),
            CtrlCommand::CoalVqSet { .. } => (class::NOTF_COAL, cmd::NOTF_COAL_VQ_SET),
            CtrlCommand::CoalVqGet { .. } => (class::NOTF_COAL, cmd::NOTF_COAL_VQ_GET),
        }
    }

    /// Appends the command's data bytes (without class and command) to
    /// `out`. Fails when a field cannot be represented (a key over 255
    /// bytes, a table whose length is not a power of two).
    pub fn emit_data(&self, out: &mut Vec<u8>) -> Result<(), CtrlError> {
        match self {
            CtrlCommand::Rx { on, .. } => out.push(u8::from(*on)),
            CtrlCommand::MacTableSet { unicast, multicast } => {
                for t in [unicast, multicast] {
                    let n = u32::try_from(t.len()).map_err(|_| CtrlError::Length {
                        expected: u32::MAX as usize,
                        got: t.len(),
                    })?;
                    out.extend_from_slice(&n.to_le_bytes());
                    for a in t.iter() {
                        out.extend_from_slice(&a.0);
                    }
                }
            }
            CtrlCommand::MacAddrSet(a) => out.extend_from_slice(&a.0),
            CtrlCommand::VlanAdd(v) | CtrlCommand::VlanDel(v) => {
                if *v > 4095 {
                    return Err(CtrlError::VlanId(*v));
                }
                out.extend_from_slice(&v.to_le_bytes());
            }
            CtrlCommand::AnnounceAck => {}
            CtrlCommand::VqPairsSet(n) => out.extend_from_slice(&n.to_le_bytes()),
            CtrlCommand::RssConfig(r) => {
                let n = r.indirection_table.len();
                if !n.is_power_of_two() || n > 0x1_0000 {
                    return Err(CtrlError::TableLength(n as u32));
                }
                let klen = key_len(&r.key)?;
                out.extend_from_slice(&r.hash_types.to_le_bytes());
                out.extend_from_slice(&((n - 1) as u16).to_le_bytes());
                out.extend_from_slice(&r.unclassified_queue.to_le_bytes());
                for q in &r.indirection_table {
                    out.extend_from_slice(&q.to_le_bytes());
                }
                out.extend_from_slice(&r.max_tx_vq.to_le_bytes());
                out.push(klen);
                out.extend_from_slice(&r.key);
            }
            CtrlCommand::HashConfig(h) => {
                let klen = key_len(&h.key)?;
                out.extend_from_slice(&h.hash_types.to_le_bytes());
                out.extend_from_slice(&[0; 8]);
                out.push(klen);
                out.extend_from_slice(&h.key);
            }
            CtrlCommand::GuestOffloadsSet(o) => out.extend_from_slice(&o.to_le_bytes()),
            CtrlCommand::CoalTxSet(c) | CtrlCommand::CoalRxSet(c) => {
                out.extend_from_slice(&c.to_bytes())
            }
            CtrlCommand::CoalVqSet { vq_index, coal } => {
                out.extend_from_slice(&vq_index.to_le_bytes());
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&coal.to_bytes());
            }
            CtrlCommand::CoalVqGet { vq_index } => {
                out.extend_from_slice(&vq_index.to_le_bytes());
                out.extend_from_slice(&[0, 0]);
            }
        }
        Ok(())
    }

    /// `class, command, data` as one byte string.
    pub fn to_bytes(&self) -> Result<Vec<u8>, CtrlError> {
        let (c, m) = self.class_and_command();
        let mut out = vec![c, m];
        self.emit_data(&mut out)?;
        Ok(out)
    }

    /// Bytes of device-writable answer the command expects before its ack.
    pub fn response_len(&self) -> usize {
        match self {
            CtrlCommand::CoalVqGet { .. } => Coal::LEN,
            _ => 0,
        }
    }
}

fn key_len(key: &[u8]) -> Result<u8, CtrlError> {
    u8::try_from(key.len()).map_err(|_| CtrlError::Length {
        expected: 255,
        got: key.len(),
    })
}

fn parse_rss(d: &[u8]) -> Result<RssConfig, CtrlError> {
    // le32 hash_types; le16 mask; le16 unclassified; le16 table[mask+1];
    // le16 max_tx_vq; u8 key_len; u8 key[key_len].
    at_least(d, 8)?;
    let hash_types = le32(d, 0);
    let entries = usize::from(le16(d, 4)) + 1;
    if !entries.is_power_of_two() {
        return Err(CtrlError::TableLength(entries as u32));
    }
    let unclassified_queue = le16(d, 6);
    let table_end = 8 + 2 * entries;
    at_least(d, table_end + 3)?;
    let indirection_table = d[8..table_end]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let max_tx_vq = le16(d, table_end);
    let klen = usize::from(d[table_end + 2]);
    exact(d, table_end + 3 + klen)?;
    Ok(RssConfig {
        hash_types,
        indirection_table,
        unclassified_queue,
        max_tx_vq,
        key: d[table_end + 3..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(c: CtrlCommand) -> Vec<u8> {
        let b = c.to_bytes().unwrap();
        assert_eq!(CtrlCommand::parse_message(&b).unwrap(), c, "{b:?}");
        b
    }

    #[test]
    fn every_command_round_trips() {
        let mac = Address([2, 0, 0, 0, 0, 7]);
        for mode in [
            RxMode::Promisc,
            RxMode::AllMulti,
            RxMode::AllUni,
            RxMode::NoMulti,
            RxMode::NoUni,
            RxMode::NoBcast,
        ] {
            round_trip(CtrlCommand::Rx { mode, on: true });
        }
        let b = round_trip(CtrlCommand::MacTableSet {
            unicast: vec![mac],
            multicast: vec![
                Address([0x33, 0x33, 0, 0, 0, 1]),
                Address([1, 0, 0x5e, 0, 0, 1]),
            ],
        });
        assert_eq!(b.len(), 2 + 4 + 6 + 4 + 12);
        assert_eq!(
            round_trip(CtrlCommand::MacAddrSet(mac)),
            [1, 1, 2, 0, 0, 0, 0, 7]
        );
        assert_eq!(round_trip(CtrlCommand::VlanAdd(100)), [2, 0, 100, 0]);
        round_trip(CtrlCommand::VlanDel(4095));
        assert_eq!(round_trip(CtrlCommand::AnnounceAck), [3, 0]);
        assert_eq!(round_trip(CtrlCommand::VqPairsSet(4)), [4, 0, 4, 0]);
        let rss = round_trip(CtrlCommand::RssConfig(RssConfig {
            hash_types: 0x3f,
            indirection_table: vec![0, 1, 2, 3],
            unclassified_queue: 0,
            max_tx_vq: 4,
            key: (0..40).collect(),
        }));
        assert_eq!(&rss[2..10], &[0x3f, 0, 0, 0, 3, 0, 0, 0]);
        assert_eq!(rss.len(), 2 + 8 + 8 + 3 + 40);
        round_trip(CtrlCommand::HashConfig(HashConfig {
            hash_types: 0x12,
            key: vec![7; 52],
        }));
        round_trip(CtrlCommand::GuestOffloadsSet(0x183));
        assert_eq!(
            round_trip(CtrlCommand::CoalTxSet(Coal {
                max_packets: 16,
                max_usecs: 50
            })),
            [6, 0, 16, 0, 0, 0, 50, 0, 0, 0]
        );
        round_trip(CtrlCommand::CoalRxSet(Coal::default()));
        round_trip(CtrlCommand::CoalVqSet {
            vq_index: 2,
            coal: Coal {
                max_packets: 1,
                max_usecs: 2,
            },
        });
        let get = CtrlCommand::CoalVqGet { vq_index: 3 };
        round_trip(get.clone());
        assert_eq!(get.response_len(), 8);
    }

    #[test]
    fn format_errors() {
        assert_eq!(CtrlCommand::parse_message(&[0]), Err(CtrlError::NoHeader));
        assert_eq!(
            CtrlCommand::parse(9, 0, &[]),
            Err(CtrlError::UnknownClass(9))
        );
        assert_eq!(
            CtrlCommand::parse(0, 6, &[1]),
            Err(CtrlError::UnknownCommand(0, 6))
        );
        assert_eq!(
            CtrlCommand::parse(0, 0, &[1, 1]),
            Err(CtrlError::Length {
                expected: 1,
                got: 2
            })
        );
        assert_eq!(
            CtrlCommand::parse(2, 0, &[0, 0x10]),
            Err(CtrlError::VlanId(4096))
        );
        assert_eq!(
            CtrlCommand::parse(4, 0, &[0, 0]),
            Err(CtrlError::QueuePairs(0))
        );
        assert_eq!(
            CtrlCommand::parse(4, 0, &[1, 0x80]),
            Err(CtrlError::QueuePairs(0x8001))
        );
        // mask 2 -> 3 entries: not a power of two.
        let mut rss = vec![0, 0, 0, 0, 2, 0, 0, 0];
        rss.extend_from_slice(&[0; 6 + 3]);
        assert_eq!(
            CtrlCommand::parse(4, 1, &rss),
            Err(CtrlError::TableLength(3))
        );
        // A MAC table claiming 2^32-1 entries.
        let huge = [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];
        assert!(matches!(
            CtrlCommand::parse(1, 0, &huge),
            Err(CtrlError::Length { .. })
        ));
        // Key length past the end.
        let mut rss = vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 40];
        rss.extend_from_slice(&[0; 39]);
        assert!(matches!(
            CtrlCommand::parse(4, 1, &rss),
            Err(CtrlError::Length { .. })
        ));
    }
}
