//! The auxiliary ring: a per-core `io_uring` of corepin's own beside the host engine's, for
//! the operations the engine does not have (docs/aux-ring.md). Today those are:
//! * a multishot receive into a provided-buffer ring behind `read_pooled` ([`Receiver`]): the
//!   kernel picks a buffer only when data arrives, so a connection waiting for data holds none,
//!   and one armed RECV per stream serves many reads;
//! * a file read into one of the core's registered (fixed) buffers behind `read_pooled_at`
//!   (`IORING_OP_READ_FIXED`): the buffers' pages are pinned once, when they are registered,
//!   not on every read. How many are registered is bounded by the worker's share of
//!   RLIMIT_MEMLOCK; with too small a share there are none, the report says so, and reads
//!   take the core pool's chunks.
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
//! * a multishot ACCEPT behind a listener's `accept` ([`Acceptor`]): armed once, it delivers
//!   every connection the listener takes until it ends, instead of one ACCEPT per connection.
//!
//! A multishot receive keeps filling ring buffers while the service is not reading, so a
//! stream's is bounded twice: the kernel ends it after [`RECV_TOTAL_MAX`] bytes (Linux 6.17+),
//! and corepin cancels it when [`RECV_QUEUE_MAX`] results wait untaken; the next read arms it
//! again. Kernels without multishot receive get one single-shot receive per `read_pooled`.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use corepin_core::buf::{BufResult, IoBufMut};
use corepin_core::caps::Support;
use corepin_core::io::{AsyncReadRent, CancelToken};
use corepin_core::pool::{LentBuf, PooledBuf};
use corepin_core::runtime::{FdWatch, Runtime};
use io_uring_aux::{cqueue, opcode, squeue, types, IoUring};

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
/// Accepted connections queued for a listener before its multishot ACCEPT is cancelled, so a
/// service that stops accepting (at its connection cap) leaves the rest in the listen backlog
/// rather than in this queue. It is armed again once the queue is taken.
const ACCEPT_QUEUE_MAX: usize = 64;
/// Results a stream's multishot RECV may queue (each holding a buffer of the ring) before it is
/// cancelled, so a connection whose service is not reading stops taking the core's buffers and
/// its bytes wait in the socket instead. Armed again when the service reads the queue empty.
const RECV_QUEUE_MAX: usize = 4;
/// Bytes after which the kernel itself ends a stream's multishot RECV (`sqe->optlen`, Linux
/// 6.17+): a burst can fill many buffers before the cancel for a full queue lands, so the
/// kernel stops at about [`RECV_QUEUE_MAX`] full buffers' worth, and the next read arms again.
const RECV_TOTAL_MAX: u32 = (RECV_QUEUE_MAX * BUF_LEN) as u32;
/// How long stopping waits for the kernel to give back what is still in flight.
const QUIESCE: Duration = Duration::from_secs(1);
/// Bytes per registered (fixed) buffer: one chunk of the file server's read + write path.
pub const FIXED_LEN: usize = corepin_core::pool::CHUNK_SIZE;
/// Registered buffers per core at most (2 MiB); fewer when the worker's locked-memory share is
/// smaller. A buffer is held from the read until the service drops it (after writing it to a
/// client), so this many file reads per core can be in that state at once before reads take
/// the core pool's chunks.
pub const FIXED_MAX: usize = 16;
/// Locked memory kept out of the registered buffers' share. For a process without
/// CAP_IPC_LOCK the kernel charges RLIMIT_MEMLOCK for the rings too (measured on 6.18: a ring
/// of 1024 entries is about 100 KiB), so this covers the engine's ring, this one and the
/// provided-buffer ring's entries.
const PINNED_BESIDES: usize = 512 * 1024;

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
    /// eventfd, its provided-buffer ring and as many registered buffers as `memlock_budget`
    /// bytes of locked memory allow (at most [`FIXED_MAX`]), on the calling thread: the
    /// worker's own.
    pub fn new(memlock_budget: usize) -> Result<Self, AuxError> {
        Aux::new(memlock_budget, true).map(Self)
    }

    /// The same without the provided-buffer ring, for an engine that has its own (compio):
    /// only the registered buffers behind `read_pooled_at`.
    pub fn for_files(memlock_budget: usize) -> Result<Self, AuxError> {
        Aux::new(memlock_budget, false).map(Self)
    }

    /// Why the ring has no registered buffers, if it has none.
    pub fn no_fixed(&self) -> Option<&str> {
        self.0.no_fixed.as_deref()
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

/// For a backend's engine setup on core `cpu`: builds the aux ring with `memlock_budget`
/// bytes of locked memory for registered buffers (before the engine runs the service), or
/// says why not, logged once, in words for the capability report.
pub fn build_for_core(cpu: usize, memlock_budget: usize) -> Result<AuxRing, &'static str> {
    AuxRing::new(memlock_budget).map_err(|e| missing(cpu, &e))
}

/// [`build_for_core`] for an engine with a provided-buffer ring of its own: the aux ring
/// brings only the registered buffers behind `read_pooled_at` ([`AuxRing::for_files`]).
pub fn build_for_core_files(cpu: usize, memlock_budget: usize) -> Result<AuxRing, &'static str> {
    AuxRing::for_files(memlock_budget).map_err(|e| missing(cpu, &e))
}

/// What a backend hosting the aux ring lacks, in words for the capability report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Missing {
    /// Why there is no aux ring (so no provided-buffer rings), if there is none.
    pub ring: Option<&'static str>,
    /// The aux ring was built without a provided-buffer ring ([`AuxRing::for_files`]).
    pub files_only: bool,
    /// Why there are no registered buffers, if there are none.
    pub fixed: Option<&'static str>,
}

impl Missing {
    /// No aux ring at all, for `why`.
    pub fn everything(why: &'static str) -> Self {
        Self { ring: Some(why), fixed: Some(why), files_only: false }
    }
}

/// The capability report's note on what the aux ring does for this engine, if anything.
pub fn note(missing: Missing) -> Option<String> {
    if missing.files_only {
        return missing.fixed.is_none().then(|| {
            format!(
                "file reads into registered buffers ({} KiB each) on corepin's auxiliary ring (docs/aux-ring.md)",
                FIXED_LEN / 1024
            )
        });
    }
    match (missing.ring, missing.fixed) {
        (None, None) => Some(format!(
            "multishot accepts, provided-buffer receives and file reads into registered buffers ({} KiB each) on \
             corepin's auxiliary ring (docs/aux-ring.md)",
            FIXED_LEN / 1024
        )),
        (None, Some(_)) => {
            Some("multishot accepts and provided-buffer receives on corepin's auxiliary ring (docs/aux-ring.md)".into())
        }
        _ => None,
    }
}

/// For a backend, inside its engine: installs the ring [`build_for_core`] made, and returns
/// what the engine lacks for the capability report.
pub fn install_for_core<R: Runtime>(cpu: usize, built: Result<AuxRing, &'static str>) -> Missing {
    match built {
        Ok(aux) => {
            let files_only = !aux.0.bufs.is_some();
            let fixed = aux.no_fixed().map(|why| {
                tracing::info!(cpu, "no registered buffers: {why}; file reads take chunks of the core's pool");
                leak(why)
            });
            match aux.install::<R>() {
                Ok(()) => Missing { ring: None, fixed, files_only },
                Err(e) => Missing::everything(missing(cpu, &e)),
            }
        }
        Err(why) => Missing::everything(why),
    }
}

fn leak(why: &str) -> &'static str {
    // Once per engine start, and only when something is missing.
    Box::leak(why.to_string().into_boxed_str())
}

fn missing(cpu: usize, e: &AuxError) -> &'static str {
    tracing::warn!(cpu, "{e}; read_pooled and read_pooled_at take buffers of the core's pool");
    leak(&e.to_string())
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

/// `read_pooled` for a backend that hosts the aux ring, on a stream whose descriptor is `fd`
/// and whose [`Receiver`] `rx` gives: the stream's multishot RECV into the core's
/// provided-buffer ring (armed by the first call, kept armed across calls), so a waiting
/// connection holds no buffer and a dropped call loses nothing. Where the kernel refuses
/// multishot receive (before 6.0), one single-shot receive per call into the same ring.
/// Without a running aux ring (an epoll driver, or it could not be set up), or when every
/// buffer is lent out (`ENOBUFS`: nothing was consumed), the core pool's fallback reads from
/// `stream` instead (through its `read`, which serves what the multishot RECV queued first).
pub async fn read_pooled<S: AsyncReadRent + ?Sized>(
    stream: &mut S,
    rx: fn(&mut S) -> &mut Receiver,
    fd: RawFd,
) -> io::Result<PooledBuf> {
    let receiver = rx(stream);
    if let Some(rest) = receiver.rest.take() {
        return Ok(*rest);
    }
    let got = match poll_fn(|cx| receiver.poll_next(fd, true, cx)).await {
        Some(got) => Some(got?),
        None => match recv(fd) {
            Some(recv) => Some(recv.await?),
            None => None,
        },
    };
    match got {
        Some(Received::Data(buf)) => return Ok(buf),
        Some(Received::Eof) => return Ok(PooledBuf::end_of_stream()),
        Some(Received::NoBuffers) => {
            tracing::trace!("provided-buffer ring empty; read_pooled takes a buffer of the core's pool")
        }
        None => {}
    }
    // Boxed: this future lives inside every connection task waiting in `read_pooled`, and the
    // engine's read (with the receiver's own path in front of it) is far larger than the
    // receive above; an idle connection should not carry it. It costs one allocation on a
    // read that could not use the ring.
    Box::pin(corepin_core::pool::read_fallback(stream)).await
}

/// The capability report's multishot receive for a backend whose `read_pooled` is the aux
/// ring's ([`Receiver`]).
pub fn multishot_recv(missing: Missing) -> Support {
    multishot_accept(missing)
}

/// A stream's receives for a backend that hosts the aux ring: one multishot RECV into the
/// core's provided-buffer ring, armed by the first `read_pooled` and again whenever it ends
/// (end of stream, `ENOBUFS`, an error, or its queue held [`RECV_QUEUE_MAX`] results nobody
/// took), instead of one RECV per read. Its results wait here in order, so a dropped read
/// loses nothing. Once it is armed, the stream's plain reads take their bytes from it too
/// ([`read`](Self::read), copying), since a receive of the engine's own would race it for the
/// socket's bytes. Dropping it cancels the RECV and gives its queued buffers back; the socket
/// must outlive it (declare it before the socket).
#[derive(Default)]
pub struct Receiver {
    state: RecvState,
    /// What is left of a buffer a plain read took part of (boxed: rare, and the receiver lives
    /// in every stream).
    rest: Option<Box<PooledBuf>>,
}

#[derive(Default)]
enum RecvState {
    /// Nothing armed.
    #[default]
    Idle,
    /// A multishot RECV on the aux ring: its ring, `user_data` and push sequence number, and
    /// whether it was armed with the kernel's byte limit.
    Armed(Rc<Aux>, u64, u64, bool),
    /// No aux ring on this thread, or the kernel refused multishot receive: reads go to the
    /// engine (and `read_pooled` to single-shot receives).
    Off,
}

impl Receiver {
    /// The next result of the multishot RECV, arming it first when `arm` and nothing is armed;
    /// `None` when nothing is armed or queued (not arming), or this thread cannot (no aux
    /// ring, or the kernel refused): then the caller reads another way.
    fn poll_next(&mut self, fd: RawFd, arm: bool, cx: &mut Context<'_>) -> Poll<Option<io::Result<Received>>> {
        loop {
            let (aux, ud, capped) = match &self.state {
                RecvState::Off => return Poll::Ready(None),
                RecvState::Idle if !arm => return Poll::Ready(None),
                RecvState::Idle => {
                    let started = CURRENT.with(|c| c.borrow().clone()).and_then(|aux| {
                        let capped = aux.recv_limit.get();
                        let (ud, seq) = aux.start_recv_multi(fd, capped)?;
                        Some(RecvState::Armed(aux, ud, seq, capped))
                    });
                    self.state = started.unwrap_or(RecvState::Off);
                    continue;
                }
                RecvState::Armed(aux, ud, _, capped) => (Rc::clone(aux), *ud, *capped),
            };
            match aux.poll_multi(ud, cx) {
                Next::Pending => return Poll::Pending,
                Next::Ended => self.state = RecvState::Idle,
                Next::Item((res, flags)) if res == -libc::EINVAL && cqueue::buffer_select(flags).is_none() => {
                    aux.abandon_multi(ud, 0);
                    if capped {
                        // Kernels before 6.17 refuse the byte limit (the field was
                        // `file_index`, which a RECV must leave zero): arm without it.
                        tracing::debug!("aux ring: no byte limit for multishot receive on this kernel");
                        aux.recv_limit.set(false);
                        self.state = RecvState::Idle;
                        continue;
                    }
                    // Kernels before 6.0 refuse the multishot flag: single-shot receives from now on.
                    self.state = RecvState::Off;
                    return Poll::Ready(None);
                }
                Next::Item((res, flags)) => {
                    if aux.multi_ended(ud) {
                        // Its last result: free the slot now rather than at the next read.
                        aux.abandon_multi(ud, 0);
                        self.state = RecvState::Idle;
                    }
                    return Poll::Ready(Some(received(&aux, res, flags)));
                }
            }
        }
    }

    /// Whether a plain read must come here ([`read`](Self::read)): a multishot RECV is armed,
    /// or results or bytes of it wait.
    pub fn active(&self) -> bool {
        self.rest.is_some() || matches!(self.state, RecvState::Armed(..))
    }

    /// A backend's plain `read` (with `cancel`, its `read_cancelable`) on a stream whose
    /// receiver is [`active`](Self::active): up to `buf`'s capacity of the bytes the multishot
    /// RECV delivered, in order, copied; the rest of a buffer waits for the next read. Waiting
    /// stops when `cancel` fires with nothing taken. `Err(buf)` once nothing is armed or
    /// queued: the caller reads through its engine.
    pub async fn read<B: IoBufMut>(
        &mut self,
        fd: RawFd,
        mut buf: B,
        cancel: Option<&CancelToken>,
    ) -> Result<BufResult<usize, B>, B> {
        let total = buf.bytes_total();
        if total == 0 {
            return Err(buf);
        }
        let chunk = match self.rest.take() {
            Some(rest) => *rest,
            None => {
                let mut cancelled = cancel.map(CancelToken::cancelled);
                let next = poll_fn(|cx| {
                    if let Poll::Ready(r) = self.poll_next(fd, false, cx) {
                        return Poll::Ready(Ok(r));
                    }
                    // Nothing was taken: the results stay queued, so stopping loses nothing.
                    if let Some(c) = cancelled.as_mut() {
                        if Pin::new(c).poll(cx).is_ready() {
                            return Poll::Ready(Err(()));
                        }
                    }
                    Poll::Pending
                })
                .await;
                match next {
                    Err(()) => return Ok(BufResult(Err(corepin_core::io::cancelled_error()), buf)),
                    Ok(None) | Ok(Some(Ok(Received::NoBuffers))) => return Err(buf),
                    Ok(Some(Ok(Received::Eof))) => return Ok(BufResult(Ok(0), buf)),
                    Ok(Some(Err(e))) => return Ok(BufResult(Err(e), buf)),
                    Ok(Some(Ok(Received::Data(chunk)))) => chunk,
                }
            }
        };
        let n = chunk.len().min(total);
        // SAFETY: `stable_mut_ptr` is valid for writes of `bytes_total` bytes (IoBufMut
        // contract) and `n` is no more than that; the source is another allocation (a ring
        // buffer or a pool buffer), so the two do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(chunk.as_ptr(), buf.stable_mut_ptr(), n);
            buf.set_init(n);
        }
        if n < chunk.len() {
            let mut rest = chunk;
            rest.advance(n);
            self.rest = Some(Box::new(rest));
        }
        Ok(BufResult(Ok(n), buf))
    }
}

/// For a backend's plain `read` (with `cancel`, its `read_cancelable`) on a stream with the
/// [`Receiver`] `rx`: while the stream's multishot RECV is armed or has bytes waiting, the read
/// it must make instead of the engine's ([`Receiver::read`]), boxed; otherwise `Err(buf)`, and
/// the caller reads through its engine. Boxed because it is needed only where a service mixes
/// `read_pooled` with plain reads, while the caller's future sits in every task that ever
/// reads: inline, this path would make each of them larger (it made Monoio's echo task 160
/// bytes larger, one mimalloc size class up).
/// Use it through [`queued_first!`](crate::queued_first).
#[allow(clippy::type_complexity)]
pub fn read_queued<'a, B: IoBufMut>(
    rx: &'a mut Receiver,
    fd: RawFd,
    buf: B,
    cancel: Option<&'a CancelToken>,
) -> Result<Pin<Box<dyn Future<Output = Result<BufResult<usize, B>, B>> + 'a>>, B> {
    if !rx.active() {
        return Err(buf);
    }
    Ok(Box::pin(rx.read(fd, buf, cancel)))
}

/// In a backend's `read`/`read_cancelable` (an `async fn` returning `BufResult`):
/// `let buf = queued_first!(&mut self.rx, fd, buf, cancel);` returns the receiver's read when
/// the stream's multishot RECV must serve it ([`read_queued`]), and otherwise gives `buf` back
/// for the engine's read.
#[macro_export]
macro_rules! queued_first {
    ($rx:expr, $fd:expr, $buf:expr, $cancel:expr) => {
        match $crate::aux::read_queued($rx, $fd, $buf, $cancel) {
            Ok(queued) => match queued.await {
                Ok(done) => return done,
                Err(buf) => buf,
            },
            Err(buf) => buf,
        }
    };
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let RecvState::Armed(aux, ud, seq, _) = &self.state {
            aux.abandon_multi(*ud, *seq);
        }
    }
}

/// The capability report's multishot accept for a backend whose listeners accept through the
/// aux ring ([`Acceptor`]).
pub fn multishot_accept(missing: Missing) -> Support {
    match missing.ring {
        None if !missing.files_only => Support::Native,
        None => Support::Absent("the auxiliary ring of this backend only reads files"),
        Some(why) => Support::Absent(why),
    }
}

/// Closes a descriptor a multishot ACCEPT delivered that nobody will take (`res` < 0: none).
fn close_accepted(res: i32) {
    if res >= 0 {
        // SAFETY: the kernel just created this descriptor for us and nobody else has seen it.
        drop(unsafe { OwnedFd::from_raw_fd(res) });
    }
}

/// A listener's accepts for a backend that hosts the aux ring: one multishot ACCEPT, armed on
/// the first [`accept`](Self::accept) and again whenever it ends (an error such as `EMFILE`,
/// or its queue was full), instead of one ACCEPT per connection (docs/aux-ring.md has what it
/// saves). One task accepts from a listener at a time. Dropping it cancels the ACCEPT and
/// closes connections delivered but not taken. The listener must outlive it.
pub struct Acceptor {
    state: RefCell<AcceptorState>,
}

enum AcceptorState {
    /// Not armed yet, or its last ACCEPT ended.
    Idle,
    /// A multishot ACCEPT on the aux ring: its ring, `user_data` and push sequence number.
    Armed(Rc<Aux>, u64, u64),
    /// No aux ring on this thread, or the kernel refused multishot accept: the engine accepts.
    Off,
}

impl Default for Acceptor {
    fn default() -> Self {
        Self { state: RefCell::new(AcceptorState::Idle) }
    }
}

impl Acceptor {
    /// The next connection `listener` takes, as a standard stream with its peer's address, or
    /// `None` when this thread has no running aux ring (or the kernel has no multishot accept):
    /// then the caller accepts through its engine, from now on.
    pub async fn accept(&self, listener: RawFd) -> Option<io::Result<(std::net::TcpStream, std::net::SocketAddr)>> {
        let res = poll_fn(|cx| self.poll_accept(listener, cx)).await?;
        Some(res.and_then(|fd| {
            let stream = std::net::TcpStream::from(fd);
            // A multishot accept cannot return addresses (one buffer for every completion).
            let peer = stream.peer_addr()?;
            Ok((stream, peer))
        }))
    }

    fn poll_accept(&self, listener: RawFd, cx: &mut Context<'_>) -> Poll<Option<io::Result<OwnedFd>>> {
        let mut state = self.state.borrow_mut();
        loop {
            let (aux, ud) = match &*state {
                AcceptorState::Off => return Poll::Ready(None),
                AcceptorState::Idle => {
                    let Some(aux) = CURRENT.with(|c| c.borrow().clone()) else {
                        *state = AcceptorState::Off;
                        return Poll::Ready(None);
                    };
                    match aux.start_accept(listener) {
                        Some((ud, seq)) => *state = AcceptorState::Armed(aux, ud, seq),
                        None => *state = AcceptorState::Off,
                    }
                    continue;
                }
                AcceptorState::Armed(aux, ud, _) => (Rc::clone(aux), *ud),
            };
            match aux.poll_multi(ud, cx).map(|(res, _)| res) {
                Next::Pending => return Poll::Pending,
                Next::Ended => *state = AcceptorState::Idle,
                // Kernels before 5.19 refuse the multishot flag: the engine accepts from now on.
                Next::Item(res) if res == -libc::EINVAL => {
                    *state = AcceptorState::Off;
                    drop(state);
                    self.disarm(&aux, ud);
                    return Poll::Ready(None);
                }
                Next::Item(res) if res < 0 => return Poll::Ready(Some(Err(io::Error::from_raw_os_error(-res)))),
                Next::Item(fd) => {
                    // SAFETY: the kernel created this descriptor for this listener's accept;
                    // it is taken from the queue once, so nothing else owns it.
                    return Poll::Ready(Some(Ok(unsafe { OwnedFd::from_raw_fd(fd) })));
                }
            }
        }
    }

    fn disarm(&self, aux: &Aux, ud: u64) {
        // Its seq no longer matters: the listener stays open (this value does not own it).
        aux.abandon_multi(ud, 0);
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        if let AcceptorState::Armed(aux, ud, seq) = &*self.state.borrow() {
            aux.abandon_multi(*ud, *seq);
        }
    }
}

/// The capability report's provided-buffer rings for a backend that hosts the aux ring.
pub fn buffer_rings(missing: Missing) -> Support {
    match missing.ring {
        None => Support::Native,
        Some(why) => Support::Absent(why),
    }
}

/// The capability report's registered buffers for a backend that hosts the aux ring.
pub fn registered_buffers(missing: Missing) -> Support {
    match missing.fixed {
        None => Support::Native,
        Some(why) => Support::Absent(why),
    }
}

/// `read_pooled_at` for a backend that hosts the aux ring: up to `len` bytes at `pos` of
/// `file` (whose descriptor is `fd`) by `IORING_OP_READ_FIXED` into one of the core's
/// registered buffers (at most [`FIXED_LEN`] bytes). Without a running aux ring, without
/// registered buffers, or with every one lent out, the core pool's fallback reads through the
/// engine instead.
pub async fn read_pooled_at<F: corepin_core::runtime::File>(
    file: &F,
    fd: RawFd,
    pos: u64,
    len: usize,
) -> io::Result<PooledBuf> {
    if len > 0 {
        if let Some(read) = read_fixed(fd, pos, len) {
            return read.await;
        }
    }
    corepin_core::pool::read_at_fallback(file, pos, len).await
}

/// Starts a read of up to `len` bytes at `pos` of `fd` into one of the core's registered
/// buffers, or `None` when there is no running aux ring or no free registered buffer. `fd`
/// must stay open until the returned future completes or is dropped.
pub fn read_fixed(fd: RawFd, pos: u64, len: usize) -> Option<ReadFixed> {
    let aux = CURRENT.with(|c| c.borrow().clone())?;
    let (ud, seq, idx) = aux.start_read_fixed(fd, pos, len)?;
    Some(ReadFixed { aux, ud, seq, idx, finished: false })
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
        let Some((res, flags)) = std::task::ready!(self.aux.poll_slot(self.ud, cx)) else {
            self.finished = true;
            return Poll::Ready(Err(io::Error::other("aux ring: receive slot lost")));
        };
        self.finished = true;
        Poll::Ready(received(&self.aux, res, flags))
    }
}

/// `entry` with the `optlen` field of its SQE set, which the io-uring crate does not expose for
/// RECV (a multishot receive's total byte limit, Linux 6.17+).
fn with_optlen(entry: squeue::Entry, optlen: u32) -> squeue::Entry {
    /// Where `optlen` sits in `struct io_uring_sqe` (a union with `splice_fd_in`,
    /// `file_index` and `addr_len`: include/uapi/linux/io_uring.h).
    const OPTLEN: usize = 44;
    // SAFETY: `squeue::Entry` is `#[repr(C)]` around the kernel's 64-byte `io_uring_sqe` and
    // nothing else, so it has the size and layout of `[u8; 64]`; every byte pattern is a valid
    // SQE value for Rust (plain integers), and the kernel checks the fields it reads.
    let mut raw: [u8; 64] = unsafe { std::mem::transmute(entry) };
    raw[OPTLEN..OPTLEN + 4].copy_from_slice(&optlen.to_ne_bytes());
    // SAFETY: as above, back to the same type.
    unsafe { std::mem::transmute(raw) }
}

/// What the completion of a receive into the provided-buffer ring (`res`, `flags`) delivered.
fn received(aux: &Rc<Aux>, res: i32, flags: u32) -> io::Result<Received> {
    match (res, cqueue::buffer_select(flags)) {
        (n, Some(bid)) if n > 0 => {
            let ptr = aux.bufs.buf(bid);
            Ok(Received::Data(PooledBuf::lent(Chunk { aux: aux.clone(), held: Held::Ring(bid), len: n as u32, ptr })))
        }
        (n, Some(bid)) => {
            // A buffer picked and not filled goes straight back.
            aux.bufs.give_back(bid);
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
    }
}

impl Drop for Recv {
    fn drop(&mut self) {
        if !self.finished {
            self.aux.abandon(self.ud, self.seq);
        }
    }
}

/// A read into a registered buffer in flight on the aux ring (see [`read_fixed`]).
pub struct ReadFixed {
    aux: Rc<Aux>,
    ud: u64,
    seq: u64,
    /// The registered buffer it reads into.
    idx: u16,
    finished: bool,
}

impl Future for ReadFixed {
    type Output = io::Result<PooledBuf>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let res = std::task::ready!(self.aux.poll_slot(self.ud, cx)).map(|(res, _)| res);
        self.finished = true;
        let idx = self.idx;
        Poll::Ready(match res {
            Some(n) if n > 0 => {
                let ptr = self.aux.fixed.buf(idx);
                Ok(PooledBuf::lent(Chunk { aux: self.aux.clone(), held: Held::Fixed(idx), len: n as u32, ptr }))
            }
            other => {
                self.aux.fixed.give_back(idx);
                match other {
                    Some(0) => Ok(PooledBuf::end_of_stream()),
                    Some(n) => Err(io::Error::from_raw_os_error(-n)),
                    None => Err(io::Error::other("aux ring: read slot lost")),
                }
            }
        })
    }
}

impl Drop for ReadFixed {
    fn drop(&mut self) {
        if !self.finished {
            self.aux.abandon(self.ud, self.seq);
        }
    }
}

/// Which of the core's buffers a [`Chunk`] holds.
#[derive(Clone, Copy)]
enum Held {
    /// Buffer `bid` of the provided-buffer ring.
    Ring(u16),
    /// Registered buffer `idx`.
    Fixed(u16),
}

/// Bytes the kernel put in one of the core's buffers (a provided one by a receive, a
/// registered one by a file read); the buffer goes back when this drops.
struct Chunk {
    aux: Rc<Aux>,
    held: Held,
    len: u32,
    /// Start of the buffer.
    ptr: *const u8,
}

impl LentBuf for Chunk {
    fn bytes(&self) -> &[u8] {
        // SAFETY: the kernel wrote `len` bytes (no more than the buffer's size) at the start of
        // the buffer, which is ours alone until `Drop` gives it back, and whose memory lives
        // as long as the `Aux` this chunk holds.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len as usize) }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        match self.held {
            Held::Ring(bid) => self.aux.bufs.give_back(bid),
            Held::Fixed(idx) => self.aux.fixed.give_back(idx),
        }
    }
}

/// A receive's slot. Its `user_data` is the slot index and a generation, so a cancel aimed at
/// a receive that has meanwhile completed cannot hit the next receive in the same slot.
struct Slot {
    generation: u32,
    op: Op,
    /// The registered buffer a READ_FIXED in this slot reads into: given back when the
    /// completion of an abandoned read arrives.
    fixed: Option<u16>,
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
    /// A multishot ACCEPT ([`Acceptor`]) or RECV ([`Receiver`]): the results not taken yet
    /// (`res` and `flags` of each completion, in order: a descriptor or a received length, or
    /// `-errno`), the waker of the task taking them, whether the kernel still has it (its last
    /// completion has not come), and whether a cancel was sent for it (queue full).
    Multi {
        kind: Multi,
        queue: VecDeque<(i32, u32)>,
        waker: Option<Waker>,
        armed: bool,
        cancelling: bool,
    },
    /// A multishot operation whose owner is gone: what it still delivers is dropped (a
    /// descriptor closed, a buffer given back), and the slot is freed with its last completion.
    MultiAbandoned(Multi),
}

/// Which multishot operation a slot holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Multi {
    Accept,
    Recv,
}

impl Multi {
    /// Results queued before the operation is cancelled, so that an owner that stops taking
    /// them leaves the rest in the kernel (the listen backlog, the socket).
    fn queue_max(self) -> usize {
        match self {
            Multi::Accept => ACCEPT_QUEUE_MAX,
            Multi::Recv => RECV_QUEUE_MAX,
        }
    }

    /// Drops a result nobody will take: closes an accepted descriptor, gives a buffer back.
    fn discard(self, res: i32, flags: u32, bufs: &Buffers) {
        match self {
            Multi::Accept => close_accepted(res),
            Multi::Recv => {
                if let Some(bid) = cqueue::buffer_select(flags) {
                    bufs.give_back(bid);
                }
            }
        }
    }
}

/// How a multishot operation stands, for its owner ([`Acceptor`], [`Receiver`]).
enum Next<T> {
    /// Its next result: for an ACCEPT a descriptor or `-errno`; for a RECV `res` and `flags`.
    Item(T),
    /// Nothing queued and the kernel no longer has it: the slot was freed; arm another.
    Ended,
    Pending,
}

impl<T> Next<T> {
    fn map<U>(self, f: impl FnOnce(T) -> U) -> Next<U> {
        match self {
            Next::Item(t) => Next::Item(f(t)),
            Next::Ended => Next::Ended,
            Next::Pending => Next::Pending,
        }
    }
}

fn slot_of(ud: u64) -> usize {
    (ud & 0xffff_ffff) as usize
}

struct State {
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Receives the kernel has not completed yet (waiting or abandoned).
    in_flight: usize,
    /// Multishot ACCEPTs and RECVs whose queue just filled up: cancelled once the borrows that
    /// completions are handled under are released (see `Aux::cancel_full`).
    full: Vec<u64>,
}

impl State {
    /// A free slot, marked waiting; its `user_data`.
    fn take(&mut self) -> u64 {
        let i = self.free.pop().unwrap_or_else(|| {
            self.slots.push(Slot { generation: 0, op: Op::Free, fixed: None });
            self.slots.len() - 1
        });
        let slot = &mut self.slots[i];
        slot.generation = slot.generation.wrapping_add(1);
        slot.op = Op::Waiting(None);
        self.in_flight += 1;
        u64::from(slot.generation) << 32 | i as u64
    }

    /// A free slot for a multishot operation, armed; its `user_data`.
    fn take_multi(&mut self, kind: Multi) -> u64 {
        let ud = self.take();
        self.slots[slot_of(ud)].op =
            Op::Multi { kind, queue: VecDeque::new(), waker: None, armed: true, cancelling: false };
        ud
    }

    fn release(&mut self, ud: u64) {
        let i = slot_of(ud);
        self.slots[i].op = Op::Free;
        self.slots[i].fixed = None;
        self.free.push(i);
    }

    /// Records one completion; returns the waker to wake (after every borrow is released).
    /// A buffer that nobody will take is handed back through `bufs` (or `fixed`).
    fn complete(&mut self, ud: u64, res: i32, flags: u32, bufs: &Buffers, fixed: &Fixed) -> Option<Waker> {
        if ud == CANCEL {
            return None;
        }
        let i = slot_of(ud);
        let live = self.slots.get(i).is_some_and(|s| u64::from(s.generation) == ud >> 32);
        if live {
            let last = !cqueue::more(flags);
            match &mut self.slots[i].op {
                Op::Multi { kind, queue, waker, armed, cancelling } => {
                    // The end of a cancel this side asked for (queue full) is no result.
                    if !(last && res == -libc::ECANCELED && cqueue::buffer_select(flags).is_none()) {
                        queue.push_back((res, flags));
                    }
                    // Nobody is taking them (a service at its connection cap, or not reading):
                    // the rest wait in the kernel instead.
                    if !last && *armed && !*cancelling && queue.len() >= kind.queue_max() {
                        *cancelling = true;
                        self.full.push(ud);
                    }
                    if last {
                        *armed = false;
                        self.in_flight -= 1;
                    }
                    return waker.take();
                }
                Op::MultiAbandoned(kind) => {
                    kind.discard(res, flags, bufs);
                    if last {
                        self.in_flight -= 1;
                        self.release(ud);
                    }
                    return None;
                }
                _ => {}
            }
        }
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
                if let Some(idx) = self.slots[i].fixed {
                    fixed.give_back(idx);
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
    /// The registered buffers (none when the locked-memory share is too small).
    fixed: Fixed,
    /// Why there are no registered buffers, if there are none.
    no_fixed: Option<String>,
    evfd: OwnedFd,
    /// A submission is queued and the flush task should run.
    flush_wanted: Cell<bool>,
    flusher: Cell<Option<Waker>>,
    /// Entries pushed, and how many of them have reached the kernel.
    pushed: Cell<u64>,
    flushed: Cell<u64>,
    /// The reap and flush tasks still running, and who waits for them to end ([`stop`]).
    tasks: Cell<u8>,
    /// Whether multishot RECVs are armed with the kernel's byte limit ([`RECV_TOTAL_MAX`]);
    /// off once the kernel refused it.
    recv_limit: Cell<bool>,
    stopper: Cell<Option<Waker>>,
}

impl Aux {
    fn new(memlock_budget: usize, recv: bool) -> Result<Self, AuxError> {
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
        let bufs = if recv { Buffers::new() } else { Buffers::none() };
        if recv {
            // SAFETY: the ring memory is page-aligned, holds BUF_COUNT entries, and is freed
            // only after the ring is unregistered (or never, if the kernel did not give
            // everything back; see `shutdown`).
            unsafe { ring.submitter().register_buf_ring_with_flags(bufs.ring as u64, BUF_COUNT, BUF_GROUP, 0) }
                .map_err(AuxError::BufRing)?;
            for bid in 0..BUF_COUNT {
                bufs.give(bid);
            }
            bufs.publish();
        }
        let (fixed, no_fixed) = Fixed::register(&ring, memlock_budget);
        Ok(Self {
            ring: RefCell::new(Some(ring)),
            st: RefCell::new(State { slots: Vec::new(), free: Vec::new(), in_flight: 0, full: Vec::new() }),
            bufs,
            fixed,
            no_fixed,
            evfd,
            flush_wanted: Cell::new(false),
            flusher: Cell::new(None),
            pushed: Cell::new(0),
            flushed: Cell::new(0),
            tasks: Cell::new(0),
            recv_limit: Cell::new(true),
            stopper: Cell::new(None),
        })
    }

    /// Queues a receive with buffer selection on `fd`; its `user_data` and push sequence
    /// number, or `None` if stopped.
    fn start_recv(&self, fd: RawFd) -> Option<(u64, u64)> {
        if self.ring.borrow().is_none() || !self.bufs.is_some() {
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

    /// Queues a multishot ACCEPT on the listening socket `fd`; its `user_data` and push
    /// sequence number, or `None` if stopped.
    fn start_accept(&self, fd: RawFd) -> Option<(u64, u64)> {
        if self.ring.borrow().is_none() {
            return None;
        }
        let ud = self.st.borrow_mut().take_multi(Multi::Accept);
        let entry = opcode::AcceptMulti::new(types::Fd(fd)).flags(libc::SOCK_CLOEXEC).build().user_data(ud);
        self.push(&entry);
        Some((ud, self.pushed.get()))
    }

    /// Queues a multishot RECV on the stream socket `fd`, selecting buffers of the core's
    /// provided-buffer ring; its `user_data` and push sequence number, or `None` if stopped or
    /// the ring has no provided buffers.
    fn start_recv_multi(&self, fd: RawFd, capped: bool) -> Option<(u64, u64)> {
        if self.ring.borrow().is_none() || !self.bufs.is_some() {
            return None;
        }
        let ud = self.st.borrow_mut().take_multi(Multi::Recv);
        // RecvMulti sets IOSQE_BUFFER_SELECT itself.
        let entry = opcode::RecvMulti::new(types::Fd(fd), BUF_GROUP).build().user_data(ud);
        let entry = if capped { with_optlen(entry, RECV_TOTAL_MAX) } else { entry };
        self.push(&entry);
        Some((ud, self.pushed.get()))
    }

    /// The next result of the multishot operation in slot `ud`, keeping the task's waker while
    /// there is none.
    fn poll_multi(&self, ud: u64, cx: &mut Context<'_>) -> Next<(i32, u32)> {
        let mut st = self.st.borrow_mut();
        let out = match &mut st.slots[slot_of(ud)].op {
            Op::Multi { queue, waker, armed, .. } => match queue.pop_front() {
                Some(item) => Next::Item(item),
                None if *armed => {
                    if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *waker = Some(cx.waker().clone());
                    }
                    Next::Pending
                }
                None => Next::Ended,
            },
            // Not a multishot slot (cannot happen): say it ended, so a new one is armed.
            _ => return Next::Ended,
        };
        if matches!(out, Next::Ended) {
            st.release(ud);
        }
        out
    }

    /// Whether the multishot operation in slot `ud` has nothing queued and has ended (its next
    /// poll says [`Next::Ended`]).
    fn multi_ended(&self, ud: u64) -> bool {
        matches!(&self.st.borrow().slots[slot_of(ud)].op, Op::Multi { queue, armed: false, .. } if queue.is_empty())
    }

    /// The owner of the multishot operation in slot `ud` is gone: what it did not take is
    /// dropped (descriptors closed, buffers given back), and if the kernel still has it, it is
    /// cancelled (submitted at once if it has not reached the kernel yet, as in
    /// [`abandon`](Self::abandon): the socket's number may be reused as soon as this returns)
    /// and its slot freed with its last completion.
    fn abandon_multi(&self, ud: u64, seq: u64) {
        let cancel = {
            let mut st = self.st.borrow_mut();
            let i = slot_of(ud);
            let Op::Multi { kind, .. } = st.slots[i].op else { return };
            let op = std::mem::replace(&mut st.slots[i].op, Op::MultiAbandoned(kind));
            let Op::Multi { queue, armed, .. } = op else { return };
            for (res, flags) in queue {
                kind.discard(res, flags, &self.bufs);
            }
            if !armed {
                st.release(ud);
            }
            armed
        };
        if cancel {
            self.push(&opcode::AsyncCancel::new(ud).build().user_data(CANCEL));
            if seq > self.flushed.get() {
                if let Some(ring) = self.ring.borrow_mut().as_mut() {
                    self.enter(ring, 0);
                }
            }
        }
    }

    /// Cancels the multishot ACCEPTs and RECVs whose queues filled up while completions were
    /// handled.
    fn cancel_full(&self) {
        let full = std::mem::take(&mut self.st.borrow_mut().full);
        for ud in full {
            self.push(&opcode::AsyncCancel::new(ud).build().user_data(CANCEL));
        }
    }

    /// Queues a READ_FIXED of up to `len` bytes at `pos` of `fd` into a free registered
    /// buffer; its `user_data`, push sequence number and buffer, or `None` if stopped or no
    /// registered buffer is free.
    fn start_read_fixed(&self, fd: RawFd, pos: u64, len: usize) -> Option<(u64, u64, u16)> {
        if self.ring.borrow().is_none() {
            return None;
        }
        let idx = self.fixed.take()?;
        let ud = {
            let mut st = self.st.borrow_mut();
            let ud = st.take();
            st.slots[slot_of(ud)].fixed = Some(idx);
            ud
        };
        let len = len.min(FIXED_LEN) as u32;
        let entry = opcode::ReadFixed::new(types::Fd(fd), self.fixed.buf(idx).cast_mut(), len, idx)
            .offset(pos)
            .build()
            .user_data(ud);
        self.submit_inline(&entry);
        Some((ud, self.pushed.get(), idx))
    }

    /// Submits `entry` (with whatever else is queued) at once, with the eventfd's signal off,
    /// and dispatches the completions that are there when the kernel returns. A read of pages
    /// in the page cache completes inside the submission, so it is ready at its first poll,
    /// without a round through the flush task, the eventfd and the reap task (which cost as
    /// much CPU as the registered buffer saves; docs/aux-ring.md). A read that has to wait for
    /// the device completes later and signals the eventfd as usual; so does any completion
    /// posted after the signal is back on, and those posted while it was off are dispatched
    /// here.
    fn submit_inline(&self, entry: &squeue::Entry) {
        let mut wakers = Vec::new();
        {
            let mut guard = self.ring.borrow_mut();
            let Some(ring) = guard.as_mut() else { return };
            // SAFETY: as for every push (see `push`).
            while unsafe { ring.submission().push(entry) }.is_err() {
                self.enter(ring, 0);
            }
            self.pushed.set(self.pushed.get() + 1);
            ring.completion().disable_eventfd();
            self.enter(ring, 0);
            ring.completion().enable_eventfd();
            let mut st = self.st.borrow_mut();
            for cqe in ring.completion() {
                wakers.extend(st.complete(cqe.user_data(), cqe.result(), cqe.flags(), &self.bufs, &self.fixed));
            }
        }
        self.cancel_full();
        for w in wakers {
            w.wake();
        }
    }

    /// Polls the operation in slot `ud` for its future: pending (with the task's waker kept)
    /// while the kernel has it; once it completed, its result and flags, with the slot freed.
    /// `None` if the slot holds nothing of it (cannot happen: a live operation's slot is its
    /// own until its future finishes or drops).
    fn poll_slot(&self, ud: u64, cx: &mut Context<'_>) -> Poll<Option<(i32, u32)>> {
        let mut st = self.st.borrow_mut();
        let done = match &mut st.slots[slot_of(ud)].op {
            Op::Done { res, flags } => Some((*res, *flags)),
            Op::Waiting(w) => {
                if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *w = Some(cx.waker().clone());
                }
                return Poll::Pending;
            }
            Op::Free | Op::Abandoned | Op::Multi { .. } | Op::MultiAbandoned(_) => None,
        };
        if done.is_some() {
            st.release(ud);
        }
        Poll::Ready(done)
    }

    /// A receive or read whose future was dropped before it finished: if it completed, its
    /// buffer goes back now; otherwise it is cancelled, and its slot (and buffer) are freed
    /// when the kernel's completion arrives.
    fn abandon(&self, ud: u64, seq: u64) {
        let cancel = {
            let mut st = self.st.borrow_mut();
            let i = slot_of(ud);
            match st.slots[i].op {
                Op::Done { flags, .. } => {
                    if let Some(bid) = cqueue::buffer_select(flags) {
                        self.bufs.give_back(bid);
                    }
                    if let Some(idx) = st.slots[i].fixed {
                        self.fixed.give_back(idx);
                    }
                    st.release(ud);
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
            let entry = opcode::AsyncCancel::new(ud).build().user_data(CANCEL);
            self.push(&entry);
            // The operation names its descriptor by number, resolved when it is submitted. The
            // caller may close the descriptor as soon as this drop returns, and the number can
            // then name another connection's socket or file: so if the operation has not
            // reached the kernel yet, submit it (and its cancel) now, while the number is
            // still ours.
            if seq > self.flushed.get() {
                if let Some(ring) = self.ring.borrow_mut().as_mut() {
                    self.enter(ring, 0);
                }
            }
        }
    }

    /// Queues an entry and makes sure a flush runs this round. A full queue is submitted at once.
    fn push(&self, entry: &squeue::Entry) {
        let mut guard = self.ring.borrow_mut();
        let Some(ring) = guard.as_mut() else { return };
        // SAFETY (for every push): no entry points at memory the kernel could use after it is
        // freed: a RECV points at no memory of ours (the kernel picks a provided buffer, which
        // is ours again only once its completion is handled), a READ_FIXED at a registered
        // buffer that is its slot's alone until the completion is handled (and that lives as
        // long as the ring), and ASYNC_CANCEL at none.
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
                    wakers.extend(st.complete(cqe.user_data(), cqe.result(), cqe.flags(), &self.bufs, &self.fixed));
                }
                if !drained {
                    self.drain_eventfd();
                    drained = true;
                } else if !run && !seen {
                    break;
                }
            }
        }
        self.cancel_full();
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

    /// Stops the ring: every receive or read still in flight is cancelled and its completion awaited
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
                .filter(|(_, s)| {
                    matches!(
                        s.op,
                        Op::Waiting(_) | Op::Abandoned | Op::MultiAbandoned(_) | Op::Multi { armed: true, .. }
                    )
                })
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
                    wakers.extend(st.complete(cqe.user_data(), cqe.result(), cqe.flags(), &self.bufs, &self.fixed));
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
                if self.bufs.is_some() {
                    let _ = ring.submitter().unregister_buf_ring(BUF_GROUP);
                }
                if self.fixed.count > 0 {
                    let _ = ring.submitter().unregister_buffers();
                }
            } else {
                tracing::warn!(
                    in_flight = st.in_flight,
                    "aux ring: operations still in the kernel after cancelling; leaking its buffers"
                );
                self.bufs.leak.set(true);
                self.fixed.leak.set(true);
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

    /// No provided-buffer ring (an engine with its own): nothing allocated, never registered.
    fn none() -> Self {
        Self { ring: std::ptr::null_mut(), bufs: std::ptr::null_mut(), tail: Cell::new(0), leak: Cell::new(false) }
    }

    fn is_some(&self) -> bool {
        !self.ring.is_null()
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
        if self.leak.get() || !self.is_some() {
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

/// The core's registered (fixed) buffers: `count` buffers of [`FIXED_LEN`] bytes in one
/// page-aligned allocation, registered with the ring as one iovec each (so a buffer's index is
/// its `buf_index`), and a free list.
struct Fixed {
    base: *mut u8,
    count: usize,
    free: RefCell<Vec<u16>>,
    /// The kernel may still write into some: never free the memory.
    leak: Cell<bool>,
}

impl Fixed {
    fn layout(count: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(count * FIXED_LEN, 4096).expect("a valid layout")
    }

    fn none() -> Self {
        Self { base: std::ptr::null_mut(), count: 0, free: RefCell::new(Vec::new()), leak: Cell::new(false) }
    }

    /// Registers as many buffers as `budget` bytes of locked memory allow (at most
    /// [`FIXED_MAX`]); with none, says why.
    fn register(ring: &IoUring, budget: usize) -> (Self, Option<String>) {
        let count = (budget.saturating_sub(PINNED_BESIDES) / FIXED_LEN).min(FIXED_MAX);
        if count == 0 {
            return (
                Self::none(),
                Some(format!(
                    "the worker's share of RLIMIT_MEMLOCK ({} KiB) leaves no room for one registered buffer of {} KiB \
                     beside the rings ({} KiB); raise RLIMIT_MEMLOCK",
                    budget / 1024,
                    FIXED_LEN / 1024,
                    PINNED_BESIDES / 1024
                )),
            );
        }
        // The share is an estimate (what else of the process is locked is not known here), so
        // when the kernel refuses for lack of locked memory, ask for half as many.
        let mut count = count;
        loop {
            match Self::try_register(ring, count) {
                Ok(fixed) => return (fixed, None),
                Err(e) if e.raw_os_error() == Some(libc::ENOMEM) && count > 1 => count /= 2,
                Err(e) => {
                    let hint = if e.raw_os_error() == Some(libc::ENOMEM) {
                        " (locked memory: RLIMIT_MEMLOCK is too low for a user without CAP_IPC_LOCK)"
                    } else {
                        ""
                    };
                    let why =
                        format!("registering {} KiB of fixed buffers failed: {e}{hint}", count * FIXED_LEN / 1024);
                    return (Self::none(), Some(why));
                }
            }
        }
    }

    /// Allocates `count` buffers and registers them with `ring`.
    fn try_register(ring: &IoUring, count: usize) -> io::Result<Self> {
        let layout = Self::layout(count);
        // SAFETY: a non-zero size (count > 0); the result is checked for null. Zeroed, so the
        // pages exist (registration pins them) and never expose old heap contents.
        let base = unsafe { std::alloc::alloc_zeroed(layout) };
        if base.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        let iovecs: Vec<libc::iovec> = (0..count)
            // SAFETY: i < count, so each buffer lies inside the allocation.
            .map(|i| libc::iovec { iov_base: unsafe { base.add(i * FIXED_LEN) }.cast(), iov_len: FIXED_LEN })
            .collect();
        // SAFETY: every iovec points into our allocation, which stays allocated until the
        // buffers are unregistered in `shutdown` (or forever, if the kernel might still use it).
        match unsafe { ring.submitter().register_buffers(&iovecs) } {
            Ok(()) => {
                let free = RefCell::new((0..count as u16).rev().collect());
                Ok(Self { base, count, free, leak: Cell::new(false) })
            }
            Err(e) => {
                // SAFETY: allocated just above with this layout; the kernel refused it.
                unsafe { std::alloc::dealloc(base, layout) };
                Err(e)
            }
        }
    }

    fn buf(&self, idx: u16) -> *const u8 {
        // SAFETY: idx < count, so the offset is inside the allocation.
        unsafe { self.base.add(usize::from(idx) * FIXED_LEN) }
    }

    fn take(&self) -> Option<u16> {
        self.free.borrow_mut().pop()
    }

    fn give_back(&self, idx: u16) {
        self.free.borrow_mut().push(idx);
    }
}

impl Drop for Fixed {
    fn drop(&mut self) {
        if self.count == 0 || self.leak.get() {
            return;
        }
        // SAFETY: allocated in `register` with this layout; the kernel has completed every
        // read (else `leak` is set) and the ring that registered it is closed, and no
        // `Chunk` of it is left: each holds the `Aux` that owns this.
        unsafe { std::alloc::dealloc(self.base, Self::layout(self.count)) };
    }
}
