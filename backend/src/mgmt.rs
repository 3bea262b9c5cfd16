//! The management socket and its client, `vnicd ctl`.
//!
//! A request is one line; the answer is text, then the server closes the
//! connection. Requests: `stats`.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::Path,
    sync::Arc,
    thread::{self, JoinHandle},
};

use crate::nic::Device;

fn answer(dev: &Device, req: &str) -> String {
    match req.trim() {
        "stats" => dev.stats.render(),
        other => format!("error: unknown request {other:?}; known: stats\n"),
    }
}

fn handle(dev: &Device, stream: UnixStream) -> io::Result<()> {
    let mut line = String::new();
    BufReader::new(stream.try_clone()?)
        .take(4096)
        .read_line(&mut line)?;
    let mut out = stream;
    out.write_all(answer(dev, &line).as_bytes())
}

/// Listens on `path` (replacing a stale socket) in a thread of its own.
pub fn serve(path: &Path, dev: Arc<Device>) -> io::Result<JoinHandle<()>> {
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    thread::Builder::new()
        .name("vnicd-mgmt".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(s) => {
                        if let Err(e) = handle(&dev, s) {
                            log::debug!("mgmt request: {e}");
                        }
                    }
                    Err(e) => log::warn!("mgmt accept: {e}"),
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
