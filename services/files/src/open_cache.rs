//! The per-core open-file cache (nginx's `open_file_cache`): a request for a file this core
//! already knows costs no `openat2`, `fstat` or `close`: the descriptor and its metadata are
//! kept, keyed by the decoded path beneath the root.
//!
//! Owns: the cached descriptors (each shared by the requests that use it: `sendfile` and
//! positional reads never move a file offset), one inotify instance per core with a watch on
//! every cached file's inode, and the bound on entries (`max`, each one descriptor and one
//! watch). An entry can carry a note of the caller's (`N`: what the file server derives from
//! the file once, such as its rendered validators), which goes whenever the entry goes.
//!
//! Staleness, by what changes:
//! - the file's bytes or attributes (written, truncated, chmod, unlinked or replaced by a
//!   rename over it, renamed away): inotify reports it on the file's own inode (`IN_MODIFY`,
//!   `IN_ATTRIB` covers the link count, `IN_MOVE_SELF`, `IN_DELETE_SELF`). The kernel queues
//!   the event inside the writer's system call, and every lookup first applies what is queued,
//!   so a change made before a request was sent is always seen by that request. Whether
//!   anything is queued is known without a system call: a [`Posted`] poll on the inotify
//!   descriptor is in this thread's memory before the receive that took the request returned
//!   (that module says why), so the queue is `read` only when it holds events. Where `Posted`
//!   is not exact (no io_uring, an SQPOLL engine), every lookup reads the queue (one
//!   non-blocking `read`, usually `EAGAIN`), or once per receive for a counting caller
//!   ([`corepin_core::arrivals`]). (A watcher task woken by the descriptor's readiness would
//!   not do: whether it runs before the connection task that reads the next request depends on
//!   the engine, and on Monoio's epoll driver it did not.)
//! - the names above the file (a directory on its path renamed or replaced, a symlink
//!   retargeted with `--follow-symlinks`): no watch sees those, so every entry is trusted for
//!   at most `valid` (1 s by default), after which the path is opened and checked again.
//!
//! An entry is only made after the watch is in place and the file was looked at again behind
//! it, still linked: a change between the open and the watch cannot be missed. When the core
//! cannot have inotify (limits, no `/proc`), the cache is off on that core and every request
//! opens its file, as before.
//!
//! Must not: open anything itself (confinement is `fsroot`'s), or be shared between cores.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use corepin_core::posted::Posted;
use corepin_core::runtime::Metadata;

use crate::cache::{Hasher, InsertionOrder};

/// The inode events that make a cached descriptor stale.
const MASK: u32 = libc::IN_MODIFY | libc::IN_ATTRIB | libc::IN_MOVE_SELF | libc::IN_DELETE_SELF;

struct Entry<N> {
    file: Rc<File>,
    meta: Metadata,
    note: Option<N>,
    wd: i32,
    checked: Instant,
    generation: u64,
}

/// How the cache answered a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Served from the cache.
    Hit,
    /// Not there (or the cache is off).
    Miss,
    /// There, but older than the validity window: opened again.
    Expired,
}

/// A cached file: its descriptor, its metadata and the note attached to it, if any.
pub type Known<N> = (Rc<File>, Metadata, Option<N>);

/// One core's cache of open files (see the module docs), with notes of type `N` on entries.
pub struct OpenFiles<N = ()> {
    inotify: Option<OwnedFd>,
    /// Where queued inotify events are read into (allocated with the first watch).
    events: Vec<u8>,
    map: HashMap<String, Entry<N>, Hasher>,
    by_wd: HashMap<i32, Vec<String>, Hasher>,
    order: InsertionOrder<String>,
    max: usize,
    valid: Duration,
    invalidated: u64,
    /// Inodes (device, inode) whose entries inotify dropped, for the memory cache to forget
    /// too (it validates by size and mtime, which an in-place rewrite can keep).
    changed: Vec<(u64, u64)>,
    /// The thread's receive count ([`corepin_core::arrivals`]) when the queue was last read.
    drained_at: Option<u64>,
    /// How the queue's events are noticed: `Unknown` until the first watch (made on the
    /// worker thread, whose engine decides whether [`Posted`] is exact there).
    notice: Notice,
    /// The thread's count of datagrams handed over by other cores when the queue was last
    /// read: those reach this thread without a system call, so `Posted` does not cover them.
    handed_at: u64,
    /// Times the queue was read.
    reads: u64,
}

/// How a cache learns that its inotify queue holds events.
#[derive(Debug)]
enum Notice {
    /// Not decided yet (no watch so far).
    Unknown,
    /// A poll posted into this thread's memory: the queue is read only when it is set.
    Posted(Box<Posted>),
    /// Read the queue at every lookup (once per receive for a counting caller).
    Read,
}

impl<N: Clone> OpenFiles<N> {
    /// A cache that holds nothing.
    pub fn off() -> Self {
        Self::with(None, 0, Duration::ZERO)
    }

    /// A cache of at most `max` files, each trusted for `valid` without a check of its path;
    /// `max == 0` is [`off`](Self::off).
    pub fn new(max: usize, valid: Duration) -> io::Result<Self> {
        if max == 0 {
            return Ok(Self::off());
        }
        // SAFETY: inotify_init1 takes flags only; it returns a new descriptor or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by inotify_init1 and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self::with(Some(fd), max, valid))
    }

    fn with(inotify: Option<OwnedFd>, max: usize, valid: Duration) -> Self {
        Self {
            inotify,
            events: Vec::new(),
            map: HashMap::default(),
            by_wd: HashMap::default(),
            order: InsertionOrder::new(),
            max,
            valid,
            invalidated: 0,
            changed: Vec::new(),
            drained_at: None,
            notice: Notice::Unknown,
            handed_at: 0,
            reads: 0,
        }
    }

    /// Whether this core caches open files.
    pub fn enabled(&self) -> bool {
        self.inotify.is_some()
    }

    /// The cached descriptor and metadata for `rel`, if known, unchanged and checked within
    /// the window. Applies the queued inotify events first; if they cannot be read, the cache
    /// turns itself off (and says so) rather than answer from entries it cannot check.
    ///
    /// With a posted notice the queue is read only when it holds events (or after datagrams
    /// another core handed over). Without one, `counted` matters: every receive that can carry
    /// the caller's requests is counted in [`corepin_core::arrivals`], and the queue is read
    /// only when something was received since it last was (that module says why this is
    /// exact); else on every lookup.
    pub fn lookup(&mut self, rel: &str, now: Instant, counted: bool) -> (Option<Known<N>>, Lookup) {
        if self.inotify.is_some() && !self.by_wd.is_empty() && self.may_have_events(counted) {
            if let Err(e) = self.apply_queue() {
                tracing::warn!("open-file cache off on this core (reading inotify: {e})");
                self.turn_off();
            }
        }
        match self.map.get(rel) {
            Some(e) if now.duration_since(e.checked) < self.valid => {
                (Some((Rc::clone(&e.file), e.meta, e.note.clone())), Lookup::Hit)
            }
            Some(_) => (None, Lookup::Expired),
            None => (None, Lookup::Miss),
        }
    }

    /// Keeps `file`, just opened for `rel` and described by `first` (its `fstat`), when it is
    /// a regular file that can be watched. Returns the metadata the request must use: read
    /// again behind the new watch when the file is kept, else `first`. Directories and files
    /// being deleted are not kept.
    pub fn insert(&mut self, rel: &str, file: &Rc<File>, first: Metadata, now: Instant) -> Metadata {
        match &self.inotify {
            Some(inotify) if first.is_file => {
                let inotify = inotify.as_raw_fd();
                self.keep(inotify, rel, file, now).unwrap_or(first)
            }
            _ => first,
        }
    }

    fn keep(&mut self, inotify: RawFd, rel: &str, file: &Rc<File>, now: Instant) -> Option<Metadata> {
        self.remove(rel);
        self.choose_notice();
        let proc_path = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()?;
        // SAFETY: `inotify` is this cache's open inotify descriptor and `proc_path` a valid C
        // string; the magic link resolves to the open file's own inode, whatever its name now.
        let wd = unsafe { libc::inotify_add_watch(inotify, proc_path.as_ptr(), MASK) };
        if wd < 0 {
            return None;
        }
        // Looked at again behind the watch: a change from here on is an event.
        let meta = match stat(file.as_raw_fd()) {
            Ok((meta, linked)) if meta.is_file && linked => meta,
            other => {
                self.release_wd(wd);
                return other.ok().map(|(meta, _)| meta);
            }
        };
        // Claimed before evicting, so evicting another name of this inode keeps the watch.
        self.by_wd.entry(wd).or_default().push(rel.to_string());
        while self.map.len() >= self.max {
            let map = &self.map;
            match self.order.pop_oldest(|k| map.get(k).map(|e| e.generation)) {
                Some(k) => self.remove(&k),
                None => break,
            }
        }
        let generation = self.order.push(rel.to_string());
        let entry = Entry { file: Rc::clone(file), meta, note: None, wd, checked: now, generation };
        self.map.insert(rel.to_string(), entry);
        let map = &self.map;
        self.order.compact(map.len(), |k| map.get(k).map(|e| e.generation));
        Some(meta)
    }

    fn remove(&mut self, rel: &str) {
        let Some(old) = self.map.remove(rel) else { return };
        let now_unused = match self.by_wd.get_mut(&old.wd) {
            Some(keys) => {
                keys.retain(|k| k != rel);
                keys.is_empty()
            }
            None => false,
        };
        if now_unused {
            self.by_wd.remove(&old.wd);
            self.release_wd(old.wd);
        }
    }

    fn release_wd(&self, wd: i32) {
        if self.by_wd.contains_key(&wd) {
            return; // another path names the same inode
        }
        if let Some(fd) = &self.inotify {
            // SAFETY: an inotify descriptor this cache owns; a watch already gone (EINVAL) is
            // harmless.
            unsafe { libc::inotify_rm_watch(fd.as_raw_fd(), wd) };
        }
    }

    /// Applies a batch of inotify events read from the descriptor: drops every entry whose
    /// inode changed, or everything when the kernel's queue overflowed.
    fn on_events(&mut self, mut bytes: &[u8]) {
        const HEAD: usize = std::mem::size_of::<libc::inotify_event>();
        while bytes.len() >= HEAD {
            // SAFETY: at least HEAD bytes remain; read_unaligned copes with any alignment of
            // the caller's buffer.
            let ev: libc::inotify_event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            let step = HEAD + ev.len as usize;
            if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                self.clear();
            } else if let Some(keys) = self.by_wd.remove(&ev.wd) {
                for k in keys {
                    if let Some(e) = self.map.remove(&k) {
                        self.invalidated += 1;
                        self.changed.push((e.meta.dev, e.meta.ino));
                    }
                }
                if ev.mask & libc::IN_IGNORED == 0 {
                    self.release_wd(ev.wd);
                }
            }
            bytes = bytes.get(step..).unwrap_or_default();
        }
    }

    /// Drops every entry (their descriptors close as the last request using each ends).
    pub fn clear(&mut self) {
        let keys: Vec<String> = self.map.keys().cloned().collect();
        self.invalidated += keys.len() as u64;
        self.changed.extend(self.map.values().map(|e| (e.meta.dev, e.meta.ino)));
        for k in keys {
            self.remove(&k);
        }
        self.order.clear();
    }

    /// Whether the inotify queue may hold events this lookup has not applied.
    fn may_have_events(&mut self, counted: bool) -> bool {
        match &mut self.notice {
            Notice::Posted(p) => p.is_set() || corepin_core::arrivals::handed() != self.handed_at,
            // A counted caller with nothing received since the last read skips it. (Unknown:
            // no watch yet, so the caller found nothing to read.)
            Notice::Unknown | Notice::Read => !(counted && self.drained_at == Some(corepin_core::arrivals::count())),
        }
    }

    /// Reads and applies the queued events, then arms the notice again (behind the read, so
    /// nothing queued after it is missed).
    fn apply_queue(&mut self) -> io::Result<()> {
        let Some(inotify) = &self.inotify else { return Ok(()) };
        let fd = inotify.as_raw_fd();
        self.drained_at = Some(corepin_core::arrivals::count());
        self.handed_at = corepin_core::arrivals::handed();
        self.reads += 1;
        self.drain(fd)?;
        if let Notice::Posted(p) = &mut self.notice {
            if let Err(e) = p.rearm() {
                tracing::info!(
                    "open-file cache reads inotify at every lookup from now on (its posted notice failed: {e})"
                );
                self.notice = Notice::Read;
            }
        }
        Ok(())
    }

    /// Decides, at the first watch, how the queue's events will be noticed.
    fn choose_notice(&mut self) {
        let (Notice::Unknown, Some(inotify)) = (&self.notice, &self.inotify) else { return };
        self.notice = match Posted::watch(inotify.as_fd()) {
            Ok(p) => {
                // Hand-overs before this one are older than the notice: nothing to read for them.
                self.handed_at = corepin_core::arrivals::handed();
                Notice::Posted(Box::new(p))
            }
            Err(e) => {
                tracing::info!("open-file cache reads inotify at every lookup or receive (no posted notice: {e})");
                Notice::Read
            }
        };
    }

    /// Reads the queued events (non-blocking) and applies them, until none are left.
    fn drain(&mut self, inotify: RawFd) -> io::Result<()> {
        if self.events.is_empty() {
            // Room for many events at once (each is 16 bytes: watches on files carry no name).
            self.events = vec![0; 4096];
        }
        loop {
            // SAFETY: `events` is valid for `len()` bytes of writes; `inotify` is open.
            let n = unsafe { libc::read(inotify, self.events.as_mut_ptr().cast(), self.events.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(()),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            let batch = std::mem::take(&mut self.events);
            self.on_events(&batch[..n as usize]);
            self.events = batch;
        }
    }

    /// Drops every entry and caches nothing from now on (inotify failed).
    pub fn turn_off(&mut self) {
        self.clear();
        self.notice = Notice::Read;
        self.inotify = None;
    }

    /// The inodes found changed since the last call (see the field).
    pub fn take_changed(&mut self) -> Option<std::vec::Drain<'_, (u64, u64)>> {
        (!self.changed.is_empty()).then(|| self.changed.drain(..))
    }

    /// Attaches `note` to the entry for `rel`, if there is one made for `meta` (the metadata
    /// [`insert`](Self::insert) returned or [`lookup`](Self::lookup) found).
    pub fn annotate(&mut self, rel: &str, meta: &Metadata, note: N) {
        if let Some(e) = self.map.get_mut(rel) {
            if e.meta == *meta {
                e.note = Some(note);
            }
        }
    }

    /// Files held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Entries dropped because their file changed (or the event queue overflowed).
    pub fn invalidated(&self) -> u64 {
        self.invalidated
    }

    /// Times the inotify queue was read.
    pub fn queue_reads(&self) -> u64 {
        self.reads
    }
}

/// `fstat`: the metadata and whether the inode still has a name.
fn stat(fd: RawFd) -> io::Result<(Metadata, bool)> {
    // SAFETY: a zeroed `stat` is a valid out-parameter; fstat fills it or fails.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open descriptor the caller holds; `st` is a valid pointer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((Metadata::from_stat(&st), st.st_nlink > 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn meta(f: &File) -> Metadata {
        Metadata::from_fd(f.as_raw_fd()).unwrap()
    }

    #[test]
    fn a_changed_file_is_dropped_and_an_unchanged_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a", "b"] {
            std::fs::write(dir.path().join(name), name).unwrap();
        }
        let mut c: OpenFiles<&str> = OpenFiles::new(8, Duration::from_secs(60)).unwrap();
        let now = Instant::now();
        for name in ["a", "b"] {
            let f = Rc::new(File::open(dir.path().join(name)).unwrap());
            let m = c.insert(name, &f, meta(&f), now);
            assert_eq!(m.len, 1);
            let stale = Metadata { len: 2, ..m };
            c.annotate(name, &stale, "made for other metadata");
            assert_eq!(c.lookup(name, now, false).0.unwrap().2, None, "a note for other metadata is not kept");
            c.annotate(name, &m, name);
        }
        assert_eq!((c.lookup("a", now, false).1, c.lookup("b", now, false).1), (Lookup::Hit, Lookup::Hit));
        assert_eq!(c.lookup("b", now, false).0.unwrap().2, Some("b"), "the note comes with the entry");
        std::fs::OpenOptions::new().append(true).open(dir.path().join("a")).unwrap().write_all(b"!").unwrap();
        assert_eq!(c.lookup("a", now, false).1, Lookup::Miss, "written: dropped");
        let f = Rc::new(File::open(dir.path().join("a")).unwrap());
        c.insert("a", &f, meta(&f), now);
        assert_eq!(c.lookup("a", now, false).0.unwrap().2, None, "the note went with the changed file's entry");
        c.remove("a");
        assert_eq!(c.lookup("b", now, false).1, Lookup::Hit);
        // Replaced by a rename over it: the old inode's link count changes.
        std::fs::write(dir.path().join("b.new"), "B").unwrap();
        std::fs::rename(dir.path().join("b.new"), dir.path().join("b")).unwrap();
        assert_eq!(c.lookup("b", now, false).1, Lookup::Miss, "replaced: dropped");
        assert_eq!(c.invalidated(), 2);
        assert!(c.by_wd.is_empty() && c.is_empty());
    }

    #[test]
    fn entries_expire_are_bounded_and_share_a_watch_per_inode() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x"), "x").unwrap();
        let mut c: OpenFiles = OpenFiles::new(2, Duration::from_millis(100)).unwrap();
        let t0 = Instant::now();
        let f = Rc::new(File::open(dir.path().join("x")).unwrap());
        c.insert("x", &f, meta(&f), t0);
        c.insert("./x", &f, meta(&f), t0);
        assert_eq!(c.by_wd.len(), 1, "one inode, one watch");
        assert_eq!(c.lookup("x", t0 + Duration::from_millis(150), false).1, Lookup::Expired);
        // Opened again after the window: the same inode keeps its one watch.
        let later = t0 + Duration::from_millis(150);
        c.insert("x", &f, meta(&f), later);
        assert_eq!(c.lookup("x", later + Duration::from_millis(50), false).1, Lookup::Hit);
        assert_eq!(c.by_wd.len(), 1);
        c.insert("x2", &f, meta(&f), t0);
        assert_eq!(c.len(), 2, "at most `max` entries");
        assert_eq!(c.by_wd.values().map(Vec::len).sum::<usize>(), 2, "the evicted name left the watch's list");
        std::fs::write(dir.path().join("x"), "y").unwrap();
        assert_eq!(c.lookup("x", t0, false).1, Lookup::Miss);
        assert!(c.is_empty(), "every path naming the inode is dropped");
        assert_eq!(c.take_changed().map(Iterator::count), Some(2), "twice the one inode, for the memory cache");
        let dir_fd = Rc::new(File::open(dir.path()).unwrap());
        assert!(c.insert(".", &dir_fd, meta(&dir_fd), t0).is_dir, "a directory's metadata, not cached");
        assert!(c.is_empty() && c.by_wd.is_empty());
        assert!(!OpenFiles::<()>::off().enabled());
    }

    #[test]
    fn a_counted_caller_reads_the_queue_only_after_a_receive() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), "a").unwrap();
        let mut c: OpenFiles = OpenFiles::new(8, Duration::from_secs(60)).unwrap();
        // The way without a posted notice (no io_uring, or an SQPOLL engine).
        c.notice = Notice::Read;
        let now = Instant::now();
        let f = Rc::new(File::open(dir.path().join("a")).unwrap());
        c.insert("a", &f, meta(&f), now);
        assert_eq!(c.lookup("a", now, true).1, Lookup::Hit, "the first lookup reads the queue");
        std::fs::write(dir.path().join("a"), "b").unwrap();
        // Nothing received since the queue was read: a request served now was received before
        // the write, so the entry is still the answer it was sent for.
        assert_eq!(c.lookup("a", now, true).1, Lookup::Hit, "no receive since the last read: queue not read");
        corepin_core::arrivals::note();
        assert_eq!(c.lookup("a", now, true).1, Lookup::Miss, "after a receive the write is seen");
        let f = Rc::new(File::open(dir.path().join("a")).unwrap());
        c.insert("a", &f, meta(&f), now);
        std::fs::write(dir.path().join("a"), "c").unwrap();
        assert_eq!(c.lookup("a", now, false).1, Lookup::Miss, "an uncounted caller reads the queue every time");
    }

    #[test]
    fn with_a_posted_notice_the_queue_is_read_only_when_it_holds_events() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), "a").unwrap();
        let mut c: OpenFiles = OpenFiles::new(8, Duration::from_secs(60)).unwrap();
        let now = Instant::now();
        let f = Rc::new(File::open(dir.path().join("a")).unwrap());
        c.insert("a", &f, meta(&f), now);
        if !matches!(c.notice, Notice::Posted(_)) {
            return eprintln!("skipped: no private io_uring here ({:?})", c.notice);
        }
        for _ in 0..100 {
            assert_eq!(c.lookup("a", now, false).1, Lookup::Hit);
        }
        assert_eq!(c.reads, 0, "nothing queued: no read, whatever the caller counts");
        std::fs::write(dir.path().join("a"), "b").unwrap();
        assert_eq!(c.lookup("a", now, false).1, Lookup::Miss, "a change is seen by the next lookup");
        assert_eq!(c.reads, 1);
        let f = Rc::new(File::open(dir.path().join("a")).unwrap());
        c.insert("a", &f, meta(&f), now);
        assert_eq!(c.lookup("a", now, true).1, Lookup::Hit);
        assert_eq!(c.reads, 1, "armed again behind the read: still nothing queued");
        // Bytes handed over by another core came without a system call here: read once.
        corepin_core::arrivals::note_handed();
        assert_eq!(c.lookup("a", now, true).1, Lookup::Hit);
        assert_eq!(c.reads, 2);
        assert_eq!(c.lookup("a", now, true).1, Lookup::Hit);
        assert_eq!(c.reads, 2);
    }
}
