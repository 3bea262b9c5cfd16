//! How the driver reaches the device.

pub mod vhost_user;
