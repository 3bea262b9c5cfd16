//! The management socket and its client, `vnicd ctl`.
//!
//! A request is one line; the answer is text, then the server closes the
//! connection. Requests:
//! - `stats`: every counter, `name value` per line (a VF's prefixed with
//!   `vf<n>.`);
//! - `link show [--json]`: the PF and its VFs in ip-link's layout;
//! - `vf N [mac M] [vlan V [qos Q] [proto 802.1Q|802.1ad]] [spoofchk on|off]
//!   [trust on|off] [max_tx_rate R] [min_tx_rate R] [state auto|enable|disable]`;
//! - `coalesce [vf N] [queue Q] KEY VALUE...`: notification coalescing with
//!   `ethtool -C`'s keys (rx-usecs, rx-frames, tx-usecs, tx-frames,
//!   adaptive-rx, adaptive-tx), for the port or one queue pair;
//! - `coalesce show [vf N] [--json]`: in `ethtool -c`'s layout, then per
//!   queue pair;
//! - `offload [vf N] rx-gro-hw on|off`: receive segment coalescing.
//!
//! An answer that starts with `error:` changed nothing.

use std::{
    io::{self, Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use std::fmt::Write as _;

use vnic_protocol::virtio::ctrl::Coal;

use crate::nic::{coalesce::QueueCoal, Nic};

fn answer(nic: &Nic, req: &str) -> String {
    let words: Vec<&str> = req.split_whitespace().collect();
    match words.as_slice() {
        ["stats"] => stats(nic),
        ["link", "show"] | ["link"] => link_show(nic),
        ["link", "show", "--json"] | ["link", "--json"] => link_json(nic),
        ["vf", n, rest @ ..] => set_vf(nic, n, rest),
        ["coalesce", rest @ ..] => coalesce(nic, rest),
        ["offload", rest @ ..] => offload(nic, rest),
        _ => format!(
            "error: unknown request {:?}; known: stats, link show [--json], \
             vf N SETTING VALUE..., coalesce [show], offload\n",
            req.trim()
        ),
    }
}

/// Every port's counters; a VF's names start with `vf<n>.`.
fn stats(nic: &Nic) -> String {
    let mut out = nic.pf().stats.render();
    for port in &nic.ports[1..] {
        let prefix = port.name();
        for line in port.stats.render().lines() {
            let _ = writeln!(out, "{prefix}.{line}");
        }
    }
    out
}

fn set_vf(nic: &Nic, n: &str, words: &[&str]) -> String {
    let Some(n) = n
        .parse::<usize>()
        .ok()
        .filter(|&n| n.checked_add(1).is_some_and(|p| p < nic.ports.len()))
    else {
        return format!(
            "error: vf {n:?}: this vnicd has {} VFs\n",
            nic.ports.len() - 1
        );
    };
    if words.is_empty() || words.len() % 2 != 0 {
        return "error: expected SETTING VALUE pairs\n".to_owned();
    }
    let pairs: Vec<(&str, &str)> = words.chunks(2).map(|c| (c[0], c[1])).collect();
    match nic.set_vf(n + 1, &pairs) {
        Ok(()) => "ok\n".to_owned(),
        Err(e) => format!("error: vf {n}: {e}\n"),
    }
}

/// The port a `vf N` prefix names (the PF without one), and the words
/// after it.
fn port_of<'a, 'b>(nic: &Nic, words: &'a [&'b str]) -> Result<(usize, &'a [&'b str]), String> {
    match words {
        ["vf", n, rest @ ..] => n
            .parse::<usize>()
            .ok()
            .filter(|&n| n.checked_add(1).is_some_and(|p| p < nic.ports.len()))
            .map(|n| (n + 1, rest))
            .ok_or_else(|| {
                format!(
                    "error: vf {n:?}: this vnicd has {} VFs\n",
                    nic.ports.len() - 1
                )
            }),
        _ => Ok((0, words)),
    }
}

fn coalesce(nic: &Nic, words: &[&str]) -> String {
    let (show, words) = match words {
        ["show", rest @ ..] => (true, rest),
        _ => (false, words),
    };
    let (p, words) = match port_of(nic, words) {
        Ok(x) => x,
        Err(e) => return e,
    };
    if show {
        return match words {
            [] => coalesce_show(nic, p),
            ["--json"] => coalesce_json(nic, p),
            _ => "error: coalesce show [vf N] [--json]\n".to_owned(),
        };
    }
    let (pair, words) = match words {
        ["queue", q, rest @ ..] => match q.parse::<usize>() {
            Ok(q) => (Some(q), rest),
            Err(_) => return format!("error: queue {q:?} is not a number\n"),
        },
        _ => (None, words),
    };
    if words.is_empty() || words.len() % 2 != 0 {
        return "error: expected KEY VALUE pairs (rx-usecs, rx-frames, tx-usecs, tx-frames, \
                adaptive-rx, adaptive-tx)\n"
            .to_owned();
    }
    let pairs: Vec<(&str, &str)> = words.chunks(2).map(|c| (c[0], c[1])).collect();
    match nic.set_coalescing(p, pair, &pairs) {
        Ok(()) => "ok\n".to_owned(),
        Err(e) => format!("error: {e}\n"),
    }
}

fn offload(nic: &Nic, words: &[&str]) -> String {
    let (p, words) = match port_of(nic, words) {
        Ok(x) => x,
        Err(e) => return e,
    };
    match words {
        [key, value] => match nic.set_offload(p, key, value) {
            Ok(()) => "ok\n".to_owned(),
            Err(e) => format!("error: {e}\n"),
        },
        _ => "error: offload [vf N] rx-gro-hw on|off\n".to_owned(),
    }
}

/// One `ethtool -c` block.
fn coal_block(out: &mut String, rx: (bool, Coal), tx: (bool, Coal)) {
    let _ = writeln!(out, "Adaptive RX: {}  TX: {}", on_off(rx.0), on_off(tx.0));
    let _ = writeln!(out, "rx-usecs: {}", rx.1.max_usecs);
    let _ = writeln!(out, "rx-frames: {}", rx.1.max_packets);
    let _ = writeln!(out, "tx-usecs: {}", tx.1.max_usecs);
    let _ = writeln!(out, "tx-frames: {}", tx.1.max_packets);
}

/// `ethtool -c`'s layout for the port, then `ethtool --per-queue`'s for
/// each pair, with the values in force (an adaptive queue's profile).
fn coalesce_show(nic: &Nic, p: usize) -> String {
    let Some((config, pairs)) = nic.coalescing(p) else {
        return format!("error: no port {p}\n");
    };
    let mut out = String::new();
    let _ = writeln!(out, "Coalesce parameters for {}:", nic.ports[p].name());
    coal_block(
        &mut out,
        (config.rx.adaptive, config.rx.coal),
        (config.tx.adaptive, config.tx.coal),
    );
    for (q, pc) in pairs.iter().enumerate() {
        let _ = writeln!(out, "\nQueue: {q}");
        coal_block(
            &mut out,
            (pc.rx.adaptive, pc.rx.in_force()),
            (pc.tx.adaptive, pc.tx.in_force()),
        );
    }
    out
}

/// [`coalesce_show`] as JSON, with ethtool's key names; per queue also
/// what was set, the adaptive profile and the packet rate it measured.
fn coalesce_json(nic: &Nic, p: usize) -> String {
    let Some((config, pairs)) = nic.coalescing(p) else {
        return format!("error: no port {p}\n");
    };
    let dir = |q: &QueueCoal| {
        let f = q.in_force();
        serde_json::json!({
            "adaptive": q.adaptive,
            "usecs": f.max_usecs,
            "frames": f.max_packets,
            "set-usecs": q.set.max_usecs,
            "set-frames": q.set.max_packets,
            "profile": q.dim.level,
            "rate-pps": q.dim.rate,
        })
    };
    let queues: Vec<serde_json::Value> = pairs
        .iter()
        .enumerate()
        .map(|(q, pc)| serde_json::json!({"queue": q, "rx": dir(&pc.rx), "tx": dir(&pc.tx)}))
        .collect();
    let v = serde_json::json!({
        "ifname": nic.ports[p].name(),
        "adaptive-rx": config.rx.adaptive,
        "adaptive-tx": config.tx.adaptive,
        "rx-usecs": config.rx.coal.max_usecs,
        "rx-frames": config.rx.coal.max_packets,
        "tx-usecs": config.tx.coal.max_usecs,
        "tx-frames": config.tx.coal.max_packets,
        "queues": queues,
    });
    format!("{v}\n")
}

/// The PF and its VFs in `ip link show`'s layout.
fn link_show(nic: &Nic) -> String {
    let view = nic.switch.view();
    let mut out = String::new();
    let pf = nic.pf();
    let up = view.uplink_up;
    let _ = writeln!(
        out,
        "0: {}: <BROADCAST,MULTICAST{}> mtu {} state {} frontend {}",
        pf.name(),
        if up { ",UP,LOWER_UP" } else { "" },
        pf.config.mtu,
        if up { "UP" } else { "DOWN" },
        attached(pf.is_attached()),
    );
    let _ = writeln!(
        out,
        "    link/ether {} brd ff:ff:ff:ff:ff:ff",
        pf.ctrl_state().mac
    );
    for port in &nic.ports[1..] {
        let s = port.settings().clone();
        let _ = write!(
            out,
            "    vf {}     link/ether {} brd ff:ff:ff:ff:ff:ff",
            port.id - 1,
            s.mac
        );
        if let Some(v) = s.vlan {
            let _ = write!(out, ", vlan {}", v.vid);
            if v.qos != 0 {
                let _ = write!(out, ", qos {}", v.qos);
            }
            if v.proto != crate::nic::vf::TPID_8021Q {
                let _ = write!(out, ", vlan protocol {}", v.proto_name());
            }
        }
        if s.max_tx_rate != 0 || s.min_tx_rate != 0 {
            let _ = write!(
                out,
                ", max_tx_rate {}Mbps, min_tx_rate {}Mbps",
                s.max_tx_rate, s.min_tx_rate
            );
        }
        let _ = writeln!(
            out,
            ", spoof checking {}, link-state {}, trust {}, frontend {}",
            on_off(s.spoofchk),
            s.state.name(),
            on_off(s.trust),
            attached(port.is_attached()),
        );
    }
    out
}

/// [`link_show`] as JSON, in the shape of `ip -j link show`'s vfinfo_list.
fn link_json(nic: &Nic) -> String {
    let pf = nic.pf();
    let vfs: Vec<serde_json::Value> = nic.ports[1..]
        .iter()
        .map(|port| {
            let s = port.settings().clone();
            let vlans: Vec<serde_json::Value> = s
                .vlan
                .iter()
                .map(|v| serde_json::json!({"vlan": v.vid, "qos": v.qos, "protocol": v.proto_name()}))
                .collect();
            serde_json::json!({
                "vf": port.id - 1,
                "address": s.mac.to_string(),
                "vlan_list": vlans,
                "rate": {"max_tx": s.max_tx_rate, "min_tx": s.min_tx_rate},
                "spoofchk": s.spoofchk,
                "link_state": s.state.name(),
                "trust": s.trust,
                "frontend": port.is_attached(),
            })
        })
        .collect();
    let v = serde_json::json!([{
        "ifindex": 0,
        "ifname": pf.name(),
        "mtu": pf.config.mtu,
        "operstate": if nic.switch.view().uplink_up { "UP" } else { "DOWN" },
        "address": pf.ctrl_state().mac.to_string(),
        "frontend": pf.is_attached(),
        "vfinfo_list": vfs,
    }]);
    format!("{v}\n")
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

fn attached(b: bool) -> &'static str {
    if b {
        "attached"
    } else {
        "none"
    }
}

/// How long a client may take to send its request or read the answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Clients served at once; more are told the server is busy.
const MAX_CLIENTS: usize = 8;

/// Reads one request line (at most 4096 bytes) and answers it; the whole
/// request must arrive within `timeout`, however it is cut up.
fn handle(dev: &Nic, stream: UnixStream, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut line = Vec::new();
    let mut buf = [0u8; 512];
    let mut s = &stream;
    while !line.contains(&b'\n') && line.len() < 4096 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        line.extend_from_slice(&buf[..n]);
    }
    let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
    let req = String::from_utf8_lossy(&line[..end.min(4096)]);
    stream.set_write_timeout(Some(timeout))?;
    s.write_all(answer(dev, &req).as_bytes())
}

/// Listens on `path` (replacing a stale socket) in a thread of its own.
pub fn serve(path: &Path, dev: Arc<Nic>) -> io::Result<JoinHandle<()>> {
    serve_with(path, dev, CLIENT_TIMEOUT)
}

/// [`serve`] with a client timeout of `timeout`. Each client is served in
/// a thread of its own, so one that never finishes its request holds up
/// no other; it is dropped after `timeout`.
pub fn serve_with(path: &Path, dev: Arc<Nic>, timeout: Duration) -> io::Result<JoinHandle<()>> {
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    let busy = Arc::new(AtomicUsize::new(0));
    thread::Builder::new()
        .name("vnicd-mgmt".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let s = match conn {
                    Ok(s) => s,
                    Err(e) => {
                        log::warn!("mgmt accept: {e}");
                        continue;
                    }
                };
                if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
                    busy.fetch_sub(1, Ordering::AcqRel);
                    let _ = s.set_write_timeout(Some(timeout));
                    let _ = (&s).write_all(b"error: busy, try again\n");
                    continue;
                }
                let (dev, done) = (dev.clone(), busy.clone());
                let spawned = thread::Builder::new()
                    .name("vnicd-mgmt-client".into())
                    .spawn(move || {
                        if let Err(e) = handle(&dev, s, timeout) {
                            log::debug!("mgmt request: {e}");
                        }
                        done.fetch_sub(1, Ordering::AcqRel);
                    });
                if let Err(e) = spawned {
                    log::warn!("mgmt client thread: {e}");
                    busy.fetch_sub(1, Ordering::AcqRel);
                }
            }
        })
}

/// Sends one request and returns the answer.
pub fn request(path: &Path, req: &str) -> io::Result<String> {
    let mut s = UnixStream::connect(path)?;
    s.write_all(req.as_bytes())?;
    s.write_all(b"\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::{sync::mpsc, time::Instant};

    use super::*;
    use crate::nic::{tests::config, tests::FakeUplink};

    #[test]
    fn a_client_that_never_finishes_its_request_holds_up_no_other() {
        let dir = std::env::temp_dir().join(format!("vnic-mgmt-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mgmt");
        let dev = Arc::new(Nic::single(config(1), Box::new(FakeUplink::default())).unwrap());
        dev.pf().stats.tx[0].packet(60);
        let _server = serve_with(&path, dev, Duration::from_millis(300)).unwrap();
        // Connects and sends half a line, then nothing.
        let mut silent = UnixStream::connect(&path).unwrap();
        silent.write_all(b"sta").unwrap();
        // Another client is answered meanwhile (in a thread: a server
        // that blocks fails the test instead of hanging it).
        let (tx, rx) = mpsc::channel();
        let p = path.clone();
        thread::spawn(move || {
            let _ = tx.send(request(&p, "stats"));
        });
        let out = rx.recv_timeout(Duration::from_secs(20)).unwrap().unwrap();
        assert!(out.contains("tx0.packets 1\n"), "{out}");
        // A VF number past the end, or one that would overflow, is an
        // error and changes nothing.
        for req in ["vf 0 trust on", "vf 18446744073709551615 trust on"] {
            let out = request(&path, req).unwrap();
            assert!(out.starts_with("error: "), "{req}: {out}");
        }
        // The silent client is dropped: it reads the end of the stream.
        silent
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let t0 = Instant::now();
        let mut rest = Vec::new();
        silent.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert!(t0.elapsed() < Duration::from_secs(20));
        // A client that sends a byte now and then is dropped all the same
        // once its request has taken longer than the timeout.
        let mut slow = UnixStream::connect(&path).unwrap();
        let t0 = Instant::now();
        let mut closed = false;
        for _ in 0..100 {
            thread::sleep(Duration::from_millis(100));
            if slow.write_all(b"s").is_err() {
                closed = true;
                break;
            }
            slow.set_nonblocking(true).unwrap();
            let mut b = [0u8; 16];
            if matches!(slow.read(&mut b), Ok(0)) {
                closed = true;
                break;
            }
            slow.set_nonblocking(false).unwrap();
        }
        assert!(closed, "a trickling client is dropped");
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
