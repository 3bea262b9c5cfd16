//! A relay between the frontend's socket and the vhost-user backend.
//!
//! QEMU (7.2, Debian 12's) sends VHOST_USER_SET_VRING_ENABLE at every
//! virtio-net reset, before the driver has negotiated features and so
//! before VHOST_USER_F_PROTOCOL_FEATURES is acked in SET_FEATURES. The
//! vhost crate answers such a message with an error that ends the
//! connection. The relay passes every message through (with its file
//! descriptors) except those early SET_VRING_ENABLE: it answers them
//! itself, keeps the last state asked for each vring (of the device's
//! vrings, so at most one entry each), and hands those states to the
//! backend right after SET_FEATURES acks the protocol features (QEMU does
//! not send them again when the device starts).
//!
//! With several queue pairs QEMU drives one vhost device per pair over the
//! same connection, and each adds (VHOST_USER_ADD_MEM_REG) and removes the
//! same memory regions. The backend takes a region once; the relay counts
//! the devices that added a region, acks the repeats itself, and passes a
//! removal on only when the last of them removes it. A region counts only
//! once the backend accepted it: with REPLY_ACK in force (as the vhost
//! crate decides it: GET_FEATURES answered, with PROTOCOL_FEATURES in it
//! as vnicd always offers, and REPLY_ACK acked in SET_PROTOCOL_FEATURES) the relay asks the
//! backend for its answer to every ADD_MEM_REG (passing the answer on only
//! if the frontend asked for one), and repeats of a region whose first add
//! is still unanswered get that answer too. The backend ends the
//! connection after refusing a region either way; until then the relay's
//! count stays true.
//!
//! The decisions are [`RelayCore`]'s, apart from the sockets, so that they
//! are tested and fuzzed on message streams alone.

use std::{
    collections::VecDeque,
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

pub const HDR_LEN: usize = 12;
/// Largest payload the protocol defines (SET_MEM_TABLE, GET_CONFIG).
pub const MAX_PAYLOAD: usize = 4096;
const MAX_FDS: usize = 32;
/// Memory regions a backend takes (vhost's VHOST_USER_MAX_MEM_SLOTS).
pub const MAX_REGIONS: usize = 509;

pub const GET_FEATURES: u32 = 1;
pub const SET_FEATURES: u32 = 2;
pub const SET_MEM_TABLE: u32 = 5;
pub const SET_PROTOCOL_FEATURES: u32 = 16;
pub const SET_VRING_ENABLE: u32 = 18;
pub const ADD_MEM_REG: u32 = 37;
pub const REM_MEM_REG: u32 = 38;
pub const FLAG_VERSION: u32 = 0x1;
pub const FLAG_REPLY: u32 = 0x4;
pub const FLAG_NEED_REPLY: u32 = 0x8;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;
/// Bytes of an ADD/REM_MEM_REG payload that name a region: guest
/// address, size, user address and mmap offset (after 8 bytes of padding).
const REGION_KEY: std::ops::Range<usize> = 8..40;

/// One message: header, payload and the file descriptors it carried.
#[derive(Debug)]
pub struct Msg {
    pub hdr: [u8; HDR_LEN],
    pub payload: Vec<u8>,
    pub fds: Vec<File>,
}

impl Msg {
    /// A message with no descriptors.
    pub fn new(request: u32, flags: u32, payload: Vec<u8>) -> Msg {
        let mut hdr = [0u8; HDR_LEN];
        hdr[..4].copy_from_slice(&request.to_le_bytes());
        hdr[4..8].copy_from_slice(&flags.to_le_bytes());
        hdr[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        Msg {
            hdr,
            payload,
            fds: Vec::new(),
        }
    }

    pub fn request(&self) -> u32 {
        u32::from_le_bytes([self.hdr[0], self.hdr[1], self.hdr[2], self.hdr[3]])
    }

    pub fn flags(&self) -> u32 {
        u32::from_le_bytes([self.hdr[4], self.hdr[5], self.hdr[6], self.hdr[7]])
    }

    fn set_flags(&mut self, flags: u32) {
        self.hdr[4..8].copy_from_slice(&flags.to_le_bytes());
    }

    pub fn needs_reply(&self) -> bool {
        self.flags() & FLAG_NEED_REPLY != 0
    }

    pub fn is_reply(&self) -> bool {
        self.flags() & FLAG_REPLY != 0
    }

    /// The u64 a REPLY_ACK answer carries (0 is success).
    pub fn ack_value(&self) -> Option<u64> {
        Some(u64::from_le_bytes(self.payload.get(..8)?.try_into().ok()?))
    }

    /// The payload size the header announces, checked against the
    /// protocol's largest.
    pub fn payload_len(hdr: &[u8; HDR_LEN]) -> io::Result<usize> {
        let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
        if size > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("vhost-user message of {size} bytes"),
            ));
        }
        Ok(size)
    }

    /// Parses one message from the front of `bytes`: the message and the
    /// bytes it took, `Ok(None)` when `bytes` holds less than a whole one.
    pub fn parse(bytes: &[u8]) -> io::Result<Option<(Msg, usize)>> {
        let Some(hdr) = bytes.get(..HDR_LEN) else {
            return Ok(None);
        };
        let mut h = [0u8; HDR_LEN];
        h.copy_from_slice(hdr);
        let size = Msg::payload_len(&h)?;
        let Some(payload) = bytes.get(HDR_LEN..HDR_LEN + size) else {
            return Ok(None);
        };
        Ok(Some((
            Msg {
                hdr: h,
                payload: payload.to_vec(),
                fds: Vec::new(),
            },
            HDR_LEN + size,
        )))
    }
}

/// A REPLY_ACK answer to `request` (0 is success).
pub fn reply(request: u32, value: u64) -> Msg {
    Msg::new(
        request,
        FLAG_VERSION | FLAG_REPLY,
        value.to_le_bytes().to_vec(),
    )
}

/// Where a message goes.
#[derive(Debug)]
pub enum Out {
    ToBackend(Msg),
    ToFrontend(Msg),
}

/// A memory region as the relay tracks it.
#[derive(Debug)]
struct Region {
    key: [u8; 32],
    /// Devices that added it and did not remove it.
    users: u32,
    /// The backend has not answered its ADD_MEM_REG yet: the number of
    /// that request among those owed.
    pending: Option<u64>,
}

/// An ADD_MEM_REG whose answer the backend owes.
#[derive(Debug)]
struct Owed {
    id: u64,
    key: [u8; 32],
    /// The frontend asked for the answer itself.
    pass_on: bool,
    /// Repeats of the region, added before the answer came, that asked
    /// for one: they get the same answer.
    waiting: u32,
}

/// The relay's decisions; see the module documentation.
#[derive(Debug)]
pub struct RelayCore {
    /// Vrings the device has: SET_VRING_ENABLE for others is refused.
    vrings: u32,
    acked: bool,
    /// GET_FEATURES went to the backend, which offers PROTOCOL_FEATURES
    /// (vnicd always does): the vhost crate then knows it was offered.
    offered: bool,
    /// SET_PROTOCOL_FEATURES acked REPLY_ACK.
    acked_reply_ack: bool,
    /// vring index -> the SET_VRING_ENABLE payload last asked for.
    pending: Vec<(u32, Vec<u8>)>,
    regions: Vec<Region>,
    owed: VecDeque<Owed>,
    /// Numbers the ADD_MEM_REG answers owed.
    next_owed: u64,
}

/// The relay cannot go on (the connection ends).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Fatal(pub String);

impl RelayCore {
    pub fn new(vrings: u32) -> RelayCore {
        RelayCore {
            vrings,
            acked: false,
            offered: false,
            acked_reply_ack: false,
            pending: Vec::new(),
            regions: Vec::new(),
            owed: VecDeque::new(),
            next_owed: 0,
        }
    }

    /// Whether the backend answers requests that ask for it (REPLY_ACK
    /// in force, by the vhost crate's rule).
    pub fn reply_ack(&self) -> bool {
        self.offered && self.acked_reply_ack
    }

    /// Held SET_VRING_ENABLE states.
    pub fn held(&self) -> usize {
        self.pending.len()
    }

    /// Regions the backend accepted, with their user counts.
    pub fn regions(&self) -> impl Iterator<Item = ([u8; 32], u32)> + '_ {
        self.regions
            .iter()
            .filter(|r| r.pending.is_none())
            .map(|r| (r.key, r.users))
    }

    /// ADD_MEM_REG answers the relay waits for.
    pub fn owed(&self) -> usize {
        self.owed.len()
    }

    fn local_reply(m: &Msg, value: u64, out: &mut Vec<Out>) {
        if m.needs_reply() {
            out.push(Out::ToFrontend(reply(m.request(), value)));
        }
    }

    /// Decides what becomes of a message from the frontend.
    pub fn from_frontend(&mut self, mut m: Msg) -> Result<Vec<Out>, Fatal> {
        let mut out = Vec::new();
        match m.request() {
            GET_FEATURES => self.offered = true,
            SET_FEATURES if m.payload.len() >= 8 => {
                let v = m.ack_value().unwrap_or(0);
                self.acked = v & PROTOCOL_FEATURES != 0;
            }
            SET_PROTOCOL_FEATURES if m.payload.len() >= 8 => {
                let v = m.ack_value().unwrap_or(0);
                self.acked_reply_ack = v & PROTOCOL_F_REPLY_ACK != 0;
            }
            SET_VRING_ENABLE if !self.acked => {
                let index = m
                    .payload
                    .get(..4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                match index {
                    Some(i) if i < self.vrings => {
                        log::debug!("holding an early SET_VRING_ENABLE for vring {i}");
                        self.pending.retain(|(k, _)| *k != i);
                        self.pending.push((i, std::mem::take(&mut m.payload)));
                        Self::local_reply(&m, 0, &mut out);
                    }
                    _ => {
                        log::info!("SET_VRING_ENABLE for a vring the device does not have");
                        Self::local_reply(&m, 1, &mut out);
                    }
                }
                return Ok(out);
            }
            SET_MEM_TABLE => {
                self.regions.clear();
            }
            ADD_MEM_REG if m.payload.len() >= REGION_KEY.end => {
                let mut key = [0u8; 32];
                key.copy_from_slice(&m.payload[REGION_KEY]);
                if let Some(r) = self.regions.iter_mut().find(|r| r.key == key) {
                    r.users += 1;
                    if r.pending.is_none() {
                        log::debug!("region already known to the backend: acked here");
                        Self::local_reply(&m, 0, &mut out);
                    } else if m.needs_reply() {
                        // Answered with the first add's answer.
                        if let Some(o) = self.owed.iter_mut().rev().find(|o| o.key == key) {
                            o.waiting += 1;
                        }
                    }
                    return Ok(out);
                }
                if self.regions.len() >= MAX_REGIONS || self.owed.len() >= MAX_REGIONS {
                    if m.needs_reply() {
                        Self::local_reply(&m, 1, &mut out);
                        return Ok(out);
                    }
                    return Err(Fatal(format!("more than {MAX_REGIONS} memory regions")));
                }
                let id = self.next_owed;
                self.next_owed += 1;
                let reply_ack = self.reply_ack();
                self.regions.push(Region {
                    key,
                    users: 1,
                    pending: reply_ack.then_some(id),
                });
                if reply_ack {
                    self.owed.push_back(Owed {
                        id,
                        key,
                        pass_on: m.needs_reply(),
                        waiting: 0,
                    });
                    m.set_flags(m.flags() | FLAG_NEED_REPLY);
                }
            }
            REM_MEM_REG if m.payload.len() >= REGION_KEY.end => {
                let key = &m.payload[REGION_KEY];
                if let Some(i) = self.regions.iter().position(|r| r.key == key) {
                    if self.regions[i].users > 1 {
                        self.regions[i].users -= 1;
                        Self::local_reply(&m, 0, &mut out);
                        return Ok(out);
                    }
                    self.regions.swap_remove(i);
                }
            }
            _ => {}
        }
        out.push(Out::ToBackend(m));
        if self.acked && !self.pending.is_empty() {
            // Now the backend takes them; no reply is asked for.
            for (_, payload) in self.pending.drain(..) {
                out.push(Out::ToBackend(Msg::new(
                    SET_VRING_ENABLE,
                    FLAG_VERSION,
                    payload,
                )));
            }
        }
        Ok(out)
    }

    /// Decides what becomes of a message from the backend.
    pub fn from_backend(&mut self, m: Msg) -> Vec<Out> {
        if !(m.is_reply() && m.request() == ADD_MEM_REG) {
            return vec![Out::ToFrontend(m)];
        }
        let Some(owed) = self.owed.pop_front() else {
            return vec![Out::ToFrontend(m)];
        };
        let ok = m.ack_value() == Some(0);
        let value = m.ack_value().unwrap_or(1);
        let mut out = Vec::new();
        // The region may be gone meanwhile (SET_MEM_TABLE, a removal).
        if let Some(i) = self
            .regions
            .iter()
            .position(|r| r.key == owed.key && r.pending == Some(owed.id))
        {
            if ok {
                self.regions[i].pending = None;
            } else {
                log::info!("the backend refused a memory region");
                self.regions.swap_remove(i);
            }
        }
        for _ in 0..owed.waiting {
            out.push(Out::ToFrontend(reply(ADD_MEM_REG, value)));
        }
        if owed.pass_on {
            out.insert(0, Out::ToFrontend(m));
        }
        out
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
    let size = Msg::payload_len(&hdr)?;
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

/// Sends each message where it goes; false when a socket failed.
fn deliver(out: Vec<Out>, back: &UnixStream, front: &Mutex<UnixStream>) -> bool {
    for o in out {
        let r = match &o {
            Out::ToBackend(m) => send(back, m),
            Out::ToFrontend(m) => send(&front.lock().unwrap_or_else(PoisonError::into_inner), m),
        };
        if let Err(e) = r {
            log::debug!("relay: {e}");
            return false;
        }
    }
    true
}

/// Relays between `front` (the VMM) and `back` (the vhost-user backend of
/// a device with `vrings` virtqueues) until either side closes. Returns
/// the two relay threads.
pub fn relay(front: UnixStream, back: UnixStream, vrings: u32) -> io::Result<Vec<JoinHandle<()>>> {
    let to_front = Arc::new(Mutex::new(front.try_clone()?));
    let back_w = Arc::new(back.try_clone()?);
    let core = Arc::new(Mutex::new(RelayCore::new(vrings)));
    // Either side closing ends both.
    let ends = Arc::new((front.try_clone()?, back.try_clone()?));
    let down = {
        let ends = ends.clone();
        move || {
            let _ = ends.0.shutdown(Shutdown::Both);
            let _ = ends.1.shutdown(Shutdown::Both);
        }
    };
    let down2 = move || {
        let _ = ends.0.shutdown(Shutdown::Both);
        let _ = ends.1.shutdown(Shutdown::Both);
    };
    let (tf, bw, c) = (to_front.clone(), back_w.clone(), core.clone());
    let fwd = thread::Builder::new()
        .name("vnicd-relay-fe".into())
        .spawn(move || {
            loop {
                let m = match recv(&front) {
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
                // Decided under the lock (so an answer the backend owes is
                // recorded before the request reaches it), sent after.
                let out = c
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .from_frontend(m);
                match out {
                    Ok(out) => {
                        if !deliver(out, &bw, &tf) {
                            break;
                        }
                    }
                    Err(e) => {
                        log::error!("frontend connection ended: {e}");
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
                let m = match recv(&back) {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        log::debug!("relay from backend: {e}");
                        break;
                    }
                };
                let out = core
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .from_backend(m);
                if !deliver(out, &back_w, &to_front) {
                    break;
                }
            }
            down2();
        })?;
    Ok(vec![fwd, bwd])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn enable(index: u32, on: u32, need_reply: bool) -> Msg {
        let mut p = index.to_le_bytes().to_vec();
        p.extend_from_slice(&on.to_le_bytes());
        p.extend_from_slice(&[0; 4]);
        let f = FLAG_VERSION | if need_reply { FLAG_NEED_REPLY } else { 0 };
        Msg::new(SET_VRING_ENABLE, f, p)
    }

    fn region(n: u8, req: u32, need_reply: bool) -> Msg {
        let mut p = vec![0u8; 40];
        p[8] = n;
        p[16] = 1;
        let f = FLAG_VERSION | if need_reply { FLAG_NEED_REPLY } else { 0 };
        Msg::new(req, f, p)
    }

    fn u64msg(req: u32, v: u64) -> Msg {
        Msg::new(req, FLAG_VERSION, v.to_le_bytes().to_vec())
    }

    fn kinds(out: &[Out]) -> Vec<(bool, u32, u32)> {
        out.iter()
            .map(|o| match o {
                Out::ToBackend(m) => (true, m.request(), m.flags()),
                Out::ToFrontend(m) => (false, m.request(), m.flags()),
            })
            .collect()
    }

    #[test]
    fn early_enables_are_bounded_by_the_vrings_the_device_has() {
        let mut c = RelayCore::new(5);
        for i in 0..100_000u32 {
            let out = c.from_frontend(enable(i, 1, true)).unwrap();
            // Answered here, success for a real vring, failure otherwise.
            let Out::ToFrontend(r) = &out[0] else {
                panic!("answered locally")
            };
            assert_eq!(r.ack_value(), Some(u64::from(i >= 5)));
            assert!(c.held() <= 5);
        }
        assert_eq!(c.held(), 5);
        // Acking the protocol features hands the five states over.
        let out = c
            .from_frontend(u64msg(SET_FEATURES, PROTOCOL_FEATURES))
            .unwrap();
        assert_eq!(out.len(), 6);
        assert_eq!(c.held(), 0);
    }

    #[test]
    fn a_region_counts_only_once_the_backend_accepted_it() {
        let mut c = RelayCore::new(5);
        c.from_frontend(u64msg(SET_PROTOCOL_FEATURES, PROTOCOL_F_REPLY_ACK))
            .unwrap();
        // REPLY_ACK is not in force before GET_FEATURES: nothing is asked
        // of the backend.
        let out = c.from_frontend(region(9, ADD_MEM_REG, false)).unwrap();
        assert_eq!(kinds(&out), [(true, ADD_MEM_REG, FLAG_VERSION)]);
        assert_eq!(c.owed(), 0);
        assert_eq!(c.regions().count(), 1);
        c.from_frontend(region(9, REM_MEM_REG, false)).unwrap();
        c.from_frontend(Msg::new(GET_FEATURES, FLAG_VERSION, Vec::new()))
            .unwrap();
        assert!(c.reply_ack());
        // The frontend does not ask for an answer; the relay does.
        let out = c.from_frontend(region(1, ADD_MEM_REG, false)).unwrap();
        assert_eq!(
            kinds(&out),
            [(true, ADD_MEM_REG, FLAG_VERSION | FLAG_NEED_REPLY)]
        );
        assert_eq!(c.regions().count(), 0);
        // A repeat while the first is unanswered waits for its answer.
        assert!(c
            .from_frontend(region(1, ADD_MEM_REG, true))
            .unwrap()
            .is_empty());
        // The backend refuses: nothing is recorded, the repeat hears so,
        // the answer the frontend did not ask for is not passed on.
        let out = c.from_backend(reply(ADD_MEM_REG, 1));
        assert_eq!(
            kinds(&out),
            [(false, ADD_MEM_REG, FLAG_VERSION | FLAG_REPLY)]
        );
        let Out::ToFrontend(m) = &out[0] else {
            panic!()
        };
        assert_eq!(m.ack_value(), Some(1));
        assert_eq!(c.regions().count(), 0);
        // Accepted this time: counted, and a repeat is acked here.
        c.from_frontend(region(2, ADD_MEM_REG, true)).unwrap();
        let out = c.from_backend(reply(ADD_MEM_REG, 0));
        assert_eq!(out.len(), 1, "the frontend asked, so it hears");
        let out = c.from_frontend(region(2, ADD_MEM_REG, true)).unwrap();
        assert_eq!(
            kinds(&out),
            [(false, ADD_MEM_REG, FLAG_VERSION | FLAG_REPLY)]
        );
        assert_eq!(c.regions().map(|r| r.1).collect::<Vec<_>>(), [2]);
        // Removed by both devices: passed on only the second time.
        let out = c.from_frontend(region(2, REM_MEM_REG, false)).unwrap();
        assert!(out.is_empty());
        let out = c.from_frontend(region(2, REM_MEM_REG, false)).unwrap();
        assert_eq!(kinds(&out), [(true, REM_MEM_REG, FLAG_VERSION)]);
        assert_eq!(c.regions().count(), 0);
        assert_eq!(c.owed(), 0);
    }

    #[test]
    fn regions_are_bounded() {
        let mut c = RelayCore::new(5);
        for n in 0..MAX_REGIONS {
            let mut m = region(0, ADD_MEM_REG, false);
            m.payload[9..11].copy_from_slice(&(n as u16).to_le_bytes());
            c.from_frontend(m).unwrap();
        }
        let out = c.from_frontend(region(0xff, ADD_MEM_REG, true)).unwrap();
        let Out::ToFrontend(m) = &out[0] else {
            panic!()
        };
        assert_eq!(m.ack_value(), Some(1));
        assert!(c.from_frontend(region(0xfe, ADD_MEM_REG, false)).is_err());
        assert_eq!(c.regions().count(), MAX_REGIONS);
    }

    #[test]
    fn oversized_messages_do_not_parse() {
        let m = Msg::new(1, FLAG_VERSION, vec![0; 8]);
        let mut b = m.hdr.to_vec();
        b.extend_from_slice(&m.payload);
        assert_eq!(Msg::parse(&b).unwrap().unwrap().1, 20);
        assert!(Msg::parse(&b[..19]).unwrap().is_none());
        b[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        assert!(Msg::parse(&b).is_err());
    }
}
