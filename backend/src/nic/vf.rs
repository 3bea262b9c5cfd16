//! Per-port administrative settings with the meaning of `ip link set DEV
//! vf N ...`, the token bucket behind `max_tx_rate`, and the link's
//! shares behind `min_tx_rate`.

use std::fmt;

use vnic_protocol::wire::ethernet::Address;

/// The 802.1Q TPID.
pub const TPID_8021Q: u16 = 0x8100;
/// The 802.1ad (QinQ service tag) TPID.
pub const TPID_8021AD: u16 = 0x88a8;

/// A port VLAN: frames of the port are tagged with it on the wire and
/// reach the guest untagged; the guest cannot leave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortVlan {
    /// 1 to 4094.
    pub vid: u16,
    /// Priority code point, 0 to 7.
    pub qos: u8,
    /// TPID: 802.1Q or 802.1ad.
    pub proto: u16,
}

impl PortVlan {
    /// The tag control information: priority and VLAN id.
    pub fn tci(&self) -> u16 {
        (u16::from(self.qos) << 13) | self.vid
    }

    pub fn proto_name(&self) -> &'static str {
        if self.proto == TPID_8021AD {
            "802.1ad"
        } else {
            "802.1Q"
        }
    }
}

/// `state auto|enable|disable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinkState {
    /// Follows the uplink.
    #[default]
    Auto,
    /// Up whatever the uplink does.
    Enable,
    /// Down: the port's traffic is dropped and counted as `link_down`.
    Disable,
}

impl LinkState {
    pub fn name(self) -> &'static str {
        match self {
            LinkState::Auto => "auto",
            LinkState::Enable => "enable",
            LinkState::Disable => "disable",
        }
    }
}

/// The settings of one virtual function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfSettings {
    pub mac: Address,
    pub vlan: Option<PortVlan>,
    /// Source MAC and VLAN anti-spoofing.
    pub spoofchk: bool,
    /// Lets the guest turn on promiscuous or all-multicast mode and change
    /// its MAC through the control queue.
    pub trust: bool,
    /// Mbit/s; 0 is no limit.
    pub max_tx_rate: u32,
    /// Mbit/s; 0 is none. Kept and shown; not enforced (see README).
    pub min_tx_rate: u32,
    pub state: LinkState,
}

impl VfSettings {
    /// Defaults of a VF, as Linux drivers have them: spoof checking on,
    /// untrusted, no VLAN, no rate, link state auto.
    pub fn new(mac: Address) -> VfSettings {
        VfSettings {
            mac,
            vlan: None,
            spoofchk: true,
            trust: false,
            max_tx_rate: 0,
            min_tx_rate: 0,
            state: LinkState::Auto,
        }
    }

    /// The PF: trusted, no spoof checking, the rest as a VF.
    pub fn pf(mac: Address) -> VfSettings {
        VfSettings {
            spoofchk: false,
            trust: true,
            ..VfSettings::new(mac)
        }
    }

    /// Applies `key value` pairs (`mac`, `vlan`, `qos`, `proto`,
    /// `spoofchk`, `trust`, `max_tx_rate`, `min_tx_rate`, `state`) to a
    /// copy; the copy is returned only when every pair is valid, so a bad
    /// value changes nothing.
    pub fn with<'a>(
        &self,
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<VfSettings, SettingError> {
        let mut s = self.clone();
        let mut qos = None;
        let mut proto = None;
        let mut vlan_given = false;
        for (k, v) in pairs {
            let bad = |why: &str| SettingError::new(k, v, why);
            match k {
                "mac" => {
                    let a: Address = v
                        .parse()
                        .map_err(|_| bad("expected six hex octets like 02:00:00:00:00:01"))?;
                    if a.is_multicast() || a.0 == [0; 6] {
                        return Err(bad("not a unicast address"));
                    }
                    s.mac = a;
                }
                "vlan" => {
                    let vid: u16 = v.parse().map_err(|_| bad("expected 0 to 4094"))?;
                    if vid > 4094 {
                        return Err(bad("expected 0 to 4094"));
                    }
                    vlan_given = true;
                    s.vlan = (vid != 0).then_some(PortVlan {
                        vid,
                        qos: 0,
                        proto: TPID_8021Q,
                    });
                }
                "qos" => {
                    let q: u8 = v.parse().map_err(|_| bad("expected 0 to 7"))?;
                    if q > 7 {
                        return Err(bad("expected 0 to 7"));
                    }
                    qos = Some(q);
                }
                "proto" => {
                    proto = Some(match v.to_ascii_lowercase().as_str() {
                        "802.1q" => TPID_8021Q,
                        "802.1ad" => TPID_8021AD,
                        _ => return Err(bad("expected 802.1Q or 802.1ad")),
                    });
                }
                "spoofchk" => s.spoofchk = on_off(v).ok_or_else(|| bad("expected on or off"))?,
                "trust" => s.trust = on_off(v).ok_or_else(|| bad("expected on or off"))?,
                "max_tx_rate" => {
                    s.max_tx_rate = v.parse().map_err(|_| bad("expected Mbit/s"))?;
                }
                "min_tx_rate" => {
                    s.min_tx_rate = v.parse().map_err(|_| bad("expected Mbit/s"))?;
                }
                "state" => {
                    s.state = match v {
                        "auto" => LinkState::Auto,
                        "enable" => LinkState::Enable,
                        "disable" => LinkState::Disable,
                        _ => return Err(bad("expected auto, enable or disable")),
                    }
                }
                _ => {
                    return Err(SettingError::new(
                        k,
                        v,
                        "unknown setting (known: mac vlan qos proto spoofchk trust max_tx_rate min_tx_rate state)",
                    ))
                }
            }
        }
        if qos.is_some() || proto.is_some() {
            // ip-link: qos and proto qualify the vlan given with them.
            if !vlan_given {
                return Err(SettingError::new(
                    "qos/proto",
                    "",
                    "only together with vlan",
                ));
            }
            match &mut s.vlan {
                Some(pv) => {
                    pv.qos = qos.unwrap_or(0);
                    pv.proto = proto.unwrap_or(TPID_8021Q);
                }
                None => return Err(SettingError::new("qos/proto", "", "vlan 0 has neither")),
            }
        }
        if s.max_tx_rate != 0 && s.min_tx_rate > s.max_tx_rate {
            return Err(SettingError::new(
                "min_tx_rate",
                &s.min_tx_rate.to_string(),
                "above max_tx_rate",
            ));
        }
        if s.max_tx_rate > 400_000 || s.min_tx_rate > 400_000 {
            return Err(SettingError::new(
                "max_tx_rate",
                &s.max_tx_rate.to_string(),
                "at most 400000 Mbit/s",
            ));
        }
        Ok(s)
    }

    /// Splits `a=b,c=d` (the `--vf I:...` form) into pairs.
    pub fn parse_list(s: &str) -> Result<Vec<(&str, &str)>, SettingError> {
        s.split(',')
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.split_once('=')
                    .ok_or_else(|| SettingError::new(p, "", "expected key=value"))
            })
            .collect()
    }
}

fn on_off(v: &str) -> Option<bool> {
    match v {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    }
}

/// A setting that cannot be applied, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingError {
    pub key: String,
    pub value: String,
    pub why: String,
}

impl SettingError {
    pub(crate) fn new(key: &str, value: &str, why: &str) -> SettingError {
        SettingError {
            key: key.to_owned(),
            value: value.to_owned(),
            why: why.to_owned(),
        }
    }
}

impl fmt::Display for SettingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}: {}", self.key, self.why)
        } else {
            write!(f, "{} {:?}: {}", self.key, self.value, self.why)
        }
    }
}

impl std::error::Error for SettingError {}

/// A token bucket in bytes, driven by the caller's clock (nanoseconds):
/// it holds no timer of its own. A frame may go whenever the level is not
/// negative, and its bytes are then taken, so the level can dip below
/// zero by one frame; the sender waits until it is back at zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBucket {
    /// Bytes per second.
    rate: u64,
    /// Most bytes saved up while idle.
    burst: i64,
    level: i64,
    /// Time of the last refill.
    at: u64,
}

impl TokenBucket {
    /// A bucket of `mbit` Mbit/s, full at `now`. Its burst is 2 ms of the
    /// rate, and never less than one 64 KiB frame.
    pub fn new(mbit: u32, now: u64) -> TokenBucket {
        let rate = u64::from(mbit) * 1_000_000 / 8;
        let burst = (rate / 500).max(65_536) as i64;
        TokenBucket {
            rate,
            burst,
            level: burst,
            at: now,
        }
    }

    /// Bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    fn refill(&mut self, now: u64) {
        if now <= self.at {
            return;
        }
        let gained = u128::from(now - self.at) * u128::from(self.rate) / 1_000_000_000;
        let gained = i64::try_from(gained).unwrap_or(i64::MAX);
        self.level = self.level.saturating_add(gained).min(self.burst);
        // Only whole bytes are credited; the rest of the time carries over.
        let used_ns = u128::try_from(gained)
            .map(|g| g * 1_000_000_000 / u128::from(self.rate.max(1)))
            .unwrap_or(0);
        self.at += u64::try_from(used_ns)
            .unwrap_or(now - self.at)
            .min(now - self.at);
        if self.level == self.burst {
            self.at = now;
        }
    }

    /// None when a frame may go at `now`; otherwise how many nanoseconds
    /// until one may.
    pub fn wait(&mut self, now: u64) -> Option<u64> {
        self.refill(now);
        if self.level >= 0 {
            return None;
        }
        let short = self.level.unsigned_abs();
        Some((u128::from(short) * 1_000_000_000 / u128::from(self.rate.max(1))).max(1) as u64)
    }

    /// Takes `bytes` for a frame sent at `now`.
    pub fn take(&mut self, now: u64, bytes: usize) {
        self.refill(now);
        self.level = self
            .level
            .saturating_sub(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
}

/// The NIC's transmit capacity (`--link-speed`), shared by its ports,
/// with `min_tx_rate` guarantees, as a hierarchical token bucket shares a
/// parent's rate: every byte a port sends is taken from the link's bucket
/// and from the port's own guarantee, if it has one. A port may send
/// while its guarantee has bytes, even when the link has none (the link
/// goes into debt, which the others wait out), or while the link has
/// bytes (borrowing). So under contention a port gets at least its
/// guarantee and the ports share what the guarantees leave; without
/// contention any port may use the whole link. Driven by the caller's
/// clock, like [`TokenBucket`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkShares {
    link: TokenBucket,
    /// Per port (0 the PF): its guarantee.
    min: Vec<Option<TokenBucket>>,
}

impl LinkShares {
    /// A link of `mbit` Mbit/s for `ports` ports, none with a guarantee.
    pub fn new(mbit: u32, ports: usize, now: u64) -> LinkShares {
        LinkShares {
            link: TokenBucket::new(mbit, now),
            min: vec![None; ports],
        }
    }

    /// Port `p`'s guarantee: `mbit` Mbit/s, 0 for none.
    pub fn set_min(&mut self, p: usize, mbit: u32, now: u64) {
        if let Some(m) = self.min.get_mut(p) {
            *m = (mbit > 0).then(|| TokenBucket::new(mbit, now));
        }
    }

    /// None when port `p` may send at `now`; otherwise how many
    /// nanoseconds until it may (its guarantee's or the link's time,
    /// whichever comes first).
    pub fn wait(&mut self, p: usize, now: u64) -> Option<u64> {
        let own = match self.min.get_mut(p).and_then(Option::as_mut) {
            Some(b) => Some(b.wait(now)?),
            None => None,
        };
        let link = self.link.wait(now)?;
        Some(own.map_or(link, |o| o.min(link)))
    }

    /// Takes `bytes` that port `p` sent at `now`.
    pub fn take(&mut self, p: usize, now: u64, bytes: usize) {
        self.link.take(now, bytes);
        if let Some(b) = self.min.get_mut(p).and_then(Option::as_mut) {
            b.take(now, bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Greedy ports (each always has a 1500-byte frame to send) on a
    /// link for 10 s, taking turns: Mbit/s each got.
    fn contend(link: u32, mins: &[u32]) -> Vec<f64> {
        let mut l = LinkShares::new(link, mins.len(), 0);
        for (p, &m) in mins.iter().enumerate() {
            l.set_min(p, m, 0);
        }
        let mut sent = vec![0u64; mins.len()];
        let (mut now, end) = (0u64, 10_000_000_000u64);
        let mut turn = 0;
        while now < end {
            let mut soonest = u64::MAX;
            let mut any = false;
            for k in 0..mins.len() {
                let p = (turn + k) % mins.len();
                match l.wait(p, now) {
                    None => {
                        l.take(p, now, 1500);
                        sent[p] += 1500;
                        any = true;
                    }
                    Some(w) => soonest = soonest.min(w),
                }
            }
            if any {
                turn += 1;
            } else {
                now += soonest;
            }
        }
        sent.iter().map(|&b| b as f64 * 8.0 / 10.0 / 1e6).collect()
    }

    #[test]
    fn a_guarantee_holds_under_contention_and_the_rest_is_shared() {
        // Nobody guaranteed: two greedy ports halve a 1000 Mbit/s link.
        let r = contend(1000, &[0, 0]);
        assert!(
            (r[0] - 500.0).abs() < 15.0 && (r[1] - 500.0).abs() < 15.0,
            "{r:?}"
        );
        // 600 guaranteed to one: it gets at least that, the link is not
        // overrun, and the other gets what is left.
        let r = contend(1000, &[600, 0]);
        assert!(r[0] >= 600.0 * 0.99, "{r:?}");
        assert!(r[0] + r[1] <= 1000.0 * 1.01, "{r:?}");
        assert!(r[1] >= 300.0, "{r:?}");
        // Three ports, two guaranteed.
        let r = contend(900, &[300, 400, 0]);
        assert!(r[0] >= 300.0 * 0.99 && r[1] >= 400.0 * 0.99, "{r:?}");
        assert!(r.iter().sum::<f64>() <= 900.0 * 1.01, "{r:?}");
    }

    #[test]
    fn alone_a_port_may_use_the_whole_link() {
        let mut l = LinkShares::new(1000, 2, 0);
        l.set_min(1, 100, 0);
        let (mut now, mut sent) = (0u64, 0u64);
        while now < 1_000_000_000 {
            match l.wait(0, now) {
                None => {
                    l.take(0, now, 1500);
                    sent += 1500;
                }
                Some(w) => now += w,
            }
        }
        let mbit = sent as f64 * 8.0 / 1e6;
        assert!((mbit - 1000.0).abs() < 15.0, "{mbit}");
        // Its guarantee lets port 1 send even right after the link was
        // spent.
        assert!(l.wait(0, now).is_some() || l.wait(1, now).is_none());
        assert_eq!(l.wait(1, now), None);
    }

    const MAC: Address = Address([2, 0, 0, 0, 0, 1]);

    #[test]
    fn settings_parse_and_a_bad_value_changes_nothing() {
        let s = VfSettings::new(MAC);
        let t = s
            .with([
                ("vlan", "100"),
                ("qos", "3"),
                ("proto", "802.1ad"),
                ("spoofchk", "off"),
                ("trust", "on"),
                ("max_tx_rate", "200"),
                ("min_tx_rate", "50"),
                ("state", "disable"),
                ("mac", "02:00:00:00:00:09"),
            ])
            .unwrap();
        assert_eq!(
            t.vlan,
            Some(PortVlan {
                vid: 100,
                qos: 3,
                proto: TPID_8021AD
            })
        );
        assert_eq!(t.vlan.unwrap().tci(), (3 << 13) | 100);
        assert!(!t.spoofchk && t.trust);
        assert_eq!((t.max_tx_rate, t.min_tx_rate), (200, 50));
        assert_eq!(t.state, LinkState::Disable);
        assert_eq!(t.mac, Address([2, 0, 0, 0, 0, 9]));
        for bad in [
            vec![("vlan", "4095")],
            vec![("qos", "8"), ("vlan", "5")],
            vec![("qos", "1")],
            vec![("vlan", "0"), ("qos", "1")],
            vec![("proto", "802.1x"), ("vlan", "5")],
            vec![("spoofchk", "yes")],
            vec![("state", "up")],
            vec![("mac", "01:00:5e:00:00:01")],
            vec![("mac", "00:00:00:00:00:00")],
            vec![("max_tx_rate", "100"), ("min_tx_rate", "200")],
            vec![("max_tx_rate", "-1")],
            vec![("colour", "blue")],
            vec![("trust", "on"), ("vlan", "x")],
        ] {
            assert!(s.with(bad.iter().copied()).is_err(), "{bad:?}");
        }
        assert_eq!(
            VfSettings::parse_list("vlan=5,trust=on").unwrap(),
            vec![("vlan", "5"), ("trust", "on")]
        );
        assert!(VfSettings::parse_list("vlan").is_err());
        // vlan 0 removes the port VLAN.
        assert_eq!(t.with([("vlan", "0")]).unwrap().vlan, None);
    }

    #[test]
    fn bucket_holds_its_rate() {
        // 200 Mbit/s = 25 MB/s. Send 1500-byte frames whenever allowed
        // over 10 simulated seconds: the bytes sent match the rate.
        let mut b = TokenBucket::new(200, 0);
        let mut now = 0u64;
        let mut sent = 0u64;
        let end = 10_000_000_000u64;
        while now < end {
            match b.wait(now) {
                None => {
                    b.take(now, 1500);
                    sent += 1500;
                }
                Some(w) => now += w,
            }
        }
        let rate = sent as f64 * 1e9 / end as f64;
        assert!((rate - 25e6).abs() / 25e6 < 0.01, "{rate} bytes/s");
        // A 64 KiB frame may go from a full bucket, then the sender waits
        // about its time at the rate.
        let mut b = TokenBucket::new(200, 0);
        assert_eq!(b.wait(0), None);
        b.take(0, 65_536);
        b.take(0, 65_536);
        let w = b.wait(0).unwrap();
        let expect = 65_536u64 * 1_000_000_000 / 25_000_000;
        assert!(w.abs_diff(expect) < 1000, "{w} ns");
        assert_eq!(b.wait(w), None);
        // Idle time saves up no more than the burst.
        let mut b = TokenBucket::new(1, 0);
        b.take(0, 65_536);
        assert!(b.wait(3_600_000_000_000).is_none());
        b.take(3_600_000_000_000, 65_536);
        b.take(3_600_000_000_000, 1);
        assert!(b.wait(3_600_000_000_000).is_some());
    }
}
