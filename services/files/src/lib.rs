//! corepin's static file server: HTTP/1.1 (RFC 9110 / 9112) GET and HEAD with keep-alive,
//! pipelining, validators, conditional requests and byte ranges, written once against
//! corepin's traits; no backend is named here.
//!
//! Three parts, so that other protocols reuse the first two (docs/file-server.md):
//! - [`resource`] decides, independent of the protocol, what answers a request: method, decoded
//!   path and typed conditional and range fields in; status, typed header values and a body
//!   source out. Confinement, directories, validators, ranges, content types and the per-core
//!   memory cache live there.
//! - [`transfer`] moves a body to any [`ConnStream`] and counts the path it took.
//! - [`h1`] is the HTTP/1.1 front end: the connection loop, head parsing ([`http`]),
//!   keep-alive, pipelining, deadlines and the serialized head.
//!
//! Bodies take one of three paths, chosen by size (docs/zero-copy.md has the measurements):
//! small files come from a per-core memory cache and leave in one gather write together with
//! the response head; larger files go from the page cache to the socket with
//! [`send_file`](ConnStream::send_file) (`sendfile(2)`) where the stream allows it; where a
//! file system or the stream cannot do that, read + write is the named fallback. The path
//! used is counted.
//!
//! Safety: request paths are decoded once and refused when they could escape
//! ([`target`]); files are opened confined beneath the root by the kernel ([`fsroot`]);
//! heads are bounded ([`http::Limits`]); and every wait on a client has a deadline: the head
//! must arrive within `header_timeout`, an idle keep-alive connection closes after
//! `idle_timeout`, and every write must progress within `send_timeout`, so a client that
//! trickles or stops reading is closed and its core moves on.

#![warn(missing_docs)]

pub mod cache;
pub mod fsroot;
pub mod h1;
pub mod http;
pub mod metrics;
pub mod open_cache;
pub mod range;
pub mod resource;
pub mod target;
pub mod transfer;

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Duration;

use corepin_core::{ConnStream, Connection, Runtime, Service, ServiceFactory, Worker};

use crate::cache::Cache;
use crate::fsroot::Root;
use crate::http::Limits;
use crate::metrics::{CoreFileCounters, FileMetrics};
use crate::open_cache::OpenFiles;
use crate::resource::Facts;

/// How bodies larger than `memory_max` are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LargeBodies {
    /// `sendfile(2)` (falls back to read + write per transfer where the file system refuses).
    Sendfile,
    /// Always read into a buffer and write (the fallback, selectable for measurement).
    ReadWrite,
}

/// File server settings.
#[derive(Debug, Clone)]
pub struct FilesConfig {
    /// The directory served.
    pub root: PathBuf,
    /// Answer directory requests without an index.html with a listing (otherwise 403).
    pub list_dirs: bool,
    /// Follow symlinks that lead outside the root (refused by default).
    pub follow_symlinks: bool,
    /// Request size limits.
    pub limits: Limits,
    /// Time from the first byte of a request to the end of its head.
    pub header_timeout: Duration,
    /// Time an idle keep-alive connection is kept.
    pub idle_timeout: Duration,
    /// Time any single write to a client may take to make progress.
    pub send_timeout: Duration,
    /// Files up to this size are served from the per-core memory cache (0: never).
    pub memory_max: u64,
    /// Bytes of small-file bodies each core may cache.
    pub cache_bytes: u64,
    /// How larger bodies are sent.
    pub large_bodies: LargeBodies,
    /// Buffer size of the read + write path.
    pub read_write_chunk: usize,
    /// Read + write chunks of at least this many bytes leave by zero-copy send
    /// ([`ConnStream::write_zc`](corepin_core::ConnStream::write_zc): `IORING_OP_SEND_ZC` where
    /// the backend has it); `None`, the default: never. Off by default because it costs more
    /// CPU than a plain send wherever the peer is on this host (loopback, veth), where the
    /// kernel copies the bytes anyway (docs/zero-copy.md).
    pub send_zc_min: Option<usize>,
    /// Log every request through tracing (target `corepin::access`).
    pub access_log: bool,
    /// Files each core keeps open with their metadata (the open-file cache; 0: off). Each
    /// costs one descriptor and one inotify watch.
    pub open_files: usize,
    /// How long an open-file cache entry is trusted before its path is opened and checked
    /// again (changes to the file itself are seen at once through inotify; this bounds how
    /// long a renamed directory or retargeted symlink above it goes unnoticed).
    pub open_files_valid: Duration,
    /// The `Alt-Svc` field value HTTP/1.1 responses carry (RFC 7838), e.g. `h3=":8443"` when
    /// HTTP/3 is served beside HTTPS on the same port; `None`: no such field.
    pub alt_svc: Option<String>,
}

impl FilesConfig {
    /// Defaults for serving `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            list_dirs: false,
            follow_symlinks: false,
            limits: Limits::default(),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(30),
            memory_max: DEFAULT_MEMORY_MAX,
            cache_bytes: 64 * 1024 * 1024,
            large_bodies: LargeBodies::Sendfile,
            read_write_chunk: 128 * 1024,
            send_zc_min: None,
            access_log: false,
            open_files: DEFAULT_OPEN_FILES,
            open_files_valid: Duration::from_secs(1),
            alt_svc: None,
        }
    }
}

/// Files up to this size are served from memory by default (docs/zero-copy.md).
pub const DEFAULT_MEMORY_MAX: u64 = 32 * 1024;

/// The default size of each core's open-file cache.
pub const DEFAULT_OPEN_FILES: usize = 1000;

/// Builds the per-core file service. Clones share the root and the counters, so two front
/// ends (HTTPS and HTTP/3, say) count into the same metrics.
#[derive(Clone)]
pub struct FilesFactory {
    cfg: Arc<FilesConfig>,
    root: Arc<Root>,
    metrics: Arc<FileMetrics>,
}

impl FilesFactory {
    /// Opens the root (failing clearly if it is missing or not a directory) for `cores` workers.
    pub fn new(cfg: FilesConfig, cores: usize) -> io::Result<Self> {
        let root = Root::open(&cfg.root, cfg.follow_symlinks)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot serve {}: {e}", cfg.root.display())))?;
        Ok(Self { cfg: Arc::new(cfg), root: Arc::new(root), metrics: FileMetrics::new(cores.max(1)) })
    }
    /// The counters, for the metrics endpoint.
    pub fn metrics(&self) -> &Arc<FileMetrics> {
        &self.metrics
    }
    /// The root being served.
    pub fn root(&self) -> &Root {
        &self.root
    }
    /// A factory sharing this one's root and counters whose responses advertise
    /// `Alt-Svc: {value}` (see [`FilesConfig::alt_svc`]).
    pub fn with_alt_svc(&self, value: impl Into<String>) -> Self {
        let cfg = FilesConfig { alt_svc: Some(value.into()), ..(*self.cfg).clone() };
        Self { cfg: Arc::new(cfg), root: Arc::clone(&self.root), metrics: Arc::clone(&self.metrics) }
    }
}

impl FilesFactory {
    /// This core's open-file cache, or one that is off (said once in the log) when the core
    /// cannot have inotify.
    fn open_files(&self, core: usize) -> RefCell<OpenFiles<Rc<Facts>>> {
        let cache = OpenFiles::new(self.cfg.open_files, self.cfg.open_files_valid).unwrap_or_else(|e| {
            tracing::warn!("core {core}: open-file cache off (inotify: {e}); every request opens its file");
            OpenFiles::off()
        });
        RefCell::new(cache)
    }
}

impl FilesFactory {
    /// The file service of `worker`'s core, for any front end (the HTTP/1.1 one gets it
    /// through [`ServiceFactory::new_service`]; HTTP/3 asks directly).
    pub fn files_for(&self, worker: &Worker) -> Files {
        Files {
            cfg: Arc::clone(&self.cfg),
            root: Arc::clone(&self.root),
            metrics: Arc::clone(&self.metrics),
            core: worker.info().index,
            caches: self.caches_for(worker.info().index),
            counted: false,
        }
    }

    /// This core's caches: made by the first front end built on the core from this factory
    /// or a clone of it (they share the counters), and shared by the next ones, so HTTP/1.1
    /// and HTTP/3 in one process (`files --tls --h3`) answer from one memory cache and one set
    /// of open files instead of keeping every file twice.
    fn caches_for(&self, core: usize) -> Rc<CoreCaches> {
        thread_local! {
            /// Caches of this thread, by the counters' address of the factory family that made
            /// them. Weak: they go when the last front end using them does (a live entry keeps
            /// its factory's counters alive, so an address is not reused while it is here).
            static CORE_CACHES: RefCell<Vec<(usize, Weak<CoreCaches>)>> = const { RefCell::new(Vec::new()) };
        }
        let family = Arc::as_ptr(&self.metrics) as usize;
        CORE_CACHES.with(|all| {
            let mut all = all.borrow_mut();
            all.retain(|(_, c)| c.strong_count() > 0);
            if let Some(c) = all.iter().find(|(f, _)| *f == family).and_then(|(_, c)| c.upgrade()) {
                return c;
            }
            let c = Rc::new(CoreCaches {
                cache: RefCell::new(Cache::new(self.cfg.cache_bytes)),
                open_files: self.open_files(core),
            });
            all.push((family, Rc::downgrade(&c)));
            c
        })
    }
}

/// One core's memory cache of small files and its open-file cache.
struct CoreCaches {
    cache: RefCell<Cache>,
    open_files: RefCell<OpenFiles<Rc<Facts>>>,
}

impl ServiceFactory for FilesFactory {
    type Service<R: Runtime, S: ConnStream> = Files;
    // The root was opened and checked by `FilesFactory::new`; nothing per core can fail.
    type Error = Infallible;
    fn new_service<R: Runtime, S: ConnStream>(&self, worker: &Worker) -> Result<Files, Infallible> {
        Ok(self.files_for(worker))
    }
}

/// The file service of one core: the settings, the root, this core's counters and its
/// small-file cache. [`resource`] plans answers with it, [`transfer`] sends them and [`h1`]
/// serves HTTP/1.1 connections with both.
pub struct Files {
    cfg: Arc<FilesConfig>,
    root: Arc<Root>,
    metrics: Arc<FileMetrics>,
    core: usize,
    caches: Rc<CoreCaches>,
    /// Every receive that carries this front end's requests is counted in
    /// [`corepin_core::arrivals`] (see [`Files::receives_counted`]).
    counted: bool,
}

impl Files {
    /// Says that the front end using this value counts every receive that can carry its
    /// requests with [`corepin_core::arrivals::note`], made after the receive and before the
    /// requests it carries are planned. Where the open-file cache has no posted notice on its
    /// inotify queue (no io_uring, an SQPOLL engine: `corepin_core::posted`), it then reads
    /// the queue only when something was received since it last did, instead of on every
    /// lookup: one system call per batch of received datagrams, not one per request. A front
    /// end that misses a receive would be answered from entries of files changed before its
    /// request was sent.
    pub fn receives_counted(mut self) -> Self {
        self.counted = true;
        self
    }
    /// The settings this service runs with.
    pub fn config(&self) -> &FilesConfig {
        &self.cfg
    }
    /// This core's counters.
    pub fn counters(&self) -> &CoreFileCounters {
        self.metrics.core(self.core.min(self.metrics.len() - 1))
    }
}

impl<R: Runtime, S: ConnStream> Service<Connection<R, S>> for Files {
    type Response = ();
    type Error = io::Error;

    // Not an `async fn`: the connection's future is `h1::serve`'s own, with no wrapper
    // holding `conn` a second time for the connection's lifetime.
    fn call(&self, conn: Connection<R, S>) -> impl Future<Output = io::Result<()>> {
        h1::serve(self, conn)
    }
}
