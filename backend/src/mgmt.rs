//! The management socket and its client, `vnicd ctl`.
//!
//! A request is one line; the answer is text, then the server closes the
//! connection. Requests: `stats`.

use std::{
    io::{self, Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::nic::Device;

fn answer(dev: &Device, req: &str) -> String {
    match req.trim() {
        "stats" => dev.stats.render(),
        other => format!("error: unknown request {other:?}; known: stats\n"),
    }
}

/// How long a client may take to send its request or read the answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Clients served at once; more are told the server is busy.
const MAX_CLIENTS: usize = 8;

/// Reads one request line (at most 4096 bytes) and answers it; the whole
/// request must arrive within `timeout`, however it is cut up.
fn handle(dev: &Device, stream: UnixStream, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut line = Vec::new();
    let mut buf = [0u8; 512];
    let mut s = &stream;
    while !line.contains(&b'\n') && line.len() < 4096 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        line.extend_from_slice(&buf[..n]);
    }
    let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
    let req = String::from_utf8_lossy(&line[..end.min(4096)]);
    stream.set_write_timeout(Some(timeout))?;
    s.write_all(answer(dev, &req).as_bytes())
}

/// Listens on `path` (replacing a stale socket) in a thread of its own.
pub fn serve(path: &Path, dev: Arc<Device>) -> io::Result<JoinHandle<()>> {
    serve_with(path, dev, CLIENT_TIMEOUT)
}

/// [`serve`] with a client timeout of `timeout`. Each client is served in
/// a thread of its own, so one that never finishes its request holds up
/// no other; it is dropped after `timeout`.
pub fn serve_with(path: &Path, dev: Arc<Device>, timeout: Duration) -> io::Result<JoinHandle<()>> {
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    let busy = Arc::new(AtomicUsize::new(0));
    thread::Builder::new()
        .name("vnicd-mgmt".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let s = match conn {
                    Ok(s) => s,
                    Err(e) => {
                        log::warn!("mgmt accept: {e}");
                        continue;
                    }
                };
                if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
                    busy.fetch_sub(1, Ordering::AcqRel);
                    let _ = s.set_write_timeout(Some(timeout));
                    let _ = (&s).write_all(b"error: busy, try again\n");
                    continue;
                }
                let (dev, done) = (dev.clone(), busy.clone());
                let spawned = thread::Builder::new()
                    .name("vnicd-mgmt-client".into())
                    .spawn(move || {
                        if let Err(e) = handle(&dev, s, timeout) {
                            log::debug!("mgmt request: {e}");
                        }
                        done.fetch_sub(1, Ordering::AcqRel);
                    });
                if let Err(e) = spawned {
                    log::warn!("mgmt client thread: {e}");
                    busy.fetch_sub(1, Ordering::AcqRel);
                }
            }
        })
}

/// Sends one request and returns the answer.
pub fn request(path: &Path, req: &str) -> io::Result<String> {
    let mut s = UnixStream::connect(path)?;
    s.write_all(req.as_bytes())?;
    s.write_all(b"\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::{sync::mpsc, time::Instant};

    use super::*;
    use crate::nic::{tests::config, tests::FakeUplink};

    #[test]
    fn a_client_that_never_finishes_its_request_holds_up_no_other() {
        let dir = std::env::temp_dir().join(format!("vnic-mgmt-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mgmt");
        let dev = Arc::new(Device::new(config(1), Box::new(FakeUplink::default())).unwrap());
        dev.stats.tx[0].packet(60);
        let _server = serve_with(&path, dev, Duration::from_millis(300)).unwrap();
        // Connects and sends half a line, then nothing.
        let mut silent = UnixStream::connect(&path).unwrap();
        silent.write_all(b"sta").unwrap();
        // Another client is answered meanwhile (in a thread: a server
        // that blocks fails the test instead of hanging it).
        let (tx, rx) = mpsc::channel();
        let p = path.clone();
        thread::spawn(move || {
            let _ = tx.send(request(&p, "stats"));
        });
        let out = rx.recv_timeout(Duration::from_secs(20)).unwrap().unwrap();
        assert!(out.contains("tx0.packets 1\n"), "{out}");
        // The silent client is dropped: it reads the end of the stream.
        silent
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let t0 = Instant::now();
        let mut rest = Vec::new();
        silent.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert!(t0.elapsed() < Duration::from_secs(20));
        // A client that sends a byte now and then is dropped all the same
        // once its request has taken longer than the timeout.
        let mut slow = UnixStream::connect(&path).unwrap();
        let t0 = Instant::now();
        let mut closed = false;
        for _ in 0..100 {
            thread::sleep(Duration::from_millis(100));
            if slow.write_all(b"s").is_err() {
                closed = true;
                break;
            }
            slow.set_nonblocking(true).unwrap();
            let mut b = [0u8; 16];
            if matches!(slow.read(&mut b), Ok(0)) {
                closed = true;
                break;
            }
            slow.set_nonblocking(false).unwrap();
        }
        assert!(closed, "a trickling client is dropped");
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
