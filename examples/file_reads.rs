//! Measures the worker's CPU time per file read of a hot (page-cached) file, read in chunks
//! through the engine: `read_pooled_at` (into a registered buffer by `READ_FIXED` where the
//! backend has them, docs/aux-ring.md) against `read_at` into one reused buffer (the engine's
//! own plain read). One worker, pinned; the figure is thread CPU time (getrusage), so it
//! includes whatever the engine and corepin's auxiliary ring do around each read.
//!
//! ```sh
//! head -c 256M /dev/urandom > /tmp/big && cat /tmp/big > /dev/null
//! cargo run --release --example file_reads -- --runtime monoio --file /tmp/big --chunk 131072
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use corepin::{App, AppError, BufResult, File, IoBuf, LaunchConfig, Runtime, RuntimeKind, Worker};

#[derive(Parser, Clone)]
struct Args {
    /// The backend: monoio, glommio, tokio-uring or compio.
    #[arg(long, default_value = "monoio")]
    runtime: String,
    /// A file to read (make it hot first).
    #[arg(long)]
    file: PathBuf,
    /// Bytes per read.
    #[arg(long, default_value_t = 128 * 1024)]
    chunk: usize,
    /// Seconds per way.
    #[arg(long, default_value_t = 2.0)]
    secs: f64,
    /// Rounds of both ways, alternating.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The CPU to run on.
    #[arg(long, default_value = "0-0")]
    cores: String,
}

struct Bench(Args);

fn thread_cpu() -> Duration {
    // SAFETY: getrusage(2) fills the zeroed struct we own.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

impl App for Bench {
    async fn run<R: Runtime>(&self, _w: Worker) -> Result<(), AppError> {
        let a = &self.0;
        let f = R::File::open(&a.file).await.map_err(|e| AppError::msg(format!("open {:?}: {e}", a.file)))?;
        let len = f.metadata().await.map_err(|e| AppError::msg(e.to_string()))?.len;
        let caps = R::capabilities();
        let fixed = caps.as_ref().is_some_and(|c| c.registered_buffers.used);
        println!("{}: registered buffers {}", R::NAME, if fixed { "used" } else { "not used" });
        let mut buf = Vec::with_capacity(a.chunk);
        let wrap = |pos: u64, n: usize| if pos + n as u64 >= len { 0 } else { pos + n as u64 };
        for round in 0..a.rounds {
            for way in ["read_pooled_at", "read_at"] {
                let (c0, t0) = (thread_cpu(), Instant::now());
                let (mut reads, mut bytes, mut lent, mut pos) = (0u64, 0u64, 0u64, 0u64);
                while t0.elapsed().as_secs_f64() < a.secs {
                    let n = if way == "read_at" {
                        let BufResult(r, b) = f.read_at(buf.slice(0..a.chunk), pos).await;
                        buf = b.into_inner();
                        r.map_err(|e| AppError::msg(e.to_string()))?
                    } else {
                        let b = f.read_pooled_at(pos, a.chunk).await.map_err(|e| AppError::msg(e.to_string()))?;
                        lent += u64::from(b.is_lent());
                        b.len()
                    };
                    reads += 1;
                    bytes += n as u64;
                    pos = wrap(pos, n);
                }
                let cpu = (thread_cpu() - c0).as_secs_f64();
                println!(
                    "round {round} {way:<15} chunk {:>7}: {:>8} reads, {:6.2} us CPU per read, {:6.1} us per MB, lent {lent}",
                    a.chunk,
                    reads,
                    cpu * 1e6 / reads as f64,
                    cpu * 1e6 / (bytes as f64 / 1e6),
                );
            }
        }
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let kind: RuntimeKind = args.runtime.parse()?;
    let cfg = LaunchConfig { cores: args.cores.parse()?, ..LaunchConfig::default() };
    let cpus = cfg.plan()?;
    let server = corepin::start(kind, &cfg, &cpus, Arc::new(Bench(args)))?;
    server.wait()?;
    Ok(())
}
