//! Cross-core messaging: send work to the core that owns the data and await its reply, in the
//! spirit of Seastar's `submit_to`. Each core has a lock-free inbox (crossbeam `SegQueue`)
//! and a doorbell, an eventfd the owning core awaits with its own runtime's readiness (so
//! every backend wakes natively; see docs/cross-core.md). Replies travel back the same way, so
//! no waker ever crosses a thread.

use std::any::Any;
use std::cell::RefCell;
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use crossbeam_queue::SegQueue;

use crate::runtime::{FdWatch, Runtime};
use crate::worker::{Phase, Worker, WorkerLocal};

/// A unit of work delivered to a core. It runs in that core's inbox loop and receives a
/// spawner for work that must await.
type Job = Box<dyn FnOnce(&Spawner<'_>) + Send>;

/// Spawns a future as a task of the core running the job.
type Spawner<'a> = dyn Fn(Pin<Box<dyn Future<Output = ()>>>) + 'a;

/// What travels through an inbox.
enum Message {
    /// Work for this core.
    Job(Job),
    /// The answer to a call this core made: the caller's reply slot and the value.
    Reply(usize, Reply),
}

/// Why a cross-core call did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeshError {
    /// No such core in this process.
    #[error("there is no worker {0}")]
    NoSuchCore(usize),
    /// The target (or this) core has stopped.
    #[error("worker {0} has stopped")]
    Closed(usize),
    /// Called outside a corepin worker.
    #[error("cross-core calls need a corepin worker thread")]
    NotAWorker,
    /// The job panicked on the target core.
    #[error("the job panicked on worker {0}")]
    Panicked(usize),
}

struct Inbox {
    queue: SegQueue<Message>,
    notified: AtomicBool,
    closed: AtomicBool,
    /// An eventfd: senders add to it, the owner waits for it to be readable and reads it back
    /// to zero.
    doorbell: OwnedFd,
}

/// The inboxes of every core. Shared (`Arc`) by all workers and the launcher.
pub struct Mesh {
    inboxes: Vec<Inbox>,
    /// How long an idle core's inbox keeps looking before it sleeps
    /// ([`LaunchConfig::inbox_poll`](crate::launcher::LaunchConfig::inbox_poll)).
    poll_window: Duration,
}

fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; a negative result is an error.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: eventfd succeeded, so `fd` is open and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Mesh {
    /// Inboxes for `cores` workers, each looking for messages for `poll_window` once its core
    /// is idle before it sleeps.
    pub fn new(cores: usize, poll_window: Duration) -> std::io::Result<Arc<Mesh>> {
        let mut inboxes = Vec::with_capacity(cores);
        for _ in 0..cores {
            inboxes.push(Inbox {
                queue: SegQueue::new(),
                notified: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                doorbell: eventfd()?,
            });
        }
        Ok(Arc::new(Mesh { inboxes, poll_window }))
    }

    /// Number of cores.
    pub fn len(&self) -> usize {
        self.inboxes.len()
    }

    /// Whether there are no cores.
    pub fn is_empty(&self) -> bool {
        self.inboxes.is_empty()
    }

    fn post(&self, core: usize, msg: Message) -> Result<(), MeshError> {
        let inbox = self.inboxes.get(core).ok_or(MeshError::NoSuchCore(core))?;
        if inbox.closed.load(Ordering::Acquire) {
            return Err(MeshError::Closed(core));
        }
        inbox.queue.push(msg);
        // One doorbell write per sleep of the target: later posters see `notified` set.
        if !inbox.notified.swap(true, Ordering::SeqCst) {
            ring(inbox);
        }
        Ok(())
    }

    /// Wakes a core's inbox loop even if a doorbell is pending (used for phase changes).
    pub(crate) fn wake(&self, core: usize) {
        if let Some(inbox) = self.inboxes.get(core) {
            inbox.notified.store(true, Ordering::SeqCst);
            ring(inbox);
        }
    }

    /// Wakes every core.
    pub(crate) fn wake_all(&self) {
        for i in 0..self.inboxes.len() {
            self.wake(i);
        }
    }
}

fn ring(inbox: &Inbox) {
    let one = 1u64;
    // SAFETY: writing 8 bytes from a valid u64 to our own eventfd. EAGAIN (the counter is at
    // its maximum) means the doorbell is already ringing, which wakes the target just as well.
    unsafe { libc::write(inbox.doorbell.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

fn drain_doorbell(inbox: &Inbox) {
    let mut count = 0u64;
    // SAFETY: reading 8 bytes into a valid u64 from our own non-blocking eventfd; one read
    // resets the counter, and EAGAIN means it was already zero.
    unsafe { libc::read(inbox.doorbell.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
}

/// The inbox loop of one worker: runs jobs posted to it and turns shutdown phase changes into
/// the worker's local events. Spawned by the launcher on every worker.
pub(crate) async fn inbox_loop<R: Runtime>(local: Rc<WorkerLocal>) {
    let mesh = local.mesh.clone();
    let inbox = &mesh.inboxes[local.info.index];
    let watch = match R::FdWatch::new(inbox.doorbell.as_raw_fd()) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(core = local.info.cpu, "cannot watch the inbox doorbell: {e}");
            *local.panic.borrow_mut() = Some(format!("cannot watch the inbox doorbell: {e}"));
            local.failed.fire();
            return;
        }
    };
    let spawn = |fut: Pin<Box<dyn Future<Output = ()>>>| {
        drop(crate::task::spawn::<R, _>(fut));
    };
    loop {
        // Run what has arrived, at most a batch per scheduler round so a flood of messages
        // cannot keep this core's connections waiting.
        let mut more = true;
        for _ in 0..BATCH {
            match inbox.queue.pop() {
                Some(Message::Job(job)) => job(&spawn),
                Some(Message::Reply(slot, reply)) => complete(slot, reply),
                None => {
                    more = false;
                    break;
                }
            }
        }
        if more {
            crate::task::yield_now().await;
            continue;
        }
        match local.shutdown.phase() {
            Phase::Running => {}
            Phase::Draining => local.draining.fire(),
            Phase::Closing => {
                local.draining.fire();
                local.closing.fire();
            }
        }
        // Stay awake while the core is busy anyway, and briefly once it is idle, before
        // parking: while `notified` stays set, senders skip the doorbell, and a message that
        // arrives now is picked up on this core's next scheduler round with no syscall and no
        // interrupt on either side.
        if stay_awake(inbox, mesh.poll_window).await {
            continue;
        }
        inbox.notified.store(false, Ordering::SeqCst);
        if !inbox.queue.is_empty() {
            continue;
        }
        if let Err(e) = watch.readable().await {
            tracing::error!(core = local.info.cpu, "inbox doorbell failed: {e}");
            *local.panic.borrow_mut() = Some(format!("inbox doorbell failed: {e}"));
            local.failed.fire();
            return;
        }
        drain_doorbell(inbox);
    }
}

/// Messages an inbox handles per scheduler round before it lets the core's other tasks run.
const BATCH: usize = 128;

/// A scheduler round at least this long ran other work: the core is busy, so looking at the
/// inbox once per round costs nothing a doorbell would not cost more. An idle round (only this
/// loop runnable) is the engine's poll of its ring, a microsecond or so.
const BUSY_ROUND: Duration = Duration::from_micros(5);

/// Yields to the executor, looking at the queue between yields, until a message arrives (true)
/// or the core has been idle for `window` (false). Rounds in which the core ran other work do
/// not count as idle: a busy core keeps its inbox awake, and senders to it ring no doorbell.
async fn stay_awake(inbox: &Inbox, window: Duration) -> bool {
    let mut last = Instant::now();
    let mut idle_since = last;
    loop {
        crate::task::yield_now().await;
        if !inbox.queue.is_empty() {
            return true;
        }
        let now = Instant::now();
        if now - last >= BUSY_ROUND {
            idle_since = now;
        } else if now - idle_since >= window {
            return false;
        }
        last = now;
    }
}

/// Marks a worker's inbox closed and drops what is queued (each dropped job answers its caller
/// with [`MeshError::Closed`]).
pub(crate) fn close_inbox(mesh: &Mesh, core: usize) {
    let inbox = &mesh.inboxes[core];
    inbox.closed.store(true, Ordering::Release);
    while let Some(msg) = inbox.queue.pop() {
        drop(msg);
    }
}

// ---- replies ---------------------------------------------------------------------------

type Reply = Result<Box<dyn Any + Send>, MeshError>;

#[derive(Default)]
struct ReplySlot {
    value: Option<Reply>,
    waker: Option<Waker>,
    abandoned: bool,
}

thread_local! {
    static REPLIES: RefCell<slab::Slab<ReplySlot>> = const { RefCell::new(slab::Slab::new()) };
}

fn complete(slot: usize, reply: Reply) {
    REPLIES.with(|r| {
        let mut r = r.borrow_mut();
        let Some(s) = r.get_mut(slot) else { return };
        if s.abandoned {
            r.remove(slot);
            return;
        }
        s.value = Some(reply);
        if let Some(w) = s.waker.take() {
            w.wake();
        }
    });
}

/// Sends the reply home, or `Closed` if the job is dropped before it answers.
struct ReplyGuard {
    mesh: Arc<Mesh>,
    home: usize,
    target: usize,
    slot: usize,
    sent: bool,
}

impl ReplyGuard {
    fn send(mut self, reply: Reply) {
        self.sent = true;
        let slot = self.slot;
        let _ = self.mesh.post(self.home, Message::Reply(slot, reply));
    }
}

impl Drop for ReplyGuard {
    fn drop(&mut self) {
        if !self.sent {
            let slot = self.slot;
            let err = MeshError::Closed(self.target);
            let _ = self.mesh.post(self.home, Message::Reply(slot, Err(err)));
        }
    }
}

/// Runs `job` on worker `target` (a worker index, `0..workers`, as
/// [`WorkerInfo::index`](crate::worker::WorkerInfo::index); not a CPU number) and awaits its
/// result here. `job` is sent to the other core;
/// the future it returns runs there as a task (it need not be `Send`); only the result travels
/// back.
pub async fn submit_to<F, Fut, T>(target: usize, job: F) -> Result<T, MeshError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    call(target, move |guard: ReplyGuard| -> Job {
        Box::new(move |spawn: &Spawner<'_>| {
            spawn(Box::pin(async move {
                match crate::task::catch_panic(job()).await {
                    Ok(value) => guard.send(Ok(Box::new(value))),
                    Err(msg) => {
                        let target = guard.target;
                        guard.send(Err(MeshError::Panicked(target)));
                        // The panic still takes this worker down, as any task panic does.
                        panic!("{msg}");
                    }
                }
            }))
        })
    })
    .await
}

/// Runs the closure `f` on worker `target` right in its inbox loop, with no task and no
/// reply: fire and forget, for hand-offs the sender need not wait for (a datagram passed to the
/// core that owns its connection, say). Nothing is awaited, so it can be called from a `poll`
/// function. `Err` when `target` does not exist or has stopped (then `f` is dropped unrun), or
/// when not called on a worker. A panic in `f` takes `target`'s worker down, as in
/// [`submit_to`].
pub fn post_to<F>(target: usize, f: F) -> Result<(), MeshError>
where
    F: FnOnce() + Send + 'static,
{
    let worker = Worker::current().ok_or(MeshError::NotAWorker)?;
    worker.mesh().post(target, Message::Job(Box::new(move |_: &Spawner<'_>| f())))
}

/// Runs the closure `f` on worker `target` right in its inbox loop, with no task and no
/// scheduler round, and awaits its result here: the path of
/// [`Sharded::invoke_on`](crate::sharded::Sharded::invoke_on), whose closures do not await.
pub(crate) async fn run_on<F, T>(target: usize, f: F) -> Result<T, MeshError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    call(target, move |guard: ReplyGuard| -> Job {
        Box::new(move |_: &Spawner<'_>| match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(value) => guard.send(Ok(Box::new(value))),
            Err(payload) => {
                let target = guard.target;
                guard.send(Err(MeshError::Panicked(target)));
                // The panic still takes this worker down (through its inbox loop), as any
                // task panic does.
                std::panic::resume_unwind(payload);
            }
        })
    })
    .await
}

/// Posts the job `make` builds around the reply guard to `target` and awaits the reply.
async fn call<T: Send + 'static>(target: usize, make: impl FnOnce(ReplyGuard) -> Job) -> Result<T, MeshError> {
    let worker = Worker::current().ok_or(MeshError::NotAWorker)?;
    let mesh = worker.mesh().clone();
    let home = worker.info().index;
    let slot = REPLIES.with(|r| r.borrow_mut().insert(ReplySlot::default()));
    let guard = ReplyGuard { mesh: mesh.clone(), home, target, slot, sent: false };
    if let Err(e) = mesh.post(target, Message::Job(make(guard))) {
        // The refused job was dropped, and its guard has posted `Closed` to this core for the
        // slot: leave the slot to that reply (which frees it), so no later call reuses the
        // slot and takes the stale answer.
        REPLIES.with(|r| {
            if let Some(s) = r.borrow_mut().get_mut(slot) {
                s.abandoned = true;
            }
        });
        return Err(e);
    }
    let waiter = ReplyWait { slot, done: false };
    let reply = waiter.await;
    reply.map(|b| *b.downcast::<T>().expect("a reply slot holds the type its caller asked for"))
}

struct ReplyWait {
    slot: usize,
    done: bool,
}

impl Future for ReplyWait {
    type Output = Reply;
    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Reply> {
        let slot = self.slot;
        let out = REPLIES.with(|r| {
            let mut r = r.borrow_mut();
            let s = r.get_mut(slot).expect("reply slot exists while awaited");
            match s.value.take() {
                Some(v) => {
                    r.remove(slot);
                    Poll::Ready(v)
                }
                None => {
                    s.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        });
        if out.is_ready() {
            self.done = true;
        }
        out
    }
}

impl Drop for ReplyWait {
    fn drop(&mut self) {
        if !self.done {
            let slot = self.slot;
            REPLIES.with(|r| {
                let mut r = r.borrow_mut();
                if let Some(s) = r.get_mut(slot) {
                    if s.value.is_some() {
                        r.remove(slot);
                    } else {
                        s.abandoned = true;
                    }
                }
            });
        }
    }
}
