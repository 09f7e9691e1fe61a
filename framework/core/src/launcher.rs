//! The thread-per-core launcher: chooses CPUs, starts one pinned worker thread per CPU, builds
//! each worker's engine after pinning (so everything it allocates is core-local), runs the
//! app on every core, and drives graceful shutdown. A worker that fails or panics stops the
//! whole process with an error naming its core: running on crippled is worse than exiting.

use std::future::Future;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::caps::{memlock_limit, Capabilities};
use crate::mesh::{close_inbox, inbox_loop, Mesh};
use crate::runtime::{EngineError, EngineSettings, RingFlags, Runtime};
use crate::task::{catch_panic, race, Either};
use crate::topology::{pin_current_thread, CoreSelection, Cpu, PlacementError, Topology};
use crate::worker::{install, uninstall, Counters, Phase, Shutdown, Worker, WorkerInfo};

/// Code that runs on every worker core. `run` is generic over the runtime, so one app runs on
/// every backend.
pub trait App: Send + Sync + 'static {
    /// Runs on one worker until it is done (servers: until the worker drains).
    fn run<R: Runtime>(&self, worker: Worker) -> impl Future<Output = Result<(), AppError>>;
}

/// Two apps on every worker, side by side (HTTPS on TCP and HTTP/3 on UDP on the same port,
/// say): both run until both are done, and the first error is the pair's.
impl<A: App, B: App> App for (A, B) {
    async fn run<R: Runtime>(&self, worker: Worker) -> Result<(), AppError> {
        let (a, b) = crate::task::join(self.0.run::<R>(worker.clone()), self.1.run::<R>(worker)).await;
        a.and(b)
    }
}

/// An app failed on a worker.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AppError(pub String);

impl AppError {
    /// An error with this message.
    pub fn msg(m: impl Into<String>) -> Self {
        Self(m.into())
    }
}

/// How to launch.
#[derive(Debug, Clone)]
pub struct LaunchConfig {
    /// Which CPUs get workers.
    pub cores: CoreSelection,
    /// The topology to place on (discovered when `None`).
    pub topology: Option<Topology>,
    /// Ring entries per worker.
    pub ring_entries: u32,
    /// Ring setup flags to ask for.
    pub ring_flags: RingFlags,
    /// Use the engine's non-io_uring fallback.
    pub force_fallback: bool,
    /// How long open connections may take to finish after draining starts.
    pub drain_timeout: Duration,
    /// Pin workers to their CPUs (off only for tests of unpinned behaviour).
    pub pin: bool,
    /// How long a worker's cross-core inbox keeps looking for messages once its core has gone
    /// idle, before it sleeps on its doorbell (a busy core always keeps looking, at no cost).
    /// Zero, the default, suits cores shared with other processes; on cores the server owns,
    /// some microseconds save the sleep and wake-up of both cores on every call when calls are
    /// spaced out (docs/cross-core.md has the measurements).
    pub inbox_poll: Duration,
}

impl Default for LaunchConfig {
    fn default() -> Self {
        Self {
            cores: CoreSelection::All,
            topology: None,
            ring_entries: 1024,
            ring_flags: RingFlags::BEST,
            force_fallback: false,
            drain_timeout: Duration::from_secs(10),
            pin: true,
            inbox_poll: Duration::ZERO,
        }
    }
}

impl LaunchConfig {
    /// Resolves the CPUs the workers will run on.
    pub fn plan(&self) -> Result<Vec<Cpu>, PlacementError> {
        let topo = self.topology.clone().unwrap_or_else(Topology::discover);
        topo.select(&self.cores)
    }
}

/// Launching or running failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Bad core selection.
    #[error(transparent)]
    Placement(#[from] PlacementError),
    /// An engine did not start.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A thread could not be started or pinned.
    #[error("worker on core {cpu}: {reason}")]
    Worker {
        /// The core.
        cpu: usize,
        /// What went wrong.
        reason: String,
    },
    /// A worker panicked.
    #[error("worker on core {cpu} panicked: {message}")]
    Panicked {
        /// The core.
        cpu: usize,
        /// The panic message.
        message: String,
    },
    /// The app failed on a worker.
    #[error("worker on core {cpu} failed: {source}")]
    App {
        /// The core.
        cpu: usize,
        /// The error.
        source: AppError,
    },
    /// Setting up the mesh or signal handling failed.
    #[error("{0}")]
    Setup(String),
}

/// Advances the shutdown of a running server from any thread.
#[derive(Clone)]
pub struct ShutdownHandle {
    shutdown: Arc<Shutdown>,
    mesh: Arc<Mesh>,
}

impl ShutdownHandle {
    /// Stop accepting; let open work finish up to the drain deadline.
    pub fn drain(&self) {
        if self.shutdown.advance(Phase::Draining) {
            self.mesh.wake_all();
        }
    }
    /// Close everything now.
    pub fn close(&self) {
        if self.shutdown.advance(Phase::Closing) {
            self.mesh.wake_all();
        }
    }
    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.shutdown.phase()
    }
}

/// What a worker thread tells the launcher: that its engine is up, then how it ended.
enum Event {
    Ready(usize, Box<Capabilities>),
    Exit(Exit),
}

enum Exit {
    Done,
    Failed(LaunchError),
}

/// A running set of workers.
pub struct Server {
    workers: Vec<WorkerInfo>,
    capabilities: Vec<Capabilities>,
    counters: Arc<Counters>,
    handle: ShutdownHandle,
    threads: Vec<JoinHandle<()>>,
    events: mpsc::Receiver<Event>,
    /// Exits that arrived while `start` was still waiting for every worker to be ready.
    early_exits: Vec<Exit>,
}

impl Server {
    /// Starts one pinned worker per CPU of `cpus`, each running `app` on runtime `R`, and
    /// returns once every engine is up (or the first one failed to start).
    pub fn start<R: Runtime, A: App>(cfg: &LaunchConfig, cpus: &[Cpu], app: Arc<A>) -> Result<Server, LaunchError> {
        let n = cpus.len();
        if n == 0 {
            return Err(PlacementError::Empty.into());
        }
        let mesh = Mesh::new(n, cfg.inbox_poll)
            .map_err(|e| LaunchError::Setup(format!("creating the cross-core mesh: {e}")))?;
        let counters = Counters::new(n);
        let shutdown = Arc::new(Shutdown::default());
        let handle = ShutdownHandle { shutdown: shutdown.clone(), mesh: mesh.clone() };
        // Locked memory is a per-process budget; each engine gets an equal share.
        let memlock_budget = memlock_limit().map(|l| (l / n as u64) as usize).unwrap_or(64 << 20);
        let (event_tx, events) = mpsc::channel::<Event>();
        let mut threads = Vec::with_capacity(n);
        let workers: Vec<WorkerInfo> = cpus
            .iter()
            .enumerate()
            .map(|(index, c)| WorkerInfo { index, cpu: c.os, numa_node: c.numa, workers: n })
            .collect();

        for info in workers.iter().copied() {
            let settings = EngineSettings {
                cpu: info.cpu,
                ring_entries: cfg.ring_entries,
                ring_flags: cfg.ring_flags,
                memlock_budget,
                force_fallback: cfg.force_fallback,
            };
            let (app, mesh, counters, shutdown) = (app.clone(), mesh.clone(), counters.clone(), shutdown.clone());
            let event_tx = event_tx.clone();
            let (pin, drain_timeout) = (cfg.pin, cfg.drain_timeout);
            let spawned = std::thread::Builder::new().name(format!("corepin-w{}", info.cpu)).spawn(move || {
                let exit = worker_thread::<R, A>(
                    info,
                    settings,
                    pin,
                    drain_timeout,
                    app,
                    mesh.clone(),
                    counters,
                    shutdown.clone(),
                    &event_tx,
                );
                if matches!(exit, Exit::Failed(_)) && shutdown.advance(Phase::Closing) {
                    mesh.wake_all();
                }
                close_inbox(&mesh, info.index);
                let _ = event_tx.send(Event::Exit(exit));
            });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    handle.close();
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(LaunchError::Worker { cpu: info.cpu, reason: format!("cannot start thread: {e}") });
                }
            }
        }
        drop(event_tx);

        // Wait until every engine is up, or for the first worker that ends in failure (its
        // own error, as the worker raised it). Successful early exits are kept for `wait`.
        let mut capabilities: Vec<Option<Capabilities>> = vec![None; n];
        let mut early_exits = Vec::new();
        let mut first_error = None;
        while capabilities.iter().any(Option::is_none) {
            match events.recv() {
                Ok(Event::Ready(i, c)) => capabilities[i] = Some(*c),
                Ok(Event::Exit(Exit::Failed(e))) => {
                    first_error = Some(e);
                    break;
                }
                Ok(Event::Exit(done)) => early_exits.push(done),
                Err(_) => {
                    first_error = Some(LaunchError::Setup("a worker stopped before it was ready".into()));
                    break;
                }
            }
        }
        if let Some(e) = first_error {
            handle.close();
            for t in threads {
                let _ = t.join();
            }
            return Err(e);
        }
        Ok(Server {
            workers,
            capabilities: capabilities.into_iter().flatten().collect(),
            counters,
            handle,
            threads,
            events,
            early_exits,
        })
    }

    /// Where each worker runs.
    pub fn workers(&self) -> &[WorkerInfo] {
        &self.workers
    }
    /// Each worker's capability report, in worker order.
    pub fn capabilities(&self) -> &[Capabilities] {
        &self.capabilities
    }
    /// Every core's counters.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }
    /// A handle that drains or closes the server from any thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.handle.clone()
    }

    /// Waits for every worker to finish. The first failure closes the others and is returned.
    pub fn wait(self) -> Result<(), LaunchError> {
        let mut first_error = None;
        let mut exited = 0;
        let mut next = self.early_exits.into_iter();
        while exited < self.threads.len() {
            let exit = match next.next() {
                Some(exit) => exit,
                None => match self.events.recv() {
                    Ok(Event::Exit(exit)) => exit,
                    Ok(Event::Ready(..)) => continue,
                    Err(_) => break,
                },
            };
            exited += 1;
            if let Exit::Failed(e) = exit {
                self.handle.close();
                first_error.get_or_insert(e);
            }
        }
        for t in self.threads {
            let _ = t.join();
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Like [`wait`](Self::wait), draining on the first SIGINT or SIGTERM and closing at once
    /// on the second. Installs the handlers now; a binary that must not lose a signal sent
    /// during start-up installs [`Signals`] first and calls [`wait_with`](Self::wait_with).
    pub fn wait_with_signals(self) -> Result<(), LaunchError> {
        let signals = Signals::install()?;
        self.wait_with(signals)
    }

    /// Like [`wait`](Self::wait), with `signals` (installed earlier) turned into shutdown
    /// phases: the first SIGINT or SIGTERM drains, the second closes. A signal that arrived
    /// before this call is acted on at once.
    ///
    /// The signal thread changes the phase first and logs after, inside `catch_unwind`: a log
    /// write that blocks (stderr a full pipe) or panics (a subscriber that reports its own
    /// write errors on a closed stderr) can delay or lose the message, never the shutdown.
    ///
    /// A SIGHUP, when [`Signals::on_hangup`] registered a hook, calls the hook on the signal
    /// thread (inside `catch_unwind`: a panicking hook is logged and the server goes on).
    pub fn wait_with(self, signals: Signals) -> Result<(), LaunchError> {
        let Signals { mut signals, on_hangup } = signals;
        let sig_handle = signals.handle();
        let handle = self.handle.clone();
        let watcher = std::thread::Builder::new()
            .name("corepin-signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    if sig == signal_hook::consts::SIGHUP {
                        if let Some(hook) = &on_hangup {
                            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(hook)).is_err() {
                                let _ = std::panic::catch_unwind(|| tracing::error!("the SIGHUP hook panicked"));
                            }
                        }
                        continue;
                    }
                    let draining = handle.phase() == Phase::Running;
                    if draining {
                        handle.drain();
                    } else {
                        handle.close();
                    }
                    let _ = std::panic::catch_unwind(|| {
                        if draining {
                            tracing::info!(signal = sig, "draining: no new connections; open ones may finish");
                        } else {
                            tracing::info!(signal = sig, "closing now");
                        }
                    });
                }
            })
            .map_err(|e| LaunchError::Setup(format!("starting the signal thread: {e}")))?;
        let r = self.wait();
        sig_handle.close();
        let _ = watcher.join();
        r
    }
}

/// SIGINT and SIGTERM handlers, installed before a server exists so that a signal sent while
/// it starts is kept for [`Server::wait_with`] instead of ending the process by the default
/// action; and, with [`on_hangup`](Signals::on_hangup), a SIGHUP hook (reloading
/// certificates, say). The hook is plain code run on the signal thread, so it knows no
/// runtime; work it hands to the workers goes through state they share (an `ArcSwap`).
pub struct Signals {
    signals: signal_hook::iterator::Signals,
    on_hangup: Option<Box<dyn Fn() + Send + 'static>>,
}

impl Signals {
    /// Installs the handlers (for the whole process).
    pub fn install() -> Result<Signals, LaunchError> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
            .map(|signals| Signals { signals, on_hangup: None })
            .map_err(|e| LaunchError::Setup(format!("installing signal handlers: {e}")))
    }

    /// Catches SIGHUP from now on and calls `hook` on the signal thread for each one, once
    /// [`Server::wait_with`] runs (a SIGHUP that arrives before is kept and acted on then).
    /// Without a hook SIGHUP keeps its default action.
    pub fn on_hangup(mut self, hook: impl Fn() + Send + 'static) -> Result<Signals, LaunchError> {
        self.signals
            .add_signal(signal_hook::consts::SIGHUP)
            .map_err(|e| LaunchError::Setup(format!("installing the SIGHUP handler: {e}")))?;
        self.on_hangup = Some(Box::new(hook));
        Ok(self)
    }
}

#[allow(clippy::too_many_arguments)]
fn worker_thread<R: Runtime, A: App>(
    info: WorkerInfo,
    settings: EngineSettings,
    pin: bool,
    drain_timeout: Duration,
    app: Arc<A>,
    mesh: Arc<Mesh>,
    counters: Arc<Counters>,
    shutdown: Arc<Shutdown>,
    events: &mpsc::Sender<Event>,
) -> Exit {
    if pin && !pin_current_thread(info.cpu) {
        return Exit::Failed(LaunchError::Worker {
            cpu: info.cpu,
            reason: "sched_setaffinity refused to pin the thread".into(),
        });
    }
    let local = install(info, counters, mesh, shutdown);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        R::block_on(&settings, || {
            let local = local.clone();
            async move {
                let Some(caps) = R::capabilities() else {
                    return Exit::Failed(LaunchError::Worker {
                        cpu: info.cpu,
                        reason: "the engine reported no capabilities".into(),
                    });
                };
                let _ = events.send(Event::Ready(info.index, Box::new(caps)));
                tracing::debug!(core = info.cpu, runtime = R::NAME, worker = info.index, "worker started");
                drop(crate::task::spawn::<R, _>(inbox_loop::<R>(local.clone())));
                let worker = Worker::current().expect("installed above");
                let run = catch_panic(app.run::<R>(worker.clone()));
                let failed = local.failed.wait();
                let exit = match race(run, failed).await {
                    Either::Left(Ok(Ok(()))) => Exit::Done,
                    Either::Left(Ok(Err(e))) => Exit::Failed(LaunchError::App { cpu: info.cpu, source: e }),
                    Either::Left(Err(message)) => Exit::Failed(LaunchError::Panicked { cpu: info.cpu, message }),
                    Either::Right(()) => {
                        let message = local.panic.borrow().clone().unwrap_or_else(|| "unknown failure".into());
                        Exit::Failed(LaunchError::Panicked { cpu: info.cpu, message })
                    }
                };
                if matches!(exit, Exit::Failed(_)) {
                    return exit;
                }
                // Let open connections finish, up to the deadline (or until closing is ordered),
                // then shut the rest down and give them a moment to notice.
                let deadline = R::sleep(drain_timeout);
                if let Either::Right(_) = race(worker.connections_idle(), race(deadline, worker.closing())).await {
                    let open = worker.active_connections();
                    if open > 0 {
                        tracing::info!(core = info.cpu, open, "drain deadline passed; closing open connections");
                    }
                    worker.shut_down_connections();
                    let _ = race(worker.connections_idle(), R::sleep(Duration::from_secs(1))).await;
                }
                tracing::debug!(core = info.cpu, "worker stopped");
                exit
            }
        })
    }));
    uninstall();
    match outcome {
        Ok(Ok(exit)) => exit,
        Ok(Err(engine)) => Exit::Failed(engine.into()),
        Err(payload) => {
            Exit::Failed(LaunchError::Panicked { cpu: info.cpu, message: crate::task::panic_message(&*payload) })
        }
    }
}

/// An app that does nothing and returns at once (starts an engine to read its capabilities).
pub struct NoopApp;

impl App for NoopApp {
    async fn run<R: Runtime>(&self, _worker: Worker) -> Result<(), AppError> {
        Ok(())
    }
}
