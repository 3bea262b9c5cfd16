//! Shared by the fuzz targets: structured input read from the fuzzer's
//! bytes.

/// The fuzzer's bytes, read front to back; reads past the end give
/// `None` or fewer bytes.
#[derive(Debug)]
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    pub fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }

    pub fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.byte()?, self.byte()?]))
    }

    /// Up to `n` bytes.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

/// Every region of `mem`, copied out: (start address, bytes).
pub fn snapshot(mem: &vm_memory::GuestMemoryMmap) -> Vec<(u64, Vec<u8>)> {
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
    mem.iter()
        .map(|r| {
            let mut v = vec![0u8; r.len() as usize];
            let _ = mem.read_slice(&mut v, r.start_addr());
            (r.start_addr().0, v)
        })
        .collect()
}

/// Asserts that every byte that differs between two [`snapshot`]s lies
/// in one of the `allowed` ranges (start, end).
pub fn check_writes(before: &[(u64, Vec<u8>)], after: &[(u64, Vec<u8>)], allowed: &[(u64, u64)]) {
    for ((base, a), (_, b)) in before.iter().zip(after) {
        // Whole chunks compare with memcmp; only differing ones are walked.
        for (c, (x, y)) in a.chunks(256).zip(b.chunks(256)).enumerate() {
            if x == y {
                continue;
            }
            for (k, (p, q)) in x.iter().zip(y).enumerate() {
                if p != q {
                    let at = base + (c * 256 + k) as u64;
                    assert!(
                        allowed.iter().any(|&(s, e)| at >= s && at < e),
                        "the device wrote guest byte {at:#x}, which no writable buffer covers"
                    );
                }
            }
        }
    }
}
