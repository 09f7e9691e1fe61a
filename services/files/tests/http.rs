//! The file server through real sockets on every backend (and Monoio's epoll fallback):
//! bodies compared by SHA-256, HTTP semantics, path safety, limits, timeouts, metrics, and an
//! independent client (curl) for a subset.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use corepin::launcher::LaunchConfig;
use corepin::pagecache::{residency, Residency};
use corepin::topology::CoreSelection;
use corepin::worker::Counters;
use corepin::{Runtime, Server, TcpServer};
use corepin_files::metrics::{FileMetrics, FilesCollector, TransferPath};
use corepin_files::{FilesConfig, FilesFactory, LargeBodies};
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

// ---- the served tree -------------------------------------------------------------------

const SIZES: [(&str, usize); 5] =
    [("empty.bin", 0), ("one.bin", 1), ("4k.bin", 4096), ("1m.bin", 1 << 20), ("100m.bin", 100 << 20)];

struct Tree {
    root: PathBuf,
    files: Vec<(String, Vec<u8>)>,
}

impl Tree {
    fn data(&self, name: &str) -> &[u8] {
        &self.files.iter().find(|(n, _)| n == name).unwrap().1
    }
}

fn sha(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

/// One tree per test process, shared read-only by every test and backend.
fn tree() -> &'static Tree {
    static TREE: OnceLock<Tree> = OnceLock::new();
    TREE.get_or_init(|| {
        // Under the target directory (on disk, so pages can be evicted from the page cache),
        // one tree per live test process: a static is never dropped, so trees that earlier
        // processes left behind are removed here.
        let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        for old in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = old.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("corepin-files-test-") {
                if !std::path::Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(old.path());
                }
            }
        }
        let base = tmp.join(format!("corepin-files-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let root = base.join("root");
        std::fs::create_dir_all(root.join("dir")).unwrap();
        std::fs::create_dir_all(root.join("noindex/sub dir")).unwrap();
        std::fs::create_dir_all(base.join("outside")).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let mut files = Vec::new();
        for (name, len) in SIZES {
            let mut data = vec![0u8; len];
            rng.fill_bytes(&mut data);
            std::fs::write(root.join(name), &data).unwrap();
            files.push((name.to_string(), data));
        }
        std::fs::write(root.join("dir/index.html"), b"<h1>dir index</h1>\n").unwrap();
        std::fs::write(root.join("page.html"), b"<p>page</p>\n").unwrap();
        std::fs::write(root.join("noindex/a <b>&\"q\".txt"), b"weird name\n").unwrap();
        std::fs::write(root.join("noindex/plain.txt"), b"plain\n").unwrap();
        std::fs::write(base.join("outside/secret.txt"), b"SECRET OUTSIDE THE ROOT\n").unwrap();
        std::os::unix::fs::symlink("4k.bin", root.join("link-in")).unwrap();
        std::os::unix::fs::symlink(base.join("outside/secret.txt"), root.join("link-out")).unwrap();
        std::os::unix::fs::symlink("../outside", root.join("dir-out")).unwrap();
        let fifo = std::ffi::CString::new(root.join("fifo").to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates a file system node.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        Tree { root, files }
    })
}

// ---- a server under test ---------------------------------------------------------------

struct Srv {
    server: Option<Server>,
    addr: SocketAddr,
    metrics: Arc<FileMetrics>,
    counters: Arc<Counters>,
}

fn serve<R: Runtime>(tweak: impl FnOnce(&mut FilesConfig)) -> Srv {
    serve_on::<R>(CoreSelection::Count(1), usize::MAX, tweak)
}

fn serve_on<R: Runtime>(cores: CoreSelection, max_conns: usize, tweak: impl FnOnce(&mut FilesConfig)) -> Srv {
    let mut cfg = FilesConfig::new(&tree().root);
    tweak(&mut cfg);
    let launch = LaunchConfig { cores, drain_timeout: Duration::from_secs(5), ..LaunchConfig::default() };
    let cpus = launch.plan().unwrap();
    let factory = FilesFactory::new(cfg, cpus.len()).unwrap();
    let metrics = factory.metrics().clone();
    let app = TcpServer::bind("127.0.0.1:0".parse().unwrap(), cpus.len(), factory)
        .unwrap()
        .max_connections_per_core(max_conns);
    let addr = app.local_addr();
    let server = Server::start::<R, _>(&launch, &cpus, Arc::new(app))
        .unwrap_or_else(|e| panic!("{} did not launch: {e}", R::NAME));
    let counters = server.counters().clone();
    Srv { server: Some(server), addr, metrics, counters }
}

impl Srv {
    /// Stops the server and asserts that no worker failed or panicked.
    fn stop(mut self) {
        let s = self.server.take().unwrap();
        s.shutdown_handle().close();
        s.wait().expect("the server stops cleanly");
    }
    fn transfers(&self, path: TransferPath) -> u64 {
        let i = TransferPath::ALL.iter().position(|p| *p == path).unwrap();
        (0..self.metrics.len())
            .map(|c| self.metrics.core(c).transfers[i].load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }
    fn send_zc_bytes(&self) -> u64 {
        (0..self.metrics.len())
            .map(|c| self.metrics.core(c).send_zc_bytes.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }
    fn cold_bytes(&self) -> u64 {
        (0..self.metrics.len())
            .map(|c| self.metrics.core(c).cold_bytes.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }
    fn active(&self) -> u64 {
        (0..self.counters.len())
            .map(|c| self.counters.core(c).connections_active.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }
}

/// The server counts a response once it has left, which can be a moment after the client has
/// read it: polls `read` until `done` holds (10 s at most) and returns the last reading, for
/// the caller to assert on.
fn settle<T>(mut read: impl FnMut() -> T, done: impl Fn(&T) -> bool) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = read();
        if done(&v) || Instant::now() >= deadline {
            return v;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---- a raw HTTP/1.1 client ---------------------------------------------------------------

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// Reads one response; `pending` holds bytes read past the previous one. `None` when the
/// server closed before sending anything.
fn read_resp(s: &mut TcpStream, pending: &mut Vec<u8>, head_request: bool) -> Option<Resp> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut r = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(n) = r.parse(pending).expect("a well-formed response") {
            let status = r.code.unwrap();
            let headers: Vec<(String, String)> =
                r.headers.iter().map(|h| (h.name.to_string(), String::from_utf8(h.value.to_vec()).unwrap())).collect();
            let resp = Resp { status, headers, body: Vec::new() };
            let len: usize = if head_request || status == 304 {
                0
            } else {
                resp.header("content-length").expect("every response has a Content-Length").parse().unwrap()
            };
            pending.drain(..n);
            let mut body = Vec::with_capacity(len);
            while body.len() < len {
                if pending.is_empty() {
                    let k = s.read(&mut buf).unwrap();
                    assert!(k > 0, "connection closed inside a body ({} of {len})", body.len());
                    pending.extend_from_slice(&buf[..k]);
                }
                let take = (len - body.len()).min(pending.len());
                body.extend(pending.drain(..take));
            }
            return Some(Resp { body, ..resp });
        }
        let k = match s.read(&mut buf) {
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
            Err(e) => panic!("read: {e}"),
        };
        if k == 0 {
            assert!(pending.is_empty(), "connection closed inside a response head");
            return None;
        }
        pending.extend_from_slice(&buf[..k]);
    }
}

fn exchange(addr: SocketAddr, raw: &[u8]) -> Option<Resp> {
    let mut s = connect(addr);
    s.write_all(raw).unwrap();
    read_resp(&mut s, &mut Vec::new(), raw.starts_with(b"HEAD "))
}

fn get(addr: SocketAddr, path: &str, extra: &str) -> Resp {
    let raw = format!("GET {path} HTTP/1.1\r\nHost: t\r\n{extra}Connection: close\r\n\r\n");
    exchange(addr, raw.as_bytes()).expect("a response")
}

/// Whether the server has closed `s` (EOF or reset) within the read timeout.
fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

// ---- bodies ----------------------------------------------------------------------------

fn check_all_sizes(addr: SocketAddr) {
    for (name, len) in SIZES {
        let r = get(addr, &format!("/{name}"), "");
        assert_eq!(r.status, 200, "{name}");
        assert_eq!(r.header("content-length"), Some(len.to_string().as_str()));
        assert_eq!(r.header("content-type"), Some("application/octet-stream"));
        assert_eq!(sha(&r.body), sha(tree().data(name)), "{name}: body differs");
        let h = exchange(addr, format!("HEAD /{name} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
            .unwrap();
        assert_eq!((h.status, h.header("content-length")), (200, Some(len.to_string().as_str())));
        assert_eq!(h.header("etag"), r.header("etag"));
    }
}

/// Files of 0 B, 1 B, 4 KiB, 1 MiB and 100 MiB arrive byte for byte on every transfer path:
/// memory + sendfile (the defaults), and the read + write fallback; the metrics count the
/// path each body took.
pub fn bodies_arrive_byte_for_byte_on_every_path<R: Runtime>() {
    let srv = serve::<R>(|_| {});
    check_all_sizes(srv.addr);
    check_all_sizes(srv.addr); // second round: small files now come from the cache
    let memory = settle(|| srv.transfers(TransferPath::Memory), |n| *n >= 4);
    assert!(memory >= 4, "1 B and 4 KiB twice from memory, counted {memory}");
    let sendfile = settle(|| srv.transfers(TransferPath::Sendfile), |n| *n >= 4);
    assert!(sendfile >= 4, "1 MiB and 100 MiB twice by sendfile, counted {sendfile}");
    assert_eq!(srv.transfers(TransferPath::ReadWrite), 0);
    srv.stop();

    let srv = serve::<R>(|c| {
        c.memory_max = 0;
        c.large_bodies = LargeBodies::ReadWrite;
    });
    check_all_sizes(srv.addr);
    let rw = settle(|| srv.transfers(TransferPath::ReadWrite), |n| *n >= 4);
    assert!(rw >= 4, "1 B, 4 KiB, 1 MiB and 100 MiB by read + write, counted {rw}");
    assert_eq!(srv.transfers(TransferPath::Memory) + srv.transfers(TransferPath::Sendfile), 0);
    assert_eq!(srv.send_zc_bytes(), 0, "no zero-copy send unless asked for");
    srv.stop();

    // Zero-copy sends for read + write chunks of 64 KiB and more (SEND_ZC where the backend
    // has it, a plain write where not): the same bytes, and only the large chunks go that way.
    let srv = serve::<R>(|c| {
        c.memory_max = 0;
        c.large_bodies = LargeBodies::ReadWrite;
        c.send_zc_min = Some(64 * 1024);
    });
    check_all_sizes(srv.addr);
    let zc = settle(|| srv.send_zc_bytes(), |n| *n >= 101 << 20);
    assert_eq!(
        zc,
        101 << 20,
        "the 1 MiB and 100 MiB bodies (in 128 KiB chunks) went by zero-copy send, not 1 B or 4 KiB"
    );
    srv.stop();
}

/// Keep-alive and pipelining: requests sent in one write are answered in order on one
/// connection; `Connection: close` and HTTP/1.0 without keep-alive close it after the answer.
pub fn pipelined_requests_are_answered_in_order<R: Runtime>() {
    let srv = serve::<R>(|_| {});
    let mut s = connect(srv.addr);
    let order = ["/page.html", "/missing", "/4k.bin", "/dir/", "/1m.bin", "/one.bin"];
    let raw: String = order.iter().map(|p| format!("GET {p} HTTP/1.1\r\nHost: t\r\n\r\n")).collect();
    s.write_all(raw.as_bytes()).unwrap();
    let mut pending = Vec::new();
    let mut statuses = Vec::new();
    for p in order {
        let r = read_resp(&mut s, &mut pending, false).expect("an answer per request");
        statuses.push(r.status);
        match p {
            "/4k.bin" | "/1m.bin" | "/one.bin" => assert_eq!(sha(&r.body), sha(tree().data(&p[1..]))),
            "/page.html" => {
                assert_eq!(r.body, b"<p>page</p>\n");
                assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
            }
            "/dir/" => assert_eq!(r.body, b"<h1>dir index</h1>\n"),
            _ => {}
        }
        assert_eq!(r.header("connection"), None, "kept alive");
    }
    assert_eq!(statuses, vec![200, 404, 200, 200, 200, 200]);
    // The same connection is still usable, and closes after a `Connection: close` request.
    s.write_all(b"GET /one.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").unwrap();
    let r = read_resp(&mut s, &mut pending, false).unwrap();
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    assert!(closed_by_server(&mut s));
    // HTTP/1.0: closed unless asked to keep alive.
    let mut s = connect(srv.addr);
    s.write_all(b"GET /one.bin HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(read_resp(&mut s, &mut Vec::new(), false).unwrap().status, 200);
    assert!(closed_by_server(&mut s));
    let mut s = connect(srv.addr);
    s.write_all(b"GET /one.bin HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /4k.bin HTTP/1.0\r\n\r\n").unwrap();
    let mut pending = Vec::new();
    let r = read_resp(&mut s, &mut pending, false).unwrap();
    assert_eq!(r.header("connection"), Some("keep-alive"));
    assert_eq!(read_resp(&mut s, &mut pending, false).unwrap().body.len(), 4096);
    assert!(closed_by_server(&mut s));
    srv.stop();
}

/// Last-Modified and a strong ETag; If-None-Match (weak comparison, lists, `*`) and
/// If-Modified-Since give 304, and If-None-Match takes precedence.
pub fn validators_give_not_modified<R: Runtime>() {
    let srv = serve::<R>(|_| {});
    let r = get(srv.addr, "/4k.bin", "");
    let etag = r.header("etag").unwrap().to_string();
    let lm = r.header("last-modified").unwrap().to_string();
    assert!(etag.starts_with('"') && etag.ends_with('"') && !etag.starts_with("W/"), "strong: {etag}");
    assert!(httpdate::parse_http_date(&lm).is_ok());
    let cond = |h: String| get(srv.addr, "/4k.bin", &h);
    let r = cond(format!("If-None-Match: {etag}\r\n"));
    assert_eq!((r.status, r.body.len()), (304, 0));
    assert_eq!(r.header("etag"), Some(etag.as_str()));
    assert_eq!(cond(format!("If-None-Match: \"nope\", W/{etag}\r\n")).status, 304);
    assert_eq!(cond("If-None-Match: *\r\n".into()).status, 304);
    assert_eq!(cond("If-None-Match: \"nope\"\r\n".into()).status, 200);
    assert_eq!(cond(format!("If-Modified-Since: {lm}\r\n")).status, 304);
    assert_eq!(cond("If-Modified-Since: Sat, 01 Jan 2000 00:00:00 GMT\r\n".into()).status, 200);
    assert_eq!(cond("If-Modified-Since: not a date\r\n".into()).status, 200);
    let r = cond(format!("If-None-Match: \"nope\"\r\nIf-Modified-Since: {lm}\r\n"));
    assert_eq!(r.status, 200, "If-None-Match wins over If-Modified-Since");
    // HEAD answers conditionally too, and a 304 keeps the connection usable.
    let mut s = connect(srv.addr);
    let raw = "HEAD /1m.bin HTTP/1.1\r\nHost: t\r\n\r\nGET /1m.bin HTTP/1.1\r\nHost: t\r\nIf-None-Match: *\r\n\r\nGET /one.bin HTTP/1.1\r\nHost: t\r\n\r\n";
    s.write_all(raw.as_bytes()).unwrap();
    let mut p = Vec::new();
    assert_eq!(read_resp(&mut s, &mut p, true).unwrap().status, 200);
    assert_eq!(read_resp(&mut s, &mut p, false).unwrap().status, 304);
    assert_eq!(read_resp(&mut s, &mut p, false).unwrap().body, tree().data("one.bin"));
    srv.stop();
}

fn multipart_parts(r: &Resp) -> Vec<(String, Vec<u8>)> {
    let ct = r.header("content-type").unwrap();
    let boundary = ct.strip_prefix("multipart/byteranges; boundary=").expect("multipart");
    let delim = format!("\r\n--{boundary}");
    let body = &r.body;
    let mut parts = Vec::new();
    let mut at = 0;
    loop {
        let start = at + find(&body[at..], delim.as_bytes()).expect("a delimiter") + delim.len();
        if body[start..].starts_with(b"--") {
            assert_eq!(&body[start..], b"--\r\n", "nothing after the closing delimiter");
            break;
        }
        let head_end = start + find(&body[start..], b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8(body[start..head_end].to_vec()).unwrap();
        let cr = head.lines().find_map(|l| l.strip_prefix("Content-Range: ")).unwrap().to_string();
        let next = head_end + find(&body[head_end..], delim.as_bytes()).unwrap();
        parts.push((cr, body[head_end..next].to_vec()));
        at = next;
    }
    parts
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Single, suffix and open-ended ranges give 206 with Content-Range; unsatisfiable gives 416
/// with `bytes */LEN`; several give multipart/byteranges; overlapping ones the whole file;
/// If-Range is honoured. Both from memory (4 KiB) and by sendfile (100 MiB).
pub fn ranges_are_served_as_asked<R: Runtime>() {
    let srv = serve::<R>(|_| {});
    for (name, len) in [("4k.bin", 4096usize), ("100m.bin", 100 << 20)] {
        let data = tree().data(name);
        let path = format!("/{name}");
        let _ = get(srv.addr, &path, ""); // warm the cache for the small one
        let cases: [(&str, usize, usize); 4] = [
            ("bytes=0-99", 0, 99),
            ("bytes=-100", len - 100, len - 1),
            ("bytes=1000-", 1000, len - 1),
            ("bytes=10-10", 10, 10),
        ];
        for (range, first, last) in cases {
            let r = get(srv.addr, &path, &format!("Range: {range}\r\n"));
            assert_eq!(r.status, 206, "{name} {range}");
            assert_eq!(r.header("content-range").unwrap(), format!("bytes {first}-{last}/{len}"));
            assert_eq!(sha(&r.body), sha(&data[first..=last]), "{name} {range}");
        }
        let r = get(srv.addr, &path, &format!("Range: bytes={len}-\r\n"));
        assert_eq!((r.status, r.header("content-range")), (416, Some(format!("bytes */{len}").as_str())));
        let r = get(srv.addr, &path, "Range: bytes=0-9,200-299,-5\r\n");
        assert_eq!(r.status, 206);
        let parts = multipart_parts(&r);
        let want = [(0, 9), (200, 299), (len - 5, len - 1)];
        assert_eq!(parts.len(), 3);
        for ((cr, bytes), (a, b)) in parts.iter().zip(want) {
            assert_eq!(cr, &format!("bytes {a}-{b}/{len}"));
            assert_eq!(bytes.as_slice(), &data[a..=b]);
        }
        assert_eq!(get(srv.addr, &path, "Range: bytes=0-99,50-150\r\n").status, 200, "overlapping: whole file");
        let r = get(srv.addr, &path, "Range: bytes=0-99\r\n");
        let etag = r.header("etag").unwrap().to_string();
        let lm = r.header("last-modified").unwrap().to_string();
        assert_eq!(get(srv.addr, &path, &format!("Range: bytes=0-99\r\nIf-Range: {etag}\r\n")).status, 206);
        assert_eq!(get(srv.addr, &path, &format!("Range: bytes=0-99\r\nIf-Range: {lm}\r\n")).status, 206);
        let r = get(srv.addr, &path, "Range: bytes=0-99\r\nIf-Range: \"stale\"\r\n");
        assert_eq!((r.status, r.body.len()), (200, len), "a stale If-Range gets the whole file");
        assert_eq!(get(srv.addr, &path, "Range: lines=0-1\r\n").status, 200, "unknown unit ignored");
    }
    let r = get(srv.addr, "/empty.bin", "Range: bytes=0-\r\n");
    assert_eq!((r.status, r.header("content-range")), (416, Some("bytes */0")));
    srv.stop();
}

/// Drops a file's pages from the page cache and checks that they are gone.
fn evict(path: &std::path::Path) {
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: fadvise on an open descriptor only drops the file's clean cached pages.
    assert_eq!(unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
    let len = f.metadata().unwrap().len();
    assert_eq!(residency(f.as_fd(), 0, len), Residency::NotCached, "{} left the page cache", path.display());
}

/// A file that is not in the page cache is not read by sendfile on the worker's thread: its
/// missing pages come through the engine's file read (counted as cold bytes), byte for byte,
/// for a whole body and a range; once cached, the file goes by sendfile alone again.
pub fn cold_files_are_read_through_the_engine<R: Runtime>() {
    let srv = serve::<R>(|_| {});
    let name = format!("cold-{}.bin", R::NAME);
    let path = tree().root.join(&name);
    let mut data = vec![0u8; 16 << 20];
    rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut data);
    std::fs::write(&path, &data).unwrap();
    evict(&path);
    let r = get(srv.addr, &format!("/{name}"), "");
    assert_eq!((r.status, sha(&r.body)), (200, sha(&data)), "a cold file arrives byte for byte");
    let cold = settle(|| srv.cold_bytes(), |n| *n > 0);
    assert!(cold > 0 && cold <= data.len() as u64, "the engine read the missing pages ({cold} bytes)");
    assert!(settle(|| srv.transfers(TransferPath::ReadWrite), |n| *n >= 1) >= 1);

    let f = std::fs::File::open(&path).unwrap();
    assert_eq!(residency(f.as_fd(), 0, data.len() as u64), Residency::Cached, "serving it cached it");
    let sendfile_before = srv.transfers(TransferPath::Sendfile);
    let r = get(srv.addr, &format!("/{name}"), "");
    assert_eq!(sha(&r.body), sha(&data));
    assert!(settle(|| srv.transfers(TransferPath::Sendfile), |n| *n > sendfile_before) > sendfile_before);
    assert_eq!(srv.cold_bytes(), cold, "a cached file is sent by sendfile alone");

    evict(&path);
    let (first, last) = (1000usize, (9 << 20) + 17);
    let r = get(srv.addr, &format!("/{name}"), &format!("Range: bytes={first}-{last}\r\n"));
    assert_eq!(r.status, 206);
    assert_eq!(sha(&r.body), sha(&data[first..=last]), "a cold range arrives byte for byte");
    assert!(settle(|| srv.cold_bytes(), |n| *n > cold) > cold, "the range's missing pages came through the engine");
    srv.stop();
    std::fs::remove_file(path).unwrap();
}

/// Directories: a missing slash redirects, index.html is served, no index is 403 unless
/// listings are enabled, and listings escape names.
pub fn directories_redirect_index_and_list<R: Runtime>() {
    let srv = serve::<R>(|_| {});
    let r = get(srv.addr, "/dir", "");
    assert_eq!((r.status, r.header("location")), (301, Some("/dir/")));
    let r = get(srv.addr, "/noindex%2Fsub", "");
    assert_eq!(r.status, 400);
    let r = get(srv.addr, "/noindex/sub%20dir", "");
    assert_eq!((r.status, r.header("location")), (301, Some("/noindex/sub%20dir/")));
    assert_eq!(get(srv.addr, "/dir/", "").body, b"<h1>dir index</h1>\n");
    assert_eq!(get(srv.addr, "/noindex/", "").status, 403);
    srv.stop();

    let srv = serve::<R>(|c| c.list_dirs = true);
    let r = get(srv.addr, "/noindex/", "");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    let html = String::from_utf8(r.body).unwrap();
    assert!(html.contains("a &lt;b&gt;&amp;&quot;q&quot;.txt") || html.contains("a &lt;b&gt;&amp;\"q\".txt"), "{html}");
    assert!(html.contains("href=\"a%20%3Cb%3E%26%22q%22.txt\""), "{html}");
    assert!(html.contains("href=\"sub%20dir/\""), "{html}");
    assert!(!html.contains("<b>"), "a name never becomes markup: {html}");
    assert_eq!(get(srv.addr, "/noindex/a%20%3Cb%3E%26%22q%22.txt", "").body, b"weird name\n");
    srv.stop();
}

/// Each refusal has its status, and the server answers normally afterwards.
pub fn errors_have_the_right_status<R: Runtime>() {
    let srv = serve::<R>(|_| {});
    let a = srv.addr;
    let status = |raw: &[u8]| exchange(a, raw).map(|r| r.status);
    assert_eq!(status(b"GET /4k.bin HTTP/1.1\r\n\r\n"), Some(400), "missing Host");
    assert_eq!(status(b"GET /4k.bin HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), Some(400), "two Hosts");
    assert_eq!(
        status(b"GET /4k.bin HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
        Some(400)
    );
    assert_eq!(status(b"GET\x01 / HTTP/1.1\r\nHost: a\r\n\r\n"), Some(400));
    assert_eq!(status(b"GET /nope HTTP/1.1\r\nHost: a\r\n\r\n"), Some(404));
    let r = exchange(a, b"POST /4k.bin HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc").unwrap();
    assert_eq!((r.status, r.header("allow")), (405, Some("GET, HEAD")));
    assert_eq!(status(b"DELETE /4k.bin HTTP/1.1\r\nHost: a\r\n\r\n"), Some(405));
    assert_eq!(status(b"BREW /pot HTTP/1.1\r\nHost: a\r\n\r\n"), Some(501));
    assert_eq!(status(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n"), Some(505));
    assert_eq!(status(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999\r\n\r\n"), Some(413));
    assert_eq!(status(b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"), Some(413));
    assert_eq!(status(format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "x".repeat(10_000)).as_bytes()), Some(414));
    let many: String = (0..100).map(|i| format!("X-{i}: y\r\n")).collect();
    assert_eq!(status(format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n").as_bytes()), Some(431));
    assert_eq!(status(format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n", "y".repeat(20_000)).as_bytes()), Some(431));
    assert_eq!(status(b"GET /fifo HTTP/1.1\r\nHost: a\r\n\r\n"), Some(403), "not a regular file (and no stall)");
    let name = format!("/{}", "n".repeat(300));
    assert_eq!(status(format!("GET {name} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes()), Some(414));
    // A small GET body is read and discarded; the next pipelined request is still answered.
    let mut s = connect(a);
    s.write_all(
        b"GET /one.bin HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nabcdGET /one.bin HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .unwrap();
    let mut p = Vec::new();
    assert_eq!(read_resp(&mut s, &mut p, false).unwrap().status, 200);
    assert_eq!(read_resp(&mut s, &mut p, false).unwrap().status, 200);
    assert_eq!(get(a, "/one.bin", "").status, 200);
    srv.stop();
}

/// No request reads outside the root: traversal in every spelling, encoded separators,
/// backslashes, NUL, overlong UTF-8 and symlinks leading out are refused; a symlink inside
/// the root works; leading out is allowed only with `follow_symlinks`.
pub fn nothing_outside_the_root_is_served<R: Runtime>() {
    let srv = serve::<R>(|_| {});
    let attacks: [&[u8]; 16] = [
        b"/../outside/secret.txt",
        b"/%2e%2e/outside/secret.txt",
        b"/%2E%2E/outside/secret.txt",
        b"/.%2e/outside/secret.txt",
        b"/dir/../../outside/secret.txt",
        b"/..%2foutside%2fsecret.txt",
        b"/..%5coutside%5csecret.txt",
        b"/..\\outside\\secret.txt",
        b"/%c0%ae%c0%ae/outside/secret.txt",
        b"/%e0%80%ae%e0%80%ae/outside/secret.txt",
        b"/4k.bin%00.html",
        b"http://t/../outside/secret.txt",
        b"/link-out",
        b"/dir-out/secret.txt",
        b"//etc/passwd",
        b"/%2fetc%2fpasswd",
    ];
    for t in attacks {
        let mut raw = b"GET ".to_vec();
        raw.extend_from_slice(t);
        raw.extend_from_slice(b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        let r = exchange(srv.addr, &raw);
        let shown = String::from_utf8_lossy(t);
        if let Some(r) = r {
            assert!(matches!(r.status, 400 | 403 | 404), "{shown}: {}", r.status);
            assert!(find(&r.body, b"SECRET").is_none() && find(&r.body, b"root:").is_none(), "{shown} leaked");
        }
    }
    assert_eq!(get(srv.addr, "/link-out", "").status, 403);
    let r = get(srv.addr, "/link-in", "");
    assert_eq!((r.status, sha(&r.body)), (200, sha(tree().data("4k.bin"))), "a symlink inside the root works");
    srv.stop();

    let srv = serve::<R>(|c| c.follow_symlinks = true);
    assert_eq!(get(srv.addr, "/link-out", "").body, b"SECRET OUTSIDE THE ROOT\n");
    assert_eq!(get(srv.addr, "/%2e%2e/outside/secret.txt", "").status, 400, "'..' stays refused");
    srv.stop();
}

/// Random bytes never crash a worker: every connection gets an answer or is closed, and the
/// server serves normally afterwards.
pub fn garbage_never_panics<R: Runtime>() {
    let srv = serve::<R>(|_| {});
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let pieces: [&[u8]; 12] = [
        b"GET ",
        b"HEAD ",
        b"/",
        b"%",
        b"..",
        b"\r\n",
        b"HTTP/1.1",
        b"Host: x",
        b"Range: bytes=",
        b"-",
        b",",
        b"\0\xff",
    ];
    for i in 0..300 {
        let mut raw = Vec::new();
        for _ in 0..(rand::Rng::gen_range(&mut rng, 1..24)) {
            if rand::Rng::gen_bool(&mut rng, 0.7) {
                raw.extend_from_slice(pieces[rand::Rng::gen_range(&mut rng, 0..pieces.len())]);
            } else {
                raw.push(rand::Rng::gen(&mut rng));
            }
        }
        if i % 2 == 0 {
            raw.extend_from_slice(b"\r\n\r\n");
        }
        let mut s = connect(srv.addr);
        s.set_read_timeout(Some(Duration::from_millis(if i % 2 == 0 { 5000 } else { 50 }))).unwrap();
        let _ = s.write_all(&raw);
        let mut sink = [0u8; 4096];
        let _ = s.read(&mut sink);
    }
    check_all_sizes(srv.addr);
    srv.stop();
}

/// Clients that trickle a head, idle, or stop reading are closed after their timeouts; a
/// client that disconnects mid-transfer costs nothing; meanwhile others are served.
pub fn slow_and_vanishing_clients_are_closed<R: Runtime>() {
    let srv = serve::<R>(|c| {
        c.header_timeout = Duration::from_millis(400);
        c.idle_timeout = Duration::from_millis(400);
        c.send_timeout = Duration::from_millis(400);
    });
    // Trickling a byte every 100 ms: 408 then closed, although bytes keep coming.
    let mut s = connect(srv.addr);
    let started = Instant::now();
    let mut answered = None;
    for b in b"GET /4k.bin HTTP/1.1\r\nHost: t\r\n".iter() {
        if s.write_all(&[*b]).is_err() {
            break;
        }
        thread::sleep(Duration::from_millis(100));
        s.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 512];
        if let Ok(n) = s.read(&mut buf) {
            answered = Some(String::from_utf8_lossy(&buf[..n]).to_string());
            s.set_nonblocking(false).unwrap();
            break;
        }
        s.set_nonblocking(false).unwrap();
    }
    let answer = answered.expect("the trickling client got an answer before finishing its head");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(3));
    // Idle keep-alive: closed.
    let mut s = connect(srv.addr);
    s.write_all(b"GET /one.bin HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut p = Vec::new();
    assert_eq!(read_resp(&mut s, &mut p, false).unwrap().status, 200);
    assert!(closed_by_server(&mut s), "idle connection closed");
    // A reader that never reads a 100 MiB body: closed after the send timeout, while another
    // client is served meanwhile on the same core.
    let mut stalled = connect(srv.addr);
    stalled.write_all(b"GET /100m.bin HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    thread::sleep(Duration::from_millis(100));
    assert_eq!(sha(&get(srv.addr, "/1m.bin", "").body), sha(tree().data("1m.bin")), "the core is not stalled");
    settle(|| srv.active(), |n| *n == 0);
    let timeouts = settle(
        || -> u64 {
            (0..srv.metrics.len())
                .map(|c| srv.metrics.core(c).timeouts.load(std::sync::atomic::Ordering::Relaxed))
                .sum()
        },
        |n| *n >= 3,
    );
    assert_eq!(timeouts, 3, "header, idle and send timeouts counted");
    // Reading everything now ends early: the server gave up on this client.
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    while let Ok(n) = stalled.read(&mut buf) {
        if n == 0 {
            break;
        }
        got += n;
    }
    assert!(got < 100 << 20, "the stalled client was cut off ({got} bytes)");
    // Disconnecting mid-transfer: the connection is released and nothing else is affected.
    for _ in 0..5 {
        let mut s = connect(srv.addr);
        s.write_all(b"GET /100m.bin HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let mut b = vec![0u8; 256 * 1024];
        s.read_exact(&mut b).unwrap();
        drop(s);
    }
    assert_eq!(settle(|| srv.active(), |n| *n == 0), 0, "every abandoned connection was released");
    check_all_sizes(srv.addr);
    srv.stop();
}

/// An answer that ends the connection while the client is still sending (413 for a body too
/// large to discard, 400 for a malformed head) reaches the client whole: the server stops
/// writing, drops what still arrives for a bounded time and size, and only then closes, so no
/// reset destroys the answer or fails the client's upload. A client that keeps sending cannot
/// hold the connection open that way.
pub fn refusals_close_lingeringly<R: Runtime>() {
    let srv = serve::<R>(|_| {});
    for head in [
        "POST /4k.bin HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000\r\n\r\n",
        "GET /4k.bin HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    ] {
        let mut s = connect(srv.addr);
        // The head, then (once the server has answered) 768 KiB of body in 16 KiB pieces, as
        // an upload keeps going: with an abrupt close the first piece after it draws a reset
        // and the next write fails.
        s.write_all(head.as_bytes()).unwrap();
        thread::sleep(Duration::from_millis(100));
        let piece = vec![b'x'; 16 << 10];
        for i in 0..48 {
            let sent = s.write_all(&piece);
            assert!(sent.is_ok(), "the upload was cut off after {i} pieces: {sent:?} ({head:?})");
            thread::sleep(Duration::from_millis(2));
        }
        let r = read_resp(&mut s, &mut Vec::new(), false).expect("an answer");
        assert!(r.status == 413 || r.status == 400, "status {} ({head:?})", r.status);
        assert_eq!(r.header("connection"), Some("close"));
        // The client is done sending but keeps its side open: the server still closes.
        assert!(closed_by_server(&mut s), "the lingering connection was closed");
    }
    // A client that never stops sending is cut off after the linger budget.
    let mut s = connect(srv.addr);
    s.write_all(b"POST /4k.bin HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999999\r\n\r\n").unwrap();
    let started = Instant::now();
    let chunk = vec![b'y'; 64 << 10];
    let ended = loop {
        if s.write_all(&chunk).is_err() {
            break true;
        }
        if started.elapsed() > Duration::from_secs(60) {
            break false;
        }
    };
    assert!(ended, "a client sending without end held the connection for a minute");
    assert_eq!(settle(|| srv.active(), |n| *n == 0), 0, "every lingering connection was released");
    check_all_sizes(srv.addr);
    srv.stop();
}

/// The per-core connection limit closes extra connections at once.
pub fn the_connection_limit_holds<R: Runtime>() {
    let srv = serve_on::<R>(CoreSelection::Count(1), 2, |_| {});
    let mut a = connect(srv.addr);
    let mut b = connect(srv.addr);
    for s in [&mut a, &mut b] {
        s.write_all(b"GET /one.bin HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        assert_eq!(read_resp(s, &mut Vec::new(), false).unwrap().status, 200);
    }
    let mut c = connect(srv.addr);
    let _ = c.write_all(b"GET /one.bin HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(closed_by_server(&mut c), "the third connection is closed");
    drop(a);
    // The slot frees once the server has seen the close.
    assert_eq!(settle(|| srv.active(), |n| *n <= 1), 1, "the closed connection was released");
    assert_eq!(get(srv.addr, "/one.bin", "").status, 200, "a freed slot is reused");
    srv.stop();
}

/// Draining lets a transfer in progress finish and closes idle keep-alive connections.
pub fn graceful_shutdown_finishes_transfers<R: Runtime>() {
    let mut srv = serve::<R>(|_| {});
    let mut idle = connect(srv.addr);
    idle.write_all(b"GET /one.bin HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    assert_eq!(read_resp(&mut idle, &mut Vec::new(), false).unwrap().status, 200);
    let addr = srv.addr;
    let busy = thread::spawn(move || {
        let mut s = connect(addr);
        s.write_all(b"GET /100m.bin HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let mut p = Vec::new();
        let mut first = vec![0u8; 64 * 1024];
        s.read_exact(&mut first).unwrap();
        p.extend_from_slice(&first);
        thread::sleep(Duration::from_millis(300)); // drain starts while the body is in flight
        read_resp(&mut s, &mut p, false).unwrap()
    });
    thread::sleep(Duration::from_millis(100));
    let server = srv.server.take().unwrap();
    server.shutdown_handle().drain();
    assert!(closed_by_server(&mut idle), "the idle connection is closed when draining starts");
    let r = busy.join().unwrap();
    assert_eq!(sha(&r.body), sha(tree().data("100m.bin")), "the transfer in flight completed");
    assert_eq!(r.header("connection"), None);
    server.wait().expect("a clean stop");
}

/// The metrics endpoint exposes per-core and all-core counters in the Prometheus format.
pub fn metrics_are_exposed<R: Runtime>() {
    let srv = serve_on::<R>(CoreSelection::All, usize::MAX, |_| {});
    let _ = get(srv.addr, "/4k.bin", "");
    let _ = get(srv.addr, "/4k.bin", "");
    let _ = get(srv.addr, "/1m.bin", "");
    let _ = get(srv.addr, "/nope", "");
    let mut registry = corepin::metrics::registry_for(srv.server.as_ref().unwrap());
    FilesCollector::new(srv.metrics.clone()).register(&mut registry);
    let m = corepin::metrics::MetricsEndpoint::start("127.0.0.1:0".parse().unwrap(), registry).unwrap();
    let scrape = || -> String {
        let mut s = connect(m.local_addr());
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n").unwrap();
        let r = read_resp(&mut s, &mut Vec::new(), false).unwrap();
        assert_eq!(r.status, 200);
        assert!(r.header("content-type").unwrap().starts_with("text/plain; version=0.0.4"));
        String::from_utf8(r.body).unwrap()
    };
    let value = |text: &str, line: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(line))
            .unwrap_or_else(|| panic!("no {line} in\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let responses = |text: &str| {
        value(text, "corepin_http_responses_all_cores_total{class=\"2xx\"}")
            + value(text, "corepin_http_responses_all_cores_total{class=\"4xx\"}")
    };
    let text = settle(scrape, |t| responses(t) >= 4);
    let value = |line: &str| value(&text, line);
    assert_eq!(value("corepin_file_transfers_all_cores_total{path=\"memory\"}"), 2);
    assert_eq!(value("corepin_file_transfers_all_cores_total{path=\"sendfile\"}"), 1);
    assert_eq!(value("corepin_file_transfers_all_cores_total{path=\"read-write\"}"), 0);
    assert_eq!(value("corepin_http_responses_all_cores_total{class=\"2xx\"}"), 3);
    assert_eq!(value("corepin_http_responses_all_cores_total{class=\"4xx\"}"), 1);
    assert!(value("corepin_connections_accepted_all_cores_total") >= 4);
    assert!(value("corepin_http_sent_bytes_all_cores_total") > (1 << 20) + 8192);
    for core in 0..srv.metrics.len() {
        assert!(text.contains(&format!("corepin_file_transfers_total{{core=\"{core}\",path=\"memory\"}}")));
    }
    drop(m);
    srv.stop();
}

/// With the open-file cache on (the default), a known file is served without opening it
/// again, yet a change is never missed: rewritten in place (same size, mtime put back, so only
/// the inode's own event can tell), replaced by a rename, or deleted, the next request on the
/// same keep-alive connection sees it; a directory renamed above a cached file is noticed once
/// the validity window has passed.
pub fn changed_files_are_served_changed_through_the_open_file_cache<R: Runtime>() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let put = |p: &str, body: &[u8]| std::fs::write(root.join(p), body).unwrap();
    std::fs::create_dir(root.join("d")).unwrap();
    put("small.txt", b"first version");
    put("big.bin", &vec![b'a'; 200_000]);
    put("gone.txt", b"here");
    put("d/f.txt", b"the first d");
    let valid = Duration::from_millis(300);
    let r2 = root.clone();
    let srv = serve::<R>(move |c| {
        c.root = r2;
        c.open_files_valid = valid;
    });
    let lookups = |i: usize| -> u64 {
        (0..srv.metrics.len()).map(|c| srv.metrics.core(c).open_lookups[i].load(Ordering::Relaxed)).sum()
    };
    let mut s = connect(srv.addr);
    let mut pending = Vec::new();
    let mut fetch = |path: &str| -> Resp {
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes()).unwrap();
        read_resp(&mut s, &mut pending, false).expect("a response")
    };
    for path in ["/small.txt", "/big.bin", "/gone.txt", "/d/f.txt"] {
        assert_eq!(fetch(path).status, 200);
        assert_eq!(fetch(path).status, 200);
    }
    assert!(lookups(0) >= 4, "the second request for each file is a hit: {} hits", lookups(0));
    let reads = || -> u64 {
        (0..srv.metrics.len()).map(|c| srv.metrics.core(c).open_queue_reads.load(Ordering::Relaxed)).sum()
    };
    // Nothing has changed yet. With a posted notice on the inotify queue (wherever io_uring
    // is), the queue was never read; without one, every lookup read it.
    if corepin::posted::available() {
        assert_eq!(reads(), 0, "an empty queue is known empty without a read");
    } else {
        assert!(reads() >= lookups(0), "{} reads for {} hits", reads(), lookups(0));
    }
    let rewrite = |p: &str, body: &[u8]| {
        let path = root.join(p);
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all(body).unwrap();
        f.set_modified(mtime).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), mtime);
    };
    // In place, same length, same mtime: the memory-cached small file and the sendfile one.
    rewrite("small.txt", b"other version");
    assert_eq!(fetch("/small.txt").body, b"other version");
    rewrite("big.bin", &vec![b'b'; 200_000]);
    let big = fetch("/big.bin");
    assert!(big.body.len() == 200_000 && big.body.iter().all(|b| *b == b'b'), "big.bin rewritten in place");
    // Replaced by a rename over it.
    put("small.new", b"renamed over");
    std::fs::rename(root.join("small.new"), root.join("small.txt")).unwrap();
    assert_eq!(fetch("/small.txt").body, b"renamed over");
    // Deleted.
    std::fs::remove_file(root.join("gone.txt")).unwrap();
    assert_eq!(fetch("/gone.txt").status, 404);
    // A directory above a cached file renamed, and a new one put in its place: seen once the
    // entry's validity window has passed (nothing tells the file's inode).
    std::fs::rename(root.join("d"), root.join("d.old")).unwrap();
    std::fs::create_dir(root.join("d")).unwrap();
    put("d/f.txt", b"the second d");
    std::thread::sleep(valid + Duration::from_millis(100));
    assert_eq!(fetch("/d/f.txt").body, b"the second d");
    assert!(lookups(2) >= 1, "the path was checked again after the window");
    let dropped: u64 =
        (0..srv.metrics.len()).map(|c| srv.metrics.core(c).open_invalidated.load(Ordering::Relaxed)).sum();
    assert!(dropped >= 4, "rewrites, the rename over and the delete were reported: {dropped}");
    assert!(reads() >= 1, "the changes were read from the queue");
    drop(s);
    srv.stop();
}

/// An independent client agrees: curl fetches bodies (compared by SHA-256), ranges, HEAD and
/// conditional requests, and reuses one keep-alive connection for several URLs.
pub fn curl_agrees<R: Runtime>() {
    let curl = |args: &[&str]| -> std::process::Output {
        std::process::Command::new("curl")
            .args(["-sS", "--http1.1", "--max-time", "60"])
            .args(args)
            .output()
            .expect("curl is needed for this test: scripts/setup.sh installs it")
    };
    let srv = serve::<R>(|_| {});
    let base = format!("http://{}", srv.addr);
    for (name, _) in SIZES {
        let out = curl(&[&format!("{base}/{name}")]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(sha(&out.stdout), sha(tree().data(name)), "curl {name}");
    }
    let out = curl(&["-r", "100-199", &format!("{base}/1m.bin")]);
    assert_eq!(out.stdout, &tree().data("1m.bin")[100..200]);
    let out = curl(&["-I", &format!("{base}/4k.bin")]);
    let head = String::from_utf8(out.stdout).unwrap();
    assert!(head.starts_with("HTTP/1.1 200") && head.contains("Content-Length: 4096"), "{head}");
    let etag = head.lines().find_map(|l| l.strip_prefix("ETag: ")).unwrap().trim().to_string();
    let out = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        &format!("If-None-Match: {etag}"),
        &format!("{base}/4k.bin"),
    ]);
    assert_eq!(out.stdout, b"304");
    let out =
        curl(&["-v", "-o", "/dev/null", "-o", "/dev/null", &format!("{base}/4k.bin"), &format!("{base}/one.bin")]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("Re-using existing connection") || log.contains("Reusing existing"), "{log}");
    let out =
        curl(&["-o", "/dev/null", "-w", "%{http_code}", "--path-as-is", &format!("{base}/../outside/secret.txt")]);
    assert_eq!(out.stdout, b"400");
    srv.stop();
}

corepin::per_runtime_tests! {
    changed_files_are_served_changed_through_the_open_file_cache,
    refusals_close_lingeringly,
    bodies_arrive_byte_for_byte_on_every_path,
    pipelined_requests_are_answered_in_order,
    validators_give_not_modified,
    ranges_are_served_as_asked,
    cold_files_are_read_through_the_engine,
    directories_redirect_index_and_list,
    errors_have_the_right_status,
    nothing_outside_the_root_is_served,
    garbage_never_panics,
    slow_and_vanishing_clients_are_closed,
    the_connection_limit_holds,
    graceful_shutdown_finishes_transfers,
    metrics_are_exposed,
    curl_agrees,
}
