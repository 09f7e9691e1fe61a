//! The conformance suite: one set of test bodies, run on every compiled backend (and on
//! Monoio's epoll fallback) through real sockets, files and kernels.

use std::cell::Cell;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use corepin::caps::Driver;
use corepin::launcher::LaunchConfig;
use corepin::runtime::{EngineSettings, OpenOptions};
use corepin::task::{read_timeout, spawn, timeout, Elapsed};
use corepin::topology::{current_thread_affinity, CoreSelection, Topology};
use corepin::{
    Acceptor, App, AppError, AsyncReadRent, AsyncReadRentExt, AsyncWriteRent, AsyncWriteRentExt, BufResult, ConnStream,
    EitherBuf, File, IoBuf, Runtime, Server, ServiceFactory, Stream, TcpServer, TcpStream, UdpSocket, Worker,
};

// ---- helpers ---------------------------------------------------------------------------

/// Engine settings for tests: a small locked-memory share so parallel tests fit in 8 MiB.
fn settings() -> EngineSettings {
    EngineSettings { memlock_budget: 1 << 20, ..EngineSettings::default() }
}

/// Runs `main` on a fresh engine of `R` on this thread.
fn run<R: Runtime, Fut: std::future::Future>(main: impl FnOnce() -> Fut) -> Fut::Output {
    R::block_on(&settings(), main).unwrap_or_else(|e| panic!("{} did not start: {e}", R::NAME))
}

/// Runs `f` on its own thread and fails the test if it has not returned after `limit` (a hang
/// detector, not a speed assertion).
fn within<T: Send + 'static>(limit: Duration, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let h = thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => {
            h.join().unwrap();
            v
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what} did not finish within {limit:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => unreachable!(),
        },
    }
}

/// A blocking std peer on loopback: runs `peer` on the accepted stream in a thread.
fn std_peer(peer: impl FnOnce(StdStream) + Send + 'static) -> (SocketAddr, thread::JoinHandle<()>) {
    let l = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        peer(s)
    });
    (addr, h)
}

fn launch_cfg(cores: CoreSelection) -> LaunchConfig {
    LaunchConfig { cores, drain_timeout: Duration::from_secs(5), ..LaunchConfig::default() }
}

fn start<R: Runtime, A: App>(cfg: &LaunchConfig, app: Arc<A>) -> Server {
    let cpus = cfg.plan().unwrap();
    let cfg = LaunchConfig { ..cfg.clone() };
    Server::start::<R, A>(&cfg, &cpus, app).unwrap_or_else(|e| panic!("{} did not launch: {e}", R::NAME))
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

// ---- stream behaviour ------------------------------------------------------------------

/// A read returns what has arrived (possibly less than the buffer holds); read_exact and
/// write_all loop over short transfers; a large write may be short but write_all sends all.
pub fn short_reads_and_writes_are_completed_by_the_helpers<R: Runtime>() {
    let big = pattern(8 << 20, 7);
    let expect = big.clone();
    let (addr, peer) = std_peer(move |mut s| {
        s.write_all(b"abc").unwrap();
        thread::sleep(Duration::from_millis(50));
        s.write_all(b"defgh").unwrap();
        let mut got = vec![0; expect.len()];
        s.read_exact(&mut got).unwrap();
        assert!(got == expect, "peer received different bytes");
    });
    run::<R, _>(|| async move {
        let mut s = R::TcpStream::connect(addr).await.unwrap();
        let BufResult(r, buf) = s.read(Vec::with_capacity(64)).await;
        let n = r.unwrap();
        assert!((1..=8).contains(&n), "first read got {n} bytes");
        assert_eq!(&buf[..n], &b"abcdefgh"[..n]);
        let rest = Vec::with_capacity(8 - n);
        let BufResult(r, rest) = s.read_exact(rest).await;
        r.unwrap();
        let mut all = buf[..n].to_vec();
        all.extend_from_slice(&rest);
        assert_eq!(all, b"abcdefgh");
        let BufResult(r, big) = s.write_all(big).await;
        assert_eq!(r.unwrap(), 8 << 20);
        assert_eq!(big.len(), 8 << 20, "the buffer comes back whole");
    });
    peer.join().unwrap();
}

/// A peer that closes is seen as a zero-length read, and read_exact reports UnexpectedEof
/// with what it did read.
pub fn eof_is_a_zero_length_read<R: Runtime>() {
    let (addr, peer) = std_peer(|mut s| {
        s.write_all(b"xy").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    });
    run::<R, _>(|| async move {
        let mut s = R::TcpStream::connect(addr).await.unwrap();
        let BufResult(r, buf) = s.read_exact(Vec::with_capacity(4)).await;
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
        assert_eq!(&buf[..], b"xy", "what was read before the end is kept");
        let BufResult(r, _) = s.read(Vec::with_capacity(4)).await;
        assert_eq!(r.unwrap(), 0);
        s.shutdown().await.unwrap();
    });
    peer.join().unwrap();
}

/// Failing operations hand the very same buffer back.
pub fn the_buffer_comes_back_on_error<R: Runtime>() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("write-only");
    std::fs::write(&path, b"data").unwrap();
    let (connected_tx, connected_rx) = mpsc::channel::<()>();
    let (addr, peer) = std_peer(move |s| {
        // Wait until the client's connect has returned, then reset the connection:
        // SO_LINGER 0 then close sends RST.
        let l = libc::linger { l_onoff: 1, l_linger: 0 };
        // SAFETY: setsockopt with a valid linger struct on our own socket.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&l as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as u32,
            )
        };
        let _ = connected_rx.recv();
        drop(s);
    });
    run::<R, _>(|| async move {
        // Reading a write-only file fails with EBADF.
        let f = R::File::open_with(&path, OpenOptions { write: true, ..OpenOptions::default() }).await.unwrap();
        let buf = Vec::with_capacity(4096);
        let ptr = buf.as_ptr();
        let BufResult(r, buf) = f.read_at(buf, 0).await;
        assert!(r.is_err(), "reading a write-only file must fail");
        assert_eq!((buf.as_ptr(), buf.capacity()), (ptr, 4096), "same buffer back");

        // A reset connection fails reads or writes; the buffer comes back each time.
        let mut s = R::TcpStream::connect(addr).await.unwrap();
        connected_tx.send(()).unwrap();
        R::sleep(Duration::from_millis(100)).await;
        let mut buf = pattern(64 << 10, 1);
        let mut failed = false;
        for _ in 0..64 {
            let ptr = buf.as_ptr();
            let BufResult(r, b) = s.write(buf).await;
            assert_eq!(b.as_ptr(), ptr);
            buf = b;
            if r.is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "writing to a reset connection must fail");
        let rbuf = Vec::with_capacity(128);
        let ptr = rbuf.as_ptr();
        let BufResult(_, rbuf) = s.read(rbuf).await;
        assert_eq!(rbuf.as_ptr(), ptr);
    });
    peer.join().unwrap();
}

/// A read cancelled by its deadline returns its buffer, and nothing the peer sent is lost:
/// many reads with tiny deadlines race a trickling peer, and every byte arrives in order.
pub fn cancelled_reads_return_the_buffer_and_lose_no_data<R: Runtime>() {
    const TOTAL: usize = 400;
    let (addr, peer) = std_peer(|mut s| {
        for i in 0..TOTAL {
            s.write_all(&[(i % 251) as u8]).unwrap();
            // Gaps well past the read deadline (timer granularity is about 1 ms), so reads
            // certainly time out between bursts.
            if i % 7 == 0 {
                thread::sleep(Duration::from_millis(4));
            }
        }
        let mut done = [0u8; 1];
        let _ = s.read(&mut done);
    });
    // Under the hang detector: an implementation that loses bytes leaves this loop waiting
    // for data that will never come.
    within(Duration::from_secs(60), "loss-free cancelled reads", move || {
        run::<R, _>(|| async move {
            let mut s = R::TcpStream::connect(addr).await.unwrap();
            let mut got = Vec::new();
            let mut timeouts = 0;
            let mut buf = Vec::with_capacity(3);
            while got.len() < TOTAL {
                let ptr = buf.as_ptr();
                let BufResult(r, b) = read_timeout::<R, _, _>(&mut s, buf, Duration::from_millis(1)).await;
                assert_eq!(b.as_ptr(), ptr, "the buffer comes back from a cancelled read");
                match r {
                    Ok(0) => panic!("unexpected end of stream after {} bytes", got.len()),
                    Ok(n) => got.extend_from_slice(&b[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => timeouts += 1,
                    Err(e) => panic!("read failed: {e}"),
                }
                buf = b;
            }
            let expect: Vec<u8> = (0..TOTAL).map(|i| (i % 251) as u8).collect();
            assert_eq!(got, expect, "bytes lost or reordered across {timeouts} cancelled reads");
            assert!(timeouts > 0, "the peer trickles, so some reads must have timed out");
            let BufResult(r, _) = s.write_all(&b"!"[..]).await;
            r.unwrap();
        })
    });
    peer.join().unwrap();
}

/// Dropping an in-flight read never lets the kernel write into memory that was reused:
/// buffers allocated after the drop keep their contents while the peer sends.
pub fn a_dropped_read_never_writes_into_reused_memory<R: Runtime>() {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (addr, peer) = std_peer(move |mut s| {
        go_rx.recv().unwrap();
        s.write_all(&[0xAA; 4096]).unwrap();
        thread::sleep(Duration::from_millis(100));
    });
    run::<R, _>(|| async move {
        let mut s = R::TcpStream::connect(addr).await.unwrap();
        for _ in 0..8 {
            let r = timeout::<R, _>(Duration::from_millis(5), s.read(vec![0u8; 4096])).await;
            assert!(matches!(r, Err(Elapsed)), "nothing was sent yet");
        }
        let keep: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 4096]).collect();
        go_tx.send(()).unwrap();
        R::sleep(Duration::from_millis(60)).await;
        for (i, b) in keep.iter().enumerate() {
            assert!(b.iter().all(|&x| x == i as u8), "buffer {i} was overwritten by a dropped read");
        }
    });
    peer.join().unwrap();
}

/// Returning from the worker's main with operations still in flight (a read nobody answers, a
/// long sleep, a UDP receive) tears the engine down cleanly.
pub fn an_engine_stopped_with_operations_in_flight_exits_cleanly<R: Runtime>() {
    let l = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    within(Duration::from_secs(30), "engine teardown", move || {
        run::<R, _>(|| async move {
            let s = R::TcpStream::connect(addr).await.unwrap();
            drop(spawn::<R, _>(async move {
                let mut s = s;
                let _ = s.read(Vec::with_capacity(1024)).await;
            }));
            drop(spawn::<R, _>(async move { R::sleep(Duration::from_secs(3600)).await }));
            let u = R::UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            drop(spawn::<R, _>(async move {
                let _ = u.recv_from(Vec::with_capacity(1500)).await;
            }));
            R::sleep(Duration::from_millis(20)).await;
        });
    });
    drop(l);
}

/// Datagrams go out and come back with the right payload and source address.
pub fn udp_round_trip<R: Runtime>() {
    run::<R, _>(|| async move {
        let a = R::UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = R::UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let (aa, ba) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let BufResult(r, _) = a.send_to(pattern(1200, 3), ba).await;
        assert_eq!(r.unwrap(), 1200);
        let BufResult(r, buf) = b.recv_from(Vec::with_capacity(2048)).await;
        let (n, from) = r.unwrap();
        assert_eq!((n, from), (1200, aa));
        assert_eq!(&buf[..n], &pattern(1200, 3)[..]);
        let BufResult(r, _) = b.send_to(&b"pong"[..], from).await;
        r.unwrap();
        let BufResult(r, buf) = a.recv_from(Vec::with_capacity(16)).await;
        assert_eq!(r.unwrap(), (4, ba));
        assert_eq!(&buf[..4], b"pong");
    });
}

/// Positional file I/O writes and reads where it is told to; metadata and fsync work.
pub fn file_read_at_and_write_at<R: Runtime>() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.bin");
    let p2 = path.clone();
    run::<R, _>(|| async move {
        let f = R::File::open_with(&p2, OpenOptions::CREATE).await.unwrap();
        let BufResult(r, _) = f.write_at(pattern(5000, 9), 0).await;
        assert_eq!(r.unwrap(), 5000);
        let BufResult(r, _) = f.write_at(&b"TAIL"[..], 10_000).await;
        assert_eq!(r.unwrap(), 4);
        f.sync_all().await.unwrap();
        let m = f.metadata().await.unwrap();
        assert_eq!(m.len, 10_004);
        assert!(m.is_file && !m.is_dir);
        let BufResult(r, buf) = f.read_at(Vec::with_capacity(100), 4950).await;
        let n = r.unwrap();
        assert_eq!(n, 100);
        assert_eq!(&buf[..50], &pattern(5000, 9)[4950..]);
        assert!(buf[50..].iter().all(|&b| b == 0), "the hole reads as zeros");
        let BufResult(r, _) = f.read_at(Vec::with_capacity(100), 20_000).await;
        assert_eq!(r.unwrap(), 0, "reading past the end is EOF");
    });
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(&on_disk[..5000], &pattern(5000, 9)[..]);
    assert_eq!(&on_disk[10_000..], b"TAIL");
}

/// Sleeps last at least their duration; timeouts fire on pending futures and pass ready ones.
pub fn timers_and_timeouts<R: Runtime>() {
    run::<R, _>(|| async move {
        let t = Instant::now();
        R::sleep(Duration::from_millis(30)).await;
        assert!(t.elapsed() >= Duration::from_millis(30));
        let r = timeout::<R, _>(Duration::from_millis(10), std::future::pending::<()>()).await;
        assert_eq!(r, Err(Elapsed));
        let r = timeout::<R, _>(Duration::from_secs(10), async { 5 }).await;
        assert_eq!(r, Ok(5));
        let t = Instant::now();
        let (a, b) =
            (spawn::<R, _>(R::sleep(Duration::from_millis(40))), spawn::<R, _>(R::sleep(Duration::from_millis(40))));
        a.await.unwrap();
        b.await.unwrap();
        assert!(t.elapsed() >= Duration::from_millis(40));
    });
}

/// Awaits readiness of `fd` through the runtime: not readable before `make_readable` runs
/// (from another thread), readable after, and still readable while the data is unread.
fn check_fd_readiness<R: Runtime>(fd: std::os::fd::RawFd, make_readable: impl FnOnce() + Send + 'static) {
    use corepin::FdWatch;
    run::<R, _>(|| async move {
        let w = R::FdWatch::new(fd).unwrap();
        let early = timeout::<R, _>(Duration::from_millis(30), w.readable()).await;
        assert!(early.is_err(), "readable before anything was sent");
        let writer = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            make_readable();
        });
        timeout::<R, _>(Duration::from_secs(10), w.readable()).await.expect("readable after a write").unwrap();
        writer.join().unwrap();
        // Level-triggered: still readable while the data is unread.
        timeout::<R, _>(Duration::from_secs(10), w.readable()).await.expect("still readable").unwrap();
    });
}

/// A foreign socket (the datagram socketpair the mesh uses as a doorbell) and a foreign
/// non-socket descriptor (an eventfd, the shape of AF_XDP wakeups) are awaited natively.
pub fn fd_readiness_waits_for_data<R: Runtime>() {
    let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    check_fd_readiness::<R>(std::os::fd::AsRawFd::as_raw_fd(&a), move || {
        b.send(b"x").unwrap();
    });
    drop(a);

    // SAFETY: eventfd returns a new descriptor we own (or -1, checked below).
    let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(efd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: `efd` was just created and is owned by nobody else.
    let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(efd) };
    check_fd_readiness::<R>(efd, move || {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes from a valid buffer to the eventfd, which outlives this call.
        assert_eq!(unsafe { libc::write(efd, one.as_ptr().cast(), 8) }, 8);
    });
    drop(owned);
}

// ---- the launcher ----------------------------------------------------------------------

/// (worker index, cpu, NUMA node, affinity, thread name) as each worker saw itself.
type Placed = (usize, usize, usize, Vec<usize>, String);

struct RecordPlacement(Mutex<Vec<Placed>>);

impl App for RecordPlacement {
    async fn run<R: Runtime>(&self, w: Worker) -> Result<(), AppError> {
        let i = w.info();
        let name = thread::current().name().unwrap_or("").to_string();
        self.0.lock().unwrap().push((i.index, i.cpu, i.numa_node, current_thread_affinity(), name));
        Ok(())
    }
}

/// Every worker runs on a thread pinned to exactly its own CPU.
pub fn each_worker_is_pinned_to_its_own_core<R: Runtime>() {
    let app = Arc::new(RecordPlacement(Mutex::new(Vec::new())));
    let server = start::<R, _>(&launch_cfg(CoreSelection::All), app.clone());
    server.wait().unwrap();
    let mut seen = app.0.lock().unwrap().clone();
    seen.sort();
    let cpus = Topology::discover().cpus().len();
    assert_eq!(seen.len(), cpus);
    for (index, cpu, _, affinity, name) in &seen {
        assert_eq!(affinity, &vec![*cpu], "worker {index} is pinned to its cpu only");
        assert!(name.starts_with("corepin-"), "thread named for its core: {name}");
    }
    let distinct: std::collections::BTreeSet<usize> = seen.iter().map(|s| s.1).collect();
    assert_eq!(distinct.len(), seen.len(), "one worker per core");
}

/// On a simulated two-node topology, workers are spread over both nodes and pinned.
pub fn placement_spreads_over_a_simulated_two_node_topology<R: Runtime>() {
    // Two nodes of one core each, numbered like this machine's CPUs 0 and 1.
    let cfg = LaunchConfig { topology: Some(Topology::simulated(2, 1, 1)), ..launch_cfg(CoreSelection::Count(2)) };
    let app = Arc::new(RecordPlacement(Mutex::new(Vec::new())));
    let server = start::<R, _>(&cfg, app.clone());
    let nodes: Vec<usize> = server.workers().iter().map(|w| w.numa_node).collect();
    assert_eq!(nodes, vec![0, 1]);
    server.wait().unwrap();
    let mut seen = app.0.lock().unwrap().clone();
    seen.sort();
    assert_eq!(seen.iter().map(|s| (s.1, s.2)).collect::<Vec<_>>(), vec![(0, 0), (1, 1)]);
    assert!(seen.iter().all(|s| s.3 == vec![s.1]));
}

/// `task::yield_now` lets every other ready task on the core run before the yielder goes on
/// (on Monoio a task that wakes itself is otherwise polled again first, so a yield loop starved
/// everything else on the core).
pub fn yield_now_lets_the_other_ready_tasks_run<R: Runtime>() {
    let rounds = run::<R, _>(|| async {
        let ran = Rc::new(Cell::new(0u32));
        // Three tasks that each need one poll; the yielder must see all of them done after a
        // few yields, not after thousands.
        for _ in 0..3 {
            let ran = ran.clone();
            drop(corepin::task::spawn::<R, _>(async move { ran.set(ran.get() + 1) }));
        }
        let mut rounds = 0u32;
        while ran.get() < 3 && rounds < 10_000 {
            corepin::task::yield_now().await;
            rounds += 1;
        }
        assert_eq!(ran.get(), 3, "the other tasks never ran while this one yielded {rounds} times");
        // And a ping-pong: two tasks that alternate through yields both make progress.
        let turns = Rc::new(Cell::new(0u32));
        let other = {
            let turns = turns.clone();
            corepin::task::spawn::<R, _>(async move {
                for _ in 0..100 {
                    turns.set(turns.get() + 1);
                    corepin::task::yield_now().await;
                }
            })
        };
        let mut seen = 0u32;
        for _ in 0..100 {
            seen = seen.max(turns.get());
            corepin::task::yield_now().await;
        }
        other.await.unwrap();
        assert!(seen >= 50, "the other task made {seen} of 100 turns while this one yielded 100 times");
        rounds
    });
    assert!(rounds <= 4, "the spawned tasks ran only after {rounds} yields");
}

struct CrossCore(Mutex<Vec<String>>);

impl App for CrossCore {
    async fn run<R: Runtime>(&self, w: Worker) -> Result<(), AppError> {
        let me = w.info().index;
        let other = (me + 1) % w.info().workers;
        // The job runs on the other core and reports the thread it ran on.
        let (thread_name, cpu) = corepin::submit_to(other, move || async move {
            let w = Worker::current().unwrap();
            R::sleep(Duration::from_millis(5)).await;
            (thread::current().name().unwrap_or("").to_string(), w.info().cpu)
        })
        .await
        .map_err(|e| AppError::msg(e.to_string()))?;
        let missing = corepin::submit_to(99, || async {}).await;
        assert_eq!(missing, Err(corepin::mesh::MeshError::NoSuchCore(99)));
        // Back-to-back calls: with an idle poll window most arrive while the target's inbox is
        // still looking, with none each one rings the doorbell; every answer must come back.
        let mut sum = 0u64;
        for i in 0..200u64 {
            sum +=
                corepin::submit_to(other, move || async move { i }).await.map_err(|e| AppError::msg(e.to_string()))?;
        }
        assert_eq!(sum, 199 * 200 / 2);
        self.0.lock().unwrap().push(format!("{me}->{other}:{thread_name}:{cpu}"));
        // Stay until every worker has had its answer, so no inbox closes early.
        while self.0.lock().unwrap().len() < w.info().workers {
            R::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }
}

/// `submit_to` runs a job on another core and brings its result back, with inboxes that sleep
/// as soon as their core is idle (the default) and with an idle poll window
/// (`LaunchConfig::inbox_poll`), where a message can arrive while the inbox is yielding.
pub fn cross_core_messages_round_trip<R: Runtime>() {
    for poll in [Duration::ZERO, Duration::from_micros(200)] {
        cross_core_round_trip_with::<R>(LaunchConfig { inbox_poll: poll, ..launch_cfg(CoreSelection::Count(2)) });
    }
}

fn cross_core_round_trip_with<R: Runtime>(cfg: LaunchConfig) {
    let app = Arc::new(CrossCore(Mutex::new(Vec::new())));
    let server = start::<R, _>(&cfg, app.clone());
    let cpus: Vec<usize> = server.workers().iter().map(|w| w.cpu).collect();
    within(Duration::from_secs(30), "cross-core round trip", move || server.wait()).unwrap();
    let mut got = app.0.lock().unwrap().clone();
    got.sort();
    let name = |cpu: usize| format!("corepin-w{cpu}");
    assert_eq!(got, vec![format!("0->1:{}:{}", name(cpus[1]), cpus[1]), format!("1->0:{}:{}", name(cpus[0]), cpus[0])]);
}

struct PanickingJob {
    /// Through `Sharded::invoke_on` (a closure run in the target's inbox loop) rather than
    /// `submit_to` (a future run as a task there).
    sharded: bool,
    shard: corepin::Sharded<()>,
    answer: Mutex<Option<Result<(), corepin::mesh::MeshError>>>,
}

impl App for PanickingJob {
    async fn run<R: Runtime>(&self, w: Worker) -> Result<(), AppError> {
        if w.info().index == 0 {
            let r = if self.sharded {
                self.shard.invoke_on(1, |_| panic!("deliberate job panic")).await
            } else {
                corepin::submit_to(1, || async { panic!("deliberate job panic") }).await
            };
            *self.answer.lock().unwrap() = Some(r);
        }
        w.draining().await;
        Ok(())
    }
}

/// A job that panics on its target answers the caller with `Panicked`, and the target worker
/// then stops the process like any other panic; for `submit_to` and for `invoke_on`.
pub fn a_panicking_cross_core_job_answers_its_caller<R: Runtime>() {
    for sharded in [false, true] {
        let app = Arc::new(PanickingJob { sharded, shard: corepin::Sharded::new(|_| ()), answer: Mutex::new(None) });
        let server = start::<R, _>(&launch_cfg(CoreSelection::Count(2)), app.clone());
        let cpu1 = server.workers()[1].cpu;
        let err = within(Duration::from_secs(30), "panic shutdown", move || server.wait()).unwrap_err();
        assert!(matches!(err, corepin::LaunchError::Panicked { cpu, .. } if cpu == cpu1), "{err}");
        assert_eq!(*app.answer.lock().unwrap(), Some(Err(corepin::mesh::MeshError::Panicked(1))), "sharded: {sharded}");
    }
}

struct Panics;

impl App for Panics {
    async fn run<R: Runtime>(&self, w: Worker) -> Result<(), AppError> {
        if w.info().index == 1 {
            R::sleep(Duration::from_millis(20)).await;
            drop(spawn::<R, _>(async { panic!("deliberate test panic") }));
        }
        // The healthy worker serves until told to stop.
        w.draining().await;
        Ok(())
    }
}

/// A panic on one worker stops every worker and is reported with its core.
pub fn a_panicking_worker_stops_the_process_with_its_core<R: Runtime>() {
    let server = start::<R, _>(&launch_cfg(CoreSelection::Count(2)), Arc::new(Panics));
    let cpu1 = server.workers()[1].cpu;
    let err = within(Duration::from_secs(30), "panic shutdown", move || server.wait()).unwrap_err();
    match err {
        corepin::LaunchError::Panicked { cpu, message } => {
            assert_eq!(cpu, cpu1);
            assert!(message.contains("deliberate test panic"), "{message}");
        }
        other => panic!("expected a panic report, got {other}"),
    }
}

fn echo_server<R: Runtime>(cores: CoreSelection, drain: Duration) -> (Server, SocketAddr) {
    let cfg = LaunchConfig { drain_timeout: drain, ..launch_cfg(cores) };
    let cpus = cfg.plan().unwrap();
    let app =
        TcpServer::bind("127.0.0.1:0".parse().unwrap(), cpus.len(), corepin_echo::EchoFactory::default()).unwrap();
    let addr = app.local_addr();
    (Server::start::<R, _>(&cfg, &cpus, Arc::new(app)).unwrap(), addr)
}

fn echo_once(addr: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut s = StdStream::connect(addr).unwrap();
    let p = payload.to_vec();
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || {
        w.write_all(&p).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    got
}

/// The echo service answers byte for byte both ways it reads: with buffers borrowed per read
/// (the default: the engine's ring where it has one) and with a small buffer of its own per
/// connection (`buffer_size`), many concurrent connections each, more bytes than any buffer.
pub fn echo_answers_exactly_with_borrowed_and_owned_buffers<R: Runtime>() {
    for buffer_size in [None, Some(100)] {
        let cfg = LaunchConfig { drain_timeout: Duration::from_secs(5), ..launch_cfg(CoreSelection::Count(2)) };
        let cpus = cfg.plan().unwrap();
        let factory = corepin_echo::EchoFactory { buffer_size };
        let app = TcpServer::bind("127.0.0.1:0".parse().unwrap(), cpus.len(), factory).unwrap();
        let addr = app.local_addr();
        let server = Server::start::<R, _>(&cfg, &cpus, Arc::new(app)).unwrap();
        let clients: Vec<_> = (0..8u8)
            .map(|i| {
                thread::spawn(move || {
                    let payload = pattern(300_000 + usize::from(i) * 7_919, i);
                    assert!(echo_once(addr, &payload) == payload, "{buffer_size:?}: connection {i} got other bytes");
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
        server.shutdown_handle().drain();
        within(Duration::from_secs(30), "drain", move || server.wait()).unwrap();
    }
}

/// A pair of apps runs both on every worker: two echo servers on two ports in one server,
/// each answering exactly, and both stopping when the server drains.
pub fn a_pair_of_apps_runs_both_on_every_worker<R: Runtime>() {
    let cfg = LaunchConfig { drain_timeout: Duration::from_secs(5), ..launch_cfg(CoreSelection::Count(2)) };
    let cpus = cfg.plan().unwrap();
    let bind =
        || TcpServer::bind("127.0.0.1:0".parse().unwrap(), cpus.len(), corepin_echo::EchoFactory::default()).unwrap();
    let (a, b) = (bind(), bind());
    let (addr_a, addr_b) = (a.local_addr(), b.local_addr());
    assert_ne!(addr_a.port(), addr_b.port());
    let server = Server::start::<R, _>(&cfg, &cpus, Arc::new((a, b))).unwrap();
    for i in 0..16 {
        for addr in [addr_a, addr_b] {
            let p = pattern(500 + i * 13, i as u8);
            assert_eq!(echo_once(addr, &p), p, "{addr}");
        }
    }
    let accepted: u64 = (0..server.counters().len())
        .map(|i| corepin::worker::CoreCounters::get(&server.counters().core(i).connections_accepted))
        .sum();
    assert_eq!(accepted, 32, "both servers' connections are counted");
    server.shutdown_handle().drain();
    server.wait().expect("both apps stop cleanly");
}

/// SO_REUSEPORT spreads connections over the cores' listeners, and every echo is exact.
pub fn reuseport_spreads_connections_across_cores<R: Runtime>() {
    let (server, addr) = echo_server::<R>(CoreSelection::Count(2), Duration::from_secs(5));
    for i in 0..64 {
        let p = pattern(1000 + i * 37, i as u8);
        assert_eq!(echo_once(addr, &p), p);
    }
    let counters = server.counters().clone();
    let accepted: Vec<u64> = (0..counters.len())
        .map(|i| corepin::worker::CoreCounters::get(&counters.core(i).connections_accepted))
        .collect();
    assert_eq!(accepted.iter().sum::<u64>(), 64);
    assert!(accepted.iter().all(|&n| n > 0), "both cores accepted connections: {accepted:?}");
    let bytes_in: u64 =
        (0..counters.len()).map(|i| corepin::worker::CoreCounters::get(&counters.core(i).bytes_in)).sum();
    let expect: u64 = (0..64).map(|i| 1000 + i * 37).sum();
    assert_eq!(bytes_in, expect);
    server.shutdown_handle().drain();
    within(Duration::from_secs(30), "drain", move || server.wait()).unwrap();
}

/// A core at its connection limit closes new connections at once and keeps serving the
/// open ones; once one closes, new connections are served again.
pub fn connections_beyond_the_per_core_limit_are_closed<R: Runtime>() {
    let cfg = launch_cfg(CoreSelection::Count(1));
    let cpus = cfg.plan().unwrap();
    let app = TcpServer::bind("127.0.0.1:0".parse().unwrap(), 1, corepin_echo::EchoFactory::default())
        .unwrap()
        .max_connections_per_core(2);
    let addr = app.local_addr();
    let server = Server::start::<R, _>(&cfg, &cpus, Arc::new(app)).unwrap();
    let roundtrip = |s: &mut StdStream, msg: &[u8]| {
        s.write_all(msg).unwrap();
        let mut b = vec![0u8; msg.len()];
        s.read_exact(&mut b).unwrap();
        assert_eq!(b, msg);
    };
    let mut first = StdStream::connect(addr).unwrap();
    let mut second = StdStream::connect(addr).unwrap();
    roundtrip(&mut first, b"one");
    roundtrip(&mut second, b"two");
    let mut third = StdStream::connect(addr).unwrap();
    third.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = third.write_all(b"three");
    let mut b = [0u8; 5];
    assert!(!matches!(third.read(&mut b), Ok(n) if n > 0), "a connection over the limit was served");
    roundtrip(&mut first, b"still served");
    drop(second);
    // The slot frees once the server sees the close; retry until a new connection is served.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = StdStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(b"again");
        let mut b = [0u8; 5];
        if matches!(s.read_exact(&mut b), Ok(())) {
            assert_eq!(&b, b"again");
            break;
        }
        assert!(Instant::now() < deadline, "a freed slot was never reused");
        thread::sleep(Duration::from_millis(20));
    }
    drop(first);
    server.shutdown_handle().drain();
    within(Duration::from_secs(30), "drain", move || server.wait()).unwrap();
}

/// Draining stops new connections, lets open ones finish, and closes stragglers at the
/// deadline; the server then exits cleanly.
pub fn graceful_drain_lets_open_connections_finish<R: Runtime>() {
    let (server, addr) = echo_server::<R>(CoreSelection::Count(2), Duration::from_millis(1500));
    let mut open: Vec<StdStream> = (0..8).map(|_| StdStream::connect(addr).unwrap()).collect();
    for s in &mut open {
        s.write_all(b"before").unwrap();
        let mut b = [0u8; 6];
        s.read_exact(&mut b).unwrap();
    }
    let handle = server.shutdown_handle();
    handle.drain();
    let waiter = thread::spawn(move || server.wait());
    thread::sleep(Duration::from_millis(200));
    // New connections are refused (or reset before any echo).
    match StdStream::connect(addr) {
        Err(_) => {}
        Ok(mut s) => {
            let _ = s.write_all(b"late");
            let mut b = [0u8; 4];
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            assert!(!matches!(s.read(&mut b), Ok(4)), "a connection made while draining was served");
        }
    }
    // Open connections still work while draining.
    for s in &mut open[..4] {
        s.write_all(b"during").unwrap();
        let mut b = [0u8; 6];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"during");
        s.shutdown(Shutdown::Write).unwrap();
    }
    // The other four are left open: the deadline closes them (the client sees EOF).
    for s in &mut open[4..] {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).unwrap(), 0, "a straggler is closed at the drain deadline");
    }
    within(Duration::from_secs(30), "drain", move || waiter.join().unwrap()).unwrap();
}

/// The engine reports its capabilities inside a worker, naming itself and the ring flags.
pub fn the_capability_report_describes_the_engine<R: Runtime>() {
    let caps = run::<R, _>(|| async { R::capabilities() }).expect("a capability report inside the engine");
    assert!(R::NAME.starts_with(caps.runtime), "{} vs {}", caps.runtime, R::NAME);
    let text = caps.to_string();
    assert!(text.contains("ring flags:") && text.contains("splice:") && text.contains("send_zc:"), "{text}");
    match (&caps.driver, caps.ring_flags) {
        (Driver::IoUring, Some(flags)) => {
            assert!(
                caps.ring_flags_requested.fallbacks().contains(&flags),
                "accepted flags come from the fallback chain"
            );
            assert!(flags.single_issuer, "this kernel takes SINGLE_ISSUER: {text}");
        }
        (Driver::IoUring, None) => assert!(!caps.notes.is_empty(), "an engine that sets its own flags says so: {text}"),
        (Driver::Epoll { reason }, _) => assert!(!reason.is_empty()),
    }
    assert!(R::capabilities().is_none(), "no report outside an engine");
}

struct Counting(AtomicUsize);

impl App for Counting {
    async fn run<R: Runtime>(&self, _w: Worker) -> Result<(), AppError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// An app that returns on every core ends the server with success.
pub fn a_finished_app_ends_the_server<R: Runtime>() {
    let app = Arc::new(Counting(AtomicUsize::new(0)));
    let server = start::<R, _>(&launch_cfg(CoreSelection::Count(2)), app.clone());
    server.wait().unwrap();
    assert_eq!(app.0.load(Ordering::SeqCst), 2);
}

// ---- file transfer and write deadlines ---------------------------------------------------

/// A file holding `data`, removed when the returned path drops (also when the test fails).
fn temp_file(name: &str, data: &[u8]) -> tempfile::TempPath {
    let mut f = tempfile::Builder::new().prefix(&format!("corepin-conf-{name}-")).tempfile().unwrap();
    f.write_all(data).unwrap();
    f.into_temp_path()
}

/// send_file moves a file range to a socket byte for byte, waiting for room while the peer
/// reads slowly (so the socket fills and `writable` is exercised), and reports the end of
/// the file as a zero-length transfer.
pub fn send_file_moves_file_ranges_through_a_full_socket<R: Runtime>() {
    let data = pattern(24 << 20, 3);
    let path = temp_file(&format!("sendfile-{}", R::NAME), &data);
    let (first, len) = (1000u64, (20 << 20) as usize);
    let expect = data[first as usize..first as usize + len].to_vec();
    let (addr, peer) = std_peer(move |mut s| {
        // Read slowly at first so the sender meets a full socket buffer.
        let mut got = Vec::with_capacity(len);
        let mut buf = vec![0u8; 64 * 1024];
        while got.len() < len {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "sender closed early");
            got.extend_from_slice(&buf[..n]);
            if got.len() < (1 << 20) {
                thread::sleep(Duration::from_millis(20));
            }
        }
        assert!(got == expect, "the peer received different bytes");
    });
    let p = path.to_path_buf();
    within(Duration::from_secs(60), "send_file", move || {
        run::<R, _>(|| async move {
            let mut s = R::TcpStream::connect(addr).await.unwrap();
            let f = std::fs::File::open(&p).unwrap();
            let mut sent = 0usize;
            let mut calls = 0;
            while sent < len {
                let n = s.send_file(std::os::fd::AsFd::as_fd(&f), first + sent as u64, len - sent).await.unwrap();
                assert!(n > 0);
                sent += n;
                calls += 1;
            }
            assert_eq!(sent, len);
            assert!(calls > 1, "a 20 MiB transfer to a slow reader should take several calls");
            let past_end = s.send_file(std::os::fd::AsFd::as_fd(&f), data.len() as u64, 10).await.unwrap();
            assert_eq!(past_end, 0, "a transfer past the end of the file sends nothing");
        })
    });
    peer.join().unwrap();
}

/// A write to a peer that never reads ends at its deadline: the socket is shut down, the
/// write completes (its buffer comes back) and the deadline is reported; a write that
/// finishes in time is untouched.
pub fn a_write_deadline_frees_a_stalled_write<R: Runtime>() {
    let (tx, rx) = mpsc::channel::<()>();
    let (addr, peer) = std_peer(move |s| {
        // Never read; keep the socket open until the test is done.
        let _ = rx.recv_timeout(Duration::from_secs(30));
        drop(s);
    });
    within(Duration::from_secs(30), "a write deadline", move || {
        run::<R, _>(|| async move {
            let mut s = R::TcpStream::connect(addr).await.unwrap();
            let fd = s.as_raw_fd();
            let (BufResult(r, buf), fired) =
                corepin::task::with_deadline::<R, _>(fd, Duration::from_secs(5), s.write_all(b"small".to_vec())).await;
            assert!(!fired && r.is_ok() && buf == b"small");
            let big = vec![7u8; 64 << 20];
            let started = Instant::now();
            let (BufResult(r, buf), fired) =
                corepin::task::with_deadline::<R, _>(fd, Duration::from_millis(300), s.write_all(big)).await;
            assert!(fired, "64 MiB cannot fit a socket nobody reads");
            assert!(r.is_err(), "the write fails once the socket is shut down: {r:?}");
            assert_eq!(buf.len(), 64 << 20, "the buffer comes back");
            assert!(started.elapsed() < Duration::from_secs(20));
        })
    });
    tx.send(()).unwrap();
    peer.join().unwrap();

    // The same for send_file: a transfer to a reader that stopped must not hold the thread
    // (an engine's blocking socket would), so the deadline fires and frees it.
    let path = temp_file(&format!("stalled-{}", R::NAME), &pattern(64 << 20, 1));
    let (tx, rx) = mpsc::channel::<()>();
    let (addr, peer) = std_peer(move |s| {
        let _ = rx.recv_timeout(Duration::from_secs(30));
        drop(s);
    });
    let p = path.to_path_buf();
    within(Duration::from_secs(30), "a send_file deadline", move || {
        run::<R, _>(|| async move {
            let mut s = R::TcpStream::connect(addr).await.unwrap();
            let fd = s.as_raw_fd();
            let f = std::fs::File::open(&p).unwrap();
            let mut sent = 0usize;
            loop {
                let fut = s.send_file(std::os::fd::AsFd::as_fd(&f), sent as u64, (64 << 20) - sent);
                match corepin::task::with_deadline::<R, _>(fd, Duration::from_millis(300), fut).await {
                    (Ok(n), false) => sent += n,
                    (_, true) => break,
                    (Err(e), false) => panic!("send_file failed before its deadline: {e}"),
                }
                assert!(sent < 64 << 20, "nobody reads, so 64 MiB cannot all be sent");
            }
        })
    });
    tx.send(()).unwrap();
    peer.join().unwrap();
}

// ---- the contract's newer pieces -------------------------------------------------------

/// A foreign descriptor's writability is awaited natively and level-triggered: not writable
/// while its buffer is full, writable once the peer drains it, and again at once after that.
pub fn fd_watch_waits_for_room_to_write<R: Runtime>() {
    use corepin::FdWatch;
    let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    // Fill a's send buffer (and b's receive buffer) until the kernel says EAGAIN.
    let chunk = vec![7u8; 64 * 1024];
    let mut filled = 0usize;
    loop {
        match (&a).write(&chunk) {
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("filling the socket: {e}"),
        }
    }
    assert!(filled > 0);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&a);
    run::<R, _>(|| async move {
        let w = R::FdWatch::new(fd).unwrap();
        let early = timeout::<R, _>(Duration::from_millis(30), w.writable()).await;
        assert!(early.is_err(), "writable while the socket buffer is full");
        let reader = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            let mut sink = vec![0u8; filled];
            b.read_exact(&mut sink).unwrap();
            b
        });
        timeout::<R, _>(Duration::from_secs(10), w.writable()).await.expect("writable after the peer read").unwrap();
        // Level-triggered: still writable, since nothing filled it again.
        timeout::<R, _>(Duration::from_secs(10), w.writable()).await.expect("still writable").unwrap();
        drop(reader.join().unwrap());
    });
    drop(a);
}

/// A UDP socket's readiness: readable only once a datagram waits, writable at once.
pub fn udp_readiness_is_level_triggered<R: Runtime>() {
    run::<R, _>(|| async {
        let s = R::UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = s.local_addr().unwrap();
        timeout::<R, _>(Duration::from_secs(10), s.writable()).await.expect("writable").unwrap();
        let early = timeout::<R, _>(Duration::from_millis(30), s.readable()).await;
        assert!(early.is_err(), "readable with nothing queued");
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.send_to(b"ping", addr).unwrap();
        timeout::<R, _>(Duration::from_secs(10), s.readable()).await.expect("readable").unwrap();
        timeout::<R, _>(Duration::from_secs(10), s.readable()).await.expect("still readable").unwrap();
        let BufResult(r, buf) = s.recv_from(Vec::with_capacity(16)).await;
        assert_eq!(r.unwrap().0, 4);
        assert_eq!(&buf[..], b"ping");
    });
}

/// UDP with control messages through the contract on every backend: ECN and the destination
/// address come back with the datagram, and a GSO send (three 1200-byte segments and a tail)
/// arrives as four datagrams at a receiver without GRO.
pub fn udp_control_messages_carry_ecn_destination_and_segments<R: Runtime>() {
    use corepin::udp::{enable_cmsgs, enable_cmsgs_with, Ecn, SendMeta};
    run::<R, _>(|| async {
        let rx = R::UdpSocket::bind("0.0.0.0:0".parse().unwrap()).unwrap();
        let features = enable_cmsgs_with(rx.as_raw_fd(), false).unwrap();
        assert!(features.pktinfo && features.ecn, "{features:?}");
        let port = rx.local_addr().unwrap().port();
        let tx = R::UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let txf = enable_cmsgs(tx.as_raw_fd()).unwrap();
        let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let meta = SendMeta { ecn: Some(Ecn::Ect0), ..SendMeta::new(to) };
        let BufResult(r, _) = tx.send_msg(&b"marked"[..], &meta).await;
        assert_eq!(r.unwrap(), 6);
        let BufResult(r, buf) =
            timeout::<R, _>(Duration::from_secs(10), rx.recv_msg(Vec::with_capacity(64))).await.unwrap();
        let got = r.unwrap();
        assert_eq!(&buf[..got.len], b"marked");
        assert_eq!(got.ecn, Some(Ecn::Ect0));
        assert_eq!(got.dst_ip, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(got.from, tx.local_addr().unwrap());
        if !txf.gso {
            println!("skipped the GSO half: the kernel refuses UDP_SEGMENT here");
            return;
        }
        let data = pattern(3 * 1200 + 500, 9);
        let meta = SendMeta { segment_size: Some(1200), ..SendMeta::new(to) };
        let BufResult(r, _) = tx.send_msg(data.clone(), &meta).await;
        assert_eq!(r.unwrap(), data.len());
        let mut all = Vec::new();
        let mut sizes = Vec::new();
        while all.len() < data.len() {
            let BufResult(r, buf) =
                timeout::<R, _>(Duration::from_secs(10), rx.recv_msg(Vec::with_capacity(2048))).await.unwrap();
            let m = r.unwrap();
            sizes.push(m.len);
            all.extend_from_slice(&buf[..m.len]);
        }
        assert_eq!(sizes, [1200, 1200, 1200, 500]);
        assert!(all == data, "segments arrive in order, byte for byte");
    });
}

/// The optional mechanisms' API shape works on every backend, natively or through the core's
/// fallback: `read_pooled` lends a buffer (from the engine's provided-buffer ring where the
/// capability report says it is used, else from the core's pool), empty at end of stream, that
/// goes back when dropped; and `write_zc` sends like `write`.
pub fn pooled_reads_and_zero_copy_writes_move_the_same_bytes<R: Runtime>() {
    let payload = pattern(100_000, 3);
    let expect = payload.clone();
    let (addr, peer) = std_peer(move |mut s| {
        s.write_all(b"hello pool").unwrap();
        let mut got = vec![0; expect.len()];
        s.read_exact(&mut got).unwrap();
        assert!(got == expect, "write_zc delivered different bytes");
        s.shutdown(Shutdown::Write).unwrap();
    });
    run::<R, _>(|| async move {
        let mut s = R::TcpStream::connect(addr).await.unwrap();
        let ring = R::capabilities().is_some_and(|c| c.buffer_rings.used);
        let mut got = Vec::new();
        while got.len() < 10 {
            let b = s.read_pooled().await.unwrap();
            assert!(!b.is_empty(), "end of stream before the greeting");
            assert_eq!(b.is_lent(), ring, "the buffer comes from the ring exactly when the report says rings are used");
            assert_eq!(corepin::pool::outstanding(), 1);
            got.extend_from_slice(&b);
        }
        assert_eq!(got, b"hello pool");
        assert_eq!(corepin::pool::outstanding(), 0, "every pooled buffer was given back");
        if !ring {
            assert!(corepin::pool::idle() >= 1, "the dropped pooled buffer went back to this core's pool");
        }
        let mut buf = payload;
        let mut sent = 0;
        while sent < buf.len() {
            let BufResult(r, b) = s.write_zc(buf.slice(sent..)).await;
            buf = b.into_inner();
            sent += r.unwrap();
        }
        let eof = s.read_pooled().await.unwrap();
        assert!(eof.is_empty(), "end of stream is an empty pooled buffer");
    });
    peer.join().unwrap();
    let caps = run::<R, _>(|| async { R::capabilities() }).unwrap();
    for (name, m) in caps.mechanisms() {
        assert!(!m.used || (m.kernel && caps.driver == Driver::IoUring), "{name}: used without kernel or ring");
        assert_eq!(m.used, m.fallback.is_empty(), "{name}: a fallback is named exactly when not used");
    }
}

/// Holding more pooled buffers than the engine's ring has does not stop reads: once the ring
/// is lent out, reads take buffers of the core's pool, and every byte arrives in order. Every
/// buffer is given back when dropped.
pub fn pooled_reads_go_on_when_the_ring_is_lent_out<R: Runtime>() {
    // More than a provided-buffer ring of 512 buffers of 8 KiB holds.
    let payload = pattern(6 << 20, 11);
    let expect = payload.clone();
    let (addr, peer) = std_peer(move |mut s| {
        s.write_all(&payload).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
    });
    run::<R, _>(|| async move {
        let ring = R::capabilities().is_some_and(|c| c.buffer_rings.used);
        let mut s = R::TcpStream::connect(addr).await.unwrap();
        let mut held = Vec::new();
        loop {
            let b = s.read_pooled().await.unwrap();
            if b.is_empty() {
                break;
            }
            held.push(b);
        }
        assert_eq!(corepin::pool::outstanding(), held.len());
        let lent = held.iter().filter(|b| b.is_lent()).count();
        if ring {
            assert!(lent > 0 && lent < held.len(), "{lent} of {} reads from the ring: it should run out", held.len());
        } else {
            assert_eq!(lent, 0, "no ring, so nothing is lent from one");
        }
        let got: Vec<u8> = held.iter().flat_map(|b| b.iter().copied()).collect();
        assert!(got == expect, "{} bytes arrived of {}, or out of order", got.len(), expect.len());
        drop(held);
        assert_eq!(corepin::pool::outstanding(), 0, "every pooled buffer was given back");
        // The ring has its buffers back: the next connection's reads are lent from it again.
        if ring {
            let payload = pattern(1000, 12);
            let expect = payload.clone();
            let (addr, peer) = std_peer(move |mut s| s.write_all(&payload).unwrap());
            let mut s = R::TcpStream::connect(addr).await.unwrap();
            let mut got = Vec::new();
            while got.len() < expect.len() {
                let b = s.read_pooled().await.unwrap();
                assert!(b.is_lent(), "a read after the buffers came back is lent from the ring");
                got.extend_from_slice(&b);
            }
            assert!(got == expect);
            peer.join().unwrap();
        }
    });
    peer.join().unwrap();
}

/// A pooled read dropped before it completes (a deadline, the idle timeout of a keep-alive
/// connection) leaves nothing behind: the buffer a late completion took goes back to the ring,
/// so after more abandoned reads than the ring has buffers, reads are still lent from it, and
/// the stream still reads to its end. Where the report says multishot receive is used, the
/// bytes stay queued with the stream's receive, so the dropped reads lose none of them;
/// otherwise bytes a dropped read took are lost, as with any dropped read
/// (docs/cancellation.md; `read_cancelable` is the lossless way), but never reordered.
pub fn dropped_pooled_reads_give_their_buffers_back<R: Runtime>() {
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = done.clone();
    let (addr, peer) = std_peer(move |mut s| {
        // A byte every 2 ms, as long as the reader's 1 ms deadlines run, so that
        // some reads complete just as their deadline drops them; then a last message and the
        // end of the stream.
        let mut i = 0u8;
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            if s.write_all(&[i]).is_err() {
                return;
            }
            i = i.wrapping_add(1);
            thread::sleep(Duration::from_millis(2));
        }
        let _ = s.write_all(b"last");
    });
    run::<R, _>(|| async move {
        let caps = R::capabilities();
        let ring = caps.as_ref().is_some_and(|c| c.buffer_rings.used);
        let multishot = caps.as_ref().is_some_and(|c| c.multishot_recv.used);
        let mut s = R::TcpStream::connect(addr).await.unwrap();
        let mut dropped = 0;
        let mut got = Vec::new();
        while dropped < 700 {
            match corepin::task::timeout::<R, _>(Duration::from_millis(1), s.read_pooled()).await {
                Err(_) => dropped += 1,
                Ok(b) => {
                    let b = b.unwrap();
                    assert!(!b.is_empty(), "end of stream before the peer is done");
                    got.extend_from_slice(&b);
                }
            }
        }
        done.store(true, std::sync::atomic::Ordering::Release);
        assert_eq!(corepin::pool::outstanding(), 0, "no buffer is left with a dropped read");
        let mut tail = Vec::new();
        loop {
            let b = s.read_pooled().await.unwrap();
            if b.is_empty() {
                break;
            }
            assert_eq!(b.is_lent(), ring, "{dropped} dropped reads later, reads are lent from the ring iff it is used");
            tail.extend_from_slice(&b);
        }
        assert!(tail.ends_with(b"last"), "the stream reads to its end after the dropped reads");
        got.extend_from_slice(&tail[..tail.len() - 4]);
        // The peer sent 0, 1, 2, ... (wrapping): what arrived is in that order, without gaps
        // where nothing can be lost.
        let gaps =
            got.windows(2).filter(|w| w[1] != w[0].wrapping_add(1)).count() + usize::from(got.first() != Some(&0));
        if multishot {
            assert_eq!(gaps, 0, "multishot receive is reported used, yet {dropped} dropped reads lost bytes");
        }
        assert!(got.len() > 100, "only {} bytes arrived", got.len());
    });
    peer.join().unwrap();
}

/// `read_pooled_at` reads a file into buffers the core lends: registered buffers
/// (`READ_FIXED`) exactly where the capability report says they are used, else chunks of the
/// core's pool. Holding more chunks than there are registered buffers does not stop reads:
/// they take the pool's chunks, and every byte is the file's. Reads dropped before they
/// complete give their buffers back, and every buffer returns when dropped.
pub fn pooled_file_reads_use_registered_buffers_and_go_on_without_them<R: Runtime>() {
    let data = pattern((3 << 20) + 777, 5);
    let path = temp_file("fixed", &data);
    let path2 = path.to_path_buf();
    run::<R, _>(|| async move {
        let fixed = R::capabilities().is_some_and(|c| c.registered_buffers.used);
        let f = R::File::open(&path2).await.unwrap();
        const CHUNK: usize = 128 * 1024;
        let mut held = Vec::new();
        let mut pos = 0u64;
        loop {
            let b = f.read_pooled_at(pos, CHUNK).await.unwrap();
            if b.is_empty() {
                break;
            }
            assert!(b.len() <= CHUNK);
            pos += b.len() as u64;
            held.push(b);
        }
        assert_eq!(pos, data.len() as u64, "read to the end of the file");
        assert_eq!(corepin::pool::outstanding(), held.len());
        let lent = held.iter().filter(|b| b.is_lent()).count();
        if fixed {
            assert!(
                lent > 0 && lent < held.len(),
                "{lent} of {} reads into registered buffers: they should run out",
                held.len()
            );
            assert!(held[0].is_lent(), "the first read takes a registered buffer");
        } else {
            assert_eq!(lent, 0, "no registered buffers, so nothing is lent");
        }
        let all: Vec<u8> = held.iter().flat_map(|b| b.iter().copied()).collect();
        assert!(all == data, "the chunks are the file's bytes, in order");
        drop(held);
        assert_eq!(corepin::pool::outstanding(), 0, "every buffer was given back");

        // Short reads at odd places, and past the end.
        let b = f.read_pooled_at(12_345, 10).await.unwrap();
        assert_eq!(&b[..], &data[12_345..12_355]);
        assert_eq!(b.is_lent(), fixed, "after everything came back, reads take registered buffers again iff used");
        drop(b);
        let tail = f.read_pooled_at(data.len() as u64 - 100, CHUNK).await.unwrap();
        assert_eq!(&tail[..], &data[data.len() - 100..], "a read at the end is short");
        drop(tail);
        assert!(f.read_pooled_at(data.len() as u64 + 5, CHUNK).await.unwrap().is_empty(), "past the end is empty");

        // Reads dropped before they complete, then as many held as there were lent: the
        // registered buffers all came back.
        for i in 0..64u64 {
            let read = f.read_pooled_at(i * 4096, CHUNK);
            let _ = corepin::task::timeout::<R, _>(Duration::ZERO, read).await;
        }
        R::sleep(Duration::from_millis(50)).await;
        assert_eq!(corepin::pool::outstanding(), 0, "dropped reads hold no buffer");
        let mut again = Vec::new();
        for i in 0..lent as u64 {
            let b = f.read_pooled_at(i * CHUNK as u64, CHUNK).await.unwrap();
            assert_eq!(&b[..], &data[(i as usize * CHUNK)..(i as usize * CHUNK + b.len())]);
            again.push(b);
        }
        assert!(
            again.iter().all(|b| b.is_lent() == fixed),
            "every registered buffer is free again after the dropped reads"
        );
    });
    drop(path);
}

/// A worker whose share of locked memory is too small for one registered buffer reports
/// registered buffers as not used, names the fallback, and still reads files (an engine that
/// cannot start at all on that share refuses with an error naming RLIMIT_MEMLOCK).
pub fn a_small_locked_memory_share_leaves_reads_working_without_registered_buffers<R: Runtime>() {
    let data = pattern(300_000, 9);
    let path = temp_file("nolock", &data);
    let path2 = path.to_path_buf();
    let small = EngineSettings { memlock_budget: 100 * 1024, ..settings() };
    let ran = R::block_on(&small, || async move {
        let caps = R::capabilities().unwrap();
        assert!(!caps.registered_buffers.used, "no registered buffers fit in 100 KiB:\n{caps}");
        assert!(caps.registered_buffers.fallback.starts_with("plain buffers"), "{}", caps.registered_buffers.fallback);
        let f = R::File::open(&path2).await.unwrap();
        let mut got = Vec::new();
        loop {
            let b = f.read_pooled_at(got.len() as u64, 128 * 1024).await.unwrap();
            if b.is_empty() {
                break;
            }
            assert!(!b.is_lent(), "without registered buffers nothing is lent");
            got.extend_from_slice(&b);
        }
        assert!(got == data, "the file's bytes");
        caps
    });
    // The same engine with the usual share: where it registers buffers, the small share's
    // report must say that the limit is why it does not.
    let normally = run::<R, _>(|| async { R::capabilities() }).unwrap().registered_buffers.used;
    match ran {
        Ok(caps) => {
            if normally {
                assert!(
                    caps.registered_buffers.fallback.contains("RLIMIT_MEMLOCK"),
                    "the reason names the limit: {}",
                    caps.registered_buffers.fallback
                );
            }
        }
        Err(e) => assert!(e.to_string().contains("RLIMIT_MEMLOCK"), "a refusal names the limit: {e}"),
    }
    drop(path);
}

/// A burst of data on many connections at once, arriving while the core is busy and with
/// nothing behind it, completes every pooled read waiting for it: the engine's ring (or the
/// auxiliary one) is reaped until none is left, not only as far as one pass goes, and not only
/// when new work signals it.
pub fn a_burst_completes_every_waiting_pooled_read<R: Runtime>() {
    const CONNS: usize = 200;
    let l = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let peer = thread::spawn(move || {
        let socks: Vec<StdStream> = (0..CONNS).map(|_| l.accept().unwrap().0).collect();
        // Every read is waiting (the engine said so), then one byte on each connection at once.
        ready_rx.recv().unwrap();
        thread::sleep(Duration::from_millis(50));
        for (i, mut s) in socks.iter().enumerate() {
            s.write_all(&[i as u8]).unwrap();
        }
        // Keep the connections open until the engine has read everything: no end of stream
        // (and no other event) follows the burst.
        ready_rx.recv().unwrap();
    });
    within(Duration::from_secs(60), "a burst on many connections", move || {
        run::<R, _>(|| async move {
            let done = Rc::new(std::cell::Cell::new(0usize));
            let mut streams = Vec::new();
            for _ in 0..CONNS {
                streams.push(R::TcpStream::connect(addr).await.unwrap());
            }
            for mut s in streams {
                let done = done.clone();
                drop(corepin::task::spawn::<R, _>(async move {
                    let b = s.read_pooled().await.unwrap();
                    assert_eq!(b.len(), 1);
                    done.set(done.get() + 1);
                    // Hold the stream: closing it would be new work for the ring.
                    std::future::pending::<()>().await;
                }));
            }
            corepin::task::yield_now().await;
            ready_tx.send(()).unwrap();
            // The core is busy (blocked, here) while the whole burst arrives, so that all of it
            // is queued in the kernel before the ring is next reaped.
            thread::sleep(Duration::from_millis(300));
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while done.get() < CONNS && std::time::Instant::now() < deadline {
                R::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(done.get(), CONNS, "every read waiting when the burst came completed");
            ready_tx.send(()).unwrap();
        });
    });
    peer.join().unwrap();
}

/// A listener takes a burst of connections that all arrived before the first accept, each with
/// its own peer address, whichever way the engine accepts (one multishot ACCEPT on the
/// auxiliary ring, the engine's own, or one accept per call); and dropping the listener closes
/// the connections it had already taken but nobody accepted (a multishot ACCEPT keeps taking
/// connections while the service is not asking): each of their clients sees the end.
pub fn a_listener_takes_a_burst_and_its_drop_closes_what_nobody_accepted<R: Runtime>() {
    // Below the listen backlog std gives (128): the burst must fit in the queue unaccepted.
    const BURST: usize = 100;
    const LATE: usize = 20;
    let std_listener = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = std_listener.local_addr().unwrap();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (late_tx, late_rx) = mpsc::channel::<()>();
    let (armed_tx, armed_rx) = mpsc::channel::<()>();
    let clients = thread::spawn(move || {
        // The whole burst is in the listen queue before the engine starts accepting.
        let socks: Vec<StdStream> = (0..BURST).map(|_| StdStream::connect(addr).unwrap()).collect();
        go_tx.send(()).unwrap();
        let mut seen = std::collections::HashSet::new();
        for (i, mut s) in socks.into_iter().enumerate() {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(&(i as u32).to_be_bytes()).unwrap();
            let mut back = [0u8; 6];
            s.read_exact(&mut back).unwrap();
            // The server echoes the index and the port it saw as this client's.
            assert_eq!(&back[..4], &(i as u32).to_be_bytes());
            assert_eq!(u16::from_be_bytes([back[4], back[5]]), s.local_addr().unwrap().port());
            assert!(seen.insert(s.local_addr().unwrap().port()));
        }
        // Late connections, which nobody will accept (the server has asked for one more and
        // given up, which leaves a multishot ACCEPT armed); then the listener goes.
        armed_rx.recv().unwrap();
        let late: Vec<StdStream> = (0..LATE).map(|_| StdStream::connect(addr).unwrap()).collect();
        thread::sleep(Duration::from_millis(200));
        late_tx.send(()).unwrap();
        for mut s in late {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut b = [0u8; 1];
            match s.read(&mut b) {
                Ok(0) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                other => panic!("a connection taken but never accepted was left open: {other:?}"),
            }
        }
    });
    within(Duration::from_secs(60), "a burst of connections, then the listener dropped", move || {
        run::<R, _>(|| async move {
            std_listener.set_nonblocking(true).unwrap();
            let listener_fd = std::os::fd::AsRawFd::as_raw_fd(&std_listener);
            let listener = <R::TcpListener as corepin::TcpListener>::from_std(std_listener).unwrap();
            let multishot = R::capabilities().expect("a report inside the engine").multishot_accept.used;
            go_rx.recv().unwrap();
            let mut served = Vec::new();
            for _ in 0..BURST {
                let (mut s, peer) = corepin::TcpListener::accept(&listener).await.unwrap();
                served.push(corepin::task::spawn::<R, _>(async move {
                    let (r, buf) = s.read_exact(Vec::with_capacity(4)).await.into_parts();
                    r.unwrap();
                    let mut out = buf;
                    out.extend_from_slice(&peer.port().to_be_bytes());
                    let (w, _) = s.write_all(out).await.into_parts();
                    w.unwrap();
                    // Kept open until the client has read it.
                    let _ = s.read(Vec::with_capacity(1)).await;
                }));
            }
            // One more accept, given up: nothing is waiting yet.
            let more = timeout::<R, _>(Duration::from_millis(100), corepin::TcpListener::accept(&listener)).await;
            assert!(more.is_err(), "no connection was waiting");
            armed_tx.send(()).unwrap();
            // Nobody asks for the late ones; the listener goes once they have arrived.
            while late_rx.try_recv().is_err() {
                R::sleep(Duration::from_millis(10)).await;
            }
            // What the report claims, seen in the listen queue: a multishot ACCEPT stays armed
            // and takes the late connections off it; one accept per call leaves them there.
            let queued = listen_queue(listener_fd);
            if multishot {
                assert_eq!(queued, 0, "multishot accept is reported used, yet {queued} connections wait in the queue");
            } else {
                assert_eq!(queued, LATE as u32, "one accept per call leaves the late connections queued");
            }
            drop(listener);
            // Let the engine (and the aux ring) act on the drop before the clients look.
            R::sleep(Duration::from_millis(200)).await;
            drop(served);
        });
    });
    clients.join().unwrap();
}

/// Bytes waiting in a connected socket's receive queue (`FIONREAD`).
fn socket_inq(fd: std::os::fd::RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int into `n`.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    assert_eq!(r, 0, "FIONREAD: {}", std::io::Error::last_os_error());
    n as usize
}

/// What the report says about multishot receive, seen in the socket: where it is used,
/// `read_pooled` leaves a receive armed that takes bytes off the socket as they arrive (its
/// receive queue stays empty while the service is busy elsewhere), and a service that stops
/// reading makes it stop after a few buffers (the rest waits in the socket, not in the core's
/// ring); where it is not, the bytes wait in the socket until the next read. Either way every
/// byte then arrives, in order.
pub fn multishot_receive_stays_armed_and_stops_for_a_service_that_does_not_read<R: Runtime>() {
    const BIG: usize = 2 << 20;
    let (next_tx, next_rx) = mpsc::channel::<()>();
    let (addr, peer) = std_peer(move |mut s| {
        s.write_all(b"0123456789").unwrap();
        next_rx.recv().unwrap();
        s.write_all(&pattern(100, 1)).unwrap();
        next_rx.recv().unwrap();
        // Blocks until the reader reads: the socket buffers hold far less than this.
        s.write_all(&pattern(BIG, 2)).unwrap();
    });
    within(Duration::from_secs(60), "a multishot receive and a reader that pauses", move || {
        run::<R, _>(|| async move {
            let multishot = R::capabilities().is_some_and(|c| c.multishot_recv.used);
            let mut s = R::TcpStream::connect(addr).await.unwrap();
            let fd = s.as_raw_fd();
            let mut got = Vec::new();
            while got.len() < 10 {
                let b = s.read_pooled().await.unwrap();
                assert!(!b.is_empty());
                got.extend_from_slice(&b);
            }
            next_tx.send(()).unwrap();
            R::sleep(Duration::from_millis(150)).await;
            let waiting = socket_inq(fd);
            if multishot {
                assert_eq!(waiting, 0, "multishot receive is reported used, yet {waiting} bytes wait in the socket");
            } else {
                assert_eq!(waiting, 100, "with one receive per read, the bytes wait in the socket");
            }
            next_tx.send(()).unwrap();
            R::sleep(Duration::from_millis(300)).await;
            let waiting = socket_inq(fd);
            assert!(
                waiting > 0,
                "a service that does not read leaves the bytes in the socket, not in the core's buffers"
            );
            loop {
                let b = s.read_pooled().await.unwrap();
                if b.is_empty() {
                    break;
                }
                got.extend_from_slice(&b);
            }
            let mut expect = b"0123456789".to_vec();
            expect.extend_from_slice(&pattern(100, 1));
            expect.extend_from_slice(&pattern(BIG, 2));
            assert!(got == expect, "{} bytes arrived of {}, or out of order", got.len(), expect.len());
            assert_eq!(corepin::pool::outstanding(), 0);
        })
    });
    peer.join().unwrap();
}

/// A stream read with `read_pooled` can go on with plain reads, cancelable reads (cancelled
/// while waiting, too) and its split read half, in any order, and the bytes arrive in order:
/// a multishot receive armed by `read_pooled` serves the plain reads from what it took (the
/// rest of a buffer waits for the next read), so no two receives race for the socket.
pub fn plain_reads_after_pooled_reads_keep_the_byte_order<R: Runtime>() {
    const TOTAL: usize = 300_000;
    let data = pattern(TOTAL, 7);
    let expect = data.clone();
    let (pause_tx, pause_rx) = mpsc::channel::<()>();
    let (addr, peer) = std_peer(move |mut s| {
        s.set_nodelay(true).unwrap();
        for (i, piece) in data.chunks(1000).enumerate() {
            s.write_all(piece).unwrap();
            if i == 10 {
                // A pause, while the reader's cancelable read waits and is cancelled.
                pause_rx.recv().unwrap();
            } else if i % 50 == 0 {
                thread::sleep(Duration::from_millis(2));
            }
        }
    });
    within(Duration::from_secs(60), "pooled, plain and split reads of one stream", move || {
        run::<R, _>(|| async move {
            let mut s = R::TcpStream::connect(addr).await.unwrap();
            let mut got = Vec::new();
            let b = s.read_pooled().await.unwrap();
            got.extend_from_slice(&b);
            drop(b);
            // Take what is there with small reads, then wait with nothing to read and cancel.
            while got.len() < 11_000 {
                let BufResult(r, b) = s.read(Vec::with_capacity(3)).await;
                let n = r.unwrap();
                assert!(n > 0 && n <= 3, "a read of {n} into 3 bytes");
                got.extend_from_slice(&b[..n]);
                let b = s.read_pooled().await.unwrap();
                got.extend_from_slice(&b);
            }
            assert_eq!(got.len(), 11_000, "the peer pauses after 11,000 bytes");
            let BufResult(r, _) =
                read_timeout::<R, _, _>(&mut s, Vec::with_capacity(100), Duration::from_millis(20)).await;
            assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::TimedOut, "nothing to read during the pause");
            pause_tx.send(()).unwrap();
            let mut turn = 0usize;
            while got.len() < TOTAL / 2 {
                turn += 1;
                match turn % 3 {
                    0 => {
                        let b = s.read_pooled().await.unwrap();
                        assert!(!b.is_empty(), "end of stream at {}", got.len());
                        got.extend_from_slice(&b);
                    }
                    1 => {
                        let BufResult(r, b) = s.read(Vec::with_capacity(5000)).await;
                        let n = r.unwrap();
                        assert!(n > 0, "end of stream at {}", got.len());
                        got.extend_from_slice(&b[..n]);
                    }
                    _ => {
                        let token = corepin::io::CancelToken::new();
                        let BufResult(r, b) = s.read_cancelable(Vec::with_capacity(777), &token).await;
                        let n = r.unwrap();
                        assert!(n > 0, "end of stream at {}", got.len());
                        got.extend_from_slice(&b[..n]);
                    }
                }
            }
            let (mut rd, _wr) = s.into_split();
            loop {
                let BufResult(r, b) = rd.read(Vec::with_capacity(4096)).await;
                let n = r.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&b[..n]);
            }
            assert!(got == expect, "{} bytes arrived of {}, or out of order", got.len(), expect.len());
            assert_eq!(corepin::pool::outstanding(), 0);
        })
    });
    peer.join().unwrap();
}

/// Connections waiting in a listening socket's accept queue (`tcpi_unacked` of a listener).
fn listen_queue(fd: std::os::fd::RawFd) -> u32 {
    // SAFETY: `tcp_info` is plain data; zeroed is a valid value for it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt(2) writes at most `len` bytes into `info`, which is that large.
    let r = unsafe {
        libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&mut info as *mut libc::tcp_info).cast(), &mut len)
    };
    assert_eq!(r, 0, "TCP_INFO on the listener: {}", std::io::Error::last_os_error());
    info.tcpi_unacked
}

/// An engine claims its thread: a second engine nested on it is refused with a clear error,
/// and a panic in the engine's main frees the thread for the next one.
pub fn an_engine_owns_its_thread_until_it_ends<R: Runtime>() {
    within(Duration::from_secs(30), "nested engines", || {
        let nested = run::<R, _>(|| async { R::block_on(&settings(), || async {}).err().map(|e| e.to_string()) });
        let msg = nested.expect("a nested engine must be refused");
        assert!(msg.contains("already running"), "{msg}");
        let panicked = std::panic::catch_unwind(|| run::<R, _>(|| async { panic!("main panicked on purpose") }));
        assert!(panicked.is_err());
        assert!(R::capabilities().is_none(), "the report is cleared after a panic");
        assert_eq!(run::<R, _>(|| async { 7 }), 7, "the thread runs a new engine after the panic");
    });
}

/// An acceptor sits between the listener and the service: the service sees the stream the
/// acceptor made (here a prefix is sent before the service's bytes), connections it refuses
/// never reach the service, and a factory that fails stops the server with its message.
struct Greeter;

struct Greeting<S>(S);

impl<S: AsyncReadRent> AsyncReadRent for Greeting<S> {
    fn read<B: corepin::IoBufMut>(&mut self, buf: B) -> impl std::future::Future<Output = BufResult<usize, B>> {
        self.0.read(buf)
    }
    fn read_cancelable<B: corepin::IoBufMut>(
        &mut self,
        buf: B,
        cancel: &corepin::CancelToken,
    ) -> impl std::future::Future<Output = BufResult<usize, B>> {
        self.0.read_cancelable(buf, cancel)
    }
}

impl<S: AsyncWriteRent> AsyncWriteRent for Greeting<S> {
    fn write<B: corepin::IoBuf>(&mut self, buf: B) -> impl std::future::Future<Output = BufResult<usize, B>> {
        self.0.write(buf)
    }
    fn writev<B: corepin::IoBuf>(
        &mut self,
        bufs: Vec<B>,
    ) -> impl std::future::Future<Output = BufResult<usize, Vec<B>>> {
        self.0.writev(bufs)
    }
    fn shutdown(&mut self) -> impl std::future::Future<Output = std::io::Result<()>> {
        self.0.shutdown()
    }
}

impl<S: ConnStream> ConnStream for Greeting<S> {
    type ReadHalf = S::ReadHalf;
    type WriteHalf = S::WriteHalf;
    fn into_split(self) -> (S::ReadHalf, S::WriteHalf) {
        self.0.into_split()
    }
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl Acceptor for Greeter {
    type Stream<R: Runtime> = Greeting<Stream<R::TcpStream>>;
    type Error = String;
    async fn accept<R: Runtime>(
        &self,
        mut stream: Stream<R::TcpStream>,
        _peer: SocketAddr,
        _worker: &Worker,
    ) -> Result<Self::Stream<R>, String> {
        let BufResult(r, hello) = stream.read_exact(Vec::with_capacity(5)).await;
        r.map_err(|e| e.to_string())?;
        if &hello[..] != b"knock" {
            return Err("wrong knock".into());
        }
        let BufResult(r, _) = stream.write_all(&b"welcome:"[..]).await;
        r.map_err(|e| e.to_string())?;
        Ok(Greeting(stream))
    }
}

struct EchoFactory {
    fail: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("no echo on purpose")]
struct NoEcho;

impl ServiceFactory for EchoFactory {
    type Service<R: Runtime, S: ConnStream> = corepin_echo::Echo;
    type Error = NoEcho;
    fn new_service<R: Runtime, S: ConnStream>(&self, worker: &Worker) -> Result<corepin_echo::Echo, NoEcho> {
        if self.fail {
            return Err(NoEcho);
        }
        let f = corepin_echo::EchoFactory::default();
        Ok(<corepin_echo::EchoFactory as ServiceFactory>::new_service::<R, S>(&f, worker).unwrap())
    }
}

pub fn an_acceptor_shapes_the_stream_a_service_sees<R: Runtime>() {
    let cfg = launch_cfg(CoreSelection::Count(2));
    let cpus = cfg.plan().unwrap();
    let app = TcpServer::bind("127.0.0.1:0".parse().unwrap(), cpus.len(), EchoFactory { fail: false })
        .unwrap()
        .with_acceptor(Greeter);
    let addr = app.local_addr();
    let server = start::<R, _>(&cfg, Arc::new(app));
    for i in 0..8u8 {
        let mut s = StdStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"knock").unwrap();
        s.write_all(&[b'a' + i; 3]).unwrap();
        let mut got = [0u8; 11];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got[..8], b"welcome:");
        assert_eq!(&got[8..], &[b'a' + i; 3], "the service echoes behind the acceptor");
    }
    // A refused connection is closed without reaching the service.
    let mut s = StdStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"nopes").unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "a refused connection got {rest:?}");
    server.shutdown_handle().drain();
    server.wait().unwrap();

    let app = TcpServer::bind("127.0.0.1:0".parse().unwrap(), cpus.len(), EchoFactory { fail: true }).unwrap();
    let err = Server::start::<R, _>(&cfg, &cpus, Arc::new(app))
        .and_then(|s| s.wait())
        .err()
        .map(|e| e.to_string())
        .expect("a failing factory stops the server");
    assert!(err.contains("no echo on purpose"), "{err}");
}

/// The panic policy: a panic in one connection's service closes that connection only; it is
/// counted, and the other connections on the same core (and the server) go on.
struct Touchy;

impl<R: Runtime, S: ConnStream> corepin::Service<corepin::Connection<R, S>> for Touchy {
    type Response = ();
    type Error = std::io::Error;
    async fn call(&self, mut conn: corepin::Connection<R, S>) -> std::io::Result<()> {
        loop {
            let BufResult(r, b) = conn.stream.read(Vec::with_capacity(64)).await;
            let n = r?;
            if n == 0 {
                return Ok(());
            }
            if b.starts_with(b"boom") {
                panic!("this connection asked for a panic");
            }
            let BufResult(r, _) = conn.stream.write_all(b).await;
            r?;
        }
    }
}

struct TouchyFactory;

impl ServiceFactory for TouchyFactory {
    type Service<R: Runtime, S: ConnStream> = Touchy;
    type Error = std::convert::Infallible;
    fn new_service<R: Runtime, S: ConnStream>(&self, _worker: &Worker) -> Result<Touchy, Self::Error> {
        Ok(Touchy)
    }
}

pub fn a_panicking_connection_closes_only_itself<R: Runtime>() {
    let cfg = launch_cfg(CoreSelection::List(vec![0]));
    let cpus = cfg.plan().unwrap();
    let app = TcpServer::bind("127.0.0.1:0".parse().unwrap(), cpus.len(), TouchyFactory).unwrap();
    let addr = app.local_addr();
    let server = start::<R, _>(&cfg, Arc::new(app));
    // A connection opened before the panic, on the same (only) core.
    let mut calm = StdStream::connect(addr).unwrap();
    calm.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    calm.write_all(b"before").unwrap();
    let mut got = [0u8; 6];
    calm.read_exact(&mut got).unwrap();
    let mut bad = StdStream::connect(addr).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    bad.write_all(b"boom").unwrap();
    let mut rest = Vec::new();
    let _ = bad.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the panicking connection is closed");
    // The other connection and new ones still work.
    calm.write_all(b"after!").unwrap();
    calm.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"after!");
    let mut fresh = StdStream::connect(addr).unwrap();
    fresh.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    fresh.write_all(b"fresh").unwrap();
    let mut f = [0u8; 5];
    fresh.read_exact(&mut f).unwrap();
    assert_eq!(&f, b"fresh");
    let panics = corepin::worker::CoreCounters::get(&server.counters().core(0).connection_panics);
    assert_eq!(panics, 1, "the panic is counted");
    drop((calm, fresh));
    server.shutdown_handle().drain();
    server.wait().expect("a connection's panic does not fail the server");
}

/// Per-core state: each worker's value is built once, on that worker, and `invoke_on` runs a
/// closure with the owner's value on the owner, from any core (itself included); `post_on`
/// does the same without waiting (fire and forget), and every posted closure runs.
pub fn sharded_state_lives_on_its_core_and_is_reached_by_invoke_on<R: Runtime>() {
    use std::cell::Cell;
    struct Shard {
        built_on: usize,
        hits: Cell<u64>,
        posted: Cell<u64>,
    }
    struct ShardedApp {
        shards: corepin::Sharded<Shard>,
        builds: Arc<AtomicUsize>,
        finished: AtomicUsize,
        seen: Mutex<Vec<(usize, usize, u64)>>,
    }
    impl App for ShardedApp {
        async fn run<R2: Runtime>(&self, worker: Worker) -> Result<(), AppError> {
            let me = worker.info().index;
            let workers = worker.info().workers;
            // Every worker bumps every shard (its own included) 10 times through invoke_on,
            // and 10 times through post_on.
            for _ in 0..10 {
                for w in 0..workers {
                    self.shards
                        .post_on(w, |s| s.posted.set(s.posted.get() + 1))
                        .map_err(|e| AppError::msg(e.to_string()))?;
                    self.shards
                        .invoke_on(w, |s| s.hits.set(s.hits.get() + 1))
                        .await
                        .map_err(|e| AppError::msg(e.to_string()))?;
                }
            }
            // Wait until every worker has done its part, then read every shard.
            loop {
                let all: Vec<(u64, u64)> = self
                    .shards
                    .map_all(|s| (s.hits.get(), s.posted.get()))
                    .await
                    .map_err(|e| AppError::msg(e.to_string()))?;
                if all.iter().all(|&(h, p)| h == 10 * workers as u64 && p == 10 * workers as u64) {
                    break;
                }
                R2::sleep(Duration::from_millis(5)).await;
            }
            for w in 0..workers {
                let (built_on, hits) = self
                    .shards
                    .invoke_on(w, |s| (s.built_on, s.hits.get()))
                    .await
                    .map_err(|e| AppError::msg(e.to_string()))?;
                // The async form awaits on the owner (a timer there) before answering.
                let later = self
                    .shards
                    .invoke_on_async(w, |s| async move {
                        R2::sleep(Duration::from_millis(1)).await;
                        s.built_on
                    })
                    .await
                    .map_err(|e| AppError::msg(e.to_string()))?;
                assert_eq!(later, built_on, "invoke_on_async reaches the same shard");
                self.seen.lock().unwrap().push((me, built_on, hits));
            }
            let local = self.shards.local().expect("a worker has its own value");
            assert_eq!(local.built_on, worker.info().cpu, "the local value was built on this core");
            // A worker whose app returns stops taking cross-core calls: stay until all are done.
            self.finished.fetch_add(1, Ordering::SeqCst);
            while self.finished.load(Ordering::SeqCst) < workers {
                R2::sleep(Duration::from_millis(5)).await;
            }
            Ok(())
        }
    }
    let cfg = launch_cfg(CoreSelection::Count(2));
    let builds = Arc::new(AtomicUsize::new(0));
    let b2 = builds.clone();
    let app = Arc::new(ShardedApp {
        shards: corepin::Sharded::new(move |w: &Worker| {
            b2.fetch_add(1, Ordering::SeqCst);
            assert_eq!(current_cpu(), w.info().cpu, "built on the worker's own core");
            Shard { built_on: current_cpu(), hits: Cell::new(0), posted: Cell::new(0) }
        }),
        builds,
        finished: AtomicUsize::new(0),
        seen: Mutex::new(Vec::new()),
    });
    let server = start::<R, _>(&cfg, app.clone());
    within(Duration::from_secs(30), "sharded app", move || server.wait()).unwrap();
    let cpus = cfg.plan().unwrap();
    assert_eq!(app.builds.load(Ordering::SeqCst), cpus.len(), "one value per worker, built once");
    let seen = app.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), cpus.len() * cpus.len());
    for (_, built_on, hits) in seen {
        assert!(cpus.iter().any(|c| c.os == built_on), "built on a worker's core");
        assert_eq!(hits, 10 * cpus.len() as u64, "every invoke_on reached its shard once");
    }
}

/// The CPU this thread runs on (workers are pinned, so it is their core).
fn current_cpu() -> usize {
    // SAFETY: sched_getcpu takes no arguments and only reads the calling thread's state.
    unsafe { libc::sched_getcpu() as usize }
}

/// Buffers of two kinds go out in one gathered write without the caller implementing IoBuf.
pub fn writev_gathers_buffers_of_different_kinds<R: Runtime>() {
    let (addr, peer) = std_peer(|mut s| {
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"head:shared-body:tail");
    });
    run::<R, _>(|| async move {
        let mut s = R::TcpStream::connect(addr).await.unwrap();
        let bufs: Vec<EitherBuf<Vec<u8>, bytes::Bytes>> = vec![
            EitherBuf::Left(b"head:".to_vec()),
            EitherBuf::Right(bytes::Bytes::from_static(b"shared-body")),
            EitherBuf::Left(b":tail".to_vec()),
        ];
        let BufResult(r, bufs) = s.writev(bufs).await;
        assert_eq!(r.unwrap(), 21, "one gathered write");
        assert_eq!(bufs.len(), 3, "the buffers come back");
        s.shutdown().await.unwrap();
    });
    peer.join().unwrap();
}

// ---- split halves and copy ---------------------------------------------------------------

/// Reads `r` to end of stream into one vector, through one reused buffer.
async fn read_to_end<H: AsyncReadRent>(r: &mut H) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        let BufResult(n, b) = r.read(buf).await;
        buf = b;
        match n.unwrap() {
            0 => return got,
            n => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Caps a socket's send and receive buffers at 64 KiB (the kernel doubles that), which also
/// turns off their autotuning: loopback would otherwise grow receive buffers to 32 MiB here.
fn small_socket_buffers(fd: std::os::fd::RawFd) {
    let size: libc::c_int = 64 * 1024;
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: `fd` is an open socket the caller owns; `size` is a valid c_int of the length
        // passed.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "setsockopt: {}", std::io::Error::last_os_error());
    }
}

/// The two halves of a split stream, driven by two spawned tasks, carry 16 MiB each way at
/// once through a peer that echoes as it reads, with socket buffers capped far below 16 MiB:
/// the peer sends only what it has read from us, and reads only while it can send, so the
/// transfer completes only if our read half drains while our write half is still writing. One
/// task alternating between the sides, or halves that wait on each other (a shared lock held
/// across a pending read), stop it.
pub fn split_halves_carry_a_full_duplex_transfer_from_two_tasks<R: Runtime>() {
    const N: usize = 16 << 20;
    let (addr, peer) = std_peer(|mut s| {
        small_socket_buffers(std::os::fd::AsRawFd::as_raw_fd(&s));
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).unwrap();
            total += n;
        }
        s.shutdown(Shutdown::Write).unwrap();
        assert_eq!(total, N, "the peer received and echoed all our bytes");
    });
    let got = within(Duration::from_secs(60), "full-duplex transfer", move || {
        run::<R, _>(|| async move {
            let s = R::TcpStream::connect(addr).await.unwrap();
            small_socket_buffers(s.as_raw_fd());
            let (mut r, mut w) = s.into_split();
            let writer = spawn::<R, _>(async move {
                let BufResult(res, _) = w.write_all(pattern(N, 9)).await;
                res.unwrap();
                w.shutdown().await.unwrap();
                w
            });
            let reader = spawn::<R, _>(async move { read_to_end(&mut r).await });
            let got = reader.await.unwrap();
            drop(writer.await.unwrap());
            got
        })
    });
    assert!(got == pattern(N, 9), "our 16 MiB came back byte for byte ({} bytes)", got.len());
    peer.join().unwrap();
}

/// Shutting the write half down (or dropping it) sends end of stream to the peer, which can
/// still send to us; the read half reads it.
pub fn shutting_the_write_half_is_a_half_close<R: Runtime>() {
    for drop_it in [false, true] {
        let (addr, peer) = std_peer(|mut s| {
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            assert_eq!(got, b"request", "the peer saw end of stream after our bytes");
            s.write_all(b"answer after your end of stream").unwrap();
        });
        let got = within(Duration::from_secs(20), "half-close", move || {
            run::<R, _>(|| async move {
                let s = R::TcpStream::connect(addr).await.unwrap();
                let (mut r, mut w) = s.into_split();
                let BufResult(res, _) = w.write_all(&b"request"[..]).await;
                res.unwrap();
                if drop_it {
                    drop(w);
                    read_to_end(&mut r).await
                } else {
                    w.shutdown().await.unwrap();
                    let got = read_to_end(&mut r).await;
                    drop(w);
                    got
                }
            })
        });
        assert_eq!(got, b"answer after your end of stream", "drop_it={drop_it}");
        peer.join().unwrap();
    }
}

/// A read half keeps `read_cancelable`: cancelled, it returns the buffer and loses nothing.
pub fn a_split_read_half_reads_cancelably<R: Runtime>() {
    let (addr, peer) = std_peer(|mut s| {
        let mut one = [0u8; 1];
        s.read_exact(&mut one).unwrap();
        s.write_all(b"late bytes").unwrap();
    });
    let got = within(Duration::from_secs(20), "cancelable read on a half", move || {
        run::<R, _>(|| async move {
            let s = R::TcpStream::connect(addr).await.unwrap();
            let (mut r, mut w) = s.into_split();
            let token = corepin::io::CancelToken::new();
            let t = token.clone();
            let canceller = spawn::<R, _>(async move {
                R::sleep(Duration::from_millis(50)).await;
                t.cancel();
            });
            let BufResult(res, buf) = r.read_cancelable(Vec::with_capacity(64), &token).await;
            canceller.await.unwrap();
            assert!(corepin::io::is_cancelled(&res.unwrap_err()), "cancelled with nothing to read");
            let BufResult(res, _) = w.write_all(&b"!"[..]).await;
            res.unwrap();
            let BufResult(res, buf) = r.read_exact(buf.slice(0..10)).await;
            res.unwrap();
            buf.into_inner()
        })
    });
    assert_eq!(got, b"late bytes");
    peer.join().unwrap();
}

/// copy_bidirectional through a real relay: the client's 4 MiB reach an upstream that answers
/// only after end of stream (so the relay must pass the half-close on), and the answer comes
/// back byte for byte, followed by end of stream.
pub fn copy_bidirectional_relays_both_ways_with_half_close<R: Runtime>() {
    const N: usize = 4 << 20;
    let (upstream, up) = std_peer(|mut s| {
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got.reverse();
        s.write_all(&got).unwrap();
    });
    let relay = StdListener::bind("127.0.0.1:0").unwrap();
    relay.set_nonblocking(true).unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let client = thread::spawn(move || {
        let s = StdStream::connect(relay_addr).unwrap();
        let mut w = s.try_clone().unwrap();
        let writer = thread::spawn(move || {
            w.write_all(&pattern(N, 5)).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut got = Vec::new();
        (&s).read_to_end(&mut got).unwrap();
        writer.join().unwrap();
        got
    });
    let counts = within(Duration::from_secs(60), "relay", move || {
        run::<R, _>(|| async move {
            let l = <R::TcpListener as corepin::TcpListener>::from_std(relay).unwrap();
            let (a, _) = corepin::TcpListener::accept(&l).await.unwrap();
            let b = R::TcpStream::connect(upstream).await.unwrap();
            let (mut ar, mut aw) = a.into_split();
            let (mut br, mut bw) = b.into_split();
            corepin::copy_bidirectional(&mut ar, &mut aw, &mut br, &mut bw).await.unwrap()
        })
    });
    let mut expect = pattern(N, 5);
    expect.reverse();
    let got = client.join().unwrap();
    assert!(got == expect, "the answer came back byte for byte ({} bytes)", got.len());
    assert_eq!(counts, (N as u64, N as u64));
    up.join().unwrap();
}

/// A service that echoes through the halves of its stream with `copy`.
struct SplitEchoFactory;
struct SplitEcho;

impl ServiceFactory for SplitEchoFactory {
    type Service<R: Runtime, S: ConnStream> = SplitEcho;
    type Error = std::convert::Infallible;
    fn new_service<R: Runtime, S: ConnStream>(&self, _worker: &Worker) -> Result<SplitEcho, Self::Error> {
        Ok(SplitEcho)
    }
}

impl<R: Runtime, S: ConnStream> corepin::Service<corepin::Connection<R, S>> for SplitEcho {
    type Response = ();
    type Error = std::io::Error;
    async fn call(&self, conn: corepin::Connection<R, S>) -> std::io::Result<()> {
        let (mut r, mut w) = conn.stream.into_split();
        corepin::copy(&mut r, &mut w).await?;
        w.shutdown().await
    }
}

/// Bytes moved through the halves of a connection's stream count into the core's counters.
pub fn split_halves_count_their_bytes<R: Runtime>() {
    let cfg = launch_cfg(CoreSelection::Count(1));
    let cpus = cfg.plan().unwrap();
    let app = TcpServer::bind("127.0.0.1:0".parse().unwrap(), cpus.len(), SplitEchoFactory).unwrap();
    let addr = app.local_addr();
    let server = start::<R, _>(&cfg, Arc::new(app));
    let mut total = 0u64;
    for i in 0..4 {
        let p = pattern(300_000 + i * 1001, i as u8);
        assert!(echo_once(addr, &p) == p, "echo {i} is exact");
        total += p.len() as u64;
    }
    let counters = server.counters().clone();
    let sum = |f: fn(&corepin::worker::CoreCounters) -> &std::sync::atomic::AtomicU64| -> u64 {
        (0..counters.len()).map(|i| corepin::worker::CoreCounters::get(f(counters.core(i)))).sum()
    };
    assert_eq!(sum(|c| &c.bytes_in), total, "bytes read through the read halves");
    assert_eq!(sum(|c| &c.bytes_out), total, "bytes written through the write halves");
    server.shutdown_handle().drain();
    within(Duration::from_secs(30), "drain", move || server.wait()).unwrap();
}

corepin::per_runtime_tests! {
    a_pair_of_apps_runs_both_on_every_worker,
    yield_now_lets_the_other_ready_tasks_run,
    send_file_moves_file_ranges_through_a_full_socket,
    a_write_deadline_frees_a_stalled_write,
    short_reads_and_writes_are_completed_by_the_helpers,
    eof_is_a_zero_length_read,
    the_buffer_comes_back_on_error,
    cancelled_reads_return_the_buffer_and_lose_no_data,
    a_dropped_read_never_writes_into_reused_memory,
    an_engine_stopped_with_operations_in_flight_exits_cleanly,
    udp_round_trip,
    file_read_at_and_write_at,
    timers_and_timeouts,
    fd_readiness_waits_for_data,
    each_worker_is_pinned_to_its_own_core,
    placement_spreads_over_a_simulated_two_node_topology,
    cross_core_messages_round_trip,
    a_panicking_cross_core_job_answers_its_caller,
    a_panicking_worker_stops_the_process_with_its_core,
    reuseport_spreads_connections_across_cores,
    connections_beyond_the_per_core_limit_are_closed,
    graceful_drain_lets_open_connections_finish,
    the_capability_report_describes_the_engine,
    a_finished_app_ends_the_server,
    fd_watch_waits_for_room_to_write,
    udp_readiness_is_level_triggered,
    pooled_reads_and_zero_copy_writes_move_the_same_bytes,
    pooled_reads_go_on_when_the_ring_is_lent_out,
    dropped_pooled_reads_give_their_buffers_back,
    a_burst_completes_every_waiting_pooled_read,
    a_listener_takes_a_burst_and_its_drop_closes_what_nobody_accepted,
    multishot_receive_stays_armed_and_stops_for_a_service_that_does_not_read,
    plain_reads_after_pooled_reads_keep_the_byte_order,
    pooled_file_reads_use_registered_buffers_and_go_on_without_them,
    a_small_locked_memory_share_leaves_reads_working_without_registered_buffers,
    echo_answers_exactly_with_borrowed_and_owned_buffers,
    an_engine_owns_its_thread_until_it_ends,
    an_acceptor_shapes_the_stream_a_service_sees,
    writev_gathers_buffers_of_different_kinds,
    udp_control_messages_carry_ecn_destination_and_segments,
    a_panicking_connection_closes_only_itself,
    sharded_state_lives_on_its_core_and_is_reached_by_invoke_on,
    split_halves_carry_a_full_duplex_transfer_from_two_tasks,
    shutting_the_write_half_is_a_half_close,
    a_split_read_half_reads_cancelably,
    copy_bidirectional_relays_both_ways_with_half_close,
    split_halves_count_their_bytes,
}
