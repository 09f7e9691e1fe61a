//! A TCP proxy written once against corepin: every connection a core accepts is relayed to
//! `--upstream` in both directions at once, on whichever backend `--runtime` names. Each side
//! is split into a read half and a write half and `copy_bidirectional` drives the two
//! directions concurrently, passing a half-close on (a client that shuts its write side still
//! receives everything the upstream sends afterwards). Bytes to and from clients count into
//! the core's counters.
//!
//! ```sh
//! cargo run --release --example proxy -- --runtime tokio-uring --listen 127.0.0.1:7200 --upstream 127.0.0.1:7100
//! ```

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use corepin::{
    ConnStream, Connection, LaunchConfig, Runtime, RuntimeKind, Service, ServiceFactory, TcpServer, TcpStream, Worker,
};

/// Builds one `Proxy` per core, all relaying to the same upstream.
pub struct ProxyFactory {
    /// Where connections are relayed to.
    pub upstream: SocketAddr,
}

/// The per-core service.
pub struct Proxy {
    upstream: SocketAddr,
}

impl ServiceFactory for ProxyFactory {
    type Service<R: Runtime, S: ConnStream> = Proxy;
    type Error = std::convert::Infallible;
    fn new_service<R: Runtime, S: ConnStream>(&self, _worker: &Worker) -> Result<Proxy, Self::Error> {
        Ok(Proxy { upstream: self.upstream })
    }
}

impl<R: Runtime, S: ConnStream> Service<Connection<R, S>> for Proxy {
    type Response = ();
    type Error = io::Error;

    async fn call(&self, conn: Connection<R, S>) -> io::Result<()> {
        // The outgoing connection is made on this core, by this core's engine.
        let upstream = R::TcpStream::connect(self.upstream)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("cannot connect to upstream {}: {e}", self.upstream)))?;
        upstream.set_nodelay(true)?;
        // Two halves per side: each direction waits on its own half, so neither direction can
        // hold the other up when a socket buffer fills. The client side's halves still count
        // into the core's byte counters.
        let (mut client_read, mut client_write) = conn.stream.into_split();
        let (mut upstream_read, mut upstream_write) = upstream.into_split();
        corepin::copy_bidirectional(&mut client_read, &mut client_write, &mut upstream_read, &mut upstream_write)
            .await?;
        Ok(())
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
    /// Where clients connect.
    #[arg(long, default_value = "127.0.0.1:7200")]
    listen: String,
    /// Where their connections are relayed to.
    #[arg(long)]
    upstream: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let kind: RuntimeKind = args.runtime.parse()?;
    let cfg = LaunchConfig { cores: args.cores.parse()?, ..LaunchConfig::default() };
    let cpus = cfg.plan()?;
    let addr = args.listen.parse().with_context(|| format!("bad --listen {:?}", args.listen))?;
    let upstream = args.upstream.parse().with_context(|| format!("bad --upstream {:?}", args.upstream))?;
    let app = TcpServer::bind(addr, cpus.len(), ProxyFactory { upstream })?;
    let server = corepin::start(kind, &cfg, &cpus, Arc::new(app))?;
    println!("proxy on {addr} to {upstream} with {kind} on {} cores", cpus.len());
    server.wait_with_signals()?;
    Ok(())
}
