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

pub mod dpdk;
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

/// The path of binary `name` built beside `bin` (a test's own binary):
/// the workspace's vnicd for the guest driver's tests.
pub fn sibling_binary(bin: &str, name: &str) -> String {
    let p = Path::new(bin).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: build it (cargo build --workspace) or run cargo test --workspace",
        p.display()
    );
    p.display().to_string()
}

/// The round trips (µs) in ping's output, from its `time=` fields (ms).
pub fn ping_times_us(out: &str) -> Vec<f64> {
    out.split("time=")
        .skip(1)
        .filter_map(|x| x.split_whitespace().next()?.parse::<f64>().ok())
        .map(|ms| ms * 1000.0)
        .collect()
}

/// The median of `v` (NaN when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `n` bytes of a xorshift sequence from `seed`: test data whose every
/// byte matters.
pub fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// CPU time of every thread of process `pid` so far, in ns (0 when it is
/// gone).
pub fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| {
            let t = t.ok()?;
            let s = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            s.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

/// The CPU clock the kernel reports (`cpu MHz` in /proc/cpuinfo), NaN if
/// it reports none.
pub fn cpu_mhz() -> f64 {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("cpu MHz"))?
                .split(':')
                .nth(1)?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(f64::NAN)
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

    /// A TCP counter of the namespace's kernel (from /proc/net/snmp or
    /// /proc/net/netstat, e.g. `EstabResets`, `TCPAbortOnData`).
    pub fn tcp_counter(&self, name: &str) -> io::Result<u64> {
        let text = self.exec("cat", &["/proc/net/snmp", "/proc/net/netstat"])?;
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.chunks(2) {
            let [h, v] = pair else { continue };
            let found = h
                .split_whitespace()
                .zip(v.split_whitespace())
                .skip(1)
                .find(|(k, _)| *k == name);
            if let Some((_, val)) = found {
                return val.parse().map_err(io::Error::other);
            }
        }
        Err(io::Error::other(format!("no TCP counter {name}")))
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

    /// Writes whole Ethernet frames out of `dev` from inside the
    /// namespace with a packet socket: for frames the kernel would not
    /// build itself (VLAN-tagged ones on a kernel without 802.1Q, say).
    pub fn send_frames(&self, dev: &str, frames: Vec<Vec<u8>>) -> io::Result<()> {
        let dev = std::ffi::CString::new(dev).map_err(io::Error::other)?;
        self.enter(move || {
            let (fd, index) = packet_socket(&dev, 0)?;
            for f in &frames {
                // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
                let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                to.sll_family = libc::AF_PACKET as u16;
                to.sll_ifindex = i32::try_from(index).map_err(io::Error::other)?;
                to.sll_halen = 6;
                let dst = f
                    .get(..6)
                    .ok_or_else(|| io::Error::other("frame shorter than a MAC"))?;
                to.sll_addr[..6].copy_from_slice(dst);
                // SAFETY: the buffer and the address are valid for the
                // lengths given for the duration of the call.
                let r = unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        f.as_ptr().cast(),
                        f.len(),
                        0,
                        std::ptr::from_ref(&to).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                    )
                };
                if r < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        })
        .join()
        .map_err(|_| io::Error::other("frame sender panicked"))?
    }

    /// Reads frames arriving on `dev` inside the namespace with a packet
    /// socket for `secs`, at most `max` of them; each comes with the VLAN
    /// tag (TPID, TCI) it had on the wire, whether the kernel left it in
    /// the bytes or moved it to the packet's metadata (PACKET_AUXDATA).
    /// Frames the namespace itself sends are not included.
    pub fn capture(
        &self,
        dev: &str,
        secs: f64,
        max: usize,
    ) -> thread::JoinHandle<io::Result<Vec<Captured>>> {
        let dev = std::ffi::CString::new(dev).unwrap_or_default();
        self.enter(move || capture_on(&dev, Duration::from_secs_f64(secs), max))
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

/// One frame a packet socket read: its bytes (tag removed, as the kernel
/// hands it over) and the VLAN tag it arrived with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    pub frame: Vec<u8>,
    /// TPID and TCI.
    pub vlan: Option<(u16, u16)>,
}

/// A packet socket of protocol `proto` (network order) and the index of
/// interface `dev`, in the calling thread's namespace.
fn packet_socket(dev: &std::ffi::CStr, proto: u16) -> io::Result<(std::os::fd::OwnedFd, u32)> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: plain socket(2); the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `dev` is NUL-terminated and outlives the call.
    let index = unsafe { libc::if_nametoindex(dev.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((fd, index))
}

fn capture_on(dev: &std::ffi::CStr, limit: Duration, max: usize) -> io::Result<Vec<Captured>> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    let (fd, index) = packet_socket(dev, proto)?;
    // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
    let mut at: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    at.sll_family = libc::AF_PACKET as u16;
    at.sll_protocol = proto;
    at.sll_ifindex = i32::try_from(index).map_err(io::Error::other)?;
    // SAFETY: `at` is a valid sockaddr_ll for the length given.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::from_ref(&at).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let on: libc::c_int = 1;
    // SAFETY: an int option, passed by pointer with its size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_AUXDATA,
            std::ptr::from_ref(&on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let end = Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65_600];
    let mut control = [0u64; 64];
    while out.len() < max {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
        // SAFETY: one valid pollfd for the call.
        if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
            continue;
        }
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain old data; all-zero is valid.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        // SAFETY: msghdr is plain old data; all-zero is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = std::ptr::from_mut(&mut from).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: every pointer in `msg` is valid for its length.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if from.sll_pkttype == libc::PACKET_OUTGOING {
            continue;
        }
        let frame = buf[..n as usize].to_vec();
        let mut vlan = None;
        // SAFETY: the control buffer was filled by recvmsg and `msg`
        // describes it; CMSG_* walk within msg_controllen.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == libc::PACKET_AUXDATA {
                    let aux: libc::tpacket_auxdata =
                        std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    if aux.tp_status & libc::TP_STATUS_VLAN_VALID != 0 {
                        let tpid = if aux.tp_status & libc::TP_STATUS_VLAN_TPID_VALID != 0 {
                            aux.tp_vlan_tpid
                        } else {
                            0x8100
                        };
                        vlan = Some((tpid, aux.tp_vlan_tci));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if vlan.is_none() && frame.len() >= 16 {
            let tpid = u16::from_be_bytes([frame[12], frame[13]]);
            if tpid == 0x8100 || tpid == 0x88a8 {
                vlan = Some((tpid, u16::from_be_bytes([frame[14], frame[15]])));
            }
        }
        out.push(Captured { frame, vlan });
    }
    Ok(out)
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

    /// Starts `bin` with a TAP uplink of a fresh name and `extra`;
    /// returns it and the TAP's name.
    pub fn with_tap(bin: &str, extra: &[&str]) -> io::Result<(Vnicd, String)> {
        let tap = unique("vnt");
        let uplink = format!("tap:{tap}");
        let mut args = vec!["--uplink", uplink.as_str()];
        args.extend_from_slice(extra);
        Ok((Vnicd::start(bin, &args)?, tap))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends a request (`vf 0 trust on`, `link show`) to the management
    /// socket.
    pub fn ctl(&self, req: &str) -> io::Result<String> {
        mgmt_request(&self.mgmt, req)
    }

    /// The socket of VF `n` (the default name).
    pub fn vf_socket(&self, n: usize) -> PathBuf {
        let mut p = self.socket.as_os_str().to_owned();
        p.push(format!(".vf{n}"));
        PathBuf::from(p)
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

/// A child process killed on drop.
#[derive(Debug)]
pub struct Proc(Option<Child>);

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        Proc(Some(
            cmd.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")),
        ))
    }

    /// Waits up to `limit`; returns (success, stdout, stderr).
    pub fn finish(mut self, limit: Duration) -> (bool, String, String) {
        let mut c = self.0.take().unwrap_or_else(|| panic!("no child"));
        let end = Instant::now() + limit;
        loop {
            if let Ok(Some(_)) = c.try_wait() {
                break;
            }
            if Instant::now() > end {
                let _ = c.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = c.wait_with_output().unwrap_or_else(|e| panic!("wait: {e}"));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends `stats` to a management socket and returns the answer.
pub fn stats_direct(path: &Path) -> io::Result<String> {
    mgmt_request(path, "stats")
}

/// Sends one request line to a management socket and returns the answer;
/// an answer starting with `error:` is an error.
pub fn mgmt_request(path: &Path, req: &str) -> io::Result<String> {
    use std::{
        io::{Read, Write},
        os::unix::net::UnixStream,
    };
    let mut s = UnixStream::connect(path)?;
    s.write_all(req.as_bytes())?;
    s.write_all(b"\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    match out.strip_prefix("error: ") {
        Some(e) => Err(io::Error::other(format!("{req:?}: {}", e.trim_end()))),
        None => Ok(out),
    }
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
    /// The TAP's byte counters in the namespace: (from vnicd, to vnicd).
    pub fn tap_bytes(&self) -> io::Result<(u64, u64)> {
        let read = |what: &str| -> io::Result<u64> {
            let path = format!("/sys/class/net/{}/statistics/{what}", self.tap);
            self.ns
                .exec("cat", &[&path])?
                .trim()
                .parse()
                .map_err(io::Error::other)
        };
        Ok((read("rx_bytes")?, read("tx_bytes")?))
    }

    /// Starts `bin` with `--uplink tap:NAME` and `extra`, moves the TAP
    /// into a new namespace as `host_addr`, and adds neighbour entries
    /// (`(ip, mac)`) for the guest side.
    pub fn start(
        bin: &str,
        extra: &[&str],
        host_addr: &str,
        neighbours: &[(&str, &str)],
    ) -> io::Result<PortInNs> {
        let (vnicd, tap) = Vnicd::with_tap(bin, extra)?;
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

/// vnicd's TAP on a bridge in a namespace of its own, wired by a veth pair
/// to a second namespace where the kernel peer lives. What goes between
/// guest and peer is forwarded, so [`BridgedPort::impair`] can lose and
/// reorder it on the way, both ways, as a bad link would: the peer's TCP
/// sees real losses (it retransmits) rather than refused sends.
#[derive(Debug)]
pub struct BridgedPort {
    /// The peer's namespace; its interface is [`BridgedPort::PEER_DEV`].
    pub peer: NetNs,
    pub bridge: NetNs,
    pub vnicd: Vnicd,
    /// The bridge's ports: toward the guest (the TAP) and toward the peer.
    ports: [String; 2],
}

impl BridgedPort {
    pub const PEER_DEV: &'static str = "eth0";

    /// Starts `bin` with a TAP uplink and `extra`, bridges the TAP to the
    /// peer's namespace and gives the peer's interface `peer_addrs` (CIDR;
    /// IPv6 ones without duplicate address detection).
    pub fn start(bin: &str, extra: &[&str], peer_addrs: &[&str]) -> io::Result<BridgedPort> {
        let (vnicd, tap) = Vnicd::with_tap(bin, extra)?;
        let bridge = NetNs::new()?;
        let peer = NetNs::new()?;
        let port = BridgedPort {
            peer,
            bridge,
            vnicd,
            ports: [tap, "up0".to_owned()],
        };
        let (b, p) = (&port.bridge, &port.peer);
        run("ip", &["link", "set", &port.ports[0], "netns", &b.name])?;
        // The bridge namespace only forwards: no addresses, no IPv6 of its own.
        b.exec(
            "sysctl",
            &[
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        )?;
        b.ip(&[
            "link",
            "add",
            &port.ports[1],
            "type",
            "veth",
            "peer",
            "name",
            Self::PEER_DEV,
            "netns",
            &p.name,
        ])?;
        b.ip(&["link", "add", "br0", "type", "bridge"])?;
        for dev in &port.ports {
            b.ip(&["link", "set", dev, "master", "br0"])?;
            b.ip(&["link", "set", dev, "up"])?;
        }
        b.ip(&["link", "set", "br0", "up"])?;
        for a in peer_addrs {
            let mut args = vec!["addr", "add", a, "dev", Self::PEER_DEV];
            if a.contains(':') {
                args.push("nodad");
            }
            p.ip(&args)?;
        }
        p.ip(&["link", "set", Self::PEER_DEV, "up"])?;
        Ok(port)
    }

    /// Makes the bridge lose `loss_permille` of the TCP frames crossing it
    /// and hold back another `reorder_permille` behind the frames that
    /// follow, each way. Held frames go through a slow HTB class on the
    /// outgoing port (10 Mbit/s with no burst, so a full-sized frame
    /// waits about 1.2 ms); the choice is nftables' random numgen.
    pub fn impair(&self, loss_permille: u32, reorder_permille: u32) -> io::Result<()> {
        let b = &self.bridge;
        let nft = |rule: &str| b.exec("nft", &rule.split(' ').collect::<Vec<_>>());
        nft("add table bridge vnicimpair")?;
        nft("add chain bridge vnicimpair pass { type filter hook forward priority 0 ; }")?;
        nft(&format!(
            "add rule bridge vnicimpair pass meta l4proto tcp numgen random mod 1000 < {loss_permille} counter drop"
        ))?;
        nft(&format!(
            "add rule bridge vnicimpair pass meta l4proto tcp numgen random mod 1000 < {reorder_permille} counter meta priority set 1:20"
        ))?;
        for dev in &self.ports {
            let tc = |args: &str| {
                let mut a = vec!["-n", b.name.as_str()];
                a.extend(args.split(' '));
                run("tc", &a)
            };
            tc(&format!(
                "qdisc add dev {dev} root handle 1: htb default 10"
            ))?;
            tc(&format!(
                "class add dev {dev} parent 1: classid 1:10 htb rate 10gbit"
            ))?;
            tc(&format!(
                "class add dev {dev} parent 1: classid 1:20 htb rate 10mbit burst 1 cburst 1"
            ))?;
        }
        Ok(())
    }

    /// What the impairment did so far: (frames dropped, frames held back).
    pub fn impaired(&self) -> io::Result<(u64, u64)> {
        let out = self
            .bridge
            .exec("nft", &["list", "table", "bridge", "vnicimpair"])?;
        let mut n = out.lines().filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let i = w.iter().position(|x| *x == "packets")?;
            w.get(i + 1)?.parse::<u64>().ok()
        });
        Ok((n.next().unwrap_or(0), n.next().unwrap_or(0)))
    }

    /// A counter of the peer's TCP from `/proc/net/snmp` (`Tcp:` lines) or
    /// `/proc/net/netstat` (`TcpExt:` lines), e.g. `RetransSegs`.
    pub fn peer_tcp_counter(&self, name: &str) -> io::Result<u64> {
        self.peer.tcp_counter(name)
    }
}
