//! How the driver reaches the device.
//!
//! A [`Transport`] is what differs between a vhost-user socket, a PCI
//! function and an in-process model: where the status, feature and config
//! registers are, how a queue's rings are handed over, how the driver
//! rings a queue's doorbell and how the device's interrupts arrive. The
//! initialisation sequence of virtio 1.3, 3.1.1 is written once, in
//! [`init`] and [`finish`], over any of them.

#[cfg(any(test, feature = "test-util"))]
pub mod fake;
pub mod pci;
pub mod vhost_user;

use std::io;

use vmm_sys_util::eventfd::EventFd;
use vnic_protocol::virtio::{DeviceStatus, Features};

use crate::{mem::DmaMemory, virtqueue::SplitQueue, Error, QueueError, Result};

/// Rings one virtqueue's doorbell: the driver's notification that buffers
/// were made available.
pub struct Doorbell(Box<dyn Fn() -> io::Result<()> + Send + Sync>);

impl Doorbell {
    pub fn new(ring: impl Fn() -> io::Result<()> + Send + Sync + 'static) -> Doorbell {
        Doorbell(Box::new(ring))
    }

    /// A doorbell that writes to an eventfd (vhost-user's kick fd).
    pub fn eventfd(e: EventFd) -> Doorbell {
        Doorbell::new(move || e.write(1))
    }

    pub fn ring(&self) -> io::Result<()> {
        (self.0)()
    }
}

impl std::fmt::Debug for Doorbell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Doorbell")
    }
}

/// The device-facing half of the driver.
pub trait Transport: Send + std::fmt::Debug {
    /// Writes the device status; an empty status resets the device.
    fn set_status(&mut self, status: DeviceStatus) -> Result<()>;
    /// Reads the device status back.
    fn status(&mut self) -> Result<DeviceStatus>;
    /// The features the device offers (virtio feature bits only).
    fn device_features(&mut self) -> Result<Features>;
    /// The features the driver accepted, before FEATURES_OK is set.
    fn set_driver_features(&mut self, features: Features) -> Result<()>;
    /// The largest size the device takes for virtqueue `index`; 0 when it
    /// has no such queue.
    fn max_queue_size(&mut self, index: usize) -> Result<u16>;
    /// The memory the driver shares with the device: rings and buffers.
    fn dma(&mut self) -> &mut DmaMemory;
    /// Hands virtqueue `index` to the device, enabled or not (a VMM sets
    /// up the pairs a guest has not asked for but leaves them disabled).
    fn setup_queue(&mut self, index: usize, q: &SplitQueue, enable: bool) -> Result<()>;
    /// The doorbell of a queue that was set up.
    fn doorbell(&self, index: usize) -> Result<Doorbell>;
    /// An eventfd that becomes readable when the device interrupts for
    /// queue `index` (the transport may share one between queues).
    fn interrupt(&self, index: usize) -> Result<EventFd>;
    /// `len` bytes of the device-specific config space at `offset`.
    fn read_config(&mut self, offset: usize, len: usize) -> Result<Vec<u8>>;
}

/// Virtio 1.3, 3.1.1 steps 1 to 6: reset, ACKNOWLEDGE, DRIVER, the
/// features both sides have (those the driver `wants` that the device
/// offers, which must include VERSION_1 and keep the spec's dependencies),
/// FEATURES_OK, and the check that the device kept it. Returns the
/// negotiated features; the caller sets up the queues and then calls
/// [`finish`]. On an error the device is marked FAILED.
pub fn init(t: &mut dyn Transport, wants: Features) -> Result<Features> {
    let r = negotiate(t, wants);
    if r.is_err() {
        fail(t);
    }
    r
}

fn negotiate(t: &mut dyn Transport, wants: Features) -> Result<Features> {
    t.set_status(DeviceStatus::empty())?;
    let mut s = DeviceStatus::ACKNOWLEDGE;
    t.set_status(s)?;
    s |= DeviceStatus::DRIVER;
    t.set_status(s)?;
    let offered = t.device_features()?;
    let acked = offered & wants;
    if !acked.contains(Features::VERSION_1) {
        return Err(Error::Negotiation("device does not offer VERSION_1".into()));
    }
    acked
        .check_dependencies()
        .map_err(|why| Error::Negotiation(why.into()))?;
    t.set_driver_features(acked)?;
    s |= DeviceStatus::FEATURES_OK;
    t.set_status(s)?;
    if !t.status()?.contains(DeviceStatus::FEATURES_OK) {
        return Err(Error::FeaturesRefused(acked));
    }
    Ok(acked)
}

/// Step 8: DRIVER_OK, the device is live.
pub fn finish(t: &mut dyn Transport) -> Result<()> {
    let s = t.status()?;
    t.set_status(s | DeviceStatus::DRIVER_OK)
}

/// Marks the device FAILED (best effort: the driver is giving up anyway).
pub fn fail(t: &mut dyn Transport) {
    let s = t.status().unwrap_or_default();
    let _ = t.set_status(s | DeviceStatus::FAILED);
}

/// Checks a queue size against what the device takes for `index`.
pub fn check_queue_size(t: &mut dyn Transport, index: usize, size: u16) -> Result<()> {
    let max = t.max_queue_size(index)?;
    if max == 0 {
        return Err(QueueError::Missing(index).into());
    }
    if size > max {
        return Err(QueueError::TooBig { index, size, max }.into());
    }
    Ok(())
}
