//! Top: a shard's thread. One queue pair: NAPI-style receive into the
//! input layer, frames handed over by other shards, connection timers,
//! then sleep on the interrupts until the next timer.

use std::{
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use log::warn;
use vnic_protocol::tcp;

use super::{
    input::input,
    output::flush,
    state::{Inner, Shard, ShardState},
};
use crate::net::{self, RxQueue};

/// The shard thread: NAPI-style receive, timers, then sleep on the RX
/// interrupt (or the wake fd) until the next timer.
pub(crate) fn run(inner: &Arc<Inner>, idx: usize) {
    let shard = &inner.shards[idx];
    let budget = inner.cfg.budget.max(1);
    let busy = inner.cfg.busy_poll;
    while !inner.stop.load(Ordering::Relaxed) {
        let (n, next, tx_armed, tx_raced) = {
            let Ok(mut g) = shard.st.lock() else {
                return;
            };
            // The clock is read under the lock: a time read before it
            // could be older than the one a user thread sent with while
            // this thread waited, and the peer drops a segment whose
            // timestamp went back (PAWS).
            let now = inner.now();
            let st = &mut *g;
            let inbox = shard
                .inbox
                .lock()
                .map(|mut v| std::mem::take(&mut *v))
                .unwrap_or_default();
            for (h, f) in inbox {
                input(inner, idx, &mut st.p, &mut st.tx, &h, &f, now);
            }
            let (p, tx) = (&mut st.p, &mut st.tx);
            let n = match st.rx.napi_poll(budget, busy.is_none(), &mut |h, f| {
                input(inner, idx, p, tx, h, f, now)
            }) {
                Ok(n) => n,
                Err(e) => {
                    warn!("shard {idx}: receive failed: {e}");
                    0
                }
            };
            inner.shard_rx[idx].fetch_add(n as u64, Ordering::Relaxed);
            let next = service(inner, st, now);
            if let Err(e) = st.tx.kick() {
                warn!("shard {idx}: kick failed: {e}");
            }
            // With the TX ring full, output waits for the device to hand
            // chains back: sleep on the TX interrupt too, armed now (and
            // if chains came back meanwhile, do not sleep at all).
            let (mut tx_armed, mut tx_raced) = (false, false);
            if let Ok(false) = st.tx.has_room() {
                match st.tx.arm() {
                    Ok(raced) => (tx_armed, tx_raced) = (true, raced),
                    Err(e) => warn!("shard {idx}: arming TX: {e}"),
                }
            }
            let wake = std::mem::take(&mut st.p.wake_users);
            drop(g);
            if wake {
                shard.cond.notify_all();
                inner.notify();
            }
            (n, next, tx_armed, tx_raced)
        };
        if n >= budget || tx_raced {
            disarm_tx(shard, tx_armed);
            continue;
        }
        if let Some(b) = busy {
            // Spin with interrupts still off; only before sleeping are
            // they re-armed (and a frame that raced in is polled).
            let until = Instant::now() + b;
            let mut got = false;
            while Instant::now() < until && !got {
                got = shard.st.lock().map(|s| s.rx.pending()).unwrap_or(false);
                std::hint::spin_loop();
            }
            let raced = got
                || shard
                    .st
                    .lock()
                    .map(|s| s.rx.rearm().unwrap_or(true))
                    .unwrap_or(false);
            if raced {
                disarm_tx(shard, tx_armed);
                continue;
            }
        }
        let now2 = inner.now();
        let sleep = next.map_or(Duration::from_millis(200), |t| {
            Duration::from_micros(t.0.saturating_sub(now2.0))
        });
        if sleep.is_zero() {
            disarm_tx(shard, tx_armed);
            continue;
        }
        let tx_call = tx_armed.then_some(&shard.tx_call);
        net::wait_any(
            &[Some(&shard.call), Some(&shard.wake), tx_call],
            sleep.clamp(Duration::from_millis(1), Duration::from_millis(200)),
        );
        disarm_tx(shard, tx_armed);
    }
}

/// Turns the TX interrupt off again after a wait for room.
fn disarm_tx(shard: &Shard, armed: bool) {
    if armed {
        if let Ok(mut st) = shard.st.lock() {
            let _ = st.tx.disarm();
        }
    }
}

/// Timers and output of every connection; removes finished ones.
/// Returns the earliest deadline left.
fn service(inner: &Inner, st: &mut ShardState, now: tcp::Instant) -> Option<tcp::Instant> {
    st.p.frag.expire(now.0 / 1000);
    let mut next: Option<tcp::Instant> = None;
    for slot in 0..st.p.conns.len() {
        let Some(e) = st.p.conns[slot].as_mut() else {
            continue;
        };
        if e.conn.poll_timeout().is_some_and(|t| t <= now) {
            e.conn.on_timer(now);
        }
        flush(inner, &mut st.p, &mut st.tx, slot, now);
        let Some(e) = st.p.conns[slot].as_mut() else {
            continue;
        };
        if e.conn.is_closed() && e.user_gone {
            let key = (e.local, e.remote);
            st.p.flows.remove(&key);
            st.p.conns[slot] = None;
            continue;
        }
        if let Some(t) = e.conn.poll_timeout() {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
    }
    while matches!(st.p.conns.last(), Some(None)) {
        st.p.conns.pop();
    }
    next
}

impl RxQueue {
    /// Whether frames wait in the ring (for busy polling).
    pub fn pending(&self) -> bool {
        self.has_used().unwrap_or(false)
    }
}
