//! The floor: the least work an io_uring echo server can do, written by hand on the
//! `io-uring` crate. One ring (SINGLE_ISSUER | DEFER_TASKRUN when the kernel takes them, else
//! a plain ring), a multishot accept (re-armed single accepts on kernels without it), and per
//! connection a slot holding the socket and its buffer, indexed by `user_data`. Each
//! connection has exactly one operation in flight: RECV into its buffer, then SEND of what
//! arrived (re-submitting the rest after a short send), then RECV again; 0 or an error
//! closes it. One `io_uring_enter` (submit and wait for one completion) per loop turn, then
//! every completion that arrived is handled. No tasks, wakers, timers or allocations on the
//! hot path.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use anyhow::{anyhow, Context, Result};
use io_uring::{cqueue, opcode, squeue, types, IoUring, SubmissionQueue};

/// `user_data` of the accept operation; connections use their slot index.
const ACCEPT: u64 = u64::MAX;

/// The end of an HTTP/1.1 request's header section.
const HEAD_END: &[u8; 4] = b"\r\n\r\n";

/// `http_body`: instead of echoing, answer every HTTP/1.1 request (a header section ending in
/// CRLF CRLF; no body is expected) with one fixed `200 OK` of that many bytes: the floor of
/// an HTTP server on io_uring, the same one RECV and one SEND per request as a file server
/// with its file in memory, and nothing between them (`benches/files_vs_nginx.py --floor`).
/// `single_accept`: one ACCEPT per connection, re-armed from each completion, instead of one
/// multishot ACCEPT (to measure what multishot accept saves: docs/aux-ring.md).
pub(crate) fn run(
    listener: std::net::TcpListener,
    buffer_size: usize,
    http_body: Option<usize>,
    single_accept: bool,
) -> Result<()> {
    let mut ring = build()?;
    let response = http_body.map(|n| {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\nServer: floor\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n\r\n"
        )
        .into_bytes();
        r.resize(r.len() + n, b'x');
        r.into_boxed_slice()
    });
    let mut server = Server {
        listener: listener.as_raw_fd(),
        multishot: !single_accept,
        accepted_any: false,
        slots: Vec::new(),
        free: Vec::new(),
        buffer_size,
        backlog: VecDeque::new(),
        response,
    };
    let res = server.serve(&mut ring, &listener);
    // The serve loop only returns on a fatal error, possibly with operations still in the
    // kernel's hands. Dropping the ring does not wait for them to be cancelled, so the
    // buffers they point into must never be freed: leak them (the process is about to exit).
    std::mem::forget(server);
    drop(ring);
    res
}

fn build() -> Result<IoUring> {
    match IoUring::builder().setup_single_issuer().setup_defer_taskrun().build(crate::RING_ENTRIES) {
        Ok(ring) => Ok(ring),
        Err(e) => {
            eprintln!("corepin-peer-echo: io_uring refused SINGLE_ISSUER|DEFER_TASKRUN ({e}); using a plain ring");
            IoUring::new(crate::RING_ENTRIES).context("cannot create an io_uring instance")
        }
    }
}

/// One connection: its socket, its buffer, and where its in-flight operation stands.
struct Slot {
    /// The socket, or -1 while the slot is free.
    fd: RawFd,
    /// Heap memory the kernel reads and writes. It never moves (moving the `Slot`, as the
    /// `Vec` of slots does when it grows, moves only the pointer) and it is freed only when
    /// the server is, which never happens while operations are in flight.
    buf: Box<[u8]>,
    /// Bytes received by the last RECV, being sent back.
    len: usize,
    /// Bytes of those already sent; `sending` is false while a RECV is in flight.
    sent: usize,
    sending: bool,
    /// HTTP mode: how many bytes of [`HEAD_END`] the bytes received so far end with, and the
    /// responses still to send (one per complete request received).
    matched: usize,
    answers: usize,
}

struct Server {
    listener: RawFd,
    /// Whether to use (and, when it ends, re-arm) a multishot accept.
    multishot: bool,
    accepted_any: bool,
    slots: Vec<Slot>,
    /// Free slot indices; a slot is freed only once its last operation has completed.
    free: Vec<usize>,
    buffer_size: usize,
    /// Entries that did not fit in the submission queue, pushed in order once there is room.
    backlog: VecDeque<squeue::Entry>,
    /// HTTP mode: the one response, sent for every request. Never freed while the server
    /// lives (and the server is leaked, never dropped, with operations in flight).
    response: Option<Box<[u8]>>,
}

impl Server {
    fn serve(&mut self, ring: &mut IoUring, listener: &std::net::TcpListener) -> Result<()> {
        let (submitter, mut sq, mut cq) = ring.split();
        self.arm_accept(&mut sq);
        crate::announce(listener.local_addr())?;
        loop {
            sq.sync();
            self.flush_backlog(&mut sq);
            sq.sync();
            // Wait for a completion, unless entries are still queued up behind a full
            // submission queue: then only submit, and come back for them.
            let want = usize::from(self.backlog.is_empty());
            match submitter.submit_and_wait(want) {
                Ok(_) => {}
                // EBUSY: completions overflowed and must be reaped first; EINTR: a signal
                // (the serving thread blocks SIGTERM/SIGINT, but a debugger or SIGSTOP...).
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EINTR | libc::EAGAIN)) => {}
                Err(e) => return Err(e).context("io_uring_enter"),
            }
            cq.sync();
            for cqe in &mut cq {
                if cqe.user_data() == ACCEPT {
                    self.accepted(&mut sq, cqe.result(), cqe.flags())?;
                } else {
                    self.completed(&mut sq, cqe.user_data() as usize, cqe.result());
                }
            }
        }
    }

    /// An accept completed: `res` is the new socket or `-errno`.
    fn accepted(&mut self, sq: &mut SubmissionQueue<'_>, res: i32, flags: u32) -> Result<()> {
        if res >= 0 {
            self.accepted_any = true;
            let fd = res;
            let one: libc::c_int = 1;
            // SAFETY: setsockopt(2) on the socket we were just given, reading one c_int.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_NODELAY,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            let i = self.insert(fd);
            self.recv(sq, i);
        } else if res == -libc::EINVAL && self.multishot && !self.accepted_any {
            // Kernels before 5.19 reject the multishot flag.
            eprintln!("corepin-peer-echo: multishot accept unsupported; using one accept per connection");
            self.multishot = false;
        } else if res == -libc::EINVAL {
            return Err(anyhow!("accept: {}", io::Error::from_raw_os_error(-res)));
        } else {
            // No timers here: the backoff stalls the loop, which then reaps what completed
            // meanwhile (closing connections frees descriptors) before accepting again.
            if crate::accept_failed(&io::Error::from_raw_os_error(-res)) {
                std::thread::sleep(crate::ACCEPT_BACKOFF);
            }
        }
        if !cqueue::more(flags) {
            self.arm_accept(sq);
        }
        Ok(())
    }

    /// Slot `i`'s RECV or SEND completed with `res` (bytes, or `-errno`).
    fn completed(&mut self, sq: &mut SubmissionQueue<'_>, i: usize, res: i32) {
        if res <= 0 {
            // 0 from RECV: the peer closed; 0 from SEND cannot happen for a non-empty send.
            self.close(i);
            return;
        }
        let n = res as usize;
        let http = self.response.as_ref().map(|r| r.len());
        let slot = &mut self.slots[i];
        if slot.sending {
            slot.sent += n;
            if slot.sent < slot.len {
                self.send(sq, i);
            } else if slot.answers > 1 {
                slot.answers -= 1;
                slot.sent = 0;
                self.send(sq, i);
            } else {
                slot.answers = 0;
                self.recv(sq, i);
            }
        } else if let Some(len) = http {
            // Count the requests this read completed (a header section may span reads).
            for &b in &slot.buf[..n] {
                slot.matched =
                    if b == HEAD_END[slot.matched] { slot.matched + 1 } else { usize::from(b == HEAD_END[0]) };
                if slot.matched == HEAD_END.len() {
                    slot.answers += 1;
                    slot.matched = 0;
                }
            }
            if slot.answers == 0 {
                self.recv(sq, i);
            } else {
                (slot.len, slot.sent) = (len, 0);
                self.send(sq, i);
            }
        } else {
            slot.len = n;
            slot.sent = 0;
            self.send(sq, i);
        }
    }

    fn arm_accept(&mut self, sq: &mut SubmissionQueue<'_>) {
        let fd = types::Fd(self.listener);
        let entry = if self.multishot {
            opcode::AcceptMulti::new(fd).flags(libc::SOCK_CLOEXEC).build()
        } else {
            opcode::Accept::new(fd, std::ptr::null_mut(), std::ptr::null_mut()).flags(libc::SOCK_CLOEXEC).build()
        };
        // SAFETY: no peer address is asked for, so the entry points at no memory of ours.
        unsafe { self.push(sq, entry.user_data(ACCEPT)) };
    }

    fn recv(&mut self, sq: &mut SubmissionQueue<'_>, i: usize) {
        let slot = &mut self.slots[i];
        slot.sending = false;
        let entry = opcode::Recv::new(types::Fd(slot.fd), slot.buf.as_mut_ptr(), slot.buf.len() as u32)
            .build()
            .user_data(i as u64);
        // SAFETY: the kernel writes into slot `i`'s buffer until this RECV completes. The
        // buffer is heap memory that never moves, and the slot (with its buffer) is neither
        // freed nor reused before that completion arrives: the slot has no other operation
        // in flight, `close` runs only from this operation's completion, and the server is
        // leaked, never dropped, if the loop ends with operations in flight.
        unsafe { self.push(sq, entry) };
    }

    fn send(&mut self, sq: &mut SubmissionQueue<'_>, i: usize) {
        let slot = &mut self.slots[i];
        slot.sending = true;
        let rest = match &self.response {
            Some(r) => &r[slot.sent..slot.len],
            None => &slot.buf[slot.sent..slot.len],
        };
        let entry = opcode::Send::new(types::Fd(slot.fd), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(i as u64);
        // SAFETY: as for RECV: the kernel reads `buf[sent..len]` of slot `i` until this SEND
        // completes, and that memory stays allocated, unmoved and untouched until then (the
        // next RECV into it is pushed only from this SEND's completion). In HTTP mode it reads
        // the response, which is never written and lives as long as the server.
        unsafe { self.push(sq, entry) };
    }

    /// Queues `entry`, behind the backlog if there is one or the submission queue is full.
    ///
    /// # Safety
    /// Whatever memory `entry` points at must stay valid until its completion is reaped.
    unsafe fn push(&mut self, sq: &mut SubmissionQueue<'_>, entry: squeue::Entry) {
        // SAFETY: the caller keeps the entry's memory valid until it completes.
        if !self.backlog.is_empty() || unsafe { sq.push(&entry) }.is_err() {
            self.backlog.push_back(entry);
        }
    }

    fn flush_backlog(&mut self, sq: &mut SubmissionQueue<'_>) {
        while let Some(entry) = self.backlog.front() {
            // SAFETY: backlog entries were queued by `push`, whose callers keep their memory
            // valid until completion; moving an entry to the ring changes nothing about that.
            if unsafe { sq.push(entry) }.is_err() {
                break;
            }
            self.backlog.pop_front();
        }
    }

    /// A slot for a new connection, reusing a free slot (and its buffer) when there is one.
    fn insert(&mut self, fd: RawFd) -> usize {
        if let Some(i) = self.free.pop() {
            let s = &mut self.slots[i];
            (s.fd, s.len, s.sent, s.sending, s.matched, s.answers) = (fd, 0, 0, false, 0, 0);
            return i;
        }
        let buf = vec![0u8; self.buffer_size].into_boxed_slice();
        self.slots.push(Slot { fd, buf, len: 0, sent: 0, sending: false, matched: 0, answers: 0 });
        self.slots.len() - 1
    }

    /// Closes slot `i`'s socket. Called only from the completion of its one operation, so the
    /// kernel holds nothing of the slot any more.
    fn close(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        // SAFETY: close(2) on the socket this slot owns; no operation on it is in flight.
        unsafe { libc::close(slot.fd) };
        slot.fd = -1;
        self.free.push(i);
    }
}
