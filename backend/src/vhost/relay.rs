//! A relay between the frontend's socket and the vhost-user backend.
//!
//! QEMU (7.2, Debian 12's) sends VHOST_USER_SET_VRING_ENABLE at every
//! virtio-net reset, before the driver has negotiated features and so
//! before VHOST_USER_F_PROTOCOL_FEATURES is acked in SET_FEATURES. The
//! vhost crate answers such a message with an error that ends the
//! connection. The relay passes every message through (with its file
//! descriptors) except those early SET_VRING_ENABLE: it answers them
//! itself, keeps the last state asked for each vring, and hands those
//! states to the backend right after SET_FEATURES acks the protocol
//! features (QEMU does not send them again when the device starts).
//!
//! With several queue pairs QEMU drives one vhost device per pair over the
//! same connection, and each adds (VHOST_USER_ADD_MEM_REG) and removes the
//! same memory regions. The backend takes a region once; the relay counts
//! the devices that added a region, acks the repeats itself, and passes a
//! removal on only when the last of them removes it.

use std::{
    fs::File,
    io::{self, Read, Write},
    net::Shutdown,
    os::{
        fd::{AsRawFd, FromRawFd, RawFd},
        unix::net::UnixStream,
    },
    sync::{Arc, Mutex, PoisonError},
    thread::{self, JoinHandle},
};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const HDR_LEN: usize = 12;
/// Largest payload the protocol defines (SET_MEM_TABLE, GET_CONFIG).
const MAX_PAYLOAD: usize = 4096;
const MAX_FDS: usize = 32;

const SET_FEATURES: u32 = 2;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_ENABLE: u32 = 18;
const ADD_MEM_REG: u32 = 37;
const REM_MEM_REG: u32 = 38;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const PROTOCOL_FEATURES: u64 = 1 << 30;

/// One message: header, payload and the file descriptors it carried.
struct Msg {
    hdr: [u8; HDR_LEN],
    payload: Vec<u8>,
    fds: Vec<File>,
}

impl Msg {
    fn request(&self) -> u32 {
        u32::from_le_bytes([self.hdr[0], self.hdr[1], self.hdr[2], self.hdr[3]])
    }
    fn flags(&self) -> u32 {
        u32::from_le_bytes([self.hdr[4], self.hdr[5], self.hdr[6], self.hdr[7]])
    }
}

/// Reads one message; `None` at end of stream.
fn recv(s: &UnixStream) -> io::Result<Option<Msg>> {
    let mut hdr = [0u8; HDR_LEN];
    let mut raw = [0 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: HDR_LEN,
    }];
    // SAFETY: the iovec points at `hdr`, which is writable for its whole
    // length and outlives the call.
    let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut raw) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let fds = raw[..nfds]
        .iter()
        // SAFETY: recvmsg just gave us these descriptors; nothing else owns
        // them.
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    let mut got = n;
    let mut r = s;
    while got < HDR_LEN {
        let k = r.read(&mut hdr[got..])?;
        if k == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += k;
    }
    let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message of {size} bytes"),
        ));
    }
    let mut payload = vec![0u8; size];
    r.read_exact(&mut payload)?;
    Ok(Some(Msg { hdr, payload, fds }))
}

fn send(s: &UnixStream, m: &Msg) -> io::Result<()> {
    let fds: Vec<RawFd> = m.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let bufs: [&[u8]; 2] = [&m.hdr, &m.payload];
    let total = HDR_LEN + m.payload.len();
    let n = s
        .send_with_fds(&bufs[..], &fds)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    if n < total {
        // The descriptors went with the first bytes; send the rest plainly.
        let mut all = Vec::with_capacity(total);
        all.extend_from_slice(&m.hdr);
        all.extend_from_slice(&m.payload);
        let mut w = s;
        w.write_all(&all[n..])?;
    }
    Ok(())
}

/// A reply to `request` carrying u64 `value` (REPLY_ACK: 0 is success).
fn reply(request: u32, value: u64) -> Msg {
    let mut hdr = [0u8; HDR_LEN];
    hdr[..4].copy_from_slice(&request.to_le_bytes());
    hdr[4..8].copy_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
    hdr[8..12].copy_from_slice(&8u32.to_le_bytes());
    Msg {
        hdr,
        payload: value.to_le_bytes().to_vec(),
        fds: Vec::new(),
    }
}

/// Relays between `front` (the VMM) and `back` (the vhost-user backend)
/// until either side closes. Returns the two relay threads.
pub fn relay(front: UnixStream, back: UnixStream) -> io::Result<Vec<JoinHandle<()>>> {
    let to_front = Arc::new(Mutex::new(front.try_clone()?));
    let back_w = back.try_clone()?;
    let front_r = front;
    let back_r = back;
    let tf = to_front.clone();
    // Either side closing ends both.
    let ends = Arc::new((front_r.try_clone()?, back_w.try_clone()?));
    let ends2 = ends.clone();
    let down = move || {
        let _ = ends.0.shutdown(Shutdown::Both);
        let _ = ends.1.shutdown(Shutdown::Both);
    };
    let down2 = move || {
        let _ = ends2.0.shutdown(Shutdown::Both);
        let _ = ends2.1.shutdown(Shutdown::Both);
    };
    let fwd = thread::Builder::new()
        .name("vnicd-relay-fe".into())
        .spawn(move || {
            let mut acked = false;
            // vring index -> the SET_VRING_ENABLE payload last asked for.
            let mut pending: Vec<(u32, Vec<u8>)> = Vec::new();
            // Memory regions the backend has, and how many devices added each.
            let mut regions: Vec<(Vec<u8>, u32)> = Vec::new();
            loop {
                let m = match recv(&front_r) {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        log::debug!("relay from frontend: {e}");
                        break;
                    }
                };
                log::trace!(
                    "frontend request {} flags {:#x} size {} fds {}",
                    m.request(),
                    m.flags(),
                    m.payload.len(),
                    m.fds.len()
                );
                match m.request() {
                    SET_FEATURES if m.payload.len() >= 8 => {
                        let mut v = [0u8; 8];
                        v.copy_from_slice(&m.payload[..8]);
                        acked = u64::from_le_bytes(v) & PROTOCOL_FEATURES != 0;
                    }
                    SET_VRING_ENABLE if !acked => {
                        log::debug!("holding an early SET_VRING_ENABLE");
                        if m.payload.len() >= 4 {
                            let index = u32::from_le_bytes([
                                m.payload[0],
                                m.payload[1],
                                m.payload[2],
                                m.payload[3],
                            ]);
                            pending.retain(|(i, _)| *i != index);
                            pending.push((index, m.payload.clone()));
                        }
                        if m.flags() & FLAG_NEED_REPLY != 0 {
                            let f = tf.lock().unwrap_or_else(PoisonError::into_inner);
                            if send(&f, &reply(SET_VRING_ENABLE, 0)).is_err() {
                                break;
                            }
                        }
                        continue;
                    }
                    SET_MEM_TABLE => regions.clear(),
                    ADD_MEM_REG | REM_MEM_REG if m.payload.len() >= 40 => {
                        // guest address, size, user address, mmap offset.
                        let key = m.payload[8..40].to_vec();
                        let add = m.request() == ADD_MEM_REG;
                        let n = regions.iter().position(|(k, _)| *k == key);
                        let pass = match (add, n) {
                            (true, Some(i)) => {
                                regions[i].1 += 1;
                                false
                            }
                            (true, None) => {
                                regions.push((key, 1));
                                true
                            }
                            (false, Some(i)) if regions[i].1 > 1 => {
                                regions[i].1 -= 1;
                                false
                            }
                            (false, Some(i)) => {
                                regions.swap_remove(i);
                                true
                            }
                            (false, None) => true,
                        };
                        if !pass {
                            log::debug!("region already known to the backend: acked here");
                            if m.flags() & FLAG_NEED_REPLY != 0 {
                                let f = tf.lock().unwrap_or_else(PoisonError::into_inner);
                                if send(&f, &reply(m.request(), 0)).is_err() {
                                    break;
                                }
                            }
                            continue;
                        }
                    }
                    _ => {}
                }
                if let Err(e) = send(&back_w, &m) {
                    log::debug!("relay to backend: {e}");
                    break;
                }
                if acked && !pending.is_empty() {
                    // Now the backend takes them; no reply is asked for.
                    let mut failed = false;
                    for (_, payload) in pending.drain(..) {
                        let mut hdr = [0u8; HDR_LEN];
                        hdr[..4].copy_from_slice(&SET_VRING_ENABLE.to_le_bytes());
                        hdr[4..8].copy_from_slice(&FLAG_VERSION.to_le_bytes());
                        hdr[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
                        let msg = Msg {
                            hdr,
                            payload,
                            fds: Vec::new(),
                        };
                        failed |= send(&back_w, &msg).is_err();
                    }
                    if failed {
                        break;
                    }
                }
            }
            down();
        })?;
    let bwd = thread::Builder::new()
        .name("vnicd-relay-be".into())
        .spawn(move || {
            loop {
                let m = match recv(&back_r) {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        log::debug!("relay from backend: {e}");
                        break;
                    }
                };
                let f = to_front.lock().unwrap_or_else(PoisonError::into_inner);
                if let Err(e) = send(&f, &m) {
                    log::debug!("relay to frontend: {e}");
                    break;
                }
            }
            down2();
        })?;
    Ok(vec![fwd, bwd])
}
