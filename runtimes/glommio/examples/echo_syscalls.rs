//! A minimal ping-pong echo for counting syscalls per message on the glommio backend.
//!
//! `echo_syscalls server 127.0.0.1:7000` serves (`std-server` serves with blocking std I/O, as
//! a floor to compare with); `echo_syscalls client 127.0.0.1:7000 20000 64`
//! sends 20000 messages of 64 bytes one at a time and waits for each echo (an optional fifth
//! argument pauses that many microseconds between messages, so the server parks each time). Run the server
//! under `strace -c -f` and divide by the message count.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use corepin_core::buf::BufResult;
use corepin_core::io::{AsyncReadRent, AsyncWriteRentExt};
use corepin_core::runtime::{EngineSettings, Runtime, TcpListener, TcpStream};
use corepin_glommio::GlommioRuntime as G;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: echo_syscalls server ADDR [CONNS] | std-server ADDR | client ADDR COUNT SIZE [GAP_US]";
    let addr: SocketAddr = args.get(2).expect(usage).parse().expect("address");
    match args.get(1).map(String::as_str) {
        Some("std-server") => std_server(addr),
        Some("server") => server(addr, args.get(3).map_or(1, |c| c.parse().expect("connections"))),
        Some("client") => {
            let count: usize = args.get(3).expect(usage).parse().expect("count");
            let size: usize = args.get(4).expect(usage).parse().expect("size");
            let gap_us: u64 = args.get(5).map_or(0, |g| g.parse().expect("gap in microseconds"));
            client(addr, count, size, gap_us)
        }
        _ => panic!("{usage}"),
    }
}

fn server(addr: SocketAddr, conns: usize) {
    let settings = EngineSettings { memlock_budget: 4 << 20, ..EngineSettings::default() };
    G::block_on(&settings, || async move {
        let std = std::net::TcpListener::bind(addr).expect("bind");
        std.set_nonblocking(true).expect("nonblocking");
        let l = <G as Runtime>::TcpListener::from_std(std).expect("listener");
        println!("{}", G::capabilities().expect("caps"));
        let mut done = Vec::new();
        for _ in 0..conns {
            let (mut s, _) = l.accept().await.expect("accept");
            s.set_nodelay(true).expect("nodelay");
            done.push(corepin_core::task::spawn::<G, _>(async move {
                let mut buf = Vec::with_capacity(4096);
                loop {
                    buf.clear();
                    let BufResult(r, b) = s.read(buf).await;
                    let n = r.expect("read");
                    if n == 0 {
                        break;
                    }
                    let BufResult(r, b) = s.write_all(b).await;
                    r.expect("write");
                    buf = b;
                }
            }));
        }
        for d in done {
            d.await.expect("connection task");
        }
    })
    .expect("engine");
}

/// A blocking std echo of one connection: the syscall and latency floor to compare with.
fn std_server(addr: SocketAddr) {
    let l = std::net::TcpListener::bind(addr).expect("bind");
    let (mut s, _) = l.accept().expect("accept");
    s.set_nodelay(true).expect("nodelay");
    let mut buf = vec![0u8; 4096];
    loop {
        let n = s.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n]).expect("write");
    }
}

fn client(addr: SocketAddr, count: usize, size: usize, gap_us: u64) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let msg = vec![7u8; size];
    let mut back = vec![0u8; size];
    let t = Instant::now();
    for _ in 0..count {
        s.write_all(&msg).expect("write");
        s.read_exact(&mut back).expect("read");
        if gap_us > 0 {
            std::thread::sleep(std::time::Duration::from_micros(gap_us));
        }
    }
    let el = t.elapsed();
    println!("{count} round trips of {size} B in {el:?}: {:.1} us each", el.as_secs_f64() * 1e6 / count as f64);
}
