//! The capability report: what the running engine really uses, what the kernel offers, and
//! the named fallback taken where a backend lacks something. Printed at start, exported in
//! metrics, and asserted on by the conformance suite.

use std::fmt;

use crate::runtime::RingFlags;

/// Which I/O driver is running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Driver {
    /// io_uring.
    IoUring,
    /// The engine's readiness (epoll) fallback, and why it was taken.
    Epoll {
        /// Why io_uring is not in use.
        reason: String,
    },
}

/// One optional mechanism: whether the kernel offers it, whether the backend uses it, and what
/// runs instead when it does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mechanism {
    /// The kernel supports it (probed opcode or feature).
    pub kernel: bool,
    /// The backend uses it on this engine.
    pub used: bool,
    /// What runs instead when it is not used (empty when used).
    pub fallback: &'static str,
}

impl Mechanism {
    /// Used by the backend (the kernel necessarily has it).
    pub fn used(kernel: bool) -> Self {
        Self { kernel, used: kernel, fallback: if kernel { "" } else { "unavailable in this kernel" } }
    }
    /// Not used by this backend; `fallback` names what runs instead.
    pub fn fallback(kernel: bool, fallback: &'static str) -> Self {
        Self { kernel, used: false, fallback }
    }
}

/// What an engine on one worker uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// The backend name.
    pub runtime: &'static str,
    /// io_uring or the fallback driver.
    pub driver: Driver,
    /// Ring setup flags that were asked for.
    pub ring_flags_requested: RingFlags,
    /// Ring setup flags the kernel and engine accepted (`None` when the engine cannot take
    /// flags from corepin, or when no ring is in use).
    pub ring_flags: Option<RingFlags>,
    /// Submission queue entries of the main ring.
    pub ring_entries: u32,
    /// Splice (file to socket without user space).
    pub splice: Mechanism,
    /// Zero-copy send (`IORING_OP_SEND_ZC`).
    pub send_zc: Mechanism,
    /// Registered (fixed) buffers.
    pub registered_buffers: Mechanism,
    /// Multishot accept.
    pub multishot_accept: Mechanism,
    /// Multishot receive.
    pub multishot_recv: Mechanism,
    /// Provided buffer rings.
    pub buffer_rings: Mechanism,
    /// How readiness of foreign descriptors (eventfd, AF_XDP) is awaited.
    pub fd_readiness: &'static str,
    /// How [`send_file`](crate::runtime::TcpStream::send_file) moves file bytes to a socket.
    pub file_transfer: &'static str,
    /// How file reads are done, and whether a page-cache miss can block the worker.
    pub file_reads: &'static str,
    /// Whether owned-buffer I/O copies through an engine-internal buffer.
    pub rent_copies: bool,
    /// Anything else a user should know (limits, refusals).
    pub notes: Vec<String>,
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "capabilities ({}):", self.runtime)?;
        match &self.driver {
            Driver::IoUring => writeln!(f, "  driver:             io_uring ({} entries)", self.ring_entries)?,
            Driver::Epoll { reason } => writeln!(f, "  driver:             epoll fallback ({reason})")?,
        }
        let req = self.ring_flags_requested.names();
        match &self.ring_flags {
            _ if matches!(self.driver, Driver::Epoll { .. }) => {
                writeln!(f, "  ring flags:         none (epoll driver, no ring)")?
            }
            Some(got) => {
                let got = got.names();
                writeln!(
                    f,
                    "  ring flags:         {} (asked for {})",
                    if got.is_empty() { "none".to_string() } else { got.join("|") },
                    if req.is_empty() { "none".to_string() } else { req.join("|") }
                )?;
            }
            None => writeln!(f, "  ring flags:         set by the engine, not by corepin")?,
        }
        for (name, m) in [
            ("splice", &self.splice),
            ("send_zc", &self.send_zc),
            ("registered buffers", &self.registered_buffers),
            ("multishot accept", &self.multishot_accept),
            ("multishot recv", &self.multishot_recv),
            ("buffer rings", &self.buffer_rings),
        ] {
            write!(
                f,
                "  {:<19} {} (kernel: {})",
                format!("{name}:"),
                if m.used { "used" } else { "not used" },
                yes(m.kernel)
            )?;
            if !m.used && !m.fallback.is_empty() {
                write!(f, "; fallback: {}", m.fallback)?;
            }
            writeln!(f)?;
        }
        writeln!(f, "  fd readiness:       {}", self.fd_readiness)?;
        writeln!(f, "  file transfer:      {}", self.file_transfer)?;
        writeln!(f, "  file reads:         {}", self.file_reads)?;
        writeln!(f, "  rent I/O copies:    {}", yes(self.rent_copies))?;
        for n in &self.notes {
            writeln!(f, "  note: {n}")?;
        }
        Ok(())
    }
}

/// What this kernel's io_uring offers, probed once per process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelSupport {
    /// io_uring rings can be created at all.
    pub io_uring: bool,
    /// `IORING_OP_SPLICE`.
    pub splice: bool,
    /// `IORING_OP_SEND_ZC`.
    pub send_zc: bool,
    /// Multishot accept (accept opcode plus kernel >= 5.19 feature set; probed via
    /// `SEND_ZC`'s presence, which arrived after it).
    pub multishot_accept: bool,
    /// Multishot receive (6.0+).
    pub multishot_recv: bool,
    /// Provided buffer rings (`IORING_REGISTER_PBUF_RING`, 5.19+).
    pub buffer_rings: bool,
    /// `IORING_OP_PROVIDE_BUFFERS` / fixed buffers can be registered.
    pub registered_buffers: bool,
}

impl KernelSupport {
    /// Probes the running kernel (cached after the first call).
    pub fn get() -> KernelSupport {
        static CACHE: std::sync::OnceLock<KernelSupport> = std::sync::OnceLock::new();
        *CACHE.get_or_init(probe)
    }
}

fn probe() -> KernelSupport {
    use io_uring::{opcode, IoUring, Probe};
    let Ok(ring) = IoUring::new(8) else {
        return KernelSupport::default();
    };
    let mut p = Probe::new();
    if ring.submitter().register_probe(&mut p).is_err() {
        return KernelSupport { io_uring: true, ..Default::default() };
    }
    // Multishot accept/recv and buffer rings have no opcode of their own; they arrived with
    // 5.19/6.0 together with SEND_ZC (6.0) and SOCKET (5.19), which the probe can see.
    let socket_op = p.is_supported(opcode::Socket::CODE);
    let send_zc = p.is_supported(opcode::SendZc::CODE);
    KernelSupport {
        io_uring: true,
        splice: p.is_supported(opcode::Splice::CODE),
        send_zc,
        multishot_accept: socket_op,
        multishot_recv: send_zc,
        buffer_rings: socket_op,
        registered_buffers: p.is_supported(opcode::ReadFixed::CODE),
    }
}

/// Why io_uring cannot be used here, if it cannot (disabled by sysctl, seccomp, or an old
/// kernel). Backends take their fallback driver when this returns `Some`.
pub fn io_uring_unavailable() -> Option<String> {
    if let Ok(v) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        match v.trim() {
            "2" => return Some("io_uring disabled by kernel.io_uring_disabled=2".into()),
            "1" => {
                // Only processes in io_uring_group may create rings; the probe below decides.
            }
            _ => {}
        }
    }
    match io_uring::IoUring::new(8) {
        Ok(_) => None,
        Err(e) => Some(format!("io_uring_setup failed: {e}")),
    }
}

/// RLIMIT_MEMLOCK soft limit in bytes (`None` when unlimited).
pub fn memlock_limit() -> Option<u64> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `r` is a valid out-parameter for getrlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 || r.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    Some(r.rlim_cur)
}
