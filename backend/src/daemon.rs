//! Running a port: open the uplink once, then serve one vhost-user
//! frontend after another, so a guest reboot or a VMM restart needs no
//! vnicd restart.

use std::{
    io,
    os::unix::net::{UnixListener, UnixStream},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
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
    vhost::{relay::relay, VnicBackend},
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
    #[error("vhost-user socket: {0}")]
    Socket(#[source] io::Error),
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
    let listener = if cfg.client {
        None
    } else {
        if cfg.socket.exists() {
            std::fs::remove_file(&cfg.socket).map_err(DaemonError::Socket)?;
        }
        log::info!("listening on {}", cfg.socket.display());
        Some(UnixListener::bind(&cfg.socket).map_err(DaemonError::Socket)?)
    };
    loop {
        let front = match &listener {
            Some(l) => l.accept().map_err(DaemonError::Socket)?.0,
            None => connect(&cfg.socket)?,
        };
        match serve_conn(&dev, front) {
            Ok(()) => log::info!("frontend disconnected"),
            // A frontend that breaks the protocol loses its connection;
            // vnicd goes on serving the next one.
            Err(DaemonError::Vhost(e)) => log::error!("frontend connection ended: {e}"),
            Err(e) => return Err(e),
        }
        if cfg.once || stop.load(Ordering::Relaxed) {
            return Ok(());
        }
    }
}

/// Connects to a VMM listening on `path`, retrying for 30 s.
fn connect(path: &Path) -> Result<UnixStream, DaemonError> {
    let mut tries = 0;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => {
                log::info!("connected to {}", path.display());
                return Ok(s);
            }
            Err(e) if tries < 300 => {
                log::debug!("connecting to {}: {e}", path.display());
                tries += 1;
                thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(DaemonError::Socket(e)),
        }
    }
}

/// Serves one frontend connection to its end. The vhost-user backend
/// talks to the frontend through [`relay`] over a private socket.
pub fn serve_conn(dev: &Arc<Device>, front: UnixStream) -> Result<(), DaemonError> {
    // Nothing the previous frontend set up or left queued carries over.
    dev.reset().map_err(DaemonError::Device)?;
    let backend = Arc::new(
        VnicBackend::new(dev.clone(), GuestMemoryAtomic::new(GuestMemoryMmap::new()))
            .map_err(DaemonError::Device)?,
    );
    let mut daemon = VhostUserDaemon::new(
        "vnicd".to_owned(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )?;
    backend
        .register_listeners(&daemon.get_epoll_handlers())
        .map_err(DaemonError::Listeners)?;
    let dir = std::env::temp_dir().join(format!(
        "vnicd-{}-{}",
        std::process::id(),
        CONN.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).map_err(DaemonError::Socket)?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(DaemonError::Socket)?;
    let inner = dir.join("backend.sock");
    let il = UnixListener::bind(&inner).map_err(DaemonError::Socket)?;
    let started = daemon.start_client(&inner.to_string_lossy());
    let back = il.accept().map(|(s, _)| s);
    drop(il);
    let _ = std::fs::remove_dir_all(&dir);
    started?;
    let threads = relay(front, back.map_err(DaemonError::Socket)?).map_err(DaemonError::Socket)?;
    let r = daemon.wait();
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
    for t in threads {
        let _ = t.join();
    }
    // A frontend that goes away (guest shutdown, VMM exit) ends the
    // connection, not vnicd.
    match r {
        Err(vhost_user_backend::Error::HandleRequest(
            VhostUserError::Disconnected
            | VhostUserError::PartialMessage
            | VhostUserError::SocketBroken(_),
        )) => Ok(()),
        other => other.map_err(Into::into),
    }
}

static CONN: AtomicU32 = AtomicU32::new(0);
