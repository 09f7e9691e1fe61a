//! The per-core worker context: identity, shutdown phases, the registry of open connections,
//! and the core's counters. It lives in a thread-local set by the launcher; nothing in it is
//! shared with other cores except the counters (written only by their owner) and the mesh.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use crossbeam_utils::CachePadded;

use crate::mesh::Mesh;
use crate::task::LocalEvent;

/// Where a worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Worker index, 0..workers.
    pub index: usize,
    /// The OS CPU number it is pinned to.
    pub cpu: usize,
    /// Its NUMA node.
    pub numa_node: usize,
    /// Number of workers in the process.
    pub workers: usize,
}

/// Counters of one core. Only the owning core writes them (relaxed adds on its own cache
/// line); any thread may read them for metrics.
#[derive(Debug, Default)]
pub struct CoreCounters {
    /// Connections accepted.
    pub connections_accepted: AtomicU64,
    /// Connections open now.
    pub connections_active: AtomicU64,
    /// Bytes read from connections.
    pub bytes_in: AtomicU64,
    /// Bytes written to connections.
    pub bytes_out: AtomicU64,
    /// Connection tasks that panicked (each closed its own connection only).
    pub connection_panics: AtomicU64,
}

impl CoreCounters {
    /// Adds to a counter (owner core only).
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        // A relaxed load+store is enough for a single writer and avoids a locked RMW.
        counter.store(counter.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }
    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// One value per core, each on its own cache line: the owning core writes its slot, any
/// thread may read all of them (for metrics). Services use it for their own counters.
#[derive(Debug)]
pub struct PerCore<T> {
    cores: Vec<CachePadded<T>>,
}

impl<T: Default> PerCore<T> {
    /// Default values for `n` cores.
    pub fn new(n: usize) -> Arc<Self> {
        Arc::new(Self { cores: (0..n).map(|_| CachePadded::new(T::default())).collect() })
    }
}

impl<T> PerCore<T> {
    /// Core `index`'s value.
    pub fn core(&self, index: usize) -> &T {
        &self.cores[index]
    }
    /// Number of cores.
    pub fn len(&self) -> usize {
        self.cores.len()
    }
    /// Whether there are no cores.
    pub fn is_empty(&self) -> bool {
        self.cores.is_empty()
    }
}

/// The framework's connection counters of every core, shared with metrics readers.
pub type Counters = PerCore<CoreCounters>;

/// The process-wide shutdown phase, advanced by signals or by a failing worker.
#[derive(Debug, Default)]
pub struct Shutdown {
    phase: AtomicU8,
}

/// Phases of a graceful shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Serving.
    Running = 0,
    /// Stop accepting; let open connections finish (up to the drain deadline).
    Draining = 1,
    /// Close what is still open and exit.
    Closing = 2,
}

impl Shutdown {
    /// The current phase.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Running,
            1 => Phase::Draining,
            _ => Phase::Closing,
        }
    }
    /// Advances to `phase` (never goes back). Returns whether it changed.
    pub fn advance(&self, phase: Phase) -> bool {
        self.phase.fetch_max(phase as u8, Ordering::AcqRel) < phase as u8
    }
}

pub(crate) struct WorkerLocal {
    pub(crate) info: WorkerInfo,
    pub(crate) counters: Arc<Counters>,
    pub(crate) mesh: Arc<Mesh>,
    pub(crate) shutdown: Arc<Shutdown>,
    pub(crate) draining: LocalEvent,
    pub(crate) closing: LocalEvent,
    pub(crate) failed: LocalEvent,
    pub(crate) panic: RefCell<Option<String>>,
    conns: RefCell<slab::Slab<RawFd>>,
    idle: RefCell<Option<LocalEvent>>,
    active: Cell<usize>,
}

thread_local! {
    static LOCAL: RefCell<Option<Rc<WorkerLocal>>> = const { RefCell::new(None) };
}

pub(crate) fn install(
    info: WorkerInfo,
    counters: Arc<Counters>,
    mesh: Arc<Mesh>,
    shutdown: Arc<Shutdown>,
) -> Rc<WorkerLocal> {
    let local = Rc::new(WorkerLocal {
        info,
        counters,
        mesh,
        shutdown,
        draining: LocalEvent::new(),
        closing: LocalEvent::new(),
        failed: LocalEvent::new(),
        panic: RefCell::new(None),
        conns: RefCell::new(slab::Slab::new()),
        idle: RefCell::new(None),
        active: Cell::new(0),
    });
    LOCAL.with(|l| *l.borrow_mut() = Some(local.clone()));
    local
}

pub(crate) fn uninstall() {
    LOCAL.with(|l| l.borrow_mut().take());
}

pub(crate) fn report_task_panic(msg: &str) {
    LOCAL.with(|l| {
        if let Some(w) = l.borrow().as_ref() {
            tracing::error!(core = w.info.cpu, "task panicked: {msg}");
            w.panic.borrow_mut().get_or_insert_with(|| msg.to_string());
            w.failed.fire();
        }
    });
}

/// A handle to the worker running on this thread.
#[derive(Clone)]
pub struct Worker {
    local: Rc<WorkerLocal>,
}

impl Worker {
    /// The worker on this thread, if this thread is a corepin worker.
    pub fn current() -> Option<Worker> {
        LOCAL.with(|l| l.borrow().as_ref().map(|local| Worker { local: local.clone() }))
    }
    /// Where this worker runs.
    pub fn info(&self) -> WorkerInfo {
        self.local.info
    }
    /// This core's counters.
    pub fn counters(&self) -> &CoreCounters {
        self.local.counters.core(self.local.info.index)
    }
    /// Every core's counters.
    pub fn all_counters(&self) -> &Arc<Counters> {
        &self.local.counters
    }
    /// The cross-core mesh.
    pub fn mesh(&self) -> &Arc<Mesh> {
        &self.local.mesh
    }
    /// Completes when the process starts draining: stop taking new work. (The event's own
    /// wait, not an `async fn` around it: idle connections hold one each, so it is kept small.)
    pub fn draining(&self) -> impl Future<Output = ()> + '_ {
        self.local.draining.wait()
    }
    /// Completes when open work must close now.
    pub async fn closing(&self) {
        self.local.closing.wait().await
    }
    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        self.local.draining.is_fired()
    }
    /// Registers an open connection so that the closing phase can shut it down.
    pub fn register_connection(&self, fd: RawFd) -> ConnectionGuard {
        let key = self.local.conns.borrow_mut().insert(fd);
        self.local.active.set(self.local.active.get() + 1);
        let c = self.counters();
        CoreCounters::add(&c.connections_accepted, 1);
        CoreCounters::add(&c.connections_active, 1);
        ConnectionGuard { local: self.local.clone(), key }
    }
    /// Connections open on this core.
    pub fn active_connections(&self) -> usize {
        self.local.active.get()
    }
    /// Completes when no connection is open on this core.
    pub async fn connections_idle(&self) {
        loop {
            if self.local.active.get() == 0 {
                return;
            }
            let ev = self.local.idle.borrow_mut().get_or_insert_with(LocalEvent::new).clone();
            ev.wait().await;
        }
    }
    /// Shuts down (`SHUT_RDWR`) every registered connection: pending reads complete with end of
    /// stream and writes fail, on every backend, so services finish on their own.
    pub(crate) fn shut_down_connections(&self) {
        for (_, &fd) in self.local.conns.borrow().iter() {
            // SAFETY: shutdown(2) on a descriptor number only changes socket state; a number
            // reused since by a non-socket fails with ENOTSOCK and is ignored.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }
}

/// Deregisters a connection when dropped.
pub struct ConnectionGuard {
    local: Rc<WorkerLocal>,
    key: usize,
}

impl ConnectionGuard {
    /// The worker the connection is registered with.
    pub(crate) fn worker(&self) -> Worker {
        Worker { local: self.local.clone() }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.local.conns.borrow_mut().remove(self.key);
        let n = self.local.active.get() - 1;
        self.local.active.set(n);
        let c = self.local.counters.core(self.local.info.index);
        c.connections_active.store(c.connections_active.load(Ordering::Relaxed) - 1, Ordering::Relaxed);
        if n == 0 {
            if let Some(ev) = self.local.idle.borrow_mut().take() {
                ev.fire();
            }
        }
    }
}
