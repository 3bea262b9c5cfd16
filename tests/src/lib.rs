//! vnic-tests: the harness whole-system tests stand on.
//!
//! - [`NetNs`]: a network namespace the test creates and always deletes;
//!   [`NetNs::enter`] runs a closure on a thread inside it, so the kernel's
//!   own TCP/IP is the peer.
//! - [`Vnicd`]: a `vnicd` process killed by PID when dropped.
//! - [`require_netns`]: tests that need root, `/dev/net/tun` and `ip netns`
//!   fail when they are missing, unless `VNIC_SKIP_NETNS=1` asks to skip.
//!
//! Names are made unique per process and test so tests can run in
//! parallel.

pub mod qemu;

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this process and call (fits an interface name).
pub fn unique(prefix: &str) -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// Runs a command, failing with its output when it fails.
pub fn run(cmd: &str, args: &[&str]) -> io::Result<String> {
    let out = Command::new(cmd).args(args).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd} {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Panics unless this machine can run namespace tests; returns false (skip)
/// only when the user set `VNIC_SKIP_NETNS=1`.
pub fn require_netns() -> bool {
    if std::env::var("VNIC_SKIP_NETNS").as_deref() == Ok("1") {
        eprintln!("skipped: VNIC_SKIP_NETNS=1");
        return false;
    }
    assert!(
        Path::new("/dev/net/tun").exists(),
        "/dev/net/tun is missing (set VNIC_SKIP_NETNS=1 to skip)"
    );
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "namespace tests need root (set VNIC_SKIP_NETNS=1 to skip)"
    );
    assert!(
        run("ip", &["-V"]).is_ok(),
        "iproute2's ip is missing (set VNIC_SKIP_NETNS=1 to skip)"
    );
    true
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new() -> io::Result<NetNs> {
        let name = unique("vnicns");
        run("ip", &["netns", "add", &name])?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ...`
    pub fn ip(&self, args: &[&str]) -> io::Result<String> {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// `ip netns exec NAME cmd args...`
    pub fn exec(&self, cmd: &str, args: &[&str]) -> io::Result<String> {
        let mut a = vec!["netns", "exec", self.name.as_str(), cmd];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// Runs `f` on a new thread that has entered this namespace.
    pub fn enter<T, F>(&self, f: F) -> thread::JoinHandle<io::Result<T>>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let path = PathBuf::from("/var/run/netns").join(&self.name);
        thread::spawn(move || {
            let ns = File::open(&path)?;
            // SAFETY: `ns` is an open namespace file; setns affects only
            // this thread, which exists to run `f` inside it.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })
    }

    /// Moves interface `dev` (from the caller's namespace) in here, gives
    /// it `addr` (CIDR) and brings it up.
    pub fn adopt(&self, dev: &str, addr: &str) -> io::Result<()> {
        run("ip", &["link", "set", dev, "netns", &self.name])?;
        self.exec(
            "sysctl",
            &["-qw", &format!("net.ipv6.conf.{dev}.disable_ipv6=1")],
        )?;
        self.ip(&["addr", "add", addr, "dev", dev])?;
        self.ip(&["link", "set", dev, "up"])?;
        Ok(())
    }

    /// The MAC address of `dev` inside the namespace.
    pub fn mac(&self, dev: &str) -> io::Result<[u8; 6]> {
        let s = self.exec("cat", &[&format!("/sys/class/net/{dev}/address")])?;
        let mut m = [0u8; 6];
        let parts: Vec<&str> = s.trim().split(':').collect();
        if parts.len() != 6 {
            return Err(io::Error::other(format!("bad mac {s:?}")));
        }
        for (o, p) in m.iter_mut().zip(parts) {
            *o = u8::from_str_radix(p, 16).map_err(io::Error::other)?;
        }
        Ok(m)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// A running `vnicd`, killed on drop.
#[derive(Debug)]
pub struct Vnicd {
    child: Child,
    pub socket: PathBuf,
    pub mgmt: PathBuf,
    dir: PathBuf,
}

impl Vnicd {
    /// Starts `bin` listening on a fresh socket with `args`, and waits for
    /// the socket to appear.
    pub fn start(bin: &str, args: &[&str]) -> io::Result<Vnicd> {
        Vnicd::start_wrapped(&[], bin, args)
    }

    /// [`Vnicd::start`] under a wrapper command (`valgrind ...`): the
    /// wrapper's words, then `bin` and its arguments.
    pub fn start_wrapped(wrapper: &[&str], bin: &str, args: &[&str]) -> io::Result<Vnicd> {
        Vnicd::launch(wrapper, bin, None, args)
    }

    /// Starts `bin --client` connecting to a frontend that listens on
    /// `socket`; waits for the management socket only.
    pub fn start_client(bin: &str, socket: &Path, args: &[&str]) -> io::Result<Vnicd> {
        let mut a = vec!["--client"];
        a.extend_from_slice(args);
        Vnicd::launch(&[], bin, Some(socket), &a)
    }

    fn launch(
        wrapper: &[&str],
        bin: &str,
        client_of: Option<&Path>,
        args: &[&str],
    ) -> io::Result<Vnicd> {
        let dir = std::env::temp_dir().join(unique("vnicd"));
        std::fs::create_dir_all(&dir)?;
        let socket = client_of.map_or_else(|| dir.join("vhost.sock"), Path::to_path_buf);
        let mgmt = dir.join("mgmt.sock");
        let mut cmd = match wrapper.split_first() {
            Some((w, rest)) => {
                let mut c = Command::new(w);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .arg("--socket")
            .arg(&socket)
            .arg("--mgmt")
            .arg(&mgmt)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()?;
        let mut d = Vnicd {
            child,
            socket,
            mgmt,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(d.socket.exists() && d.mgmt.exists()) {
            // (in client mode the socket is the frontend's and exists)
            if let Some(st) = d.child.try_wait()? {
                return Err(io::Error::other(format!("vnicd exited early: {st}")));
            }
            if Instant::now() > deadline {
                return Err(io::Error::other("vnicd did not create its sockets in 60 s"));
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The counters, as `name -> value`, read from the management socket.
    pub fn stats(&self) -> io::Result<std::collections::BTreeMap<String, u64>> {
        let out = stats_direct(&self.mgmt)?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.to_owned(), v.parse().ok()?))
            })
            .collect())
    }
}

/// Sends `stats` to a management socket and returns the answer.
pub fn stats_direct(path: &Path) -> io::Result<String> {
    use std::{
        io::{Read, Write},
        os::unix::net::UnixStream,
    };
    let mut s = UnixStream::connect(path)?;
    s.write_all(b"stats\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

impl Drop for Vnicd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A vnicd whose TAP uplink sits in a fresh namespace as `host_addr`
/// (CIDR), with static neighbour entries for the guests' addresses.
#[derive(Debug)]
pub struct PortInNs {
    pub ns: NetNs,
    pub vnicd: Vnicd,
    pub tap: String,
    pub host_mac: [u8; 6],
}

impl PortInNs {
    /// Starts `bin` with `--uplink tap:NAME` and `extra`, moves the TAP
    /// into a new namespace as `host_addr`, and adds neighbour entries
    /// (`(ip, mac)`) for the guest side.
    pub fn start(
        bin: &str,
        extra: &[&str],
        host_addr: &str,
        neighbours: &[(&str, &str)],
    ) -> io::Result<PortInNs> {
        let tap = unique("vnt");
        let uplink = format!("tap:{tap}");
        let mut args = vec!["--uplink", uplink.as_str()];
        args.extend_from_slice(extra);
        let vnicd = Vnicd::start(bin, &args)?;
        let ns = NetNs::new()?;
        ns.adopt(&tap, host_addr)?;
        for (ip, mac) in neighbours {
            ns.ip(&["neigh", "replace", ip, "lladdr", mac, "dev", &tap])?;
        }
        let host_mac = ns.mac(&tap)?;
        Ok(PortInNs {
            ns,
            vnicd,
            tap,
            host_mac,
        })
    }
}
