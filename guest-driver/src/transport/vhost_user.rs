//! The vhost-user transport: the driver owns memfd memory and speaks
//! vhost-user to the device as a VMM would (like DPDK's virtio-user).
//!
//! vhost-user has no status register: the status is kept here, and the
//! steps that matter to the device become messages. FEATURES_OK sends the
//! features (with VHOST_USER_F_PROTOCOL_FEATURES when the device offers
//! it), negotiates the protocol features and shares the memory table; a
//! reset before that is a no-op on a fresh connection.

use std::{os::unix::net::UnixListener, path::Path};

use vhost::{
    vhost_user::{
        message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures},
        Frontend, VhostUserFrontend,
    },
    VhostBackend, VhostUserMemoryRegionInfo, VringConfigData,
};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vnic_protocol::virtio::{DeviceStatus, Features};

use super::{Doorbell, Transport};
use crate::{mem::DmaMemory, virtqueue::SplitQueue, Error, QueueError, Result};

/// Protocol features this transport uses when the device offers them.
pub const PROTOCOL: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);

/// The largest queue vhost-user can describe (it has no way to ask).
const MAX_QUEUE_SIZE: u16 = 32768;

/// A connection to a vhost-user device.
pub struct VhostUserTransport {
    frontend: Frontend,
    dma: DmaMemory,
    max_queues: usize,
    /// Per virtqueue index; `None` for queues not set up.
    kicks: Vec<Option<EventFd>>,
    calls: Vec<Option<EventFd>>,
    protocol: VhostUserProtocolFeatures,
    /// VHOST_USER_F_PROTOCOL_FEATURES was negotiated.
    acked_protocol: bool,
    offered: Features,
    driver_features: Features,
    status: DeviceStatus,
}

impl std::fmt::Debug for VhostUserTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserTransport")
            .field("dma", &self.dma)
            .field("protocol", &self.protocol)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl VhostUserTransport {
    /// Connects to `socket`, takes ownership of the device and prepares
    /// `mem_size` bytes of memory to share with it.
    pub fn connect(
        socket: &Path,
        max_queues: usize,
        mem_size: usize,
    ) -> Result<VhostUserTransport> {
        let frontend = Frontend::connect(socket, max_queues as u64)?;
        Self::with_frontend(frontend, max_queues, mem_size)
    }

    /// Takes a device that connected to us (a backend started with
    /// `--client`, as a VMM listening with `server=on` sees it).
    pub fn accept(
        listener: &UnixListener,
        max_queues: usize,
        mem_size: usize,
    ) -> Result<VhostUserTransport> {
        let (stream, _) = listener.accept()?;
        let frontend = Frontend::from_stream(stream, max_queues as u64);
        Self::with_frontend(frontend, max_queues, mem_size)
    }

    fn with_frontend(
        frontend: Frontend,
        max_queues: usize,
        mem_size: usize,
    ) -> Result<VhostUserTransport> {
        frontend.set_owner()?;
        Ok(VhostUserTransport {
            frontend,
            dma: DmaMemory::new(mem_size)?,
            max_queues,
            kicks: Vec::new(),
            calls: Vec::new(),
            protocol: VhostUserProtocolFeatures::empty(),
            acked_protocol: false,
            offered: Features::empty(),
            driver_features: Features::empty(),
            status: DeviceStatus::empty(),
        })
    }

    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    /// Sends the accepted features and the protocol features, and shares
    /// the memory: what FEATURES_OK means to a vhost-user device.
    fn features_ok(&mut self) -> Result<()> {
        let mut acked = self.driver_features;
        if self
            .offered
            .contains(Features::VHOST_USER_PROTOCOL_FEATURES)
        {
            acked |= Features::VHOST_USER_PROTOCOL_FEATURES;
        }
        self.frontend.set_features(acked.bits())?;
        if acked.contains(Features::VHOST_USER_PROTOCOL_FEATURES) {
            let p = self.frontend.get_protocol_features()? & PROTOCOL;
            self.frontend.set_protocol_features(p)?;
            self.protocol = p;
            self.acked_protocol = true;
            if p.contains(VhostUserProtocolFeatures::MQ) {
                // The device's own count bounds the queue indices (the
                // control queue sits after all its pairs).
                self.max_queues = self.frontend.get_queue_num()? as usize;
            }
            if p.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Wait for the device to have applied every message: when
                // setup returns, the queues are live.
                self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        let region = self
            .dma
            .mem
            .iter()
            .next()
            .ok_or(Error::OutOfMemory { wanted: 1, left: 0 })?;
        let info = VhostUserMemoryRegionInfo::from_guest_region(region)?;
        self.frontend.set_mem_table(&[info])?;
        Ok(())
    }

    fn host_addr(&self, a: GuestAddress) -> Result<u64> {
        Ok(self.dma.mem.get_host_address(a)? as u64)
    }

    /// The call eventfd of queue `index` (the device's interrupt).
    pub fn call_fd(&self, index: usize) -> Option<&EventFd> {
        self.calls.get(index).and_then(Option::as_ref)
    }
}

impl Transport for VhostUserTransport {
    fn set_status(&mut self, status: DeviceStatus) -> Result<()> {
        let new = status - self.status;
        if new.contains(DeviceStatus::FEATURES_OK) {
            self.features_ok()?;
        }
        self.status = status;
        Ok(())
    }

    fn status(&mut self) -> Result<DeviceStatus> {
        Ok(self.status)
    }

    fn device_features(&mut self) -> Result<Features> {
        self.offered = Features::from_bits_retain(self.frontend.get_features()?);
        Ok(self.offered - Features::VHOST_USER_PROTOCOL_FEATURES)
    }

    fn set_driver_features(&mut self, features: Features) -> Result<()> {
        self.driver_features = features;
        Ok(())
    }

    fn max_queue_size(&mut self, index: usize) -> Result<u16> {
        Ok(if index < self.max_queues {
            MAX_QUEUE_SIZE
        } else {
            0
        })
    }

    fn dma(&mut self) -> &mut DmaMemory {
        &mut self.dma
    }

    fn setup_queue(&mut self, index: usize, q: &SplitQueue, enable: bool) -> Result<()> {
        let cfg = VringConfigData {
            queue_max_size: q.size,
            queue_size: q.size,
            flags: 0,
            desc_table_addr: self.host_addr(q.desc)?,
            used_ring_addr: self.host_addr(q.used)?,
            avail_ring_addr: self.host_addr(q.avail)?,
            log_addr: None,
        };
        self.frontend.set_vring_num(index, q.size)?;
        self.frontend.set_vring_addr(index, &cfg)?;
        self.frontend.set_vring_base(index, 0)?;
        let call = EventFd::new(EFD_NONBLOCK)?;
        let kick = EventFd::new(EFD_NONBLOCK)?;
        self.frontend.set_vring_call(index, &call)?;
        self.frontend.set_vring_kick(index, &kick)?;
        if self.kicks.len() <= index {
            self.kicks.resize_with(index + 1, || None);
            self.calls.resize_with(index + 1, || None);
        }
        self.kicks[index] = Some(kick);
        self.calls[index] = Some(call);
        // Without VHOST_USER_F_PROTOCOL_FEATURES rings start enabled.
        if self.acked_protocol {
            self.frontend.set_vring_enable(index, enable)?;
        }
        Ok(())
    }

    fn doorbell(&self, index: usize) -> Result<Doorbell> {
        let k = self
            .kicks
            .get(index)
            .and_then(Option::as_ref)
            .ok_or(QueueError::NotSetUp(index))?;
        Ok(Doorbell::eventfd(k.try_clone()?))
    }

    fn interrupt(&self, index: usize) -> Result<EventFd> {
        let c = self.call_fd(index).ok_or(QueueError::NotSetUp(index))?;
        Ok(c.try_clone()?)
    }

    fn read_config(&mut self, offset: usize, len: usize) -> Result<Vec<u8>> {
        let buf = vec![0u8; len];
        let (_, data) = self.frontend.get_config(
            offset as u32,
            len as u32,
            VhostUserConfigFlags::WRITABLE,
            &buf,
        )?;
        Ok(data)
    }
}
