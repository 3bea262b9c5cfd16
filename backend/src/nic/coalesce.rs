//! Used-buffer notification coalescing, per virtqueue (virtio 1.3, 5.1.6.5.6
//! "Notifications Coalescing"), and the adaptive mode that picks the
//! parameters from the traffic.
//!
//! Everything here is pure: times are nanoseconds on the NIC's clock,
//! passed in. The vhost worker asks [`QueueCoal::used`] after each batch it
//! put in a used ring, signals the driver on [`Verdict::Notify`], and on
//! [`Verdict::Hold`] arms its timer for the deadline; when the timer fires
//! it asks [`QueueCoal::check`] again.

use vnic_protocol::virtio::ctrl::Coal;

/// What a queue's held notification should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing is held.
    Idle,
    /// Signal the driver now.
    Notify,
    /// Hold until this time (ns), unless more buffers make it due sooner.
    Hold { deadline: u64 },
}

/// Why a held notification went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// `max_packets` buffers were used (or coalescing is off).
    Packets,
    /// `max_usecs` passed since the first held buffer.
    Timer,
    /// The device cannot go on without the driver (out of RX buffers).
    Starved,
}

/// Coalescing settings of one direction, as `ethtool -C` gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DirCoal {
    pub coal: Coal,
    pub adaptive: bool,
}

/// A port's coalescing settings: what TX_SET and RX_SET (or the
/// administrator) last gave. A queue that is re-enabled takes these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CoalConfig {
    pub rx: DirCoal,
    pub tx: DirCoal,
}

impl CoalConfig {
    /// The settings of virtqueue `vq` (even: RX, odd: TX).
    pub fn for_vq(&self, vq: usize) -> DirCoal {
        if vq % 2 == 0 {
            self.rx
        } else {
            self.tx
        }
    }

    /// Parses `rx-usecs=U,rx-frames=N,tx-usecs=U,tx-frames=N,adaptive-rx=on|off,
    /// adaptive-tx=on|off` (any subset, in any order) over `self`.
    pub fn parse_over(mut self, s: &str) -> Result<CoalConfig, String> {
        for kv in s.split(',').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("`{kv}`: expected KEY=VALUE"))?;
            self.set(k, v)?;
        }
        Ok(self)
    }

    /// Sets one `ethtool -C` key (`rx-usecs`, `rx-frames`, `tx-usecs`,
    /// `tx-frames`, `adaptive-rx`, `adaptive-tx`).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let num = || {
            value
                .parse::<u32>()
                .map_err(|_| format!("{key}: `{value}` is not a count"))
        };
        let flag = || match value {
            "on" => Ok(true),
            "off" => Ok(false),
            _ => Err(format!("{key}: `{value}` is neither on nor off")),
        };
        match key {
            "rx-usecs" => self.rx.coal.max_usecs = num()?,
            "rx-frames" => self.rx.coal.max_packets = num()?,
            "tx-usecs" => self.tx.coal.max_usecs = num()?,
            "tx-frames" => self.tx.coal.max_packets = num()?,
            "adaptive-rx" => self.rx.adaptive = flag()?,
            "adaptive-tx" => self.tx.adaptive = flag()?,
            _ => {
                return Err(format!(
                    "unknown coalescing key `{key}` (rx-usecs, rx-frames, tx-usecs, \
                     tx-frames, adaptive-rx, adaptive-tx)"
                ))
            }
        }
        Ok(())
    }
}

/// The adaptive profiles, lowest latency first: net_dim's EQE tables
/// (lib/dim/net_dim.c) but for the first, which notifies per packet so
/// that a lone request sees no delay at all.
const RX_PROFILES: [Coal; 5] = [
    Coal {
        max_packets: 0,
        max_usecs: 0,
    },
    Coal {
        max_packets: 256,
        max_usecs: 8,
    },
    Coal {
        max_packets: 256,
        max_usecs: 64,
    },
    Coal {
        max_packets: 256,
        max_usecs: 128,
    },
    Coal {
        max_packets: 256,
        max_usecs: 256,
    },
];
const TX_PROFILES: [Coal; 5] = [
    Coal {
        max_packets: 0,
        max_usecs: 0,
    },
    Coal {
        max_packets: 128,
        max_usecs: 8,
    },
    Coal {
        max_packets: 128,
        max_usecs: 32,
    },
    Coal {
        max_packets: 128,
        max_usecs: 64,
    },
    Coal {
        max_packets: 128,
        max_usecs: 128,
    },
];

/// Packet rates (per second) above which the adaptive mode moves from
/// profile `i` to `i + 1`; it moves back below half of the rate that
/// brought it up (hysteresis).
const UP_RATE: [u64; 4] = [10_000, 40_000, 120_000, 300_000];
/// The adaptive mode measures the packet rate over windows this long.
pub const WINDOW_NS: u64 = 1_000_000;
/// A queue idle for this long starts again at the lowest-latency profile.
const IDLE_NS: u64 = 8 * WINDOW_NS;

/// The adaptive mode's state: the packet rate, smoothed over windows, and
/// the profile it chose (in the manner of net_dim and VMware's vIC: the
/// device picks from what it sees, with no help from the driver).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Dim {
    /// Index into the profile table.
    pub level: usize,
    /// Smoothed packets per second.
    pub rate: u64,
    window_start: u64,
    window_packets: u64,
}

impl Dim {
    fn sample(&mut self, n: u32, now: u64) {
        let elapsed = now.saturating_sub(self.window_start);
        if elapsed >= IDLE_NS {
            // After a pause: the next packet is a request, not a stream.
            *self = Dim {
                window_start: now,
                window_packets: u64::from(n),
                ..Dim::default()
            };
            return;
        }
        self.window_packets += u64::from(n);
        if elapsed < WINDOW_NS {
            return;
        }
        let now_rate = self.window_packets.saturating_mul(1_000_000_000) / elapsed;
        // An average that gives the newest window a half: quick enough to
        // follow a transfer that starts, smooth enough to ride out one
        // odd window.
        self.rate = (self.rate + now_rate) / 2;
        if self.level < UP_RATE.len() && self.rate > UP_RATE[self.level] {
            self.level += 1;
        } else if self.level > 0 && self.rate < UP_RATE[self.level - 1] / 2 {
            self.level -= 1;
        }
        self.window_start = now;
        self.window_packets = 0;
    }
}

/// One virtqueue's coalescing: its parameters and the notification it
/// holds.
#[derive(Debug, Clone, Default)]
pub struct QueueCoal {
    /// The parameters last set for the queue (what VQ_GET reads back).
    pub set: Coal,
    /// Whether the device picks the parameters itself.
    pub adaptive: bool,
    /// A TX queue's (odd virtqueue's) profiles, rather than RX's.
    tx: bool,
    pub dim: Dim,
    /// Buffers used since the driver was last signalled.
    pending: u32,
    /// When the first of them was used.
    since: Option<u64>,
}

impl QueueCoal {
    /// Virtqueue `vq`'s coalescing under `config`.
    pub fn new(vq: usize, config: &CoalConfig) -> QueueCoal {
        let d = config.for_vq(vq);
        QueueCoal {
            set: d.coal,
            adaptive: d.adaptive,
            tx: vq % 2 == 1,
            ..QueueCoal::default()
        }
    }

    /// The parameters in force: those set, or the adaptive profile's.
    pub fn in_force(&self) -> Coal {
        if self.adaptive {
            let table = if self.tx { &TX_PROFILES } else { &RX_PROFILES };
            table[self.dim.level.min(table.len() - 1)]
        } else {
            self.set
        }
    }

    /// Buffers used but not yet signalled.
    pub fn pending(&self) -> u32 {
        self.pending
    }

    /// `n` more buffers were used at `now`: whether to signal now.
    pub fn used(&mut self, n: u32, now: u64) -> Verdict {
        if n > 0 {
            if self.adaptive {
                self.dim.sample(n, now);
            }
            self.pending = self.pending.saturating_add(n);
            self.since.get_or_insert(now);
        }
        self.check(now)
    }

    /// Whether what is held is due at `now`.
    pub fn check(&self, now: u64) -> Verdict {
        let Some(since) = self.since else {
            return Verdict::Idle;
        };
        let c = self.in_force();
        if c.max_packets == 0 || c.max_usecs == 0 || self.pending >= c.max_packets {
            return Verdict::Notify;
        }
        let deadline = since.saturating_add(u64::from(c.max_usecs) * 1000);
        if now >= deadline {
            Verdict::Notify
        } else {
            Verdict::Hold { deadline }
        }
    }

    /// Why a [`Verdict::Notify`] at `now` is due.
    pub fn reason(&self, now: u64) -> Flush {
        let c = self.in_force();
        if c.max_packets == 0 || c.max_usecs == 0 || self.pending >= c.max_packets {
            return Flush::Packets;
        }
        match self.since {
            Some(s) if now >= s.saturating_add(u64::from(c.max_usecs) * 1000) => Flush::Timer,
            _ => Flush::Starved,
        }
    }

    /// The driver was signalled (or did not want to be) at `now`: how long
    /// the oldest buffer waited.
    pub fn notified(&mut self, now: u64) -> u64 {
        let held = self.since.map_or(0, |s| now.saturating_sub(s));
        self.pending = 0;
        self.since = None;
        held
    }

    /// New parameters from the driver or the administrator; what is held
    /// stays held, and is checked against them (the caller asks
    /// [`QueueCoal::check`], which may say it is due now).
    pub fn configure(&mut self, d: DirCoal) {
        self.set = d.coal;
        if d.adaptive && !self.adaptive {
            self.dim = Dim::default();
        }
        self.adaptive = d.adaptive;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: u64 = 1000;

    fn coal(max_packets: u32, max_usecs: u32) -> DirCoal {
        DirCoal {
            coal: Coal {
                max_packets,
                max_usecs,
            },
            adaptive: false,
        }
    }

    fn queue(max_packets: u32, max_usecs: u32) -> QueueCoal {
        let mut q = QueueCoal::new(0, &CoalConfig::default());
        q.configure(coal(max_packets, max_usecs));
        q
    }

    #[test]
    fn zero_in_either_field_notifies_every_packet() {
        for (p, u) in [(0, 0), (0, 100), (16, 0)] {
            let mut q = queue(p, u);
            assert_eq!(q.used(1, 0), Verdict::Notify, "({p}, {u})");
            assert_eq!(q.notified(0), 0);
            assert_eq!(q.check(5), Verdict::Idle);
        }
    }

    /// The spec's example: max_packets 15, max_usecs 10. Ten packets in,
    /// the notification waits; at 10 µs after the first it goes out.
    #[test]
    fn the_first_condition_met_sends_it() {
        let mut q = queue(15, 10);
        for t in 0..10 {
            assert_eq!(q.used(1, t * 100), Verdict::Hold { deadline: 10 * US });
        }
        assert_eq!(q.check(10 * US - 1), Verdict::Hold { deadline: 10 * US });
        assert_eq!(q.check(10 * US), Verdict::Notify);
        assert_eq!(q.reason(10 * US), Flush::Timer);
        assert_eq!(q.notified(10 * US + 500), 10 * US + 500);
        // Fifteen packets within the time: sent at the fifteenth.
        for n in 1..15 {
            assert!(matches!(q.used(1, 20 * US), Verdict::Hold { .. }), "{n}");
        }
        assert_eq!(q.used(1, 21 * US), Verdict::Notify);
        assert_eq!(q.reason(21 * US), Flush::Packets);
        // The clock starts again at the next packet, not at the last
        // notification.
        q.notified(21 * US);
        assert_eq!(q.used(1, 500 * US), Verdict::Hold { deadline: 510 * US });
    }

    /// The spec's example: ten packets held, then max_packets set to 8:
    /// the device notifies at once.
    #[test]
    fn a_change_that_makes_held_work_due_notifies_at_once() {
        let mut q = queue(16, 1000);
        assert!(matches!(q.used(10, 0), Verdict::Hold { .. }));
        q.configure(coal(8, 1000));
        assert_eq!(q.check(1), Verdict::Notify);
        // Shortening the time past what was held does the same.
        q.notified(1);
        assert!(matches!(q.used(1, 100 * US), Verdict::Hold { .. }));
        q.configure(coal(16, 50));
        assert_eq!(q.check(151 * US), Verdict::Notify);
        // And turning coalescing off.
        q.notified(151 * US);
        assert!(matches!(q.used(1, 200 * US), Verdict::Hold { .. }));
        q.configure(coal(0, 0));
        assert_eq!(q.check(200 * US), Verdict::Notify);
    }

    #[test]
    fn settings_parse_in_ethtool_names_and_refuse_the_rest() {
        let c = CoalConfig::default()
            .parse_over("rx-usecs=200,rx-frames=64,adaptive-tx=on")
            .unwrap();
        assert_eq!(c.rx.coal.max_usecs, 200);
        assert_eq!(c.rx.coal.max_packets, 64);
        assert!(c.tx.adaptive && !c.rx.adaptive);
        assert_eq!(c.for_vq(3), c.tx);
        assert_eq!(c.for_vq(2), c.rx);
        for bad in ["rx-usecs", "rx-usecs=-1", "adaptive-rx=yes", "rx-msecs=4"] {
            assert!(CoalConfig::default().parse_over(bad).is_err(), "{bad}");
        }
    }

    /// A queue that is idle notifies per packet in adaptive mode; a steady
    /// stream moves it up the profiles, and a pause brings it back.
    #[test]
    fn adaptive_follows_the_packet_rate() {
        let mut q = QueueCoal::new(
            0,
            &CoalConfig {
                rx: DirCoal {
                    coal: Coal::default(),
                    adaptive: true,
                },
                ..CoalConfig::default()
            },
        );
        // A ping a second: every one notified at once.
        for s in 0..5u64 {
            assert_eq!(q.used(1, s * 1_000_000_000), Verdict::Notify);
            q.notified(s * 1_000_000_000);
            assert_eq!(q.dim.level, 0);
        }
        // 1 Mpps, in batches of 16: up to the top profile within a few
        // windows, where it holds.
        let start = 10_000_000_000u64;
        let mut t = start;
        let mut notes = 0;
        while t < start + 20 * WINDOW_NS {
            if q.used(16, t) == Verdict::Notify {
                q.notified(t);
                notes += 1;
            }
            if let Verdict::Hold { deadline } = q.check(t + 16 * US) {
                if deadline <= t + 16 * US {
                    q.notified(t + 16 * US);
                    notes += 1;
                }
            }
            t += 16 * US;
        }
        assert_eq!(q.dim.level, RX_PROFILES.len() - 1, "rate {}", q.dim.rate);
        assert_eq!(q.in_force(), RX_PROFILES[4]);
        // 20 ms of 1 Mpps is 20000 packets; per packet that would be 1250
        // batches' worth of notifications, far fewer with coalescing.
        assert!(notes < 1250 / 2, "{notes} notifications");
        // A pause, then one packet: per packet again.
        assert_eq!(q.used(1, t + 50 * WINDOW_NS), Verdict::Notify);
        assert_eq!(q.dim.level, 0);
    }

    #[test]
    fn adaptive_moves_one_profile_per_window_with_hysteresis() {
        let mut d = Dim::default();
        // 50 kpps: above the first two steps' rates, one step a window.
        let mut t = 0;
        let mut levels = Vec::new();
        for _ in 0..8 {
            for _ in 0..50 {
                d.sample(1, t);
                t += 20 * US;
            }
            levels.push(d.level);
        }
        // A window closes at the first packet past its millisecond.
        assert_eq!(levels[..2], [0, 1], "{levels:?}");
        assert_eq!(*levels.last().unwrap(), 2, "{levels:?}");
        assert!(levels.windows(2).all(|w| w[1] <= w[0] + 1), "{levels:?}");
        // 25 kpps: not below half of 40k, so it stays at 2... and at 15
        // kpps it falls back to 1.
        for _ in 0..8 {
            for _ in 0..25 {
                d.sample(1, t);
                t += 40 * US;
            }
        }
        assert_eq!(d.level, 2, "rate {}", d.rate);
        for _ in 0..8 {
            for _ in 0..15 {
                d.sample(1, t);
                t += 66 * US;
            }
        }
        assert_eq!(d.level, 1, "rate {}", d.rate);
    }
}
