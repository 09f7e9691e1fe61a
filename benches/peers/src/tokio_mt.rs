//! Tokio's multi-thread runtime (epoll) with one worker thread, pinned to the CPU with
//! `on_thread_start`: the accept loop is itself a spawned task (so it runs on the worker,
//! not on the thread parked in `block_on`), one `tokio::spawn`ed task per connection, and a
//! plain `read` / `write_all` loop on the unsplit stream with a reused buffer.

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub(crate) fn run(listener: std::net::TcpListener, cpu: usize, buffer_size: usize) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("peer-tokio")
        .on_thread_start(move || {
            // The threads inherit main's pinning already; pinning again costs nothing and
            // keeps the worker on `cpu` even if that ever changes.
            if let Err(e) = crate::pin_to_cpu(cpu) {
                eprintln!("corepin-peer-echo: {e:#}");
            }
        })
        .enable_all()
        .build()
        .context("cannot build tokio's runtime")?;
    rt.block_on(async move {
        let listener = TcpListener::from_std(listener)?;
        crate::announce(listener.local_addr())?;
        // The accept loop never ends; awaiting it keeps `block_on` parked.
        tokio::spawn(accept_loop(listener, buffer_size)).await?;
        Ok(())
    })
}

async fn accept_loop(listener: TcpListener, buffer_size: usize) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(echo(stream, buffer_size));
            }
            Err(e) => {
                if crate::accept_failed(&e) {
                    tokio::time::sleep(crate::ACCEPT_BACKOFF).await;
                }
            }
        }
    }
}

async fn echo(mut stream: TcpStream, buffer_size: usize) -> std::io::Result<()> {
    let mut buf = vec![0u8; buffer_size];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n]).await?;
    }
}
