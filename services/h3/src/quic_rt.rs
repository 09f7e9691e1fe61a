//! quinn's pluggable runtime (`quinn::Runtime`) written once over corepin's runtime contract,
//! so one `quinn::Endpoint` runs on each core of every backend: timers are `R::sleep`, tasks
//! are `corepin_core::task::spawn` on the core's executor, and the UDP socket is the core's
//! `R::UdpSocket` with quinn-udp doing the syscalls on its descriptor (sendmsg with GSO,
//! recvmmsg with GRO, ECN, the destination address) and `UdpSocket::readable`/`writable`
//! saying when to try again.
//!
//! The socket also does the forwarding half of connection steering (`crate::steer`): a
//! received datagram whose connection ID names another core is handed to that core before this
//! core's endpoint sees it, and datagrams handed here by other cores are received first.
//!
//! Owns: the adapter types only. Must not touch: quinn's state, or anything of another core.
//!
//! # Why the `Send` wrappers are sound here
//! quinn's traits ask for `Send + Sync` objects (it was written for work-stealing executors),
//! while a core's engine futures, sockets and timers are `!Send` (they hold `Rc`s of the
//! engine). Each of those values is kept inside a [`SendWrapper`], which records the thread
//! that made it and *panics* (never touches the value) if it is dereferenced or dropped on
//! another thread, so a mistake is a panic, not a data race. No mistake happens in this crate:
//! every endpoint is built on its worker thread, and everything quinn derives from it (the
//! endpoint driver, connection drivers, timers, pollers, `Connection` and stream handles) is
//! created, polled and dropped by tasks of that core's executor; nothing of a core's endpoint
//! is handed to another thread. [`CoreRuntime::spawn`] asserts the thread as well, so a quinn
//! object moved elsewhere that tried to start a task there would panic instead of starting it
//! on a foreign executor. quinn's own locks (`Arc<Mutex<_>>` inside the endpoint and each
//! connection) are then only ever taken by one thread, uncontended.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::ThreadId;
use std::time::Instant;

use corepin_core::runtime::UdpSocket as _;
use corepin_core::worker::CoreCounters;
use corepin_core::{Runtime, Sharded};
use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncTimer, AsyncUdpSocket, UdpPoller};
use send_wrapper::SendWrapper;

use crate::metrics::H3Metrics;
use crate::steer;

type LocalFuture<T> = Pin<Box<dyn Future<Output = T>>>;

/// quinn's runtime for one core running engine `R`. Made on the worker thread; every call
/// that starts something on the executor checks it is still on that thread.
pub struct CoreRuntime<R: Runtime> {
    owner: ThreadId,
    _runtime: PhantomData<fn() -> R>,
}

impl<R: Runtime> CoreRuntime<R> {
    /// The runtime of the core whose worker thread calls this.
    pub fn here() -> Self {
        Self { owner: std::thread::current().id(), _runtime: PhantomData }
    }

    fn on_owner(&self) -> bool {
        std::thread::current().id() == self.owner
    }
}

impl<R: Runtime> fmt::Debug for CoreRuntime<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoreRuntime").field("engine", &R::NAME).field("owner", &self.owner).finish()
    }
}

impl<R: Runtime> quinn::Runtime for CoreRuntime<R> {
    fn new_timer(&self, deadline: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(CoreTimer::<R>::new(deadline))
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        // quinn spawns its endpoint and connection drivers from code running on this core; a
        // call from elsewhere means a quinn object left its core, which this design forbids.
        assert!(self.on_owner(), "a quinn task was spawned off its core ({}); see quic_rt.rs", R::NAME);
        // corepin's spawn: a panic in a quinn driver is reported to the worker, which stops
        // (quinn's state behind that driver would be poisoned for every connection).
        drop(corepin_core::task::spawn::<R, _>(future));
    }

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        if !self.on_owner() {
            return Err(io::Error::other("a core's UDP socket can only be adopted on its own worker thread"));
        }
        Ok(Arc::new(CoreUdpSocket::<R>::adopt(socket)?))
    }
}

// ---- timers ----------------------------------------------------------------------------

struct TimerState {
    deadline: Instant,
    /// The engine's sleep toward `deadline` (or toward an earlier one: it is re-armed when it
    /// fires early). Made on the first poll after a change.
    sleep: Option<LocalFuture<()>>,
}

/// A quinn timer over `R::sleep`.
struct CoreTimer<R: Runtime> {
    state: SendWrapper<TimerState>,
    // `fn() -> R` keeps the timer `Send` whatever `R` is; `R` names only the engine.
    _runtime: PhantomData<fn() -> R>,
}

impl<R: Runtime> fmt::Debug for CoreTimer<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoreTimer").field("engine", &R::NAME).finish_non_exhaustive()
    }
}

impl<R: Runtime> AsyncTimer for CoreTimer<R> {
    fn reset(self: Pin<&mut Self>, deadline: Instant) {
        let st = &mut *self.get_mut().state;
        // quinn pushes its timers out on almost every packet. A later deadline keeps the sleep
        // already armed (it fires early and is re-armed for the rest), so the common reset
        // costs no allocation and no timer operation in the engine.
        if deadline < st.deadline {
            st.sleep = None;
        }
        st.deadline = deadline;
    }

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let st = &mut *self.get_mut().state;
        loop {
            // An armed sleep ends no later than the deadline (`reset` drops it when the
            // deadline moves earlier), so while it has not fired the deadline has not passed:
            // no clock read. quinn polls each connection's timer on every poll of its driver.
            if let Some(sleep) = st.sleep.as_mut() {
                match sleep.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    // Fired for an earlier deadline (or rounded short): look at the clock.
                    Poll::Ready(()) => st.sleep = None,
                }
            }
            let now = Instant::now();
            if now >= st.deadline {
                return Poll::Ready(());
            }
            st.sleep = Some(Box::pin(R::sleep(st.deadline - now)));
        }
    }
}

impl<R: Runtime> CoreTimer<R> {
    fn new(deadline: Instant) -> Self {
        Self { state: SendWrapper::new(TimerState { deadline, sleep: None }), _runtime: PhantomData }
    }
}

// ---- UDP -------------------------------------------------------------------------------

/// Wakes every task that waits for the socket to become writable: one engine wait serves
/// all of them (several of the core's connections may be blocked on a full send buffer at
/// once, and some engines keep only one waiter per direction of a descriptor).
#[derive(Default)]
struct WakeAll {
    wakers: Mutex<Vec<Waker>>,
}

impl WakeAll {
    fn register(&self, waker: &Waker) {
        let mut list = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
        if !list.iter().any(|w| w.will_wake(waker)) {
            list.push(waker.clone());
        }
    }
    fn wake_all(&self) {
        let list = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|e| e.into_inner()));
        list.into_iter().for_each(Waker::wake);
    }
}

impl Wake for WakeAll {
    fn wake(self: Arc<Self>) {
        self.wake_all();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.wake_all();
    }
}

/// The core-local half of the socket: the engine's socket and the waits on it.
struct UdpIo<R: Runtime> {
    socket: Rc<R::UdpSocket>,
    /// The wait for readability the endpoint driver is parked on, kept across polls.
    readable: std::cell::RefCell<Option<LocalFuture<io::Result<()>>>>,
    /// The last receive returned fewer datagrams than it had room for, so the socket's queue
    /// was empty when it returned: the next receive waits for readability first instead of
    /// making a syscall that would most likely fail with `EAGAIN`.
    drained: std::cell::Cell<bool>,
    /// The one wait for writability, shared by every poller.
    writable: std::cell::RefCell<Option<LocalFuture<io::Result<()>>>>,
    write_waiters: Arc<WakeAll>,
    /// The last send met a full socket buffer (`EAGAIN`), and no wait for writability has
    /// ended since. Until it does, pollers need not wait: the socket is taken to be writable.
    blocked: std::cell::Cell<bool>,
}

impl<R: Runtime> UdpIo<R> {
    /// Arms the engine's wait for readability, which `poll_recv` polls from then on.
    fn arm_readable(&self) {
        let socket = Rc::clone(&self.socket);
        *self.readable.borrow_mut() = Some(Box::pin(async move { socket.readable().await }));
    }
}

/// A datagram passed from the core it reached to the core that owns its connection, with what
/// the kernel said about it (source and destination address, ECN).
struct Forwarded {
    meta: RecvMeta,
    data: Vec<u8>,
}

/// One core's queue of datagrams forwarded to it, and the endpoint waiting for them.
#[derive(Default)]
pub struct ForwardInbox {
    queue: RefCell<VecDeque<Forwarded>>,
    waker: RefCell<Option<Waker>>,
}

impl ForwardInbox {
    fn push(&self, datagram: Forwarded) {
        self.queue.borrow_mut().push_back(datagram);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

/// The forwarding of one core: which core it is, every core's inbox, the counters.
pub struct Forwarding {
    /// This core's index.
    pub core: usize,
    /// The number of cores (the modulus of the connection IDs' routing byte).
    pub cores: usize,
    /// Every core's inbox.
    pub inboxes: Sharded<ForwardInbox>,
    /// Where forwarded datagrams are counted.
    pub metrics: Arc<H3Metrics>,
}

/// [`Forwarding`] on its core, with the core's own inbox at hand.
struct LocalForwarding {
    cfg: Forwarding,
    inbox: Rc<ForwardInbox>,
}

impl LocalForwarding {
    /// Moves datagrams forwarded to this core into quinn's buffers; how many.
    fn take_in(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> usize {
        let mut queue = self.inbox.queue.borrow_mut();
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let Some(d) = queue.pop_front() else { break };
            if d.data.len() > bufs[n].len() {
                continue; // cannot happen with quinn's buffers (64 KiB each); dropped if it did
            }
            bufs[n][..d.data.len()].copy_from_slice(&d.data);
            meta[n] = RecvMeta { len: d.data.len(), stride: d.data.len(), ..d.meta };
            n += 1;
        }
        if n > 0 {
            CoreCounters::add(&self.cfg.metrics.core(self.cfg.core).forwarded_in, n as u64);
        }
        n
    }

    /// Hands every received datagram whose connection ID names another core to that core, and
    /// takes it out of what this core's endpoint will see (a GRO batch is split by segment).
    fn send_out(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta], n: usize) {
        let (core, cores) = (self.cfg.core, self.cfg.cores);
        for (buf, m) in bufs.iter_mut().zip(meta.iter_mut()).take(n) {
            let stride = m.stride.max(1);
            // The common case: nothing in this batch belongs elsewhere.
            if buf[..m.len].chunks(stride).all(|seg| steer::owner(seg, cores).is_none_or(|o| o == core)) {
                continue;
            }
            let mut kept = 0;
            let mut at = 0;
            while at < m.len {
                let end = (at + stride).min(m.len);
                match steer::owner(&buf[at..end], cores) {
                    Some(owner) if owner != core => {
                        let d = Forwarded { meta: *m, data: buf[at..end].to_vec() };
                        let sent = self.cfg.inboxes.post_on(owner, move |inbox| inbox.push(d)).is_ok();
                        if sent {
                            CoreCounters::add(&self.cfg.metrics.core(core).forwarded_out, 1);
                        }
                    }
                    _ => {
                        buf.copy_within(at..end, kept);
                        kept += end - at;
                    }
                }
                at = end;
            }
            // quinn skips a zero-length entry.
            m.len = kept;
        }
    }

    fn park(&self, waker: &Waker) {
        let mut slot = self.inbox.waker.borrow_mut();
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }
}

/// quinn's UDP socket on a core: the engine's `R::UdpSocket` for readiness, quinn-udp's
/// `UdpSocketState` for the syscalls on its descriptor.
pub struct CoreUdpSocket<R: Runtime> {
    io: SendWrapper<Rc<UdpIo<R>>>,
    /// Forwarding to and from the other cores (`None`: one core, or steering by hash only).
    forward: Option<SendWrapper<LocalForwarding>>,
    state: UdpSocketState,
    /// The descriptor, owned by `io.socket`, which lives as long as this value.
    fd: RawFd,
    local: SocketAddr,
}

impl<R: Runtime> CoreUdpSocket<R> {
    /// Adopts a bound socket into this core's engine. quinn-udp sets the socket options it
    /// needs (ECN and destination-address reporting, GRO, don't-fragment) and probes GSO.
    pub fn adopt(socket: std::net::UdpSocket) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        let state = UdpSocketState::new((&socket).into())?;
        let local = socket.local_addr()?;
        let socket = R::UdpSocket::from_std(socket)?;
        let fd = socket.as_raw_fd();
        let io = UdpIo {
            socket: Rc::new(socket),
            readable: Default::default(),
            drained: Default::default(),
            writable: Default::default(),
            write_waiters: Arc::default(),
            blocked: Default::default(),
        };
        Ok(Self { io: SendWrapper::new(Rc::new(io)), forward: None, state, fd, local })
    }

    /// Forwards datagrams of other cores' connections to them, and receives theirs. Called on
    /// the socket's own worker.
    pub fn with_forwarding(mut self, cfg: Forwarding) -> io::Result<Self> {
        let inbox =
            cfg.inboxes.local().ok_or_else(|| io::Error::other("forwarding is set up on a corepin worker thread"))?;
        self.forward = Some(SendWrapper::new(LocalForwarding { cfg, inbox }));
        Ok(self)
    }

    fn borrowed(&self) -> BorrowedFd<'_> {
        // SAFETY: `fd` belongs to the engine socket held by `self.io`, which is dropped only
        // with `self`, so the descriptor is open for the lifetime of this borrow.
        unsafe { BorrowedFd::borrow_raw(self.fd) }
    }
}

impl<R: Runtime> fmt::Debug for CoreUdpSocket<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoreUdpSocket").field("engine", &R::NAME).field("local", &self.local).finish()
    }
}

impl<R: Runtime> AsyncUdpSocket for CoreUdpSocket<R> {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(CoreUdpPoller::<R> { io: SendWrapper::new(Rc::clone(&self.io)) })
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        // A plain non-blocking syscall on the descriptor; `WouldBlock` sends quinn to the
        // poller, which then waits for the engine to say the socket is writable again.
        let sent = self.state.send((&self.borrowed()).into(), transmit);
        if matches!(&sent, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
            self.io.blocked.set(true);
        }
        sent
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let io = &**self.io;
        let forward = self.forward.as_deref();
        if let Some(f) = forward {
            let n = f.take_in(bufs, meta);
            if n > 0 {
                corepin_core::arrivals::note_handed();
                return Poll::Ready(Ok(n));
            }
        }
        loop {
            // A wait armed after an earlier `EAGAIN` and not over yet means nothing has
            // arrived since: no syscall. quinn's endpoint driver polls this on every wake-up,
            // most of them for its connections' events, not for the socket.
            {
                let mut slot = io.readable.borrow_mut();
                if let Some(wait) = slot.as_mut() {
                    if let Poll::Ready(res) = wait.as_mut().poll(cx) {
                        *slot = None;
                        res?;
                    } else {
                        if let Some(f) = forward {
                            f.park(cx.waker());
                        }
                        return Poll::Pending;
                    }
                }
            }
            if io.drained.replace(false) {
                // The last receive emptied the queue. Every engine's `readable` is level-
                // triggered (the contract), so this wait completes at once if datagrams came
                // since; and on io_uring engines its POLL_ADD goes to the kernel with the
                // engine's next submission, not in a syscall of its own.
                io.arm_readable();
                continue;
            }
            match self.state.recv((&self.borrowed()).into(), bufs, meta) {
                Ok(n) => {
                    // `recvmmsg` stops early only when the queue is empty (or at an error,
                    // which the socket keeps and reports as readable).
                    io.drained.set(n < bufs.len().min(meta.len()).min(quinn::udp::BATCH_SIZE));
                    // Counted for the open-file cache, which without a posted notice reads
                    // inotify only after a receive (`Files::receives_counted`); after the
                    // syscall, never before.
                    corepin_core::arrivals::note();
                    if let Some(f) = forward {
                        f.send_out(bufs, meta, n);
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => io.arm_readable(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }
}

/// One task's wait for writability (quinn makes one per connection driver).
struct CoreUdpPoller<R: Runtime> {
    io: SendWrapper<Rc<UdpIo<R>>>,
}

impl<R: Runtime> fmt::Debug for CoreUdpPoller<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoreUdpPoller").field("engine", &R::NAME).finish()
    }
}

impl<R: Runtime> UdpPoller for CoreUdpPoller<R> {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let io = &**self.get_mut().io;
        // quinn asks before sending, and again after a send met `EAGAIN`. Unless one did, the
        // socket is writable as far as anyone knows: say so without registering or waiting
        // (a wait per transmit, ended by waking every registered driver, cost more than the
        // sends themselves with many connections; docs/http3.md, "Measured").
        if !io.blocked.get() {
            return Poll::Ready(Ok(()));
        }
        io.write_waiters.register(cx.waker());
        // The shared wait is polled with a waker that wakes every registered task, so it does
        // not matter which of them polled it last.
        let waker = Waker::from(Arc::clone(&io.write_waiters));
        let mut shared_cx = Context::from_waker(&waker);
        let mut slot = io.writable.borrow_mut();
        let wait = slot.get_or_insert_with(|| {
            let socket = Rc::clone(&io.socket);
            Box::pin(async move { socket.writable().await })
        });
        match wait.as_mut().poll(&mut shared_cx) {
            Poll::Ready(res) => {
                *slot = None;
                drop(slot);
                io.blocked.set(false);
                // The others retry their sends too (a spurious wake at worst).
                io.write_waiters.wake_all();
                Poll::Ready(res)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
