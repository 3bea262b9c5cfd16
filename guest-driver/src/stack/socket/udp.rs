//! UDP sockets: a bound port's queue, filled by the shards' input.

use std::{
    io,
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use vnic_protocol::{virtio::VirtioNetHdr, wire::emit as frames};

use crate::stack::{
    output,
    poll::{Pollable, Readiness},
    state::{Inner, UdpQueue},
    wait::lock_err,
    Stack,
};

/// Datagrams queued per socket at most; more are dropped and counted.
const UDP_QUEUE: usize = 4096;

/// A bound UDP port.
#[derive(Debug)]
pub struct UdpSocket {
    inner: Arc<Inner>,
    port: u16,
    q: Arc<UdpQueue>,
}

impl UdpSocket {
    /// Binds `port` (0: an ephemeral one).
    pub fn bind(stack: &Stack, port: u16) -> io::Result<UdpSocket> {
        let inner = stack.inner().clone();
        let q = Arc::new(UdpQueue::new(UDP_QUEUE));
        let mut m = inner.udp.lock().map_err(|_| lock_err())?;
        let port = if port == 0 {
            (0..16384u16)
                .map(|k| {
                    49152
                        + (inner
                            .next_port
                            .fetch_add(1, Ordering::Relaxed)
                            .wrapping_add(k)
                            % 16384)
                })
                .find(|p| !m.contains_key(p))
                .ok_or_else(|| io::Error::from(io::ErrorKind::AddrInUse))?
        } else {
            port
        };
        if m.contains_key(&port) {
            return Err(io::ErrorKind::AddrInUse.into());
        }
        m.insert(port, q.clone());
        drop(m);
        Ok(UdpSocket { inner, port, q })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sends one datagram (checksum offloaded when the device can). One
    /// longer than the MTU allows goes as IP fragments, up to the largest
    /// UDP datagram (65507 bytes over IPv4, 65527 over IPv6).
    pub fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<usize> {
        let inner = &self.inner;
        let src = inner.local_ip(to.ip()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                "no local address of that family",
            )
        })?;
        let iph = if to.is_ipv6() { 40 } else { 20 };
        // The IPv4 total length, or the IPv6 payload length, is 16 bits.
        let limit = if to.is_ipv6() { 65535 } else { 65535 - iph };
        if data.len() + 8 > limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "datagram larger than UDP allows",
            ));
        }
        let fits = data.len() + 8 + iph <= inner.mtu;
        let local = SocketAddr::new(src, self.port);
        let owner = inner.owner(local, to);
        let mut buf = Vec::with_capacity(64 + data.len());
        frames::eth(&mut buf, None, inner.mac, frames::ethertype_of(to.ip()));
        let len = 8 + data.len();
        let ident = inner.ip_ident.fetch_add(1, Ordering::Relaxed);
        frames::ip(&mut buf, src, to.ip(), frames::UDP, len, ident, 64);
        let l4 = buf.len();
        buf.extend_from_slice(&self.port.to_be_bytes());
        buf.extend_from_slice(&to.port().to_be_bytes());
        buf.extend_from_slice(&(len as u16).to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(data);
        let ps = frames::pseudo(src, to.ip(), frames::UDP, len);
        // A datagram sent as fragments carries its checksum in the first
        // one only, so it is computed here rather than by the device.
        let hdr: VirtioNetHdr = frames::l4_checksum(&mut buf, l4, 6, ps, inner.csum_tx && fits);
        output::with_tx(inner, owner, |tx| {
            output::send_ip(inner, tx, to.ip(), hdr, &mut buf)
        })
        .map_err(io::Error::other)?;
        Ok(data.len())
    }

    /// Receives one datagram, waiting up to `timeout` (None: forever).
    pub fn recv_from(
        &self,
        buf: &mut [u8],
        timeout: Option<Duration>,
    ) -> io::Result<(usize, SocketAddr)> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let (from, d) = self
            .q
            .pop(deadline)?
            .ok_or(io::Error::from(io::ErrorKind::WouldBlock))?;
        let n = d.len().min(buf.len());
        buf[..n].copy_from_slice(&d[..n]);
        Ok((n, from))
    }
}

impl Pollable for UdpSocket {
    fn readiness(&self) -> Readiness {
        Readiness {
            writable: true,
            ..self.q.readiness()
        }
    }
}

impl Drop for UdpSocket {
    fn drop(&mut self) {
        if let Ok(mut m) = self.inner.udp.lock() {
            m.remove(&self.port);
        }
    }
}
