//! Driver-owned shared memory and a bump allocator over it.
//!
//! Two kinds: one memfd region that a vhost-user device maps (its
//! addresses are offsets from [`BASE`]), and 2 MiB hugepages for a PCI
//! device, each a region at its physical address so that what the driver
//! writes into descriptors is what the device's DMA uses. An allocation
//! never straddles two regions (hugepages need not be physically next to
//! each other).

use std::{
    ffi::CStr,
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom},
    os::fd::{AsRawFd, FromRawFd},
    path::Path,
};

use vm_memory::{Address, FileOffset, GuestAddress, GuestMemoryMmap};

use crate::{Error, Result};

/// Where the memfd region starts in the device's view of guest addresses
/// (not 0: virtio-queue treats a ring at address 0 as unset).
pub const BASE: GuestAddress = GuestAddress(0x10_0000);

/// Size of a hugepage.
pub const HUGEPAGE: usize = 2 << 20;

/// The driver's memory and its allocation cursor.
#[derive(Debug)]
pub struct DmaMemory {
    pub mem: GuestMemoryMmap,
    pub file: File,
    pub size: usize,
    /// Start and length of each region, by address.
    regions: Vec<(u64, usize)>,
    /// The region allocations come from, and the next free address in it.
    region: usize,
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
            regions: vec![(BASE.raw_value(), size)],
            region: 0,
            next: BASE.raw_value(),
        })
    }

    /// At least `size` bytes of 2 MiB hugepages from the hugetlbfs mounted
    /// at `mount` (hugetlb pages are never swapped), each a region at its
    /// physical address (read from /proc/self/pagemap, which needs root).
    pub fn hugepages(mount: &Path, size: usize) -> Result<DmaMemory> {
        let pages = size.div_ceil(HUGEPAGE).max(1);
        let len = pages * HUGEPAGE;
        let path = mount.join(format!("vnic-guest-{}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        // The pages stay with the open file; its name is not needed.
        let _ = std::fs::remove_file(&path);
        file.set_len(len as u64)
            .map_err(|e| hugepage_error(e, pages))?;
        let phys = physical_pages(&file, pages)?;
        let mut ranges: Vec<(GuestAddress, usize, Option<FileOffset>)> = Vec::new();
        for (i, &p) in phys.iter().enumerate() {
            let fo = FileOffset::new(file.try_clone()?, (i * HUGEPAGE) as u64);
            ranges.push((GuestAddress(p), HUGEPAGE, Some(fo)));
        }
        ranges.sort_by_key(|r| r.0);
        let regions = ranges.iter().map(|r| (r.0.raw_value(), r.1)).collect();
        let mem = GuestMemoryMmap::from_ranges_with_files(ranges)?;
        let next = phys.iter().copied().min().unwrap_or(0);
        Ok(DmaMemory {
            mem,
            file,
            size: len,
            regions,
            region: 0,
            next,
        })
    }

    /// Checks that every region's first page is, as the kernel sees this
    /// process's mapping of it now, at the region's address: the device
    /// DMAs to what the descriptors say.
    pub fn check_physical(&self) -> Result<()> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let mut pagemap = File::open("/proc/self/pagemap")?;
        for r in self.mem.iter() {
            let va = r
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| Error::Argument(format!("region without memory: {e}")))?
                as usize;
            // SAFETY: `va` is the first byte of a mapped region of this
            // memory; reading it faults the page in for pagemap to see.
            unsafe { std::ptr::read_volatile(va as *const u8) };
            let pa = pfn_of(&mut pagemap, va)? * 4096;
            if pa != r.start_addr().raw_value() {
                return Err(Error::Argument(format!(
                    "hugepage at {:#x} maps {pa:#x}",
                    r.start_addr().raw_value()
                )));
            }
        }
        Ok(())
    }

    /// Bytes handed out or passed over so far.
    fn used(&self) -> usize {
        let done: usize = self.regions[..self.region.min(self.regions.len())]
            .iter()
            .map(|r| r.1)
            .sum();
        let here = self
            .regions
            .get(self.region)
            .map_or(0, |&(start, _)| self.next.saturating_sub(start) as usize);
        done + here
    }

    /// Reserves `len` bytes aligned to `align` (a power of two) within one
    /// region.
    pub fn alloc(&mut self, len: usize, align: u64) -> Result<GuestAddress> {
        while let Some(&(start, size)) = self.regions.get(self.region) {
            let at = self.next.max(start).div_ceil(align) * align;
            let end = at + len as u64;
            if end <= start + size as u64 {
                self.next = end;
                return Ok(GuestAddress(at));
            }
            self.region += 1;
            self.next = 0;
        }
        Err(Error::OutOfMemory {
            wanted: len,
            left: self.size.saturating_sub(self.used()),
        })
    }
}

fn hugepage_error(e: std::io::Error, pages: usize) -> Error {
    Error::Argument(format!(
        "cannot get {pages} hugepages of 2 MiB ({e}): reserve them with \
         echo N > /proc/sys/vm/nr_hugepages"
    ))
}

/// Maps `pages` hugepages of `file`, faults them in, locks them, and
/// returns their physical addresses. The mapping goes away; the pages
/// stay the file's.
fn physical_pages(file: &File, pages: usize) -> Result<Vec<u64>> {
    let len = pages * HUGEPAGE;
    // SAFETY: a new shared mapping of `len` bytes of an open file; the
    // kernel picks the address. The result is checked below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            file.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(hugepage_error(std::io::Error::last_os_error(), pages));
    }
    let r = (|| {
        let mut pagemap = File::open("/proc/self/pagemap")?;
        let mut out = Vec::with_capacity(pages);
        for i in 0..pages {
            let va = p as usize + i * HUGEPAGE;
            // SAFETY: `va` is inside the mapping made above; touching one
            // byte makes sure the page is present (MAP_POPULATE may have
            // failed quietly).
            unsafe { std::ptr::write_volatile(va as *mut u8, 0) };
            out.push(pfn_of(&mut pagemap, va)? * 4096);
        }
        Ok(out)
    })();
    // SAFETY: `p` and `len` are the mapping made above, unmapped once;
    // nothing refers to it past this point.
    unsafe { libc::munmap(p, len) };
    r
}

/// The page frame behind virtual address `va` of this process.
fn pfn_of(pagemap: &mut File, va: usize) -> Result<u64> {
    let mut e = [0u8; 8];
    pagemap.seek(SeekFrom::Start((va / 4096 * 8) as u64))?;
    pagemap.read_exact(&mut e)?;
    let e = u64::from_le_bytes(e);
    let pfn = e & ((1 << 55) - 1);
    if e & (1 << 63) == 0 || pfn == 0 {
        return Err(Error::Argument(
            "no physical address in /proc/self/pagemap (needs root)".into(),
        ));
    }
    Ok(pfn)
}
