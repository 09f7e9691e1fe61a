//! `corepin h3` end to end on every compiled backend: the banner names the UDP endpoint, the
//! UDP offloads found, and
//! the SPKI fingerprint of the self-signed certificate it wrote (checked against openssl's),
//! an independent client (Python's aioquic, when installed) fetches the demo site over
//! HTTP/3 trusting that certificate, and SIGTERM exits 0; a bad certificate path is one
//! `error:` line.

#![cfg(feature = "h3")]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
    let mut child = Command::new(BIN)
        .args(["h3", "--runtime", runtime, "--cores", "all", "--listen", "127.0.0.1:0", "--drain-timeout", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("corepin starts");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let (mut banner, mut addr) = (String::new(), None);
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            panic!("corepin h3 exited before its banner was complete:\n{banner}");
        }
        if let Some(rest) = line.trim().strip_prefix("corepin h3 listening on ") {
            addr = Some(rest.parse().unwrap());
        }
        banner.push_str(&line);
        if line.contains("h3: connection steering") {
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
        let pem = b
            .lines()
            .find_map(|l| l.strip_prefix("tls: self-signed certificate for localhost, 127.0.0.1, ::1 written to "))
            .expect("the PEM path")
            .trim()
            .to_string();
        let fp = b
            .lines()
            .find_map(|l| l.strip_prefix("tls: SPKI sha256 "))
            .and_then(|l| l.split_whitespace().next())
            .expect("the fingerprint")
            .to_string();
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
    let run = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} must fail");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(err.trim().lines().count(), 1, "one line for {args:?}: {err}");
        err
    };
    let err = run(&["h3", "--listen", "127.0.0.1:0", "--cert", "/nonexistent/c.pem"]);
    assert!(err.contains("--key"), "{err}");
    let err = run(&["h3", "--listen", "127.0.0.1:0", "--cert", "/nonexistent/c.pem", "--key", "/nonexistent/k.pem"]);
    assert!(err.starts_with("error: certificate /nonexistent/c.pem"), "{err}");
}
