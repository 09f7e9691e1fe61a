//! The capability report: what the running engine really uses, what the kernel offers, and
//! the named fallback taken where a backend lacks something. Backends declare what their engine
//! does natively ([`Native`]); the core derives use and fallback from that and the kernel's
//! answers ([`Capabilities::derive`]). Printed at start, exported in metrics, and asserted on by
//! the conformance suite.

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

/// Whether a backend's engine can do one optional mechanism itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// The backend does it natively (used wherever the kernel and driver allow).
    Native,
    /// The backend does not; the text says why (engine version, a measured choice).
    Absent(&'static str),
}

/// What a backend declares, once, about the optional mechanisms of its engine. The core turns
/// this and the kernel's answers into the report's [`Mechanism`]s with [`Capabilities::derive`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Native {
    /// File to socket by `IORING_OP_SPLICE`.
    pub splice: Support,
    /// `IORING_OP_SEND_ZC` behind [`write_zc`](crate::runtime::TcpStream::write_zc).
    pub send_zc: Support,
    /// Registered (fixed) buffers.
    pub registered_buffers: Support,
    /// Multishot accept behind [`accept`](crate::runtime::TcpListener::accept).
    pub multishot_accept: Support,
    /// Multishot receive behind [`read_pooled`](crate::runtime::TcpStream::read_pooled).
    pub multishot_recv: Support,
    /// Provided-buffer rings behind [`read_pooled`](crate::runtime::TcpStream::read_pooled).
    pub buffer_rings: Support,
}

/// The optional mechanisms, with the fallback the core provides for each: one list, so the
/// report, the metrics and the docs name them the same way.
pub const MECHANISMS: [(&str, &str); 6] = [
    ("splice", "sendfile(2)"),
    ("send_zc", "plain send"),
    ("registered buffers", "plain buffers"),
    ("multishot accept", "one accept per connection"),
    ("multishot recv", "one receive per read"),
    ("buffer rings", "a buffer from the core's pool, taken when the read starts"),
];

/// One optional mechanism: whether the kernel offers it, whether the backend uses it, and what
/// runs instead when it does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mechanism {
    /// The kernel supports it (probed opcode or feature).
    pub kernel: bool,
    /// The backend uses it on this engine.
    pub used: bool,
    /// What runs instead, and why, when it is not used (empty when used).
    pub fallback: String,
}

impl Mechanism {
    /// Computes one mechanism: used when the backend has it natively, the kernel offers it and
    /// the engine runs on io_uring; otherwise the core's `fallback` runs, with the reason.
    pub fn derive(support: Support, kernel: bool, io_uring: bool, fallback: &str) -> Mechanism {
        let why = match support {
            Support::Absent(why) => Some(why.to_string()),
            Support::Native if !io_uring => Some("the engine runs without io_uring".to_string()),
            Support::Native if !kernel => Some("not offered by this kernel".to_string()),
            Support::Native => None,
        };
        match why {
            None => Mechanism { kernel, used: true, fallback: String::new() },
            Some(why) => Mechanism { kernel, used: false, fallback: format!("{fallback} ({why})") },
        }
    }
}

/// What a backend reports about the engine it built on one worker; the core derives the
/// [`Capabilities`] from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineReport {
    /// The backend name.
    pub runtime: &'static str,
    /// io_uring or the fallback driver.
    pub driver: Driver,
    /// Ring setup flags that were asked for.
    pub ring_flags_requested: RingFlags,
    /// Ring setup flags accepted (`None` when the engine sets its own, or without a ring).
    pub ring_flags: Option<RingFlags>,
    /// Submission queue entries of the main ring.
    pub ring_entries: u32,
    /// What the engine does natively.
    pub native: Native,
    /// How readiness of foreign descriptors is awaited.
    pub fd_readiness: &'static str,
    /// How `send_file` moves file bytes to a socket.
    pub file_transfer: &'static str,
    /// How file reads are done.
    pub file_reads: &'static str,
    /// Whether owned-buffer I/O copies through an engine-internal buffer.
    pub rent_copies: bool,
    /// Anything else a user should know.
    pub notes: Vec<String>,
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

impl Capabilities {
    /// The report for `engine` on a kernel offering `kernel`: each optional mechanism is used
    /// exactly when the backend has it natively, the kernel offers it and the driver is
    /// io_uring, and otherwise names the core's fallback and the reason.
    pub fn derive(engine: EngineReport, kernel: KernelSupport) -> Capabilities {
        let uring = engine.driver == Driver::IoUring;
        let n = engine.native;
        let m = |i: usize, support: Support, k: bool| Mechanism::derive(support, k, uring, MECHANISMS[i].1);
        Capabilities {
            runtime: engine.runtime,
            ring_flags_requested: engine.ring_flags_requested,
            ring_flags: if uring { engine.ring_flags } else { None },
            ring_entries: if uring { engine.ring_entries } else { 0 },
            splice: m(0, n.splice, kernel.splice),
            send_zc: m(1, n.send_zc, kernel.send_zc),
            registered_buffers: m(2, n.registered_buffers, kernel.registered_buffers),
            multishot_accept: m(3, n.multishot_accept, kernel.multishot_accept),
            multishot_recv: m(4, n.multishot_recv, kernel.multishot_recv),
            buffer_rings: m(5, n.buffer_rings, kernel.buffer_rings),
            driver: engine.driver,
            fd_readiness: engine.fd_readiness,
            file_transfer: engine.file_transfer,
            file_reads: engine.file_reads,
            rent_copies: engine.rent_copies,
            notes: engine.notes,
        }
    }

    /// The optional mechanisms in [`MECHANISMS`] order, with their names.
    pub fn mechanisms(&self) -> [(&'static str, &Mechanism); 6] {
        [
            (MECHANISMS[0].0, &self.splice),
            (MECHANISMS[1].0, &self.send_zc),
            (MECHANISMS[2].0, &self.registered_buffers),
            (MECHANISMS[3].0, &self.multishot_accept),
            (MECHANISMS[4].0, &self.multishot_recv),
            (MECHANISMS[5].0, &self.buffer_rings),
        ]
    }
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
        for (name, m) in self.mechanisms() {
            write!(
                f,
                "  {:<19} {} (kernel: {})",
                format!("{name}:"),
                if m.used { "used" } else { "not used" },
                yes(m.kernel)
            )?;
            if !m.used {
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
    /// Multishot accept (5.19+; it has no opcode of its own, so it is inferred from
    /// `IORING_OP_SOCKET`, which arrived in the same release).
    pub multishot_accept: bool,
    /// Multishot receive (6.0+; inferred from `IORING_OP_SEND_ZC`, also 6.0).
    pub multishot_recv: bool,
    /// Provided-buffer rings (`IORING_REGISTER_PBUF_RING`, 5.19+; inferred from
    /// `IORING_OP_SOCKET`). Not to be confused with registered (fixed) buffers.
    pub buffer_rings: bool,
    /// Registered (fixed) buffers, `IORING_REGISTER_BUFFERS` with `READ_FIXED`/`WRITE_FIXED`
    /// (probed through `IORING_OP_READ_FIXED`).
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

/// Whether the running kernel charges io_uring ring memory to RLIMIT_MEMLOCK for a process
/// without CAP_IPC_LOCK. Kernels before 5.12 did; 5.12 moved rings under memcg accounting;
/// since 6.14 rings are io_uring "regions", accounted to the user's locked memory like
/// registered buffers again (measured here on 6.18: without CAP_IPC_LOCK, Glommio's three
/// rings plus its io_memory overran a 512 KiB share and the kernel refused with ENOMEM).
pub fn kernel_charges_rings() -> bool {
    // SAFETY: a zeroed utsname is a valid out-parameter; uname fills it or fails.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return true;
    }
    // SAFETY: uname NUL-terminates `release` within the array on success.
    let release = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }.to_string_lossy();
    charges_rings(&release)
}

/// [`kernel_charges_rings`] for a kernel release string such as `6.18.0-1-amd64`.
fn charges_rings(release: &str) -> bool {
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty());
    let major: u32 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    !((5, 12)..(6, 14)).contains(&(major, minor))
}

/// Advice for a ring the kernel refused for want of memory: what to raise, and why it applies
/// on this kernel.
pub fn ring_memory_advice() -> &'static str {
    if kernel_charges_rings() {
        "raise RLIMIT_MEMLOCK (this kernel charges io_uring rings to it for a process without CAP_IPC_LOCK)"
    } else {
        "free memory (this kernel charges io_uring rings to the memory cgroup, not RLIMIT_MEMLOCK)"
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn rings_are_charged_before_5_12_and_again_from_6_14() {
        assert!(charges_rings("5.10.0-28-amd64"));
        assert!(!charges_rings("5.12.0"));
        assert!(!charges_rings("6.1.0-18-amd64"));
        assert!(!charges_rings("6.13.12"));
        assert!(charges_rings("6.14.0"));
        assert!(charges_rings("6.18.0-1-cloud-amd64"));
        assert!(charges_rings("7.0"));
    }

    /// A report of a test engine (also used by other modules' tests).
    pub(crate) fn engine(driver: Driver, native: Native) -> EngineReport {
        EngineReport {
            runtime: "test",
            driver,
            ring_flags_requested: RingFlags::BEST,
            ring_flags: Some(RingFlags::BEST),
            ring_entries: 256,
            native,
            fd_readiness: "poll",
            file_transfer: "sendfile",
            file_reads: "read",
            rent_copies: false,
            notes: Vec::new(),
        }
    }

    pub(crate) const ALL_NATIVE: Native = Native {
        splice: Support::Native,
        send_zc: Support::Native,
        registered_buffers: Support::Native,
        multishot_accept: Support::Native,
        multishot_recv: Support::Native,
        buffer_rings: Support::Native,
    };

    #[test]
    fn a_native_mechanism_is_used_exactly_where_kernel_and_ring_allow() {
        let kernel = KernelSupport { io_uring: true, send_zc: true, multishot_accept: true, ..Default::default() };
        let c = Capabilities::derive(engine(Driver::IoUring, ALL_NATIVE), kernel);
        assert!(c.send_zc.used && c.send_zc.fallback.is_empty());
        assert!(c.multishot_accept.used);
        assert!(!c.buffer_rings.used, "the kernel lacks it");
        assert_eq!(
            c.buffer_rings.fallback,
            "a buffer from the core's pool, taken when the read starts (not offered by this kernel)"
        );
        let text = c.to_string();
        assert!(text.contains("send_zc:            used (kernel: yes)"), "{text}");

        let epoll = Capabilities::derive(engine(Driver::Epoll { reason: "forced".into() }, ALL_NATIVE), kernel);
        assert!(!epoll.send_zc.used, "no ring, no SEND_ZC");
        assert_eq!(epoll.send_zc.fallback, "plain send (the engine runs without io_uring)");
        assert_eq!(epoll.ring_entries, 0);
        assert_eq!(epoll.ring_flags, None);
    }

    #[test]
    fn an_absent_mechanism_names_the_core_fallback_and_the_backend_reason() {
        let kernel = KernelSupport { io_uring: true, send_zc: true, ..Default::default() };
        let native = Native { send_zc: Support::Absent("engine X has no SEND_ZC"), ..ALL_NATIVE };
        let c = Capabilities::derive(engine(Driver::IoUring, native), kernel);
        assert!(!c.send_zc.used && c.send_zc.kernel);
        assert_eq!(c.send_zc.fallback, "plain send (engine X has no SEND_ZC)");
        assert!(c.to_string().contains("send_zc:            not used (kernel: yes); fallback: plain send (engine X"));
        let names: Vec<_> = c.mechanisms().iter().map(|(n, _)| *n).collect();
        assert_eq!(names, MECHANISMS.map(|(n, _)| n));
    }
}
