//! An uplink in memory, for unit tests and fuzz targets: it records what
//! the device transmits, hands the device frames queued by the test, and
//! checks that every piece of guest memory the device passes it lies
//! inside the guest memory it was told about.

use std::{
    collections::VecDeque,
    io,
    os::fd::RawFd,
    sync::{Arc, Mutex, PoisonError},
};

use super::{Offloads, Piece, PieceMut, Uplink};

/// What the fake saw and what it will deliver; shared with the test.
#[derive(Debug, Default)]
pub struct FakeState {
    /// Frames sent (TAP header first), when `keep` is set.
    pub sent: Vec<Vec<u8>>,
    /// Per frame sent: for each piece, whether it was guest memory.
    pub kinds: Vec<Vec<bool>>,
    /// Frames sent, kept or not.
    pub sent_count: u64,
    /// Frames (TAP header first) the device reads next, in order.
    pub to_receive: VecDeque<Vec<u8>>,
    /// Frames the device read.
    pub received: u64,
    /// Host address ranges (start, length) of guest memory; empty means
    /// no check.
    pub guest_ranges: Vec<(usize, usize)>,
    /// Pieces of guest memory outside `guest_ranges`.
    pub stray_pieces: u64,
    /// Keep every frame sent (tests), or only count them (fuzzing).
    pub discard: bool,
}

/// See the module documentation. Clones share their state.
#[derive(Debug, Clone, Default)]
pub struct FakeUplink {
    pub state: Arc<Mutex<FakeState>>,
    pub offloads: Offloads,
}

impl FakeUplink {
    pub fn with_offloads(offloads: Offloads) -> FakeUplink {
        FakeUplink {
            offloads,
            ..Default::default()
        }
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Frames sent so far (TAP header first).
    pub fn sent(&self) -> Vec<Vec<u8>> {
        self.lock().sent.clone()
    }

    /// Queues a frame (TAP header first) for the device to receive.
    pub fn push_rx(&self, frame: Vec<u8>) {
        self.lock().to_receive.push_back(frame);
    }
}

fn inside(ranges: &[(usize, usize)], ptr: usize, len: usize) -> bool {
    ranges.is_empty()
        || ranges
            .iter()
            .any(|&(start, n)| ptr >= start && ptr.checked_add(len).is_some_and(|e| e <= start + n))
}

impl Uplink for FakeUplink {
    fn queues(&self) -> usize {
        1
    }

    fn tx_offloads(&self) -> Offloads {
        self.offloads
    }

    fn set_rx_offloads(&self, _o: Offloads) -> io::Result<()> {
        Ok(())
    }

    fn send(&self, _q: usize, pieces: &[Piece<'_>]) -> io::Result<usize> {
        let mut st = self.lock();
        let keep = !st.discard;
        let mut frame = Vec::new();
        let mut n = 0;
        for p in pieces {
            if let Piece::Guest(v) = p {
                let at = v.ptr_guard().as_ptr() as usize;
                if !inside(&st.guest_ranges, at, v.len()) {
                    st.stray_pieces += 1;
                    continue;
                }
            }
            n += p.len();
            if keep {
                p.copy_to(&mut frame);
            }
        }
        st.sent_count += 1;
        if keep {
            st.sent.push(frame);
            st.kinds.push(
                pieces
                    .iter()
                    .map(|p| matches!(p, Piece::Guest(_)))
                    .collect(),
            );
        }
        Ok(n)
    }

    fn recv(&self, _q: usize, pieces: &mut [PieceMut<'_>]) -> io::Result<usize> {
        let mut st = self.lock();
        let Some(frame) = st.to_receive.pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let mut done = 0;
        for p in pieces.iter_mut() {
            if done == frame.len() {
                break;
            }
            let src = &frame[done..];
            done += match p {
                PieceMut::Local(b) => {
                    let n = b.len().min(src.len());
                    b[..n].copy_from_slice(&src[..n]);
                    n
                }
                PieceMut::Guest(v) => {
                    let at = v.ptr_guard().as_ptr() as usize;
                    if !inside(&st.guest_ranges, at, v.len()) {
                        st.stray_pieces += 1;
                        return Err(io::Error::other("guest piece outside guest memory"));
                    }
                    let n = v.len().min(src.len());
                    v.copy_from(&src[..n]);
                    n
                }
            };
        }
        st.received += 1;
        if done < frame.len() {
            // As a TAP does with too small a buffer: the frame is gone.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "frame longer than the buffers",
            ));
        }
        Ok(done)
    }

    fn rx_fd(&self, _q: usize) -> Option<RawFd> {
        None
    }
}
