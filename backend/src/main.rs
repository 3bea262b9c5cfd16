//! vnicd: the vnic vhost-user device. Not implemented yet: the backend
//! lands with its own issue; until then the binary says so and fails.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "vnicd {}: the vhost-user device is not implemented yet",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(2)
}
