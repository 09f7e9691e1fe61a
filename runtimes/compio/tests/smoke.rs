//! Smoke tests of the compio backend, each run inside `CompioRuntime::block_on`: what is
//! particular to compio (ring flags it takes, the statx metadata path, zero-copy send), the
//! rest being the shared conformance suite's.
//!
//! Every test runs its engine on its own thread with a deadline, so a hang fails the test
//! instead of stalling the suite.

use std::future::Future;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use corepin_compio::CompioRuntime as Rt;
use corepin_core::buf::{BufResult, IoBuf};
use corepin_core::caps::Driver;
use corepin_core::io::{AsyncReadRent, AsyncReadRentExt, AsyncWriteRent, AsyncWriteRentExt};
use corepin_core::runtime::{EngineError, EngineSettings, File, Metadata, OpenOptions, RingFlags, Runtime, TcpStream};

type Stream = <Rt as Runtime>::TcpStream;
type RtFile = <Rt as Runtime>::File;

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

/// A connected pair: an engine stream and its std peer.
async fn connected_pair() -> (Stream, std::net::TcpStream) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let s = Stream::connect(addr).await.expect("connect");
    let (peer, _) = l.accept().expect("accept");
    (s, peer)
}

/// One ping-pong on a fresh pair, then the flags the engine reports.
async fn ping_pong() -> RingFlags {
    let (mut s, mut peer) = connected_pair().await;
    let BufResult(res, _) = s.write_all(&b"ping"[..]).await;
    res.expect("write");
    let mut four = [0u8; 4];
    peer.read_exact(&mut four).expect("peer read");
    assert_eq!(&four, b"ping");
    peer.write_all(b"pong").expect("peer write");
    let BufResult(res, buf) = s.read_exact(Vec::with_capacity(4)).await;
    res.expect("read");
    assert_eq!(&buf[..], b"pong");
    Rt::capabilities().expect("caps").ring_flags.expect("flags")
}

/// compio takes every flag corepin asks for, DEFER_TASKRUN included (it waits with
/// GETEVENTS), and I/O completes with each.
#[test]
fn io_completes_with_every_flag_set_compio_takes() {
    let sqpoll = RingFlags { single_issuer: true, sqpoll_idle_ms: Some(50), ..RingFlags::NONE };
    let coop = RingFlags { single_issuer: true, coop_taskrun: true, ..RingFlags::NONE };
    for flags in [RingFlags::BEST, coop, sqpoll, RingFlags::NONE] {
        let settings = EngineSettings { ring_flags: flags, ring_entries: 64, ..EngineSettings::default() };
        let got = run_with(settings, Duration::from_secs(20), ping_pong).expect("engine builds");
        eprintln!("asked for {:?}, got {:?}", flags.names(), got.names());
        assert!(flags.fallbacks().contains(&got), "accepted flags come from the fallback chain");
        assert!(got.single_issuer == flags.single_issuer, "this kernel takes SINGLE_ISSUER: {got:?}");
    }
}

#[test]
fn the_report_names_compio_and_the_rounded_ring_size() {
    let settings = EngineSettings { ring_entries: 100, ..EngineSettings::default() };
    let caps = run_with(settings, Duration::from_secs(20), || async { Rt::capabilities() })
        .expect("engine builds")
        .expect("a report inside the engine");
    eprintln!("{caps}");
    assert_eq!(caps.runtime, "compio");
    assert_eq!(caps.driver, Driver::IoUring);
    assert_eq!(caps.ring_entries, 128, "io_uring rounds the SQ up to a power of two");
    assert!(!caps.rent_copies);
}

fn temp_dir(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("corepin-compio-{name}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Files: positional I/O, and metadata from the STATX op agreeing with fstat(2).
#[test]
fn file_write_at_read_at_and_statx_metadata() {
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

        let std_file = std::fs::File::open(&p).expect("std open");
        let adopted = RtFile::from_std(std_file).expect("adopt");
        let BufResult(res, buf) = adopted.read_at(Vec::with_capacity(6), 2).await;
        assert_eq!(res.expect("read_at"), 6);
        assert_eq!(&buf[..], b"23AB67");
        let BufResult(res, _) = adopted.read_at(Vec::with_capacity(6), 10).await;
        assert_eq!(res.expect("read at end"), 0);

        let missing = RtFile::open(&p.with_extension("missing")).await;
        assert_eq!(missing.err().map(|e| e.kind()), Some(std::io::ErrorKind::NotFound));
    });
    assert_eq!(std::fs::read(&path).expect("std read"), b"0123AB6789");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A read into a slice fills the slice from its start, and a read into a buffer that already
/// holds bytes overwrites from the start without shrinking it (corepin's read model).
#[test]
fn reads_fill_from_the_start_of_the_buffer() {
    run(|| async {
        let (mut s, mut peer) = connected_pair().await;
        peer.write_all(b"abc").expect("peer write");
        let mut buf = Vec::with_capacity(16);
        buf.extend_from_slice(b"0123");
        let BufResult(res, slice) = s.read(buf.slice(4..)).await;
        assert_eq!(res.expect("read"), 3);
        assert_eq!(slice.into_inner(), b"0123abc");
        peer.write_all(b"Z").expect("peer write");
        let BufResult(res, buf) = s.read(b"xyzw".to_vec()).await;
        assert_eq!(res.expect("read"), 1);
        assert_eq!(buf, b"Zyzw");
    });
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
    let err = run_with(settings, Duration::from_secs(5), || async {}).expect_err("no readiness driver");
    let EngineError::Build { runtime, cpu, reason } = &err;
    assert_eq!((*runtime, *cpu), ("compio", 3));
    assert!(reason.contains("fallback"), "{reason}");
    assert!(Rt::capabilities().is_none());
}

#[test]
fn impossible_ring_is_a_build_error_not_a_panic() {
    let settings = EngineSettings { ring_entries: 0, ..EngineSettings::default() };
    let err = run_with(settings, Duration::from_secs(5), || async {}).expect_err("zero entries");
    eprintln!("{err}");
    let EngineError::Build { reason, .. } = &err;
    assert!(reason.contains("entries"), "{reason}");
}

/// A cancelable read on an idle socket ends with ECANCELED soon after its token fires, the
/// buffer comes back, and the next read gets the bytes sent afterwards.
#[test]
fn a_fired_token_ends_an_idle_read_and_loses_nothing() {
    use corepin_core::io::{is_cancelled, CancelToken};
    run(|| async {
        let (mut s, mut peer) = connected_pair().await;
        let token = CancelToken::new();
        let t = token.clone();
        Rt::spawn_detached(async move {
            Rt::sleep(Duration::from_millis(30)).await;
            t.cancel();
        });
        let buf = Vec::with_capacity(8);
        let ptr = buf.as_ptr();
        let BufResult(res, buf) = s.read_cancelable(buf, &token).await;
        assert!(res.as_ref().is_err_and(is_cancelled), "{res:?}");
        assert_eq!(buf.as_ptr(), ptr, "the buffer comes back");
        peer.write_all(b"after").expect("peer write");
        let BufResult(res, buf) = s.read(buf).await;
        assert_eq!(res.expect("read"), 5);
        assert_eq!(&buf[..], b"after");
    });
}

/// `write_zc` (SEND_ZC where the kernel has it) moves every byte and gives the caller's buffer
/// back, the same memory, after the kernel released it.
#[test]
fn zero_copy_writes_move_every_byte_and_return_the_buffer() {
    let data: Vec<u8> = (0..(1usize << 20)).map(|i| (i * 7 % 251) as u8).collect();
    let expect = data.clone();
    let caps = run(move || async move {
        let (mut s, mut peer) = connected_pair().await;
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).expect("peer read");
            got
        });
        let mut buf = data;
        let ptr = buf.as_ptr();
        let mut sent = 0;
        while sent < buf.len() {
            let BufResult(r, b) = s.write_zc(buf.slice(sent..)).await;
            buf = b.into_inner();
            assert_eq!(buf.as_ptr(), ptr, "the same buffer comes back");
            sent += r.expect("write_zc");
        }
        s.shutdown().await.expect("shutdown");
        let got = reader.join().expect("reader");
        assert!(got == expect, "write_zc delivered different bytes");
        Rt::capabilities().expect("caps")
    });
    assert_eq!(caps.send_zc.used, caps.send_zc.kernel, "{caps}");
}

/// Multishot accept: every connection is handed out with its peer address, also when an
/// `accept` future was dropped while the operation was armed.
#[test]
fn multishot_accept_hands_out_every_connection_with_its_peer() {
    use corepin_core::runtime::TcpListener;
    type Listener = <Rt as Runtime>::TcpListener;
    const N: usize = 20;
    run(|| async {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let listener = Listener::from_std(std_listener).expect("adopt");
        let addr = listener.local_addr().expect("addr");
        // Arm the accept, then give up on it before anyone connects.
        let gave_up = corepin_core::task::timeout::<Rt, _>(Duration::from_millis(20), listener.accept()).await;
        assert!(gave_up.is_err(), "nobody connected yet");
        let clients = std::thread::spawn(move || {
            (0..N)
                .map(|_| {
                    let c = std::net::TcpStream::connect(addr).expect("connect");
                    let local = c.local_addr().expect("client addr");
                    (c, local)
                })
                .collect::<Vec<_>>()
        });
        let mut peers = Vec::new();
        for _ in 0..N {
            let (mut s, peer) = listener.accept().await.expect("accept");
            assert_eq!(s.peer_addr().expect("peer addr"), peer);
            let BufResult(r, _) = s.write_all(&b"hi"[..]).await;
            r.expect("write");
            peers.push(peer);
        }
        let clients = clients.join().expect("clients");
        let mut want: Vec<_> = clients.iter().map(|(_, a)| *a).collect();
        want.sort();
        peers.sort();
        assert_eq!(peers, want, "each connection once, with its peer address");
        for (mut c, _) in clients {
            let mut hi = [0u8; 2];
            c.read_exact(&mut hi).expect("greeting");
            assert_eq!(&hi, b"hi");
        }
        let caps = Rt::capabilities().expect("caps");
        assert_eq!(caps.multishot_accept.used, caps.multishot_accept.kernel, "{caps}");
    });
}

/// Several tasks accepting on one listener at once all get connections (compio wakes only
/// the last poller of its multishot operation; the backend passes the wake on), also after
/// one of them gave up waiting.
#[test]
fn concurrent_accepts_share_the_multishot_operation() {
    use corepin_core::runtime::TcpListener;
    use std::cell::Cell;
    use std::rc::Rc;
    type Listener = <Rt as Runtime>::TcpListener;
    const N: usize = 12;
    run(|| async {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let listener = Rc::new(Listener::from_std(std_listener).expect("adopt"));
        let addr = listener.local_addr().expect("addr");
        let accepted = Rc::new(Cell::new(0usize));
        // N tasks waiting at once, each for one connection, with no timeout of their own:
        // a task compio does not wake would wait forever.
        for _ in 0..N {
            let (l, n) = (listener.clone(), accepted.clone());
            Rt::spawn_detached(async move {
                l.accept().await.expect("accept");
                n.set(n.get() + 1);
            });
        }
        // One more acceptor that gives up while the others wait.
        let gave_up = corepin_core::task::timeout::<Rt, _>(Duration::from_millis(20), listener.accept()).await;
        assert!(gave_up.is_err());
        let clients = std::thread::spawn(move || {
            (0..N).map(|_| std::net::TcpStream::connect(addr).expect("connect")).collect::<Vec<_>>()
        });
        for _ in 0..400 {
            if accepted.get() == N {
                break;
            }
            Rt::sleep(Duration::from_millis(10)).await;
        }
        let _clients = clients.join().expect("clients");
        assert_eq!(accepted.get(), N, "every connection accepted by one of the tasks");
    });
}
