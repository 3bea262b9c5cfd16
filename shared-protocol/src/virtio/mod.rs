//! virtio-net as the virtio 1.3 specification lays it out: feature bits,
//! the per-packet header, config space, control-queue commands, and the
//! checks a device applies to a driver's header before trusting it.

pub mod config;
pub mod ctrl;
pub mod features;
pub mod hdr;
pub mod status;
pub mod validate;

pub use config::VirtioNetConfig;
pub use features::Features;
pub use hdr::{GsoType, HdrFlags, VirtioNetHdr};
pub use status::DeviceStatus;
pub use validate::{validate, validate_prefix, ValidateError, Validated};
