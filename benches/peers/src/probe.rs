//! `corepin-uring-probe`: the raw io_uring measurements behind two of corepin's choices,
//! without any engine around them (docs/zero-copy.md, docs/aux-ring.md).
//!
//! * `send`: one thread on CPU 0 sends `--total` bytes on one TCP connection in writes of
//!   `--size` bytes, one in flight at a time, by `IORING_OP_SEND` or `IORING_OP_SEND_ZC`; a
//!   reader thread on CPU 1 drains it (optionally from inside the network namespace `--rx-netns`,
//!   to go through a veth pair). Prints the sender's CPU time per MB.
//! * `read`: on CPU 0, reads a (hot) file in chunks of `--size` by `IORING_OP_READ` or `READ_FIXED`,
//!   with the file plain or registered. Prints CPU time per read and per MB.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use io_uring::{cqueue, opcode, types, IoUring};

/// `IORING_SEND_ZC_REPORT_USAGE` (Linux 6.2; io-uring 0.6 does not export it).
const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
/// `IORING_CQE_F_NOTIF`: the completion is a SEND_ZC notification.
const CQE_F_NOTIF: u32 = 1 << 3;
/// `IORING_NOTIF_USAGE_ZC_COPIED`: set in a notification's result when the kernel copied.
const NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// SEND against SEND_ZC.
    Send {
        /// Bytes per send.
        #[arg(long)]
        size: usize,
        #[arg(long, value_enum)]
        mode: SendMode,
        /// Bytes in all.
        #[arg(long, default_value_t = 1 << 30)]
        total: usize,
        /// Where the sender listens (an address of a veth end for --rx-netns).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// A network namespace (`ip netns` name) the reader connects from.
        #[arg(long)]
        rx_netns: Option<String>,
    },
    /// READ against READ_FIXED, with the file plain or registered.
    Read {
        file: PathBuf,
        /// Bytes per read.
        #[arg(long)]
        size: usize,
        #[arg(long, value_enum)]
        mode: ReadMode,
        /// Bytes in all.
        #[arg(long, default_value_t = 4 << 30)]
        total: usize,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SendMode {
    Send,
    Zc,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ReadMode {
    Read,
    Fixed,
    FixedFile,
    Both,
}

fn thread_cpu() -> f64 {
    // SAFETY: getrusage(2) fills the zeroed struct we own.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut ru);
        ru
    };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    s(ru.ru_utime) + s(ru.ru_stime)
}

fn enter_netns(name: &str) -> Result<()> {
    let f = std::fs::File::open(format!("/var/run/netns/{name}")).with_context(|| format!("netns {name}"))?;
    // SAFETY: setns(2) on a descriptor we own; it affects only the calling thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {name}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn send(size: usize, mode: SendMode, total: usize, listen: SocketAddr, rx_netns: Option<String>) -> Result<()> {
    let l = TcpListener::bind(listen)?;
    let addr = l.local_addr()?;
    let reader = std::thread::spawn(move || -> Result<usize> {
        pin(1)?;
        if let Some(ns) = rx_netns {
            enter_netns(&ns)?;
        }
        let mut s = TcpStream::connect(addr)?;
        let mut b = vec![0u8; 1 << 20];
        let mut n = 0;
        loop {
            match s.read(&mut b)? {
                0 => return Ok(n),
                r => n += r,
            }
        }
    });
    pin(0)?;
    let (s, _) = l.accept()?;
    let fd = types::Fd(s.as_raw_fd());
    let mut ring = IoUring::new(64)?;
    let buf = vec![7u8; size];
    let (c0, t0) = (thread_cpu(), Instant::now());
    let (mut sent, mut notifs, mut in_flight) = (0usize, 0usize, false);
    let (mut notified, mut copied) = (0u64, 0u64);
    while sent < total || notifs > 0 || in_flight {
        if !in_flight && sent < total {
            let e = match mode {
                // REPORT_USAGE: each notification says whether the kernel copied the bytes after all.
                SendMode::Zc => {
                    opcode::SendZc::new(fd, buf.as_ptr(), size as u32).zc_flags(SEND_ZC_REPORT_USAGE).build()
                }
                SendMode::Send => opcode::Send::new(fd, buf.as_ptr(), size as u32).build(),
            };
            // SAFETY: `buf` outlives the operation: the loop runs until its completion and, for
            // SEND_ZC, its notification have arrived.
            unsafe { ring.submission().push(&e) }.map_err(|_| anyhow::anyhow!("queue full"))?;
            in_flight = true;
        }
        ring.submit_and_wait(1)?;
        for c in ring.completion() {
            if c.flags() & CQE_F_NOTIF != 0 {
                notifs -= 1;
                notified += 1;
                copied += u64::from(c.result() as u32 & NOTIF_USAGE_ZC_COPIED != 0);
                continue;
            }
            if c.result() <= 0 {
                bail!("send failed: {}", c.result());
            }
            sent += c.result() as usize;
            in_flight = false;
            if cqueue::more(c.flags()) {
                notifs += 1;
            }
        }
    }
    let (wall, cpu) = (t0.elapsed().as_secs_f64(), thread_cpu() - c0);
    drop(s);
    let got = reader.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
    if got != sent {
        bail!("reader got {got} of {sent} bytes");
    }
    let mode = if mode == SendMode::Zc { "send_zc" } else { "send" };
    println!(
        "send size={size} mode={mode} MB/s={:.0} sender_cpu_us_per_MB={:.1} notifications={notified} copied_by_kernel={copied}",
        sent as f64 / wall / 1e6,
        cpu * 1e6 / (sent as f64 / 1e6)
    );
    Ok(())
}

fn read(path: PathBuf, size: usize, mode: ReadMode, total: usize) -> Result<()> {
    pin(0)?;
    let f = std::fs::File::open(&path).with_context(|| format!("{path:?}"))?;
    let len = f.metadata()?.len() as usize;
    if len < size {
        bail!("the file is smaller than one read");
    }
    let mut ring = IoUring::new(64)?;
    let mut buf = vec![0u8; size];
    let fixed_buf = matches!(mode, ReadMode::Fixed | ReadMode::Both);
    let fixed_file = matches!(mode, ReadMode::FixedFile | ReadMode::Both);
    if fixed_buf {
        let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: size };
        // SAFETY: `buf` lives until the end of this function, after the ring is dropped.
        unsafe { ring.submitter().register_buffers(&[iov]) }?;
    }
    if fixed_file {
        ring.submitter().register_files(&[f.as_raw_fd()])?;
    }
    let (c0, t0) = (thread_cpu(), Instant::now());
    let (mut done, mut pos, mut reads) = (0usize, 0usize, 0u64);
    while done < total {
        let n = size.min(len - pos) as u32;
        let ptr = buf.as_mut_ptr();
        let e = match (fixed_buf, fixed_file) {
            (false, false) => opcode::Read::new(types::Fd(f.as_raw_fd()), ptr, n).offset(pos as u64).build(),
            (false, true) => opcode::Read::new(types::Fixed(0), ptr, n).offset(pos as u64).build(),
            (true, false) => opcode::ReadFixed::new(types::Fd(f.as_raw_fd()), ptr, n, 0).offset(pos as u64).build(),
            (true, true) => opcode::ReadFixed::new(types::Fixed(0), ptr, n, 0).offset(pos as u64).build(),
        };
        // SAFETY: `buf` outlives the read, which completes before the next loop turn.
        unsafe { ring.submission().push(&e) }.map_err(|_| anyhow::anyhow!("queue full"))?;
        ring.submit_and_wait(1)?;
        let c = ring.completion().next().context("no completion")?;
        if c.result() <= 0 {
            bail!("read failed: {}", c.result());
        }
        done += c.result() as usize;
        pos = (pos + c.result() as usize) % len;
        reads += 1;
    }
    let (wall, cpu) = (t0.elapsed().as_secs_f64(), thread_cpu() - c0);
    let mode = match mode {
        ReadMode::Read => "read",
        ReadMode::Fixed => "read_fixed",
        ReadMode::FixedFile => "read+registered_file",
        ReadMode::Both => "read_fixed+registered_file",
    };
    println!(
        "read size={size} mode={mode} cpu_us_per_read={:.2} cpu_us_per_MB={:.1} wall_s={wall:.2}",
        cpu * 1e6 / reads as f64,
        cpu * 1e6 / (done as f64 / 1e6)
    );
    Ok(())
}

fn pin(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity(2) get
    // valid pointers to it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("pinning to CPU {cpu}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    match Args::parse().what {
        What::Send { size, mode, total, listen, rx_netns } => send(size, mode, total, listen, rx_netns),
        What::Read { file, size, mode, total } => read(file, size, mode, total),
    }
}
