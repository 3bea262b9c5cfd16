//! The vhost-user transport: the driver owns memfd memory and speaks
//! vhost-user to the device as a VMM would (like DPDK's virtio-user).

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
use vnic_protocol::virtio::Features;

use crate::{mem::DmaMemory, virtqueue::SplitQueue, Error, Result};

/// Protocol features this transport uses when the device offers them.
pub const PROTOCOL: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);

/// A connection to a vhost-user device.
pub struct VhostUserTransport {
    frontend: Frontend,
    pub dma: DmaMemory,
    /// Per virtqueue index; `None` for queues not set up.
    kicks: Vec<Option<EventFd>>,
    calls: Vec<Option<EventFd>>,
    protocol: VhostUserProtocolFeatures,
    /// VHOST_USER_F_PROTOCOL_FEATURES was negotiated.
    acked_protocol: bool,
}

impl std::fmt::Debug for VhostUserTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserTransport")
            .field("dma", &self.dma)
            .field("protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

impl VhostUserTransport {
    /// Connects to `socket`, takes ownership of the device and shares
    /// `mem_size` bytes of memory with it.
    pub fn connect(
        socket: &Path,
        max_queues: usize,
        mem_size: usize,
    ) -> Result<VhostUserTransport> {
        let frontend = Frontend::connect(socket, max_queues as u64)?;
        Self::with_frontend(frontend, mem_size)
    }

    /// Takes a device that connected to us (a backend started with
    /// `--client`, as a VMM listening with `server=on` sees it).
    pub fn accept(
        listener: &UnixListener,
        max_queues: usize,
        mem_size: usize,
    ) -> Result<VhostUserTransport> {
        let (stream, _) = listener.accept()?;
        Self::with_frontend(Frontend::from_stream(stream, max_queues as u64), mem_size)
    }

    fn with_frontend(frontend: Frontend, mem_size: usize) -> Result<VhostUserTransport> {
        frontend.set_owner()?;
        Ok(VhostUserTransport {
            frontend,
            dma: DmaMemory::new(mem_size)?,
            kicks: Vec::new(),
            calls: Vec::new(),
            protocol: VhostUserProtocolFeatures::empty(),
            acked_protocol: false,
        })
    }

    /// Accepts the subset of `wanted` the device offers, negotiates the
    /// protocol features, and shares the memory. Returns the accepted set.
    pub fn negotiate(&mut self, wanted: Features) -> Result<Features> {
        let offered = Features::from_bits_retain(self.frontend.get_features()?);
        let mut acked = offered & (wanted | Features::VHOST_USER_PROTOCOL_FEATURES);
        if !acked.contains(Features::VERSION_1) {
            return Err(Error::Negotiation("device does not offer VERSION_1".into()));
        }
        // Keep the driver's own dependency rules.
        if let Err(why) = (acked - Features::VHOST_USER_PROTOCOL_FEATURES).check_dependencies() {
            return Err(Error::Negotiation(why.into()));
        }
        self.frontend.set_features(acked.bits())?;
        if acked.contains(Features::VHOST_USER_PROTOCOL_FEATURES) {
            let p = self.frontend.get_protocol_features()? & PROTOCOL;
            self.frontend.set_protocol_features(p)?;
            self.protocol = p;
            self.acked_protocol = true;
            if p.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Wait for the device to have applied every message: when
                // setup returns, the queues are live.
                self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        } else {
            acked -= Features::VHOST_USER_PROTOCOL_FEATURES;
        }
        let region = self
            .dma
            .mem
            .iter()
            .next()
            .ok_or_else(|| Error::Memory("no region".into()))?;
        let info = VhostUserMemoryRegionInfo::from_guest_region(region)?;
        self.frontend.set_mem_table(&[info])?;
        Ok(acked)
    }

    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    fn host_addr(&self, a: GuestAddress) -> Result<u64> {
        Ok(self.dma.mem.get_host_address(a)? as u64)
    }

    /// Hands virtqueue `index` to the device and enables it.
    pub fn setup_queue(&mut self, index: usize, q: &SplitQueue) -> Result<()> {
        self.setup_queue_enabled(index, q, true)
    }

    /// Hands virtqueue `index` to the device, enabled or not (a VMM leaves
    /// the pairs the guest has not asked for set up but disabled).
    pub fn setup_queue_enabled(
        &mut self,
        index: usize,
        q: &SplitQueue,
        enable: bool,
    ) -> Result<()> {
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

    /// Notifies the device that queue `index` has new buffers.
    pub fn kick(&self, index: usize) -> Result<()> {
        match self.kicks.get(index) {
            Some(Some(k)) => Ok(k.write(1)?),
            _ => Err(Error::Queue("kick on a queue that was not set up")),
        }
    }

    /// The kick eventfd of queue `index` (our doorbell).
    pub fn kick_fd(&self, index: usize) -> Option<&EventFd> {
        self.kicks.get(index).and_then(Option::as_ref)
    }

    /// The call eventfd of queue `index` (the device's interrupt).
    pub fn call_fd(&self, index: usize) -> Option<&EventFd> {
        self.calls.get(index).and_then(Option::as_ref)
    }

    /// Reads `len` bytes of device config space at `offset`.
    pub fn read_config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>> {
        let buf = vec![0u8; len as usize];
        let (_, data) =
            self.frontend
                .get_config(offset, len, VhostUserConfigFlags::WRITABLE, &buf)?;
        Ok(data)
    }
}
