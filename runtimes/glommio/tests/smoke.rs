//! Smoke tests of the glommio backend: each runs inside `GlommioRuntime::block_on` and uses
//! only corepin's contract (plus std/libc to drive the other end).

use std::cell::Cell;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::rc::Rc;
use std::time::Duration;

use corepin_core::buf::{BufResult, IoBuf};
use corepin_core::caps::Driver;
use corepin_core::io::{is_cancelled, AsyncReadRent, AsyncReadRentExt, AsyncWriteRent, AsyncWriteRentExt, CancelToken};
use corepin_core::runtime::{EngineError, EngineSettings, FdWatch, Runtime, TcpListener, TcpStream};
use corepin_core::task::{spawn, timeout};
use corepin_glommio::GlommioRuntime as G;

type Listener = <G as Runtime>::TcpListener;
type Stream = <G as Runtime>::TcpStream;
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
