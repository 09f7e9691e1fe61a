//! Is a file range in the page cache?
//!
//! `sendfile(2)` reads the file inside the call: a page that is not cached is read from the
//! device while the worker's thread waits, and with one thread per core that stalls every
//! connection on the core. An engine's own file read (io_uring `READ`) does not block the
//! thread. So a caller asks [`residency`] first and sends only cached ranges by sendfile,
//! reading the rest through the engine (see docs/zero-copy.md).
//!
//! The answer comes from `cachestat(2)` (Linux 6.5) in one call, or else from `mincore(2)`
//! on a mapping of the range (pages are not faulted in by either). It is a hint: a page can
//! be evicted right after the answer, and a page whose read is still in flight counts as
//! cached. Readahead puts pages in flight ahead of every sequential read, so once a caller
//! has read a file's cold pages it must not trust the probe for the pages that follow.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// Where the bytes of a file range are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residency {
    /// Every page of the range is in the page cache.
    Cached,
    /// At least one page would have to be read from the device.
    NotCached,
    /// The kernel could not say (no cachestat, and the file cannot be mapped).
    Unknown,
}

/// `struct cachestat_range` of the kernel's uapi.
#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

/// `struct cachestat` of the kernel's uapi.
#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// `cachestat(2)`: 451 on every architecture (it is past the unified syscall numbering).
const SYS_CACHESTAT: libc::c_long = 451;

/// Cleared once cachestat turns out to be missing (an older kernel, or a seccomp filter),
/// so that later calls go straight to the mincore fallback.
static CACHESTAT_WORKS: AtomicBool = AtomicBool::new(true);

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u64
    } else {
        4096
    }
}

/// Whether `len` bytes of `file` from `offset` are all in the page cache. The caller knows
/// the file's length and asks about a range inside it: pages past the end are never cached.
/// One system call (cachestat), or three (mmap, mincore, munmap) on kernels before 6.5.
pub fn residency(file: BorrowedFd<'_>, offset: u64, len: u64) -> Residency {
    if len == 0 {
        return Residency::Cached;
    }
    if CACHESTAT_WORKS.load(Ordering::Relaxed) {
        match cachestat(file, offset, len) {
            Ok(r) => return r,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EPERM)) => {
                CACHESTAT_WORKS.store(false, Ordering::Relaxed);
            }
            Err(_) => return Residency::Unknown,
        }
    }
    mincore(file, offset, len).unwrap_or(Residency::Unknown)
}

/// The pages that hold bytes `offset..offset + len`.
fn pages_in(offset: u64, len: u64) -> u64 {
    let page = page_size();
    offset.saturating_add(len).div_ceil(page) - offset / page
}

fn cachestat(file: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<Residency> {
    let range = CachestatRange { off: offset, len };
    let mut stat = Cachestat::default();
    // SAFETY: cachestat reads `range` and writes `stat`, both live, correctly laid out uapi
    // structs; the flags must be 0; the descriptor is borrowed open.
    let rc = unsafe {
        libc::syscall(SYS_CACHESTAT, file.as_raw_fd(), &range as *const CachestatRange, &mut stat as *mut Cachestat, 0)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let want = pages_in(offset, len);
    Ok(if stat.nr_cache >= want { Residency::Cached } else { Residency::NotCached })
}

fn mincore(file: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<Residency> {
    let page = page_size();
    let end = offset.saturating_add(len);
    let start = offset - offset % page;
    let map_len = usize::try_from(end - start).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a read-only shared mapping that is never read through (mincore only inspects
    // it), so neither a truncation of the file nor a range past its end can fault this
    // process; pages past the end are reported as not resident.
    let map = unsafe { memmap2::MmapOptions::new().offset(start).len(map_len).map(file.as_raw_fd()) }?;
    let mut vec = vec![0u8; map_len.div_ceil(page as usize)];
    // SAFETY: the mapping covers `map_len` bytes from its page-aligned start and `vec` has
    // one byte per page of it, as mincore requires.
    let rc = unsafe { libc::mincore(map.as_ptr() as *mut libc::c_void, map_len, vec.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(if vec.iter().all(|b| b & 1 == 1) { Residency::Cached } else { Residency::NotCached })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;

    const MIB: u64 = 1 << 20;

    /// Both probes see a file leave the page cache and come back once read; pages past the
    /// end of the file are never cached.
    #[test]
    fn residency_follows_the_page_cache() {
        // On disk (not tmpfs, whose pages cannot be evicted); unnamed, so nothing is left.
        let f = tempfile::tempfile_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let fd = f.as_fd();
        for (name, probe) in
            [("cachestat", cachestat as fn(BorrowedFd<'_>, u64, u64) -> io::Result<Residency>), ("mincore", mincore)]
        {
            f.write_all_at(&vec![5u8; 16 * MIB as usize], 0).unwrap();
            assert_eq!(probe(fd, 0, 16 * MIB).unwrap(), Residency::Cached, "{name}: just written");
            assert_eq!(probe(fd, 15 * MIB, MIB - 1).unwrap(), Residency::Cached, "{name}: an unaligned range");
            assert_eq!(probe(fd, 15 * MIB, 2 * MIB).unwrap(), Residency::NotCached, "{name}: past the end");
            f.sync_all().unwrap();
            // SAFETY: fadvise on an open descriptor only drops clean cached pages.
            assert_eq!(unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
            assert_eq!(probe(fd, 0, MIB).unwrap(), Residency::NotCached, "{name}: evicted");
            f.read_exact_at(&mut [0u8; 8192], 0).unwrap();
            assert_eq!(probe(fd, 0, 8192).unwrap(), Residency::Cached, "{name}: the pages just read");
            // Readahead after an 8 KiB read never reaches 15 MiB further on.
            assert_eq!(probe(fd, 15 * MIB, MIB).unwrap(), Residency::NotCached, "{name}: the tail was not read");
        }
        assert_eq!(residency(fd, 0, 0), Residency::Cached);
        assert_eq!(residency(fd, 0, 8192), Residency::Cached);
    }
}
