//! The control-queue commands applied to the device: receive filters, MAC
//! and VLAN tables, announce, queue pairs, RSS and hash configuration,
//! receive offloads and notification coalescing. Each answers OK or ERR
//! (virtio 1.3, 5.1.6.5), with the reason logged.

use vnic_protocol::{
    rss::{HashTypes, IndirectionTable, Rss, MIN_KEY_LEN},
    virtio::{
        ctrl::{Coal, CtrlCommand, RxMode},
        Features,
    },
    wire::ethernet::Address,
};

use std::sync::Arc;

use super::Nic;

/// Largest RSS key the device takes (config space rss_max_key_size).
pub const RSS_MAX_KEY: u8 = 40;
/// Largest indirection table (config space).
pub const RSS_MAX_TABLE: u16 = 128;
/// Hash types the device computes (config space supported_hash_types).
pub const SUPPORTED_HASH_TYPES: HashTypes = HashTypes::all();

/// Receive filter state set by the RX, MAC and VLAN classes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RxFilter {
    pub promisc: bool,
    pub allmulti: bool,
    pub alluni: bool,
    pub nomulti: bool,
    pub nouni: bool,
    pub nobcast: bool,
    pub unicast: Vec<Address>,
    pub multicast: Vec<Address>,
    /// The driver has configured filtering (sent an RX or MAC command);
    /// until then the device accepts every frame, as a device without
    /// CTRL_RX does.
    pub active: bool,
    /// VLAN ids accepted when VLAN filtering is on (CTRL_VLAN).
    pub vlans: Option<Box<[u64; 64]>>,
}

impl RxFilter {
    /// Whether a frame to `dst` (tagged with `vid`) passes for a device
    /// whose own address is `mac`.
    pub fn accepts(&self, mac: Address, dst: Address, vid: Option<u16>) -> bool {
        if let (Some(v), Some(bits)) = (vid, &self.vlans) {
            let v = usize::from(v & 0xfff);
            if bits[v / 64] & (1 << (v % 64)) == 0 {
                return false;
            }
        }
        if !self.active || self.promisc {
            return true;
        }
        if dst.is_broadcast() {
            return !self.nobcast;
        }
        if dst.is_multicast() {
            return !self.nomulti && (self.allmulti || self.multicast.contains(&dst));
        }
        !self.nouni && (self.alluni || dst == mac || self.unicast.contains(&dst))
    }
}

/// Per-virtqueue coalescing parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoalState {
    /// Indexed by virtqueue (2i RX, 2i+1 TX).
    pub vq: Vec<Coal>,
}

/// State the control queue changes.
#[derive(Debug, Clone)]
pub struct CtrlState {
    pub mac: Address,
    pub filter: RxFilter,
    pub active_pairs: u16,
    pub coal: CoalState,
    /// STATUS_ANNOUNCE is set until the driver acknowledges it.
    pub announce: bool,
    /// Receive offloads currently enabled (GUEST_OFFLOADS_SET).
    pub guest_offloads: Features,
    /// The RSS configuration in force.
    pub rss: Arc<Rss>,
}

impl CtrlState {
    pub fn new(mac: Address, pairs: u16, rss: Rss) -> CtrlState {
        CtrlState {
            mac,
            filter: RxFilter::default(),
            active_pairs: pairs,
            coal: CoalState {
                vq: vec![Coal::default(); 2 * usize::from(pairs)],
            },
            announce: false,
            guest_offloads: Features::empty(),
            rss: Arc::new(rss),
        }
    }
}

/// Why a command was answered ERR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

fn refuse<T>(why: impl Into<String>) -> Result<T, Refused> {
    Err(Refused(why.into()))
}

impl Nic {
    /// Applies one control command of port `p`'s driver; returns the
    /// device-writable answer (empty but for VQ_GET). The switch sees the
    /// change from its next batch on.
    pub fn control(
        &self,
        p: usize,
        cmd: &CtrlCommand,
        acked: Features,
    ) -> Result<Vec<u8>, Refused> {
        let r = self.control_inner(p, cmd, acked);
        self.publish(p);
        r
    }

    fn control_inner(
        &self,
        p: usize,
        cmd: &CtrlCommand,
        acked: Features,
    ) -> Result<Vec<u8>, Refused> {
        let port = self
            .ports
            .get(p)
            .ok_or_else(|| Refused(format!("no port {p}")))?;
        let pairs = port.config.pairs;
        let trusted = port.settings().trust;
        let mut st = port.ctrl_state();
        let needs = |f: Features| {
            if acked.contains(f) {
                Ok(())
            } else {
                refuse(format!("{f:?} was not negotiated"))
            }
        };
        match cmd {
            CtrlCommand::Rx { mode, on } => {
                needs(Features::CTRL_RX)?;
                let extra = matches!(
                    mode,
                    RxMode::AllUni | RxMode::NoMulti | RxMode::NoUni | RxMode::NoBcast
                );
                if extra {
                    needs(Features::CTRL_RX_EXTRA)?;
                }
                if *on
                    && !trusted
                    && matches!(mode, RxMode::Promisc | RxMode::AllMulti | RxMode::AllUni)
                {
                    return refuse(format!("{mode:?} on an untrusted VF"));
                }
                let f = &mut st.filter;
                *match mode {
                    RxMode::Promisc => &mut f.promisc,
                    RxMode::AllMulti => &mut f.allmulti,
                    RxMode::AllUni => &mut f.alluni,
                    RxMode::NoMulti => &mut f.nomulti,
                    RxMode::NoUni => &mut f.nouni,
                    RxMode::NoBcast => &mut f.nobcast,
                } = *on;
                f.active = true;
            }
            CtrlCommand::MacTableSet { unicast, multicast } => {
                needs(Features::CTRL_RX)?;
                if unicast.len() + multicast.len() > 256 {
                    return refuse("more than 256 MAC filter entries");
                }
                if unicast.iter().any(Address::is_multicast)
                    || multicast.iter().any(Address::is_unicast)
                {
                    return refuse("address in the wrong MAC table");
                }
                st.filter.unicast.clone_from(unicast);
                st.filter.multicast.clone_from(multicast);
                st.filter.active = true;
            }
            CtrlCommand::MacAddrSet(a) => {
                needs(Features::CTRL_MAC_ADDR)?;
                if a.is_multicast() || a.0 == [0; 6] {
                    return refuse(format!("{a} cannot be a NIC's address"));
                }
                if !trusted && *a != st.mac {
                    return refuse(format!("an untrusted VF cannot change its MAC to {a}"));
                }
                st.mac = *a;
            }
            CtrlCommand::VlanAdd(v) | CtrlCommand::VlanDel(v) => {
                needs(Features::CTRL_VLAN)?;
                let bits = st.filter.vlans.get_or_insert_with(|| Box::new([0; 64]));
                let (w, b) = (usize::from(*v) / 64, 1u64 << (v % 64));
                if matches!(cmd, CtrlCommand::VlanAdd(_)) {
                    bits[w] |= b;
                } else {
                    bits[w] &= !b;
                }
            }
            CtrlCommand::AnnounceAck => {
                needs(Features::GUEST_ANNOUNCE)?;
                st.announce = false;
            }
            CtrlCommand::VqPairsSet(n) => {
                needs(Features::MQ)?;
                if *n > pairs {
                    return refuse(format!("{n} queue pairs, the device has {pairs}"));
                }
                st.active_pairs = *n;
                port.limit_rx_queues(*n);
                if !acked.contains(Features::RSS) {
                    let table =
                        IndirectionTable::spread(128, *n).map_err(|e| Refused(e.to_string()))?;
                    let new = Rss::new(st.rss.key(), st.rss.types, table, 0)
                        .map_err(|e| Refused(e.to_string()))?;
                    st.rss = Arc::new(new);
                }
            }
            CtrlCommand::RssConfig(c) => {
                needs(Features::RSS)?;
                let types = HashTypes::from_bits(c.hash_types)
                    .filter(|t| SUPPORTED_HASH_TYPES.contains(*t))
                    .ok_or_else(|| Refused(format!("hash types {:#x}", c.hash_types)))?;
                if c.key.len() != usize::from(RSS_MAX_KEY) && c.key.len() < MIN_KEY_LEN {
                    return refuse(format!("key of {} bytes", c.key.len()));
                }
                if c.key.len() > usize::from(RSS_MAX_KEY) {
                    return refuse(format!("key of {} bytes, most {RSS_MAX_KEY}", c.key.len()));
                }
                if c.indirection_table.len() > usize::from(RSS_MAX_TABLE) {
                    return refuse("indirection table longer than the device's");
                }
                if c.unclassified_queue >= pairs {
                    return refuse(format!("unclassified queue {}", c.unclassified_queue));
                }
                if c.max_tx_vq == 0 || c.max_tx_vq > pairs {
                    return refuse(format!("max_tx_vq {}", c.max_tx_vq));
                }
                let table = IndirectionTable::new(c.indirection_table.clone(), pairs)
                    .map_err(|e| Refused(e.to_string()))?;
                let rss = Rss::new(&c.key, types, table, c.unclassified_queue)
                    .map_err(|e| Refused(e.to_string()))?;
                st.rss = Arc::new(rss);
                st.active_pairs = c.max_tx_vq;
                port.limit_rx_queues(c.max_tx_vq);
            }
            CtrlCommand::HashConfig(c) => {
                needs(Features::HASH_REPORT)?;
                let types = HashTypes::from_bits(c.hash_types)
                    .ok_or_else(|| Refused(format!("hash types {:#x}", c.hash_types)))?;
                if c.key.len() < MIN_KEY_LEN || c.key.len() > usize::from(RSS_MAX_KEY) {
                    return refuse(format!("key of {} bytes", c.key.len()));
                }
                let cur = st.rss.clone();
                let rss = Rss::new(&c.key, types, cur.table.clone(), cur.unclassified_queue)
                    .map_err(|e| Refused(e.to_string()))?;
                st.rss = Arc::new(rss);
            }
            CtrlCommand::GuestOffloadsSet(bits) => {
                needs(Features::CTRL_GUEST_OFFLOADS)?;
                let want = Features::from_bits_retain(*bits);
                if !(Features::GUEST_OFFLOADS & acked).contains(want) {
                    return refuse(format!("offloads {bits:#x} beyond those negotiated"));
                }
                self.set_rx_features(p, want | (acked - Features::GUEST_OFFLOADS))
                    .map_err(|e| Refused(e.to_string()))?;
                st.guest_offloads = want;
            }
            CtrlCommand::CoalTxSet(c) | CtrlCommand::CoalRxSet(c) => {
                needs(Features::NOTF_COAL)?;
                let first = usize::from(matches!(cmd, CtrlCommand::CoalTxSet(_)));
                for i in (first..st.coal.vq.len()).step_by(2) {
                    st.coal.vq[i] = *c;
                }
            }
            CtrlCommand::CoalVqSet { vq_index, coal } => {
                needs(Features::VQ_NOTF_COAL)?;
                let i = usize::from(*vq_index);
                if i >= 2 * usize::from(st.active_pairs) {
                    return refuse(format!("virtqueue {i} is not enabled"));
                }
                st.coal.vq[i] = *coal;
            }
            CtrlCommand::CoalVqGet { vq_index } => {
                needs(Features::VQ_NOTF_COAL)?;
                let i = usize::from(*vq_index);
                if i >= 2 * usize::from(st.active_pairs) {
                    return refuse(format!("virtqueue {i} is not enabled"));
                }
                return Ok(st.coal.vq[i].to_bytes().to_vec());
            }
        }
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use vnic_protocol::virtio::ctrl::RssConfig;

    use super::*;
    use crate::nic::tests::{config, FakeUplink};

    fn all() -> Features {
        crate::vhost::offered_features()
    }

    #[test]
    fn filters() {
        let dev = Nic::single(config(2), Box::new(FakeUplink::default())).unwrap();
        let me = dev.pf().config.mac;
        let other = Address([2, 0, 0, 0, 0, 9]);
        let mc = Address([1, 0, 0x5e, 0, 0, 1]);
        let frame = |dst: Address| {
            let mut f = vec![0u8; 60];
            f[..6].copy_from_slice(&dst.0);
            f[12] = 0x08;
            f
        };
        assert!(
            dev.rx_accepts(0, &frame(other)),
            "no filtering before the driver asks"
        );
        dev.control(
            0,
            &CtrlCommand::MacTableSet {
                unicast: vec![],
                multicast: vec![mc],
            },
            all(),
        )
        .unwrap();
        assert!(dev.rx_accepts(0, &frame(me)));
        assert!(!dev.rx_accepts(0, &frame(other)));
        assert!(dev.rx_accepts(0, &frame(mc)));
        assert!(!dev.rx_accepts(0, &frame(Address([1, 0, 0x5e, 0, 0, 2]))));
        assert!(dev.rx_accepts(0, &frame(Address::BROADCAST)));
        dev.control(
            0,
            &CtrlCommand::Rx {
                mode: RxMode::Promisc,
                on: true,
            },
            all(),
        )
        .unwrap();
        assert!(dev.rx_accepts(0, &frame(other)));
        // VLAN filtering: only added ids pass.
        dev.control(0, &CtrlCommand::VlanAdd(100), all()).unwrap();
        let mut tagged = frame(me);
        tagged.splice(12..12, [0x81, 0, 0, 100]);
        assert!(dev.rx_accepts(0, &tagged));
        tagged[15] = 101;
        assert!(!dev.rx_accepts(0, &tagged));
    }

    #[test]
    fn err_for_invalid_values_and_unnegotiated_features() {
        let dev = Nic::single(config(2), Box::new(FakeUplink::default())).unwrap();
        assert!(dev.control(0, &CtrlCommand::VqPairsSet(3), all()).is_err());
        assert!(dev.control(0, &CtrlCommand::VqPairsSet(1), all()).is_ok());
        assert!(dev
            .control(0, &CtrlCommand::VqPairsSet(1), Features::empty())
            .is_err());
        assert!(dev
            .control(
                0,
                &CtrlCommand::MacAddrSet(Address([1, 2, 3, 4, 5, 6])),
                all()
            )
            .is_err());
        // VQ_SET on a disabled queue (pairs now 1: vq 2 is off).
        let c = Coal {
            max_packets: 8,
            max_usecs: 20,
        };
        assert!(dev
            .control(
                0,
                &CtrlCommand::CoalVqSet {
                    vq_index: 2,
                    coal: c
                },
                all()
            )
            .is_err());
        dev.control(
            0,
            &CtrlCommand::CoalVqSet {
                vq_index: 1,
                coal: c,
            },
            all(),
        )
        .unwrap();
        assert_eq!(
            dev.control(0, &CtrlCommand::CoalVqGet { vq_index: 1 }, all())
                .unwrap(),
            c.to_bytes()
        );
        // The last command that set a queue wins.
        dev.control(0, &CtrlCommand::CoalTxSet(Coal::default()), all())
            .unwrap();
        assert_eq!(
            dev.control(0, &CtrlCommand::CoalVqGet { vq_index: 1 }, all())
                .unwrap(),
            Coal::default().to_bytes()
        );
        let rss = |table: Vec<u16>, key: usize| {
            CtrlCommand::RssConfig(RssConfig {
                hash_types: HashTypes::LINUX_DEFAULT.bits(),
                indirection_table: table,
                unclassified_queue: 0,
                max_tx_vq: 2,
                key: vec![7; key],
            })
        };
        assert!(dev.control(0, &rss(vec![0, 1, 1, 0], 40), all()).is_ok());
        assert!(
            dev.control(0, &rss(vec![0, 2], 40), all()).is_err(),
            "queue 2 of 2"
        );
        assert!(
            dev.control(0, &rss(vec![0; 256], 40), all()).is_err(),
            "table too long"
        );
        assert!(
            dev.control(0, &rss(vec![0, 1], 52), all()).is_err(),
            "key too long"
        );
        assert!(
            dev.control(0, &rss(vec![0, 1], 20), all()).is_err(),
            "key too short"
        );
    }
}
