//! What every peer binary does the same way: pinning to a CPU, the one "listening on" line the
//! harness waits for, and a clean exit on SIGTERM/SIGINT. Each binary includes this module.

use std::io::{self, Write};
use std::net::SocketAddr;

use anyhow::{bail, Context, Result};

/// Pins the calling thread (and the threads it creates from now on) to `cpu`.
pub(crate) fn pin_to_cpu(cpu: usize) -> Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        bail!("--cpu {cpu} is out of range");
    }
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` < CPU_SETSIZE, checked above, so CPU_SET stays inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        let e = io::Error::last_os_error();
        bail!("cannot pin to CPU {cpu}: {e} (is it online and in this process's cpuset?)");
    }
    Ok(())
}

/// Tells the harness the server accepts connections: exactly one line on stdout.
pub(crate) fn announce(addr: io::Result<SocketAddr>) -> io::Result<()> {
    let addr = addr?;
    let mut out = io::stdout().lock();
    writeln!(out, "listening on {addr}")?;
    out.flush()
}

/// Exits with status 0 on SIGTERM or SIGINT.
///
/// The two signals are blocked in this thread before any other thread exists, so every
/// thread (the engines' included) inherits the mask and none is interrupted by them; one
/// thread waits for them with sigwait(2) and ends the process. The serving thread never sees
/// a signal (no EINTR in io_uring_enter or epoll_wait).
pub(crate) fn exit_on_signal() -> Result<()> {
    // SAFETY: an all-zero sigset_t is a valid out-parameter for sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
    }
    // SAFETY: `set` is initialised; the old mask is not wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc)).context("blocking SIGTERM/SIGINT");
    }
    let waiter = move || loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is an initialised sigset_t and `sig` a valid out-parameter.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            std::process::exit(0);
        }
    };
    std::thread::Builder::new().name("signals".into()).spawn(waiter).context("spawning the signal thread")?;
    Ok(())
}
