//! A user datagram service to copy: statsd-style counters (`name:value|c`, one or more lines
//! per datagram) summed on every core, whichever source delivers the datagrams (AF_XDP as
//! root, else one UDP socket per core) and on whichever backend `--runtime` names. The sums are
//! printed when it stops.
//!
//! ```sh
//! cargo run --release --example statsd -- --interface lo --port 8125 --source socket
//! printf 'hits:1|c\nbytes:512|c' | nc -u -q1 127.0.0.1 8125
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use corepin::datagram::{Datagram, DatagramService, DatagramServiceFactory};
use corepin::{LaunchConfig, Runtime, RuntimeKind, Worker};
use corepin_xdp::{AttachMode, Ingest, IngestConfig, SourceChoice};

/// Counter sums, merged from every core once per batch.
pub type Totals = Arc<Mutex<HashMap<String, i64>>>;

/// Builds one [`Statsd`] per core; it crosses threads, the services never do.
pub struct StatsdFactory {
    /// Where the cores merge their sums.
    pub totals: Totals,
}

/// The per-core service: sums in a map of its own, merged into the totals after each batch.
pub struct Statsd {
    totals: Totals,
    batch: HashMap<String, i64>,
    /// Lines that were not `name:value|c`.
    pub rejected: u64,
}

impl DatagramServiceFactory for StatsdFactory {
    type Service<R: Runtime> = Statsd;
    type Error = std::convert::Infallible;
    fn new_service<R: Runtime>(&self, _worker: &Worker) -> Result<Statsd, Self::Error> {
        Ok(Statsd { totals: Arc::clone(&self.totals), batch: HashMap::new(), rejected: 0 })
    }
}

/// `name:value|c` as (name, value).
fn parse_counter(line: &str) -> Option<(&str, i64)> {
    let (name, rest) = line.split_once(':')?;
    let value = rest.strip_suffix("|c")?.parse().ok()?;
    (!name.is_empty()).then_some((name, value))
}

impl DatagramService for Statsd {
    fn on_datagram(&mut self, d: &Datagram<'_>) {
        // The payload is borrowed from the source's buffer: read it here, keep nothing of it.
        let Ok(text) = std::str::from_utf8(d.payload) else {
            self.rejected += 1;
            return;
        };
        for line in text.lines().filter(|l| !l.is_empty()) {
            match parse_counter(line) {
                Some((name, v)) => match self.batch.get_mut(name) {
                    Some(sum) => *sum += v,
                    None => {
                        self.batch.insert(name.to_string(), v);
                    }
                },
                None => self.rejected += 1,
            }
        }
    }

    fn on_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let mut totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        for (name, v) in self.batch.drain() {
            *totals.entry(name).or_insert(0) += v;
        }
    }
}

#[derive(Parser)]
struct Args {
    /// The backend: monoio, glommio, tokio-uring or compio.
    #[arg(long, default_value = "monoio")]
    runtime: String,
    /// all, a count, or a list such as 0,2-3.
    #[arg(long, default_value = "all")]
    cores: String,
    /// The interface to take datagrams from.
    #[arg(long, default_value = "lo")]
    interface: String,
    #[arg(long, default_value_t = 8125)]
    port: u16,
    /// auto, xdp or socket.
    #[arg(long, default_value = "auto")]
    source: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let kind: RuntimeKind = args.runtime.parse()?;
    let cfg = LaunchConfig { cores: args.cores.parse()?, ..LaunchConfig::default() };
    let cpus = cfg.plan()?;
    let choice = match args.source.as_str() {
        "xdp" => SourceChoice::Xdp,
        "socket" => SourceChoice::Socket,
        _ => SourceChoice::Auto,
    };
    let ingest = IngestConfig::new(args.port);
    let os: Vec<usize> = cpus.iter().map(|c| c.os).collect();
    let prepared = corepin_xdp::ingest::prepare(&args.interface, &ingest, choice, AttachMode::Auto, None, &os)
        .with_context(|| format!("cannot take UDP port {} on {}", args.port, args.interface))?;
    if let Some(why) = &prepared.fallback {
        println!("AF_XDP not used: {why}");
    }
    let totals = Totals::default();
    let app = Ingest::new(prepared, ingest, cpus.len(), StatsdFactory { totals: Arc::clone(&totals) })?;
    let shared = Arc::clone(app.shared());
    let server = corepin::start(kind, &cfg, &cpus, Arc::new(app))?;
    shared.wait_ready(Duration::from_secs(30)).map_err(anyhow::Error::msg)?;
    println!("statsd on {} port {} with {kind}: {}", args.interface, args.port, shared.describe().join("; "));
    server.wait_with_signals()?;
    shared.detach()?;
    let mut sums: Vec<_> = totals.lock().unwrap_or_else(|p| p.into_inner()).clone().into_iter().collect();
    sums.sort();
    for (name, v) in sums {
        println!("{name} {v}");
    }
    Ok(())
}
