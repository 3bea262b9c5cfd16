//! Running a port: open the uplink once, then serve one vhost-user
//! frontend after another, so a guest reboot or a VMM restart needs no
//! vnicd restart.

use std::{
    io,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use thiserror::Error;
use vhost::vhost_user::Error as VhostUserError;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::{
    config::{Config, UplinkSpec},
    mgmt,
    nic::Device,
    uplink::{
        bench::{Sink, Source},
        tap::Tap,
        NoUplink, Uplink,
    },
    vhost::VnicBackend,
};

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("opening tap {0}: {1}")]
    Tap(String, #[source] io::Error),
    #[error("creating the device: {0}")]
    Device(#[source] io::Error),
    #[error("management socket: {0}")]
    Mgmt(#[source] io::Error),
    /// vhost-user-backend's error has no `std::error::Error` impl; its text
    /// is kept.
    #[error("vhost-user: {0}")]
    Vhost(String),
    #[error("registering uplink events: {0}")]
    Listeners(#[source] io::Error),
}

impl From<vhost_user_backend::Error> for DaemonError {
    fn from(e: vhost_user_backend::Error) -> Self {
        DaemonError::Vhost(e.to_string())
    }
}

/// Builds the device the configuration describes.
pub fn build_device(cfg: &Config) -> Result<Arc<Device>, DaemonError> {
    let pairs = usize::from(cfg.device.pairs);
    let uplink: Box<dyn Uplink> = match &cfg.uplink {
        UplinkSpec::None => Box::new(NoUplink { queues: pairs }),
        UplinkSpec::Tap(name) => {
            Box::new(Tap::open(name, pairs).map_err(|e| DaemonError::Tap(name.clone(), e))?)
        }
        UplinkSpec::Sink => Box::new(Sink::new(pairs)),
        UplinkSpec::Source(n) => {
            Box::new(Source::new(pairs, *n, cfg.device.mac).map_err(DaemonError::Device)?)
        }
    };
    Ok(Arc::new(
        Device::new(cfg.device.clone(), uplink).map_err(DaemonError::Device)?,
    ))
}

/// Serves frontends until `stop` is set (checked between connections) or,
/// with `cfg.once`, after the first.
pub fn run(cfg: &Config, stop: &AtomicBool) -> Result<(), DaemonError> {
    let dev = build_device(cfg)?;
    let _mgmt = match &cfg.mgmt {
        Some(p) => Some(mgmt::serve(p, dev.clone()).map_err(DaemonError::Mgmt)?),
        None => None,
    };
    loop {
        serve_one(cfg, &dev)?;
        log::info!("frontend disconnected");
        if cfg.once || stop.load(Ordering::Relaxed) {
            return Ok(());
        }
    }
}

/// Serves one frontend connection to its end.
pub fn serve_one(cfg: &Config, dev: &Arc<Device>) -> Result<(), DaemonError> {
    // Nothing the previous frontend set up or left queued carries over.
    dev.reset().map_err(DaemonError::Device)?;
    let backend = Arc::new(VnicBackend::new(
        dev.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    ));
    let mut daemon = VhostUserDaemon::new(
        "vnicd".to_owned(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )?;
    backend
        .register_listeners(&daemon.get_epoll_handlers())
        .map_err(DaemonError::Listeners)?;
    let path = cfg.socket.to_string_lossy().into_owned();
    if cfg.client {
        // The VMM may not be listening yet: retry for a while.
        let mut tries = 0;
        loop {
            match daemon.start_client(&path) {
                Ok(()) => break,
                Err(e) if tries < 300 => {
                    log::debug!("connecting to {path}: {e}");
                    tries += 1;
                    thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e.into()),
            }
        }
        log::info!("connected to {path}");
        let r = daemon.wait();
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
        // A frontend that goes away (guest shutdown, VMM exit) ends the
        // connection, not vnicd: the same outcomes `serve` accepts.
        match r {
            Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => {}
            other => other?,
        }
    } else {
        log::info!("listening on {path}");
        daemon.serve(&path)?;
    }
    Ok(())
}
