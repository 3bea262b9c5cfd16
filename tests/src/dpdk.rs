//! DPDK's testpmd as a frontend or a backend: `dpdk-testpmd` from Debian's
//! dpdk-dev, without hugepages, on cores 0 and 1 (one forwarding, one
//! main lcore that mostly sleeps).

use std::{
    io,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::unique;

/// A running testpmd with one port and one forwarding core; killed when
/// dropped.
#[derive(Debug)]
pub struct Testpmd {
    child: Child,
    log: PathBuf,
}

impl Testpmd {
    /// testpmd on `vdev`, forwarding on core `fwd_core` (0 or 1) in
    /// `mode` (`txonly`, `rxonly`, ...); `eal` and `extra` are more EAL
    /// and testpmd arguments.
    pub fn start(
        fwd_core: u32,
        vdev: &str,
        eal: &[&str],
        mode: &str,
        extra: &[&str],
    ) -> io::Result<Testpmd> {
        let prefix = unique("tpmd");
        let main_core = 1 - fwd_core.min(1);
        let log = std::env::temp_dir().join(format!("{prefix}.log"));
        let out = std::fs::File::create(&log)?;
        let child = Command::new("dpdk-testpmd")
            .args(["-l", "0,1", "--main-lcore", &main_core.to_string()])
            .args([
                "--no-huge",
                "-m",
                "512",
                "--no-pci",
                "--file-prefix",
                &prefix,
            ])
            .args(["--vdev", vdev])
            .args(eal)
            .arg("--")
            .args([
                &format!("--forward-mode={mode}"),
                "--burst=32",
                "--nb-cores=1",
                "--total-num-mbufs=16384",
                "--stats-period=1",
                // What testpmd drains from its RX queues before it starts
                // forwarding is in no total of its own, but vnicd counted
                // it as written: without this the totals differ by that.
                "--no-flush-rx",
                "--auto-start",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .map_err(|e| io::Error::other(format!("dpdk-testpmd (Debian's dpdk-dev): {e}")))?;
        Ok(Testpmd { child, log })
    }

    /// A virtio-user frontend of `socket` (`pairs` queue pairs of
    /// 256-entry rings, split or `packed`), forwarding on core 0, sending
    /// `size`-byte frames (`txonly`) or taking what comes (`rxonly`).
    pub fn virtio_user(
        socket: &Path,
        mode: &str,
        size: usize,
        in_order: bool,
        packed: bool,
        pairs: u16,
    ) -> io::Result<Testpmd> {
        let vdev = format!(
            "net_virtio_user0,path={},queues={pairs},queue_size=256,in_order={},packed_vq={}",
            socket.display(),
            u8::from(in_order),
            u8::from(packed)
        );
        let q = [format!("--rxq={pairs}"), format!("--txq={pairs}")];
        Testpmd::start(
            0,
            &vdev,
            &[],
            mode,
            &[&format!("--txpkts={size}"), &q[0], &q[1]],
        )
    }

    /// What it printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops it as Ctrl-C does (it prints its totals) and returns all it
    /// printed.
    pub fn stop(mut self) -> String {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on a child this process started and has not
            // waited for, so the pid is still ours.
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
        let end = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < end {
            thread::sleep(Duration::from_millis(50));
        }
        self.output()
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The number after `key` (e.g. `TX-packets:`) in testpmd's last
/// "Accumulated forward statistics" block, or its last mention.
pub fn total(out: &str, key: &str) -> Option<u64> {
    let tail = out
        .rfind("Accumulated forward statistics")
        .map_or(out, |i| &out[i..]);
    tail.split(key)
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Whether `dpdk-testpmd` runs here; tests that need it fail when it does
/// not, unless `VNIC_SKIP_DPDK=1` asks to skip them.
pub fn require_testpmd() -> bool {
    let ok = Command::new("dpdk-testpmd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if ok {
        return true;
    }
    if std::env::var("VNIC_SKIP_DPDK").as_deref() == Ok("1") {
        eprintln!("skipped: no dpdk-testpmd, and VNIC_SKIP_DPDK=1");
        return false;
    }
    panic!("dpdk-testpmd (Debian's dpdk-dev) is missing; set VNIC_SKIP_DPDK=1 to skip");
}
