//! Smoke tests of the glommio backend: each runs inside `GlommioRuntime::block_on` and uses
//! only corepin's contract (plus std/libc to drive the other end).

use std::cell::Cell;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use corepin_core::buf::{BufResult, IoBuf};
use corepin_core::caps::Driver;
use corepin_core::io::{is_cancelled, AsyncReadRent, AsyncReadRentExt, AsyncWriteRent, AsyncWriteRentExt, CancelToken};
use corepin_core::runtime::{
    EngineError, EngineSettings, FdWatch, File, OpenOptions, Runtime, TcpListener, TcpStream, UdpSocket,
};
use corepin_core::task::{spawn, timeout};
use corepin_glommio::GlommioRuntime as G;

type Listener = <G as Runtime>::TcpListener;
type Stream = <G as Runtime>::TcpStream;
type Udp = <G as Runtime>::UdpSocket;
type Watch = <G as Runtime>::FdWatch;

const LONG: Duration = Duration::from_secs(5);

fn run<Fut: std::future::Future>(f: impl FnOnce() -> Fut) -> Fut::Output {
    G::block_on(&EngineSettings::default(), f).expect("glommio engine builds")
}

fn listener() -> Listener {
    let std = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std.set_nonblocking(true).unwrap();
    Listener::from_std(std).unwrap()
}

/// A connected pair: (accepted server side, client side).
async fn pair() -> (Stream, Stream) {
    let l = listener();
    let addr = l.local_addr().unwrap();
    let client = spawn::<G, _>(async move { Stream::connect(addr).await.unwrap() });
    let (server, peer) = l.accept().await.unwrap();
    let client = client.await.unwrap();
    assert_eq!(peer, client.local_addr().unwrap());
    (server, client)
}

#[test]
fn capabilities_are_reported_inside_the_engine_only() {
    assert!(G::capabilities().is_none());
    let caps = run(|| async { G::capabilities() }).unwrap();
    assert_eq!(caps.runtime, "glommio");
    assert_eq!(caps.driver, Driver::IoUring);
    assert_eq!(caps.ring_flags, None);
    assert!(caps.ring_entries > 0);
    assert!(caps.rent_copies);
    assert!(!caps.splice.used && !caps.send_zc.used);
    println!("{caps}");
    assert!(G::capabilities().is_none());
}

#[test]
fn forced_fallback_and_tiny_budgets_are_build_errors() {
    let forced = EngineSettings { force_fallback: true, ..EngineSettings::default() };
    let err = G::block_on(&forced, || async {}).unwrap_err();
    let EngineError::Build { runtime, reason, .. } = &err;
    assert_eq!(*runtime, "glommio");
    assert!(reason.contains("no fallback") || reason.contains("has none"), "{err}");

    let tiny = EngineSettings { memlock_budget: 64 * 1024, ..EngineSettings::default() };
    let err = G::block_on(&tiny, || async {}).unwrap_err();
    assert!(err.to_string().contains("RLIMIT_MEMLOCK"), "{err}");
}

#[test]
fn tcp_echo_round_trip() {
    run(|| async {
        let l = listener();
        let addr: SocketAddr = l.local_addr().unwrap();
        // The server waits in accept before the client exists (the io_uring accept path).
        let server = spawn::<G, _>(async move {
            let (mut s, _peer) = l.accept().await.unwrap();
            s.set_nodelay(true).unwrap();
            let mut total = 0;
            loop {
                let BufResult(r, buf) = s.read(Vec::with_capacity(4096)).await;
                let n = r.unwrap();
                if n == 0 {
                    break;
                }
                total += n;
                let BufResult(w, _) = s.write_all(buf).await;
                assert_eq!(w.unwrap(), n);
            }
            s.shutdown().await.unwrap();
            total
        });
        G::sleep(Duration::from_millis(20)).await;

        let mut c = Stream::connect(addr).await.unwrap();
        c.set_nodelay(true).unwrap();
        assert_eq!(c.peer_addr().unwrap(), addr);
        assert!(c.as_raw_fd() >= 0);

        let BufResult(r, _) = c.write_all(b"hello, glommio".to_vec()).await;
        assert_eq!(r.unwrap(), 14);
        let BufResult(r, echoed) = c.read_exact(Vec::with_capacity(14)).await;
        r.unwrap();
        assert_eq!(&echoed[..], b"hello, glommio");

        let BufResult(r, _) = c.writev(vec![b"gather ".to_vec(), Vec::new(), b"write".to_vec()]).await;
        assert_eq!(r.unwrap(), 12);
        let BufResult(r, echoed) = c.read_exact(Vec::with_capacity(12)).await;
        r.unwrap();
        assert_eq!(&echoed[..], b"gather write");

        // A bigger payload, echoed back chunk by chunk (the stream is not split, so the
        // client alternates writing a chunk and reading it back).
        let big: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
        let mut back = Vec::with_capacity(big.len());
        for chunk in big.chunks(16 * 1024) {
            let BufResult(r, _) = c.write_all(chunk.to_vec()).await;
            r.unwrap();
            let BufResult(r, got) = c.read_exact(Vec::with_capacity(chunk.len())).await;
            r.unwrap();
            back.extend_from_slice(&got);
        }
        assert!(back == big);

        c.shutdown().await.unwrap();
        let BufResult(r, _) = c.read(Vec::with_capacity(16)).await;
        assert_eq!(r.unwrap(), 0, "the server shut down after our end of stream");
        assert_eq!(server.await.unwrap(), 14 + 12 + big.len());
    });
}

#[test]
fn reads_append_through_slices() {
    run(|| async {
        let (mut s, mut c) = pair().await;
        let BufResult(r, _) = c.write_all(&b"abcdef"[..]).await;
        r.unwrap();
        let mut buf = Vec::with_capacity(6);
        buf.extend_from_slice(b"xy");
        let BufResult(r, slice) = s.read_exact(buf.slice(2..6)).await;
        assert_eq!(r.unwrap(), 4);
        let buf = slice.into_inner();
        assert_eq!(&buf[..], b"xyabcd");
    });
}

#[test]
fn read_cancelable_returns_the_buffer_and_loses_no_data() {
    run(|| async {
        let (mut s, mut c) = pair().await;
        let token = CancelToken::new();
        let t2 = token.clone();
        spawn::<G, _>(async move {
            G::sleep(Duration::from_millis(30)).await;
            t2.cancel();
        });
        let BufResult(r, buf) = timeout::<G, _>(LONG, s.read_cancelable(Vec::with_capacity(64), &token))
            .await
            .expect("cancel completes the read promptly");
        let err = r.unwrap_err();
        assert!(is_cancelled(&err), "{err:?}");
        assert_eq!(buf.capacity(), 64, "the buffer comes back");
        assert!(buf.is_empty());

        // Bytes sent after the cancellation all arrive on the same stream.
        let BufResult(r, _) = c.write_all(&b"after cancel"[..]).await;
        r.unwrap();
        let BufResult(r, got) = timeout::<G, _>(LONG, s.read_exact(buf.slice(0..12))).await.unwrap();
        r.unwrap();
        assert_eq!(&got.into_inner()[..], b"after cancel");

        // A fired token does not hide data that is already there.
        let BufResult(r, _) = c.write_all(&b"ready"[..]).await;
        r.unwrap();
        G::sleep(Duration::from_millis(10)).await;
        assert!(token.is_cancelled());
        let BufResult(r, got) = timeout::<G, _>(LONG, s.read_cancelable(Vec::with_capacity(64), &token)).await.unwrap();
        assert_eq!(r.unwrap(), 5);
        assert_eq!(&got[..], b"ready");
    });
}

#[test]
fn udp_round_trip() {
    run(|| async {
        let a = Udp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = Udp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let a_addr = a.local_addr().unwrap();
        let b_addr = b.local_addr().unwrap();
        assert!(a.as_raw_fd() >= 0);

        // b waits first (the io_uring recvmsg path), then a sends.
        let receiver = spawn::<G, _>(async move {
            let BufResult(r, buf) = b.recv_from(Vec::with_capacity(1500)).await;
            let (n, from) = r.unwrap();
            (n, from, buf, b)
        });
        G::sleep(Duration::from_millis(20)).await;
        let BufResult(r, _) = a.send_to(b"ping".to_vec(), b_addr).await;
        assert_eq!(r.unwrap(), 4);
        let (n, from, buf, b) = receiver.await.unwrap();
        assert_eq!((n, from), (4, a_addr));
        assert_eq!(&buf[..], b"ping");

        // The reply finds the datagram already queued (the direct recvmsg path).
        let BufResult(r, _) = b.send_to(&b"pong!"[..], a_addr).await;
        assert_eq!(r.unwrap(), 5);
        G::sleep(Duration::from_millis(10)).await;
        let BufResult(r, buf) = timeout::<G, _>(LONG, a.recv_from(Vec::with_capacity(16))).await.unwrap();
        assert_eq!(r.unwrap(), (5, b_addr));
        assert_eq!(&buf[..], b"pong!");
    });
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("corepin-glommio-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn file_write_at_read_at_metadata_sync() {
    let dir = TempDir::new("file");
    let path = dir.0.join("data.bin");
    let p2 = path.clone();
    run(move || async move {
        let f = <G as Runtime>::File::open_with(&p2, OpenOptions::CREATE).await.unwrap();
        let BufResult(r, _) = f.write_at(b"hello world".to_vec(), 0).await;
        assert_eq!(r.unwrap(), 11);
        let BufResult(r, _) = f.write_at("glommio", 6).await;
        assert_eq!(r.unwrap(), 7);
        f.sync_all().await.unwrap();
        let md = f.metadata().await.unwrap();
        assert_eq!(md.len, 13);
        assert!(md.is_file && !md.is_dir);
        assert!(f.as_raw_fd() >= 0);

        let r = <G as Runtime>::File::open(&p2).await.unwrap();
        let BufResult(res, buf) = r.read_at(Vec::with_capacity(64), 0).await;
        assert_eq!(res.unwrap(), 13);
        assert_eq!(&buf[..], b"hello glommio");
        let BufResult(res, buf) = r.read_at(Vec::with_capacity(4), 6).await;
        assert_eq!(res.unwrap(), 4);
        assert_eq!(&buf[..], b"glom");
        let BufResult(res, _) = r.read_at(Vec::with_capacity(4), 100).await;
        assert_eq!(res.unwrap(), 0, "reading past the end is end of file");

        let missing = <G as Runtime>::File::open(&p2.with_extension("missing")).await;
        let err = missing.err().expect("opening a missing file fails");
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    });
    assert_eq!(std::fs::read(&path).unwrap(), b"hello glommio");
}

/// Spawns `watch.readable()` and returns a flag that turns true when it completes.
fn watch_in_background(watch: Rc<Watch>) -> Rc<Cell<bool>> {
    let fired = Rc::new(Cell::new(false));
    let f = fired.clone();
    G::spawn_detached(async move {
        watch.readable().await.unwrap();
        f.set(true);
    });
    fired
}

async fn wait_for(flag: &Cell<bool>) {
    for _ in 0..500 {
        if flag.get() {
            return;
        }
        G::sleep(Duration::from_millis(10)).await;
    }
    panic!("the watch never completed");
}

#[test]
fn fd_watch_on_a_unix_datagram_socketpair() {
    run(|| async {
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let watch = Rc::new(Watch::new(a.as_raw_fd()).unwrap());

        let fired = watch_in_background(watch.clone());
        G::sleep(Duration::from_millis(50)).await;
        assert!(!fired.get(), "readable before anything was sent");

        b.send(b"ding").unwrap();
        wait_for(&fired).await;

        // Level-triggered and non-consuming: still readable, and the datagram is intact.
        timeout::<G, _>(LONG, watch.readable()).await.unwrap().unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(a.recv(&mut buf).unwrap(), 4);
        assert_eq!(&buf[..4], b"ding");

        // Drained: not readable again until the next send.
        let again = watch_in_background(watch.clone());
        G::sleep(Duration::from_millis(50)).await;
        assert!(!again.get(), "readable after the socket was drained");
        b.send(b"dong").unwrap();
        wait_for(&again).await;
        assert_eq!(a.recv(&mut buf).unwrap(), 4);
    });
}

#[test]
fn fd_watch_on_an_eventfd() {
    run(|| async {
        // SAFETY: eventfd returns a fresh descriptor (or -1, checked below).
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: `raw` is a fresh descriptor we own.
        let efd = unsafe { OwnedFd::from_raw_fd(raw) };
        let watch = Rc::new(Watch::new(efd.as_raw_fd()).unwrap());

        let fired = watch_in_background(watch.clone());
        G::sleep(Duration::from_millis(50)).await;
        assert!(!fired.get(), "readable before the eventfd was written");

        let mut file = std::fs::File::from(efd.try_clone().unwrap());
        file.write_all(&1u64.to_ne_bytes()).unwrap();
        wait_for(&fired).await;
        timeout::<G, _>(LONG, watch.readable()).await.unwrap().unwrap();

        // Reading the counter makes it not readable again.
        let mut v = [0u8; 8];
        // SAFETY: `v` is 8 writable bytes, as eventfd reads need.
        assert_eq!(unsafe { libc::read(efd.as_raw_fd(), v.as_mut_ptr().cast(), 8) }, 8);
        assert_eq!(u64::from_ne_bytes(v), 1);
        let again = watch_in_background(watch.clone());
        G::sleep(Duration::from_millis(50)).await;
        assert!(!again.get(), "readable after the counter was read");
        file.write_all(&2u64.to_ne_bytes()).unwrap();
        wait_for(&again).await;
    });
}

#[test]
fn fd_watch_on_a_pipe_uses_the_same_path() {
    run(|| async {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 returns.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) }, 0);
        // SAFETY: both are fresh descriptors we own.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let watch = Rc::new(Watch::new(r.as_raw_fd()).unwrap());
        let fired = watch_in_background(watch.clone());
        G::sleep(Duration::from_millis(30)).await;
        assert!(!fired.get());
        std::fs::File::from(w).write_all(&b"x"[..]).unwrap();
        wait_for(&fired).await;
    });
}

#[test]
fn fd_watch_rejects_a_closed_descriptor() {
    run(|| async {
        let err = Watch::new(1_000_000).err().expect("a bad fd is refused");
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    });
}

#[test]
fn a_watch_whose_wait_was_dropped_still_works() {
    run(|| async {
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let watch = Watch::new(a.as_raw_fd()).unwrap();
        for _ in 0..3 {
            let early = timeout::<G, _>(Duration::from_millis(20), watch.readable()).await;
            assert!(early.is_err(), "readable before anything was sent");
        }
        b.send(b"x").unwrap();
        timeout::<G, _>(LONG, watch.readable()).await.expect("readable after a send").unwrap();

        // SAFETY: eventfd returns a fresh descriptor (checked below).
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: `raw` is a fresh descriptor we own.
        let efd = unsafe { OwnedFd::from_raw_fd(raw) };
        let watch = Watch::new(efd.as_raw_fd()).unwrap();
        for _ in 0..3 {
            let early = timeout::<G, _>(Duration::from_millis(20), watch.readable()).await;
            assert!(early.is_err(), "readable before the eventfd was written");
        }
        std::fs::File::from(efd.try_clone().unwrap()).write_all(&1u64.to_ne_bytes()).unwrap();
        timeout::<G, _>(LONG, watch.readable()).await.expect("readable after a write").unwrap();
    });
}

#[test]
fn writes_to_a_reset_connection_fail_and_return_the_buffer() {
    run(|| async {
        let (s, mut c) = pair().await;
        let l = libc::linger { l_onoff: 1, l_linger: 0 };
        // SAFETY: setsockopt with a valid linger struct on a socket we own.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&l as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
        drop(s); // RST
        G::sleep(Duration::from_millis(20)).await;
        let mut buf = vec![1u8; 64 << 10];
        let mut failed = false;
        for _ in 0..64 {
            let ptr = buf.as_ptr();
            let BufResult(r, b) = c.write(buf).await;
            assert_eq!(b.as_ptr(), ptr);
            buf = b;
            if r.is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "writing to a reset connection fails");
        let BufResult(r, b) = c.writev(vec![vec![1u8; 16]]).await;
        assert!(r.is_err());
        assert_eq!(b.len(), 1);
    });
}

#[test]
fn an_engine_stopped_with_operations_in_flight_exits_cleanly() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        run(|| async move {
            let s = Stream::connect(addr).await.unwrap();
            G::spawn_detached(async move {
                let mut s = s;
                let _ = s.read(Vec::with_capacity(1024)).await;
            });
            G::spawn_detached(async move { G::sleep(Duration::from_secs(3600)).await });
            let u = Udp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            G::spawn_detached(async move {
                let _ = u.recv_from(Vec::with_capacity(1500)).await;
            });
            let (a, _b) = UnixDatagram::pair().unwrap();
            G::spawn_detached(async move {
                let w = Watch::new(a.as_raw_fd()).unwrap();
                let _ = w.readable().await;
                drop(a);
            });
            G::sleep(Duration::from_millis(20)).await;
        });
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(30)).expect("the engine tears down with operations in flight");
    drop(l);
}

#[test]
fn many_cancelled_reads_against_a_trickling_peer_lose_nothing() {
    const TOTAL: usize = 300;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let peer = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        for i in 0..TOTAL {
            s.write_all(&[(i % 251) as u8]).unwrap();
            if i % 7 == 0 {
                std::thread::sleep(Duration::from_millis(3));
            }
        }
        let mut done = [0u8; 1];
        let _ = std::io::Read::read(&mut s, &mut done);
    });
    run(|| async move {
        let mut s = Stream::connect(addr).await.unwrap();
        let mut got = Vec::new();
        let mut cancelled = 0;
        let mut buf = Vec::with_capacity(3);
        while got.len() < TOTAL {
            let token = CancelToken::new();
            let t2 = token.clone();
            G::spawn_detached(async move {
                G::sleep(Duration::from_millis(1)).await;
                t2.cancel();
            });
            let ptr = buf.as_ptr();
            let BufResult(r, b) = s.read_cancelable(buf, &token).await;
            assert_eq!(b.as_ptr(), ptr, "the same buffer comes back");
            match r {
                Ok(0) => panic!("unexpected end of stream after {} bytes", got.len()),
                Ok(n) => got.extend_from_slice(&b[..n]),
                Err(e) if is_cancelled(&e) => cancelled += 1,
                Err(e) => panic!("read failed: {e}"),
            }
            buf = b;
            buf.clear();
        }
        let expect: Vec<u8> = (0..TOTAL).map(|i| (i % 251) as u8).collect();
        assert_eq!(got, expect, "bytes lost or reordered across {cancelled} cancelled reads");
        assert!(cancelled > 0, "the peer trickles, so some reads were cancelled");
        let BufResult(r, _) = s.write_all(&b"!"[..]).await;
        r.unwrap();
    });
    peer.join().unwrap();
}
