//! Raw Glommio: a `LocalExecutor` built with `LocalExecutorBuilder` and pinned with
//! `Placement::Fixed(cpu)`, 1 MiB of `io_memory` (Glommio registers it in each of its three
//! rings, so this keeps it well inside an 8 MiB RLIMIT_MEMLOCK) and rings of 1024 entries
//! (corepin's size; Glommio's default is 128), a `TcpListener` accept loop
//! with one `spawn_local`ed, detached task per connection, and futures-lite's `read` /
//! `write_all` on Glommio's unbuffered `TcpStream` with a reused buffer.

use std::io;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::panic::AssertUnwindSafe;

use anyhow::{anyhow, Result};
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutor, LocalExecutorBuilder, Placement};

/// Bytes of Glommio `io_memory` per ring (used only by its DMA file API, not by sockets).
const IO_MEMORY: usize = 1 << 20;

pub(crate) fn run(listener: std::net::TcpListener, cpu: usize, buffer_size: usize) -> Result<()> {
    let builder = LocalExecutorBuilder::new(Placement::Fixed(cpu))
        .name("peer-glommio")
        .io_memory(IO_MEMORY)
        .ring_depth(crate::RING_ENTRIES as usize);
    let ex = make(builder)?;
    ex.run(async move {
        let fd = listener.into_raw_fd();
        // SAFETY: `fd` is a bound, listening TCP socket whose ownership `into_raw_fd` just
        // handed over; Glommio's listener closes it on drop.
        let listener = unsafe { TcpListener::from_raw_fd(fd) };
        crate::announce(listener.local_addr().map_err(io::Error::from))?;
        loop {
            match listener.accept().await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    glommio::spawn_local(echo(stream, buffer_size)).detach();
                }
                Err(e) => {
                    if crate::accept_failed(&io::Error::from(e)) {
                        glommio::timer::sleep(crate::ACCEPT_BACKOFF).await;
                    }
                }
            }
        }
    })
}

/// Builds the executor, turning the panics Glommio raises for some setup failures (a ring it
/// cannot create when RLIMIT_MEMLOCK is too small, for one) into an error line.
fn make(builder: LocalExecutorBuilder) -> Result<LocalExecutor> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let made = std::panic::catch_unwind(AssertUnwindSafe(move || builder.make()));
    std::panic::set_hook(hook);
    let why = match made {
        Ok(Ok(ex)) => return Ok(ex),
        Ok(Err(e)) => e.to_string(),
        Err(panic) => panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("it panicked")
            .to_string(),
    };
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid out-parameter for getrlimit.
    let memlock = if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        "unknown".to_string()
    } else if lim.rlim_cur == libc::RLIM_INFINITY {
        "unlimited".to_string()
    } else {
        format!("{} KiB", lim.rlim_cur / 1024)
    };
    Err(anyhow!(
        "cannot build Glommio's executor: {why} (RLIMIT_MEMLOCK is {memlock}; Glommio locks {} KiB of io_memory \
         in each of its 3 rings unless the process has CAP_IPC_LOCK)",
        IO_MEMORY / 1024
    ))
}

async fn echo(mut stream: TcpStream, buffer_size: usize) -> io::Result<()> {
    let mut buf = vec![0u8; buffer_size];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n]).await?;
    }
}
