//! The neighbour cache: ARP for IPv4, neighbour discovery for IPv6.
//! Entries are reachable for [`REACHABLE`] after they were learnt, then
//! stale: still used, but the next use asks again. Frames for an address
//! being resolved wait in a short queue.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use vnic_protocol::{virtio::VirtioNetHdr, wire::ethernet::Address};

/// How long a learnt address is trusted without asking again.
pub const REACHABLE: Duration = Duration::from_secs(30);
/// Least time between two requests for one address.
pub const RETRY: Duration = Duration::from_millis(500);
/// Frames held per unresolved address.
pub const PENDING_MAX: usize = 16;

#[derive(Debug, Clone, Copy)]
struct Entry {
    mac: Option<Address>,
    learnt: Instant,
    asked: Option<Instant>,
}

/// What a lookup says to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Send to this address; `refresh` asks the peer again as well.
    Known { mac: Address, refresh: bool },
    /// Unknown: hold the frame; `ask` sends a request now.
    Unknown { ask: bool },
}

/// A frame waiting for its destination address (bytes 0..6 are written
/// once it is known).
pub type Held = (VirtioNetHdr, Vec<u8>);

#[derive(Debug, Default)]
pub struct Neighbours {
    map: HashMap<IpAddr, Entry>,
    pending: HashMap<IpAddr, Vec<Held>>,
    /// Frames dropped because the queue of an address was full.
    pub dropped: u64,
    pub requests: u64,
}

impl Neighbours {
    pub fn lookup(&mut self, ip: IpAddr, now: Instant) -> Lookup {
        let e = self.map.entry(ip).or_insert(Entry {
            mac: None,
            learnt: now,
            asked: None,
        });
        let may_ask = e.asked.is_none_or(|t| now.duration_since(t) >= RETRY);
        let ask = match e.mac {
            Some(_) => now.duration_since(e.learnt) >= REACHABLE && may_ask,
            None => may_ask,
        };
        if ask {
            e.asked = Some(now);
            self.requests += 1;
        }
        match e.mac {
            Some(mac) => Lookup::Known { mac, refresh: ask },
            None => Lookup::Unknown { ask },
        }
    }

    /// Holds a frame until `ip` resolves.
    pub fn hold(&mut self, ip: IpAddr, frame: Held) {
        let q = self.pending.entry(ip).or_default();
        if q.len() >= PENDING_MAX {
            self.dropped += 1;
            return;
        }
        q.push(frame);
    }

    /// Records `ip` at `mac`; returns the frames that waited for it with
    /// their destination filled in.
    pub fn learn(&mut self, ip: IpAddr, mac: Address, now: Instant) -> Vec<Held> {
        if !mac.is_unicast() {
            return Vec::new();
        }
        self.map.insert(
            ip,
            Entry {
                mac: Some(mac),
                learnt: now,
                asked: None,
            },
        );
        let mut held = self.pending.remove(&ip).unwrap_or_default();
        for (_, f) in &mut held {
            if let Some(d) = f.get_mut(..6) {
                d.copy_from_slice(mac.as_bytes());
            }
        }
        held
    }

    /// Updates an entry that exists (what a request from the peer tells,
    /// RFC 826 "merge").
    pub fn refresh(&mut self, ip: IpAddr, mac: Address, now: Instant) -> Vec<Held> {
        if self.map.contains_key(&ip) {
            self.learn(ip, mac, now)
        } else {
            Vec::new()
        }
    }

    pub fn get(&self, ip: IpAddr) -> Option<Address> {
        self.map.get(&ip).and_then(|e| e.mac)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn unknown_then_learnt_then_stale() {
        let mut n = Neighbours::default();
        let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        let t = Instant::now();
        assert_eq!(n.lookup(ip, t), Lookup::Unknown { ask: true });
        // Asked just now: no second request before RETRY.
        assert_eq!(n.lookup(ip, t), Lookup::Unknown { ask: false });
        n.hold(ip, (VirtioNetHdr::default(), vec![0; 20]));
        let mac = Address([2, 0, 0, 0, 0, 9]);
        let held = n.learn(ip, mac, t);
        assert_eq!(held.len(), 1);
        assert_eq!(&held[0].1[..6], mac.as_bytes());
        assert_eq!(
            n.lookup(ip, t),
            Lookup::Known {
                mac,
                refresh: false
            }
        );
        let later = t + REACHABLE + Duration::from_secs(1);
        assert_eq!(n.lookup(ip, later), Lookup::Known { mac, refresh: true });
        assert_eq!(
            n.lookup(ip, later),
            Lookup::Known {
                mac,
                refresh: false
            }
        );
    }

    #[test]
    fn pending_queue_is_bounded() {
        let mut n = Neighbours::default();
        let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        for _ in 0..PENDING_MAX + 3 {
            n.hold(ip, (VirtioNetHdr::default(), vec![0; 20]));
        }
        assert_eq!(n.dropped, 3);
    }
}
