//! One AF_XDP socket for receiving, with its own UMEM: written on the kernel's uapi
//! (linux/if_xdp.h, as the libc crate declares it) rather than a binding crate; see
//! docs/af_xdp.md for why. Owns the UMEM, the fill, completion and RX rings and the frame
//! accounting; knows no runtime (the worker waits on [`XskSocket::fd`] for readability) and
//! never transmits.
//!
//! Frames: all of them start in the fill ring (whose size equals the frame count, so a
//! returned frame always fits). The kernel moves one to the RX ring per packet; the worker
//! takes a batch from the RX ring ([`XskSocket::receive`]), reads the packets in place, and
//! gives every frame back to the fill ring ([`XskSocket::release`]). A per-frame ownership
//! flag checks that each frame comes back exactly once (a mismatch is counted, never hidden).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

/// Frame size: a power of two, room for a 1500-byte MTU frame after the kernel's 256-byte
/// XDP headroom in copy mode.
pub const FRAME_SIZE: usize = 2048;

/// The longest packet a frame holds in copy mode: the frame less the kernel's
/// `XDP_PACKET_HEADROOM` (256 bytes) in front of the data.
pub const MAX_PACKET: usize = FRAME_SIZE - 256;

/// Frames per socket when locked memory allows (8 MiB of UMEM).
pub const DEFAULT_FRAMES: u32 = 4096;

/// The fewest frames worth running with.
pub const MIN_FRAMES: u32 = 64;

/// Setting up or using an AF_XDP socket failed.
#[derive(Debug, thiserror::Error)]
pub enum XskError {
    /// A system call failed: which one, the errno, and what usually causes it.
    #[error("AF_XDP {call} on {interface} queue {queue}: {source}{hint}")]
    Sys {
        /// The call (and option).
        call: &'static str,
        /// The interface.
        interface: String,
        /// The RX queue.
        queue: u32,
        /// The errno.
        source: io::Error,
        /// What to check, given that errno (may be empty).
        hint: &'static str,
    },
    /// The interface does not exist (in this network namespace).
    #[error("no interface {0:?} (in this network namespace)")]
    NoInterface(String),
}

/// How long a bind that meets EBUSY (a queue still held by a socket being torn down) is
/// retried.
const BIND_BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn hint(call: &str, e: &io::Error) -> &'static str {
    match (call, e.raw_os_error()) {
        (_, Some(libc::EPERM)) | (_, Some(libc::EACCES)) => " (AF_XDP needs CAP_NET_RAW and CAP_BPF, i.e. root)",
        ("socket", Some(libc::EAFNOSUPPORT)) => " (the kernel has no AF_XDP: CONFIG_XDP_SOCKETS)",
        ("setsockopt(XDP_UMEM_REG)", Some(libc::ENOMEM)) | ("mmap(umem)", Some(libc::ENOMEM)) => {
            " (locked memory: raise RLIMIT_MEMLOCK (ulimit -l) or run with CAP_IPC_LOCK)"
        }
        ("bind", Some(libc::EINVAL)) => " (queue out of range for the interface? see ethtool -l)",
        ("bind", Some(libc::EBUSY)) => " (another AF_XDP socket is bound to this queue, for longer than 2 s)",
        ("bind", Some(libc::ENODEV)) => " (the interface is gone or down)",
        _ => "",
    }
}

/// How the socket ended up bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindMode {
    /// The driver DMAs straight into the UMEM.
    ZeroCopy,
    /// The kernel copies each packet into a UMEM frame.
    Copy,
}

impl std::fmt::Display for BindMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BindMode::ZeroCopy => "zero-copy",
            BindMode::Copy => "copy",
        })
    }
}

/// The kernel's drop counters of a socket (`XDP_STATISTICS`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XskStats {
    /// Dropped for other reasons (a frame too small for the packet, say).
    pub rx_dropped: u64,
    /// Invalid descriptors given to the kernel.
    pub rx_invalid_descs: u64,
    /// Dropped because the RX ring was full.
    pub rx_ring_full: u64,
    /// Dropped because the fill ring was empty.
    pub rx_fill_ring_empty_descs: u64,
}

/// The frames given to and taken from the kernel, and any ownership mistake.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameAccount {
    /// Frames in the UMEM.
    pub frames: u32,
    /// Frames taken from the RX ring.
    pub received: u64,
    /// Frames given back to the fill ring after use.
    pub returned: u64,
    /// Frames the kernel handed over that were not its to hand, or frames given back twice
    /// (always 0 unless something is wrong).
    pub mistakes: u64,
}

/// A mapped ring: producer and consumer indices, and `size` entries of `T`.
struct Ring<T> {
    map: NonNull<libc::c_void>,
    map_len: usize,
    producer: *const AtomicU32,
    consumer: *const AtomicU32,
    descs: *mut T,
    size: u32,
}

impl<T: Copy> Ring<T> {
    /// Maps the ring of `size` entries at page offset `pgoff` of `fd`, laid out per `off`.
    fn map(fd: RawFd, off: &libc::xdp_ring_offset, size: u32, pgoff: libc::off_t) -> io::Result<Self> {
        let map_len = off.desc as usize + size as usize * std::mem::size_of::<T>();
        // SAFETY: a shared mapping of the socket's ring at the offset the kernel names; the
        // kernel checks the length against the ring it allocated.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                pgoff,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let map = NonNull::new(p).ok_or_else(|| io::Error::other("mmap returned null"))?;
        let base = p.cast::<u8>();
        // SAFETY: the offsets come from XDP_MMAP_OFFSETS and lie inside the mapping; the
        // producer and consumer words are 4-byte aligned u32s shared with the kernel, read and
        // written only atomically.
        let (producer, consumer, descs) = unsafe {
            (
                base.add(off.producer as usize).cast::<AtomicU32>().cast_const(),
                base.add(off.consumer as usize).cast::<AtomicU32>().cast_const(),
                base.add(off.desc as usize).cast::<T>(),
            )
        };
        Ok(Self { map, map_len, producer, consumer, descs, size })
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: points into the live mapping (see `map`), which outlives `self`'s borrows.
        unsafe { &*self.producer }
    }

    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as for `producer`.
        unsafe { &*self.consumer }
    }

    /// Entry `idx` (taken modulo the size, a power of two).
    fn read(&self, idx: u32) -> T {
        // SAFETY: `idx & (size - 1)` < size entries, all inside the mapping.
        unsafe { std::ptr::read_volatile(self.descs.add((idx & (self.size - 1)) as usize)) }
    }

    fn write(&self, idx: u32, value: T) {
        // SAFETY: as for `read`; the entry is the producer's (ours) until published.
        unsafe { std::ptr::write_volatile(self.descs.add((idx & (self.size - 1)) as usize), value) }
    }
}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; nothing points into it afterwards
        // (the ring is dropped with its socket).
        unsafe { libc::munmap(self.map.as_ptr(), self.map_len) };
    }
}

/// An AF_XDP socket bound to one RX queue of one interface, receiving into its own UMEM.
pub struct XskSocket {
    // Field order is drop order: rings and the UMEM are unmapped before the socket closes.
    fill: Ring<u64>,
    _completion: Ring<u64>,
    rx: Ring<libc::xdp_desc>,
    umem: NonNull<u8>,
    umem_len: usize,
    fd: OwnedFd,
    /// Whether the kernel owns frame `i` (in the fill ring, or being filled).
    kernel_owns: Vec<bool>,
    account: FrameAccount,
    mode: BindMode,
    queue: u32,
}

impl std::fmt::Debug for XskSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XskSocket")
            .field("queue", &self.queue)
            .field("mode", &self.mode)
            .field("frames", &self.account.frames)
            .finish_non_exhaustive()
    }
}

fn setsockopt<T>(fd: RawFd, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: setsockopt reads size_of::<T>() bytes from `value`, a live reference.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_XDP,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn getsockopt<T: Copy>(fd: RawFd, name: libc::c_int, zero: T) -> io::Result<T> {
    let mut value = zero;
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` (the size of `value`) bytes into `value`.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_XDP, name, (&mut value as *mut T).cast(), &mut len) };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The index of `interface` in the caller's network namespace.
pub fn ifindex(interface: &str) -> Result<u32, XskError> {
    let name = std::ffi::CString::new(interface).map_err(|_| XskError::NoInterface(interface.to_string()))?;
    // SAFETY: `name` is a valid NUL-terminated string for the call.
    let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if idx == 0 {
        return Err(XskError::NoInterface(interface.to_string()));
    }
    Ok(idx)
}

/// Whether this kernel and process can make AF_XDP sockets at all (`Err` says why not).
pub fn probe() -> io::Result<()> {
    // SAFETY: plain socket creation; the descriptor is closed at once by OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(())
}

impl XskSocket {
    /// Creates a socket with a UMEM of `frames` frames (a power of two, at least
    /// [`MIN_FRAMES`]), fills the fill ring, and binds it to `queue` of `interface`. Call it
    /// on the worker that will read it: the UMEM is touched here, so it is that core's memory.
    pub fn bind(interface: &str, queue: u32, frames: u32) -> Result<Self, XskError> {
        let frames = frames.max(MIN_FRAMES).next_power_of_two();
        let ifindex = ifindex(interface)?;
        let sys = |call: &'static str| {
            move |source: io::Error| XskError::Sys {
                call,
                interface: interface.to_string(),
                queue,
                hint: hint(call, &source),
                source,
            }
        };
        // SAFETY: plain socket creation.
        let raw = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(sys("socket")(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let umem_len = frames as usize * FRAME_SIZE;
        // SAFETY: a private anonymous mapping; MAP_POPULATE touches it now, on this core.
        let area = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                umem_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if area == libc::MAP_FAILED {
            return Err(sys("mmap(umem)")(io::Error::last_os_error()));
        }
        let umem = NonNull::new(area.cast::<u8>()).ok_or_else(|| sys("mmap(umem)")(io::Error::other("null")))?;
        // From here the area is unmapped by `Umem`'s guard if a later step fails.
        struct Area(NonNull<u8>, usize);
        impl Drop for Area {
            fn drop(&mut self) {
                // SAFETY: the mapping made above, not referenced once this guard drops.
                unsafe { libc::munmap(self.0.as_ptr().cast(), self.1) };
            }
        }
        let guard = Area(umem, umem_len);
        let reg = libc::xdp_umem_reg_v1 {
            addr: umem.as_ptr() as u64,
            len: umem_len as u64,
            chunk_size: FRAME_SIZE as u32,
            headroom: 0,
        };
        let rawfd = fd.as_raw_fd();
        setsockopt(rawfd, libc::XDP_UMEM_REG, &reg).map_err(sys("setsockopt(XDP_UMEM_REG)"))?;
        // The fill ring holds every frame; the RX ring half of them; the completion ring is
        // required by bind but never used (no transmit).
        let (fill_size, rx_size, comp_size) = (frames, frames / 2, MIN_FRAMES);
        setsockopt(rawfd, libc::XDP_UMEM_FILL_RING, &fill_size).map_err(sys("setsockopt(XDP_UMEM_FILL_RING)"))?;
        setsockopt(rawfd, libc::XDP_UMEM_COMPLETION_RING, &comp_size)
            .map_err(sys("setsockopt(XDP_UMEM_COMPLETION_RING)"))?;
        setsockopt(rawfd, libc::XDP_RX_RING, &rx_size).map_err(sys("setsockopt(XDP_RX_RING)"))?;
        // SAFETY: all-zero is a valid xdp_mmap_offsets (integers only).
        let zero: libc::xdp_mmap_offsets = unsafe { std::mem::zeroed() };
        let off = getsockopt(rawfd, libc::XDP_MMAP_OFFSETS, zero).map_err(sys("getsockopt(XDP_MMAP_OFFSETS)"))?;
        let fill = Ring::<u64>::map(rawfd, &off.fr, fill_size, libc::XDP_UMEM_PGOFF_FILL_RING as libc::off_t)
            .map_err(sys("mmap(fill ring)"))?;
        let completion =
            Ring::<u64>::map(rawfd, &off.cr, comp_size, libc::XDP_UMEM_PGOFF_COMPLETION_RING as libc::off_t)
                .map_err(sys("mmap(completion ring)"))?;
        let rx = Ring::<libc::xdp_desc>::map(rawfd, &off.rx, rx_size, libc::XDP_PGOFF_RX_RING)
            .map_err(sys("mmap(rx ring)"))?;
        // Stock the fill ring with every frame before binding, so the first packets land.
        let prod = fill.producer().load(Ordering::Relaxed);
        for i in 0..frames {
            fill.write(prod.wrapping_add(i), u64::from(i) * FRAME_SIZE as u64);
        }
        fill.producer().store(prod.wrapping_add(frames), Ordering::Release);
        let addr = libc::sockaddr_xdp {
            sxdp_family: libc::AF_XDP as u16,
            // No mode flag: the kernel tries zero-copy and falls back to copy by itself.
            sxdp_flags: 0,
            sxdp_ifindex: ifindex,
            sxdp_queue_id: queue,
            sxdp_shared_umem_fd: 0,
        };
        // A queue an AF_XDP socket of an exited process was bound to stays busy until the
        // kernel has finished tearing that socket down, which it does after the process is
        // gone: a restart right after a stop can meet EBUSY for a moment. So EBUSY is retried
        // for up to BIND_BUSY_WAIT before it is reported.
        let started = std::time::Instant::now();
        loop {
            // SAFETY: `addr` is a live sockaddr_xdp of the length passed.
            let rc = unsafe {
                libc::bind(
                    rawfd,
                    (&addr as *const libc::sockaddr_xdp).cast(),
                    std::mem::size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                break;
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EBUSY) || started.elapsed() >= BIND_BUSY_WAIT {
                return Err(sys("bind")(e));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let opts = getsockopt(rawfd, libc::XDP_OPTIONS, libc::xdp_options { flags: 0 })
            .map_err(sys("getsockopt(XDP_OPTIONS)"))?;
        let mode = if opts.flags & libc::XDP_OPTIONS_ZEROCOPY != 0 { BindMode::ZeroCopy } else { BindMode::Copy };
        std::mem::forget(guard);
        Ok(Self {
            fill,
            _completion: completion,
            rx,
            umem,
            umem_len,
            fd,
            kernel_owns: vec![true; frames as usize],
            account: FrameAccount { frames, ..FrameAccount::default() },
            mode,
            queue,
        })
    }

    /// The descriptor to wait on: readable while the RX ring holds packets.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The RX queue it is bound to.
    pub fn queue(&self) -> u32 {
        self.queue
    }

    /// Zero-copy or copy.
    pub fn mode(&self) -> BindMode {
        self.mode
    }

    /// Frame accounting so far.
    pub fn account(&self) -> FrameAccount {
        self.account
    }

    /// Takes up to `max` packets off the RX ring into `out` (cleared first) as (frame
    /// address, length) pairs; the packets stay in the UMEM until [`release`](Self::release).
    pub fn receive(&mut self, out: &mut Vec<(u64, u32)>, max: usize) {
        out.clear();
        let cons = self.rx.consumer().load(Ordering::Relaxed);
        let prod = self.rx.producer().load(Ordering::Acquire);
        let n = prod.wrapping_sub(cons).min(max as u32);
        for i in 0..n {
            let d = self.rx.read(cons.wrapping_add(i));
            let frame = (d.addr / FRAME_SIZE as u64) as usize;
            match self.kernel_owns.get_mut(frame) {
                Some(owned) if *owned => *owned = false,
                _ => {
                    self.account.mistakes += 1;
                    continue;
                }
            }
            out.push((d.addr, d.len));
        }
        self.account.received += u64::from(n);
        self.rx.consumer().store(cons.wrapping_add(n), Ordering::Release);
    }

    /// The bytes of a packet [`receive`](Self::receive) returned, or `None` for an address
    /// or length outside the UMEM (counted as a mistake by the caller's check).
    pub fn packet(&self, addr: u64, len: u32) -> Option<&[u8]> {
        let start = usize::try_from(addr).ok()?;
        let end = start.checked_add(len as usize)?;
        let frame_end = (start / FRAME_SIZE + 1) * FRAME_SIZE;
        if end > self.umem_len || end > frame_end {
            return None;
        }
        // SAFETY: [start, end) lies inside the UMEM and inside one frame that the kernel
        // handed over (it writes no frame it does not own) and that is not returned before
        // the borrow of `self` ends.
        Some(unsafe { std::slice::from_raw_parts(self.umem.as_ptr().add(start), end - start) })
    }

    /// Gives the frames of `packets` back to the fill ring (each exactly once).
    pub fn release(&mut self, packets: &[(u64, u32)]) {
        let prod = self.fill.producer().load(Ordering::Relaxed);
        let mut n = 0u32;
        for &(addr, _) in packets {
            let frame = (addr / FRAME_SIZE as u64) as usize;
            match self.kernel_owns.get_mut(frame) {
                Some(owned) if !*owned => *owned = true,
                _ => {
                    self.account.mistakes += 1;
                    continue;
                }
            }
            // The fill ring holds every frame, so there is always room.
            self.fill.write(prod.wrapping_add(n), frame as u64 * FRAME_SIZE as u64);
            n += 1;
        }
        self.fill.producer().store(prod.wrapping_add(n), Ordering::Release);
        self.account.returned += u64::from(n);
    }

    /// The kernel's drop counters.
    pub fn stats(&self) -> io::Result<XskStats> {
        // SAFETY: all-zero is a valid xdp_statistics (integers only).
        let zero: libc::xdp_statistics = unsafe { std::mem::zeroed() };
        let s = getsockopt(self.fd(), libc::XDP_STATISTICS, zero)?;
        Ok(XskStats {
            rx_dropped: s.rx_dropped,
            rx_invalid_descs: s.rx_invalid_descs,
            rx_ring_full: s.rx_ring_full,
            rx_fill_ring_empty_descs: s.rx_fill_ring_empty_descs,
        })
    }
}

impl AsRawFd for XskSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd()
    }
}

impl Drop for XskSocket {
    fn drop(&mut self) {
        // SAFETY: the UMEM mapping made in `bind`; the rings (dropped after this body) do not
        // point into it, and no packet borrow outlives `self`.
        unsafe { libc::munmap(self.umem.as_ptr().cast(), self.umem_len) };
    }
}

/// `CAP_IPC_LOCK` (linux/capability.h).
const CAP_IPC_LOCK: u32 = 14;

/// Whether the process holds `CAP_IPC_LOCK` (locked memory is then not limited).
pub fn has_ipc_lock() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return false };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Frames per socket for `sockets` sockets under the locked-memory limit that applies:
/// [`DEFAULT_FRAMES`], or fewer (a power of two, at least [`MIN_FRAMES`]) when
/// `RLIMIT_MEMLOCK` binds; the second value says why it shrank.
pub fn frames_for(sockets: usize, wanted: u32) -> (u32, Option<String>) {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `r` is a valid out-parameter.
    let limit = if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 || r.rlim_cur == libc::RLIM_INFINITY {
        None
    } else {
        Some(r.rlim_cur)
    };
    frames_within(sockets, wanted, if has_ipc_lock() { None } else { limit })
}

/// [`frames_for`] with the limit given: `None` when locked memory is not limited.
fn frames_within(sockets: usize, wanted: u32, limit: Option<u64>) -> (u32, Option<String>) {
    let wanted = wanted.max(MIN_FRAMES).next_power_of_two();
    let Some(limit) = limit else { return (wanted, None) };
    let per_socket = limit / sockets.max(1) as u64;
    // Rings take a few pages besides the UMEM; keep a quarter aside.
    let fit = (per_socket * 3 / 4 / FRAME_SIZE as u64).min(u64::from(u32::MAX)) as u32;
    if fit >= wanted {
        return (wanted, None);
    }
    let frames = if fit < MIN_FRAMES { MIN_FRAMES } else { 1 << (31 - fit.leading_zeros()) };
    let why = format!(
        "UMEM shrunk to {frames} frames of {FRAME_SIZE} B per queue (from {wanted}): RLIMIT_MEMLOCK is {} KiB \
         for {sockets} socket(s) and the process has no CAP_IPC_LOCK",
        limit / 1024
    );
    (frames, Some(why))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_umem_shrinks_to_the_locked_memory_limit_and_says_so() {
        // Unlimited (or CAP_IPC_LOCK): what was asked, rounded up to a power of two.
        assert_eq!(frames_within(2, 4096, None), (4096, None));
        assert_eq!(frames_within(2, 1000, None), (1024, None));
        // 8 MiB for one socket: 3/4 of it is 3072 frames, so 2048, said so.
        let (f, why) = frames_within(1, 4096, Some(8 << 20));
        assert_eq!(f, 2048);
        let why = why.expect("a reason");
        assert!(why.contains("UMEM shrunk to 2048 frames") && why.contains("8192 KiB"), "{why}");
        // 8 MiB for four sockets: 768 frames fit, so 512 each.
        assert_eq!(frames_within(4, 4096, Some(8 << 20)).0, 512);
        // Enough room: no shrinking.
        assert_eq!(frames_within(1, 4096, Some(64 << 20)), (4096, None));
        // Almost nothing: the minimum, still said.
        let (f, why) = frames_within(8, 4096, Some(64 << 10));
        assert_eq!(f, MIN_FRAMES);
        assert!(why.is_some());
    }
}
