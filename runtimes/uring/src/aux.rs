//! The auxiliary ring: a per-core `io_uring` of corepin's own beside the host engine's, for
//! the operations the engine does not have. Today that is a receive into a provided-buffer
//! ring behind `read_pooled` (docs/aux-ring.md): the kernel picks a buffer only when data
//! arrives, so a connection waiting for data holds none.
//!
//! The two rings meet only at an eventfd registered on the aux ring, which a task awaits
//! through the engine's own [`FdWatch`]; nothing of the engine's internals is touched, so any
//! backend can host it. Per scheduler round of the host:
//! * the reap task wakes when the eventfd is readable, hands the completions the kernel has
//!   posted to the waiting reads, and drains the eventfd (one `read(2)`; an
//!   `io_uring_enter(GETEVENTS)` only when the kernel has work of the ring's still to run);
//! * the flush task, woken by the first submission of a round, runs after the tasks already
//!   queued and submits every receive they queued with one `io_uring_enter`.
//!
//! Each `read_pooled` is one single-shot receive. A multishot receive would save its re-arm but
//! keeps filling ring buffers while the service is not reading, so one chatty connection could
//! drain the core's ring for everyone; docs/aux-ring.md has the measurement of both.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use corepin_core::caps::Support;
use corepin_core::io::AsyncReadRent;
use corepin_core::pool::{LentBuf, PooledBuf};
use corepin_core::runtime::{FdWatch, Runtime};
use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// Buffers in the core's provided-buffer ring (a power of two). Their memory is a fixed
/// per-core cost whatever the number of connections; it becomes resident as it is used.
pub const BUF_COUNT: u16 = 512;
/// Bytes per provided buffer: one receive's worth for request heads and echo messages.
pub const BUF_LEN: usize = 8 * 1024;
/// The provided-buffer group the receives select from.
const BUF_GROUP: u16 = 0;
/// Submission queue entries (the completion queue has twice as many, and the kernel keeps
/// completions that overflow it: IORING_FEAT_NODROP).
const ENTRIES: u32 = 1024;
/// `io_uring_enter` flag: run (deferred) completions.
const ENTER_GETEVENTS: u32 = 1;
/// `user_data` of ASYNC_CANCEL entries, whose own completions are ignored.
const CANCEL: u64 = u64::MAX;
/// How long stopping waits for the kernel to give back what is still in flight.
const QUIESCE: Duration = Duration::from_secs(1);

thread_local! {
    /// The aux ring of the engine running on this thread, if it has one.
    static CURRENT: RefCell<Option<Rc<Aux>>> = const { RefCell::new(None) };
}

/// Why an aux ring could not be set up.
#[derive(Debug)]
pub enum AuxError {
    /// `io_uring_setup` failed.
    Ring(io::Error),
    /// The eventfd could not be created or registered.
    EventFd(io::Error),
    /// The provided-buffer ring could not be registered (kernel before 5.19).
    BufRing(io::Error),
    /// The host engine cannot watch the eventfd.
    Watch(io::Error),
}

impl std::fmt::Display for AuxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ring(e) => write!(f, "cannot create the auxiliary io_uring: {e}"),
            Self::EventFd(e) => write!(f, "cannot set up the auxiliary ring's eventfd: {e}"),
            Self::BufRing(e) => write!(f, "cannot register a provided-buffer ring (kernel 5.19+): {e}"),
            Self::Watch(e) => write!(f, "the engine cannot watch the auxiliary ring's eventfd: {e}"),
        }
    }
}

impl std::error::Error for AuxError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Ring(e) | Self::EventFd(e) | Self::BufRing(e) | Self::Watch(e) => Some(e),
        }
    }
}

/// An aux ring built on this thread and not yet running: [`install`](Self::install) it from
/// inside the engine. Building it first lets the backend report whether it exists before the
/// service starts.
pub struct AuxRing(Aux);

impl AuxRing {
    /// Builds the ring (SINGLE_ISSUER and COOP_TASKRUN where the kernel takes them), its
    /// eventfd and its provided-buffer ring, on the calling thread: the worker's own.
    pub fn new() -> Result<Self, AuxError> {
        Aux::new().map(Self)
    }

    /// Makes this the thread's aux ring and starts its reap and flush tasks on the running
    /// engine `R`. Call it inside `R`'s `block_on`, and [`uninstall`] after the engine ends.
    pub fn install<R: Runtime>(self) -> Result<(), AuxError> {
        let aux = Rc::new(self.0);
        let watch = R::FdWatch::new(aux.evfd.as_raw_fd()).map_err(AuxError::Watch)?;
        aux.tasks.set(2);
        R::spawn_detached(reap_task(aux.clone(), watch));
        R::spawn_detached(flush_task(aux.clone()));
        CURRENT.with(|c| *c.borrow_mut() = Some(aux));
        Ok(())
    }
}

/// For a backend's engine setup on core `cpu`: builds the aux ring (before the engine runs
/// the service), or says why not, logged once, in words for the capability report.
pub fn build_for_core(cpu: usize) -> Result<AuxRing, &'static str> {
    AuxRing::new().map_err(|e| missing(cpu, &e))
}

/// For a backend, inside its engine: installs the ring [`build_for_core`] made, and returns
/// why the engine has none (for the capability report's provided-buffer rings), if it has none.
pub fn install_for_core<R: Runtime>(cpu: usize, built: Result<AuxRing, &'static str>) -> Option<&'static str> {
    match built {
        Ok(aux) => aux.install::<R>().err().map(|e| missing(cpu, &e)),
        Err(why) => Some(why),
    }
}

fn missing(cpu: usize, e: &AuxError) -> &'static str {
    tracing::warn!(cpu, "{e}; read_pooled takes buffers of the core's pool");
    // Once per engine start, and only when the ring is missing.
    Box::leak(e.to_string().into_boxed_str())
}

/// Calls [`uninstall`] when dropped: a backend holds one across its engine's run, so the aux
/// ring stops after the engine is gone, also when the service panics.
pub struct UninstallOnDrop;

impl Drop for UninstallOnDrop {
    fn drop(&mut self) {
        uninstall();
    }
}

/// Stops this thread's aux ring from inside the engine `R`, once the service is done: stops
/// the ring (see [`uninstall`]) and lets its reap and flush tasks end (for at most
/// [`QUIESCE`]), so that nothing of it is left for the engine to drop, or to leak where an
/// engine does not drop its pending tasks (Monoio).
pub async fn stop<R: Runtime>() {
    let Some(aux) = CURRENT.with(|c| c.borrow_mut().take()) else { return };
    aux.shutdown();
    // The reap task is waiting for the eventfd, the flush task for a submission.
    aux.signal_eventfd();
    if let Some(w) = aux.flusher.take() {
        w.wake();
    }
    let ended = poll_fn(|cx| {
        if aux.tasks.get() == 0 {
            return Poll::Ready(());
        }
        aux.stopper.set(Some(cx.waker().clone()));
        Poll::Pending
    });
    if corepin_core::task::timeout::<R, _>(QUIESCE, ended).await.is_err() {
        tracing::warn!("aux ring: its tasks did not end when it stopped");
    }
}

/// Stops this thread's aux ring, if it has one: cancels what is still in flight, waits (a
/// bounded time) until the kernel has given everything back, and closes the ring. Buffers
/// still held by the service stay valid until they are dropped. Backends call it once their
/// engine has ended (also on unwinding); after [`stop`] it has nothing left to do.
pub fn uninstall() {
    if let Some(aux) = CURRENT.with(|c| c.borrow_mut().take()) {
        aux.shutdown();
    }
}

/// Whether this thread has a running aux ring.
pub fn active() -> bool {
    CURRENT.with(|c| c.borrow().as_ref().is_some_and(|a| a.ring.borrow().is_some()))
}

/// `read_pooled` for a backend that hosts the aux ring: a receive on `fd` (the descriptor of
/// `stream`) into the core's provided-buffer ring, so a waiting connection holds no buffer.
/// Without a running aux ring (an epoll driver, or it could not be set up), or when every
/// buffer is lent out (`ENOBUFS`: nothing was consumed), the core pool's fallback reads from
/// `stream` instead.
pub async fn read_pooled<S: AsyncReadRent + ?Sized>(stream: &mut S, fd: RawFd) -> io::Result<PooledBuf> {
    if let Some(recv) = recv(fd) {
        match recv.await? {
            Received::Data(buf) => return Ok(buf),
            Received::Eof => return Ok(PooledBuf::end_of_stream()),
            Received::NoBuffers => {
                tracing::trace!("provided-buffer ring empty; read_pooled takes a buffer of the core's pool")
            }
        }
    }
    corepin_core::pool::read_fallback(stream).await
}

/// The capability report's multishot receive for a backend whose `read_pooled` is the aux
/// ring's: not used, and why.
pub const MULTISHOT_RECV: Support = Support::Absent(
    "read_pooled arms one receive per read on the auxiliary ring: a multishot receive would keep filling ring \
     buffers while the service is not reading (docs/aux-ring.md)",
);

/// The capability report's provided-buffer rings for a backend that hosts the aux ring;
/// `no_aux` says why it has none, if it has none.
pub fn buffer_rings(no_aux: Option<&'static str>) -> Support {
    match no_aux {
        None => Support::Native,
        Some(why) => Support::Absent(why),
    }
}

/// What a receive on the aux ring delivered.
#[derive(Debug)]
pub enum Received {
    /// Bytes, in a buffer lent from the ring.
    Data(PooledBuf),
    /// End of stream.
    Eof,
    /// Every buffer of the ring is lent out (`ENOBUFS`): nothing was consumed; read another way.
    NoBuffers,
}

/// Starts a receive on `fd` into the thread's provided-buffer ring, or `None` when the thread
/// has no running aux ring (the caller reads another way). `fd` must stay open until the
/// returned future completes or is dropped; a dropped receive is cancelled, and bytes it took
/// before the cancel landed are lost, as with any dropped read (docs/cancellation.md).
pub fn recv(fd: RawFd) -> Option<Recv> {
    let aux = CURRENT.with(|c| c.borrow().clone())?;
    let (ud, seq) = aux.start_recv(fd)?;
    Some(Recv { aux, ud, seq, finished: false })
}

/// A receive in flight on the aux ring (see [`recv`]).
pub struct Recv {
    aux: Rc<Aux>,
    ud: u64,
    /// Its place among the entries pushed, to tell whether it has reached the kernel.
    seq: u64,
    finished: bool,
}

impl Future for Recv {
    type Output = io::Result<Received>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let done = {
            let mut st = self.aux.st.borrow_mut();
            let slot = &mut st.slots[slot_of(self.ud)];
            match &mut slot.op {
                Op::Done { res, flags } => Some((*res, *flags)),
                Op::Waiting(w) => {
                    if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *w = Some(cx.waker().clone());
                    }
                    return Poll::Pending;
                }
                // A live receive's slot is its own until it finishes; never seen.
                Op::Free | Op::Abandoned => None,
            }
        };
        let Some((res, flags)) = done else {
            self.finished = true;
            return Poll::Ready(Err(io::Error::other("aux ring: receive slot lost")));
        };
        self.finished = true;
        let ud = self.ud;
        self.aux.st.borrow_mut().release(ud);
        Poll::Ready(match (res, cqueue::buffer_select(flags)) {
            (n, Some(bid)) if n > 0 => {
                let ptr = self.aux.bufs.buf(bid);
                Ok(Received::Data(PooledBuf::lent(Chunk { aux: self.aux.clone(), bid, len: n as u32, ptr })))
            }
            (n, Some(bid)) => {
                // A buffer picked and not filled goes straight back.
                self.aux.bufs.give_back(bid);
                if n == 0 {
                    Ok(Received::Eof)
                } else {
                    Err(io::Error::from_raw_os_error(-n))
                }
            }
            (0, None) => Ok(Received::Eof),
            (n, None) if n == -libc::ENOBUFS => Ok(Received::NoBuffers),
            (n, None) if n < 0 => Err(io::Error::from_raw_os_error(-n)),
            (n, None) => Err(io::Error::other(format!("receive of {n} bytes without a buffer"))),
        })
    }
}

impl Drop for Recv {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let cancel = {
            let mut st = self.aux.st.borrow_mut();
            let i = slot_of(self.ud);
            match st.slots[i].op {
                Op::Done { flags, .. } => {
                    if let Some(bid) = cqueue::buffer_select(flags) {
                        self.aux.bufs.give_back(bid);
                    }
                    st.release(self.ud);
                    false
                }
                _ => {
                    // The kernel still has it: cancel, and free the slot on its completion.
                    st.slots[i].op = Op::Abandoned;
                    true
                }
            }
        };
        if cancel {
            let entry = opcode::AsyncCancel::new(self.ud).build().user_data(CANCEL);
            self.aux.push(&entry);
            // The receive names its socket by descriptor number, resolved when it is submitted.
            // The caller may close the socket as soon as this drop returns, and the number can
            // then name another connection's socket: so if the receive has not reached the
            // kernel yet, submit it (and its cancel) now, while the number is still ours.
            if self.seq > self.aux.flushed.get() {
                if let Some(ring) = self.aux.ring.borrow_mut().as_mut() {
                    self.aux.enter(ring, 0);
                }
            }
        }
    }
}

/// Bytes received into a provided buffer; the buffer goes back to the ring when this drops.
struct Chunk {
    aux: Rc<Aux>,
    bid: u16,
    len: u32,
    /// Start of buffer `bid`.
    ptr: *const u8,
}

impl LentBuf for Chunk {
    fn bytes(&self) -> &[u8] {
        // SAFETY: the kernel wrote `len` (≤ BUF_LEN) bytes at the start of buffer `bid`, which
        // is ours alone until `Drop` gives it back to the ring, and whose memory lives as long
        // as the `Aux` this chunk holds.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len as usize) }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        self.aux.bufs.give_back(self.bid);
    }
}

/// A receive's slot. Its `user_data` is the slot index and a generation, so a cancel aimed at
/// a receive that has meanwhile completed cannot hit the next receive in the same slot.
struct Slot {
    generation: u32,
    op: Op,
}

enum Op {
    Free,
    /// In the kernel's hands; the waker of the task awaiting it.
    Waiting(Option<Waker>),
    /// Completed, not yet taken by its future.
    Done {
        res: i32,
        flags: u32,
    },
    /// Its future was dropped while the kernel had it: freed when the completion arrives.
    Abandoned,
}

fn slot_of(ud: u64) -> usize {
    (ud & 0xffff_ffff) as usize
}

struct State {
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Receives the kernel has not completed yet (waiting or abandoned).
    in_flight: usize,
}

impl State {
    /// A free slot, marked waiting; its `user_data`.
    fn take(&mut self) -> u64 {
        let i = self.free.pop().unwrap_or_else(|| {
            self.slots.push(Slot { generation: 0, op: Op::Free });
            self.slots.len() - 1
        });
        let slot = &mut self.slots[i];
        slot.generation = slot.generation.wrapping_add(1);
        slot.op = Op::Waiting(None);
        self.in_flight += 1;
        u64::from(slot.generation) << 32 | i as u64
    }

    fn release(&mut self, ud: u64) {
        let i = slot_of(ud);
        self.slots[i].op = Op::Free;
        self.free.push(i);
    }

    /// Records one completion; returns the waker to wake (after every borrow is released).
    /// A buffer that nobody will take is handed back through `bufs`.
    fn complete(&mut self, ud: u64, res: i32, flags: u32, bufs: &Buffers) -> Option<Waker> {
        if ud == CANCEL {
            return None;
        }
        let i = slot_of(ud);
        let live = self.slots.get(i).is_some_and(|s| u64::from(s.generation) == ud >> 32);
        if !live || cqueue::more(flags) {
            // Not one of ours (or a multishot we never arm): give back whatever it picked.
            if let Some(bid) = cqueue::buffer_select(flags) {
                bufs.give_back(bid);
            }
            return None;
        }
        match std::mem::replace(&mut self.slots[i].op, Op::Done { res, flags }) {
            Op::Waiting(w) => {
                self.in_flight -= 1;
                w
            }
            Op::Abandoned => {
                self.in_flight -= 1;
                if let Some(bid) = cqueue::buffer_select(flags) {
                    bufs.give_back(bid);
                }
                self.release(ud);
                None
            }
            other => {
                // A second completion for a finished receive cannot happen; keep what was.
                self.slots[i].op = other;
                if let Some(bid) = cqueue::buffer_select(flags) {
                    bufs.give_back(bid);
                }
                None
            }
        }
    }
}

/// The ring and its state. Single-threaded: it lives in an `Rc` on the worker's thread, and no
/// borrow is held across an await or a wake.
struct Aux {
    /// `None` once stopped.
    ring: RefCell<Option<IoUring>>,
    st: RefCell<State>,
    bufs: Buffers,
    evfd: OwnedFd,
    /// A submission is queued and the flush task should run.
    flush_wanted: Cell<bool>,
    flusher: Cell<Option<Waker>>,
    /// Entries pushed, and how many of them have reached the kernel.
    pushed: Cell<u64>,
    flushed: Cell<u64>,
    /// The reap and flush tasks still running, and who waits for them to end ([`stop`]).
    tasks: Cell<u8>,
    stopper: Cell<Option<Waker>>,
}

impl Aux {
    fn new() -> Result<Self, AuxError> {
        // Not DEFER_TASKRUN: see `reap`.
        let mut b = IoUring::builder();
        b.setup_single_issuer().setup_coop_taskrun().setup_taskrun_flag();
        let ring = match b.build(ENTRIES) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("aux ring: SINGLE_ISSUER|COOP_TASKRUN refused ({e}); a plain ring");
                IoUring::new(ENTRIES).map_err(AuxError::Ring)?
            }
        };
        // SAFETY: eventfd(2) with valid flags; the result is checked before it is owned.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(AuxError::EventFd(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let evfd = unsafe { OwnedFd::from_raw_fd(fd) };
        ring.submitter().register_eventfd(evfd.as_raw_fd()).map_err(AuxError::EventFd)?;
        let bufs = Buffers::new();
        // SAFETY: the ring memory is page-aligned, holds BUF_COUNT entries, and is freed only
        // after the ring is unregistered (or never, if the kernel did not give everything back;
        // see `shutdown`).
        unsafe { ring.submitter().register_buf_ring(bufs.ring as u64, BUF_COUNT, BUF_GROUP) }
            .map_err(AuxError::BufRing)?;
        for bid in 0..BUF_COUNT {
            bufs.give(bid);
        }
        bufs.publish();
        Ok(Self {
            ring: RefCell::new(Some(ring)),
            st: RefCell::new(State { slots: Vec::new(), free: Vec::new(), in_flight: 0 }),
            bufs,
            evfd,
            flush_wanted: Cell::new(false),
            flusher: Cell::new(None),
            pushed: Cell::new(0),
            flushed: Cell::new(0),
            tasks: Cell::new(0),
            stopper: Cell::new(None),
        })
    }

    /// Queues a receive with buffer selection on `fd`; its `user_data` and push sequence
    /// number, or `None` if stopped.
    fn start_recv(&self, fd: RawFd) -> Option<(u64, u64)> {
        if self.ring.borrow().is_none() {
            return None;
        }
        let ud = self.st.borrow_mut().take();
        let entry = opcode::Recv::new(types::Fd(fd), std::ptr::null_mut(), BUF_LEN as u32)
            .buf_group(BUF_GROUP)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(ud);
        self.push(&entry);
        Some((ud, self.pushed.get()))
    }

    /// Queues an entry and makes sure a flush runs this round. A full queue is submitted at once.
    fn push(&self, entry: &squeue::Entry) {
        let mut guard = self.ring.borrow_mut();
        let Some(ring) = guard.as_mut() else { return };
        // SAFETY (for every push): no entry points at memory the kernel could use after it is
        // freed: a RECV points at no memory of ours (the kernel picks a provided buffer, which
        // is ours again only once its completion is handled), and ASYNC_CANCEL at none.
        while unsafe { ring.submission().push(entry) }.is_err() {
            self.enter(ring, 0);
        }
        self.pushed.set(self.pushed.get() + 1);
        drop(guard);
        if !self.flush_wanted.replace(true) {
            if let Some(w) = self.flusher.take() {
                w.wake();
            }
        }
    }

    /// The reaper's half (the eventfd fired): dispatches the completions the kernel has
    /// posted, drains the eventfd, then looks once more for completions that arrived around the
    /// drain (their signal may be the one just drained), entering the kernel only when it has
    /// queued work of ours to run (`IORING_SQ_TASKRUN`) or overflowed completions to flush.
    ///
    /// The ring runs its completions as ordinary task work (COOP_TASKRUN), on this thread's
    /// next system call, whichever it is (the host's own wait, this drain), and posting a
    /// completion signals the eventfd; so nothing queued can go unseen, and a TASKRUN flag
    /// that is stale (set just after the kernel ran the work it announced) costs one enter,
    /// never a loop. DEFER_TASKRUN would not do here: the kernel signals the eventfd only
    /// when its deferred list goes from empty to non-empty, and a GETEVENTS enter runs at most
    /// 20 items of it (IO_LOCAL_TW_DEFAULT_MAX), so a burst of more completions than that,
    /// with no new ones behind it, would wait unsignalled.
    fn reap(&self) {
        let mut wakers = Vec::new();
        {
            let mut guard = self.ring.borrow_mut();
            let Some(ring) = guard.as_mut() else { return };
            let mut st = self.st.borrow_mut();
            let mut drained = false;
            for _ in 0..16 {
                let run = ring.submission().taskrun() || ring.submission().cq_overflow();
                if run {
                    self.enter(ring, ENTER_GETEVENTS);
                }
                let mut seen = false;
                for cqe in ring.completion() {
                    seen = true;
                    wakers.extend(st.complete(cqe.user_data(), cqe.result(), cqe.flags(), &self.bufs));
                }
                if !drained {
                    self.drain_eventfd();
                    drained = true;
                } else if !run && !seen {
                    break;
                }
            }
        }
        for w in wakers {
            w.wake();
        }
    }

    /// The flusher's half: one `io_uring_enter` that submits every entry queued this round.
    fn submit(&self) {
        let mut guard = self.ring.borrow_mut();
        let Some(ring) = guard.as_mut() else { return };
        if !ring.submission().is_empty() {
            self.enter(ring, 0);
        }
    }

    /// `io_uring_enter` submitting everything queued, with `flags`; an error other than a
    /// transient one is logged (the entries then go with the next enter).
    fn enter(&self, ring: &mut IoUring, flags: u32) {
        let to_submit = ring.submission().len() as u32;
        // SAFETY: a plain io_uring_enter on our own ring without an argument struct; every
        // queued entry's memory stays valid until its completion (see `push`).
        if let Err(e) = unsafe { ring.submitter().enter::<libc::sigset_t>(to_submit, 0, flags, None) } {
            if !matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EINTR | libc::EAGAIN)) {
                tracing::warn!("aux ring: io_uring_enter: {e}");
            }
        }
        if ring.submission().is_empty() {
            self.flushed.set(self.pushed.get());
        }
    }

    fn drain_eventfd(&self) {
        let mut n = 0u64;
        // SAFETY: reads 8 bytes into a u64 we own; the eventfd is non-blocking (EAGAIN is fine).
        unsafe { libc::read(self.evfd.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
    }

    fn signal_eventfd(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a u64 we own to our eventfd.
        unsafe { libc::write(self.evfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Stops the ring: every receive still in flight is cancelled and its completion awaited
    /// (for at most [`QUIESCE`]), then the provided-buffer ring is unregistered and the ring
    /// closed. If the kernel has not given everything back by then, the buffers are leaked
    /// rather than freed under it.
    fn shutdown(&self) {
        let Some(mut ring) = self.ring.borrow_mut().take() else { return };
        let mut wakers = Vec::new();
        {
            let mut st = self.st.borrow_mut();
            let live: Vec<u64> = st
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| matches!(s.op, Op::Waiting(_) | Op::Abandoned))
                .map(|(i, s)| u64::from(s.generation) << 32 | i as u64)
                .collect();
            for ud in live {
                let entry = opcode::AsyncCancel::new(ud).build().user_data(CANCEL);
                // SAFETY: ASYNC_CANCEL points at no memory.
                while unsafe { ring.submission().push(&entry) }.is_err() {
                    self.enter(&mut ring, 0);
                }
            }
            let deadline = Instant::now() + QUIESCE;
            loop {
                for cqe in ring.completion() {
                    wakers.extend(st.complete(cqe.user_data(), cqe.result(), cqe.flags(), &self.bufs));
                }
                if st.in_flight == 0 || Instant::now() >= deadline {
                    break;
                }
                let ts = types::Timespec::from(Duration::from_millis(10));
                let args = types::SubmitArgs::new().timespec(&ts);
                if let Err(e) = ring.submitter().submit_with_args(1, &args) {
                    if !matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)) {
                        tracing::warn!("aux ring: waiting for cancelled receives: {e}");
                        break;
                    }
                }
            }
            if st.in_flight == 0 {
                let _ = ring.submitter().unregister_buf_ring(BUF_GROUP);
            } else {
                tracing::warn!(
                    in_flight = st.in_flight,
                    "aux ring: receives still in the kernel after cancelling; leaking its buffers"
                );
                self.bufs.leak.set(true);
            }
        }
        drop(ring);
        // Receives whose future still exists (a task the engine did not drop) complete with
        // the cancellation's error if they are ever polled again.
        for w in wakers {
            w.wake();
        }
    }
}

impl Drop for Aux {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Counts a reap or flush task out when it ends (or is dropped), and wakes [`stop`].
struct TaskEnd(Rc<Aux>);

impl Drop for TaskEnd {
    fn drop(&mut self) {
        self.0.tasks.set(self.0.tasks.get().saturating_sub(1));
        if let Some(w) = self.0.stopper.take() {
            w.wake();
        }
    }
}

async fn reap_task<W: FdWatch>(aux: Rc<Aux>, watch: W) {
    let _end = TaskEnd(aux.clone());
    while aux.ring.borrow().is_some() {
        if let Err(e) = watch.readable().await {
            tracing::error!("aux ring: waiting on its eventfd: {e}; stopping it (reads take the core's pool)");
            aux.shutdown();
            return;
        }
        aux.reap();
    }
}

async fn flush_task(aux: Rc<Aux>) {
    let _end = TaskEnd(aux.clone());
    while aux.ring.borrow().is_some() {
        poll_fn(|cx| {
            if aux.flush_wanted.replace(false) || aux.ring.borrow().is_none() {
                return Poll::Ready(());
            }
            aux.flusher.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await;
        aux.submit();
    }
}

/// The provided-buffer ring: BUF_COUNT entries (page-aligned, shared with the kernel) and
/// BUF_COUNT buffers of BUF_LEN bytes.
struct Buffers {
    ring: *mut types::BufRingEntry,
    bufs: *mut u8,
    tail: Cell<u16>,
    /// The kernel may still hold some: never free the memory.
    leak: Cell<bool>,
}

impl Buffers {
    fn ring_layout() -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(usize::from(BUF_COUNT) * std::mem::size_of::<types::BufRingEntry>(), 4096)
            .expect("a valid layout")
    }

    fn new() -> Self {
        let layout = Self::ring_layout();
        // SAFETY: a non-zero size; the result is checked for null.
        let ring = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<types::BufRingEntry>();
        if ring.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        let bufs = Box::<[u8]>::new_uninit_slice(usize::from(BUF_COUNT) * BUF_LEN);
        Self { ring, bufs: Box::into_raw(bufs).cast::<u8>(), tail: Cell::new(0), leak: Cell::new(false) }
    }

    fn buf(&self, bid: u16) -> *const u8 {
        // SAFETY: bid < BUF_COUNT, so the offset is inside the buffers' allocation.
        unsafe { self.bufs.add(usize::from(bid) * BUF_LEN) }
    }

    /// Writes buffer `bid` into the next ring entry (the kernel sees it after `publish`).
    fn give(&self, bid: u16) {
        let tail = self.tail.get();
        let idx = usize::from(tail & (BUF_COUNT - 1));
        // SAFETY: idx < BUF_COUNT, inside the ring allocation; the entry at the tail is not one
        // the kernel reads (it reads only entries before the published tail). Only addr, len
        // and bid are written, never the `resv` field that doubles as the tail in entry 0.
        unsafe {
            let e = self.ring.add(idx);
            (*e).set_addr(self.buf(bid) as u64);
            (*e).set_len(BUF_LEN as u32);
            (*e).set_bid(bid);
        }
        self.tail.set(tail.wrapping_add(1));
    }

    fn publish(&self) {
        // SAFETY: `ring` is the first entry of an initialised ring; the tail is a u16 the kernel
        // reads with acquire semantics, so a release store publishes the entries written before.
        unsafe {
            let tail = types::BufRingEntry::tail(self.ring).cast::<AtomicU16>();
            (*tail).store(self.tail.get(), Ordering::Release);
        }
    }

    /// Hands buffer `bid` back to the kernel.
    fn give_back(&self, bid: u16) {
        self.give(bid);
        self.publish();
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        if self.leak.get() {
            return;
        }
        // SAFETY: both allocations were made in `new` with these layouts, the kernel has given
        // every buffer back and the ring is unregistered (else `leak` is set), and no `Chunk`
        // is left: each holds the `Aux` that owns these `Buffers`.
        unsafe {
            std::alloc::dealloc(self.ring.cast(), Self::ring_layout());
            let slice = std::ptr::slice_from_raw_parts_mut(
                self.bufs.cast::<MaybeUninit<u8>>(),
                usize::from(BUF_COUNT) * BUF_LEN,
            );
            drop(Box::from_raw(slice));
        }
    }
}
