//! vnicd's settings, checked before anything starts.

use std::path::PathBuf;

use thiserror::Error;
use vnic_protocol::{
    rss::{HashTypes, MAX_KEY_LEN, MIN_KEY_LEN},
    wire::ethernet::Address,
};

use crate::nic::{vf::VfSettings, DeviceConfig, RssSettings};

/// Largest number of queue pairs.
pub const MAX_PAIRS: u16 = 16;
/// Largest virtqueue size.
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// A setting that cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--workers must be 1 to {MAX_PAIRS}, not {0}")]
    Workers(u16),
    #[error("--queues must be 1 to {MAX_PAIRS}, not {0}")]
    Queues(u16),
    #[error("--queue-size must be a power of two from 2 to {MAX_QUEUE_SIZE}, not {0}")]
    QueueSize(u16),
    #[error("--mtu must be 68 to 65535, not {0}")]
    Mtu(u16),
    #[error("--mac {0:?}: {1}")]
    Mac(String, &'static str),
    #[error("--uplink {0:?}: expected tap:NAME, none, sink or source:SIZE")]
    Uplink(String),
    #[error("--rss-key: {0}")]
    RssKey(String),
    #[error("--rss-table: {0}")]
    RssTable(String),
    #[error("--rss-hash-types: unknown type {0:?} (known: ipv4 tcpv4 udpv4 ipv6 tcpv6 udpv6 ip_ex tcp_ex udp_ex)")]
    HashType(String),
    #[error("--vfs must be 0 to {max}, not {0}", max = crate::nic::MAX_VFS)]
    Vfs(usize),
    #[error("--vf-socket {0:?}: expected I=PATH with I below --vfs")]
    VfSocket(String),
    #[error("--vf {0:?}: {1}")]
    Vf(String, String),
    #[error("--eswitch: {0}")]
    Eswitch(String),
}

/// Where the device's host side goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UplinkSpec {
    None,
    Tap(String),
    /// Takes every frame (benchmarks).
    Sink,
    /// Always has a frame of this many bytes (benchmarks).
    Source(usize),
}

impl std::str::FromStr for UplinkSpec {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<UplinkSpec, ConfigError> {
        match s.split_once(':') {
            _ if s == "none" => Ok(UplinkSpec::None),
            _ if s == "sink" => Ok(UplinkSpec::Sink),
            Some(("source", n)) => match n.parse::<usize>() {
                Ok(n) if (60..=65_000).contains(&n) => Ok(UplinkSpec::Source(n)),
                _ => Err(ConfigError::Uplink(s.to_owned())),
            },
            Some(("tap", name)) if !name.is_empty() && name.len() < 16 => {
                Ok(UplinkSpec::Tap(name.to_owned()))
            }
            _ => Err(ConfigError::Uplink(s.to_owned())),
        }
    }
}

/// One virtual function: where it listens and how it is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfConfig {
    pub socket: PathBuf,
    pub settings: VfSettings,
}

/// Everything vnicd runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The PF's vhost-user socket.
    pub socket: PathBuf,
    /// Connect to a listening VMM instead of listening.
    pub client: bool,
    pub device: DeviceConfig,
    pub vfs: Vec<VfConfig>,
    /// Switchdev mode: each VF gets a host TAP representor, named by
    /// [`representor_name`] with this prefix.
    pub representors: Option<String>,
    pub uplink: UplinkSpec,
    pub mgmt: Option<PathBuf>,
    /// Serve one frontend connection, then exit.
    pub once: bool,
}

/// The VF ports: `vfs` of them, VF i on `<socket>.vf<i>` unless
/// `sockets` (`I=PATH`) says otherwise, with the `I:key=value,...`
/// settings of `settings` over the defaults (MAC from the PF's).
pub fn vf_ports(
    socket: &std::path::Path,
    pf_mac: Address,
    vfs: usize,
    sockets: &[String],
    settings: &[String],
) -> Result<Vec<VfConfig>, ConfigError> {
    if vfs > crate::nic::MAX_VFS {
        return Err(ConfigError::Vfs(vfs));
    }
    let mut out: Vec<VfConfig> = (0..vfs)
        .map(|i| {
            let mut p = socket.as_os_str().to_owned();
            p.push(format!(".vf{i}"));
            VfConfig {
                socket: PathBuf::from(p),
                settings: VfSettings::new(crate::nic::default_vf_mac(pf_mac, i)),
            }
        })
        .collect();
    let index = |s: &str, err: &dyn Fn() -> ConfigError| -> Result<usize, ConfigError> {
        s.parse::<usize>().ok().filter(|&i| i < vfs).ok_or_else(err)
    };
    for spec in sockets {
        let err = || ConfigError::VfSocket(spec.clone());
        let (i, path) = spec.split_once('=').ok_or_else(err)?;
        let i = index(i, &err)?;
        if path.is_empty() {
            return Err(err());
        }
        out[i].socket = PathBuf::from(path);
    }
    for spec in settings {
        let (i, list) = spec
            .split_once(':')
            .ok_or_else(|| ConfigError::Vf(spec.clone(), "expected I:key=value,...".into()))?;
        let i = index(i, &|| {
            ConfigError::Vf(spec.clone(), format!("no VF {i} (--vfs {vfs})"))
        })?;
        let pairs = VfSettings::parse_list(list)
            .map_err(|e| ConfigError::Vf(spec.clone(), e.to_string()))?;
        out[i].settings = out[i]
            .settings
            .with(pairs)
            .map_err(|e| ConfigError::Vf(spec.clone(), e.to_string()))?;
    }
    Ok(out)
}

/// Whether `--eswitch` asks for switchdev mode.
pub fn parse_eswitch(s: &str) -> Result<bool, ConfigError> {
    match s {
        "legacy" => Ok(false),
        "switchdev" => Ok(true),
        _ => Err(ConfigError::Eswitch(format!(
            "{s:?}: expected legacy or switchdev"
        ))),
    }
}

/// The TAP representor of VF `n`: the prefix, then `n`.
pub fn representor_name(prefix: &str, n: usize) -> String {
    format!("{prefix}{n}")
}

/// A representor prefix that leaves room for two digits in an interface
/// name (15 bytes).
pub fn check_representor_prefix(s: &str) -> Result<String, ConfigError> {
    if !s.is_empty()
        && s.len() <= 13
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(s.to_owned())
    } else {
        Err(ConfigError::Eswitch(format!(
            "representor prefix {s:?}: 1 to 13 letters, digits, - or _"
        )))
    }
}

pub fn check_queues(n: u16) -> Result<u16, ConfigError> {
    if (1..=MAX_PAIRS).contains(&n) {
        Ok(n)
    } else {
        Err(ConfigError::Queues(n))
    }
}

/// A worker thread count: 1 to [`MAX_PAIRS`] (0 asks for the default).
pub fn check_workers(n: u16) -> Result<u16, ConfigError> {
    if n <= MAX_PAIRS {
        Ok(n)
    } else {
        Err(ConfigError::Workers(n))
    }
}

pub fn check_queue_size(n: u16) -> Result<u16, ConfigError> {
    if n.is_power_of_two() && (2..=MAX_QUEUE_SIZE).contains(&n) {
        Ok(n)
    } else {
        Err(ConfigError::QueueSize(n))
    }
}

pub fn check_mtu(n: u16) -> Result<u16, ConfigError> {
    if n >= 68 {
        Ok(n)
    } else {
        Err(ConfigError::Mtu(n))
    }
}

pub fn parse_mac(s: &str) -> Result<Address, ConfigError> {
    let a: Address = s.parse().map_err(|_| {
        ConfigError::Mac(
            s.to_owned(),
            "expected six hex octets like 52:54:00:12:34:56",
        )
    })?;
    if a.is_multicast() {
        return Err(ConfigError::Mac(
            s.to_owned(),
            "a multicast address cannot be a NIC's",
        ));
    }
    Ok(a)
}

/// A key as hex, optionally with ':' between octets.
pub fn parse_rss_key(s: &str) -> Result<Vec<u8>, ConfigError> {
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    if hex.len() % 2 != 0 {
        return Err(ConfigError::RssKey("odd number of hex digits".into()));
    }
    let key = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|e| ConfigError::RssKey(e.to_string()))?;
    if !(MIN_KEY_LEN..=MAX_KEY_LEN).contains(&key.len()) {
        return Err(ConfigError::RssKey(format!(
            "{} bytes; need {MIN_KEY_LEN} to {MAX_KEY_LEN}",
            key.len()
        )));
    }
    Ok(key)
}

/// A table as comma-separated queue numbers; its length must be a power
/// of two and every queue below `pairs`.
pub fn parse_rss_table(s: &str, pairs: u16) -> Result<Vec<u16>, ConfigError> {
    let t = s
        .split(',')
        .map(|q| q.trim().parse::<u16>())
        .collect::<Result<Vec<u16>, _>>()
        .map_err(|e| ConfigError::RssTable(e.to_string()))?;
    if !t.len().is_power_of_two() || t.len() > vnic_protocol::rss::MAX_TABLE_LEN {
        return Err(ConfigError::RssTable(format!(
            "{} entries; need a power of two",
            t.len()
        )));
    }
    if let Some(q) = t.iter().find(|&&q| q >= pairs) {
        return Err(ConfigError::RssTable(format!(
            "queue {q}, but only {pairs} queue pairs"
        )));
    }
    Ok(t)
}

pub fn parse_hash_types(s: &str) -> Result<HashTypes, ConfigError> {
    let mut t = HashTypes::empty();
    for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        t |= match name.to_ascii_lowercase().as_str() {
            "ipv4" => HashTypes::IPV4,
            "tcpv4" => HashTypes::TCPV4,
            "udpv4" => HashTypes::UDPV4,
            "ipv6" => HashTypes::IPV6,
            "tcpv6" => HashTypes::TCPV6,
            "udpv6" => HashTypes::UDPV6,
            "ip_ex" => HashTypes::IP_EX,
            "tcp_ex" => HashTypes::TCP_EX,
            "udp_ex" => HashTypes::UDP_EX,
            _ => return Err(ConfigError::HashType(name.to_owned())),
        };
    }
    Ok(t)
}

impl RssSettings {
    pub fn from_args(
        key: Option<&str>,
        table: Option<&str>,
        types: Option<&str>,
        pairs: u16,
    ) -> Result<RssSettings, ConfigError> {
        let mut r = RssSettings::default();
        if let Some(k) = key {
            r.key = parse_rss_key(k)?;
        }
        if let Some(t) = table {
            r.table = parse_rss_table(t, pairs)?;
        }
        if let Some(t) = types {
            r.hash_types = parse_hash_types(t)?;
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks() {
        assert_eq!(check_queues(0), Err(ConfigError::Queues(0)));
        assert_eq!(check_queues(17), Err(ConfigError::Queues(17)));
        assert_eq!(check_queues(16), Ok(16));
        assert_eq!(check_queue_size(1000), Err(ConfigError::QueueSize(1000)));
        assert_eq!(check_queue_size(2048), Err(ConfigError::QueueSize(2048)));
        assert_eq!(check_queue_size(1024), Ok(1024));
        assert!(parse_mac("01:00:5e:00:00:01").is_err());
        assert_eq!(parse_mac("52:54:00:12:34:56").unwrap().0[5], 0x56);
        assert_eq!("tap:vnic0".parse(), Ok(UplinkSpec::Tap("vnic0".into())));
        assert_eq!("none".parse(), Ok(UplinkSpec::None));
        assert_eq!("sink".parse(), Ok(UplinkSpec::Sink));
        assert_eq!("source:64".parse(), Ok(UplinkSpec::Source(64)));
        assert!("source:10".parse::<UplinkSpec>().is_err());
        assert!("tap:".parse::<UplinkSpec>().is_err());
        assert!("tap:0123456789abcdef".parse::<UplinkSpec>().is_err());
    }

    #[test]
    fn vf_args() {
        let pf = Address([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let sock = std::path::Path::new("/run/vnic.sock");
        let v = vf_ports(
            sock,
            pf,
            3,
            &["2=/run/other.sock".into()],
            &["1:vlan=100,qos=2,trust=on".into()],
        )
        .unwrap();
        assert_eq!(v[0].socket, PathBuf::from("/run/vnic.sock.vf0"));
        assert_eq!(v[2].socket, PathBuf::from("/run/other.sock"));
        assert_eq!(v[1].settings.vlan.unwrap().tci(), (2 << 13) | 100);
        assert!(v[1].settings.trust && !v[0].settings.trust);
        assert_eq!(v[0].settings.mac.0, [0x52, 0x54, 0, 0x12, 0xf0, 0]);
        assert_eq!(v[2].settings.mac.0, [0x52, 0x54, 0, 0x12, 0xf0, 2]);
        assert!(vf_ports(sock, pf, 65, &[], &[]).is_err());
        assert!(vf_ports(sock, pf, 2, &["2=/x".into()], &[]).is_err());
        assert!(vf_ports(sock, pf, 2, &["1".into()], &[]).is_err());
        assert!(vf_ports(sock, pf, 2, &[], &["0:vlan=5000".into()]).is_err());
        assert!(vf_ports(sock, pf, 2, &[], &["5:trust=on".into()]).is_err());
        assert!(parse_eswitch("switchdev").unwrap());
        assert!(parse_eswitch("bridge").is_err());
        assert_eq!(representor_name("vnicrep", 12), "vnicrep12");
        assert!(check_representor_prefix("a-very-long-prefix").is_err());
        assert!(check_representor_prefix("rep/").is_err());
    }

    #[test]
    fn rss_args() {
        let key = "6d:5a:56:da:25:5b:0e:c2:41:67:25:3d:43:a3:8f:b0:d0:ca:2b:cb:ae:7b:30:b4:77:cb:2d:a3:80:30:f2:0c:6a:42:b7:3b:be:ac:01:fa";
        assert_eq!(
            parse_rss_key(key).unwrap(),
            vnic_protocol::rss::DEFAULT_KEY.to_vec()
        );
        assert!(parse_rss_key("6d5a").is_err());
        assert_eq!(parse_rss_table("0,1,2,3", 4).unwrap(), vec![0, 1, 2, 3]);
        assert!(parse_rss_table("0,1,2", 4).is_err());
        assert!(parse_rss_table("0,4", 4).is_err());
        assert_eq!(
            parse_hash_types("tcpv4,ipv4").unwrap(),
            HashTypes::TCPV4 | HashTypes::IPV4
        );
        assert_eq!(
            parse_hash_types("tcpv5"),
            Err(ConfigError::HashType("tcpv5".into()))
        );
    }
}
