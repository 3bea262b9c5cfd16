//! Booting a real Linux guest under QEMU on a vhost-user socket.
//!
//! The guest (built by `tests/guest/build.sh` from Debian's packages) runs
//! the shell script it is given and prints its output between markers on
//! the serial console, which goes to a file; [`Guest::wait_for`] reads
//! that file while the guest runs. KVM is used when it boots the guest,
//! TCG otherwise.

use std::{
    io,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

use crate::{run, unique};

/// The kernel and initramfs the guest boots.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Builds the guest image if its inputs changed (cached in .cache/guest).
pub fn guest_image() -> io::Result<GuestImage> {
    static IMAGE: OnceLock<Result<GuestImage, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let here = Path::new(env!("CARGO_MANIFEST_DIR"));
            let dir = here.join("../.cache/guest");
            run("bash", &[&here.join("guest/build.sh").to_string_lossy()])
                .map_err(|e| e.to_string())?;
            Ok(GuestImage {
                kernel: dir.join("vmlinuz"),
                initrd: dir.join("initramfs.cpio.gz"),
            })
        })
        .clone()
        .map_err(io::Error::other)
}

/// How QEMU accelerates the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// KVM when it boots the guest, TCG otherwise (`VNIC_QEMU_ACCEL=kvm|tcg`
/// decides instead). Tried once per process.
pub fn accel() -> Accel {
    static ACCEL: OnceLock<Accel> = OnceLock::new();
    *ACCEL.get_or_init(|| match std::env::var("VNIC_QEMU_ACCEL").as_deref() {
        Ok("kvm") => Accel::Kvm,
        Ok("tcg") => Accel::Tcg,
        _ => {
            if !Path::new("/dev/kvm").exists() {
                return Accel::Tcg;
            }
            let probe = Guest::boot(&GuestOpts {
                accel: Some(Accel::Kvm),
                script: "echo kvm-works".into(),
                ..GuestOpts::default()
            });
            let ok = probe.and_then(|mut g| g.wait_done(Duration::from_secs(20)));
            match ok {
                Ok(out) if out.output.contains("kvm-works") => Accel::Kvm,
                _ => Accel::Tcg,
            }
        }
    })
}

/// A guest to boot.
#[derive(Debug, Clone)]
pub struct GuestOpts {
    /// vnicd's vhost-user socket; `None` boots with no NIC (or `tap`).
    pub socket: Option<PathBuf>,
    /// QEMU's own virtio-net on this TAP instead of vhost-user.
    pub tap: Option<String>,
    pub queues: u16,
    pub smp: u16,
    pub mac: String,
    /// The shell script the guest runs.
    pub script: String,
    pub accel: Option<Accel>,
    /// Run QEMU inside this network namespace (its TAP is created there).
    pub netns: Option<String>,
    /// Host files put into the guest at the given paths, with the shared
    /// libraries they link (as `ldd` lists them) at their own paths.
    pub files: Vec<(PathBuf, String)>,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// The NIC's virtqueues in the packed layout (`packed=on`).
    pub packed: bool,
}

impl Default for GuestOpts {
    fn default() -> Self {
        GuestOpts {
            socket: None,
            tap: None,
            queues: 1,
            smp: 2,
            mac: "52:54:00:12:34:56".into(),
            script: String::new(),
            accel: None,
            netns: None,
            files: Vec::new(),
            mem_mib: 512,
            packed: false,
        }
    }
}

/// What a guest's script printed and how it exited.
#[derive(Debug, Clone)]
pub struct GuestOutput {
    pub output: String,
    pub rc: i32,
    pub console: String,
}

/// A running QEMU, killed when dropped.
#[derive(Debug)]
pub struct Guest {
    child: Child,
    log: PathBuf,
    dir: PathBuf,
    opts: GuestOpts,
    /// Boots tried again after the kernel died before running the script.
    pub reboots: u32,
}

/// Times a guest whose kernel dies before it runs its script is booted
/// again: Debian's kernel under TCG with two vCPUs now and then takes an
/// int3 Oops while it patches its own code early in boot, before any NIC
/// is touched.
const BOOT_RETRIES: u32 = 2;

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl Guest {
    /// Boots a guest; it runs `opts.script` and powers off.
    pub fn boot(opts: &GuestOpts) -> io::Result<Guest> {
        let dir = std::env::temp_dir().join(unique("vnicvm"));
        std::fs::create_dir_all(&dir)?;
        let log = dir.join("console.log");
        let child = spawn(opts, &log)?;
        Ok(Guest {
            child,
            log,
            dir,
            opts: opts.clone(),
            reboots: 0,
        })
    }

    /// When QEMU has exited because the kernel died before it started the
    /// script, boots the guest again (at most [`BOOT_RETRIES`] times);
    /// whether it did.
    fn reboot_if_died_in_boot(&mut self) -> io::Result<bool> {
        let console = self.console();
        let died = !console.contains("VNIC-BOOTED")
            && (console.contains("Kernel panic") || console.contains("Oops:"));
        if !died || self.reboots >= BOOT_RETRIES {
            return Ok(false);
        }
        self.reboots += 1;
        eprintln!(
            "guest kernel died while booting (try {}), booting again:\n{}",
            self.reboots,
            console
                .lines()
                .filter(|l| l.contains("Oops") || l.contains("RIP"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        let _ = std::fs::remove_file(&self.log);
        self.child = spawn(&self.opts, &self.log)?;
        Ok(true)
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What QEMU itself printed (errors about its devices).
    pub fn qemu_stderr(&self) -> String {
        std::fs::read_to_string(self.log.with_extension("qemu-stderr")).unwrap_or_default()
    }

    /// Waits until the console shows `marker`.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.console().contains(marker) {
                return Ok(());
            }
            if let Some(st) = self.child.try_wait()? {
                if self.reboot_if_died_in_boot()? {
                    continue;
                }
                return Err(io::Error::other(format!(
                    "qemu exited ({st}) before {marker:?}:\n{}",
                    self.console()
                )));
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "no {marker:?} after {timeout:?}:\n{}",
                    self.console()
                )));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the script to finish and QEMU to exit.
    pub fn wait_done(&mut self, timeout: Duration) -> io::Result<GuestOutput> {
        self.wait_for("VNIC-OUT-END", timeout)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait()?.is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        let console = self.console();
        let output = console
            .split("VNIC-OUT-BEGIN")
            .nth(1)
            .and_then(|s| s.split("VNIC-OUT-END").next())
            .unwrap_or_default()
            .trim_start_matches(['\r', '\n'])
            .to_owned();
        let rc = console
            .split("VNIC-OUT-END rc=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(-1);
        Ok(GuestOutput {
            output,
            rc,
            console,
        })
    }
}

/// Copies `src` to `root` + `dst`, executable.
fn put_file(root: &Path, src: &Path, dst: &str) -> io::Result<()> {
    let to = root.join(dst.trim_start_matches('/'));
    if let Some(d) = to.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::copy(src, &to)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755))
}

/// The guest image with `files` added: a second cpio archive after the
/// first (the kernel unpacks both), written next to `log`.
fn initrd_with(base: &Path, files: &[(PathBuf, String)], log: &Path) -> io::Result<PathBuf> {
    let dir = log.parent().unwrap_or(Path::new("/tmp"));
    let root = dir.join("overlay");
    for (src, dst) in files {
        put_file(&root, src, dst)?;
        let ldd = Command::new("ldd").arg(src).output()?;
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            let lib = match line.split_once("=>") {
                Some((_, r)) => r.split_whitespace().next(),
                None => line
                    .split_whitespace()
                    .next()
                    .filter(|l| l.starts_with('/')),
            };
            if let Some(lib) = lib.filter(|l| l.starts_with('/')) {
                put_file(&root, Path::new(lib), lib)?;
            }
        }
    }
    let extra = dir.join("extra.cpio.gz");
    let script = format!(
        "cd '{}' && find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
        root.display(),
        extra.display()
    );
    run("sh", &["-c", &script])?;
    let out = dir.join("initrd.gz");
    let mut all = std::fs::read(base)?;
    all.extend(std::fs::read(&extra)?);
    std::fs::write(&out, all)?;
    Ok(out)
}

/// Starts QEMU for `opts`, its serial console written to `log` (anew).
fn spawn(opts: &GuestOpts, log: &Path) -> io::Result<Child> {
    let img = guest_image()?;
    let initrd = if opts.files.is_empty() {
        img.initrd.clone()
    } else {
        initrd_with(&img.initrd, &opts.files, log)?
    };
    let mem = format!("{}M", opts.mem_mib);
    let accel = opts.accel.unwrap_or_else(accel);
    let cmd = base64(opts.script.as_bytes());
    if cmd.len() > 1800 {
        return Err(io::Error::other(
            "guest script too long for the command line",
        ));
    }
    let mut q = match &opts.netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
            c
        }
        None => Command::new("qemu-system-x86_64"),
    };
    let machine = match accel {
        Accel::Kvm => "q35,accel=kvm",
        Accel::Tcg => "q35,accel=tcg",
    };
    q.args([
        "-machine",
        machine,
        "-m",
        &mem,
        "-display",
        "none",
        "-no-reboot",
    ])
    .args(["-nodefaults", "-smp", &opts.smp.to_string()]);
    // A virtio RNG (its driver is loaded at boot, with the NIC's) makes
    // the kernel's random pool ready while it boots. Without one, the
    // pool became ready seconds later, in the middle of the test, and the
    // kernel then rewrote its own code (static keys) while the other
    // vCPU ran it; TCG now and then executed the half-patched instruction
    // and the kernel died with an int3 Oops (seen in get_random_u32 under
    // iperf3's connect). RDRAND would do it too, but changed the guest's
    // timing under TCG enough to upset the coalescing test.
    q.args(["-device", "virtio-rng-pci"]);
    q.args([
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
    ])
    .args(["-numa", "node,memdev=mem"])
    .arg("-kernel")
    .arg(&img.kernel)
    .arg("-initrd")
    .arg(&initrd)
    .args([
        "-append",
        &format!("console=ttyS0 quiet panic=-1 vnic.cmd={cmd}"),
    ])
    .args(["-serial", &format!("file:{}", log.display())]);
    // QEMU 7.2 under TCG crashes in its MSI-X notifier path with
    // vhost-user devices: INTx there, MSI-X with KVM.
    let vectors = match accel {
        Accel::Kvm => 2 * u32::from(opts.queues) + 2,
        Accel::Tcg => 0,
    };
    if let Some(sock) = &opts.socket {
        q.arg("-chardev")
            .arg(format!("socket,id=chr0,path={}", sock.display()))
            .args([
                "-netdev",
                &format!("vhost-user,id=net0,chardev=chr0,queues={}", opts.queues),
            ]);
    } else if let Some(tap) = &opts.tap {
        q.args([
            "-netdev",
            &format!(
                "tap,id=net0,ifname={tap},script=no,downscript=no,queues={}",
                opts.queues
            ),
        ]);
    }
    if opts.socket.is_some() || opts.tap.is_some() {
        q.args([
            "-device",
            &format!(
                "virtio-net-pci,netdev=net0,mq=on,vectors={vectors},mac={}{}",
                opts.mac,
                if opts.packed { ",packed=on" } else { "" }
            ),
        ]);
    }
    // QEMU's own complaints (a device it marked broken, say) go next to
    // the console log.
    let err = std::fs::File::create(log.with_extension("qemu-stderr"))?;
    let child = q
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()?;
    Ok(child)
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `iperf3 -s` bound to `addr` in namespace `ns`, killed when dropped.
#[derive(Debug)]
pub struct IperfServer(Child);

impl IperfServer {
    pub fn start(ns: &str, addr: &str) -> io::Result<IperfServer> {
        let c = Command::new("ip")
            .args(["netns", "exec", ns, "iperf3", "-s", "-B", addr])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        thread::sleep(Duration::from_millis(300));
        Ok(IperfServer(c))
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The number after `"key":` following the last `section` of iperf3's
/// JSON report.
pub fn iperf_number(json: &str, section: &str, key: &str) -> Option<f64> {
    let at = json.rfind(section)?;
    let rest = &json[at..];
    let k = rest.find(&format!("\"{key}\":"))?;
    rest[k + key.len() + 3..]
        .trim_start()
        .split(|c: char| c == ',' || c == '}' || c.is_whitespace())
        .next()?
        .parse()
        .ok()
}

/// The text between markers `a` and `b` in a guest's output.
pub fn between(out: &str, a: &str, b: &str) -> String {
    out.split(a)
        .nth(1)
        .and_then(|s| s.split(b).next())
        .unwrap_or_default()
        .to_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn iperf_numbers() {
        let j = r#"{"end": {"sum_sent": {"bits_per_second": 5.5e9, "retransmits": 3},
            "sum_received": {"bits_per_second": 5.4e9}}}"#;
        assert_eq!(
            super::iperf_number(j, "\"sum_sent\"", "retransmits"),
            Some(3.0)
        );
        assert_eq!(
            super::iperf_number(j, "\"sum_received\"", "bits_per_second"),
            Some(5.4e9)
        );
        assert_eq!(super::iperf_number(j, "\"sum\"", "lost_percent"), None);
        assert_eq!(super::between("x A mid B y", "A", "B"), " mid ");
    }

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(super::base64(b""), "");
        assert_eq!(super::base64(b"f"), "Zg==");
        assert_eq!(super::base64(b"fo"), "Zm8=");
        assert_eq!(super::base64(b"foo"), "Zm9v");
        assert_eq!(
            super::base64(b"ip link set eth0 up\n"),
            "aXAgbGluayBzZXQgZXRoMCB1cAo="
        );
    }
}
