//! Raw Monoio: a `Runtime<IoUringDriver>` built with `RuntimeBuilder` (SINGLE_ISSUER |
//! DEFER_TASKRUN when the kernel takes them, else a plain ring), one `monoio::spawn`ed task per
//! connection, and owned buffers: `read` into a `Vec` the task owns, `write_all` of the same
//! `Vec`, `clear`, repeat (Monoio's own echo example).

use std::io;

use anyhow::{Context, Result};
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::{TcpListener, TcpStream};
use monoio::{IoUringDriver, Runtime, RuntimeBuilder};

pub(crate) fn run(listener: std::net::TcpListener, buffer_size: usize) -> Result<()> {
    let mut rt = build()?;
    rt.block_on(async move {
        let listener = TcpListener::from_std(listener)?;
        crate::announce(listener.local_addr())?;
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    // Dropping the JoinHandle detaches the task.
                    drop(monoio::spawn(echo(stream, buffer_size)));
                }
                Err(e) => {
                    // No timer driver in this runtime (the echo needs none), so the backoff
                    // stalls the thread; each accept goes through the ring, so the
                    // connection tasks still run (and free descriptors) between attempts.
                    if crate::accept_failed(&e) {
                        std::thread::sleep(crate::ACCEPT_BACKOFF);
                    }
                }
            }
        }
    })
}

pub(crate) fn build() -> Result<Runtime<IoUringDriver>> {
    let mut urb = io_uring::IoUring::builder();
    urb.setup_single_issuer().setup_defer_taskrun();
    let fast = RuntimeBuilder::<IoUringDriver>::new().with_entries(crate::RING_ENTRIES).uring_builder(urb).build();
    match fast {
        Ok(rt) => Ok(rt),
        Err(e) => {
            eprintln!("corepin-peer-echo: io_uring refused SINGLE_ISSUER|DEFER_TASKRUN ({e}); using a plain ring");
            RuntimeBuilder::<IoUringDriver>::new()
                .with_entries(crate::RING_ENTRIES)
                .build()
                .context("cannot build Monoio's io_uring runtime")
        }
    }
}

async fn echo(mut stream: TcpStream, buffer_size: usize) -> io::Result<()> {
    let mut buf = Vec::with_capacity(buffer_size);
    loop {
        let (res, b) = stream.read(buf).await;
        if res? == 0 {
            return Ok(());
        }
        let (res, b) = stream.write_all(b).await;
        res?;
        buf = b;
        buf.clear();
    }
}
