//! `corepin h3` and `corepin files --tls --h3` end to end on every compiled backend.
//!
//! - `h3`: the banner names the UDP endpoint, the UDP offloads found, and the SPKI fingerprint
//!   of the self-signed certificate it wrote (checked against openssl's); an independent client
//!   (Python's aioquic, when installed) fetches the demo site over HTTP/3 trusting that
//!   certificate, and SIGTERM exits 0; a bad certificate path is one `error:` line.
//! - `files --tls --h3`: HTTPS (curl) and HTTP/3 (aioquic) on the same port number give the
//!   same bytes, HTTPS responses carry `Alt-Svc: h3=":PORT"`, and headless Chromium (when
//!   installed) loads the page over HTTPS, then over HTTP/3 on its next load.
//! - ngtcp2's client (when installed) fetches a 16 MiB file from `corepin h3` while moving to a
//!   new local address, with either kind of steering.

#![cfg(feature = "h3")]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

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

impl Running {
    fn stop(mut self) {
        // SAFETY: kill(2) with our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                assert_eq!(s.code(), Some(0), "exits 0 after SIGTERM");
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "corepin h3 did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn start(runtime: &str) -> Running {
    start_with(
        &["h3", "--runtime", runtime, "--cores", "all", "--listen", "127.0.0.1:0", "--drain-timeout", "5"],
        "h3: connection steering",
    )
}

/// Starts corepin with `args` and reads its banner up to the line containing `last`.
fn start_with(args: &[&str], last: &str) -> Running {
    let what = args[0];
    let mut child =
        Command::new(BIN).args(args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("corepin starts");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let (mut banner, mut addr) = (String::new(), None);
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            panic!("corepin {what} exited before its banner was complete:\n{banner}");
        }
        if let Some(rest) = line.trim().strip_prefix(&format!("corepin {what} listening on ")) {
            addr = Some(rest.parse().unwrap());
        }
        banner.push_str(&line);
        if line.contains(last) {
            break;
        }
    }
    std::thread::spawn(move || for _ in out.lines() {});
    Running { child, addr: addr.expect("the banner names the address"), banner }
}

/// The SPKI SHA-256 (base64) of a PEM certificate file, computed by openssl.
fn file_fingerprint(cert: &Path) -> String {
    let script = format!(
        "openssl x509 -in {} -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64",
        cert.display()
    );
    let out = Command::new("sh").args(["-c", &script]).output().expect("sh runs");
    assert!(out.status.success(), "openssl failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The PEM path and SPKI fingerprint of the self-signed certificate a banner names.
fn self_signed(banner: &str) -> (String, String) {
    let pem = banner
        .lines()
        .find_map(|l| l.strip_prefix("tls: self-signed certificate for localhost, 127.0.0.1, ::1 written to "))
        .and_then(|l| l.split_whitespace().next())
        .expect("the PEM path")
        .to_string();
    let fp = banner
        .lines()
        .find_map(|l| l.strip_prefix("tls: SPKI sha256 "))
        .and_then(|l| l.split_whitespace().next())
        .expect("the fingerprint")
        .to_string();
    (pem, fp)
}

fn aioquic() -> bool {
    matches!(Command::new("python3").args(["-c", "import aioquic"]).output(), Ok(o) if o.status.success())
}

#[test]
fn h3_banner_names_the_endpoint_and_fingerprint_and_serves_the_demo_site() {
    let with_client = aioquic();
    if !with_client {
        eprintln!("aioquic is not installed (scripts/setup.sh): the banner is checked, no page is fetched");
    }
    for kind in corepin::RuntimeKind::compiled() {
        let server = start(kind.name());
        let b = &server.banner;
        assert!(b.contains(&format!("h3: one QUIC endpoint per core on udp {}", server.addr)), "{b}");
        assert!(b.lines().any(|l| l.starts_with("h3: UDP offloads: GSO ")), "{b}");
        assert!(
            b.contains("h3: connection steering: connection IDs name their core; a classic BPF program"),
            "{kind}: the steering program is attached: {b}"
        );
        let (pem, fp) = self_signed(b);
        assert_eq!(fp, file_fingerprint(Path::new(&pem)), "{kind}: the printed fingerprint is the certificate's");
        if with_client {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("services/h3/tests/aioquic_client.py");
            let out = Command::new("python3")
                .arg(script)
                .args(["--port", &server.addr.port().to_string(), "--ca", &pem, "/", "/missing"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{kind}: {text}{}", String::from_utf8_lossy(&out.stderr));
            let lines: Vec<&str> = text.lines().collect();
            assert!(lines[0].starts_with("/ 200 "), "{kind}: {text}");
            assert!(lines[1].starts_with("/missing 404 "), "{kind}: {text}");
        }
        server.stop();
        assert!(!Path::new(&pem).exists(), "{kind}: the self-signed PEM is removed at exit");
    }
}

#[test]
fn h3_bad_certificate_paths_give_one_clear_line() {
    let run = |args: &[&str]| common::one_error_line(BIN, args);
    let err = run(&["h3", "--listen", "127.0.0.1:0", "--cert", "/nonexistent/c.pem"]);
    assert!(err.contains("--key"), "{err}");
    let err = run(&["h3", "--listen", "127.0.0.1:0", "--cert", "/nonexistent/c.pem", "--key", "/nonexistent/k.pem"]);
    assert!(err.starts_with("error: certificate /nonexistent/c.pem"), "{err}");
}

fn chromium() -> bool {
    matches!(Command::new("chromium").arg("--version").output(), Ok(o) if o.status.success())
}

/// Loads `https://127.0.0.1:PORT/` `loads` times in headless Chromium (tests/chromium_loads.py),
/// accepting the certificate of SPKI fingerprint `fp`; one JSON line per load. 127.0.0.1, not
/// localhost: Chromium tries ::1 first for localhost, where nothing listens on UDP, and would
/// mark HTTP/3 broken for the origin.
fn chromium_loads(kind: corepin::RuntimeKind, port: u16, fp: &str, loads: usize, force_quic: bool) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/chromium_loads.py");
    let mut cmd = Command::new("python3");
    cmd.arg(&script).args(["--url", &format!("https://127.0.0.1:{port}/"), "--spki", fp, "--loads"]);
    cmd.arg(loads.to_string());
    if force_quic {
        cmd.arg("--force-quic");
    }
    let out = cmd.output().expect("python3 runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{kind}: {text}{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{kind}:\n{text}");
    text
}

/// Asserts the demo page's assets came over HTTP/3 in a load's JSON line.
fn assets_over_h3(kind: corepin::RuntimeKind, load: &str) {
    for asset in ["/logo.svg", "/style.css"] {
        let over_h3 = format!("{{\"path\": \"{asset}\", \"status\": 200, \"protocol\": \"h3\"}}");
        assert!(load.contains(&over_h3), "{kind}: {asset} over HTTP/3: {load}");
    }
}

fn start_files_h3(runtime: &str) -> Running {
    start_with(
        &[
            "files",
            "--tls",
            "--h3",
            "--runtime",
            runtime,
            "--cores",
            "all",
            "--listen",
            "127.0.0.1:0",
            "--drain-timeout",
            "5",
        ],
        "tls: TLS 1.3 and 1.2",
    )
}

/// The demo site's index page, the bytes every client below must receive.
fn demo_index() -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("services/files/demo/index.html")).unwrap()
}

#[test]
fn files_tls_h3_serves_https_and_http3_on_one_port_and_advertises_it() {
    use sha2::{Digest, Sha256};
    let with_client = aioquic();
    if !with_client {
        eprintln!(
            "aioquic is not installed (scripts/setup.sh): HTTP/3 is not fetched, only HTTPS and Alt-Svc are checked"
        );
    }
    let index = demo_index();
    let want = format!("/ 200 {} {:x}", index.len(), Sha256::digest(&index));
    for kind in corepin::RuntimeKind::compiled() {
        let server = start_files_h3(kind.name());
        let port = server.addr.port();
        let b = &server.banner;
        assert!(b.contains(&format!("h3: one QUIC endpoint per core on udp 127.0.0.1:{port} ")), "{kind}: {b}");
        assert!(b.contains(&format!("h3: HTTPS responses advertise it with Alt-Svc: h3=\":{port}\"")), "{kind}: {b}");
        let (pem, _) = self_signed(b);

        // HTTPS: the page, with the advertisement.
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert", &pem, "-D", "-", "-o", "/dev/null"])
            .arg(format!("https://localhost:{port}/"))
            .output()
            .expect("curl runs");
        let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        assert!(out.status.success(), "{kind}: curl: {}", String::from_utf8_lossy(&out.stderr));
        assert!(head.starts_with("http/1.1 200"), "{kind}: {head}");
        assert!(head.contains(&format!("\r\nalt-svc: h3=\":{port}\"\r\n")), "{kind}: {head}");
        let body = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert", &pem])
            .arg(format!("https://localhost:{port}/"))
            .output()
            .unwrap()
            .stdout;
        assert_eq!(body, index, "{kind}: the HTTPS body is the file");

        // HTTP/3 on the same port number, over UDP.
        if with_client {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("services/h3/tests/aioquic_client.py");
            let out = Command::new("python3")
                .arg(script)
                .args(["--port", &port.to_string(), "--ca", &pem, "/", "/missing"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{kind}: {text}{}", String::from_utf8_lossy(&out.stderr));
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines[0], want, "{kind}: HTTP/3 gives the same bytes");
            assert!(lines[1].starts_with("/missing 404 "), "{kind}: {text}");
        }
        server.stop();
        assert!(!Path::new(&pem).exists(), "{kind}: the self-signed PEM is removed at exit");
    }
}

/// `files --tls --h3` keeps one open-file cache (and one memory cache) per core for both
/// protocols: on one core, a page fetched over HTTPS and then over HTTP/3 is looked up once
/// as a miss; the HTTP/3 lookup finds the entry HTTPS made. With a cache per front end it
/// would miss again.
#[test]
fn files_tls_h3_answers_both_protocols_from_one_cache_per_core() {
    if !aioquic() {
        eprintln!("SKIPPED: aioquic is not installed (scripts/setup.sh installs it)");
        return;
    }
    let lookups = |text: &str, result: &str| -> u64 {
        let key = format!("corepin_file_open_cache_lookups_all_cores_total{{result=\"{result}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&key)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    };
    for kind in corepin::RuntimeKind::compiled() {
        let server = start_with(
            &[
                "files",
                "--tls",
                "--h3",
                "--runtime",
                kind.name(),
                "--cores",
                "0-0",
                "--listen",
                "127.0.0.1:0",
                "--metrics",
                "127.0.0.1:0",
                "--drain-timeout",
                "5",
            ],
            "metrics: http://",
        );
        let port = server.addr.port();
        let (pem, _) = self_signed(&server.banner);
        let metrics = server.banner.lines().find_map(|l| l.strip_prefix("metrics: ")).unwrap().trim().to_string();
        let scrape = || {
            String::from_utf8_lossy(&Command::new("curl").args(["-s", &metrics]).output().unwrap().stdout).to_string()
        };
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert", &pem, "-o", "/dev/null"])
            .arg(format!("https://localhost:{port}/index.html"))
            .output()
            .expect("curl runs");
        assert!(out.status.success(), "{kind}: curl: {}", String::from_utf8_lossy(&out.stderr));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("services/h3/tests/aioquic_client.py");
        let out = Command::new("python3")
            .arg(script)
            .args(["--port", &port.to_string(), "--ca", &pem, "/index.html"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.starts_with("/index.html 200 "),
            "{kind}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let m = scrape();
        assert_eq!(lookups(&m, "miss"), 1, "{kind}: the page is opened once for both protocols\n{m}");
        // Found: a hit, or past the 1 s validity window (aioquic's start can take longer), then
        // checked again; either way not a second miss.
        let found = lookups(&m, "hit") + lookups(&m, "expired");
        assert!(found >= 1, "{kind}: the HTTP/3 request found the entry HTTPS made\n{m}");
        server.stop();
    }
}

#[test]
fn chromium_finds_http3_through_alt_svc_and_uses_it_on_the_next_load() {
    if !chromium() {
        eprintln!("SKIPPED: chromium is not installed (scripts/setup.sh installs it)");
        return;
    }
    for kind in corepin::RuntimeKind::compiled() {
        let server = start_files_h3(kind.name());
        let port = server.addr.port();
        let (_, fp) = self_signed(&server.banner);
        let text = chromium_loads(kind, port, &fp, 3, false);
        let loads: Vec<&str> = text.lines().collect();
        assert_eq!(loads.len(), 3, "{kind}: {text}");
        for l in &loads {
            assert!(l.contains("\"status\": 200") && l.contains("\"title\": \"corepin demo site\""), "{kind}: {l}");
        }
        // The first load finds the server over HTTPS and learns of HTTP/3 from Alt-Svc...
        assert!(loads[0].contains("\"protocol\": \"http/1.1\""), "{kind}: {text}");
        assert!(loads[0].contains(&format!("\"alt_svc\": \"h3=\\\":{port}\\\"\"")), "{kind}: {text}");
        // ...and the next ones go over HTTP/3, assets included.
        assert!(
            loads[1].contains("\"protocol\": \"h3\"") && loads[2].contains("\"protocol\": \"h3\""),
            "{kind}: {text}"
        );
        assets_over_h3(kind, loads[2]);
        server.stop();
    }
}

/// Headless Chromium loads the demo page and its assets (style sheet, image) from `corepin h3`
/// alone, QUIC forced on the origin (`--origin-to-force-quic-on`), the self-signed certificate
/// accepted by the printed SPKI fingerprint: every response is 200 over `h3`.
#[test]
fn chromium_loads_a_page_and_its_assets_over_http3() {
    if !chromium() {
        eprintln!("SKIPPED: chromium is not installed (scripts/setup.sh --test installs it)");
        return;
    }
    for kind in corepin::RuntimeKind::compiled() {
        let server = start(kind.name());
        let port = server.addr.port();
        let (_, fp) = self_signed(&server.banner);
        let text = chromium_loads(kind, port, &fp, 1, true);
        assert!(text.contains("\"protocol\": \"h3\", \"status\": 200"), "{kind}: the page over h3: {text}");
        assert!(text.contains("\"title\": \"corepin demo site\""), "{kind}: {text}");
        assets_over_h3(kind, &text);
        server.stop();
    }
}

#[test]
fn files_h3_without_tls_or_with_takeover_is_one_clear_line() {
    let run = |args: &[&str]| common::one_error_line(BIN, args);
    let err = run(&["files", "--h3", "--listen", "127.0.0.1:0"]);
    assert!(err.contains("--h3 needs --tls"), "{err}");
    let err = run(&["files", "--h3", "--tls", "--takeover", "--listen", "127.0.0.1:0"]);
    assert!(err.contains("--takeover covers TCP only"), "{err}");
}

fn ngtcp2() -> bool {
    matches!(Command::new("gtlsclient").arg("--help").output(), Ok(o) if o.status.success())
}

/// ngtcp2's client (Debian's `ngtcp2-client`, a QUIC stack nobody here wrote) fetches a
/// 16 MiB file and the index page from `corepin h3`, and moves to a new local address 20 ms
/// after the handshake (`--change-local-addr`), mid-transfer: on every backend, with the BPF
/// program steering and with forwarding alone, the file arrives intact and the server counts
/// one migrated connection. (With `--steering hash` the same download stalls about half the
/// time: the datagrams from the new port reach the core that does not know the connection.)
#[test]
fn ngtcp2_fetches_a_large_file_while_changing_its_address() {
    use sha2::{Digest, Sha256};
    if !ngtcp2() {
        eprintln!("SKIPPED: ngtcp2's gtlsclient is not installed (scripts/setup.sh --test installs it)");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let mut big = vec![0u8; 16 << 20];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut big);
    std::fs::write(root.path().join("big.bin"), &big).unwrap();
    std::fs::write(root.path().join("index.html"), b"<p>corepin h3 and ngtcp2</p>\n").unwrap();
    let root_s = root.path().to_str().unwrap().to_string();
    for kind in corepin::RuntimeKind::compiled() {
        for steering in ["bpf", "forward"] {
            let server = start_with(
                &[
                    "h3",
                    &root_s,
                    "--runtime",
                    kind.name(),
                    "--cores",
                    "all",
                    "--steering",
                    steering,
                    "--listen",
                    "127.0.0.1:0",
                    "--metrics",
                    "127.0.0.1:0",
                    "--drain-timeout",
                    "5",
                ],
                "metrics: http://",
            );
            let port = server.addr.port().to_string();
            let metrics = server
                .banner
                .lines()
                .find_map(|l| l.strip_prefix("metrics: "))
                .expect("the metrics address")
                .trim()
                .to_string();
            let dl = tempfile::tempdir().unwrap();
            let out = Command::new("timeout")
                .args(["60", "gtlsclient", "--exit-on-all-streams-close", "--change-local-addr=20ms", "-q"])
                .arg(format!("--download={}", dl.path().display()))
                .args(["127.0.0.1", &port])
                .arg(format!("https://localhost:{port}/big.bin"))
                .arg(format!("https://localhost:{port}/"))
                .output()
                .expect("gtlsclient runs");
            let got = std::fs::read(dl.path().join("big.bin")).unwrap_or_default();
            assert!(
                got.len() == big.len() && Sha256::digest(&got) == Sha256::digest(&big),
                "{kind} {steering}: the 16 MiB file arrives intact after the address change (got {} bytes; \
                 gtlsclient exit {:?}: {})",
                got.len(),
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            );
            let index = std::fs::read(dl.path().join("index.html")).unwrap_or_default();
            assert_eq!(index, b"<p>corepin h3 and ngtcp2</p>\n", "{kind} {steering}: the index page");
            // The connection's end (and so its migration) is counted once the server sees it.
            let t = Instant::now();
            let migrated = loop {
                let text = Command::new("curl").args(["-s", &metrics]).output().unwrap().stdout;
                let text = String::from_utf8_lossy(&text).to_string();
                let n = text
                    .lines()
                    .find_map(|l| l.strip_prefix("corepin_quic_migrated_connections_all_cores_total "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0);
                if n > 0 || t.elapsed() > Duration::from_secs(40) {
                    break n;
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            assert_eq!(migrated, 1, "{kind} {steering}: the server counted the migration");
            server.stop();
        }
    }
}
