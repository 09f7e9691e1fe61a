//! The auxiliary-ring experiment of issue 11 (docs/aux-ring.md): Monoio is the host (it accepts
//! and runs one task per connection), and a per-thread `io_uring::IoUring` of our own, the aux
//! ring, does each connection's I/O: one multishot RECV per connection into a provided-buffer
//! ring, and SENDs straight from the buffer that was received into. The two rings meet only
//! at an eventfd registered on the aux ring, which a task awaits through Monoio's own POLL_ADD;
//! nothing of Monoio's internals is touched.
//!
//! Where the system calls happen (per scheduler round of the host):
//! * `reap_task` awaits the eventfd (one POLL_ADD queued in Monoio's ring, submitted by
//!   Monoio's own `io_uring_enter` when it parks: arming the wait costs no system call), then
//!   `reap`s: one `io_uring_enter(GETEVENTS)` on the aux ring runs its deferred completions
//!   (DEFER_TASKRUN), they wake the connection tasks, and one `read(2)` drains the eventfd
//!   (skipped when more completions are already pending: the next round reaps them).
//! * `flush_task` `submit`s: one `io_uring_enter` without GETEVENTS for every SQE queued this
//!   round. The first push of a round wakes it, and a woken Monoio task goes to the back of the
//!   run queue, so it runs after the connection tasks woken by `reap` and submits all their
//!   SENDs at once. Their completions are posted inline, signal the eventfd, and are collected
//!   by the next round's `reap` (as Monoio's own write completions are, by its next park).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::task::{Context as TaskContext, Poll, Waker};

use anyhow::{Context, Result};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use monoio::io::AsyncWriteRentExt;
use monoio::net::{TcpListener, TcpStream};

/// The provided-buffer group the RECVs select from.
const BUF_GROUP: u16 = 0;
/// Buffers in the ring (a power of two, at most 32768). Their memory is a fixed per-core cost,
/// whatever the number of connections.
const BUF_COUNT: u16 = 2048;
/// Bytes per provided buffer.
const BUF_SIZE: usize = 4096;
/// Submission queue entries of the aux ring (its CQ is twice that; the kernel keeps overflowed
/// completions, IORING_FEAT_NODROP, and a GETEVENTS enter flushes them).
const AUX_ENTRIES: u32 = 4096;
/// `io_uring_enter` flag: run (deferred) completions, wait for `min_complete` of them.
const ENTER_GETEVENTS: u32 = 1;

/// `user_data` layout: slot index << 2 | operation.
const OP_RECV: u64 = 1;
const OP_SEND: u64 = 2;
/// `user_data` of ASYNC_CANCEL entries (their own completions are ignored).
const CANCEL: u64 = u64::MAX;

/// Where the SENDs go: the aux ring (everything on it), or the host's ring (Monoio's own
/// `write_all` of the received buffer; the aux ring only receives).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sends {
    Aux,
    Host,
}

pub(crate) fn run(listener: std::net::TcpListener, sends: Sends) -> Result<()> {
    let mut rt = crate::monoio::build()?;
    rt.block_on(async move {
        let aux = Rc::new(Aux::new()?);
        let watch = eventfd_watch(aux.evfd.as_raw_fd())?;
        drop(monoio::spawn(reap_task(aux.clone(), watch)));
        drop(monoio::spawn(flush_task(aux.clone())));
        let listener = TcpListener::from_std(listener)?;
        crate::announce(listener.local_addr())?;
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    match sends {
                        Sends::Aux => drop(monoio::spawn(echo(aux.register(stream, true)))),
                        Sends::Host => drop(monoio::spawn(echo_host_sends(aux.register(stream, false)))),
                    }
                }
                Err(e) => {
                    if crate::accept_failed(&e) {
                        std::thread::sleep(crate::ACCEPT_BACKOFF);
                    }
                }
            }
        }
    })
}

/// The service: what `read_pooled` + `write_all` would be in corepin's contract.
async fn echo(conn: Conn) {
    loop {
        let mut chunk = match conn.recv().await {
            Ok(Some(chunk)) => chunk,
            _ => return,
        };
        let len = chunk.len();
        let mut off = 0;
        while off < len {
            let (res, back) = conn.send(chunk, off).await;
            chunk = back;
            match res {
                Ok(n) if n > 0 => off += n,
                _ => return,
            }
        }
    }
}

/// The same service with the SENDs on Monoio's ring: `write_all` of the received buffer.
async fn echo_host_sends(mut conn: Conn) {
    loop {
        let chunk = match conn.recv().await {
            Ok(Some(chunk)) => chunk,
            _ => return,
        };
        let Some(stream) = conn.stream.as_mut() else { return };
        let (res, _chunk) = stream.write_all(chunk).await;
        if res.is_err() {
            return;
        }
    }
}

/// The eventfd, duplicated and adopted by Monoio as a socket it only polls (as corepin's
/// `FdWatch` on Monoio does): `readable` is one POLL_ADD in Monoio's ring.
fn eventfd_watch(evfd: RawFd) -> io::Result<monoio::net::udp::UdpSocket> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor we own; the result is checked.
    let dup = unsafe { libc::fcntl(evfd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dup` is a fresh descriptor owned by nobody else; the std socket takes it over. It
    // is only polled, never read or written as a UDP socket.
    let std_sock = unsafe { std::net::UdpSocket::from_raw_fd(dup) };
    monoio::net::udp::UdpSocket::from_std(std_sock)
}

async fn reap_task(aux: Rc<Aux>, watch: monoio::net::udp::UdpSocket) {
    loop {
        if let Err(e) = watch.readable(false).await {
            eprintln!("corepin-peer-echo: waiting on the aux ring's eventfd: {e}");
            std::process::exit(1);
        }
        aux.reap();
    }
}

async fn flush_task(aux: Rc<Aux>) {
    loop {
        poll_fn(|cx| {
            if aux.flush_wanted.replace(false) {
                return Poll::Ready(());
            }
            *aux.flusher.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        aux.submit();
    }
}

/// The aux ring with its provided buffers and per-connection state. Single-threaded: it lives
/// in an `Rc` on the host's thread, and no borrow is held across an await or a wake.
struct Aux {
    ring: RefCell<IoUring>,
    st: RefCell<State>,
    evfd: OwnedFd,
    /// An SQE is queued and `flush_task` should run.
    flush_wanted: Cell<bool>,
    flusher: RefCell<Option<Waker>>,
    /// Counters (for the write-up), printed every 2^16 reaps when `AUX_STATS` is set.
    stats: Stats,
    print_stats: bool,
}

#[derive(Default)]
struct Stats {
    reaps: Cell<u64>,
    submits: Cell<u64>,
    resignals: Cell<u64>,
    kept_readable: Cell<u64>,
    enters: Cell<u64>,
    evfd_reads: Cell<u64>,
    cqes: Cell<u64>,
    recv_chunks: Cell<u64>,
    sends: Cell<u64>,
    enobufs: Cell<u64>,
}

struct State {
    slots: Vec<Slot>,
    free: Vec<usize>,
    bufs: BufRing,
    /// Buffers the kernel has filled and we have not returned yet.
    in_use: usize,
    /// Connections whose multishot RECV ended for lack of buffers, to re-arm.
    starved: Vec<usize>,
    /// Connections whose multishot RECV ended for another reason with data, to re-arm.
    rearm: Vec<usize>,
    /// Slots whose connection is gone and which wait for an ASYNC_CANCEL to be queued.
    cancel: Vec<usize>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Recv {
    Armed,
    /// Ended with ENOBUFS: to re-arm once buffers come back.
    Starved,
    /// Ended for good: 0 (end of stream) or -errno.
    Ended(i32),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SendState {
    Idle,
    /// A SEND of buffer `bid` (`len` bytes received into it) is in the kernel's hands.
    InFlight {
        bid: u16,
        len: u32,
        abandoned: bool,
    },
    Done {
        bid: u16,
        len: u32,
        res: i32,
    },
}

struct Slot {
    /// In use (by a connection, or by its operations still in the kernel's hands).
    live: bool,
    /// With SENDs on the aux ring, keeps the socket open until the slot's last operation has
    /// completed. (With host SENDs the task owns the stream; the kernel holds its own
    /// reference to the socket for an armed RECV until the cancel completes.)
    stream: Option<TcpStream>,
    fd: RawFd,
    /// Received chunks (buffer id, length) not yet taken by the task.
    chunks: VecDeque<(u16, u32)>,
    recv: Recv,
    recv_waker: Option<Waker>,
    send: SendState,
    send_waker: Option<Waker>,
    owner_gone: bool,
}

impl Aux {
    fn new() -> Result<Self> {
        let ring = {
            let mut b = IoUring::builder();
            b.setup_single_issuer().setup_defer_taskrun().setup_taskrun_flag();
            match b.build(AUX_ENTRIES) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("corepin-peer-echo: aux ring: SINGLE_ISSUER|DEFER_TASKRUN refused ({e}); plain ring");
                    IoUring::new(AUX_ENTRIES).context("cannot create the aux io_uring")?
                }
            }
        };
        // SAFETY: eventfd(2) with valid flags; the result is checked before it is owned.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("eventfd");
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let evfd = unsafe { OwnedFd::from_raw_fd(fd) };
        ring.submitter().register_eventfd(evfd.as_raw_fd()).context("registering the eventfd")?;
        let mut bufs = BufRing::new();
        // SAFETY: the ring memory is page-aligned, holds BUF_COUNT entries and is leaked, so it
        // stays valid for as long as the ring may read it (past the ring's own drop).
        unsafe { ring.submitter().register_buf_ring(bufs.ring as u64, BUF_COUNT, BUF_GROUP) }
            .context("registering the provided-buffer ring (kernel 5.19+)")?;
        for bid in 0..BUF_COUNT {
            bufs.give(bid);
        }
        bufs.publish();
        Ok(Self {
            ring: RefCell::new(ring),
            st: RefCell::new(State {
                slots: Vec::new(),
                free: Vec::new(),
                bufs,
                in_use: 0,
                starved: Vec::new(),
                rearm: Vec::new(),
                cancel: Vec::new(),
            }),
            evfd,
            flush_wanted: Cell::new(false),
            flusher: RefCell::new(None),
            stats: Stats::default(),
            print_stats: std::env::var_os("AUX_STATS").is_some(),
        })
    }

    /// Takes over a connection and arms its multishot RECV. `keep`: the slot keeps the stream
    /// (SENDs on the aux ring), else the returned handle does.
    fn register(self: &Rc<Self>, stream: TcpStream, keep: bool) -> Conn {
        let fd = stream.as_raw_fd();
        let (kept, handed) = if keep { (Some(stream), None) } else { (None, Some(stream)) };
        let id = {
            let mut st = self.st.borrow_mut();
            let slot = Slot {
                live: true,
                stream: kept,
                fd,
                chunks: VecDeque::new(),
                recv: Recv::Armed,
                recv_waker: None,
                send: SendState::Idle,
                send_waker: None,
                owner_gone: false,
            };
            match st.free.pop() {
                Some(i) => {
                    st.slots[i] = slot;
                    i
                }
                None => {
                    st.slots.push(slot);
                    st.slots.len() - 1
                }
            }
        };
        self.push(recv_entry(fd, id));
        Conn { aux: self.clone(), id, stream: handed }
    }

    /// Queues an SQE and makes sure a flush runs this round. A full SQ is submitted at once.
    fn push(&self, entry: squeue::Entry) {
        let mut ring = self.ring.borrow_mut();
        // SAFETY (for every push): each entry's memory is valid until its completion: RECVs point
        // at no memory of ours (the kernel picks a provided buffer, which we hand back only after
        // the task is done with it), SENDs point into a provided buffer that the slot holds as
        // `SendState::InFlight` until the SEND completes, and ASYNC_CANCEL points at nothing.
        while unsafe { ring.submission().push(&entry) }.is_err() {
            self.stats.enters.set(self.stats.enters.get() + 1);
            if let Err(e) = ring.submit() {
                if !matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EINTR | libc::EAGAIN)) {
                    eprintln!("corepin-peer-echo: aux io_uring_enter: {e}");
                    std::process::exit(1);
                }
            }
        }
        drop(ring);
        if !self.flush_wanted.replace(true) {
            if let Some(w) = self.flusher.borrow_mut().take() {
                w.wake();
            }
        }
    }

    /// The reaper's half (the eventfd fired): one `io_uring_enter(GETEVENTS)` that submits what
    /// is queued and runs the ring's deferred completions, their dispatch (wakers of the
    /// connection tasks), then one `read(2)` that drains the eventfd, which the completions just
    /// posted have signalled again.
    fn reap(&self) {
        let s = &self.stats;
        s.reaps.set(s.reaps.get() + 1);
        let mut wakers = Vec::new();
        let mut reaped = 0u64;
        // One enter; a second only when re-arms or cancels were queued by the dispatch.
        for _ in 0..4 {
            self.queue_pending();
            let mut ring = self.ring.borrow_mut();
            self.enter(&mut ring, ENTER_GETEVENTS);
            let mut st = self.st.borrow_mut();
            for cqe in ring.completion() {
                reaped += 1;
                st.complete(cqe.user_data(), cqe.result(), cqe.flags(), &mut wakers, s);
            }
            if st.rearm.is_empty() && st.cancel.is_empty() {
                break;
            }
        }
        s.cqes.set(s.cqes.get() + reaped);
        // IORING_SQ_TASKRUN: the kernel queued completions after our enter (it sets the flag,
        // then signals the eventfd). Then the eventfd is left readable, so the next round reaps
        // them, and the read is saved. Else it is drained, and the flag checked once more: work
        // queued between the check and the read had its signal drained, so signal again.
        if self.ring.borrow_mut().submission().taskrun() {
            s.kept_readable.set(s.kept_readable.get() + 1);
        } else if self.drain_eventfd() && self.ring.borrow_mut().submission().taskrun() {
            s.resignals.set(s.resignals.get() + 1);
            let one = 1u64;
            // SAFETY: writes 8 bytes from a u64 we own to our eventfd.
            unsafe { libc::write(self.evfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
        for w in wakers {
            w.wake();
        }
        if self.print_stats && s.reaps.get().is_multiple_of(1 << 16) {
            self.print_stats();
        }
    }

    /// The flusher's half: one `io_uring_enter` without GETEVENTS that submits every SQE queued
    /// this round. SENDs that complete inline post their completions now; those signal the
    /// eventfd, so the next round's `reap` collects them with whatever arrived meanwhile.
    fn submit(&self) {
        self.stats.submits.set(self.stats.submits.get() + 1);
        self.queue_pending();
        let mut ring = self.ring.borrow_mut();
        self.enter(&mut ring, 0);
    }

    fn enter(&self, ring: &mut IoUring, flags: u32) {
        let s = &self.stats;
        s.enters.set(s.enters.get() + 1);
        let to_submit = ring.submission().len() as u32;
        // SAFETY: a plain io_uring_enter on our own ring, with no argument struct; every queued
        // entry's memory stays valid until its completion (see `push`).
        match unsafe { ring.submitter().enter::<libc::sigset_t>(to_submit, 0, flags, None) } {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EINTR | libc::EAGAIN)) => {}
            Err(e) => {
                eprintln!("corepin-peer-echo: aux io_uring_enter: {e}");
                std::process::exit(1);
            }
        }
    }

    /// Re-arms RECVs that ended, and queues the cancels of connections that went away.
    fn queue_pending(&self) {
        let (rearm, cancel) = {
            let mut st = self.st.borrow_mut();
            let mut rearm = std::mem::take(&mut st.rearm);
            if !st.starved.is_empty() && st.in_use < usize::from(BUF_COUNT) / 2 {
                rearm.append(&mut st.starved);
            }
            rearm.retain(|&i| {
                let slot = &mut st.slots[i];
                let ok = slot.live && !slot.owner_gone && slot.recv != Recv::Armed;
                if ok {
                    slot.recv = Recv::Armed;
                }
                ok
            });
            let rearm: Vec<(RawFd, usize)> = rearm.into_iter().map(|i| (st.slots[i].fd, i)).collect();
            (rearm, std::mem::take(&mut st.cancel))
        };
        let mut ring = self.ring.borrow_mut();
        for (fd, i) in rearm {
            // SAFETY: as in `push`: a RECV points at no memory of ours.
            while unsafe { ring.submission().push(&recv_entry(fd, i)) }.is_err() {
                let _ = ring.submit();
            }
        }
        for i in cancel {
            let entry = opcode::AsyncCancel::new(user_data(i, OP_RECV)).build().user_data(CANCEL);
            // SAFETY: ASYNC_CANCEL points at no memory.
            while unsafe { ring.submission().push(&entry) }.is_err() {
                let _ = ring.submit();
            }
        }
    }

    /// Empties the eventfd's counter; true (always) so it chains in a condition.
    fn drain_eventfd(&self) -> bool {
        self.stats.evfd_reads.set(self.stats.evfd_reads.get() + 1);
        let mut n = 0u64;
        // SAFETY: reads 8 bytes into a u64 we own; the eventfd is non-blocking (EAGAIN is fine).
        unsafe { libc::read(self.evfd.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
        true
    }

    /// Hands buffer `bid` back to the kernel.
    fn recycle(&self, bid: u16) {
        let mut st = self.st.borrow_mut();
        st.give_back(bid);
        let starved = !st.starved.is_empty() && st.in_use < usize::from(BUF_COUNT) / 2;
        drop(st);
        if starved && !self.flush_wanted.replace(true) {
            if let Some(w) = self.flusher.borrow_mut().take() {
                w.wake();
            }
        }
    }

    fn print_stats(&self) {
        let s = &self.stats;
        eprintln!(
            "aux stats: reaps {}, submits {}, resignals {}, kept readable {}, enters {}, eventfd reads {}, cqes {}, recv chunks {}, sends {}, enobufs {}",
            s.reaps.get(),
            s.submits.get(),
            s.resignals.get(),
            s.kept_readable.get(),
            s.enters.get(),
            s.evfd_reads.get(),
            s.cqes.get(),
            s.recv_chunks.get(),
            s.sends.get(),
            s.enobufs.get()
        );
    }
}

impl State {
    /// Dispatches one completion.
    fn complete(&mut self, ud: u64, res: i32, flags: u32, wakers: &mut Vec<Waker>, s: &Stats) {
        if ud == CANCEL {
            return;
        }
        let (i, op) = ((ud >> 2) as usize, ud & 3);
        if op == OP_RECV {
            if let Some(bid) = cqueue::buffer_select(flags) {
                if res > 0 {
                    self.in_use += 1;
                    s.recv_chunks.set(s.recv_chunks.get() + 1);
                    self.slots[i].chunks.push_back((bid, res as u32));
                } else {
                    // A buffer picked but not filled goes straight back.
                    self.bufs.give(bid);
                    self.bufs.publish();
                }
            }
            let slot = &mut self.slots[i];
            if !cqueue::more(flags) {
                slot.recv = match res {
                    r if r == -libc::ENOBUFS => {
                        s.enobufs.set(s.enobufs.get() + 1);
                        self.starved.push(i);
                        Recv::Starved
                    }
                    r if r > 0 => {
                        self.rearm.push(i);
                        Recv::Starved
                    }
                    r => Recv::Ended(r),
                };
            }
            if let Some(w) = slot.recv_waker.take() {
                wakers.push(w);
            }
            if slot.owner_gone {
                let chunks: Vec<(u16, u32)> = slot.chunks.drain(..).collect();
                for (bid, _) in chunks {
                    self.give_back(bid);
                }
                self.maybe_free(i);
            }
        } else if op == OP_SEND {
            s.sends.set(s.sends.get() + 1);
            let slot = &mut self.slots[i];
            if let SendState::InFlight { bid, len, abandoned } = slot.send {
                if abandoned {
                    slot.send = SendState::Idle;
                    self.give_back(bid);
                    self.maybe_free(i);
                } else {
                    slot.send = SendState::Done { bid, len, res };
                    if let Some(w) = slot.send_waker.take() {
                        wakers.push(w);
                    }
                }
            }
        }
    }

    fn give_back(&mut self, bid: u16) {
        self.in_use -= 1;
        self.bufs.give(bid);
        self.bufs.publish();
    }

    /// Frees slot `i` once its connection is gone and the kernel holds nothing of it.
    fn maybe_free(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        let busy = slot.recv == Recv::Armed || matches!(slot.send, SendState::InFlight { .. });
        if slot.owner_gone && !busy && slot.live {
            slot.live = false;
            slot.stream = None; // closes the socket (when the slot kept it)
            slot.chunks.clear();
            self.free.push(i);
        }
    }
}

fn user_data(i: usize, op: u64) -> u64 {
    (i as u64) << 2 | op
}

fn recv_entry(fd: RawFd, i: usize) -> squeue::Entry {
    opcode::RecvMulti::new(types::Fd(fd), BUF_GROUP).build().user_data(user_data(i, OP_RECV))
}

/// A connection's handle, held by its task. Dropping it cancels the RECV; the slot (and the
/// socket, when the slot keeps it) go once the last completion is in.
struct Conn {
    aux: Rc<Aux>,
    id: usize,
    /// The stream, when SENDs go through the host (dropped after `Drop for Conn` has run).
    stream: Option<TcpStream>,
}

impl Conn {
    /// The next received chunk, `None` at end of stream.
    async fn recv(&self) -> io::Result<Option<Chunk>> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&self, cx: &mut TaskContext<'_>) -> Poll<io::Result<Option<Chunk>>> {
        let mut st = self.aux.st.borrow_mut();
        let slot = &mut st.slots[self.id];
        if let Some((bid, len)) = slot.chunks.pop_front() {
            let ptr = st.bufs.buf(bid);
            return Poll::Ready(Ok(Some(Chunk { aux: self.aux.clone(), bid, len, ptr })));
        }
        match slot.recv {
            Recv::Ended(0) => Poll::Ready(Ok(None)),
            Recv::Ended(e) => Poll::Ready(Err(io::Error::from_raw_os_error(-e))),
            Recv::Armed | Recv::Starved => {
                slot.recv_waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// Sends `chunk[off..]`; the chunk comes back with the result (rent style).
    async fn send(&self, chunk: Chunk, off: usize) -> (io::Result<usize>, Chunk) {
        let (bid, len) = (chunk.bid, chunk.len);
        std::mem::forget(chunk); // the slot holds the buffer while the kernel reads it
        let fd = {
            let mut st = self.aux.st.borrow_mut();
            let slot = &mut st.slots[self.id];
            slot.send = SendState::InFlight { bid, len, abandoned: false };
            slot.fd
        };
        let base = self.aux.st.borrow().bufs.buf(bid);
        // SAFETY: `off < len` <= BUF_SIZE, so the range is inside buffer `bid`.
        let ptr = unsafe { base.add(off) }.cast_const();
        let entry = opcode::Send::new(types::Fd(fd), ptr, len - off as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data(self.id, OP_SEND));
        self.aux.push(entry);
        let mut guard = SendGuard { conn: self, armed: true };
        let (res, bid, len) = poll_fn(|cx| {
            let mut st = self.aux.st.borrow_mut();
            let slot = &mut st.slots[self.id];
            match slot.send {
                SendState::Done { bid, len, res } => {
                    slot.send = SendState::Idle;
                    Poll::Ready((res, bid, len))
                }
                _ => {
                    slot.send_waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await;
        guard.armed = false;
        let ptr = self.aux.st.borrow().bufs.buf(bid);
        let chunk = Chunk { aux: self.aux.clone(), bid, len, ptr };
        let res = if res < 0 { Err(io::Error::from_raw_os_error(-res)) } else { Ok(res as usize) };
        (res, chunk)
    }
}

/// Gives a SEND's buffer back to the ring if the future is dropped before it completes.
struct SendGuard<'a> {
    conn: &'a Conn,
    armed: bool,
}

impl Drop for SendGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut st = self.conn.aux.st.borrow_mut();
        let slot = &mut st.slots[self.conn.id];
        match slot.send {
            SendState::InFlight { bid, len, .. } => slot.send = SendState::InFlight { bid, len, abandoned: true },
            SendState::Done { bid, .. } => {
                slot.send = SendState::Idle;
                st.give_back(bid);
            }
            SendState::Idle => {}
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let mut st = self.aux.st.borrow_mut();
        let slot = &mut st.slots[self.id];
        slot.owner_gone = true;
        slot.recv_waker = None;
        slot.send_waker = None;
        let chunks: Vec<(u16, u32)> = slot.chunks.drain(..).collect();
        let armed = slot.recv == Recv::Armed;
        for (bid, _) in chunks {
            st.give_back(bid);
        }
        if armed {
            st.cancel.push(self.id);
            drop(st);
            if !self.aux.flush_wanted.replace(true) {
                if let Some(w) = self.aux.flusher.borrow_mut().take() {
                    w.wake();
                }
            }
        } else {
            st.maybe_free(self.id);
        }
    }
}

/// Bytes received into a provided buffer; the buffer goes back to the ring when this drops.
struct Chunk {
    aux: Rc<Aux>,
    bid: u16,
    len: u32,
    /// Start of buffer `bid`.
    ptr: *mut u8,
}

// SAFETY: the bytes at `ptr..ptr + len` were written by the kernel's RECV and stay valid and
// unchanged while the chunk exists: the buffer goes back to the ring only in `Drop`, and the
// memory is never freed. Moving the chunk does not move them.
unsafe impl monoio::buf::IoBuf for Chunk {
    fn read_ptr(&self) -> *const u8 {
        self.ptr
    }
    fn bytes_init(&self) -> usize {
        self.len as usize
    }
}

impl Chunk {
    fn len(&self) -> usize {
        self.len as usize
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        self.aux.recycle(self.bid);
    }
}

/// The provided-buffer ring: BUF_COUNT entries (page-aligned, shared with the kernel) and
/// BUF_COUNT buffers of BUF_SIZE bytes. Both allocations are leaked: the kernel may use them
/// until the ring is torn down, which can finish after the ring's drop returns.
struct BufRing {
    ring: *mut types::BufRingEntry,
    bufs: *mut u8,
    tail: u16,
}

impl BufRing {
    fn new() -> Self {
        let layout = std::alloc::Layout::from_size_align(usize::from(BUF_COUNT) * 16, 4096).expect("layout");
        // SAFETY: a non-zero size; the result is checked for null.
        let ring = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<types::BufRingEntry>();
        if ring.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        let bufs: &'static mut [MaybeUninit<u8>] = Box::leak(Box::new_uninit_slice(usize::from(BUF_COUNT) * BUF_SIZE));
        Self { ring, bufs: bufs.as_mut_ptr().cast(), tail: 0 }
    }

    fn buf(&self, bid: u16) -> *mut u8 {
        // SAFETY: bid < BUF_COUNT, so the offset is inside the buffers' allocation.
        unsafe { self.bufs.add(usize::from(bid) * BUF_SIZE) }
    }

    /// Writes buffer `bid` into the next ring entry (the kernel sees it after `publish`).
    fn give(&mut self, bid: u16) {
        let idx = usize::from(self.tail & (BUF_COUNT - 1));
        // SAFETY: idx < BUF_COUNT, inside the ring allocation; the entry at the tail is not one
        // the kernel reads (it reads only entries before the published tail). Only addr, len and
        // bid are written, never the `resv` field that doubles as the tail in entry 0.
        unsafe {
            let e = self.ring.add(idx);
            (*e).set_addr(self.buf(bid) as u64);
            (*e).set_len(BUF_SIZE as u32);
            (*e).set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        // SAFETY: `ring` is the address of the first entry of an initialised, registered ring;
        // the tail is a u16 the kernel reads with acquire semantics, so a release store
        // publishes the entries written before it.
        unsafe {
            let tail = types::BufRingEntry::tail(self.ring).cast::<AtomicU16>();
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}
