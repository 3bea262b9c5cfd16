//! `struct virtio_net_config` (virtio 1.3, 5.1.4), up to
//! `supported_hash_types`. Little-endian.

use crate::wire::ethernet::Address;

/// Bytes of config space laid out here.
pub const CONFIG_LEN: usize = 24;

/// `status` bits.
pub const STATUS_LINK_UP: u16 = 1;
pub const STATUS_ANNOUNCE: u16 = 2;

/// `duplex` values.
pub const DUPLEX_HALF: u8 = 0;
pub const DUPLEX_FULL: u8 = 1;
pub const DUPLEX_UNKNOWN: u8 = 0xff;
/// `speed` when unknown.
pub const SPEED_UNKNOWN: u32 = 0xffff_ffff;

/// The device-specific configuration of a virtio-net device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioNetConfig {
    pub mac: Address,
    pub status: u16,
    pub max_virtqueue_pairs: u16,
    pub mtu: u16,
    /// Mbit/s.
    pub speed: u32,
    pub duplex: u8,
    pub rss_max_key_size: u8,
    pub rss_max_indirection_table_length: u16,
    pub supported_hash_types: u32,
}

impl Default for VirtioNetConfig {
    fn default() -> Self {
        VirtioNetConfig {
            mac: Address::default(),
            status: STATUS_LINK_UP,
            max_virtqueue_pairs: 1,
            mtu: 1500,
            speed: SPEED_UNKNOWN,
            duplex: DUPLEX_UNKNOWN,
            rss_max_key_size: 0,
            rss_max_indirection_table_length: 0,
            supported_hash_types: 0,
        }
    }
}

impl VirtioNetConfig {
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0..6].copy_from_slice(&self.mac.0);
        b[6..8].copy_from_slice(&self.status.to_le_bytes());
        b[8..10].copy_from_slice(&self.max_virtqueue_pairs.to_le_bytes());
        b[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        b[12..16].copy_from_slice(&self.speed.to_le_bytes());
        b[16] = self.duplex;
        b[17] = self.rss_max_key_size;
        b[18..20].copy_from_slice(&self.rss_max_indirection_table_length.to_le_bytes());
        b[20..24].copy_from_slice(&self.supported_hash_types.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; CONFIG_LEN]) -> VirtioNetConfig {
        let le16 = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        let le32 = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        VirtioNetConfig {
            mac: Address([b[0], b[1], b[2], b[3], b[4], b[5]]),
            status: le16(6),
            max_virtqueue_pairs: le16(8),
            mtu: le16(10),
            speed: le32(12),
            duplex: b[16],
            rss_max_key_size: b[17],
            rss_max_indirection_table_length: le16(18),
            supported_hash_types: le32(20),
        }
    }

    /// A config-space read as a driver issues it (GET_CONFIG, a PCI BAR
    /// read): `len` bytes at `offset`, or `None` when out of range.
    pub fn read(&self, offset: usize, len: usize) -> Option<Vec<u8>> {
        let end = offset.checked_add(len)?;
        self.to_bytes().get(offset..end).map(<[u8]>::to_vec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let c = VirtioNetConfig {
            mac: Address([2, 0, 0, 0, 0, 9]),
            status: STATUS_LINK_UP,
            max_virtqueue_pairs: 4,
            mtu: 9000,
            speed: 10000,
            duplex: DUPLEX_FULL,
            rss_max_key_size: 40,
            rss_max_indirection_table_length: 128,
            supported_hash_types: 0x3f,
        };
        let b = c.to_bytes();
        assert_eq!(&b[6..12], &[1, 0, 4, 0, 0x28, 0x23]);
        assert_eq!(&b[12..20], &[0x10, 0x27, 0, 0, 1, 40, 128, 0]);
        assert_eq!(&b[20..24], &[0x3f, 0, 0, 0]);
        assert_eq!(VirtioNetConfig::from_bytes(&b), c);
        assert_eq!(c.read(8, 2), Some(vec![4, 0]));
        assert_eq!(c.read(20, 8), None);
        assert_eq!(c.read(usize::MAX, 2), None);
    }
}
