//! Raw tokio-uring: a runtime from `tokio_uring::builder()` with an `io_uring::Builder`
//! asking for SINGLE_ISSUER | COOP_TASKRUN (a plain ring if the kernel refuses; never
//! DEFER_TASKRUN, which hangs tokio-uring 0.5 because it never waits with GETEVENTS), one
//! `tokio_uring::spawn`ed task per connection, and owned buffers: `read` into a `Vec`, then
//! `write_all` of `buf.slice(..n)` and take the `Vec` back (tokio-uring's documented echo).

use std::io;

use anyhow::{Context, Result};
use tokio_uring::buf::BoundedBuf;
use tokio_uring::net::{TcpListener, TcpStream};
use tokio_uring::Runtime;

pub(crate) fn run(listener: std::net::TcpListener, buffer_size: usize) -> Result<()> {
    let rt = build()?;
    rt.block_on(async move {
        let listener = TcpListener::from_std(listener);
        crate::announce(listener.local_addr())?;
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    drop(tokio_uring::spawn(echo(stream, buffer_size)));
                }
                Err(e) => {
                    // tokio-uring runs on a tokio runtime with its timer enabled.
                    if crate::accept_failed(&e) {
                        tokio::time::sleep(crate::ACCEPT_BACKOFF).await;
                    }
                }
            }
        }
    })
}

fn build() -> Result<Runtime> {
    let mut urb = tokio_uring::uring_builder();
    urb.setup_single_issuer().setup_coop_taskrun();
    let mut b = tokio_uring::builder();
    b.entries(crate::RING_ENTRIES).uring_builder(&urb);
    match Runtime::new(&b) {
        Ok(rt) => Ok(rt),
        Err(e) => {
            eprintln!("corepin-peer-echo: io_uring refused SINGLE_ISSUER|COOP_TASKRUN ({e}); using a plain ring");
            let mut b = tokio_uring::builder();
            b.entries(crate::RING_ENTRIES);
            Runtime::new(&b).context("cannot build tokio-uring's runtime")
        }
    }
}

async fn echo(stream: TcpStream, buffer_size: usize) -> io::Result<()> {
    let mut buf = Vec::with_capacity(buffer_size);
    loop {
        let (res, b) = stream.read(buf).await;
        let n = res?;
        if n == 0 {
            return Ok(());
        }
        let (res, slice) = stream.write_all(b.slice(..n)).await;
        res?;
        buf = slice.into_inner();
    }
}
