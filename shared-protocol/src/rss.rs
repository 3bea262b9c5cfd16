//! Receive-side scaling as virtio-net defines it (virtio 1.3, 5.1.6.4.3):
//! a Toeplitz hash over the flow's addresses and ports, chosen by the
//! enabled hash types, and an indirection table from hash to queue.

use core::net::IpAddr;

use thiserror::Error;

use crate::wire::{ip_proto, FrameInfo, L3Info};

/// Longest hash input: two IPv6 addresses and two ports.
pub const MAX_INPUT_LEN: usize = 36;
/// Shortest key that covers [`MAX_INPUT_LEN`] (the spec's minimum).
pub const MIN_KEY_LEN: usize = MAX_INPUT_LEN + 4;
/// Longest key a control command can carry.
pub const MAX_KEY_LEN: usize = 255;
/// Largest indirection table accepted.
pub const MAX_TABLE_LEN: usize = 0x8000;

/// The Microsoft verification key, also the common default.
pub const DEFAULT_KEY: [u8; 40] = [
    0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f, 0xb0,
    0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30, 0xf2, 0x0c,
    0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
];

bitflags::bitflags! {
    /// `VIRTIO_NET_RSS_HASH_TYPE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct HashTypes: u32 {
        const IPV4 = 1 << 0;
        const TCPV4 = 1 << 1;
        const UDPV4 = 1 << 2;
        const IPV6 = 1 << 3;
        const TCPV6 = 1 << 4;
        const UDPV6 = 1 << 5;
        const IP_EX = 1 << 6;
        const TCP_EX = 1 << 7;
        const UDP_EX = 1 << 8;
    }
}

impl HashTypes {
    /// What a Linux guest enables by default: every non-_EX type.
    pub const LINUX_DEFAULT: HashTypes = HashTypes::IPV4
        .union(HashTypes::TCPV4)
        .union(HashTypes::UDPV4)
        .union(HashTypes::IPV6)
        .union(HashTypes::TCPV6)
        .union(HashTypes::UDPV6);
}

/// `VIRTIO_NET_HASH_REPORT_*`: which hash type produced a hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u16)]
pub enum HashReport {
    #[default]
    None = 0,
    Ipv4 = 1,
    Tcpv4 = 2,
    Udpv4 = 3,
    Ipv6 = 4,
    Tcpv6 = 5,
    Udpv6 = 6,
    Ipv6Ex = 7,
    Tcpv6Ex = 8,
    Udpv6Ex = 9,
}

/// Bad RSS parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RssError {
    #[error("hash key of {0} bytes; need {MIN_KEY_LEN} to {MAX_KEY_LEN}")]
    KeyLength(usize),
    #[error("indirection table of {0} entries; need a power of two up to {MAX_TABLE_LEN}")]
    TableLength(usize),
    #[error("queue {queue} in the indirection table, but only {queues} queues")]
    QueueOutOfRange { queue: u16, queues: u16 },
}

/// A Toeplitz hash with its key folded into per-byte lookup tables: for
/// input byte `i` with value `v`, `table[i][v]` is the XOR of the 32-bit key
/// windows at the bit positions set in `v`.
#[derive(Clone)]
pub struct Toeplitz {
    table: Box<[[u32; 256]; MAX_INPUT_LEN]>,
}

impl core::fmt::Debug for Toeplitz {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Toeplitz").finish_non_exhaustive()
    }
}

/// The 32 key bits starting at bit `pos` (bit 0 = MSB of key byte 0).
fn key_window(key: &[u8], pos: usize) -> u32 {
    let byte = pos / 8;
    let mut w: u64 = 0;
    for i in 0..5 {
        w = (w << 8) | u64::from(key.get(byte + i).copied().unwrap_or(0));
    }
    (w >> (8 - pos % 8)) as u32
}

impl Toeplitz {
    pub fn new(key: &[u8]) -> Result<Toeplitz, RssError> {
        if !(MIN_KEY_LEN..=MAX_KEY_LEN).contains(&key.len()) {
            return Err(RssError::KeyLength(key.len()));
        }
        let mut table = Box::new([[0u32; 256]; MAX_INPUT_LEN]);
        for (i, row) in table.iter_mut().enumerate() {
            let windows: [u32; 8] = core::array::from_fn(|b| key_window(key, i * 8 + b));
            for (v, slot) in row.iter_mut().enumerate() {
                *slot = (0..8)
                    .filter(|b| v & (0x80 >> b) != 0)
                    .fold(0, |acc, b| acc ^ windows[b]);
            }
        }
        Ok(Toeplitz { table })
    }

    /// Hashes up to [`MAX_INPUT_LEN`] bytes (later bytes are not covered).
    #[inline]
    pub fn hash(&self, input: &[u8]) -> u32 {
        input
            .iter()
            .zip(self.table.iter())
            .fold(0, |acc, (&b, row)| acc ^ row[usize::from(b)])
    }
}

/// The definition, one bit at a time; the reference the table is checked
/// against and the baseline it is benchmarked against.
pub fn toeplitz_bitwise(key: &[u8], input: &[u8]) -> u32 {
    let mut h = 0u32;
    for (i, &b) in input.iter().enumerate() {
        for bit in 0..8 {
            if b & (0x80 >> bit) != 0 {
                h ^= key_window(key, i * 8 + bit);
            }
        }
    }
    h
}

/// The bytes a flow's hash is computed over and the type they stand for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashInput {
    buf: [u8; MAX_INPUT_LEN],
    len: u8,
    pub report: HashReport,
}

impl HashInput {
    pub fn new(
        src: IpAddr,
        dst: IpAddr,
        ports: Option<(u16, u16)>,
        report: HashReport,
    ) -> HashInput {
        let mut buf = [0u8; MAX_INPUT_LEN];
        let mut len = 0;
        let mut put = |b: &[u8]| {
            buf[len..len + b.len()].copy_from_slice(b);
            len += b.len();
        };
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                put(&s.octets());
                put(&d.octets());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                put(&s.octets());
                put(&d.octets());
            }
            _ => {}
        }
        if let Some((sp, dp)) = ports {
            put(&sp.to_be_bytes());
            put(&dp.to_be_bytes());
        }
        HashInput {
            buf,
            len: len as u8,
            report,
        }
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

/// Chooses the hash input of a parsed frame under `types`
/// (virtio 1.3 5.1.6.4.3.1-3). Fragments hash on addresses only. `None`
/// when no enabled type applies (the frame goes to the unclassified queue).
pub fn hash_input(info: &FrameInfo, types: HashTypes) -> Option<HashInput> {
    let ports = |proto: u8| {
        info.l4
            .filter(|l| l.protocol == proto)
            .map(|l| (l.src_port, l.dst_port))
    };
    match info.l3 {
        L3Info::Ipv4 { src, dst, .. } => {
            let (s, d) = (IpAddr::V4(src), IpAddr::V4(dst));
            if let Some(p) = ports(ip_proto::TCP).filter(|_| types.contains(HashTypes::TCPV4)) {
                Some(HashInput::new(s, d, Some(p), HashReport::Tcpv4))
            } else if let Some(p) =
                ports(ip_proto::UDP).filter(|_| types.contains(HashTypes::UDPV4))
            {
                Some(HashInput::new(s, d, Some(p), HashReport::Udpv4))
            } else if types.contains(HashTypes::IPV4) {
                Some(HashInput::new(s, d, None, HashReport::Ipv4))
            } else {
                None
            }
        }
        L3Info::Ipv6 { src, dst, ext, .. } => {
            let (s, d) = (IpAddr::V6(src), IpAddr::V6(dst));
            let es = IpAddr::V6(ext.home_address.unwrap_or(src));
            let ed = IpAddr::V6(ext.routing_address.unwrap_or(dst));
            let tcp = ports(ip_proto::TCP);
            let udp = ports(ip_proto::UDP);
            if let Some(p) = tcp.filter(|_| types.contains(HashTypes::TCP_EX)) {
                Some(HashInput::new(es, ed, Some(p), HashReport::Tcpv6Ex))
            } else if let Some(p) = tcp.filter(|_| types.contains(HashTypes::TCPV6)) {
                Some(HashInput::new(s, d, Some(p), HashReport::Tcpv6))
            } else if let Some(p) = udp.filter(|_| types.contains(HashTypes::UDP_EX)) {
                Some(HashInput::new(es, ed, Some(p), HashReport::Udpv6Ex))
            } else if let Some(p) = udp.filter(|_| types.contains(HashTypes::UDPV6)) {
                Some(HashInput::new(s, d, Some(p), HashReport::Udpv6))
            } else if types.contains(HashTypes::IP_EX) {
                Some(HashInput::new(es, ed, None, HashReport::Ipv6Ex))
            } else if types.contains(HashTypes::IPV6) {
                Some(HashInput::new(s, d, None, HashReport::Ipv6))
            } else {
                None
            }
        }
        L3Info::Arp | L3Info::Other => None,
    }
}

/// Maps a hash to a queue: `table[hash & (len - 1)]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndirectionTable {
    entries: Vec<u16>,
    /// The queue every entry names, when they all name one.
    single: Option<u16>,
}

impl IndirectionTable {
    /// A table of `entries` (a power of two) whose every queue is below
    /// `queues`.
    pub fn new(entries: Vec<u16>, queues: u16) -> Result<IndirectionTable, RssError> {
        let n = entries.len();
        if n == 0 || !n.is_power_of_two() || n > MAX_TABLE_LEN {
            return Err(RssError::TableLength(n));
        }
        if let Some(&queue) = entries.iter().find(|&&q| q >= queues) {
            return Err(RssError::QueueOutOfRange { queue, queues });
        }
        let single = entries
            .first()
            .copied()
            .filter(|&q| entries.iter().all(|&e| e == q));
        Ok(IndirectionTable { entries, single })
    }
    /// The table Linux fills by default (`ethtool_rxfh_indir_default`):
    /// entry i is queue i mod `queues`.
    pub fn spread(len: usize, queues: u16) -> Result<IndirectionTable, RssError> {
        let q = queues.max(1);
        let entries = (0..len).map(|i| (i % usize::from(q)) as u16).collect();
        IndirectionTable::new(entries, q)
    }
    #[inline]
    pub fn queue(&self, hash: u32) -> u16 {
        let mask = self.entries.len() - 1;
        self.entries[(hash as usize) & mask]
    }
    pub fn entries(&self) -> &[u16] {
        &self.entries
    }
    /// The queue every entry names, when they all name the same one:
    /// then no hash can send a frame elsewhere.
    pub fn single(&self) -> Option<u16> {
        self.single
    }
}

/// Where RSS sends a frame and what it reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Steering {
    pub queue: u16,
    pub hash: u32,
    pub report: HashReport,
}

/// A complete RSS configuration: key, enabled types, table and the queue
/// for frames no enabled type covers.
#[derive(Debug, Clone)]
pub struct Rss {
    toeplitz: Toeplitz,
    key: Vec<u8>,
    pub types: HashTypes,
    pub table: IndirectionTable,
    pub unclassified_queue: u16,
}

impl Rss {
    pub fn new(
        key: &[u8],
        types: HashTypes,
        table: IndirectionTable,
        unclassified_queue: u16,
    ) -> Result<Rss, RssError> {
        Ok(Rss {
            toeplitz: Toeplitz::new(key)?,
            key: key.to_vec(),
            types,
            table,
            unclassified_queue,
        })
    }
    pub fn key(&self) -> &[u8] {
        &self.key
    }
    pub fn hash(&self, info: &FrameInfo) -> Option<(u32, HashReport)> {
        let input = hash_input(info, self.types)?;
        Some((self.toeplitz.hash(input.as_bytes()), input.report))
    }
    pub fn steer(&self, info: &FrameInfo) -> Steering {
        match self.hash(info) {
            Some((hash, report)) => Steering {
                queue: self.table.queue(hash),
                hash,
                report,
            },
            None => Steering {
                queue: self.unclassified_queue,
                hash: 0,
                report: HashReport::None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use core::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::wire::{
        build::{data_segment, tcp_frame, udp_frame, Flow, IpFields},
        parse_frame,
        tcp::Flags,
    };

    // Microsoft's verification suite: (destination, dst port, source, src
    // port, hash over addresses, hash with TCP ports).
    const V4: [(&str, u16, &str, u16, u32, u32); 5] = [
        (
            "161.142.100.80",
            1766,
            "66.9.149.187",
            2794,
            0x323e8fc2,
            0x51ccc178,
        ),
        (
            "65.69.140.83",
            4739,
            "199.92.111.2",
            14230,
            0xd718262a,
            0xc626b0ea,
        ),
        (
            "12.22.207.184",
            38024,
            "24.19.198.95",
            12898,
            0xd2d0a5de,
            0x5c2b394a,
        ),
        (
            "209.142.163.6",
            2217,
            "38.27.205.30",
            48228,
            0x82989176,
            0xafc7327f,
        ),
        (
            "202.188.127.2",
            1303,
            "153.39.163.191",
            44251,
            0x5d1809c5,
            0x10e828a2,
        ),
    ];
    const V6: [(&str, u16, &str, u16, u32, u32); 3] = [
        (
            "3ffe:2501:200:3::1",
            1766,
            "3ffe:2501:200:1fff::7",
            2794,
            0x2cc18cd5,
            0x40207d3d,
        ),
        (
            "ff02::1",
            4739,
            "3ffe:501:8::260:97ff:fe40:efab",
            14230,
            0x0f0c461c,
            0xdde51bbf,
        ),
        (
            "fe80::200:f8ff:fe21:67cf",
            38024,
            "3ffe:1900:4545:3:200:f8ff:fe21:67cf",
            44251,
            0x4b61e985,
            0x02d1feef,
        ),
    ];

    fn flow(src: IpAddr, sp: u16, dst: IpAddr, dp: u16) -> Flow {
        Flow {
            src_ip: src,
            dst_ip: dst,
            src_port: sp,
            dst_port: dp,
            ..Flow::v4()
        }
    }

    fn tcp(f: &Flow) -> FrameInfo {
        let fr = tcp_frame(
            f,
            data_segment(1, 1, Flags::ACK),
            &IpFields::default(),
            b"x",
        )
        .unwrap();
        parse_frame(&fr).unwrap()
    }

    fn rss(types: HashTypes) -> Rss {
        Rss::new(
            &DEFAULT_KEY,
            types,
            IndirectionTable::spread(128, 4).unwrap(),
            0,
        )
        .unwrap()
    }

    #[test]
    fn a_table_naming_one_queue_says_so() {
        assert_eq!(IndirectionTable::spread(128, 1).unwrap().single(), Some(0));
        assert_eq!(IndirectionTable::spread(128, 2).unwrap().single(), None);
        assert_eq!(
            IndirectionTable::new(vec![3; 4], 4).unwrap().single(),
            Some(3)
        );
        let mut e = vec![3u16; 4];
        e[3] = 2;
        assert_eq!(IndirectionTable::new(e, 4).unwrap().single(), None);
    }

    #[test]
    fn microsoft_vectors_ipv4() {
        let t = Toeplitz::new(&DEFAULT_KEY).unwrap();
        for (dst, dp, src, sp, ip_only, with_tcp) in V4 {
            let s: Ipv4Addr = src.parse().unwrap();
            let d: Ipv4Addr = dst.parse().unwrap();
            let f = flow(s.into(), sp, d.into(), dp);
            let info = tcp(&f);
            let r = rss(HashTypes::IPV4 | HashTypes::TCPV4);
            assert_eq!(r.hash(&info), Some((with_tcp, HashReport::Tcpv4)), "{src}");
            let r = rss(HashTypes::IPV4);
            assert_eq!(r.hash(&info), Some((ip_only, HashReport::Ipv4)), "{src}");
            let mut input = s.octets().to_vec();
            input.extend_from_slice(&d.octets());
            assert_eq!(t.hash(&input), ip_only);
            assert_eq!(toeplitz_bitwise(&DEFAULT_KEY, &input), ip_only);
        }
    }

    #[test]
    fn microsoft_vectors_ipv6() {
        for (dst, dp, src, sp, ip_only, with_tcp) in V6 {
            let s: Ipv6Addr = src.parse().unwrap();
            let d: Ipv6Addr = dst.parse().unwrap();
            let info = tcp(&flow(s.into(), sp, d.into(), dp));
            let r = rss(HashTypes::IPV6 | HashTypes::TCPV6);
            assert_eq!(r.hash(&info), Some((with_tcp, HashReport::Tcpv6)), "{src}");
            let r = rss(HashTypes::IPV6);
            assert_eq!(r.hash(&info), Some((ip_only, HashReport::Ipv6)), "{src}");
            // With no extension headers the _EX types hash the same bytes.
            let r = rss(HashTypes::TCP_EX);
            assert_eq!(r.hash(&info), Some((with_tcp, HashReport::Tcpv6Ex)));
        }
    }

    #[test]
    fn table_matches_bitwise_for_long_keys_and_random_inputs() {
        let mut st = 7u64;
        let mut rnd = || {
            st ^= st << 13;
            st ^= st >> 7;
            st ^= st << 17;
            st as u8
        };
        let key: Vec<u8> = (0..52).map(|_| rnd()).collect();
        let t = Toeplitz::new(&key).unwrap();
        for len in [8, 12, 32, 36] {
            let input: Vec<u8> = (0..len).map(|_| rnd()).collect();
            assert_eq!(t.hash(&input), toeplitz_bitwise(&key, &input));
        }
        assert_eq!(
            Toeplitz::new(&key[..39]).unwrap_err(),
            RssError::KeyLength(39)
        );
    }

    #[test]
    fn type_selection() {
        let info =
            parse_frame(&udp_frame(&Flow::v4(), &IpFields::default(), b"u").unwrap()).unwrap();
        assert_eq!(
            rss(HashTypes::LINUX_DEFAULT).hash(&info).unwrap().1,
            HashReport::Udpv4
        );
        // UDP not enabled: falls back to addresses.
        assert_eq!(
            rss(HashTypes::IPV4 | HashTypes::TCPV4)
                .hash(&info)
                .unwrap()
                .1,
            HashReport::Ipv4
        );
        // Nothing for IPv4 enabled: unclassified.
        let r = Rss::new(
            &DEFAULT_KEY,
            HashTypes::IPV6,
            IndirectionTable::spread(8, 4).unwrap(),
            3,
        )
        .unwrap();
        assert_eq!(
            r.steer(&info),
            Steering {
                queue: 3,
                hash: 0,
                report: HashReport::None
            }
        );
        let info6 =
            parse_frame(&udp_frame(&Flow::v6(), &IpFields::default(), b"u").unwrap()).unwrap();
        assert_eq!(
            rss(HashTypes::LINUX_DEFAULT).hash(&info6).unwrap().1,
            HashReport::Udpv6
        );
        assert_eq!(
            rss(HashTypes::UDP_EX).hash(&info6).unwrap().1,
            HashReport::Udpv6Ex
        );
        assert_eq!(
            rss(HashTypes::IP_EX).hash(&info6).unwrap().1,
            HashReport::Ipv6Ex
        );
    }

    #[test]
    fn fragments_hash_on_addresses() {
        let mut f = udp_frame(&Flow::v4(), &IpFields::default(), &[0; 64]).unwrap();
        f[20] |= 0x20; // more fragments
        let sum_off = 24;
        f[sum_off] = 0;
        f[sum_off + 1] = 0;
        let c = crate::checksum::checksum(&f[14..34]);
        f[sum_off..sum_off + 2].copy_from_slice(&c.to_be_bytes());
        let info = parse_frame(&f).unwrap();
        assert!(info.l3.is_fragment());
        let (h, rep) = rss(HashTypes::LINUX_DEFAULT).hash(&info).unwrap();
        assert_eq!(rep, HashReport::Ipv4);
        let input = [192, 0, 2, 1, 192, 0, 2, 2];
        assert_eq!(h, toeplitz_bitwise(&DEFAULT_KEY, &input));
    }

    #[test]
    fn indirection() {
        let t = IndirectionTable::new(vec![3, 2, 1, 0], 4).unwrap();
        assert_eq!(t.queue(0x51ccc178), [3, 2, 1, 0][0x51ccc178 & 3]);
        assert_eq!(
            IndirectionTable::new(vec![0; 3], 4),
            Err(RssError::TableLength(3))
        );
        assert_eq!(
            IndirectionTable::new(vec![], 4),
            Err(RssError::TableLength(0))
        );
        assert_eq!(
            IndirectionTable::new(vec![0, 4], 4),
            Err(RssError::QueueOutOfRange {
                queue: 4,
                queues: 4
            })
        );
        assert_eq!(
            IndirectionTable::spread(8, 3).unwrap().entries(),
            &[0, 1, 2, 0, 1, 2, 0, 1]
        );
    }
}
