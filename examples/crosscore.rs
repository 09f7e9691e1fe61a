//! Measures what a cross-core call costs: worker 0 sends `submit_to(1, ..)` jobs to worker 1
//! and awaits each reply, with `--inflight` calls outstanding at once (1: every call is a
//! round trip through two sleeping cores; more: the cores stay busy and calls batch). Prints
//! calls per second and the process's CPU time per call (getrusage: both cores' work, user +
//! system), as JSON for `benches/bench.py`.
//!
//! ```sh
//! cargo run --release --example crosscore -- --runtime monoio --calls 200000 --inflight 1
//! cargo run --release --example crosscore -- --runtime monoio --inflight 1 --inbox-poll-us 20
//! cargo run --release --example crosscore -- --runtime monoio --inflight 64 --sharded
//! ```

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use corepin::topology::CoreSelection;
use corepin::{App, AppError, LaunchConfig, Runtime, RuntimeKind, Sharded, Worker};

#[derive(Parser)]
struct Args {
    /// The backend.
    #[arg(long, default_value = "monoio")]
    runtime: String,
    /// Calls to make.
    #[arg(long, default_value_t = 100_000)]
    calls: u64,
    /// Calls outstanding at once.
    #[arg(long, default_value_t = 1)]
    inflight: u64,
    /// Microseconds an idle worker's inbox keeps looking before it sleeps
    /// (`LaunchConfig::inbox_poll`).
    #[arg(long, default_value_t = 0)]
    inbox_poll_us: u64,
    /// Call through `Sharded::invoke_on` (a closure run in the target's inbox loop) instead
    /// of `submit_to` (a future run as a task there).
    #[arg(long)]
    sharded: bool,
}

struct CrossCore {
    calls: u64,
    inflight: u64,
    /// Per-worker counters reached by `invoke_on` when set.
    shards: Option<Sharded<Cell<u64>>>,
    done: AtomicU64,
    elapsed_ns: AtomicU64,
}

impl App for CrossCore {
    async fn run<R: Runtime>(&self, worker: Worker) -> Result<(), AppError> {
        if worker.info().index != 0 {
            // Worker 1 only answers; it stays until worker 0 is done.
            while self.done.load(Ordering::Acquire) == 0 {
                R::sleep(Duration::from_millis(2)).await;
            }
            return Ok(());
        }
        // Warm up both inboxes.
        for _ in 0..1000 {
            corepin::submit_to(1, || async { 1u64 }).await.map_err(|e| AppError::msg(e.to_string()))?;
        }
        let per_task = self.calls / self.inflight;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..self.inflight {
            let shards = self.shards.clone();
            tasks.push(corepin::task::spawn::<R, _>(async move {
                let mut sum = 0u64;
                for i in 0..per_task {
                    sum += match &shards {
                        Some(s) => s.invoke_on(1, move |c| c.replace(c.get() + i)).await.unwrap_or(0),
                        None => corepin::submit_to(1, move || async move { i }).await.unwrap_or(0),
                    };
                }
                sum
            }));
        }
        for t in tasks {
            t.await.map_err(|e| AppError::msg(e.to_string()))?;
        }
        self.elapsed_ns.store(start.elapsed().as_nanos() as u64, Ordering::Release);
        self.done.store(per_task * self.inflight, Ordering::Release);
        Ok(())
    }
}

fn cpu_seconds() -> f64 {
    // SAFETY: a zeroed rusage is a valid out-parameter for getrusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let kind: RuntimeKind = args.runtime.parse()?;
    let cfg = LaunchConfig {
        cores: CoreSelection::List(vec![0, 1]),
        inbox_poll: Duration::from_micros(args.inbox_poll_us),
        ..LaunchConfig::default()
    };
    let cpus = cfg.plan()?;
    let app = Arc::new(CrossCore {
        calls: args.calls,
        inflight: args.inflight.max(1),
        shards: args.sharded.then(|| Sharded::new(|_: &Worker| Cell::new(0))),
        done: AtomicU64::new(0),
        elapsed_ns: AtomicU64::new(0),
    });
    let cpu0 = cpu_seconds();
    let server = corepin::start(kind, &cfg, &cpus, app.clone())?;
    server.wait()?;
    let cpu = cpu_seconds() - cpu0;
    let calls = app.done.load(Ordering::Acquire).max(1) as f64;
    let secs = app.elapsed_ns.load(Ordering::Acquire) as f64 / 1e9;
    println!(
        "{{\"runtime\":\"{}\",\"inflight\":{},\"inbox_poll_us\":{},\"call\":\"{}\",\"calls\":{},\"calls_per_sec\":{:.0},\"cpu_us_per_call\":{:.3}}}",
        kind,
        args.inflight,
        args.inbox_poll_us,
        if args.sharded { "invoke_on" } else { "submit_to" },
        calls,
        calls / secs,
        cpu * 1e6 / calls
    );
    Ok(())
}
