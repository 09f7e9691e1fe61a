//! A minimal corepin service to copy: upper-cases every line a client sends, on every core,
//! on whichever backend `--runtime` names.
//!
//! ```sh
//! cargo run --release --example uppercase -- --runtime glommio --listen 127.0.0.1:7100
//! printf 'hello\n' | nc -q1 127.0.0.1 7100     # HELLO
//! ```

use std::io;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use corepin::{
    AsyncWriteRentExt, BufResult, ConnStream, Connection, IoBuf, LaunchConfig, Runtime, RuntimeKind, Service,
    ServiceFactory, TcpServer, Worker,
};

/// Builds one `Upper` per core. The factory crosses threads; the service never does.
pub struct UpperFactory;

/// The per-core service.
pub struct Upper;

impl ServiceFactory for UpperFactory {
    // Generic over the runtime `R` and the connection's stream `S` (plain TCP, or TLS).
    type Service<R: Runtime, S: ConnStream> = Upper;
    type Error = std::convert::Infallible;
    fn new_service<R: Runtime, S: ConnStream>(&self, _worker: &Worker) -> Result<Upper, Self::Error> {
        Ok(Upper)
    }
}

impl<R: Runtime, S: ConnStream> Service<Connection<R, S>> for Upper {
    type Response = ();
    type Error = io::Error;

    async fn call(&self, mut conn: Connection<R, S>) -> io::Result<()> {
        // One buffer per connection, allocated on this core. It moves into every read and
        // write and comes back with the result.
        let mut buf = Vec::with_capacity(4096);
        loop {
            let BufResult(res, mut b) = conn.stream.read(buf).await;
            let n = res?;
            if n == 0 {
                return Ok(());
            }
            b[..n].make_ascii_uppercase();
            let BufResult(res, slice) = conn.stream.write_all(b.slice(..n)).await;
            res?;
            buf = slice.into_inner();
        }
    }
}

#[derive(Parser)]
struct Args {
    /// The backend (see `corepin::RuntimeKind`): monoio, glommio or tokio-uring.
    #[arg(long, default_value = "monoio")]
    runtime: String,
    /// all, a count, or a list such as 0,2-3.
    #[arg(long, default_value = "all")]
    cores: String,
    #[arg(long, default_value = "127.0.0.1:7100")]
    listen: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let kind: RuntimeKind = args.runtime.parse()?;
    let cfg = LaunchConfig { cores: args.cores.parse()?, ..LaunchConfig::default() };
    let cpus = cfg.plan()?;
    let addr = args.listen.parse().with_context(|| format!("bad --listen {:?}", args.listen))?;
    let app = TcpServer::bind(addr, cpus.len(), UpperFactory)?;
    let server = corepin::start(kind, &cfg, &cpus, Arc::new(app))?;
    println!("uppercase on {} with {kind} on {} cores", addr, cpus.len());
    server.wait_with_signals()?;
    Ok(())
}
