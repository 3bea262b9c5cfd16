//! One virtio-net function of the NIC: the PF or a VF. Its queues'
//! backlogs and counters, the state its control queue changes, its
//! administrative settings and its transmit rate limiter.

use std::{
    io,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Mutex, MutexGuard, PoisonError,
    },
};

use vnic_protocol::virtio::Features;

use super::{
    coalesce::{CoalConfig, QueueCoal},
    ctrl::CtrlState,
    vf::{TokenBucket, VfSettings},
    Backlog, DeviceConfig, DropReason, QueueSet, RxHandle, Stats, BACKLOG_BYTES, BACKLOG_FRAMES,
};
use crate::uplink::Offloads;

/// One port.
#[derive(Debug)]
pub struct Port {
    /// 0 is the PF, 1 + n is VF n.
    pub id: usize,
    pub config: DeviceConfig,
    pub stats: Stats,
    ctrl: Mutex<CtrlState>,
    settings: Mutex<VfSettings>,
    /// Features the driver accepted.
    acked: AtomicU64,
    /// The receive offloads in force: those accepted, or what
    /// GUEST_OFFLOADS_SET chose since (as guest feature bits).
    rx_features: AtomicU64,
    attached: AtomicBool,
    /// RX queues a frame may be steered to, as the frontend enabled them
    /// (bit i: queue i); kept by the port's vhost workers.
    pub enabled_rx: AtomicU32,
    /// `max_tx_rate`, when set.
    bucket: Mutex<Option<TokenBucket>>,
    /// The frontend's receive side, for direct delivery.
    rx_path: Mutex<Option<RxHandle>>,
    /// Per RX queue: frames waiting for it.
    pub backlogs: Vec<Backlog>,
    /// Per virtqueue (2i RX, 2i+1 TX): its notification coalescing.
    coal: Vec<Mutex<QueueCoal>>,
    /// Receive segment coalescing, as the administrator set it.
    rsc: AtomicBool,
}

impl Port {
    pub fn new(id: usize, config: DeviceConfig, settings: VfSettings) -> io::Result<Port> {
        let pairs = usize::from(config.pairs);
        let rss = config
            .build_rss()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let backlogs = (0..pairs)
            .map(|_| Backlog::new(BACKLOG_FRAMES, BACKLOG_BYTES))
            .collect::<io::Result<_>>()?;
        Ok(Port {
            id,
            stats: Stats::new(pairs),
            ctrl: Mutex::new(CtrlState::new(settings.mac, &config, rss)),
            rsc: AtomicBool::new(config.rx_gro_hw),
            coal: (0..2 * pairs)
                .map(|vq| Mutex::new(QueueCoal::new(vq, &config.coalesce)))
                .collect(),
            // The NIC's clock starts near 0 as it is made.
            bucket: Mutex::new(
                (settings.max_tx_rate > 0).then(|| TokenBucket::new(settings.max_tx_rate, 0)),
            ),
            settings: Mutex::new(settings),
            rx_path: Mutex::new(None),
            acked: AtomicU64::new(0),
            rx_features: AtomicU64::new(0),
            attached: AtomicBool::new(false),
            enabled_rx: AtomicU32::new(1),
            backlogs,
            config,
        })
    }

    /// `vf<n>` for a VF, `pf` for the PF.
    pub fn name(&self) -> String {
        match self.id {
            0 => "pf".to_owned(),
            n => format!("vf{}", n - 1),
        }
    }

    /// The state the control queue changes.
    pub fn ctrl_state(&self) -> MutexGuard<'_, CtrlState> {
        self.ctrl.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn settings(&self) -> MutexGuard<'_, VfSettings> {
        self.settings.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn bucket(&self) -> MutexGuard<'_, Option<TokenBucket>> {
        self.bucket.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Virtqueue `vq`'s notification coalescing (2i RX, 2i+1 TX).
    pub fn coalescer(&self, vq: usize) -> Option<MutexGuard<'_, QueueCoal>> {
        self.coal
            .get(vq)
            .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Every virtqueue back to `config`, nothing held (a reset).
    pub(super) fn reset_coalescing(&self, config: &CoalConfig) {
        self.restore_coalescing(0, config);
    }

    /// Virtqueues `from` on back to `config`'s values, nothing held.
    pub(super) fn restore_coalescing(&self, from: usize, config: &CoalConfig) {
        for vq in from..self.coal.len() {
            if let Some(mut q) = self.coalescer(vq) {
                *q = QueueCoal::new(vq, config);
            }
        }
    }

    pub fn acked(&self) -> Features {
        Features::from_bits_retain(self.acked.load(Ordering::Acquire))
    }

    pub(super) fn set_acked(&self, f: Features) {
        self.acked.store(f.bits(), Ordering::Release);
        self.rx_features.store(f.bits(), Ordering::Release);
    }

    pub(super) fn set_rx_features(&self, f: Features) {
        self.rx_features.store(f.bits(), Ordering::Release);
    }

    pub(super) fn rx_path(&self) -> Option<RxHandle> {
        self.rx_path
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(super) fn set_rx_path(&self, rx: Option<RxHandle>) {
        *self.rx_path.lock().unwrap_or_else(PoisonError::into_inner) = rx;
    }

    /// Records which RX queues the frontend has set up and enabled (bit i:
    /// queue i, as the vhost layer sees its vrings) and returns those
    /// frames may go to: within the pairs the driver asked for.
    pub fn set_enabled_rx(&self, vrings: u32) -> QueueSet {
        let pairs = self.ctrl_state().active_pairs.max(1).min(self.config.pairs);
        let set = vrings & pair_mask(pairs);
        self.enabled_rx.store(set, Ordering::Relaxed);
        QueueSet(set)
    }

    /// The RX queue for a frame RSS sent to queue `steered`, among those
    /// enabled; `fallback` when none is.
    pub fn rx_queue(&self, steered: usize, fallback: usize) -> usize {
        QueueSet(self.enabled_rx.load(Ordering::Relaxed)).pick(steered, fallback)
    }

    /// Queues a frame (12-byte header first) for RX queue `q` and wakes
    /// its worker if the backlog was empty; a full backlog drops it
    /// (`rx_no_buffers`).
    pub fn hand_over(&self, q: usize, frame: &[u8]) {
        let Some(b) = self.backlogs.get(q) else {
            return;
        };
        if !b.push_and_wake(frame.len(), |v| v.extend_from_slice(frame)) {
            log::debug!("{} rx{q}: backlog full, frame dropped", self.name());
            self.stats.rx[q].drop(DropReason::RxNoBuffers);
        }
    }

    /// Moves up to `budget` frames waiting for RX queue `from` (which the
    /// frontend turned off) to an enabled queue, or drops and counts them
    /// when none is. Never holds two backlog locks at once.
    pub fn redirect_backlog(&self, from: usize, budget: usize) {
        let to = self.rx_queue(from, usize::MAX);
        let (Some(backlog), Some(stats)) = (self.backlogs.get(from), self.stats.rx.get(from))
        else {
            return;
        };
        if to == from {
            return;
        }
        let mut frame = Vec::new();
        for _ in 0..budget {
            let moved = backlog.deliver_front(|f| {
                frame.clear();
                frame.extend_from_slice(f);
                true
            });
            if moved.is_none() {
                break;
            }
            match to {
                usize::MAX => stats.drop(DropReason::RxNoBuffers),
                t => self.hand_over(t, &frame),
            }
        }
    }

    /// Keeps the switch off RX queues at or past `pairs` (the driver
    /// turned them off); the workers add the ones it turns on.
    pub fn limit_rx_queues(&self, pairs: u16) {
        self.enabled_rx
            .fetch_and(pair_mask(pairs), Ordering::AcqRel);
    }

    pub fn is_attached(&self) -> bool {
        self.attached.load(Ordering::Acquire)
    }

    pub(super) fn set_attached(&self, on: bool) {
        self.attached.store(on, Ordering::Release);
    }

    /// Whether the administrator turned receive segment coalescing on.
    pub fn rsc_on(&self) -> bool {
        self.rsc.load(Ordering::Relaxed)
    }

    pub(super) fn set_rsc(&self, on: bool) {
        self.rsc.store(on, Ordering::Relaxed);
    }

    /// Whether received TCP segments are coalesced now: turned on, and the
    /// driver takes TCP GSO frames of both families with their checksums
    /// (GUEST_CSUM, GUEST_TSO4, GUEST_TSO6, as GUEST_OFFLOADS_SET left
    /// them).
    pub fn rsc_active(&self) -> bool {
        let c = self.rx_caps();
        self.rsc_on() && c.csum && c.tso4 && c.tso6
    }

    /// The receive offloads in force.
    pub fn rx_caps(&self) -> Offloads {
        rx_offloads(Features::from_bits_retain(
            self.rx_features.load(Ordering::Acquire),
        ))
    }
}

/// Bits 0 to `pairs - 1`.
fn pair_mask(pairs: u16) -> u32 {
    if pairs >= 32 {
        u32::MAX
    } else {
        (1u32 << pairs) - 1
    }
}

/// The receive offloads a set of guest features allows.
pub fn rx_offloads(f: Features) -> Offloads {
    let csum = f.contains(Features::GUEST_CSUM);
    Offloads {
        csum,
        tso4: csum && f.contains(Features::GUEST_TSO4),
        tso6: csum && f.contains(Features::GUEST_TSO6),
        tso_ecn: csum && f.contains(Features::GUEST_ECN),
        uso: csum && f.contains(Features::GUEST_USO4 | Features::GUEST_USO6),
    }
}
