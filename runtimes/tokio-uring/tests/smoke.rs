//! Smoke tests of the tokio-uring backend, each run inside `TokioUringRuntime::block_on`.
//!
//! Every test runs its engine on its own thread with a deadline, so a hang fails the test
//! instead of stalling the suite.

use std::future::{poll_fn, Future};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::pin::pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use corepin_core::buf::{BufResult, IoBuf};
use corepin_core::caps::Driver;
use corepin_core::io::{is_cancelled, AsyncReadRent, AsyncReadRentExt, AsyncWriteRent, AsyncWriteRentExt, CancelToken};
use corepin_core::runtime::{
    EngineError, EngineSettings, FdWatch, File, Metadata, OpenOptions, RingFlags, Runtime, TcpListener, TcpStream,
    UdpSocket,
};
use corepin_tokio_uring::TokioUringRuntime as Rt;

type Listener = <Rt as Runtime>::TcpListener;
type Stream = <Rt as Runtime>::TcpStream;
type Udp = <Rt as Runtime>::UdpSocket;
type RtFile = <Rt as Runtime>::File;
type Watch = <Rt as Runtime>::FdWatch;

/// Runs `main` in a fresh engine on its own thread; fails if it takes longer than `limit`.
fn run_with<T, F, Fut>(settings: EngineSettings, limit: Duration, main: F) -> Result<T, EngineError>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(Rt::block_on(&settings, main));
    });
    match rx.recv_timeout(limit) {
        Ok(r) => r,
        Err(e) => panic!("engine did not return within {limit:?}: {e}"),
    }
}

fn run<T, F, Fut>(main: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    run_with(EngineSettings::default(), Duration::from_secs(20), main).expect("engine builds")
}

fn std_listener() -> std::net::TcpListener {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.set_nonblocking(true).expect("nonblocking");
    l
}

/// Polls `fut` against a timer: `Some(output)` if it completes within `dur`.
async fn within<F: Future>(dur: Duration, fut: F) -> Option<F::Output> {
    let mut fut = pin!(fut);
    let mut timer = pin!(Rt::sleep(dur));
    poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        timer.as_mut().poll(cx).map(|()| None)
    })
    .await
}

/// A connected pair: an engine stream and its std peer.
async fn connected_pair() -> (Stream, std::net::TcpStream) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let s = Stream::connect(addr).await.expect("connect");
    let (peer, _) = l.accept().expect("accept");
    (s, peer)
}

#[test]
fn tcp_echo_round_trip_with_the_reported_ring_flags() {
    let caps = run(|| async {
        let caps = Rt::capabilities().expect("capabilities inside the engine");
        let listener = Listener::from_std(std_listener()).expect("adopt listener");
        let addr = listener.local_addr().expect("local addr");
        Rt::spawn_detached(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = Vec::with_capacity(64);
            loop {
                buf.clear();
                let BufResult(res, b) = s.read(buf).await;
                buf = b;
                match res.expect("server read") {
                    0 => break,
                    _ => {
                        let BufResult(res, b) = s.write_all(buf).await;
                        res.expect("server write");
                        buf = b;
                    }
                }
            }
            s.shutdown().await.expect("server shutdown");
        });

        let mut c = Stream::connect(addr).await.expect("connect");
        c.set_nodelay(true).expect("nodelay");
        assert_eq!(c.peer_addr().expect("peer addr"), addr);
        let local: SocketAddr = c.local_addr().expect("local addr");
        assert_eq!(local.ip(), addr.ip());
        assert_ne!(local.port(), addr.port());
        assert!(c.as_raw_fd() >= 0);

        let BufResult(res, _) = c.write_all(b"hello, ".to_vec()).await;
        assert_eq!(res.expect("write"), 7);
        let BufResult(res, _) = c.writev(vec![b"wor".to_vec(), b"ld".to_vec()]).await;
        assert_eq!(res.expect("writev"), 5);
        let BufResult(res, echoed) = c.read_exact(Vec::with_capacity(12)).await;
        assert_eq!(res.expect("read back"), 12);
        assert_eq!(&echoed[..], b"hello, world");

        c.shutdown().await.expect("client shutdown");
        let BufResult(res, _) = c.read(Vec::with_capacity(8)).await;
        assert_eq!(res.expect("eof"), 0, "server closes after our shutdown");
        caps
    });
    eprintln!("{caps}");
    assert_eq!(caps.runtime, "tokio-uring");
    assert_eq!(caps.driver, Driver::IoUring);
    assert_eq!(caps.ring_flags_requested, RingFlags::BEST);
    let flags = caps.ring_flags.expect("ring flags reported");
    assert!(RingFlags::BEST.fallbacks().contains(&flags), "from the fallback chain");
    assert!(flags.single_issuer, "SINGLE_ISSUER in effect: {flags:?}");
    assert!(flags.coop_taskrun, "COOP_TASKRUN replaces DEFER_TASKRUN: {flags:?}");
    assert!(!flags.defer_taskrun, "DEFER_TASKRUN hangs tokio-uring 0.5: {flags:?}");
    assert!(caps.notes.iter().any(|n| n.contains("DEFER_TASKRUN")), "{:?}", caps.notes);
    assert!(!caps.rent_copies);
    assert!(!caps.registered_buffers.used && !caps.splice.used && !caps.send_zc.used);
    assert!(caps.ring_entries >= 1024);
    assert!(Rt::capabilities().is_none(), "no report outside an engine");
}

#[test]
fn tcp_echo_works_with_sqpoll_and_with_no_flags() {
    let sqpoll = RingFlags { single_issuer: true, sqpoll_idle_ms: Some(50), ..RingFlags::NONE };
    let sqpoll_defer = RingFlags { sqpoll_idle_ms: Some(50), ..RingFlags::BEST };
    for flags in [sqpoll, sqpoll_defer, RingFlags::NONE] {
        let settings = EngineSettings { ring_flags: flags, ring_entries: 64, ..EngineSettings::default() };
        let got = run_with(settings, Duration::from_secs(20), || async {
            let (mut s, mut peer) = connected_pair().await;
            let BufResult(res, _) = s.write_all(&b"ping"[..]).await;
            res.expect("write");
            let mut four = [0u8; 4];
            peer.read_exact(&mut four).expect("peer read");
            peer.write_all(b"pong").expect("peer write");
            let BufResult(res, buf) = s.read_exact(Vec::with_capacity(4)).await;
            res.expect("read");
            assert_eq!(&buf[..], b"pong");
            Rt::capabilities().expect("caps").ring_flags.expect("flags")
        })
        .expect("engine builds");
        eprintln!("asked for {:?}, got {:?}", flags.names(), got.names());
        assert!(!got.defer_taskrun);
        assert!(flags.fallbacks().contains(&got), "accepted flags come from the fallback chain");
        if flags != sqpoll_defer {
            assert_eq!(got, flags, "asked without DEFER_TASKRUN: taken as asked");
        }
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("corepin-tokio-uring-{name}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[test]
fn file_write_at_read_at_and_metadata() {
    let dir = temp_dir("file");
    let path = dir.join("data.bin");
    let p = path.clone();
    run(move || async move {
        let f = RtFile::open_with(&p, OpenOptions::CREATE).await.expect("create");
        let BufResult(res, _) = f.write_at(b"0123456789".to_vec(), 0).await;
        assert_eq!(res.expect("write_at"), 10);
        let BufResult(res, _) = f.write_at(&b"AB"[..], 4).await;
        assert_eq!(res.expect("write_at 4"), 2);
        f.sync_all().await.expect("sync_all");

        let meta = f.metadata().await.expect("metadata");
        assert_eq!(meta.len, 10);
        assert!(meta.is_file && !meta.is_dir);
        let fstat = Metadata::from_fd(f.as_raw_fd()).expect("fstat");
        assert_eq!(meta, fstat, "statx agrees with fstat");

        let r = RtFile::open(&p).await.expect("open read-only");
        let BufResult(res, buf) = r.read_at(Vec::with_capacity(6), 2).await;
        assert_eq!(res.expect("read_at"), 6);
        assert_eq!(&buf[..], b"23AB67");
        let BufResult(res, _) = r.read_at(Vec::with_capacity(6), 10).await;
        assert_eq!(res.expect("read at end"), 0);

        let missing = RtFile::open(&p.with_extension("missing")).await;
        assert_eq!(missing.err().map(|e| e.kind()), Some(std::io::ErrorKind::NotFound));
    });
    assert_eq!(std::fs::read(&path).expect("std read"), b"0123AB6789");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fd_watch_completes_after_the_peer_sends_and_is_level_triggered() {
    run(|| async {
        let (a, b) = std::os::unix::net::UnixDatagram::pair().expect("socketpair");
        a.set_nonblocking(true).expect("nonblocking");
        let watch = Watch::new(a.as_raw_fd()).expect("watch");
        let twice = Watch::new(a.as_raw_fd()).expect("the same fd can be watched twice");

        assert!(within(Duration::from_millis(100), watch.readable()).await.is_none(), "not readable before a send");

        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            b.send(b"one").expect("send one");
            b.send(b"two").expect("send two");
            b
        });
        let t0 = Instant::now();
        within(Duration::from_secs(5), watch.readable()).await.expect("readable after the send").expect("ok");
        assert!(t0.elapsed() >= Duration::from_millis(30), "completed only after the peer sent");
        let b = sender.join().expect("sender");

        // Level-triggered: data remains, so it completes again at once (on both watches).
        for _ in 0..3 {
            within(Duration::from_millis(50), watch.readable()).await.expect("again at once").expect("ok");
        }
        within(Duration::from_millis(50), twice.readable()).await.expect("second watch").expect("ok");

        let mut buf = [0u8; 8];
        assert_eq!(a.recv(&mut buf).expect("recv one"), 3);
        within(Duration::from_millis(50), watch.readable()).await.expect("one datagram left").expect("ok");
        assert_eq!(a.recv(&mut buf).expect("recv two"), 3);
        assert!(within(Duration::from_millis(100), watch.readable()).await.is_none(), "drained: waits again");

        b.send(b"three").expect("send three");
        within(Duration::from_secs(5), watch.readable()).await.expect("readable again").expect("ok");
    });
}

#[test]
fn read_cancelable_returns_the_buffer_and_loses_no_data() {
    run(|| async {
        let (mut s, mut peer) = connected_pair().await;

        // Already fired: returns at once, buffer back, nothing read.
        let fired = CancelToken::new();
        fired.cancel();
        let BufResult(res, buf) = s.read_cancelable(Vec::with_capacity(32), &fired).await;
        assert!(is_cancelled(&res.expect_err("cancelled")));
        assert_eq!(buf.capacity(), 32);

        // Cancel a read that is really waiting.
        let token = CancelToken::new();
        let t2 = token.clone();
        Rt::spawn_detached(async move {
            Rt::sleep(Duration::from_millis(50)).await;
            t2.cancel();
        });
        let buf = Vec::with_capacity(32);
        let ptr = buf.as_ptr();
        let t0 = Instant::now();
        let BufResult(res, buf) = s.read_cancelable(buf, &token).await;
        let err = res.expect_err("cancelled read");
        assert!(is_cancelled(&err), "{err}");
        assert!(t0.elapsed() >= Duration::from_millis(40));
        assert_eq!(buf.as_ptr(), ptr, "the same buffer came back");
        assert!(buf.is_empty());

        // Data sent after the cancel is all there.
        peer.write_all(b"hello after cancel").expect("peer write");
        let BufResult(res, got) = s.read_exact(Vec::with_capacity(18)).await;
        res.expect("read after cancel");
        assert_eq!(&got[..], b"hello after cancel");

        // A cancelable read with a live token reads data, including data that is already
        // there (readiness was cleared by the read above and must be re-armed correctly).
        peer.write_all(b"abc").expect("peer write");
        let live = CancelToken::new();
        let mut got = Vec::with_capacity(3);
        while got.len() < 3 {
            let BufResult(res, b) = s.read_cancelable(got.slice(..), &live).await;
            got = b.into_inner();
            assert!(res.expect("cancelable read") > 0);
        }
        assert_eq!(&got[..], b"abc");

        // Waiting, then data arrives: completes with it.
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            peer.write_all(b"late").expect("late write");
            peer
        });
        let BufResult(res, got) = s.read_cancelable(Vec::with_capacity(16), &live).await;
        assert_eq!(res.expect("late read"), 4);
        assert_eq!(&got[..], b"late");
        let mut peer = writer.join().expect("writer");

        // Cancel twice in a row, then the plain read still sees every byte.
        for _ in 0..2 {
            let token = CancelToken::new();
            let t = token.clone();
            Rt::spawn_detached(async move {
                Rt::sleep(Duration::from_millis(10)).await;
                t.cancel();
            });
            let BufResult(res, _) = s.read_cancelable(Vec::with_capacity(8), &token).await;
            assert!(is_cancelled(&res.expect_err("cancelled")));
        }
        peer.write_all(b"xyz").expect("peer write");
        drop(peer);
        let mut all = Vec::new();
        loop {
            let BufResult(res, b) = s.read(Vec::with_capacity(16)).await;
            let n = res.expect("read");
            if n == 0 {
                break;
            }
            all.extend_from_slice(&b[..n]);
        }
        assert_eq!(all, b"xyz");
    });
}

#[test]
fn runtime_dropped_with_a_pending_read_returns() {
    use std::sync::{Arc, Mutex};
    // What each pending op did: "waiting" when it was about to await, anything else if it
    // completed (which it must not: nothing ever makes these ops ready).
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let l = log.clone();
    let t0 = Instant::now();
    let kept = run(move || async move {
        let note = move |what: String| {
            let l = l.clone();
            move || l.lock().map(|mut v| v.push(what)).unwrap_or(())
        };
        let (mut s, peer) = connected_pair().await;
        let (waiting, done) = (note("waiting".into()), note("read completed".into()));
        Rt::spawn_detached(async move {
            waiting();
            let _ = s.read(Vec::with_capacity(64)).await;
            done();
        });
        let (mut s2, peer2) = connected_pair().await;
        let (waiting, done) = (note("waiting".into()), note("read_cancelable completed".into()));
        Rt::spawn_detached(async move {
            waiting();
            let token = CancelToken::new();
            let _ = s2.read_cancelable(Vec::with_capacity(64), &token).await;
            done();
        });
        let listener = Listener::from_std(std_listener()).expect("listener");
        let (waiting, done) = (note("waiting".into()), note("accept completed".into()));
        Rt::spawn_detached(async move {
            waiting();
            let _ = listener.accept().await;
            done();
        });
        let udp = Udp::bind("127.0.0.1:0".parse().expect("addr")).expect("udp");
        let (waiting, done) = (note("waiting".into()), note("recv_from completed".into()));
        Rt::spawn_detached(async move {
            waiting();
            let _ = udp.recv_from(Vec::with_capacity(64)).await;
            done();
        });
        let (a, b) = std::os::unix::net::UnixDatagram::pair().expect("socketpair");
        let watch = Watch::new(a.as_raw_fd()).expect("watch");
        let (waiting, done) = (note("waiting".into()), note("watch completed".into()));
        Rt::spawn_detached(async move {
            waiting();
            let _ = watch.readable().await;
            done();
        });
        // Let every op reach the kernel / the reactor.
        Rt::sleep(Duration::from_millis(50)).await;
        // The peers stay open until after the engine is gone, so only teardown ends the ops.
        (peer, peer2, a, b)
    });
    assert!(t0.elapsed() < Duration::from_secs(5));
    drop(kept);
    let log = log.lock().expect("log").clone();
    assert_eq!(log, vec!["waiting"; 5], "every op was pending and none completed");
}

#[test]
fn engines_run_one_after_another_on_one_thread() {
    let handle = std::thread::spawn(|| {
        for round in 0..3 {
            let out = Rt::block_on(&EngineSettings::default(), move || async move {
                let (mut s, mut peer) = connected_pair().await;
                peer.write_all(b"x").expect("peer write");
                let BufResult(res, _) = s.read(Vec::with_capacity(4)).await;
                assert_eq!(res.expect("read"), 1);
                assert!(Rt::capabilities().is_some());
                round
            })
            .expect("engine builds");
            assert_eq!(out, round);
            assert!(Rt::capabilities().is_none());
        }
    });
    handle.join().expect("three engines in a row");
}

#[test]
fn forced_fallback_is_a_build_error_not_a_panic() {
    let settings = EngineSettings { force_fallback: true, cpu: 3, ..EngineSettings::default() };
    let err = run_with(settings, Duration::from_secs(5), || async {}).expect_err("no epoll driver");
    let EngineError::Build { runtime, cpu, reason } = &err;
    assert_eq!((*runtime, *cpu), ("tokio-uring", 3));
    assert!(reason.contains("fallback"), "{reason}");
    eprintln!("{err}");
}

#[test]
fn impossible_ring_is_a_build_error_not_a_panic() {
    let settings = EngineSettings { ring_entries: 0, ..EngineSettings::default() };
    let err = run_with(settings, Duration::from_secs(5), || async {}).expect_err("zero entries");
    eprintln!("{err}");
    let EngineError::Build { reason, .. } = &err;
    assert!(reason.contains("entries"), "{reason}");
}

#[test]
fn nested_block_on_is_refused() {
    let nested = run(|| async { Rt::block_on(&EngineSettings::default(), || async {}).err().map(|e| e.to_string()) });
    assert!(nested.expect("refused").contains("already running"));
}

/// Evidence for dropping DEFER_TASKRUN: raw tokio-uring 0.5 with SINGLE_ISSUER|DEFER_TASKRUN
/// never completes an accept/connect round trip (its driver never enters with GETEVENTS).
/// Ignored because it deliberately leaks a hung thread; run with `--ignored` to re-check on a
/// new tokio-uring or kernel.
#[test]
#[ignore]
fn raw_tokio_uring_hangs_with_defer_taskrun() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut urb = io_uring::IoUring::builder();
        urb.setup_single_issuer().setup_defer_taskrun();
        let mut b = tokio_uring::builder();
        b.entries(64).uring_builder(&urb);
        let rt = tokio_uring::Runtime::new(&b).expect("kernel accepts DEFER_TASKRUN");
        rt.block_on(async {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = l.local_addr().expect("addr");
            let l = tokio_uring::net::TcpListener::from_std(l);
            tokio_uring::spawn(async move {
                let _ = l.accept().await;
            });
            let _ = tokio_uring::net::TcpStream::connect(addr).await;
        });
        let _ = tx.send(());
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(3)).is_err(),
        "tokio-uring now completes I/O with DEFER_TASKRUN: revisit ring::backend_request"
    );
}
