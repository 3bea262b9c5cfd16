//! The embedded switch: which ports (PF, VFs) and whether the uplink get
//! a frame, by destination MAC and VLAN, and the VLAN tag each receiver
//! sees it with.
//!
//! Everything a frame's path reads (MACs, filters, RSS, VLANs, link state,
//! offloads) is in a [`View`], an immutable snapshot that a control
//! command, a setting or a driver's feature change replaces as a whole.
//! Workers keep an `Arc<View>` and check one generation counter per batch
//! ([`Switch::refresh`]); no frame takes a device-wide lock.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc, PoisonError, RwLock,
};

use vnic_protocol::{
    rss::{HashReport, Rss, Steering},
    wire::{
        ethernet::{self, Address},
        parse_frame_prefix,
    },
};

use super::{
    ctrl::RxFilter,
    vf::{LinkState, VfSettings},
};
use crate::uplink::Offloads;

/// A steering with no hash to report, to queue 0: for a frame whose
/// queue and hash do not matter (or could not be computed).
pub const NO_HASH: Steering = Steering {
    queue: 0,
    hash: 0,
    report: HashReport::None,
};

/// Ports a frame goes to: bit i is port i (0 the PF, 1 + n VF n).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PortSet(pub u128);

impl PortSet {
    pub fn with(self, p: usize) -> PortSet {
        PortSet(self.0 | (1u128 << p))
    }
    pub fn contains(self, p: usize) -> bool {
        p < 128 && self.0 & (1u128 << p) != 0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn iter(self) -> impl Iterator<Item = usize> {
        let mut bits = self.0;
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            Some(i)
        })
    }
}

/// Most MAC addresses learned per port (from source addresses of a port
/// without spoof checking).
pub const MAX_LEARNED: usize = 16;

/// What the frame path needs to know of one port.
#[derive(Debug, Clone)]
pub struct PortView {
    /// The address the port answers to (its settings' MAC, or the one its
    /// driver set through the control queue).
    pub mac: Address,
    pub filter: RxFilter,
    pub rss: Arc<Rss>,
    pub settings: VfSettings,
    /// Receive offloads the port's driver accepted.
    pub caps: Offloads,
    /// A frontend is connected.
    pub attached: bool,
    /// Source addresses seen from this port besides `mac`.
    pub learned: Vec<Address>,
    /// Whether the port is a VF (the PF keeps today's single-port rules:
    /// no filter configured means every frame is taken).
    pub is_vf: bool,
    /// Where the switch writes the port's frames directly, if anywhere.
    pub rx: Option<super::RxHandle>,
    /// The driver wants the RSS hash reported.
    pub hash_report: bool,
}

impl PortView {
    /// Whether the link is up: `state` and, for auto, the uplink.
    pub fn link_up(&self, uplink_up: bool) -> bool {
        match self.settings.state {
            LinkState::Auto => uplink_up,
            LinkState::Enable => true,
            LinkState::Disable => false,
        }
    }

    /// Whether `dst` is the port's own address or one the switch learned
    /// from its frames. (Its driver's unicast filter entries are only a
    /// receive filter: a port cannot claim another's address with them.)
    fn owns(&self, dst: Address) -> bool {
        dst == self.mac || self.learned.contains(&dst)
    }

    /// Whether the port's receive filter takes a frame to `dst`. Before
    /// its driver sets a filter, the PF takes every frame (as the
    /// single-port device always did) and a VF takes its own addresses,
    /// broadcast and multicast, as a NIC does.
    pub fn takes(&self, dst: Address) -> bool {
        let f = &self.filter;
        if f.active {
            return f.accepts(self.mac, dst, None) || (!f.nouni && self.learned.contains(&dst));
        }
        !self.is_vf || dst.is_multicast() || self.owns(dst)
    }

    /// How the port sees a frame of VLAN `vid` (0 untagged): None when it
    /// is not in that VLAN, else whether it gets the frame tagged.
    pub fn egress(&self, vid: u16) -> Option<bool> {
        match self.settings.vlan {
            Some(pv) => (pv.vid == vid).then_some(false),
            None if vid == 0 => Some(false),
            // A tagged frame: the PF is a trunk; a VF takes the VLANs its
            // driver added to its filter (CTRL_VLAN), as SR-IOV NICs have
            // VFs ask for each VLAN.
            None => match &self.filter.vlans {
                Some(bits) => {
                    let v = usize::from(vid & 0xfff);
                    (bits[v / 64] & (1 << (v % 64)) != 0).then_some(true)
                }
                None => (!self.is_vf).then_some(true),
            },
        }
    }

    /// [`PortView::egress`] for a frame whose outer tag has TPID `tpid`:
    /// a port VLAN matches its own protocol only.
    pub fn egress_tpid(&self, vid: u16, tpid: Option<u16>) -> Option<bool> {
        match (self.settings.vlan, tpid) {
            (Some(pv), Some(t)) if t != pv.proto => None,
            _ => self.egress(vid),
        }
    }

    /// Whether the port takes every frame that parses, whatever its
    /// addresses and tag: the PF, with no port VLAN, before its driver
    /// set a receive or VLAN filter.
    pub fn takes_all(&self) -> bool {
        !self.is_vf
            && self.settings.vlan.is_none()
            && !self.filter.active
            && self.filter.vlans.is_none()
    }

    /// The one queue RSS puts every frame on, hashed or not, when the
    /// driver does not want the hash either: then no frame needs to be
    /// parsed or hashed to be steered.
    pub fn steers_blind(&self) -> Option<u16> {
        if self.hash_report {
            return None;
        }
        self.rss
            .table
            .single()
            .filter(|&q| q == self.rss.unclassified_queue)
    }

    /// Whether the port takes a frame with layer-2 header `l2` (its VLAN
    /// and its receive filter).
    pub fn accepts(&self, l2: &L2) -> bool {
        self.egress(l2.vid()).is_some() && self.takes(l2.dst)
    }

    /// Where RSS sends a frame whose first bytes are `prefix`. When every
    /// frame, hashed or not, goes to one queue and the driver does not
    /// want the hash, the frame is neither parsed nor hashed.
    pub fn steer(&self, prefix: &[u8], len: usize) -> Steering {
        if let Some(q) = self.steers_blind() {
            return Steering {
                queue: q,
                ..NO_HASH
            };
        }
        match parse_frame_prefix(prefix, len) {
            Ok(info) => self.rss.steer(&info),
            Err(_) => Steering {
                queue: self.rss.unclassified_queue,
                ..NO_HASH
            },
        }
    }
}

/// Every port's view, and the uplink's link.
#[derive(Debug, Clone)]
pub struct View {
    pub gen: u64,
    pub ports: Vec<Arc<PortView>>,
    pub uplink_up: bool,
    /// Frames that match no port go to the VF's representor rather than
    /// the uplink (switchdev mode).
    pub switchdev: bool,
}

/// A frame's layer-2 header as the switch reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2 {
    pub dst: Address,
    pub src: Address,
    /// The outer tag: TPID and TCI.
    pub tag: Option<(u16, u16)>,
}

impl L2 {
    #[inline]
    pub fn parse(frame: &[u8]) -> Option<L2> {
        let eth = ethernet::Frame::new_checked(frame).ok()?;
        let tag = if ethernet::is_vlan_tpid(eth.ethertype()) {
            // The TCI and the EtherType after the tag: a tagged frame
            // shorter than that is malformed (untagged, it would be
            // shorter than an Ethernet header).
            let p = eth.payload();
            if p.len() < 4 {
                return None;
            }
            Some((eth.ethertype(), u16::from_be_bytes([p[0], p[1]])))
        } else {
            None
        };
        Some(L2 {
            dst: eth.dst_addr(),
            src: eth.src_addr(),
            tag,
        })
    }

    /// The VLAN id of the outer tag (0 untagged).
    pub fn vid(&self) -> u16 {
        self.tag.map_or(0, |(_, tci)| tci & 0xfff)
    }
}

/// Where a frame goes and as which VLAN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub ports: PortSet,
    pub uplink: bool,
    /// The VLAN the frame is in inside the switch (0 untagged).
    pub vid: u16,
    /// The TPID of the tag the frame carries in its bytes, if any.
    pub tpid: Option<u16>,
    /// The tag to put on a frame that leaves untagged bytes for a tagged
    /// destination (the source port's VLAN): TPID and TCI.
    pub tag: Option<(u16, u16)>,
}

impl View {
    /// The route of a frame sent by port `from` (the uplink when None),
    /// with header `l2`. Ports whose filters or VLAN refuse it are left
    /// out; the caller drops the frame when the route is empty.
    pub fn route(&self, from: Option<usize>, l2: &L2) -> Route {
        let (vid, tag) = match from.and_then(|p| self.ports.get(p)?.settings.vlan) {
            Some(pv) => (pv.vid, Some((pv.proto, pv.tci()))),
            None => (l2.vid(), None),
        };
        let mut r = Route {
            ports: PortSet::default(),
            uplink: false,
            vid,
            tpid: l2.tag.map(|(t, _)| t),
            tag,
        };
        let dst = l2.dst;
        if dst.is_unicast() {
            for (i, p) in self.ports.iter().enumerate() {
                if Some(i) != from
                    && p.owns(dst)
                    && p.egress_tpid(vid, r.tpid).is_some()
                    && p.takes(dst)
                {
                    r.ports = r.ports.with(i);
                    return r;
                }
            }
        }
        // Broadcast, multicast, or no port owns the address: every port in
        // the VLAN whose filter takes it, and the wire.
        for (i, p) in self.ports.iter().enumerate() {
            if Some(i) != from && p.egress_tpid(vid, r.tpid).is_some() && p.takes(dst) {
                r.ports = r.ports.with(i);
            }
        }
        r.uplink = from.is_some();
        r
    }

    /// Whether port `p` gets a frame of VLAN `vid` tagged.
    pub fn tagged_for(&self, p: usize, vid: u16) -> bool {
        self.ports
            .get(p)
            .and_then(|v| v.egress(vid))
            .unwrap_or(false)
    }
}

/// The switch's shared state: the current [`View`] and its generation.
#[derive(Debug)]
pub struct Switch {
    gen: AtomicU64,
    view: RwLock<Arc<View>>,
}

impl Switch {
    pub fn new(view: View) -> Switch {
        Switch {
            gen: AtomicU64::new(view.gen),
            view: RwLock::new(Arc::new(view)),
        }
    }

    /// The view in force.
    pub fn view(&self) -> Arc<View> {
        self.view
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces `cached` with the view in force if it is older; one atomic
    /// load when nothing changed.
    pub fn refresh(&self, cached: &mut Arc<View>) {
        if self.gen.load(Ordering::Acquire) != cached.gen {
            *cached = self.view();
        }
    }

    /// Publishes a new view made from the current one by `f`.
    pub fn update(&self, f: impl FnOnce(&mut View)) {
        let mut g = self.view.write().unwrap_or_else(PoisonError::into_inner);
        let mut v = (**g).clone();
        f(&mut v);
        v.gen = g.gen + 1;
        self.gen.store(v.gen, Ordering::Release);
        *g = Arc::new(v);
    }
}

/// Puts a tag (TPID, TCI) after the addresses of `frame`, which follows a
/// 12-byte virtio-net header in `buf`; the header's offsets move with it.
pub fn insert_tag(buf: &mut Vec<u8>, hdr_len: usize, (tpid, tci): (u16, u16)) {
    let at = hdr_len + 12;
    if buf.len() < at {
        return;
    }
    let mut tag = [0u8; 4];
    tag[..2].copy_from_slice(&tpid.to_be_bytes());
    tag[2..].copy_from_slice(&tci.to_be_bytes());
    buf.splice(at..at, tag);
    shift_offsets(buf, 4);
}

/// Removes the outer tag of the frame after the header in `buf`.
pub fn strip_tag(buf: &mut Vec<u8>, hdr_len: usize) {
    let at = hdr_len + 12;
    if buf.len() < at + 4 {
        return;
    }
    buf.drain(at..at + 4);
    shift_offsets(buf, -4);
}

/// Moves the virtio-net header's `hdr_len` and `csum_start` (bytes 2..4
/// and 6..8) by `by` when they are set.
fn shift_offsets(buf: &mut [u8], by: i32) {
    for at in [2usize, 6] {
        if let Some(b) = buf.get_mut(at..at + 2) {
            let v = u16::from_le_bytes([b[0], b[1]]);
            if v != 0 {
                let n = (i32::from(v) + by).clamp(0, i32::from(u16::MAX)) as u16;
                b.copy_from_slice(&n.to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nic::vf::{PortVlan, TPID_8021Q};

    fn port(mac: u8, is_vf: bool) -> Arc<PortView> {
        let mac = Address([2, 0, 0, 0, 0, mac]);
        let rss = crate::nic::RssSettings::default();
        let table = vnic_protocol::rss::IndirectionTable::spread(128, 1).unwrap();
        Arc::new(PortView {
            mac,
            filter: RxFilter::default(),
            rss: Arc::new(Rss::new(&rss.key, rss.hash_types, table, 0).unwrap()),
            settings: if is_vf {
                VfSettings::new(mac)
            } else {
                VfSettings::pf(mac)
            },
            caps: Offloads::default(),
            attached: true,
            learned: Vec::new(),
            is_vf,
            rx: None,
            hash_report: false,
        })
    }

    fn view(ports: Vec<Arc<PortView>>) -> View {
        View {
            gen: 0,
            ports,
            uplink_up: true,
            switchdev: false,
        }
    }

    fn l2(dst: [u8; 6], vid: Option<u16>) -> L2 {
        L2 {
            dst: Address(dst),
            src: Address([2, 0, 0, 0, 0, 0x77]),
            tag: vid.map(|v| (TPID_8021Q, v)),
        }
    }

    #[test]
    fn unicast_goes_to_its_owner_and_unknown_to_the_wire() {
        let v = view(vec![port(1, false), port(2, true), port(3, true)]);
        // VF0 to VF1: VF1 alone, not the wire.
        let r = v.route(Some(1), &l2([2, 0, 0, 0, 0, 3], None));
        assert_eq!((r.ports, r.uplink), (PortSet::default().with(2), false));
        // VF0 to the PF.
        let r = v.route(Some(1), &l2([2, 0, 0, 0, 0, 1], None));
        assert_eq!((r.ports, r.uplink), (PortSet::default().with(0), false));
        // VF0 to an unknown host: the wire, and the PF (no filter set:
        // it takes everything, as the single-port device always did); not
        // the other VF (not promiscuous).
        let r = v.route(Some(1), &l2([2, 0, 0, 0, 0, 9], None));
        assert_eq!((r.ports, r.uplink), (PortSet::default().with(0), true));
        // From the wire to VF1.
        let r = v.route(None, &l2([2, 0, 0, 0, 0, 3], None));
        assert_eq!((r.ports, r.uplink), (PortSet::default().with(2), false));
        // Broadcast from VF1: everyone else and the wire.
        let r = v.route(Some(2), &l2([0xff; 6], None));
        assert_eq!(
            (r.ports, r.uplink),
            (PortSet::default().with(0).with(1), true)
        );
    }

    #[test]
    fn vlans_separate_ports() {
        let mut vf_a = (*port(2, true)).clone();
        vf_a.settings.vlan = Some(PortVlan {
            vid: 100,
            qos: 2,
            proto: TPID_8021Q,
        });
        let mut vf_b = (*port(3, true)).clone();
        vf_b.settings.vlan = Some(PortVlan {
            vid: 200,
            qos: 0,
            proto: TPID_8021Q,
        });
        let vf_c = port(4, true);
        let v = view(vec![port(1, false), Arc::new(vf_a), Arc::new(vf_b), vf_c]);
        // A broadcast from the VF in VLAN 100 stays in VLAN 100: the PF
        // (a trunk) and the wire, tagged with the port's VLAN and priority.
        let r = v.route(Some(1), &l2([0xff; 6], None));
        assert_eq!(r.ports, PortSet::default().with(0));
        assert!(r.uplink);
        assert_eq!((r.vid, r.tag), (100, Some((TPID_8021Q, (2 << 13) | 100))));
        assert!(v.tagged_for(0, 100), "the PF sees it tagged");
        // Unicast to a VF of another VLAN does not get there.
        let r = v.route(Some(1), &l2([2, 0, 0, 0, 0, 3], None));
        assert!(!r.ports.contains(2));
        // From the wire, tagged 200: VF1 gets it, untagged.
        let r = v.route(None, &l2([2, 0, 0, 0, 0, 3], Some(200)));
        assert_eq!(r.ports, PortSet::default().with(2));
        assert!(!v.tagged_for(2, 200));
        // Untagged from the wire to the VLAN 200 VF: not in its VLAN.
        let r = v.route(None, &l2([2, 0, 0, 0, 0, 3], None));
        assert!(!r.ports.contains(2));
        // A VF without a port VLAN gets no tagged frames until its driver
        // adds the VLAN to its filter; the PF is a trunk.
        assert_eq!(v.ports[3].egress(300), None);
        assert_eq!(v.ports[0].egress(300), Some(true));
    }

    #[test]
    fn tags_move_the_header_offsets() {
        let mut b = vec![0u8; 12 + 60];
        b[2..4].copy_from_slice(&54u16.to_le_bytes());
        b[6..8].copy_from_slice(&34u16.to_le_bytes());
        b[12 + 12] = 0x08;
        insert_tag(&mut b, 12, (TPID_8021Q, 7));
        assert_eq!(b.len(), 12 + 64);
        assert_eq!(&b[24..28], &[0x81, 0, 0, 7]);
        assert_eq!(b[28], 0x08);
        assert_eq!(u16::from_le_bytes([b[2], b[3]]), 58);
        assert_eq!(u16::from_le_bytes([b[6], b[7]]), 38);
        strip_tag(&mut b, 12);
        assert_eq!(b.len(), 12 + 60);
        assert_eq!(b[24], 0x08);
        assert_eq!(u16::from_le_bytes([b[6], b[7]]), 34);
        assert_eq!(L2::parse(&b[12..]).unwrap().tag, None);
    }

    /// A tag needs its TCI and the EtherType after it: a tagged frame cut
    /// short is malformed, not a frame that would be 12 bytes once its tag
    /// came off.
    #[test]
    fn a_tagged_frame_without_its_inner_ethertype_is_malformed() {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x81, 0, 0, 7]);
        assert_eq!(L2::parse(&f), None);
        f.extend_from_slice(&[0x08, 0]);
        assert_eq!(L2::parse(&f).map(|l| l.vid()), Some(7));
    }
}
