//! The PCI transport: a virtio-net function driven from user space inside
//! a VM, as DPDK's virtio PMD runs there.
//!
//! The function is taken from the kernel's virtio-pci driver and given to
//! `uio_pci_generic`; its virtio capabilities (common, notify, ISR and
//! device config, virtio 1.3, 4.1.4) are read from the config space and
//! their BARs mapped through sysfs; the rings and buffers live in
//! hugepages whose physical addresses go into the descriptors. Doorbells
//! are writes to the notify BAR. Interrupts are polled: INTx stays
//! disabled, and a thread reads the ISR every 100 µs and signals every
//! queue's eventfd when the device would have interrupted (see
//! [`Poller`]). On drop the device is reset, INTx enabled again, and the
//! function given back to the driver it had.

use std::{
    fs::{self, File, OpenOptions},
    io::{Read, Write},
    os::{fd::AsRawFd, unix::fs::FileExt},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use log::debug;
use vm_memory::Address;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vnic_protocol::virtio::{DeviceStatus, Features};

use super::{Doorbell, Transport};
use crate::{mem::DmaMemory, virtqueue::SplitQueue, Error, QueueError, Result};

const VIRTIO_VENDOR: u16 = 0x1af4;
/// Modern virtio-net, and the transitional id (which must also carry the
/// modern capabilities to be driven here).
const NET_MODERN: u16 = 0x1041;
const NET_TRANSITIONAL: u16 = 0x1000;

const CAP_VENDOR: u8 = 0x09;
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;

/// Common configuration registers (virtio 1.3, 4.1.4.3).
mod common {
    pub const DFSELECT: usize = 0x00;
    pub const DF: usize = 0x04;
    pub const GFSELECT: usize = 0x08;
    pub const GF: usize = 0x0c;
    pub const MSIX: usize = 0x10;
    pub const NUMQ: usize = 0x12;
    pub const STATUS: usize = 0x14;
    pub const CFGGEN: usize = 0x15;
    pub const Q_SELECT: usize = 0x16;
    pub const Q_SIZE: usize = 0x18;
    pub const Q_MSIX: usize = 0x1a;
    pub const Q_ENABLE: usize = 0x1c;
    pub const Q_NOFF: usize = 0x1e;
    pub const Q_DESC: usize = 0x20;
    pub const Q_AVAIL: usize = 0x28;
    pub const Q_USED: usize = 0x30;
    pub const LEN: usize = 0x38;
}

const NO_VECTOR: u16 = 0xffff;

/// A BAR mapped from its sysfs resource file.
struct Bar {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is device memory that any thread may access with
// volatile reads and writes; it is unmapped only when the last reference
// goes.
unsafe impl Send for Bar {}
// SAFETY: as above; every access is a single volatile load or store.
unsafe impl Sync for Bar {}

impl Bar {
    /// Puts anonymous memory where the BAR was mapped: once the kernel's
    /// driver claims the function it revokes user mappings of its BARs,
    /// and a thread still touching one (a doorbell, the poller) would
    /// take SIGBUS. Its accesses land in that memory instead.
    fn detach(&self) {
        // SAFETY: replaces exactly this mapping (address and length from
        // `map_bar`) with fresh anonymous memory of the same size; every
        // pointer into it stays valid for the accesses `Region` makes.
        unsafe {
            libc::mmap(
                self.ptr.cast(),
                self.len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        // SAFETY: `ptr` and `len` are the mapping made in `map_bar`,
        // unmapped once, when nothing refers to it any more.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A capability's window into a BAR, with checked volatile accesses.
#[derive(Clone)]
struct Region {
    bar: Arc<Bar>,
    offset: usize,
    len: usize,
}

impl Region {
    /// The register of type `T` at `off`: inside the window and the
    /// mapping, and aligned for `T`.
    fn at<T>(&self, off: usize) -> Result<*mut T> {
        let size = std::mem::size_of::<T>();
        if off + size > self.len || self.offset + off + size > self.bar.len {
            return Err(Error::Pci(format!(
                "register access at {off:#x} outside its {}-byte window",
                self.len
            )));
        }
        // SAFETY: offset + off + size lies within the mapping (checked
        // above), so the pointer stays inside it.
        let p = unsafe { self.bar.ptr.add(self.offset + off) };
        if p.align_offset(std::mem::align_of::<T>()) != 0 {
            return Err(Error::Pci(format!(
                "misaligned register access at {off:#x}"
            )));
        }
        #[allow(clippy::cast_ptr_alignment)] // checked just above
        Ok(p.cast::<T>())
    }
    fn read8(&self, off: usize) -> Result<u8> {
        let p = self.at::<u8>(off)?;
        // SAFETY: `p` is inside the mapped BAR (see `at`).
        Ok(unsafe { std::ptr::read_volatile(p) })
    }
    fn read16(&self, off: usize) -> Result<u16> {
        let p = self.at::<u16>(off)?;
        // SAFETY: `p` is inside the mapped BAR and aligned (see `at`).
        Ok(u16::from_le(unsafe { std::ptr::read_volatile(p) }))
    }
    fn read32(&self, off: usize) -> Result<u32> {
        let p = self.at::<u32>(off)?;
        // SAFETY: `p` is inside the mapped BAR and aligned (see `at`).
        Ok(u32::from_le(unsafe { std::ptr::read_volatile(p) }))
    }
    fn write8(&self, off: usize, v: u8) -> Result<()> {
        let p = self.at::<u8>(off)?;
        // SAFETY: `p` is inside the mapped BAR (see `at`).
        unsafe { std::ptr::write_volatile(p, v) };
        Ok(())
    }
    fn write16(&self, off: usize, v: u16) -> Result<()> {
        let p = self.at::<u16>(off)?;
        // SAFETY: `p` is inside the mapped BAR and aligned (see `at`).
        unsafe { std::ptr::write_volatile(p, v.to_le()) };
        Ok(())
    }
    fn write32(&self, off: usize, v: u32) -> Result<()> {
        let p = self.at::<u32>(off)?;
        // SAFETY: `p` is inside the mapped BAR and aligned (see `at`).
        unsafe { std::ptr::write_volatile(p, v.to_le()) };
        Ok(())
    }
    /// A 64-bit register as two 32-bit writes, low half first (virtio
    /// 1.3, 4.1.3.1 allows it).
    fn write64(&self, off: usize, v: u64) -> Result<()> {
        self.write32(off, v as u32)?;
        self.write32(off + 4, (v >> 32) as u32)
    }
}

/// One virtio capability as found in the config space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioCap {
    pub cfg_type: u8,
    pub bar: u8,
    pub offset: u32,
    pub length: u32,
    /// For the notify capability.
    pub notify_off_multiplier: u32,
}

/// The virtio capabilities in a function's config space (the first of
/// each type, as the spec asks a driver to use).
pub fn parse_caps(cfg: &[u8]) -> Result<Vec<VirtioCap>> {
    let byte = |at: usize| cfg.get(at).copied().unwrap_or(0);
    let le32 = |at: usize| u32::from_le_bytes([byte(at), byte(at + 1), byte(at + 2), byte(at + 3)]);
    if byte(0x06) & 0x10 == 0 {
        return Err(Error::Pci("the function has no capability list".into()));
    }
    let mut caps: Vec<VirtioCap> = Vec::new();
    let mut at = usize::from(byte(0x34) & 0xfc);
    // A malformed list may loop: 48 capabilities fill 256 bytes.
    for _ in 0..48 {
        if at < 0x40 || at + 16 > cfg.len() {
            break;
        }
        if byte(at) == CAP_VENDOR {
            let c = VirtioCap {
                cfg_type: byte(at + 3),
                bar: byte(at + 4),
                offset: le32(at + 8),
                length: le32(at + 12),
                notify_off_multiplier: if byte(at + 3) == CAP_NOTIFY {
                    le32(at + 16)
                } else {
                    0
                },
            };
            if c.bar <= 5 && !caps.iter().any(|x| x.cfg_type == c.cfg_type) {
                caps.push(c);
            }
        }
        at = usize::from(byte(at + 1) & 0xfc);
    }
    Ok(caps)
}

fn read_hex(path: &Path) -> Result<u16> {
    let s = fs::read_to_string(path).map_err(|e| Error::Pci(format!("{}: {e}", path.display())))?;
    u16::from_str_radix(s.trim().trim_start_matches("0x"), 16)
        .map_err(|_| Error::Pci(format!("{}: not a hex id: {s:?}", path.display())))
}

fn write_sys(path: &Path, what: &str) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::Pci(format!("{}: {e}", path.display())))?;
    f.write_all(what.as_bytes())
        .map_err(|e| Error::Pci(format!("writing {what:?} to {}: {e}", path.display())))
}

/// The driver a function is bound to, by name.
fn driver_of(dev: &Path) -> Option<String> {
    fs::read_link(dev.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// A kernel network interface of the function that is up, if any.
fn interface_up(dev: &Path) -> Option<String> {
    let virtio = fs::read_dir(dev).ok()?.flatten().find(|e| {
        e.file_name().to_string_lossy().starts_with("virtio") && e.path().join("net").is_dir()
    })?;
    for n in fs::read_dir(virtio.path().join("net")).ok()?.flatten() {
        let flags = fs::read_to_string(n.path().join("flags")).unwrap_or_default();
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap_or(0);
        if flags & 1 != 0 {
            return Some(n.file_name().to_string_lossy().into_owned());
        }
    }
    None
}

/// The first hugetlbfs mount.
pub fn hugetlbfs_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, at, kind, opts) = (f.next()?, f.next()?, f.next()?, f.next()?);
            // 2 MiB pages: the default size, or said so.
            let size = opts.split(',').find_map(|o| o.strip_prefix("pagesize="));
            (kind == "hugetlbfs" && size.is_none_or(|p| p == "2M")).then(|| PathBuf::from(at))
        })
        .ok_or_else(|| {
            Error::Pci(
                "no hugetlbfs of 2 MiB pages mounted (mount -t hugetlbfs none /dev/hugepages)"
                    .into(),
            )
        })
}

/// Which function, and the driver it had: what giving it back needs.
#[derive(Clone)]
struct Owner {
    bdf: String,
    dev: PathBuf,
    had: Option<String>,
}

impl Owner {
    /// Gives the function back: its driver_override cleared and the
    /// kernel asked to probe it, so the driver it had (or, if it had none,
    /// whichever driver claims it: virtio-pci) takes it. Nothing to do if
    /// it was on uio_pci_generic already.
    fn give_back(&self) {
        if self.had.as_deref() == Some("uio_pci_generic") {
            return;
        }
        let unbind = write_sys(&self.dev.join("driver/unbind"), &self.bdf);
        let clear = write_sys(&self.dev.join("driver_override"), "\n");
        let probe = write_sys(Path::new("/sys/bus/pci/drivers_probe"), &self.bdf);
        if let Err(e) = unbind.and(clear).and(probe) {
            log::warn!("giving {} back to {:?}: {e}", self.bdf, self.had);
        }
    }
}

/// The function's binding to uio_pci_generic; dropping it gives the
/// function back ([`Owner::give_back`]).
struct Binding(Owner);

impl Binding {
    fn take(bdf: &str, dev: &Path) -> Result<Binding> {
        let had = driver_of(dev);
        let b = Binding(Owner {
            bdf: bdf.to_string(),
            dev: dev.to_path_buf(),
            had: had.clone(),
        });
        if had.as_deref() == Some("uio_pci_generic") {
            return Ok(b);
        }
        if had.is_some() {
            write_sys(&dev.join("driver/unbind"), bdf)?;
        }
        write_sys(&dev.join("driver_override"), "uio_pci_generic")?;
        write_sys(Path::new("/sys/bus/pci/drivers_probe"), bdf)?;
        if driver_of(dev).as_deref() != Some("uio_pci_generic") {
            return Err(Error::Pci(format!(
                "{bdf} did not bind to uio_pci_generic (it needs INTx masking support)"
            )));
        }
        Ok(b)
    }
}

impl Drop for Binding {
    fn drop(&mut self) {
        self.0.give_back();
    }
}

/// What a signal needs to give one function back.
struct Claim {
    /// Whoever sets it first gives the function back: the transport's
    /// drop or the signal thread, never both.
    taken: Arc<AtomicBool>,
    common: Region,
    bars: Vec<Arc<Bar>>,
    config: File,
    owner: Owner,
}

impl Claim {
    fn give_back(&self) {
        let _ = self.common.write8(common::STATUS, 0);
        let _ = wait_reset(&self.common);
        self.bars.iter().for_each(|b| b.detach());
        let _ = set_intx_disabled(&self.config, false);
        self.owner.give_back();
    }
}

/// The functions this process holds, for the signal thread.
static CLAIMS: Mutex<Vec<Claim>> = Mutex::new(Vec::new());

/// Waits (up to 1 s) for a reset to complete: the status reads 0
/// (virtio 1.3, 4.1.4.3.2). Whether it did.
fn wait_reset(common: &Region) -> bool {
    let end = Instant::now() + Duration::from_secs(1);
    loop {
        match common.read8(common::STATUS) {
            Ok(0) | Err(_) => return true,
            Ok(_) if Instant::now() >= end => return false,
            Ok(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// Gives every function back when the process is told to stop (SIGINT,
/// SIGTERM, SIGHUP), as a normal exit does: one thread for the process
/// waits for those signals, which the threads started after it block,
/// then for each function not given back yet resets it, detaches its BAR
/// (see [`Bar::detach`]: the other threads still run), turns INTx back
/// on and rebinds it, and exits with 128 + the signal. Signals that
/// arrive before this is set up are handled as usual.
fn watch_signals() -> Result<()> {
    static STARTED: std::sync::OnceLock<std::result::Result<(), String>> =
        std::sync::OnceLock::new();
    STARTED
        .get_or_init(|| {
            // SAFETY: sigset_t is plain old data; sigemptyset initialises it.
            let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
            // SAFETY: `set` is a valid sigset_t for these calls; the
            // signal numbers are valid.
            unsafe {
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGINT);
                libc::sigaddset(&mut set, libc::SIGTERM);
                libc::sigaddset(&mut set, libc::SIGHUP);
            }
            // SAFETY: blocks the set in this thread (inherited by the
            // threads it starts); `set` is initialised and no old mask is
            // asked for.
            let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
            if r != 0 {
                return Err(std::io::Error::from_raw_os_error(r).to_string());
            }
            std::thread::Builder::new()
                .name("vnic-pci-signal".into())
                .spawn(move || {
                    let mut sig: libc::c_int = 0;
                    // SAFETY: `set` and `sig` are valid for the call,
                    // which waits for one of the blocked signals.
                    if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                        return;
                    }
                    let claims = match CLAIMS.lock() {
                        Ok(g) => g,
                        Err(p) => p.into_inner(),
                    };
                    for c in claims.iter() {
                        if !c.taken.swap(true, Ordering::SeqCst) {
                            c.give_back();
                        }
                    }
                    std::process::exit(128 + sig);
                })
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(Error::Pci)
}

/// Sets or clears the command register's INTx-disable bit (in its high
/// byte, where nothing else is ours to change).
fn set_intx_disabled(config: &File, disabled: bool) -> std::io::Result<()> {
    let mut hi = [0u8; 1];
    config.read_exact_at(&mut hi, 5)?;
    let v = if disabled {
        hi[0] | 0x04
    } else {
        hi[0] & !0x04
    };
    if v != hi[0] {
        config.write_all_at(&[v], 5)?;
    }
    Ok(())
}

/// How often the poller looks at the ISR.
const POLL: Duration = Duration::from_micros(100);

/// The thread that stands in for interrupts: INTx stays disabled at the
/// function, and the ISR (which the device sets whenever it would
/// interrupt, and a read clears) is read every [`POLL`]; when it is set,
/// every queue's eventfd is signalled.
///
/// Why not INTx through /dev/uioN: under QEMU 7.2 with TCG, INTx handed
/// between uio_pci_generic's mask-in-the-handler and this process's
/// unmask now and then stays asserted with the ISR clear, and the guest
/// kernel disables the line ("irq N: nobody cared"), for the kernel's own
/// driver too once the function is given back.
struct Poller {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Poller {
    fn start(isr: Region, calls: Vec<EventFd>) -> Result<Poller> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("vnic-pci-poll".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    std::thread::sleep(POLL);
                    if isr.read8(0).unwrap_or(1) & 1 != 0 {
                        for c in &calls {
                            let _ = c.write(1);
                        }
                    }
                }
            })?;
        Ok(Poller {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A virtio-net PCI function driven from user space.
pub struct PciTransport {
    common: Region,
    notify: Region,
    notify_mult: u32,
    device: Region,
    dma: DmaMemory,
    calls: Vec<EventFd>,
    /// Doorbell offset of each queue set up.
    notify_off: Vec<Option<usize>>,
    irq: Option<Poller>,
    /// The function's config space (sysfs).
    config: File,
    /// Set by whoever gives the function back (see [`watch_signals`]).
    taken: Arc<AtomicBool>,
    // Dropped after `irq` and the BARs' users: gives the function back.
    binding: Option<Binding>,
    bdf: String,
}

impl std::fmt::Debug for PciTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciTransport")
            .field("bdf", &self.bdf)
            .field("dma", &self.dma)
            .finish_non_exhaustive()
    }
}

fn map_bar(dev: &Path, bar: u8) -> Result<Arc<Bar>> {
    let path = dev.join(format!("resource{bar}"));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| Error::Pci(format!("{}: {e}", path.display())))?;
    let len = f.metadata()?.len() as usize;
    if len == 0 {
        return Err(Error::Pci(format!("BAR {bar} is not a memory BAR")));
    }
    // SAFETY: a new shared mapping of the whole resource file; the kernel
    // picks the address. The result is checked below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Error::Pci(format!(
            "mapping BAR {bar}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(Arc::new(Bar { ptr: p.cast(), len }))
}

impl PciTransport {
    /// Takes the virtio-net function at `bdf` (e.g. 0000:00:02.0) with
    /// `max_queues` virtqueues in mind and `mem_size` bytes of hugepages.
    pub fn open(bdf: &str, max_queues: usize, mem_size: usize) -> Result<PciTransport> {
        let dev = Path::new("/sys/bus/pci/devices").join(bdf);
        if !dev.exists() {
            return Err(Error::Pci(format!(
                "no PCI function {bdf} (see /sys/bus/pci/devices)"
            )));
        }
        let (vendor, device) = (
            read_hex(&dev.join("vendor"))?,
            read_hex(&dev.join("device"))?,
        );
        if vendor != VIRTIO_VENDOR || (device != NET_MODERN && device != NET_TRANSITIONAL) {
            return Err(Error::Pci(format!(
                "{bdf} is {vendor:04x}:{device:04x}, not a virtio-net function \
                 (1af4:1041, or 1af4:1000 with modern capabilities)"
            )));
        }
        if !Path::new("/sys/bus/pci/drivers/uio_pci_generic").exists() {
            return Err(Error::Pci(
                "uio_pci_generic is not loaded (modprobe uio_pci_generic)".into(),
            ));
        }
        if let Some(ifname) = interface_up(&dev) {
            return Err(Error::Pci(format!(
                "{bdf} is in use: its interface {ifname} is up (ip link set {ifname} down)"
            )));
        }
        let mount = hugetlbfs_mount()?;
        let mut cfg = Vec::new();
        File::open(dev.join("config"))?.read_to_end(&mut cfg)?;
        let caps = parse_caps(&cfg)?;
        let find = |t: u8| {
            caps.iter()
                .copied()
                .find(|c| c.cfg_type == t)
                .ok_or_else(|| {
                    Error::Pci(format!(
                        "{bdf} has no virtio capability of type {t}: not a modern virtio device"
                    ))
                })
        };
        let (cc, nc, ic, dc) = (
            find(CAP_COMMON)?,
            find(CAP_NOTIFY)?,
            find(CAP_ISR)?,
            find(CAP_DEVICE)?,
        );
        let dma = DmaMemory::hugepages(&mount, mem_size)?;
        dma.check_physical()?;
        let binding = Binding::take(bdf, &dev)?;
        // Memory decoding and bus mastering on (the device DMAs into the
        // hugepages).
        let cfg_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev.join("config"))?;
        let mut cmd = [0u8; 2];
        cfg_file.read_exact_at(&mut cmd, 4)?;
        let before = u16::from_le_bytes(cmd);
        let c = before | 0x6;
        cfg_file.write_all_at(&c.to_le_bytes(), 4)?;
        cfg_file.read_exact_at(&mut cmd, 4)?;
        let after = u16::from_le_bytes(cmd);
        debug!("{bdf}: command register {before:#06x} -> {after:#06x}");
        if after & 0x4 == 0 {
            return Err(Error::Pci(format!(
                "{bdf}: bus mastering stays off (command register {after:#06x})"
            )));
        }
        let mut bars: Vec<Option<Arc<Bar>>> = vec![None; 6];
        let mut region = |cap: VirtioCap, min: usize| -> Result<Region> {
            let b = usize::from(cap.bar);
            let bar = match &bars[b] {
                Some(m) => m.clone(),
                None => {
                    let m = map_bar(&dev, cap.bar)?;
                    bars[b] = Some(m.clone());
                    m
                }
            };
            let (offset, len) = (cap.offset as usize, cap.length as usize);
            if offset + len > bar.len || len < min {
                return Err(Error::Pci(format!(
                    "capability type {} ({len} bytes at {offset:#x}) does not fit BAR {b}",
                    cap.cfg_type
                )));
            }
            Ok(Region { bar, offset, len })
        };
        let common = region(cc, common::LEN)?;
        let notify = region(nc, 2)?;
        let isr = region(ic, 1)?;
        let device = region(dc, 0)?;
        if !dev.join("uio").is_dir() {
            return Err(Error::Pci(format!("{bdf} has no uio device")));
        }
        let nq = usize::from(common.read16(common::NUMQ)?).max(max_queues);
        let calls = (0..nq)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        let mut clones = Vec::with_capacity(nq);
        for c in &calls {
            clones.push(c.try_clone()?);
        }
        watch_signals()?;
        let irq = Poller::start(isr, clones)?;
        let taken = Arc::new(AtomicBool::new(false));
        let claim = Claim {
            taken: taken.clone(),
            common: common.clone(),
            bars: bars.iter().flatten().cloned().collect(),
            config: cfg_file.try_clone()?,
            owner: binding.0.clone(),
        };
        // Last, so that no failed step leaves INTx off.
        set_intx_disabled(&cfg_file, true)?;
        if let Ok(mut c) = CLAIMS.lock() {
            c.push(claim);
        }
        debug!("{bdf}: {nq} queues, caps {caps:?}");
        Ok(PciTransport {
            common,
            notify,
            notify_mult: nc.notify_off_multiplier,
            device,
            dma,
            calls,
            notify_off: vec![None; nq],
            irq: Some(irq),
            config: cfg_file,
            taken,
            binding: Some(binding),
            bdf: bdf.to_string(),
        })
    }
}

impl Transport for PciTransport {
    fn set_status(&mut self, status: DeviceStatus) -> Result<()> {
        self.common.write8(common::STATUS, status.bits())?;
        if status.is_empty() {
            if !wait_reset(&self.common) {
                return Err(Error::Pci(format!("{} does not reset", self.bdf)));
            }
            self.common.write16(common::MSIX, NO_VECTOR)?;
        }
        Ok(())
    }

    fn status(&mut self) -> Result<DeviceStatus> {
        Ok(DeviceStatus::from_bits_retain(
            self.common.read8(common::STATUS)?,
        ))
    }

    fn device_features(&mut self) -> Result<Features> {
        self.common.write32(common::DFSELECT, 0)?;
        let lo = self.common.read32(common::DF)?;
        self.common.write32(common::DFSELECT, 1)?;
        let hi = self.common.read32(common::DF)?;
        Ok(Features::from_bits_retain(
            u64::from(hi) << 32 | u64::from(lo),
        ))
    }

    fn set_driver_features(&mut self, f: Features) -> Result<()> {
        self.common.write32(common::GFSELECT, 0)?;
        self.common.write32(common::GF, f.bits() as u32)?;
        self.common.write32(common::GFSELECT, 1)?;
        self.common.write32(common::GF, (f.bits() >> 32) as u32)
    }

    fn max_queue_size(&mut self, index: usize) -> Result<u16> {
        if index >= usize::from(self.common.read16(common::NUMQ)?) {
            return Ok(0);
        }
        self.common.write16(common::Q_SELECT, index as u16)?;
        self.common.read16(common::Q_SIZE)
    }

    fn dma(&mut self) -> &mut DmaMemory {
        &mut self.dma
    }

    fn setup_queue(&mut self, index: usize, q: &SplitQueue, enable: bool) -> Result<()> {
        let c = &self.common;
        c.write16(common::Q_SELECT, index as u16)?;
        c.write16(common::Q_SIZE, q.size)?;
        c.write16(common::Q_MSIX, NO_VECTOR)?;
        c.write64(common::Q_DESC, q.desc.raw_value())?;
        c.write64(common::Q_AVAIL, q.avail.raw_value())?;
        c.write64(common::Q_USED, q.used.raw_value())?;
        let off = usize::from(c.read16(common::Q_NOFF)?) * self.notify_mult as usize;
        // The doorbell must lie in the notify window.
        self.notify.at::<u16>(off)?;
        let slot = self
            .notify_off
            .get_mut(index)
            .ok_or(QueueError::Missing(index))?;
        *slot = Some(off);
        if enable {
            c.write16(common::Q_ENABLE, 1)?;
        }
        debug!(
            "{}: queue {index}: {} entries, desc {:#x} avail {:#x} used {:#x}, doorbell at {off:#x}",
            self.bdf,
            q.size,
            q.desc.raw_value(),
            q.avail.raw_value(),
            q.used.raw_value()
        );
        Ok(())
    }

    fn doorbell(&self, index: usize) -> Result<Doorbell> {
        let off = self
            .notify_off
            .get(index)
            .copied()
            .flatten()
            .ok_or(QueueError::NotSetUp(index))?;
        let n = self.notify.clone();
        Ok(Doorbell::new(move || {
            n.write16(off, index as u16)
                .map_err(|e| std::io::Error::other(e.to_string()))
        }))
    }

    fn interrupt(&self, index: usize) -> Result<EventFd> {
        let c = self.calls.get(index).ok_or(QueueError::NotSetUp(index))?;
        Ok(c.try_clone()?)
    }

    fn read_config(&mut self, offset: usize, len: usize) -> Result<Vec<u8>> {
        let len = len.min(self.device.len.saturating_sub(offset));
        // Read until the generation is the same before and after (virtio
        // 1.3, 4.1.4.3.1), a bounded number of times.
        // Aligned 16-bit reads: virtio-net's 16-bit fields each in one
        // access of their width (virtio 1.3, 4.1.3.1), its bytes two at a
        // time. Not 32-bit: a word that runs past the end of a config
        // shorter than the fields asked for (one without MTU, say) reads
        // as all ones on QEMU, the field in it included.
        let (first, end) = (offset & !1, (offset + len).div_ceil(2) * 2);
        let end = end.min(self.device.len & !1);
        for _ in 0..100 {
            let g = self.common.read8(common::CFGGEN)?;
            let mut words = Vec::with_capacity(end.saturating_sub(first));
            for at in (first..end).step_by(2) {
                words.extend_from_slice(&self.device.read16(at)?.to_le_bytes());
            }
            if self.common.read8(common::CFGGEN)? == g {
                let from = offset - first;
                return Ok(words
                    .get(from..from + len)
                    .or_else(|| words.get(from..))
                    .unwrap_or_default()
                    .to_vec());
            }
        }
        Err(Error::Pci(format!(
            "{}: the config space keeps changing",
            self.bdf
        )))
    }
}

impl Drop for PciTransport {
    fn drop(&mut self) {
        if let Ok(mut c) = CLAIMS.lock() {
            c.retain(|x| !Arc::ptr_eq(&x.taken, &self.taken));
        }
        if self.taken.swap(true, Ordering::SeqCst) {
            // A signal got there first: the signal thread gives the
            // function back and ends the process.
            self.irq.take();
            if let Some(b) = self.binding.take() {
                std::mem::forget(b);
            }
            return;
        }
        // Reset first: the device stops using the rings before they go.
        let _ = self.common.write8(common::STATUS, 0);
        let _ = wait_reset(&self.common);
        self.irq.take();
        // Doorbells other threads still hold must not fault once the
        // kernel's driver claims the BAR.
        for r in [&self.common, &self.notify, &self.device] {
            r.bar.detach();
        }
        // The kernel's driver expects INTx on.
        if let Err(e) = set_intx_disabled(&self.config, false) {
            log::warn!("{}: unmasking INTx: {e}", self.bdf);
        }
        self.binding.take();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Config space with a capability list: a non-virtio capability, then
    /// the four virtio ones (a second common one, which is ignored).
    fn config_space() -> Vec<u8> {
        let mut c = vec![0u8; 256];
        c[0x06] = 0x10;
        c[0x34] = 0x40;
        let mut at = 0x40;
        let mut put = |c: &mut Vec<u8>, id: u8, next: u8, body: &[u8]| {
            c[at] = id;
            c[at + 1] = next;
            c[at + 2..at + 2 + body.len()].copy_from_slice(body);
            at = usize::from(next);
        };
        // MSI-X (id 0x11), 12 bytes.
        put(&mut c, 0x11, 0x50, &[10, 0, 0, 0]);
        let vcap = |t: u8, bar: u8, off: u32, len: u32, extra: Option<u32>| {
            let mut b = vec![if extra.is_some() { 20 } else { 16 }, t, bar, 0, 0, 0];
            b.extend_from_slice(&off.to_le_bytes());
            b.extend_from_slice(&len.to_le_bytes());
            if let Some(m) = extra {
                b.extend_from_slice(&m.to_le_bytes());
            }
            b
        };
        put(
            &mut c,
            CAP_VENDOR,
            0x60,
            &vcap(CAP_COMMON, 4, 0, 0x1000, None),
        );
        put(
            &mut c,
            CAP_VENDOR,
            0x70,
            &vcap(CAP_ISR, 4, 0x1000, 0x1000, None),
        );
        put(
            &mut c,
            CAP_VENDOR,
            0x80,
            &vcap(CAP_DEVICE, 4, 0x2000, 0x1000, None),
        );
        put(
            &mut c,
            CAP_VENDOR,
            0x98,
            &vcap(CAP_NOTIFY, 4, 0x3000, 0x1000, Some(4)),
        );
        put(
            &mut c,
            CAP_VENDOR,
            0x00,
            &vcap(CAP_COMMON, 2, 0x100, 0x38, None),
        );
        c
    }

    #[test]
    fn the_virtio_capabilities_are_found_first_of_each_kind() {
        let caps = parse_caps(&config_space()).unwrap();
        assert_eq!(caps.len(), 4);
        let common = caps.iter().find(|c| c.cfg_type == CAP_COMMON).unwrap();
        assert_eq!((common.bar, common.offset, common.length), (4, 0, 0x1000));
        let notify = caps.iter().find(|c| c.cfg_type == CAP_NOTIFY).unwrap();
        assert_eq!((notify.offset, notify.notify_off_multiplier), (0x3000, 4));
    }

    #[test]
    fn a_looping_or_missing_list_ends() {
        let mut c = config_space();
        c[0x99] = 0x40; // the last capability points back to the first
        assert_eq!(parse_caps(&c).unwrap().len(), 4);
        let mut c = config_space();
        c[0x06] = 0;
        assert!(parse_caps(&c).is_err());
        assert!(parse_caps(&[0u8; 8]).is_err());
    }
}
