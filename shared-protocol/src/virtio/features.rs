//! virtio-net and transport feature bits (virtio 1.3, 5.1.3 and 6).

bitflags::bitflags! {
    /// Feature bits, numbered as in the specification.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Features: u64 {
        const CSUM = 1 << 0;
        const GUEST_CSUM = 1 << 1;
        const CTRL_GUEST_OFFLOADS = 1 << 2;
        const MTU = 1 << 3;
        const MAC = 1 << 5;
        const GUEST_TSO4 = 1 << 7;
        const GUEST_TSO6 = 1 << 8;
        const GUEST_ECN = 1 << 9;
        const GUEST_UFO = 1 << 10;
        const HOST_TSO4 = 1 << 11;
        const HOST_TSO6 = 1 << 12;
        const HOST_ECN = 1 << 13;
        const HOST_UFO = 1 << 14;
        const MRG_RXBUF = 1 << 15;
        const STATUS = 1 << 16;
        const CTRL_VQ = 1 << 17;
        const CTRL_RX = 1 << 18;
        const CTRL_VLAN = 1 << 19;
        const CTRL_RX_EXTRA = 1 << 20;
        const GUEST_ANNOUNCE = 1 << 21;
        const MQ = 1 << 22;
        const CTRL_MAC_ADDR = 1 << 23;

        // Transport bits.
        const NOTIFY_ON_EMPTY = 1 << 24;
        const ANY_LAYOUT = 1 << 27;
        const INDIRECT_DESC = 1 << 28;
        const EVENT_IDX = 1 << 29;
        const VERSION_1 = 1 << 32;
        const ACCESS_PLATFORM = 1 << 33;
        const RING_PACKED = 1 << 34;
        const IN_ORDER = 1 << 35;
        const ORDER_PLATFORM = 1 << 36;
        const SR_IOV = 1 << 37;
        const NOTIFICATION_DATA = 1 << 38;
        const NOTIF_CONFIG_DATA = 1 << 39;
        const RING_RESET = 1 << 40;

        const DEVICE_STATS = 1 << 50;
        const HASH_TUNNEL = 1 << 51;
        const VQ_NOTF_COAL = 1 << 52;
        const NOTF_COAL = 1 << 53;
        const GUEST_USO4 = 1 << 54;
        const GUEST_USO6 = 1 << 55;
        const HOST_USO = 1 << 56;
        const HASH_REPORT = 1 << 57;
        /// vnic's own: the TOE (`crate::toe`), a bit virtio 1.3 leaves
        /// unassigned.
        const VNIC_TOE = 1 << 58;
        const GUEST_HDRLEN = 1 << 59;
        const RSS = 1 << 60;
        const RSC_EXT = 1 << 61;
        const STANDBY = 1 << 62;
        const SPEED_DUPLEX = 1 << 63;

        /// vhost-user's own bit in the feature word (not virtio).
        const VHOST_USER_PROTOCOL_FEATURES = 1 << 30;
    }
}

impl Features {
    /// The features whose meaning needs the control virtqueue.
    pub const NEEDS_CTRL_VQ: Features = Features::CTRL_RX
        .union(Features::CTRL_VLAN)
        .union(Features::CTRL_RX_EXTRA)
        .union(Features::GUEST_ANNOUNCE)
        .union(Features::MQ)
        .union(Features::CTRL_MAC_ADDR)
        .union(Features::CTRL_GUEST_OFFLOADS)
        .union(Features::RSS)
        .union(Features::NOTF_COAL)
        .union(Features::VQ_NOTF_COAL);

    /// Receive offloads a driver may switch with GUEST_OFFLOADS_SET.
    pub const GUEST_OFFLOADS: Features = Features::GUEST_CSUM
        .union(Features::GUEST_TSO4)
        .union(Features::GUEST_TSO6)
        .union(Features::GUEST_ECN)
        .union(Features::GUEST_UFO)
        .union(Features::GUEST_USO4)
        .union(Features::GUEST_USO6);

    /// Size of the per-packet header these features call for.
    pub fn hdr_len(self) -> usize {
        if self.contains(Features::HASH_REPORT) {
            super::hdr::HDR_LEN_HASH
        } else {
            super::hdr::HDR_LEN
        }
    }

    /// Checks the dependencies of 5.1.3.1 that a driver must respect.
    pub fn check_dependencies(self) -> Result<(), &'static str> {
        let deps: &[(Features, Features, &str)] = &[
            (
                Features::GUEST_TSO4,
                Features::GUEST_CSUM,
                "GUEST_TSO4 needs GUEST_CSUM",
            ),
            (
                Features::GUEST_TSO6,
                Features::GUEST_CSUM,
                "GUEST_TSO6 needs GUEST_CSUM",
            ),
            (
                Features::GUEST_UFO,
                Features::GUEST_CSUM,
                "GUEST_UFO needs GUEST_CSUM",
            ),
            (
                Features::GUEST_USO4,
                Features::GUEST_CSUM,
                "GUEST_USO4 needs GUEST_CSUM",
            ),
            (
                Features::GUEST_USO6,
                Features::GUEST_CSUM,
                "GUEST_USO6 needs GUEST_CSUM",
            ),
            (Features::HOST_TSO4, Features::CSUM, "HOST_TSO4 needs CSUM"),
            (Features::HOST_TSO6, Features::CSUM, "HOST_TSO6 needs CSUM"),
            (Features::HOST_UFO, Features::CSUM, "HOST_UFO needs CSUM"),
            (Features::HOST_USO, Features::CSUM, "HOST_USO needs CSUM"),
            (
                Features::CTRL_RX,
                Features::CTRL_VQ,
                "CTRL_RX needs CTRL_VQ",
            ),
            (
                Features::CTRL_VLAN,
                Features::CTRL_VQ,
                "CTRL_VLAN needs CTRL_VQ",
            ),
            (
                Features::GUEST_ANNOUNCE,
                Features::CTRL_VQ,
                "GUEST_ANNOUNCE needs CTRL_VQ",
            ),
            (Features::MQ, Features::CTRL_VQ, "MQ needs CTRL_VQ"),
            (
                Features::CTRL_MAC_ADDR,
                Features::CTRL_VQ,
                "CTRL_MAC_ADDR needs CTRL_VQ",
            ),
            (
                Features::NOTF_COAL,
                Features::CTRL_VQ,
                "NOTF_COAL needs CTRL_VQ",
            ),
            (
                Features::VQ_NOTF_COAL,
                Features::CTRL_VQ,
                "VQ_NOTF_COAL needs CTRL_VQ",
            ),
            (Features::RSS, Features::CTRL_VQ, "RSS needs CTRL_VQ"),
            (
                Features::RSC_EXT,
                Features::HOST_TSO4,
                "RSC_EXT needs HOST_TSO4 or HOST_TSO6",
            ),
        ];
        for &(f, needs, why) in deps {
            if self.contains(f) && !self.contains(needs) {
                if f == Features::RSC_EXT && self.contains(Features::HOST_TSO6) {
                    continue;
                }
                return Err(why);
            }
        }
        if self.intersects(Features::GUEST_ECN)
            && !self.intersects(Features::GUEST_TSO4 | Features::GUEST_TSO6)
        {
            return Err("GUEST_ECN needs GUEST_TSO4 or GUEST_TSO6");
        }
        if self.contains(Features::HOST_ECN)
            && !self.intersects(Features::HOST_TSO4 | Features::HOST_TSO6)
        {
            return Err("HOST_ECN needs HOST_TSO4 or HOST_TSO6");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_numbers_match_the_spec() {
        let named = [
            (Features::CSUM, 0),
            (Features::GUEST_CSUM, 1),
            (Features::CTRL_GUEST_OFFLOADS, 2),
            (Features::MTU, 3),
            (Features::MAC, 5),
            (Features::GUEST_TSO4, 7),
            (Features::GUEST_TSO6, 8),
            (Features::GUEST_ECN, 9),
            (Features::GUEST_UFO, 10),
            (Features::HOST_TSO4, 11),
            (Features::HOST_TSO6, 12),
            (Features::HOST_ECN, 13),
            (Features::HOST_UFO, 14),
            (Features::MRG_RXBUF, 15),
            (Features::STATUS, 16),
            (Features::CTRL_VQ, 17),
            (Features::CTRL_RX, 18),
            (Features::CTRL_VLAN, 19),
            (Features::CTRL_RX_EXTRA, 20),
            (Features::GUEST_ANNOUNCE, 21),
            (Features::MQ, 22),
            (Features::CTRL_MAC_ADDR, 23),
            (Features::INDIRECT_DESC, 28),
            (Features::EVENT_IDX, 29),
            (Features::VERSION_1, 32),
            (Features::ACCESS_PLATFORM, 33),
            (Features::RING_PACKED, 34),
            (Features::IN_ORDER, 35),
            (Features::SR_IOV, 37),
            (Features::RING_RESET, 40),
            (Features::DEVICE_STATS, 50),
            (Features::HASH_TUNNEL, 51),
            (Features::VQ_NOTF_COAL, 52),
            (Features::NOTF_COAL, 53),
            (Features::GUEST_USO4, 54),
            (Features::GUEST_USO6, 55),
            (Features::HOST_USO, 56),
            (Features::HASH_REPORT, 57),
            (Features::GUEST_HDRLEN, 59),
            (Features::RSS, 60),
            (Features::RSC_EXT, 61),
            (Features::STANDBY, 62),
            (Features::SPEED_DUPLEX, 63),
        ];
        for (f, bit) in named {
            assert_eq!(f.bits(), 1u64 << bit, "{f:?}");
        }
    }

    #[test]
    fn dependencies() {
        assert!((Features::GUEST_TSO4).check_dependencies().is_err());
        assert!((Features::GUEST_TSO4 | Features::GUEST_CSUM)
            .check_dependencies()
            .is_ok());
        assert!(Features::MQ.check_dependencies().is_err());
        assert!((Features::RSC_EXT | Features::HOST_TSO6 | Features::CSUM)
            .check_dependencies()
            .is_ok());
        assert_eq!(Features::HASH_REPORT.hdr_len(), 20);
        assert_eq!(Features::MRG_RXBUF.hdr_len(), 12);
    }
}
