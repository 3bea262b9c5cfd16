//! The device status field (virtio 1.3, 2.1): the steps of driver
//! initialisation (3.1.1) as the driver reports them to the device.

use bitflags::bitflags;

bitflags! {
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct DeviceStatus: u8 {
        /// The guest found the device.
        const ACKNOWLEDGE = 1;
        /// The guest knows how to drive it.
        const DRIVER = 2;
        /// The driver is set up and ready.
        const DRIVER_OK = 4;
        /// Feature negotiation is complete; a device that cannot work with
        /// the driver's features leaves this bit clear when read back.
        const FEATURES_OK = 8;
        /// The device hit an error it cannot recover from without a reset.
        const DEVICE_NEEDS_RESET = 0x40;
        /// The driver gave up on the device.
        const FAILED = 0x80;
    }
}
