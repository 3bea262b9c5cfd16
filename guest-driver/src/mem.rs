//! Driver-owned shared memory: one memfd-backed region that the device maps
//! through vhost-user, and a bump allocator over it.

use std::{ffi::CStr, fs::File, os::fd::FromRawFd};

use vm_memory::{Address, FileOffset, GuestAddress, GuestMemoryMmap};

use crate::{Error, Result};

/// Where the region starts in the device's view of guest addresses (not 0:
/// virtio-queue treats a ring at address 0 as unset).
pub const BASE: GuestAddress = GuestAddress(0x10_0000);

/// The driver's memory and its allocation cursor.
#[derive(Debug)]
pub struct DmaMemory {
    pub mem: GuestMemoryMmap,
    pub file: File,
    pub size: usize,
    next: u64,
}

fn memfd(size: usize) -> Result<File> {
    let name: &CStr = c"vnic-guest";
    // SAFETY: `name` is a valid NUL-terminated string; the call creates a
    // new file descriptor or fails.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Io(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by no one
    // else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size as u64)?;
    Ok(f)
}

impl DmaMemory {
    /// Creates `size` bytes of shared memory at [`BASE`].
    pub fn new(size: usize) -> Result<DmaMemory> {
        let file = memfd(size)?;
        let fo = FileOffset::new(file.try_clone()?, 0);
        let mem = GuestMemoryMmap::from_ranges_with_files([(BASE, size, Some(fo))])?;
        Ok(DmaMemory {
            mem,
            file,
            size,
            next: BASE.raw_value(),
        })
    }

    /// Reserves `len` bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, len: usize, align: u64) -> Result<GuestAddress> {
        let start = self.next.div_ceil(align) * align;
        let end = start + len as u64;
        let limit = BASE.raw_value() + self.size as u64;
        if end > limit {
            return Err(Error::OutOfMemory {
                wanted: len,
                left: limit.saturating_sub(start) as usize,
            });
        }
        self.next = end;
        Ok(GuestAddress(start))
    }
}
