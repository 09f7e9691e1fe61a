//! The `corepin` binary, end to end, on every compiled backend: exact echoes for 1,000
//! concurrent clients with random payloads up to 1 MiB, workers pinned one per core, SIGTERM
//! under load drains and exits 0, and bad arguments give one clear line and a failing exit.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_corepin");

struct Running {
    child: Child,
    addr: SocketAddr,
    banner: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_echo(runtime: &str, extra: &[&str]) -> Running {
    start("echo", runtime, extra, "rent I/O copies")
}

/// Starts `corepin <service>` and reads its banner up to the line containing `last`.
fn start(service: &str, runtime: &str, extra: &[&str], last: &str) -> Running {
    start_at(service, runtime, "127.0.0.1:0", extra, last)
}

/// [`start`] on the address `listen`.
fn start_at(service: &str, runtime: &str, listen: &str, extra: &[&str], last: &str) -> Running {
    let mut cmd = Command::new(BIN);
    cmd.args([service, "--runtime", runtime, "--cores", "all", "--listen", listen, "--drain-timeout", "20"])
        .args(extra);
    start_cmd(cmd, service, last)
}

/// Spawns `cmd` (a `corepin <service>` command line, possibly behind a wrapper) and reads its
/// banner up to the line containing `last`.
fn start_cmd(mut cmd: Command, service: &str, last: &str) -> Running {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("corepin starts");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut banner = String::new();
    let mut addr = None;
    let listening = format!("corepin {service} listening on ");
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            panic!("corepin exited before its banner was complete:\n{banner}");
        }
        if let Some(rest) = line.trim().strip_prefix(listening.as_str()) {
            addr = Some(rest.parse().unwrap());
        }
        banner.push_str(&line);
        if line.contains(last) {
            // Notes may follow; they are printed before stdout is flushed, so read what is there.
            break;
        }
    }
    std::thread::spawn(move || for _ in out.lines() {});
    Running { child, addr: addr.expect("the banner names the address"), banner }
}

/// Every worker thread (`corepin-w<cpu>`) of `pid` and the CPUs it may run on.
fn worker_affinity(pid: u32) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().trim().to_string();
        if !comm.starts_with("corepin-w") {
            continue;
        }
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let cpus = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap_or("").trim().to_string();
        v.push((comm, cpus));
    }
    v.sort();
    v
}

/// Sends a random slice of `data` (up to 1 MiB) on each of `clients` concurrent connections and
/// checks each echo byte for byte. Returns the number of exact echoes.
async fn load(
    addr: SocketAddr,
    clients: usize,
    data: Arc<Vec<u8>>,
    seed: u64,
    pace: Option<Duration>,
    done: Arc<std::sync::atomic::AtomicUsize>,
) -> usize {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let len = rng.gen_range(0..=data.len());
        let off = rng.gen_range(0..=data.len() - len);
        let data = data.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (mut r, mut w) = s.into_split();
            let d2 = data.clone();
            let writer = tokio::spawn(async move {
                match pace {
                    // Paced: eight chunks with a pause between, so the connection stays open.
                    Some(p) => {
                        for chunk in d2[off..off + len].chunks(len.div_ceil(8).max(1)) {
                            w.write_all(chunk).await.expect("write");
                            tokio::time::sleep(p).await;
                        }
                    }
                    None => w.write_all(&d2[off..off + len]).await.expect("write"),
                }
                w.shutdown().await.expect("shutdown");
            });
            let mut got = Vec::with_capacity(len);
            r.read_to_end(&mut got).await.expect("read");
            writer.await.unwrap();
            assert!(got == data[off..off + len], "echo of {len} bytes differs");
            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            1usize
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.expect("client task");
    }
    ok
}

fn random_block(seed: u64) -> Arc<Vec<u8>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; 1 << 20];
    rng.fill(&mut v[..]);
    Arc::new(v)
}

fn runtimes() -> Vec<&'static str> {
    corepin::RuntimeKind::compiled().into_iter().map(corepin::RuntimeKind::name).collect()
}

fn echo_end_to_end(runtime: &str, extra: &[&str]) {
    let mut server = start_echo(runtime, extra);
    assert!(server.banner.contains(&format!("runtime: {runtime}")), "{}", server.banner);
    assert!(server.banner.contains("ring flags:"), "the capability report shows ring flags:\n{}", server.banner);
    // What corepin's auxiliary ring gives these backends on io_uring (the README's backend
    // table), wherever the kernel has it: provided-buffer receives (compio: its own ring) and
    // registered buffers.
    let on_uring = server.banner.contains("driver:             io_uring");
    for (mechanism, backends) in [
        ("buffer rings:", ["monoio", "tokio-uring", "compio"]),
        ("registered buffers:", ["monoio", "tokio-uring", "compio"]),
    ] {
        let line = server.banner.lines().map(str::trim).find(|l| l.starts_with(mechanism)).unwrap_or_default();
        if on_uring && backends.contains(&runtime) && line.contains("(kernel: yes)") {
            assert!(line[mechanism.len()..].trim_start().starts_with("used"), "{runtime}: {line}");
        }
    }

    // One worker per core, each pinned to exactly its own CPU.
    let pinned = worker_affinity(server.child.id());
    let ncpu = corepin::topology::Topology::discover().cpus().len();
    assert_eq!(pinned.len(), ncpu, "one worker thread per core: {pinned:?}");
    for (name, cpus) in &pinned {
        let cpu = name.strip_prefix("corepin-w").expect("worker threads are named corepin-w<cpu>");
        assert_eq!(cpus, cpu, "{name} is pinned to its own core only");
    }

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let data = random_block(42);
    let none_yet = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let exact = rt.block_on(load(server.addr, 1000, data.clone(), 7, None, none_yet));
    assert_eq!(exact, 1000);

    // SIGTERM during load: the server drains (open connections finish) and exits 0.
    let addr = server.addr;
    let pid = server.child.id() as i32;
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let d2 = done.clone();
    let (during, done_at_signal) = rt.block_on(async move {
        let clients = tokio::spawn(load(addr, 200, data, 8, Some(Duration::from_millis(60)), d2));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let done_at_signal = done.load(std::sync::atomic::Ordering::SeqCst);
        // SAFETY: kill(2) with our own child's pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        (clients.await, done_at_signal)
    });
    assert!(done_at_signal < 200, "the signal must land while clients are still sending");
    assert_eq!(during.expect("clients finished"), 200, "connections open at SIGTERM are served to the end");
    let status = wait_exit(&mut server.child, Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "drained and exited 0");
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let t = std::time::Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(t.elapsed() < limit, "corepin did not exit within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn echo_serves_1000_concurrent_clients_exactly_and_drains_on_sigterm() {
    for rt in runtimes() {
        echo_end_to_end(rt, &[]);
    }
}

#[test]
fn echo_on_monoio_epoll_fallback_serves_1000_clients() {
    if corepin::RuntimeKind::Monoio.is_compiled() {
        let s = start_echo("monoio", &["--epoll"]);
        assert!(s.banner.contains("epoll fallback"), "{}", s.banner);
        drop(s);
        echo_end_to_end("monoio", &["--epoll"]);
    }
}

fn fails_with_one_line(args: &[&str], expect: &str) {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: one error line, got:\n{err}");
    assert!(lines[0].contains(expect), "{args:?}: {:?} does not mention {expect:?}", lines[0]);
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_arguments_give_one_clear_line_and_a_failing_exit() {
    fails_with_one_line(&["echo", "--runtime", "nope"], "unknown runtime");
    fails_with_one_line(&["echo", "--cores", "99-99"], "core 99 does not exist");
    fails_with_one_line(&["echo", "--cores", "999"], "only");
    fails_with_one_line(&["echo", "--cores", "x,y"], "bad core list");
    fails_with_one_line(&["echo", "--listen", "not-an-address"], "--listen");
    fails_with_one_line(&["echo", "--ring-flags", "turbo"], "unknown ring flag");
    fails_with_one_line(&["echo", "--bogus"], "--bogus");
    // An engine that cannot start says so once, naming the one backend with a fallback.
    for rt in ["glommio", "tokio-uring"].into_iter().filter(|r| runtimes().contains(r)) {
        let out =
            Command::new(BIN).args(["echo", "--runtime", rt, "--epoll", "--listen", "127.0.0.1:0"]).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.matches("could not start").count(), 1, "the cause is stated once: {err}");
        assert!(err.contains("monoio"), "points at the backend that has a fallback: {err}");
        fails_with_one_line(&["echo", "--runtime", rt, "--epoll", "--listen", "127.0.0.1:0"], "could not start");
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    fails_with_one_line(&["echo", "--listen", &addr], "address already in use");
}

/// One HTTP/1.1 exchange with `Connection: close`: (status line, body).
fn http_get(addr: SocketAddr, path: &str) -> (String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let end = all.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head") + 4;
    let head = String::from_utf8_lossy(&all[..end]).to_string();
    (head.lines().next().unwrap_or("").to_string(), all[end..].to_vec())
}

/// The README's main command serves the demo site shipped in the repository on every
/// backend, exposes metrics, and drains and exits 0 on SIGTERM.
#[test]
fn files_serves_the_demo_site_with_metrics_and_drains_on_sigterm() {
    use sha2::{Digest, Sha256};
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("services/files/demo");
    for rt in runtimes() {
        let mut s = start("files", rt, &["--metrics", "127.0.0.1:0", "--access-log"], "metrics: http://");
        assert!(s.banner.contains("confined with Openat2"), "{}", s.banner);
        assert!(s.banner.contains("file transfer:"), "{}", s.banner);
        assert!(s.banner.contains("file reads:"), "{}", s.banner);
        let metrics: SocketAddr = s
            .banner
            .lines()
            .find_map(|l| l.strip_prefix("metrics: http://"))
            .and_then(|l| l.strip_suffix("/metrics"))
            .unwrap()
            .parse()
            .unwrap();
        let (status, body) = http_get(s.addr, "/");
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(body, std::fs::read(demo.join("index.html")).unwrap());
        // Read first, which also puts it in the page cache: a cold file would go through the
        // engine's read instead of sendfile, and the metrics below count the sendfile path.
        let sample = std::fs::read(demo.join("downloads/sample.bin")).unwrap();
        let (status, body) = http_get(s.addr, "/downloads/sample.bin");
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(Sha256::digest(&body), Sha256::digest(&sample));
        assert_eq!(http_get(s.addr, "/downloads/").0, "HTTP/1.1 403 Forbidden", "no listing unless asked");
        assert_eq!(http_get(s.addr, "/%2e%2e/Cargo.toml").0, "HTTP/1.1 400 Bad Request");
        // A transfer is counted once it has left, a moment after the client has read it:
        // scrape until every figure shows (10 s at most), then check them.
        let wanted = [
            "corepin_file_transfers_all_cores_total{path=\"sendfile\"} 1",
            "corepin_file_transfers_all_cores_total{path=\"memory\"} 1",
            "corepin_http_responses_all_cores_total{class=\"4xx\"} 2",
        ];
        let deadline = Instant::now() + Duration::from_secs(10);
        let text = loop {
            let (status, text) = http_get(metrics, "/metrics");
            assert_eq!(status, "HTTP/1.1 200 OK");
            let text = String::from_utf8(text).unwrap();
            if wanted.iter().all(|w| text.contains(w)) || Instant::now() >= deadline {
                break text;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for w in wanted {
            assert!(text.contains(w), "{rt}: no `{w}` in\n{text}");
        }
        // SAFETY: kill(2) with a valid pid and signal number.
        assert_eq!(unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) }, 0);
        let status = wait_exit(&mut s.child, Duration::from_secs(25));
        assert!(status.success(), "{rt}: exit after SIGTERM: {status:?}");
    }
}

/// With little locked memory and without CAP_IPC_LOCK (a user's usual situation), the file
/// server still starts and serves: registered buffers are reported as not used, with the limit
/// as the reason, and a file sent through the read + write path (which reads into registered
/// buffers where they exist) arrives whole. An engine that cannot start on so little refuses
/// with one error line naming the limit.
#[test]
fn a_low_locked_memory_limit_turns_registered_buffers_off_and_files_still_arrive() {
    use sha2::{Digest, Sha256};
    let have = |tool: &str| Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success());
    if !have("prlimit") || !have("setpriv") {
        println!("skipped: prlimit and setpriv (util-linux) are needed to lower the limit and drop CAP_IPC_LOCK");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut big = vec![0u8; (1 << 20) + 3];
    rng.fill(&mut big[..]);
    std::fs::write(dir.path().join("big.bin"), &big).unwrap();
    let root = dir.path().to_str().unwrap();
    // SAFETY: geteuid(2) has no failure mode.
    let root_user = unsafe { libc::geteuid() } == 0;
    for (i, rt) in runtimes().into_iter().enumerate() {
        if i > 0 {
            // io_uring charges locked memory to the user, not the process, and an exited
            // process's rings are released by a kernel worker a moment later: give the
            // previous backend's rings time to go before the next one counts against 1 MiB.
            std::thread::sleep(Duration::from_millis(500));
        }
        let mut cmd = Command::new("prlimit");
        cmd.arg("--memlock=1048576:1048576").arg("--");
        if root_user {
            cmd.args(["setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock", "--"]);
        }
        cmd.args([BIN, "files", root, "--runtime", rt, "--cores", "all", "--listen", "127.0.0.1:0"]).args([
            "--transfer",
            "read-write",
            "--drain-timeout",
            "20",
        ]);
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("corepin starts");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (mut banner, mut addr) = (String::new(), None);
        loop {
            let mut l = String::new();
            if out.read_line(&mut l).unwrap() == 0 {
                break;
            }
            if let Some(a) = l.trim().strip_prefix("corepin files listening on ") {
                addr = Some(a.parse::<SocketAddr>().unwrap());
            }
            banner.push_str(&l);
            if l.contains("rent I/O copies") {
                break;
            }
        }
        std::thread::spawn(move || for _ in out.lines() {});
        let mut errors = child.stderr.take().unwrap();
        let s = Running { child, addr: addr.unwrap_or_else(|| ([127, 0, 0, 1], 9).into()), banner };
        if addr.is_none() || !s.banner.contains("rent I/O copies") {
            // An engine may refuse to start on 512 KiB of locked memory per core: then it must
            // say why, in one line, and exit non-zero.
            let mut s = s;
            let status = wait_exit(&mut s.child, Duration::from_secs(10));
            let mut err = String::new();
            errors.read_to_string(&mut err).unwrap();
            assert!(!status.success(), "{rt}: exited 0 before serving");
            let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
            assert_eq!(lines.len(), 1, "{rt}: one error line:\n{err}");
            assert!(lines[0].contains("RLIMIT_MEMLOCK"), "{rt}: the refusal names the limit: {}", lines[0]);
            println!("{rt}: refused to start: {}", lines[0]);
            continue;
        }
        std::thread::spawn(move || std::io::copy(&mut errors, &mut std::io::sink()));
        let line = s.banner.lines().find(|l| l.trim_start().starts_with("registered buffers:")).unwrap().to_string();
        assert!(line.contains("not used"), "{rt}: {line}");
        let (status, body) = http_get(s.addr, "/big.bin");
        assert_eq!(status, "HTTP/1.1 200 OK", "{rt}");
        assert_eq!(Sha256::digest(&body), Sha256::digest(&big), "{rt}: the file arrives whole");
        if ["monoio", "tokio-uring", "compio"].contains(&rt) {
            // These register buffers on corepin's auxiliary ring when the limit allows.
            assert!(line.contains("RLIMIT_MEMLOCK"), "{rt}: the reason names the limit: {line}");
        }
    }
}

/// `corepin echo --metrics` serves the framework's endpoint: the connection counters count
/// what the clients did, the capability report matches the banner, other paths are 404, and
/// SIGTERM still exits 0.
#[test]
fn echo_exposes_connection_counters_and_capabilities_as_metrics() {
    use std::io::{Read, Write};
    fails_with_one_line(&["echo", "--metrics", "nowhere"], "--metrics");
    let ncpu = corepin::topology::Topology::discover().cpus().len();
    for rt in runtimes() {
        let mut s = start("echo", rt, &["--metrics", "127.0.0.1:0"], "metrics: http://");
        let metrics: SocketAddr = s
            .banner
            .lines()
            .find_map(|l| l.strip_prefix("metrics: http://"))
            .and_then(|l| l.strip_suffix("/metrics"))
            .unwrap_or_else(|| panic!("{rt}: no metrics address in\n{}", s.banner))
            .parse()
            .unwrap();
        const CLIENTS: usize = 5;
        let payload = b"counted by the framework";
        for _ in 0..CLIENTS {
            let mut c = std::net::TcpStream::connect(s.addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            c.write_all(payload).unwrap();
            c.shutdown(std::net::Shutdown::Write).unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).unwrap();
            assert_eq!(got, payload);
        }
        let bytes = CLIENTS * payload.len();
        // A connection is counted closed a moment after the client has seen its end: scrape
        // until every figure shows (10 s at most), then check them.
        let wanted = [
            format!("corepin_connections_accepted_all_cores_total {CLIENTS}"),
            "corepin_connections_active_all_cores 0".to_string(),
            format!("corepin_received_bytes_all_cores_total {bytes}"),
            format!("corepin_sent_bytes_all_cores_total {bytes}"),
        ];
        let has = |text: &str, w: &str| text.lines().any(|l| l == w);
        let deadline = Instant::now() + Duration::from_secs(10);
        let text = loop {
            let (status, text) = http_get(metrics, "/metrics");
            assert_eq!(status, "HTTP/1.1 200 OK");
            let text = String::from_utf8(text).unwrap();
            if wanted.iter().all(|w| has(&text, w)) || Instant::now() >= deadline {
                break text;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for w in &wanted {
            assert!(has(&text, w), "{rt}: no `{w}` in\n{text}");
        }
        // The capability report, per core, as the banner prints it (its first report; every
        // worker builds the same engine).
        let driver = s.banner.lines().find_map(|l| l.trim().strip_prefix("driver:")).map(str::trim_start);
        let driver = if driver.is_some_and(|d| d.starts_with("io_uring")) { "io_uring" } else { "epoll" };
        let mut mechanisms = 0;
        for line in s.banner.lines() {
            let Some((name, rest)) = line.trim().split_once(':') else { continue };
            let rest = rest.trim_start();
            let Some((_, kernel)) = rest.split_once("(kernel: ") else { continue };
            let kernel = if kernel.starts_with("yes") { "yes" } else { "no" };
            let used = if rest.starts_with("used") { "yes" } else { "no" };
            let mechanism = name.replace(' ', "_");
            for core in 0..ncpu {
                let w = format!(
                    "corepin_capability_info{{core=\"{core}\",runtime=\"{rt}\",mechanism=\"{mechanism}\",\
                     kernel=\"{kernel}\",used=\"{used}\"}} 1"
                );
                assert!(has(&text, &w), "{rt}: no `{w}` in\n{text}");
            }
            mechanisms += 1;
        }
        assert_eq!(mechanisms, 6, "{rt}: six optional mechanisms in the banner:\n{}", s.banner);
        assert_eq!(
            text.lines().filter(|l| l.starts_with("corepin_capability_info{")).count(),
            6 * ncpu,
            "{rt}: one line per mechanism and core:\n{text}"
        );
        for core in 0..ncpu {
            let w = format!("corepin_driver_info{{core=\"{core}\",runtime=\"{rt}\",driver=\"{driver}\"}} 1");
            assert!(has(&text, &w), "{rt}: no `{w}` in\n{text}");
        }
        assert_eq!(http_get(metrics, "/").0, "HTTP/1.1 404 Not Found");
        // SAFETY: kill(2) with a valid pid and signal number.
        assert_eq!(unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) }, 0);
        let status = wait_exit(&mut s.child, Duration::from_secs(25));
        assert!(status.success(), "{rt}: exit after SIGTERM: {status:?}");
    }
}

#[test]
fn files_bad_arguments_give_one_clear_line() {
    fails_with_one_line(&["files", "/nonexistent/corepin-root"], "cannot serve /nonexistent/corepin-root");
    fails_with_one_line(&["files", env!("CARGO_MANIFEST_DIR"), "--transfer", "teleport"], "--transfer");
    fails_with_one_line(&["files", "--metrics", "nowhere"], "--metrics");
    fails_with_one_line(&["files", "--header-timeout", "0"], "--header-timeout");
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    fails_with_one_line(&["files", file], "not a directory");
}

#[allow(dead_code)]
#[path = "../examples/uppercase.rs"]
mod uppercase;

#[test]
fn the_uppercase_example_runs_on_every_backend() {
    use std::io::{Read, Write};
    for kind in corepin::RuntimeKind::compiled() {
        let cfg = corepin::LaunchConfig { cores: corepin::topology::CoreSelection::Count(2), ..Default::default() };
        let cpus = cfg.plan().unwrap();
        let app =
            corepin::TcpServer::bind("127.0.0.1:0".parse().unwrap(), cpus.len(), uppercase::UpperFactory).unwrap();
        let addr = app.local_addr();
        let server = corepin::start(kind, &cfg, &cpus, Arc::new(app)).unwrap();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"hello, corepin\n").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).unwrap();
        assert_eq!(got, "HELLO, COREPIN\n", "on {kind}");
        server.shutdown_handle().drain();
        server.wait().unwrap();
    }
}

#[allow(dead_code)]
#[path = "../examples/proxy.rs"]
mod proxy;

/// A std upstream that answers each connection only after the client's end of stream: it reads
/// everything, then sends it back and closes. Through a proxy this checks both the bytes and
/// the half-close in each direction (the upstream sees end of stream only if the proxy passes
/// the client's on, and the client shut its write side before any answer came).
fn echo_after_eof_upstream() -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut got = Vec::new();
                if s.read_to_end(&mut got).is_ok() {
                    let _ = s.write_all(&got);
                }
            });
        }
    });
    addr
}

/// The proxy example, run in-process on every compiled backend in front of a std upstream:
/// 20 concurrent connections of random sizes up to 4 MiB come back byte for byte, each after
/// its client shut its write side, and the client-side bytes are counted.
#[test]
fn the_proxy_example_relays_with_half_close_on_every_backend() {
    use std::io::{Read, Write};
    let upstream = echo_after_eof_upstream();
    let mut seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    println!("proxy test seed {seed}");
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for kind in corepin::RuntimeKind::compiled() {
        let cfg = corepin::LaunchConfig { cores: corepin::topology::CoreSelection::Count(2), ..Default::default() };
        let cpus = cfg.plan().unwrap();
        let app =
            corepin::TcpServer::bind("127.0.0.1:0".parse().unwrap(), cpus.len(), proxy::ProxyFactory { upstream })
                .unwrap();
        let addr = app.local_addr();
        let server = corepin::start(kind, &cfg, &cpus, Arc::new(app)).unwrap();
        let sizes: Vec<usize> = (0..20).map(|_| (next() % (4 << 20) + 1) as usize).collect();
        let clients: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let data: Vec<u8> = (0..len).map(|j| (j as u8).wrapping_mul(29).wrapping_add(i as u8)).collect();
                std::thread::spawn(move || {
                    let s = std::net::TcpStream::connect(addr).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                    let mut w = s.try_clone().unwrap();
                    let sent = data.clone();
                    let writer = std::thread::spawn(move || {
                        w.write_all(&sent).unwrap();
                        w.shutdown(std::net::Shutdown::Write).unwrap();
                    });
                    let mut got = Vec::new();
                    (&s).read_to_end(&mut got).unwrap();
                    writer.join().unwrap();
                    assert!(got == data, "connection {i} of {len} bytes came back with {} bytes", got.len());
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap_or_else(|_| panic!("a proxied connection failed on {kind}"));
        }
        let total: u64 = sizes.iter().map(|&n| n as u64).sum();
        let counters = server.counters().clone();
        let sum = |f: fn(&corepin::worker::CoreCounters) -> &std::sync::atomic::AtomicU64| -> u64 {
            (0..counters.len()).map(|i| corepin::worker::CoreCounters::get(f(counters.core(i)))).sum()
        };
        assert_eq!(sum(|c| &c.bytes_in), total, "client bytes read by the proxy on {kind}");
        assert_eq!(sum(|c| &c.bytes_out), total, "bytes the proxy wrote to clients on {kind}");
        server.shutdown_handle().drain();
        server.wait().unwrap();
    }
}

/// A port that another process already serves is refused with the same one line as a plain
/// bind, even though corepin's listeners set SO_REUSEPORT (which would otherwise let this
/// second process join the group and take half the connections without a word).
#[test]
fn a_port_already_served_is_refused_not_shared() {
    for rt in runtimes() {
        let first = start_echo(rt, &[]);
        let addr = first.addr.to_string();
        fails_with_one_line(&["echo", "--runtime", rt, "--listen", &addr], "address already in use");
        fails_with_one_line(&["files", "--runtime", rt, "--listen", &addr], "address already in use");
        drop(first);
    }
}

/// One echo round trip on `s`.
fn echo_once(s: &mut std::net::TcpStream, what: &[u8]) {
    s.write_all(what).unwrap();
    let mut back = vec![0u8; what.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, what);
}

/// `--takeover`, the deliberate exception to the rule above: a second server joins the port
/// of the first. Sent SIGTERM, the first drains (a connection open across the upgrade is still
/// served) and exits 0; new connections then all reach the second. On a free port the flag
/// just serves alone, and says so.
#[test]
fn takeover_shares_the_port_until_the_old_server_drains() {
    for rt in runtimes() {
        let mut old = start_echo(rt, &[]);
        let addr = old.addr;
        let mut held = std::net::TcpStream::connect(addr).unwrap();
        held.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        echo_once(&mut held, b"before the upgrade");
        let new = start_at("echo", rt, &addr.to_string(), &["--takeover"], "takeover: ");
        assert_eq!(new.addr, addr, "{rt}");
        assert!(
            new.banner.contains(&format!("takeover: sharing {addr} with the server already there")),
            "{}",
            new.banner
        );
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(old.child.id() as i32, libc::SIGTERM) };
        echo_once(&mut held, b"during the old server's drain");
        drop(held);
        let status = wait_exit(&mut old.child, Duration::from_secs(30));
        assert_eq!(status.code(), Some(0), "{rt}: the old server drained and exited 0");
        for i in 0..50 {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            echo_once(&mut s, format!("after the upgrade {i}").as_bytes());
        }
        drop(new);
        let alone = start("echo", rt, &["--takeover"], "takeover: ");
        assert!(
            alone.banner.contains("takeover: nothing else listens on 127.0.0.1:0; serving alone"),
            "{}",
            alone.banner
        );
    }
}

/// A pipe whose write end goes to the child's stdout and stderr.
fn pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two descriptors for pipe2 to fill.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 returned two fresh descriptors that nobody else owns.
    unsafe { (std::os::fd::OwnedFd::from_raw_fd(fds[0]), std::os::fd::OwnedFd::from_raw_fd(fds[1])) }
}

/// Starts `corepin echo` on a free port with stdout and stderr on `out`, waits until it
/// accepts connections, sends SIGTERM, and returns how it exited (or fails after 20 s).
fn sigterm_with_output_on(rt: &str, out: std::os::fd::OwnedFd, what: &str) -> std::process::ExitStatus {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let err = out.try_clone().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let mut child = Command::new(BIN)
        .args(["echo", "--runtime", rt, "--listen", &listen, "--drain-timeout", "2"])
        .env("COREPIN_LOG", "debug") // plenty of log lines to write into the broken stderr
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&listen).is_err() {
        assert!(Instant::now() < deadline, "{rt} with {what}: never accepted a connection");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{rt} with {what}: SIGTERM did not stop the process within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM drains and stops the process whatever stdout and stderr are: a pipe nobody reads
/// any more (writes fail with EPIPE), a full pipe (writes block), or /dev/full (ENOSPC).
#[test]
fn sigterm_stops_the_process_whatever_stdout_and_stderr_are() {
    for rt in runtimes() {
        let (r, w) = pipe();
        drop(r); // closed: every write fails with EPIPE
        let status = sigterm_with_output_on(rt, w, "a closed pipe");
        assert_eq!(status.code(), Some(0), "{rt} with a closed pipe: {status}");

        let (r, w) = pipe();
        {
            // Fill the pipe, then make it blocking again: the child's writes now block.
            use std::io::Write;
            use std::os::fd::AsRawFd;
            // SAFETY: fcntl on the write end we own.
            let flags = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_GETFL) };
            // SAFETY: as above; only O_NONBLOCK changes.
            unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
            let mut f = std::fs::File::from(w.try_clone().unwrap());
            while f.write(&[b'x'; 4096]).is_ok() {}
            // SAFETY: restores the flags read above.
            unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETFL, flags) };
        }
        let status = sigterm_with_output_on(rt, w, "a full pipe");
        assert_eq!(status.code(), Some(0), "{rt} with a full pipe: {status}");
        drop(r);

        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        let status = sigterm_with_output_on(rt, full.into(), "/dev/full");
        assert_eq!(status.code(), Some(0), "{rt} with /dev/full: {status}");
    }
}

#[allow(dead_code)]
#[path = "../examples/kv.rs"]
mod kv;

/// Runs `redis-cli -h 127.0.0.1 -p <port> <args>` with `stdin` and returns its stdout.
fn redis_cli(port: u16, args: &[&str], stdin: Vec<u8>) -> String {
    use std::io::Write;
    let mut child = match Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!("cannot run redis-cli ({e}): run scripts/setup.sh, which installs redis-tools"),
    };
    let mut input = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || input.write_all(&stdin));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "redis-cli {args:?}: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The kv example, run in-process on every compiled backend on two workers and driven by the
/// independent client redis-cli: 200 SETs in pipe mode, every value back exactly (keys owned
/// by both workers, so half the commands are forwarded to the other core), DBSIZE summed over
/// the shards, DEL and EXISTS, and an error for an unknown command.
#[test]
fn the_kv_example_serves_redis_cli_on_every_backend() {
    if Command::new("redis-cli").arg("--version").output().is_err() {
        panic!("redis-cli not found: run scripts/setup.sh, which installs redis-tools");
    }
    for kind in corepin::RuntimeKind::compiled() {
        let cfg = corepin::LaunchConfig { cores: corepin::topology::CoreSelection::Count(2), ..Default::default() };
        let cpus = cfg.plan().unwrap();
        let workers = cpus.len();
        let app = corepin::TcpServer::bind("127.0.0.1:0".parse().unwrap(), workers, kv::KvFactory::new()).unwrap();
        let port = app.local_addr().port();
        let server = corepin::start(kind, &cfg, &cpus, Arc::new(app)).unwrap();

        let keys: Vec<String> = (0..200).map(|i| format!("key:{i}")).collect();
        let values: Vec<String> = (0..200).map(|i| format!("value-{i}-{kind}-{}", i * 7919)).collect();
        let owners: std::collections::HashSet<usize> = keys.iter().map(|k| kv::owner(k.as_bytes(), workers)).collect();
        assert_eq!(owners.len(), workers, "the keys are spread over every worker");

        let mut resp = Vec::new();
        for (k, v) in keys.iter().zip(&values) {
            resp.extend_from_slice(
                format!("*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n", k.len(), v.len()).as_bytes(),
            );
        }
        let piped = redis_cli(port, &["--pipe"], resp);
        assert!(piped.contains("errors: 0, replies: 200"), "on {kind}: {piped}");

        let gets: String = keys.iter().map(|k| format!("GET {k}\n")).collect();
        let got = redis_cli(port, &[], gets.into_bytes());
        assert_eq!(got.lines().collect::<Vec<_>>(), values, "on {kind}");

        assert_eq!(redis_cli(port, &["DBSIZE"], Vec::new()), "200\n", "on {kind}");
        assert_eq!(redis_cli(port, &["DEL", "key:0", "key:1", "key:2", "nope"], Vec::new()), "3\n", "on {kind}");
        assert_eq!(redis_cli(port, &["EXISTS", "key:0", "key:3", "key:4"], Vec::new()), "2\n", "on {kind}");
        assert_eq!(redis_cli(port, &["GET", "key:1"], Vec::new()), "\n", "on {kind}");
        assert_eq!(redis_cli(port, &["DBSIZE"], Vec::new()), "197\n", "on {kind}");
        let unknown = redis_cli(port, &["FLUSHALL"], Vec::new());
        assert_eq!(unknown.trim_end(), "ERR unknown command 'FLUSHALL'", "on {kind}");

        // One pipeline mixing batched commands (GET, SET on keys of both workers) with others
        // (DEL, EXISTS, an error) on the same keys: the replies come back in request order
        // and each command sees the ones before it.
        let (a, b) = (
            &keys[10],
            (11..200)
                .map(|i| &keys[i])
                .find(|k| kv::owner(k.as_bytes(), workers) != kv::owner(keys[10].as_bytes(), workers))
                .unwrap(),
        );
        let cmd = |parts: &[&str]| -> String {
            let mut c = format!("*{}\r\n", parts.len());
            for p in parts {
                c += &format!("${}\r\n{p}\r\n", p.len());
            }
            c
        };
        let pipeline: String = [
            cmd(&["SET", a, "1"]),
            cmd(&["GET", a]),
            cmd(&["SET", b, "2"]),
            cmd(&["DEL", a]),
            cmd(&["GET", a]),
            cmd(&["GET", b]),
            cmd(&["SET", a, "3"]),
            cmd(&["EXISTS", a, b]),
            cmd(&["SET", b, "4", "EX"]),
            cmd(&["GET", a]),
            cmd(&["GET", b]),
        ]
        .concat();
        let expected =
            "+OK\r\n$1\r\n1\r\n+OK\r\n:1\r\n$-1\r\n$1\r\n2\r\n+OK\r\n:2\r\n-ERR syntax error\r\n$1\r\n3\r\n$1\r\n2\r\n";
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(pipeline.as_bytes()).unwrap();
        let mut got = Vec::new();
        while got.len() < expected.len() {
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "on {kind}: closed after {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(String::from_utf8_lossy(&got), expected, "on {kind}");

        server.shutdown_handle().drain();
        server.wait().unwrap();
    }
}
