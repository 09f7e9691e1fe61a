//! The `corepin` binary with TLS, end to end, on every compiled backend: `files --tls` prints
//! a fingerprint that matches the certificate it serves (computed independently by openssl)
//! and the PEM path curl trusts; `echo --tls-cert/--tls-key` with RSA (PKCS#8 and PKCS#1) and
//! EC (SEC1) keys; SIGHUP reloads the certificate for new connections while an open one
//! goes on, and a broken file keeps the old certificate, each with one log line.

#![cfg(feature = "tls")]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_corepin");

fn runtimes() -> Vec<&'static str> {
    corepin::RuntimeKind::compiled().into_iter().map(corepin::RuntimeKind::name).collect()
}

struct Running {
    child: Child,
    addr: SocketAddr,
    banner: String,
    stderr: Arc<Mutex<String>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// Waits (20 s at most) until stderr has a line containing `text` after the first
    /// `skip` bytes; returns the position after it.
    fn wait_log(&self, text: &str, skip: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.stderr.lock().unwrap().clone();
            if let Some(at) = log.get(skip..).and_then(|l| l.find(text)) {
                return skip + at + text.len();
            }
            assert!(Instant::now() < deadline, "no log line containing {text:?}; stderr:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
    fn stop(mut self) {
        self.signal(libc::SIGTERM);
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                assert_eq!(s.code(), Some(0), "exits 0 after SIGTERM");
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "corepin did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts `corepin <service>` and reads its banner up to the line containing `last`.
fn start(service: &str, runtime: &str, extra: &[&str], last: &str) -> Running {
    let mut child = Command::new(BIN)
        .args([service, "--runtime", runtime, "--cores", "all", "--listen", "127.0.0.1:0", "--drain-timeout", "5"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("corepin starts");
    let stderr = Arc::new(Mutex::new(String::new()));
    let (err, sink) = (child.stderr.take().unwrap(), Arc::clone(&stderr));
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut banner = String::new();
    let mut addr = None;
    let listening = format!("corepin {service} listening on ");
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            panic!("corepin exited before its banner was complete:\n{banner}\n{}", stderr.lock().unwrap());
        }
        if let Some(rest) = line.trim().strip_prefix(listening.as_str()) {
            addr = Some(rest.parse().unwrap());
        }
        banner.push_str(&line);
        if line.contains(last) {
            break;
        }
    }
    std::thread::spawn(move || for _ in out.lines() {});
    Running { child, addr: addr.expect("the banner names the address"), banner, stderr }
}

fn sh(script: &str) -> String {
    let out = Command::new("sh").args(["-c", script]).output().expect("sh runs");
    assert!(out.status.success(), "`{script}` failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The SPKI SHA-256 (base64) of the certificate `addr` presents, computed by openssl.
fn served_fingerprint(addr: SocketAddr) -> String {
    sh(&format!(
        "openssl s_client -connect {addr} -servername localhost </dev/null 2>/dev/null | openssl x509 -pubkey -noout \
         | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64"
    ))
}

/// The SPKI SHA-256 (base64) of a PEM certificate file, computed by openssl.
fn file_fingerprint(cert: &Path) -> String {
    sh(&format!(
        "openssl x509 -in {} -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64",
        cert.display()
    ))
}

#[test]
fn files_tls_prints_its_fingerprint_and_a_certificate_curl_trusts() {
    for rt in runtimes() {
        let server = start("files", rt, &["--tls"], "tls: TLS 1.3 and 1.2");
        let b = &server.banner;
        let pem = b
            .lines()
            .find_map(|l| l.strip_prefix("tls: self-signed certificate for localhost, 127.0.0.1, ::1 written to "))
            .and_then(|l| l.split(' ').next())
            .unwrap_or_else(|| panic!("no certificate path in the banner:\n{b}"))
            .to_string();
        let fingerprint = b
            .lines()
            .find_map(|l| l.strip_prefix("tls: SPKI sha256 "))
            .and_then(|l| l.split(' ').next())
            .unwrap_or_else(|| panic!("no fingerprint in the banner:\n{b}"))
            .to_string();
        assert!(b.contains("sendfile(2) is not used"), "the banner says why sendfile is off:\n{b}");
        assert_eq!(fingerprint, served_fingerprint(server.addr), "{rt}: the printed fingerprint is the served key's");
        assert_eq!(fingerprint, file_fingerprint(Path::new(&pem)), "{rt}: the written PEM is the served certificate");
        let port = server.addr.port();
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "30", "--cacert", &pem])
            .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
            .arg(format!("https://localhost:{port}/"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{rt}: {}", String::from_utf8_lossy(&out.stderr));
        let demo = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/services/files/demo/index.html")).unwrap();
        assert_eq!(out.stdout, demo, "{rt}: the demo index over HTTPS");
        server.stop();
        assert!(!Path::new(&pem).exists(), "{rt}: the self-signed PEM is removed at exit");
    }
}

/// A line-echo session over `openssl s_client -quiet` that stays open.
struct Session {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Session {
    fn open(addr: SocketAddr) -> Session {
        let mut child = Command::new("openssl")
            .args(["s_client", "-quiet", "-connect", &addr.to_string(), "-servername", "localhost"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl is needed for this test: scripts/setup.sh installs it");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Session { child, lines }
    }
    fn echo(&mut self, text: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(format!("{text}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
        let got = self.lines.recv_timeout(Duration::from_secs(20)).expect("the echo comes back");
        assert_eq!(got, text);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn sighup_reloads_the_certificate_and_a_broken_file_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let san = "-subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -days 2";
    // A: RSA, PKCS#8 key. B: EC P-256, SEC1 key. C: RSA, PKCS#1 key.
    sh(&format!("openssl req -x509 -newkey rsa:2048 -nodes -keyout {d}/a.key -out {d}/a.pem {san} 2>/dev/null"));
    sh(&format!("openssl ecparam -name prime256v1 -genkey -noout -out {d}/b.key"));
    sh(&format!("openssl req -x509 -key {d}/b.key -out {d}/b.pem {san}"));
    sh(&format!("openssl genrsa -traditional -out {d}/c.key 2048 2>/dev/null"));
    sh(&format!("openssl req -x509 -key {d}/c.key -out {d}/c.pem {san}"));
    assert!(std::fs::read_to_string(dir.path().join("a.key")).unwrap().contains("BEGIN PRIVATE KEY"));
    assert!(std::fs::read_to_string(dir.path().join("b.key")).unwrap().contains("BEGIN EC PRIVATE KEY"));
    assert!(std::fs::read_to_string(dir.path().join("c.key")).unwrap().contains("BEGIN RSA PRIVATE KEY"));
    let fp = |n: &str| file_fingerprint(&dir.path().join(format!("{n}.pem")));
    let (fa, fb, fc) = (fp("a"), fp("b"), fp("c"));
    assert!(fa != fb && fb != fc && fa != fc);
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let install = |n: &str| {
        std::fs::copy(dir.path().join(format!("{n}.pem")), &cert).unwrap();
        std::fs::copy(dir.path().join(format!("{n}.key")), &key).unwrap();
    };

    for rt in runtimes() {
        install("a");
        let args =
            ["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap(), "--metrics", "127.0.0.1:0"];
        let server = start("echo", rt, &args, "metrics: http://");
        assert!(server.banner.contains(&format!("tls: SPKI sha256 {fa} ")), "{rt}: banner:\n{}", server.banner);
        // The expiry, as openssl reads it ("notAfter=Dec  1 07:37:21 2026 GMT"), in the banner as
        // "01 Dec 2026 07:37:21"; `-days 2` leaves two days, or one and most of another.
        let end = sh(&format!("openssl x509 -enddate -noout -in {d}/a.pem"));
        let [mon, day, time, year] = [0, 1, 2, 3].map(|i| end["notAfter=".len()..].split_whitespace().nth(i).unwrap());
        let until = format!("{day:0>2} {mon} {year} {time}");
        let line = server.banner.lines().find(|l| l.starts_with("tls: certificate chain valid until "));
        assert!(
            line.is_some_and(|l| l.contains(&until) && (l.ends_with(" (in 1 day)") || l.ends_with(" (in 2 days)"))),
            "{rt}: `{end}` not in the banner:\n{}",
            server.banner
        );
        assert_eq!(served_fingerprint(server.addr), fa, "{rt}: A is served");
        let mut open = Session::open(server.addr);
        open.echo("before the reload");

        install("b");
        server.signal(libc::SIGHUP);
        let at =
            server.wait_log(&format!("SIGHUP: TLS certificate reloaded; new handshakes present SPKI sha256 {fb}"), 0);
        assert_eq!(served_fingerprint(server.addr), fb, "{rt}: new connections see B");
        open.echo("after the reload, on the connection opened before it");

        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n").unwrap();
        server.signal(libc::SIGHUP);
        let at = server.wait_log("SIGHUP: TLS certificate NOT reloaded, still serving the previous one", at);
        assert_eq!(served_fingerprint(server.addr), fb, "{rt}: a broken file keeps B");

        install("c");
        server.signal(libc::SIGHUP);
        server.wait_log(&format!("new handshakes present SPKI sha256 {fc}"), at);
        assert_eq!(served_fingerprint(server.addr), fc, "{rt}: C (an RSA PKCS#1 key) is served");
        open.echo("still open");
        drop(open);
        // Every handshake is counted: complete ones as `full`, and the fingerprint probes,
        // whose openssl may be cut off by its pipe before it sends Finished, as failures. The
        // server counts when the client's last flight arrives, a moment after the client has
        // what it needs: scrape until the count is there (10 s at most), then assert.
        let counted = |metrics: &str| {
            let value = |l: &str| l.rsplit(' ').next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            let full: u64 = metrics
                .lines()
                .filter(|l| l.starts_with("corepin_tls_handshakes_all_cores_total{kind=\"full\"}"))
                .map(value)
                .sum();
            let failed: u64 =
                metrics.lines().filter(|l| l.starts_with("corepin_tls_handshake_failures_total{")).map(value).sum();
            (full, full + failed)
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut metrics = scrape(&server.banner);
        while counted(&metrics).1 < 5 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            metrics = scrape(&server.banner);
        }
        for line in [
            "corepin_tls_certificate_reloads_total{result=\"ok\"} 2",
            "corepin_tls_certificate_reloads_total{result=\"failed\"} 1",
        ] {
            assert!(metrics.lines().any(|l| l == line), "{rt}: no `{line}` in\n{metrics}");
        }
        let (full, all) = counted(&metrics);
        // The open session and four probes (A, B, B, C).
        assert!(full >= 1 && all >= 5, "{rt}: {full} full handshakes of {all} counted:\n{metrics}");
        server.stop();
    }
}

/// GETs /metrics from the address the banner names.
fn scrape(banner: &str) -> String {
    use std::io::Read;
    let url = banner.lines().find_map(|l| l.strip_prefix("metrics: http://")).expect("a metrics line");
    let addr = url.trim_end_matches("/metrics");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

#[test]
fn bad_tls_arguments_give_one_clear_line() {
    let run = |args: &[&str]| common::one_error_line(BIN, args);
    let err = run(&["echo", "--listen", "127.0.0.1:0", "--tls-cert", "/nonexistent/c.pem"]);
    assert!(err.contains("--tls-key"), "{err}");
    let err = run(&[
        "echo",
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        "/nonexistent/c.pem",
        "--tls-key",
        "/nonexistent/k.pem",
    ]);
    assert!(err.starts_with("error: certificate /nonexistent/c.pem"), "{err}");
    let err = run(&["echo", "--listen", "127.0.0.1:0", "--tls", "--tls-ciphers", "TLS13_AES_128_GCM_SHA256,NOPE"]);
    assert!(err.contains("unknown TLS cipher suite \"NOPE\"") && err.contains("TLS13_AES_256_GCM_SHA384"), "{err}");
}

/// `--tls-ciphers` fixes the suite: openssl, which prefers AES-256-GCM and gets it by default
/// (rustls follows the client's order), gets AES-128-GCM when only that is offered.
#[test]
fn tls_ciphers_choose_the_suite() {
    for rt in runtimes() {
        tls_ciphers_choose_the_suite_on(rt);
    }
}

fn tls_ciphers_choose_the_suite_on(rt: &str) {
    let suite = |extra: &[&str]| {
        let mut args = vec!["--tls"];
        args.extend_from_slice(extra);
        let server = start("files", rt, &args, "tls: TLS 1.3 and 1.2");
        let out = sh(&format!(
            "openssl s_client -connect {} -tls1_3 -ciphersuites TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256 \
             </dev/null 2>/dev/null | grep -o 'Cipher is [A-Z0-9_]*' | head -1",
            server.addr
        ));
        server.stop();
        out
    };
    assert_eq!(suite(&[]), "Cipher is TLS_AES_256_GCM_SHA384", "{rt}: by default the client's first choice");
    assert_eq!(suite(&["--tls-ciphers", "TLS13_AES_128_GCM_SHA256"]), "Cipher is TLS_AES_128_GCM_SHA256", "{rt}");
}
