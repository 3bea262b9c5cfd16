//! A multi-queue TAP device with virtio-net headers (IFF_VNET_HDR), one
//! queue per device queue pair.

use std::{
    fs::{File, OpenOptions},
    io,
    os::{
        fd::{AsRawFd, RawFd},
        unix::fs::OpenOptionsExt,
    },
};

use super::{too_many_pieces, Offloads, Piece, PieceMut, Uplink, MAX_PIECES};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
/// `_IO('T', 227)`: a file descriptor of the device's network namespace
/// (Linux 5.2).
const TUNGETDEVNETNS: libc::c_ulong = 0x54e3;

const IFF_TAP: i16 = 0x0002;
const IFF_MULTI_QUEUE: i16 = 0x0100;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;

const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_TSO_ECN: libc::c_uint = 0x08;
const TUN_F_USO4: libc::c_uint = 0x20;
const TUN_F_USO6: libc::c_uint = 0x40;

/// The virtio-net header size used on the TAP (with num_buffers).
pub const VNET_HDR_LEN: usize = 12;
/// Longest frame a TAP hands over (a 64 KiB GSO frame and its headers).
pub const MAX_TAP_FRAME: usize = 65535 + 14 + 8;

const EMPTY_IOVEC: libc::iovec = libc::iovec {
    iov_base: std::ptr::null_mut(),
    iov_len: 0,
};

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

/// A TAP device opened with one file per queue.
#[derive(Debug)]
pub struct Tap {
    name: String,
    files: Vec<File>,
    /// A socket in the device's namespace, to read its flags, and that
    /// namespace's inode (the device may be moved to another).
    probe: std::sync::Mutex<Option<(u64, std::os::fd::OwnedFd)>>,
}

fn ioctl_ptr<T>(f: &File, req: libc::c_ulong, arg: *mut T) -> io::Result<()> {
    // SAFETY: `f` is an open TUN file; `arg` points to a live value of the
    // type the request expects, valid for the duration of the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ioctl_val(f: &File, req: libc::c_ulong, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: `f` is an open TUN file and the request takes its argument by
    // value; no memory is passed.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Up to [`MAX_PIECES`] iovecs in a fixed array, and how many.
fn iovecs(
    items: impl Iterator<Item = libc::iovec>,
) -> io::Result<([libc::iovec; MAX_PIECES], usize)> {
    let mut iov = [EMPTY_IOVEC; MAX_PIECES];
    let mut n = 0;
    for v in items {
        let slot = iov.get_mut(n).ok_or_else(too_many_pieces)?;
        *slot = v;
        n += 1;
    }
    Ok((iov, n))
}

/// A byte count from readv/writev, or the error it reported.
fn syscall_len(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

impl Tap {
    /// Opens (creating if absent) the TAP device `name` with `queues`
    /// queues, non-blocking, with 12-byte virtio-net headers.
    pub fn open(name: &str, queues: usize) -> io::Result<Tap> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("tap name {name:?} must be 1 to 15 bytes"),
            ));
        }
        let mut files = Vec::with_capacity(queues);
        for _ in 0..queues.max(1) {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open("/dev/net/tun")?;
            let mut req = IfReq {
                name: [0; libc::IFNAMSIZ],
                flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE,
                _pad: [0; 22],
            };
            req.name[..name.len()].copy_from_slice(name.as_bytes());
            ioctl_ptr(&f, TUNSETIFF, &mut req)?;
            let mut sz: libc::c_int = VNET_HDR_LEN as libc::c_int;
            ioctl_ptr(&f, TUNSETVNETHDRSZ, &mut sz)?;
            files.push(f);
        }
        let tap = Tap {
            name: name.to_owned(),
            files,
            probe: std::sync::Mutex::new(None),
        };
        // Until the guest says otherwise, hand back only plain frames.
        tap.set_rx_offloads(Offloads::default())?;
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the device is up and running (IFF_UP and IFF_RUNNING) in
    /// whatever network namespace it is in now.
    fn link_flags(&self) -> io::Result<bool> {
        use std::os::fd::{FromRawFd, OwnedFd};
        let f = self.file(0)?;
        // SAFETY: TUNGETDEVNETNS takes no argument and returns a new file
        // descriptor, owned below.
        let ns = unsafe { libc::ioctl(f.as_raw_fd(), TUNGETDEVNETNS) };
        if ns < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `ns` was just returned by the kernel and nothing else
        // owns it.
        let ns = unsafe { OwnedFd::from_raw_fd(ns) };
        // SAFETY: `stat` is plain old data; fstat fills it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `ns` is open and `st` is a valid out-pointer.
        if unsafe { libc::fstat(ns.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut probe = self
            .probe
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if probe.as_ref().is_none_or(|(ino, _)| *ino != st.st_ino) {
            // A socket belongs to the namespace it is made in: make it on
            // a thread that enters the device's namespace.
            let sock = std::thread::scope(|sc| {
                sc.spawn(|| -> io::Result<OwnedFd> {
                    // SAFETY: setns on an open namespace fd changes only
                    // this short-lived thread's namespace.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // SAFETY: plain socket(2); checked below.
                    let fd = unsafe {
                        libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0)
                    };
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // SAFETY: `fd` was just returned and nothing else owns it.
                    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
                })
                .join()
                .map_err(|_| io::Error::other("namespace probe thread panicked"))?
            })?;
            *probe = Some((st.st_ino, sock));
        }
        let Some((_, sock)) = probe.as_ref() else {
            return Err(io::Error::other("no probe socket"));
        };
        // The device's name now (it may have been renamed).
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        ioctl_ptr(f, TUNGETIFF, &mut req)?;
        req.flags = 0;
        // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags
        // into `req`, a live ifreq-sized value.
        let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let up = libc::IFF_UP as i16 | libc::IFF_RUNNING as i16;
        Ok(req.flags & up == up)
    }

    fn file(&self, q: usize) -> io::Result<&File> {
        self.files
            .get(q)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no such tap queue"))
    }
}

impl Uplink for Tap {
    fn queues(&self) -> usize {
        self.files.len()
    }

    fn link_up(&self) -> Option<bool> {
        match self.link_flags() {
            Ok(up) => Some(up),
            Err(e) => {
                log::debug!("tap {}: link state: {e}", self.name);
                None
            }
        }
    }

    fn tx_offloads(&self) -> Offloads {
        // The kernel takes any valid virtio-net header from a TAP writer and
        // segments or checksums in software when the path needs it.
        Offloads::ALL
    }

    fn set_rx_offloads(&self, o: Offloads) -> io::Result<()> {
        let mut flags = 0;
        if o.csum {
            flags |= TUN_F_CSUM;
            if o.tso4 {
                flags |= TUN_F_TSO4;
            }
            if o.tso6 {
                flags |= TUN_F_TSO6;
            }
            if o.tso_ecn && (o.tso4 || o.tso6) {
                flags |= TUN_F_TSO_ECN;
            }
        }
        let f = self.file(0)?;
        if o.csum && o.uso {
            // USO needs Linux 6.2; older kernels refuse the flags.
            if ioctl_val(
                f,
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags | TUN_F_USO4 | TUN_F_USO6),
            )
            .is_ok()
            {
                return Ok(());
            }
        }
        ioctl_val(f, TUNSETOFFLOAD, libc::c_ulong::from(flags))
    }

    fn send(&self, q: usize, pieces: &[Piece<'_>]) -> io::Result<usize> {
        self.send_parts(q, pieces, &[])
    }

    fn send_parts(&self, q: usize, front: &[Piece<'_>], rest: &[Piece<'_>]) -> io::Result<usize> {
        let f = self.file(q)?;
        let (iov, n) = iovecs(front.iter().chain(rest).map(Piece::iovec))?;
        // SAFETY: every iovec points at memory that stays mapped and
        // readable for the call: vnicd's own slices are borrowed, guest
        // slices borrow the guest memory mapping. The kernel only reads.
        let r = unsafe { libc::writev(f.as_raw_fd(), iov.as_ptr(), n as libc::c_int) };
        syscall_len(r)
    }

    fn recv(&self, q: usize, pieces: &mut [PieceMut<'_>]) -> io::Result<usize> {
        let f = self.file(q)?;
        let (iov, n) = iovecs(pieces.iter_mut().map(|p| p.iovec()))?;
        let room: usize = iov[..n].iter().map(|v| v.iov_len).sum();
        // SAFETY: every iovec points at writable memory that stays mapped
        // for the call: vnicd's own buffers are borrowed mutably, guest
        // slices borrow the guest memory mapping (which the guest handed
        // to the device in these RX buffers).
        let r = unsafe { libc::readv(f.as_raw_fd(), iov.as_ptr(), n as libc::c_int) };
        let r = syscall_len(r)?;
        // TUN copies what fits and returns the frame's full length.
        if r > room {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "frame did not fit",
            ));
        }
        Ok(r)
    }

    fn rx_fd(&self, q: usize) -> Option<RawFd> {
        self.files.get(q).map(AsRawFd::as_raw_fd)
    }
}
