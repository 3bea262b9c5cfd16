//! vnic-backend: the vnic device behind `vnicd`.
//!
//! `nic/` is the device model and knows nothing about vhost; `vhost/` moves
//! bytes between guest memory and `nic/`; `uplink/` connects the device to
//! the host.

pub mod config;
pub mod daemon;
pub mod mgmt;
pub mod nic;
pub mod uplink;
pub mod vhost;
