//! TCP echo: returns every byte a client sends, in order. Written once against corepin's
//! traits; no backend is named here, and it runs over any connection stream (clear text or TLS).

#![warn(missing_docs)]

use std::io;

use corepin_core::{
    AsyncWriteRentExt, BufResult, ConnStream, Connection, IoBuf, Runtime, Service, ServiceFactory, Worker,
};

/// Builds one [`Echo`] per core.
#[derive(Debug, Clone)]
pub struct EchoFactory {
    /// Read buffer size per connection.
    pub buffer_size: usize,
}

impl Default for EchoFactory {
    fn default() -> Self {
        Self { buffer_size: 16 * 1024 }
    }
}

/// The per-core echo service.
#[derive(Debug)]
pub struct Echo {
    buffer_size: usize,
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
        // One buffer per connection, allocated on this core; it moves into each read and each
        // write and comes back every time.
        let mut buf = Vec::with_capacity(self.buffer_size);
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
