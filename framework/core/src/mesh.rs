//! Cross-core messaging: send work to the core that owns the data and await its reply, in the
//! spirit of Seastar's `submit_to`. Each core has a lock-free inbox (crossbeam `SegQueue`)
//! and a doorbell, an AF_UNIX datagram socketpair the owning core awaits with its own
//! runtime's readiness (so every backend wakes natively; see docs/cross-core.md). Replies
//! travel back the same way, so no waker ever crosses a thread.

use std::any::Any;
use std::cell::RefCell;
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};

use crossbeam_queue::SegQueue;

use crate::runtime::{FdWatch, Runtime};
use crate::worker::{Phase, Worker, WorkerLocal};

/// A unit of work delivered to a core. It receives a spawner for that core.
type Job = Box<dyn FnOnce(&dyn Fn(Pin<Box<dyn Future<Output = ()>>>)) + Send>;

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
    queue: SegQueue<Job>,
    notified: AtomicBool,
    closed: AtomicBool,
    ring_fd: OwnedFd,
    wait_fd: OwnedFd,
}

/// The inboxes of every core. Shared (`Arc`) by all workers and the launcher.
pub struct Mesh {
    inboxes: Vec<Inbox>,
}

fn socketpair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid out-array of two ints.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: socketpair succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

impl Mesh {
    /// Inboxes for `cores` workers.
    pub fn new(cores: usize) -> std::io::Result<Arc<Mesh>> {
        let mut inboxes = Vec::with_capacity(cores);
        for _ in 0..cores {
            let (ring_fd, wait_fd) = socketpair()?;
            inboxes.push(Inbox {
                queue: SegQueue::new(),
                notified: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                ring_fd,
                wait_fd,
            });
        }
        Ok(Arc::new(Mesh { inboxes }))
    }

    /// Number of cores.
    pub fn len(&self) -> usize {
        self.inboxes.len()
    }

    /// Whether there are no cores.
    pub fn is_empty(&self) -> bool {
        self.inboxes.is_empty()
    }

    fn post(&self, core: usize, job: Job) -> Result<(), MeshError> {
        let inbox = self.inboxes.get(core).ok_or(MeshError::NoSuchCore(core))?;
        if inbox.closed.load(Ordering::Acquire) {
            return Err(MeshError::Closed(core));
        }
        inbox.queue.push(job);
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
    let b = [1u8];
    // SAFETY: sending one byte from a valid buffer on our own socket. EAGAIN means the
    // doorbell already holds unread bytes, which wakes the target just as well.
    unsafe { libc::send(inbox.ring_fd.as_raw_fd(), b.as_ptr().cast(), 1, libc::MSG_DONTWAIT) };
}

fn drain_doorbell(inbox: &Inbox) {
    let mut b = [0u8; 64];
    loop {
        // SAFETY: receiving into a valid local buffer on our own non-blocking socket.
        let n = unsafe { libc::recv(inbox.wait_fd.as_raw_fd(), b.as_mut_ptr().cast(), b.len(), libc::MSG_DONTWAIT) };
        if n <= 0 {
            break;
        }
    }
}

/// The inbox loop of one worker: runs jobs posted to it and turns shutdown phase changes into
/// the worker's local events. Spawned by the launcher on every worker.
pub(crate) async fn inbox_loop<R: Runtime>(local: Rc<WorkerLocal>) {
    let mesh = local.mesh.clone();
    let inbox = &mesh.inboxes[local.info.index];
    let watch = match R::FdWatch::new(inbox.wait_fd.as_raw_fd()) {
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
        while let Some(job) = inbox.queue.pop() {
            job(&spawn);
        }
        match local.shutdown.phase() {
            Phase::Running => {}
            Phase::Draining => local.draining.fire(),
            Phase::Closing => {
                local.draining.fire();
                local.closing.fire();
            }
        }
        // Stay awake briefly before parking: while `notified` stays set, senders skip the
        // doorbell, and a job that arrives now is picked up on this core's next scheduler round
        // with no syscall on either side (a busy core runs its other tasks in between).
        if poll_window::<R>(inbox).await {
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

/// Yields to the executor, looking at the queue between yields, until a job arrives (true) or
/// the backend's [`Runtime::INBOX_POLL_WINDOW`] passes (false).
async fn poll_window<R: Runtime>(inbox: &Inbox) -> bool {
    if R::INBOX_POLL_WINDOW.is_zero() {
        return false;
    }
    let until = std::time::Instant::now() + R::INBOX_POLL_WINDOW;
    loop {
        crate::task::yield_now().await;
        if !inbox.queue.is_empty() {
            return true;
        }
        if std::time::Instant::now() >= until {
            return false;
        }
    }
}

/// Marks a worker's inbox closed and drops what is queued (each dropped job answers its caller
/// with [`MeshError::Closed`]).
pub(crate) fn close_inbox(mesh: &Mesh, core: usize) {
    let inbox = &mesh.inboxes[core];
    inbox.closed.store(true, Ordering::Release);
    while let Some(job) = inbox.queue.pop() {
        drop(job);
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
        let _ = self.mesh.post(self.home, Box::new(move |_| complete(slot, reply)));
    }
}

impl Drop for ReplyGuard {
    fn drop(&mut self) {
        if !self.sent {
            let slot = self.slot;
            let err = MeshError::Closed(self.target);
            let _ = self.mesh.post(self.home, Box::new(move |_| complete(slot, Err(err))));
        }
    }
}

/// Runs `job` on worker `target` (a worker index, `0..workers`, as
/// [`WorkerInfo::index`](crate::worker::WorkerInfo::index); not a CPU number) and awaits its
/// result here. `job` is sent to the other core;
/// the future it returns runs there (it need not be `Send`); only the result travels back.
pub async fn submit_to<F, Fut, T>(target: usize, job: F) -> Result<T, MeshError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let worker = Worker::current().ok_or(MeshError::NotAWorker)?;
    let mesh = worker.mesh().clone();
    let home = worker.info().index;
    let slot = REPLIES.with(|r| r.borrow_mut().insert(ReplySlot::default()));
    let guard = ReplyGuard { mesh: mesh.clone(), home, target, slot, sent: false };
    let posted = mesh.post(
        target,
        Box::new(move |spawn| {
            spawn(Box::pin(async move {
                let guard = guard;
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
        }),
    );
    if let Err(e) = posted {
        REPLIES.with(|r| r.borrow_mut().remove(slot));
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
