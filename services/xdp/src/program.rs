//! Loading, attaching and reading the ingest program (see `bpf/ingest.c`).

use std::fmt;
use std::os::fd::AsRawFd;

use aya::maps::{MapData, PerCpuArray, XskMap};
use aya::programs::xdp::XdpLinkId;
use aya::programs::{ProgramError, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};

/// The compiled program. aya reads it as ELF, which wants 8-byte alignment.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ingest.o"));

/// The queues the program's maps have room for (`MAX_QUEUES` in `bpf/ingest.c`).
pub const MAX_QUEUES: u32 = 64;

/// What the program did with a packet (`enum verdict` in `bpf/ingest.c`, same order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Redirected into the queue's AF_XDP socket.
    Redirected,
    /// Passed to the kernel: not IPv4 or IPv6 (ARP, LLDP, ...).
    NotIp,
    /// Passed: IP but not UDP.
    NotUdp,
    /// Passed: UDP to another port.
    OtherPort,
    /// Passed: an IP fragment (only the kernel can reassemble it).
    Fragment,
    /// Passed: headers cut short, or an IPv4 header length below 5 words.
    Malformed,
    /// Passed: for the port, but no socket is bound on this queue.
    NoSocket,
    /// Passed: for the port, but longer than an AF_XDP frame holds.
    TooBig,
}

impl Verdict {
    /// Every verdict, in the program's order.
    pub const ALL: [Verdict; 8] = [
        Verdict::Redirected,
        Verdict::NotIp,
        Verdict::NotUdp,
        Verdict::OtherPort,
        Verdict::Fragment,
        Verdict::Malformed,
        Verdict::NoSocket,
        Verdict::TooBig,
    ];

    /// The metrics label.
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Redirected => "redirected",
            Verdict::NotIp => "not_ip",
            Verdict::NotUdp => "not_udp",
            Verdict::OtherPort => "other_port",
            Verdict::Fragment => "fragment",
            Verdict::Malformed => "malformed",
            Verdict::NoSocket => "no_socket",
            Verdict::TooBig => "too_big",
        }
    }
}

/// One RX queue's counters, summed over CPUs, in [`Verdict::ALL`] order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounters(pub [u64; 8]);

impl QueueCounters {
    /// Packets with `verdict`.
    pub fn get(&self, verdict: Verdict) -> u64 {
        self.0[verdict as usize]
    }
    /// Every packet the program saw on the queue.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
    /// Packets passed to the kernel, whatever the reason.
    pub fn passed(&self) -> u64 {
        self.total() - self.get(Verdict::Redirected)
    }
}

/// How to attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// Native if the driver has it, generic otherwise.
    Auto,
    /// In the driver only.
    Native,
    /// In the kernel's generic path (any interface, slower).
    Generic,
}

/// How the program ended up attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// Native (driver) mode.
    Native,
    /// Generic (SKB) mode.
    Generic,
}

impl fmt::Display for Attached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Attached::Native => "native",
            Attached::Generic => "generic",
        })
    }
}

/// Loading or attaching failed. Each message holds the whole cause (aya's error chain,
/// without its repetitions) and, for a known errno, what to check, so that it reads as one
/// line; the causes are kept for callers that match on them.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    /// The kernel refused the program or a map (no BPF support, no permission, verifier).
    #[error("loading the XDP program: {}", explain(cause))]
    Load {
        /// The cause.
        cause: aya::EbpfError,
    },
    /// Attaching, detaching or preparing the program failed.
    #[error("XDP program on {interface}: {}", explain(cause))]
    Program {
        /// The interface.
        interface: String,
        /// The cause.
        cause: ProgramError,
    },
    /// Reading or writing one of the program's maps failed.
    #[error("XDP map {map}: {}", explain(cause))]
    Map {
        /// The map's name.
        map: &'static str,
        /// The cause.
        cause: aya::maps::MapError,
    },
    /// Another XDP program is on the interface and is not to be replaced.
    #[error(
        "{interface} already has an XDP program (id {id}, {name:?}, {mode} mode): {}",
        if *held { "a running process holds it through a bpf_link (another corepin xdp?)" }
        else { "not corepin's; remove it with `ip link set dev <interface> xdp off` if it may go" }
    )]
    Occupied {
        /// The interface.
        interface: String,
        /// The program's id.
        id: u32,
        /// The program's name.
        name: String,
        /// `native` or `generic`.
        mode: &'static str,
        /// A live bpf_link holds it.
        held: bool,
    },
    /// Asking rtnetlink about the interface's XDP program failed.
    #[error("rtnetlink on {interface}: {source}")]
    Netlink {
        /// The interface.
        interface: String,
        /// The cause.
        source: std::io::Error,
    },
    /// No such interface in this network namespace.
    #[error("no interface {0:?} (in this network namespace)")]
    NoInterface(String),
    /// A queue beyond the maps' room.
    #[error("RX queue {0} is beyond the {MAX_QUEUES} queues the program has room for")]
    Queue(u32),
}

impl From<aya::EbpfError> for XdpError {
    fn from(cause: aya::EbpfError) -> Self {
        XdpError::Load { cause }
    }
}

/// `err` and its sources as one line, each part once (aya repeats its causes in its messages),
/// with a hint for the errno at the bottom of the chain.
fn explain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    let mut errno = None;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        let part = e.to_string();
        // Keep only what this message adds to what is already said.
        let mut tail = part.as_str();
        while let Some(rest) = tail.split_once(": ") {
            if text.contains(rest.0) {
                tail = rest.1;
            } else {
                break;
            }
        }
        if !tail.is_empty() && !text.contains(tail) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(tail);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            errno = io.raw_os_error();
        }
        cur = e.source();
    }
    let hint = match errno {
        Some(libc::EPERM) | Some(libc::EACCES) => " (XDP programs need root: CAP_BPF and CAP_NET_ADMIN)",
        Some(libc::ENOMEM) => " (locked memory: raise RLIMIT_MEMLOCK or run with CAP_IPC_LOCK)",
        Some(libc::EOPNOTSUPP) => " (the driver has no native XDP: try --mode generic)",
        Some(libc::EBUSY) | Some(libc::EEXIST) => " (another XDP program holds the interface)",
        Some(libc::ENODEV) => " (no such interface)",
        _ => "",
    };
    text.push_str(hint);
    text
}

/// The ingest program, loaded and attached to one interface. Dropping it detaches it.
pub struct IngestProgram {
    ebpf: Ebpf,
    interface: String,
    link: Option<XdpLinkId>,
    attached: Attached,
    replaced: Option<u32>,
}

impl fmt::Debug for IngestProgram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IngestProgram")
            .field("interface", &self.interface)
            .field("attached", &self.attached)
            .finish_non_exhaustive()
    }
}

const PROGRAM_NAME: &str = "corepin_ingest";

impl IngestProgram {
    /// Loads the program to take UDP `port` and attaches it to `interface` in `mode`.
    /// [`AttachMode::Auto`] tries native first and falls back to generic when the driver has no
    /// native XDP.
    pub fn attach(interface: &str, port: u16, mode: AttachMode) -> Result<Self, XdpError> {
        Self::attach_with(interface, port, 0, mode)
    }

    /// Like [`attach`](Self::attach), passing to the kernel every frame of the port longer
    /// than `max_frame` bytes (the room of an AF_XDP frame; 0 for no limit).
    pub fn attach_with(interface: &str, port: u16, max_frame: u32, mode: AttachMode) -> Result<Self, XdpError> {
        let replaced = replace_leftover(interface)?;
        let mut ebpf = EbpfLoader::new()
            .override_global("port", &port, true)
            .override_global("max_frame", &max_frame, true)
            .load(PROGRAM)?;
        let err = |cause| XdpError::Program { interface: interface.to_string(), cause };
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or_else(|| err(ProgramError::UnexpectedProgramType))?
            .try_into()
            .map_err(err)?;
        program.load().map_err(err)?;
        let (link, attached) = match mode {
            AttachMode::Native => (program.attach(interface, XdpMode::Driver).map_err(err)?, Attached::Native),
            AttachMode::Generic => (program.attach(interface, XdpMode::Skb).map_err(err)?, Attached::Generic),
            AttachMode::Auto => match program.attach(interface, XdpMode::Driver) {
                Ok(link) => (link, Attached::Native),
                Err(native) => {
                    tracing::debug!("native XDP on {interface} refused ({native}); trying generic");
                    (program.attach(interface, XdpMode::Skb).map_err(err)?, Attached::Generic)
                }
            },
        };
        Ok(Self { ebpf, interface: interface.to_string(), link: Some(link), attached, replaced })
    }

    /// The id of a program of ours that an earlier run left attached through netlink and that
    /// this one replaced.
    pub fn replaced(&self) -> Option<u32> {
        self.replaced
    }

    /// The mode the program runs in.
    pub fn attached(&self) -> Attached {
        self.attached
    }

    /// The interface it is attached to.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Directs the port's packets arriving on RX queue `queue` into the AF_XDP socket `socket`
    /// (bound to that queue).
    pub fn set_socket(&mut self, queue: u32, socket: &impl AsRawFd) -> Result<(), XdpError> {
        if queue >= MAX_QUEUES {
            return Err(XdpError::Queue(queue));
        }
        let mut map = self.xsks()?;
        map.set(queue, socket.as_raw_fd(), 0).map_err(|cause| XdpError::Map { map: "xsks", cause })
    }

    fn xsks(&mut self) -> Result<XskMap<&mut MapData>, XdpError> {
        let map = self
            .ebpf
            .map_mut("xsks")
            .ok_or(XdpError::Map { map: "xsks", cause: aya::maps::MapError::InvalidName { name: "xsks".into() } })?;
        XskMap::try_from(map).map_err(|cause| XdpError::Map { map: "xsks", cause })
    }

    /// The counters of queues `0..queues`, each summed over CPUs.
    pub fn counters(&self, queues: u32) -> Result<Vec<QueueCounters>, XdpError> {
        let map = self.ebpf.map("counters").ok_or(XdpError::Map {
            map: "counters",
            cause: aya::maps::MapError::InvalidName { name: "counters".into() },
        })?;
        let array: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(|cause| XdpError::Map { map: "counters", cause })?;
        let mut out = Vec::with_capacity(queues.min(MAX_QUEUES) as usize);
        for q in 0..queues.min(MAX_QUEUES) {
            let mut c = QueueCounters::default();
            for (i, slot) in c.0.iter_mut().enumerate() {
                let key = q * Verdict::ALL.len() as u32 + i as u32;
                let per_cpu = array.get(&key, 0).map_err(|cause| XdpError::Map { map: "counters", cause })?;
                *slot = per_cpu.iter().sum();
            }
            out.push(c);
        }
        Ok(out)
    }

    /// Detaches the program now (dropping does the same, logging a failure instead).
    pub fn detach(mut self) -> Result<(), XdpError> {
        self.detach_link()
    }

    fn detach_link(&mut self) -> Result<(), XdpError> {
        let Some(link) = self.link.take() else { return Ok(()) };
        let interface = self.interface.clone();
        let program: &mut Xdp = self
            .ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(XdpError::Program { interface: interface.clone(), cause: ProgramError::UnexpectedProgramType })?
            .try_into()
            .map_err(|cause| XdpError::Program { interface: interface.clone(), cause })?;
        program.detach(link).map_err(|cause| XdpError::Program { interface, cause })
    }
}

/// Removes a program of ours (by name) that an earlier run left on `interface` through
/// netlink; refuses, naming it, any other program, or one a live process holds.
fn replace_leftover(interface: &str) -> Result<Option<u32>, XdpError> {
    let name = std::ffi::CString::new(interface).map_err(|_| XdpError::NoInterface(interface.to_string()))?;
    // SAFETY: `name` is a valid NUL-terminated string for the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(XdpError::NoInterface(interface.to_string()));
    }
    let netlink = |source| XdpError::Netlink { interface: interface.to_string(), source };
    let Some(found) = crate::legacy::find(ifindex).map_err(netlink)? else { return Ok(None) };
    let name = crate::legacy::program_name(found.id).unwrap_or_default();
    let occupied = |held| XdpError::Occupied {
        interface: interface.to_string(),
        id: found.id,
        name: name.clone(),
        mode: if found.native { "native" } else { "generic" },
        held,
    };
    if name != PROGRAM_NAME {
        return Err(occupied(false));
    }
    match crate::legacy::remove(ifindex, &found) {
        Ok(()) => {
            tracing::warn!("replaced XDP program id {} that an earlier run left on {interface}", found.id);
            Ok(Some(found.id))
        }
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(occupied(true)),
        Err(e) => Err(netlink(e)),
    }
}

impl Drop for IngestProgram {
    fn drop(&mut self) {
        if let Err(e) = self.detach_link() {
            tracing::warn!("{e}");
        }
    }
}
