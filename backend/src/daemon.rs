//! Running the NIC: open the uplink once, then serve each port (the PF
//! and every VF) on its own vhost-user socket, one frontend after
//! another, so a guest reboot or a VMM restart needs no vnicd restart.

use std::{
    io,
    os::unix::{
        ffi::OsStringExt as _,
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use thiserror::Error;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::{
    config::{Config, UplinkSpec},
    mgmt,
    nic::Nic,
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

/// Builds the NIC the configuration describes.
pub fn build_nic(cfg: &Config) -> Result<Arc<Nic>, DaemonError> {
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
    let vfs: Vec<_> = cfg.vfs.iter().map(|v| v.settings.clone()).collect();
    let mut reps: Vec<Box<dyn Uplink>> = Vec::new();
    if let Some(prefix) = &cfg.representors {
        for n in 0..vfs.len() {
            let name = crate::config::representor_name(prefix, n);
            reps.push(Box::new(
                Tap::open(&name, 1).map_err(|e| DaemonError::Tap(name.clone(), e))?,
            ));
        }
    }
    Ok(Arc::new(
        Nic::new(cfg.device.clone(), vfs, uplink, reps).map_err(DaemonError::Device)?,
    ))
}

/// Serves frontends on every port until `stop` is set (checked between
/// connections, and with VFs every 200 ms) or, with `cfg.once`, after the
/// first frontend of any port has gone. With VFs, returning leaves the
/// port threads blocked in accept(): the caller is expected to exit.
pub fn run(cfg: &Config, stop: &AtomicBool) -> Result<(), DaemonError> {
    let nic = build_nic(cfg)?;
    let _mgmt = match &cfg.mgmt {
        Some(p) => Some(mgmt::serve(p, nic.clone()).map_err(DaemonError::Mgmt)?),
        None => None,
    };
    let mut sockets = vec![cfg.socket.clone()];
    sockets.extend(cfg.vfs.iter().map(|v| v.socket.clone()));
    // Listen on every port before any frontend is served, so a VMM can
    // connect to any of them as soon as vnicd logs that it listens.
    let mut listeners = Vec::new();
    for path in &sockets {
        listeners.push(if cfg.client {
            None
        } else {
            if path.exists() {
                std::fs::remove_file(path).map_err(DaemonError::Socket)?;
            }
            log::info!("listening on {}", path.display());
            Some(UnixListener::bind(path).map_err(DaemonError::Socket)?)
        });
    }
    if nic.ports.len() == 1 {
        let none = AtomicBool::new(false);
        return serve_port(
            cfg,
            &nic,
            0,
            listeners[0].as_ref(),
            &cfg.socket,
            stop,
            &none,
        );
    }
    // A thread per port, and one that reads the uplink while the PF has
    // no frontend. The first port to end (an error, or --once) ends
    // vnicd; the others may sit in accept() and end with the process.
    let done = Arc::new(AtomicBool::new(false));
    {
        let (nic, done) = (nic.clone(), done.clone());
        thread::Builder::new()
            .name("vnicd-uplink".into())
            .spawn(move || nic.pump_uplink(&done))
            .map_err(DaemonError::Socket)?;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    for (p, (listener, path)) in listeners.into_iter().zip(sockets).enumerate() {
        let (cfg, nic, done, tx) = (cfg.clone(), nic.clone(), done.clone(), tx.clone());
        thread::Builder::new()
            .name(format!("vnicd-{}", nic.ports[p].name()))
            .spawn(move || {
                let r = serve_port(&cfg, &nic, p, listener.as_ref(), &path, &done, &done);
                let _ = tx.send(r);
            })
            .map_err(DaemonError::Socket)?;
    }
    let r = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(r) => break r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if stop.load(Ordering::Relaxed) {
                    break Ok(());
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                break Err(DaemonError::Vhost("every port thread ended".into()));
            }
        }
    };
    done.store(true, Ordering::Relaxed);
    r
}

/// Serves port `p`'s frontends, one after another.
fn serve_port(
    cfg: &Config,
    nic: &Arc<Nic>,
    p: usize,
    listener: Option<&UnixListener>,
    path: &Path,
    stop: &AtomicBool,
    done: &AtomicBool,
) -> Result<(), DaemonError> {
    loop {
        let front = match listener {
            Some(l) => l.accept().map_err(DaemonError::Socket)?.0,
            None => connect(path)?,
        };
        match serve_conn(nic, p, front) {
            Ok(()) => log::info!("{}: frontend disconnected", nic.ports[p].name()),
            // A frontend that breaks the protocol loses its connection;
            // vnicd goes on serving the next one.
            Err(DaemonError::Vhost(e)) => {
                log::error!("{}: frontend connection ended: {e}", nic.ports[p].name());
            }
            Err(e) => return Err(e),
        }
        if cfg.once || stop.load(Ordering::Relaxed) || done.load(Ordering::Relaxed) {
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

/// Serves one frontend connection of port `p` to its end. The vhost-user
/// backend talks to the frontend through [`relay`] over a private socket.
pub fn serve_conn(nic: &Arc<Nic>, p: usize, front: UnixStream) -> Result<(), DaemonError> {
    // Nothing the previous frontend set up or left queued carries over.
    nic.reset(p).map_err(DaemonError::Device)?;
    nic.attach(p, true);
    let r = serve_attached(nic, p, front);
    nic.attach(p, false);
    r
}

fn serve_attached(nic: &Arc<Nic>, p: usize, front: UnixStream) -> Result<(), DaemonError> {
    let backend = Arc::new(
        VnicBackend::new(
            nic.clone(),
            p,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
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
    let (back, mut listener) = backend_socket().map_err(DaemonError::Socket)?;
    // The backend's end is already queued on the listener: this accept
    // returns at once, and nothing is left on the filesystem to race for.
    daemon.start(&mut listener)?;
    drop(listener);
    // The pairs, the control queue, the TOE's two queues.
    let vrings = 2 * u32::from(nic.ports[p].config.pairs) + 3;
    let threads = relay(front, back, vrings).map_err(DaemonError::Socket)?;
    // Other ports' workers write this port's frames straight into its RX
    // queues while the connection lasts.
    let rx: std::sync::Weak<dyn crate::nic::RxPath> = Arc::downgrade(&backend) as _;
    nic.set_rx_path(p, Some(rx));
    let r = daemon.wait();
    nic.set_rx_path(p, None);
    // The driver is gone: its TOE connections are reset on the wire.
    backend.toe_reset();
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
    for t in threads {
        let _ = t.join();
    }
    drop(daemon);
    // Every epoll handler holds the backend; once they are all gone the
    // exit eventfds vhost-user-backend leaves open can be closed.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while Arc::strong_count(&backend) > 1 && std::time::Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    if Arc::strong_count(&backend) == 1 {
        backend.close_exit_fds();
    } else {
        log::warn!("a worker of the last connection is still running");
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

/// A connected pair for the relay and the vhost-user backend: the relay's
/// end, and a listener with the backend's end waiting on it
/// (vhost-user-backend takes its connection from a listener). The
/// listener is bound in a directory created exclusively with mode 0700
/// (mkdtemp), and the socket and directory are removed before this
/// returns, so no other local user can connect to it or make the bind
/// fail.
fn backend_socket() -> io::Result<(UnixStream, Listener)> {
    let dir = private_dir()?;
    let path = dir.join("backend.sock");
    let bound = UnixListener::bind(&path).and_then(|l| {
        let s = UnixStream::connect(&path)?;
        Ok((s, l))
    });
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir(&dir);
    let (s, l) = bound?;
    Ok((s, Listener::from(l)))
}

/// A new directory under the temporary directory, created with mode 0700
/// under a name no one could have taken before.
fn private_dir() -> io::Result<PathBuf> {
    let template = std::env::temp_dir().join("vnicd-XXXXXX");
    let mut buf = template.into_os_string().into_vec();
    buf.push(0);
    // SAFETY: `buf` is a writable, NUL-terminated path ending in six X
    // characters, as mkdtemp(3) requires; it replaces them in place and
    // does not keep the pointer.
    let r = unsafe { libc::mkdtemp(buf.as_mut_ptr().cast()) };
    if r.is_null() {
        return Err(io::Error::last_os_error());
    }
    buf.pop();
    Ok(PathBuf::from(std::ffi::OsString::from_vec(buf)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::{sync::mpsc, time::Duration};

    use super::*;
    use crate::nic::DeviceConfig;

    fn device() -> Arc<Nic> {
        let cfg = DeviceConfig::new(
            1,
            vnic_protocol::wire::ethernet::Address([2, 0, 0, 0, 0, 1]),
        );
        Arc::new(Nic::single(cfg, Box::new(NoUplink { queues: 1 })).unwrap())
    }

    /// Serves a frontend that hangs up at once, in a thread: a serve that
    /// blocks fails the test instead of hanging it.
    fn serve_a_hang_up(dev: &Arc<Nic>) -> Result<(), DaemonError> {
        let (front, vmm) = UnixStream::pair().unwrap();
        drop(vmm);
        let dev = dev.clone();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(serve_conn(&dev, 0, front));
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("serve_conn returned")
    }

    #[test]
    fn files_another_local_user_prepares_in_the_temporary_directory_change_nothing() {
        // What another user could set up for the per-connection names
        // vnicd once used (/tmp/vnicd-<pid>-<n>): the directories, with a
        // socket listening where the backend would connect.
        let pid = std::process::id();
        let mut traps = Vec::new();
        for n in 0..32 {
            let d = std::env::temp_dir().join(format!("vnicd-{pid}-{n}"));
            let _ = std::fs::create_dir(&d);
            let l = UnixListener::bind(d.join("backend.sock")).unwrap();
            l.set_nonblocking(true).unwrap();
            traps.push((d, l));
        }
        let dev = device();
        let results: Vec<_> = (0..3).map(|_| serve_a_hang_up(&dev)).collect();
        let mut caught = 0;
        for (d, l) in traps {
            if l.accept().is_ok() {
                caught += 1;
            }
            let _ = std::fs::remove_dir_all(d);
        }
        for r in results {
            assert!(r.is_ok(), "serving a frontend failed: {r:?}");
        }
        assert_eq!(caught, 0, "the backend connected to a planted socket");
    }

    #[test]
    fn the_backend_socket_leaves_nothing_behind() {
        let (a, l) = backend_socket().unwrap();
        let b = l.accept().unwrap().unwrap();
        let mut w = &a;
        std::io::Write::write_all(&mut w, b"x").unwrap();
        let mut got = [0u8; 1];
        std::io::Read::read_exact(&mut &b, &mut got).unwrap();
        assert_eq!(&got, b"x");
        // Nothing else is queued, and the socket's path is gone.
        l.set_nonblocking(true).unwrap();
        assert!(matches!(l.accept(), Ok(None)));
        let addr = a.peer_addr().unwrap();
        assert!(addr.as_pathname().is_none_or(|p| !p.exists()));
    }
}
