//! The control-queue commands applied to the device: receive filters, MAC
//! and VLAN tables, announce, queue pairs, RSS and hash configuration,
//! receive offloads and notification coalescing. Each answers OK or ERR
//! (virtio 1.3, 5.1.6.5), with the reason logged.

use vnic_protocol::{
    rss::{HashTypes, IndirectionTable, Rss, MIN_KEY_LEN},
    virtio::{
        ctrl::{CtrlCommand, RxMode},
        Features,
    },
    wire::ethernet::Address,
};

use std::sync::Arc;

use super::{
    coalesce::{CoalConfig, DirCoal, QueueCoal},
    DeviceConfig, Nic,
};

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

/// State the control queue changes.
#[derive(Debug, Clone)]
pub struct CtrlState {
    pub mac: Address,
    pub filter: RxFilter,
    pub active_pairs: u16,
    /// What TX_SET and RX_SET (or the administrator) last gave: each
    /// queue's own parameters are in the port's coalescers.
    pub coal: CoalConfig,
    /// STATUS_ANNOUNCE is set until the driver acknowledges it.
    pub announce: bool,
    /// Receive offloads currently enabled (GUEST_OFFLOADS_SET).
    pub guest_offloads: Features,
    /// The RSS configuration in force.
    pub rss: Arc<Rss>,
}

impl CtrlState {
    pub fn new(mac: Address, config: &DeviceConfig, rss: Rss) -> CtrlState {
        CtrlState {
            mac,
            filter: RxFilter::default(),
            active_pairs: config.pairs,
            coal: config.coalesce,
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
                // A queue turned off takes TX_SET/RX_SET's values when it
                // comes back (virtio 1.3, 5.1.6.5.6.2).
                port.restore_coalescing(2 * usize::from(*n), &st.coal);
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
                port.restore_coalescing(2 * usize::from(c.max_tx_vq), &st.coal);
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
                // The driver's values win over the administrator's, and
                // over adaptive mode.
                let d = DirCoal {
                    coal: *c,
                    adaptive: false,
                };
                let tx = matches!(cmd, CtrlCommand::CoalTxSet(_));
                if tx {
                    st.coal.tx = d;
                } else {
                    st.coal.rx = d;
                }
                let enabled = 2 * usize::from(st.active_pairs);
                for vq in (usize::from(tx)..enabled).step_by(2) {
                    if let Some(mut q) = port.coalescer(vq) {
                        q.configure(d);
                    }
                }
            }
            CtrlCommand::CoalVqSet { vq_index, coal } => {
                needs(Features::VQ_NOTF_COAL)?;
                let vq = usize::from(*vq_index);
                if vq >= 2 * usize::from(st.active_pairs) {
                    return refuse(format!("virtqueue {vq} is not enabled"));
                }
                let mut q = port
                    .coalescer(vq)
                    .ok_or_else(|| Refused(format!("no virtqueue {vq}")))?;
                q.configure(DirCoal {
                    coal: *coal,
                    adaptive: false,
                });
            }
            CtrlCommand::CoalVqGet { vq_index } => {
                needs(Features::VQ_NOTF_COAL)?;
                let vq = usize::from(*vq_index);
                if vq >= 2 * usize::from(st.active_pairs) {
                    return refuse(format!("virtqueue {vq} is not enabled"));
                }
                let q = port
                    .coalescer(vq)
                    .ok_or_else(|| Refused(format!("no virtqueue {vq}")))?;
                return Ok(q.set.to_bytes().to_vec());
            }
        }
        Ok(Vec::new())
    }
}

/// A queue pair's coalescing as `vnicd ctl coalesce show` reports it.
#[derive(Debug, Clone)]
pub struct PairCoal {
    pub rx: QueueCoal,
    pub tx: QueueCoal,
}

impl Nic {
    /// Sets port `p`'s notification coalescing from `ethtool -C`'s keys
    /// (`rx-usecs`, `rx-frames`, `tx-usecs`, `tx-frames`, `adaptive-rx`,
    /// `adaptive-tx`): for queue pair `pair` alone, or for every queue and
    /// as the values a queue takes when it is enabled again. All or
    /// nothing: a bad key or value changes nothing. The driver may set its
    /// own later (NOTF_COAL), and the last setting wins.
    pub fn set_coalescing(
        &self,
        p: usize,
        pair: Option<usize>,
        settings: &[(&str, &str)],
    ) -> Result<(), String> {
        let port = self.ports.get(p).ok_or_else(|| format!("no port {p}"))?;
        let pairs = usize::from(port.config.pairs);
        if let Some(q) = pair.filter(|&q| q >= pairs) {
            return Err(format!("queue {q}: the port has {pairs} queue pairs"));
        }
        {
            let mut st = port.ctrl_state();
            let current = match pair {
                None => st.coal,
                Some(q) => {
                    let get = |vq: usize| {
                        port.coalescer(vq).map_or(DirCoal::default(), |c| DirCoal {
                            coal: c.set,
                            adaptive: c.adaptive,
                        })
                    };
                    CoalConfig {
                        rx: get(2 * q),
                        tx: get(2 * q + 1),
                    }
                }
            };
            let new = settings.iter().try_fold(current, |mut c, (k, v)| {
                c.set(k, v)?;
                Ok::<_, String>(c)
            })?;
            let queues = match pair {
                None => {
                    st.coal = new;
                    0..2 * pairs
                }
                Some(q) => 2 * q..2 * q + 2,
            };
            for vq in queues {
                if let Some(mut c) = port.coalescer(vq) {
                    c.configure(new.for_vq(vq));
                }
            }
        }
        // Held notifications may be due under the new values.
        if let Some(rx) = port.rx_path().and_then(|h| h.0.upgrade()) {
            rx.coalescing_changed();
        }
        Ok(())
    }

    /// Port `p`'s coalescing: the values a re-enabled queue takes, and each
    /// queue pair's.
    pub fn coalescing(&self, p: usize) -> Option<(CoalConfig, Vec<PairCoal>)> {
        let port = self.ports.get(p)?;
        let config = port.ctrl_state().coal;
        let pairs = (0..usize::from(port.config.pairs))
            .map(|q| {
                let get = |vq| port.coalescer(vq).map(|c| c.clone()).unwrap_or_default();
                PairCoal {
                    rx: get(2 * q),
                    tx: get(2 * q + 1),
                }
            })
            .collect();
        Some((config, pairs))
    }
}

#[cfg(test)]
mod tests {
    use vnic_protocol::virtio::ctrl::{Coal, RssConfig};

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

    fn vq_get(dev: &Nic, vq: u16) -> Result<Coal, Refused> {
        dev.control(0, &CtrlCommand::CoalVqGet { vq_index: vq }, all())
            .map(|b| Coal::from_bytes(&b).unwrap())
    }

    fn c(max_packets: u32, max_usecs: u32) -> Coal {
        Coal {
            max_packets,
            max_usecs,
        }
    }

    /// virtio 1.3, 5.1.6.5.6: TX_SET and RX_SET set every queue of their
    /// direction, VQ_SET one; the last wins; a queue turned off and on
    /// again takes TX_SET/RX_SET's values; reset clears all; VQ_SET and
    /// VQ_GET on a queue that is off are ERR.
    #[test]
    fn notification_coalescing_commands_follow_the_spec() {
        let dev = Nic::single(config(4), Box::new(FakeUplink::default())).unwrap();
        let set = |cmd: CtrlCommand| dev.control(0, &cmd, all()).map(|_| ());
        set(CtrlCommand::CoalRxSet(c(32, 100))).unwrap();
        set(CtrlCommand::CoalTxSet(c(16, 50))).unwrap();
        for q in 0..4 {
            assert_eq!(vq_get(&dev, 2 * q).unwrap(), c(32, 100));
            assert_eq!(vq_get(&dev, 2 * q + 1).unwrap(), c(16, 50));
        }
        set(CtrlCommand::CoalVqSet {
            vq_index: 2,
            coal: c(1, 5),
        })
        .unwrap();
        assert_eq!(vq_get(&dev, 2).unwrap(), c(1, 5));
        assert_eq!(vq_get(&dev, 0).unwrap(), c(32, 100));
        // RX_SET after VQ_SET: the last command wins.
        set(CtrlCommand::CoalRxSet(c(8, 10))).unwrap();
        assert_eq!(vq_get(&dev, 2).unwrap(), c(8, 10));
        set(CtrlCommand::CoalVqSet {
            vq_index: 7,
            coal: c(3, 3),
        })
        .unwrap();
        // Two pairs: queues 4 to 7 are off, and refuse VQ_SET and VQ_GET.
        set(CtrlCommand::VqPairsSet(2)).unwrap();
        assert!(vq_get(&dev, 7).is_err());
        assert!(vq_get(&dev, 4).is_err());
        assert!(set(CtrlCommand::CoalVqSet {
            vq_index: 5,
            coal: c(2, 2)
        })
        .is_err());
        assert_eq!(vq_get(&dev, 3).unwrap(), c(16, 50));
        // Back on: the last TX_SET/RX_SET values, not VQ_SET's.
        set(CtrlCommand::VqPairsSet(4)).unwrap();
        assert_eq!(vq_get(&dev, 7).unwrap(), c(16, 50));
        assert_eq!(vq_get(&dev, 6).unwrap(), c(8, 10));
        // Without NOTF_COAL negotiated the class is refused.
        assert!(dev
            .control(
                0,
                &CtrlCommand::CoalRxSet(c(1, 1)),
                all() - Features::NOTF_COAL - Features::VQ_NOTF_COAL
            )
            .is_err());
        // Reset clears all.
        dev.reset(0).unwrap();
        for vq in 0..8 {
            assert_eq!(vq_get(&dev, vq).unwrap(), Coal::default());
        }
    }

    /// The administrator's values (`--coalesce`, `vnicd ctl coalesce`)
    /// are what a reset returns to; a bad key changes nothing; the
    /// driver's command turns adaptive mode off for its queues.
    #[test]
    fn administrator_coalescing_is_all_or_nothing_and_survives_reset() {
        let mut cfg = config(2);
        cfg.coalesce = CoalConfig::default()
            .parse_over("rx-usecs=200,rx-frames=64,adaptive-tx=on")
            .unwrap();
        let dev = Nic::single(cfg, Box::new(FakeUplink::default())).unwrap();
        assert_eq!(vq_get(&dev, 2).unwrap(), c(64, 200));
        assert!(dev.pf().coalescer(3).unwrap().adaptive);
        assert!(dev
            .set_coalescing(0, None, &[("rx-usecs", "5"), ("rx-frames", "x")])
            .is_err());
        assert!(dev
            .set_coalescing(0, Some(2), &[("rx-usecs", "5")])
            .is_err());
        assert_eq!(vq_get(&dev, 0).unwrap(), c(64, 200));
        dev.set_coalescing(0, Some(1), &[("rx-usecs", "5"), ("adaptive-rx", "on")])
            .unwrap();
        assert_eq!(vq_get(&dev, 2).unwrap(), c(64, 5));
        assert!(dev.pf().coalescer(2).unwrap().adaptive);
        assert_eq!(vq_get(&dev, 0).unwrap(), c(64, 200));
        dev.control(0, &CtrlCommand::CoalTxSet(c(4, 4)), all())
            .unwrap();
        assert!(!dev.pf().coalescer(3).unwrap().adaptive);
        dev.reset(0).unwrap();
        assert_eq!(vq_get(&dev, 2).unwrap(), c(64, 200));
        assert_eq!(vq_get(&dev, 1).unwrap(), Coal::default());
        assert!(dev.pf().coalescer(3).unwrap().adaptive);
    }
}
