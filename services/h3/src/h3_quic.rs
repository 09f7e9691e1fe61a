//! `h3`'s QUIC traits (`h3::quic`) over the core's QUIC state (`crate::quic`): the HTTP/3 layer
//! reads and writes the connection's streams directly, in the same thread, with no task, channel
//! or boxed future between them.
//!
//! Owns: the mapping of `h3`'s calls and errors onto [`crate::quic`]'s handles. Must not touch:
//! QUIC state except through those handles.

use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h3::quic::{self, ConnectionErrorIncoming, StreamErrorIncoming, WriteBuf};
use quinn_proto::{ConnectionError, Dir};

use crate::quic::{Conn, ReadError, RecvStream, SendStream, WriteError};

/// An HTTP/3 connection's QUIC side.
pub(crate) struct H3Conn {
    conn: Conn,
}

impl H3Conn {
    pub(crate) fn new(conn: Conn) -> Self {
        Self { conn }
    }
}

fn connection_error(e: ConnectionError) -> ConnectionErrorIncoming {
    match e {
        ConnectionError::ApplicationClosed(close) => {
            ConnectionErrorIncoming::ApplicationClose { error_code: close.error_code.into_inner() }
        }
        ConnectionError::TimedOut => ConnectionErrorIncoming::Timeout,
        other => ConnectionErrorIncoming::Undefined(Arc::new(other)),
    }
}

fn stream_id(id: quinn_proto::StreamId) -> quic::StreamId {
    // Every QUIC stream ID is below 2^62, which h3's type accepts.
    quic::StreamId::try_from(u64::from(id)).expect("a QUIC stream ID is a 62-bit integer")
}

/// A write or finish that failed, told to `h3`.
#[derive(Debug, thiserror::Error)]
#[error("the stream is already finished or reset")]
struct ClosedStream;

fn write_error(e: WriteError) -> StreamErrorIncoming {
    match e {
        WriteError::Stopped(code) => StreamErrorIncoming::StreamTerminated { error_code: code },
        WriteError::Connection(e) => {
            StreamErrorIncoming::ConnectionErrorIncoming { connection_error: connection_error(e) }
        }
        WriteError::Closed => StreamErrorIncoming::Unknown(Box::new(ClosedStream)),
    }
}

fn read_error(e: ReadError) -> StreamErrorIncoming {
    match e {
        ReadError::Reset(code) => StreamErrorIncoming::StreamTerminated { error_code: code },
        ReadError::Connection(e) => {
            StreamErrorIncoming::ConnectionErrorIncoming { connection_error: connection_error(e) }
        }
        ReadError::Closed => StreamErrorIncoming::Unknown(Box::new(ClosedStream)),
    }
}

impl<B: Buf> quic::Connection<B> for H3Conn {
    type RecvStream = H3Recv;
    type OpenStreams = H3Opener;

    fn poll_accept_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<H3Recv, ConnectionErrorIncoming>> {
        let id = ready!(self.conn.poll_accept(cx, Dir::Uni)).map_err(connection_error)?;
        Poll::Ready(Ok(H3Recv { inner: self.conn.recv_stream(id) }))
    }

    fn poll_accept_bidi(&mut self, cx: &mut Context<'_>) -> Poll<Result<H3Bidi<B>, ConnectionErrorIncoming>> {
        let id = ready!(self.conn.poll_accept(cx, Dir::Bi)).map_err(connection_error)?;
        Poll::Ready(Ok(H3Bidi {
            send: H3Send { inner: self.conn.send_stream(id), writing: None },
            recv: H3Recv { inner: self.conn.recv_stream(id) },
        }))
    }

    fn opener(&self) -> H3Opener {
        H3Opener { conn: self.conn.clone() }
    }
}

fn open_bidi<B: Buf>(conn: &Conn, cx: &mut Context<'_>) -> Poll<Result<H3Bidi<B>, StreamErrorIncoming>> {
    let id = ready!(conn.poll_open(cx, Dir::Bi))
        .map_err(|e| StreamErrorIncoming::ConnectionErrorIncoming { connection_error: connection_error(e) })?;
    Poll::Ready(Ok(H3Bidi {
        send: H3Send { inner: conn.send_stream(id), writing: None },
        recv: H3Recv { inner: conn.recv_stream(id) },
    }))
}

fn open_send<B: Buf>(conn: &Conn, cx: &mut Context<'_>) -> Poll<Result<H3Send<B>, StreamErrorIncoming>> {
    let id = ready!(conn.poll_open(cx, Dir::Uni))
        .map_err(|e| StreamErrorIncoming::ConnectionErrorIncoming { connection_error: connection_error(e) })?;
    Poll::Ready(Ok(H3Send { inner: conn.send_stream(id), writing: None }))
}

/// What `h3` opens streams with.
pub(crate) struct H3Opener {
    conn: Conn,
}

/// `OpenStreams` for the connection and for its opener: both open streams on `self.conn`.
macro_rules! open_streams {
    ($($ty:ty),+) => {$(
        impl<B: Buf> quic::OpenStreams<B> for $ty {
            type BidiStream = H3Bidi<B>;
            type SendStream = H3Send<B>;

            fn poll_open_bidi(&mut self, cx: &mut Context<'_>) -> Poll<Result<H3Bidi<B>, StreamErrorIncoming>> {
                open_bidi(&self.conn, cx)
            }

            fn poll_open_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<H3Send<B>, StreamErrorIncoming>> {
                open_send(&self.conn, cx)
            }

            fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
                self.conn.close(code.value(), reason);
            }
        }
    )+};
}

open_streams!(H3Conn, H3Opener);

/// A receiving stream for `h3`.
pub(crate) struct H3Recv {
    inner: RecvStream,
}

impl quic::RecvStream for H3Recv {
    type Buf = Bytes;

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        self.inner.poll_read(cx).map_err(read_error)
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.inner.stop(error_code);
    }

    fn recv_id(&self) -> quic::StreamId {
        stream_id(self.inner.id())
    }
}

/// A sending stream for `h3`: holds the one buffer `h3` hands over until the stream took it.
pub(crate) struct H3Send<B: Buf> {
    inner: SendStream,
    writing: Option<WriteBuf<B>>,
}

impl<B: Buf> quic::SendStream<B> for H3Send<B> {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        if let Some(data) = self.writing.as_mut() {
            while data.has_remaining() {
                let n = ready!(self.inner.poll_write(cx, data.chunk())).map_err(write_error)?;
                data.advance(n);
            }
        }
        self.writing = None;
        Poll::Ready(Ok(()))
    }

    fn send_data<T: Into<WriteBuf<B>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        if self.writing.is_some() {
            // h3 waits for `poll_ready` before handing the next buffer; anything else is a bug
            // in the layer above, which ends the connection rather than lose data.
            return Err(StreamErrorIncoming::ConnectionErrorIncoming {
                connection_error: ConnectionErrorIncoming::InternalError(
                    "send_data before the previous buffer was taken".to_string(),
                ),
            });
        }
        self.writing = Some(data.into());
        Ok(())
    }

    fn poll_finish(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        Poll::Ready(self.inner.finish().map_err(write_error))
    }

    fn reset(&mut self, reset_code: u64) {
        self.inner.reset(reset_code);
    }

    fn send_id(&self) -> quic::StreamId {
        stream_id(self.inner.id())
    }
}

/// A request stream for `h3`: both halves.
pub(crate) struct H3Bidi<B: Buf> {
    send: H3Send<B>,
    recv: H3Recv,
}

impl<B: Buf> quic::BidiStream<B> for H3Bidi<B> {
    type SendStream = H3Send<B>;
    type RecvStream = H3Recv;

    fn split(self) -> (H3Send<B>, H3Recv) {
        (self.send, self.recv)
    }
}

impl<B: Buf> quic::RecvStream for H3Bidi<B> {
    type Buf = Bytes;

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        self.recv.poll_data(cx)
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.recv.stop_sending(error_code);
    }

    fn recv_id(&self) -> quic::StreamId {
        self.recv.recv_id()
    }
}

impl<B: Buf> quic::SendStream<B> for H3Bidi<B> {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_ready(cx)
    }

    fn send_data<T: Into<WriteBuf<B>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        self.send.send_data(data)
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_finish(cx)
    }

    fn reset(&mut self, reset_code: u64) {
        self.send.reset(reset_code);
    }

    fn send_id(&self) -> quic::StreamId {
        self.send.send_id()
    }
}
