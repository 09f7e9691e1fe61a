//! TCP echo: returns every byte a client sends, in order. Written once against corepin's
//! traits; no backend is named here, and it runs over any connection stream (clear text or TLS).

#![warn(missing_docs)]

use std::io;

use corepin_core::{
    AsyncWriteRentExt, BufResult, ConnStream, Connection, IoBuf, Runtime, Service, ServiceFactory, Worker,
};

/// Builds one [`Echo`] per core.
#[derive(Debug, Clone, Default)]
pub struct EchoFactory {
    /// `None` (the default): every read borrows a buffer from the core only when data arrives
    /// (`read_pooled`: the engine's provided-buffer ring where it has one, otherwise the core's
    /// pool), and the write sends that same buffer back, so on an engine with a ring an idle
    /// connection holds no buffer at all. `Some(n)`: each connection owns an `n`-byte buffer
    /// for its whole life, moved into every read and write.
    pub buffer_size: Option<usize>,
}

/// The per-core echo service.
#[derive(Debug)]
pub struct Echo {
    buffer_size: Option<usize>,
}

impl ServiceFactory for EchoFactory {
    type Service<R: Runtime, S: ConnStream> = Echo;
    type Error = std::convert::Infallible;
    fn new_service<R: Runtime, S: ConnStream>(&self, _worker: &Worker) -> Result<Echo, Self::Error> {
        Ok(Echo { buffer_size: self.buffer_size })
    }
}

impl<R: Runtime, S: ConnStream> Service<Connection<R, S>> for Echo {
    type Response = ();
    type Error = io::Error;

    async fn call(&self, mut conn: Connection<R, S>) -> io::Result<()> {
        let Some(size) = self.buffer_size else {
            // Borrowed buffers: the bytes read are written back from the buffer they arrived
            // in, which returns to the core when the write is done.
            loop {
                let buf = conn.stream.read_pooled().await?;
                if buf.is_empty() {
                    return Ok(());
                }
                conn.stream.write_all(buf).await.0?;
            }
        };
        // One buffer per connection, allocated on this core; it moves into each read and each
        // write and comes back every time.
        let mut buf = Vec::with_capacity(size);
        loop {
            let BufResult(res, b) = conn.stream.read(buf).await;
            let n = match res {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) => return Err(e),
            };
            let BufResult(res, slice) = conn.stream.write_all(b.slice(..n)).await;
            buf = slice.into_inner();
            res?;
        }
    }
}
