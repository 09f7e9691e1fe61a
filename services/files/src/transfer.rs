//! Moving an answer to a connection's stream: a front end's serialized head, then the
//! [`Body`] a [`Plan`](crate::resource::Plan) names, generic over any [`ConnStream`] (plain TCP
//! or a TLS layer).
//!
//! Owns the transfer paths and their counters: memory bodies leave in one gather write
//! together with the head; file bodies go by `sendfile(2)` while the page cache holds them and
//! the stream can take file bytes as they are ([`ConnStream::can_send_file`]), and otherwise,
//! or from the first page-cache miss on, are read through the engine (io_uring) and written;
//! read + write is the named fallback (`LargeBodies::ReadWrite`, a file system that refuses
//! sendfile, a stream that must see every byte). Every write is bounded by the send timeout.
//! The connection's gather list is reused from one response to the next; the read + write
//! path borrows the core's buffers per chunk.
//!
//! Must not touch: what is sent. Status, headers, ranges, validators and the memory cache's
//! contents are decided in `resource` (a body read whole for the cache goes back through
//! [`Files::remember`]); the head's bytes are the front end's.

use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd};
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use corepin_core::pagecache::{self, Residency};
use corepin_core::runtime::{File as _, Metadata};
use corepin_core::task::with_deadline;
use corepin_core::{AsyncWriteRentExt, BufResult, ConnStream, EitherBuf, IoBuf, Runtime};

use crate::metrics::{CoreFileCounters, TransferPath};
use crate::resource::{Body, Extent};
use crate::{Files, LargeBodies};

/// A buffer of a gather write: the head (owned by the connection, handed back after the
/// write) or shared bytes (cached bodies, multipart framing, generated texts).
type Chunk = EitherBuf<Vec<u8>, Bytes>;

/// The most one sendfile call is given, and so the span probed in the page cache before it:
/// about what a socket's send buffer takes in one go.
const SENDFILE_WINDOW: u64 = 4 << 20;

/// Why a connection ended early.
#[derive(Debug)]
pub enum End {
    /// The client closed or reset the connection, or the server is draining.
    Closed,
    /// A deadline passed.
    Timeout,
    /// The file ended before the promised length (it changed while being served).
    Truncated,
    /// Another I/O error.
    Io(io::Error),
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::TimedOut => End::Timeout,
            io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
            | io::ErrorKind::UnexpectedEof => End::Closed,
            _ => End::Io(e),
        }
    }
}

fn io_kind_is_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP))
}

/// One connection's sender: what it reuses between responses, and what it counts.
pub struct Transfer<'f, R: Runtime> {
    files: &'f Files,
    counters: &'f CoreFileCounters,
    send_timeout: Duration,
    /// Chunks queued for the next gather write; the list's allocation is reused.
    out: Vec<Chunk>,
    /// Bytes of the current response sent so far.
    sent: u64,
    _runtime: PhantomData<fn() -> R>,
}

impl<'f, R: Runtime> Transfer<'f, R> {
    /// A sender for one connection of `files`.
    pub fn new(files: &'f Files) -> Self {
        Self {
            files,
            counters: files.counters(),
            send_timeout: files.cfg.send_timeout,
            out: Vec::new(),
            sent: 0,
            _runtime: PhantomData,
        }
    }

    /// Gives back the buffer kept between responses (the chunk list), for a connection that
    /// waits idle holding none; the next response takes a new one.
    pub fn release_buffers(&mut self) {
        self.out = Vec::new();
    }

    /// Bytes of the last response sent (head and body), also when it failed part way.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Sends `head` (bytes a front end framed; it moves into the write and is put back, so
    /// its allocation serves the next response) and then `body` on `stream`, counting the body
    /// under the path it took.
    pub async fn send<S: ConnStream>(&mut self, stream: &mut S, head: &mut Vec<u8>, body: Body) -> Result<(), End> {
        self.sent = 0;
        if !head.is_empty() {
            self.out.push(EitherBuf::Left(std::mem::take(head)));
        }
        match body {
            Body::None => self.flush(stream, head).await,
            Body::Text(text) => {
                self.out.push(EitherBuf::Right(text));
                self.flush(stream, head).await
            }
            Body::Listing(html) => {
                let n = html.len() as u64;
                self.out.push(EitherBuf::Right(html));
                self.flush(stream, head).await?;
                self.counters.transfer(TransferPath::Memory, n);
                Ok(())
            }
            Body::Fill { file, meta } => {
                let data = read_whole::<R>(file, &meta).await?;
                let short = (data.len() as u64) < meta.len;
                if !short {
                    self.files.remember(&meta, data.clone());
                }
                let n = data.len() as u64;
                self.out.push(EitherBuf::Right(data));
                self.flush(stream, head).await?;
                self.counters.transfer(TransferPath::Memory, n);
                if short {
                    return Err(End::Truncated);
                }
                Ok(())
            }
            Body::Memory { data, extent } => {
                let n = extent.source_bytes();
                let span = |first: u64, len: u64| {
                    EitherBuf::Right(Bytes::slice(&data, first as usize..(first + len) as usize))
                };
                match extent {
                    Extent::Span { first, len } => self.out.push(span(first, len)),
                    Extent::Multipart { parts, close } => {
                        for p in parts {
                            self.out.push(EitherBuf::Right(p.prefix));
                            self.out.push(span(p.first, p.len));
                        }
                        self.out.push(EitherBuf::Right(close));
                    }
                }
                self.flush(stream, head).await?;
                self.counters.transfer(TransferPath::Memory, n);
                Ok(())
            }
            Body::File { file, extent } => self.send_file_body(stream, head, file, extent).await,
        }
    }

    /// A file body: the head (and each part's framing) leave in one write before the bytes
    /// they announce.
    async fn send_file_body<S: ConnStream>(
        &mut self,
        stream: &mut S,
        head: &mut Vec<u8>,
        file: Rc<File>,
        extent: Extent,
    ) -> Result<(), End> {
        let by_sendfile = self.files.cfg.large_bodies == LargeBodies::Sendfile && stream.can_send_file();
        let mut state = FileState::<R>::Std(file);
        let paths = match extent {
            Extent::Span { first, len } => {
                self.flush(stream, head).await?;
                self.send_range(stream, &mut state, by_sendfile, first, len).await?
            }
            Extent::Multipart { parts, close } => {
                let mut paths = (0u64, 0u64);
                for p in parts {
                    self.out.push(EitherBuf::Right(p.prefix));
                    self.flush(stream, head).await?;
                    let (a, b) = self.send_range(stream, &mut state, by_sendfile, p.first, p.len).await?;
                    paths.0 += a;
                    paths.1 += b;
                }
                self.out.push(EitherBuf::Right(close));
                paths
            }
        };
        self.flush(stream, head).await?;
        // An empty body counts under the path it would have taken.
        if paths.1 > 0 || (paths.0 == 0 && !by_sendfile) {
            self.counters.transfer(TransferPath::ReadWrite, paths.1);
        }
        if paths.0 > 0 || (paths.1 == 0 && by_sendfile) {
            self.counters.transfer(TransferPath::Sendfile, paths.0);
        }
        Ok(())
    }

    /// Writes every queued chunk in one gather write, then puts the head buffer back and keeps
    /// the list's allocation for the next response.
    async fn flush<S: ConnStream>(&mut self, stream: &mut S, head: &mut Vec<u8>) -> Result<(), End> {
        if self.out.is_empty() {
            return Ok(());
        }
        let chunks = std::mem::take(&mut self.out);
        let mut back = self.write_chunks(stream, chunks).await?;
        for chunk in back.drain(..) {
            if let EitherBuf::Left(v) = chunk {
                *head = v;
            }
        }
        self.out = back;
        Ok(())
    }

    /// Writes every chunk, each write bounded by the send timeout.
    async fn write_chunks<S: ConnStream>(&mut self, stream: &mut S, chunks: Vec<Chunk>) -> Result<Vec<Chunk>, End> {
        let fd = stream.as_raw_fd();
        let timeout = self.send_timeout;
        let total: usize = chunks.iter().map(IoBuf::bytes_init).sum();
        let (BufResult(res, mut chunks), timed_out) = with_deadline::<R, _>(fd, timeout, stream.writev(chunks)).await;
        if timed_out {
            return Err(End::Timeout);
        }
        let mut done = res?;
        self.sent += done as u64;
        if done < total {
            // A short gather write: finish chunk by chunk.
            let mut rest = Vec::with_capacity(chunks.len());
            for ch in chunks.drain(..) {
                let n = ch.bytes_init();
                if done >= n {
                    done -= n;
                    rest.push(ch);
                    continue;
                }
                let (BufResult(res, slice), timed_out) =
                    with_deadline::<R, _>(fd, timeout, stream.write_all(ch.slice(done..n))).await;
                if timed_out {
                    return Err(End::Timeout);
                }
                self.sent += res? as u64;
                done = 0;
                rest.push(slice.into_inner());
            }
            chunks = rest;
        }
        Ok(chunks)
    }

    /// Sends `len` bytes at `first` of the file; returns (bytes by sendfile, bytes by read+write).
    ///
    /// Sendfile reads the file on the worker's thread, so it only gets windows that the page
    /// cache holds. From the first window with a missing page on, the rest of the range goes
    /// a chunk at a time through the engine's file read (io_uring: the disk wait happens in
    /// the kernel, not on the core). It does not return to sendfile: the readahead those
    /// reads start puts the next pages in the cache before their data has arrived, so a probe
    /// would call them cached and sendfile would wait for the disk after all (measured in
    /// docs/zero-copy.md).
    async fn send_range<S: ConnStream>(
        &mut self,
        stream: &mut S,
        state: &mut FileState<R>,
        mut sendfile: bool,
        first: u64,
        len: u64,
    ) -> Result<(u64, u64), End> {
        let timeout = self.send_timeout;
        let (mut pos, end) = (first, first + len);
        let (mut by_sendfile, mut by_rw) = (0, 0);
        let mut cold = false;
        while pos < end {
            if sendfile && !cold {
                let window = (end - pos).min(SENDFILE_WINDOW);
                // `Unknown` (the kernel could not say) keeps sendfile, as before the probe.
                cold = pagecache::residency(state.fd()?, pos, window) == Residency::NotCached;
                if !cold {
                    let sock = stream.as_raw_fd();
                    let fut = stream.send_file(state.fd()?, pos, window as usize);
                    let (res, timed_out) = with_deadline::<R, _>(sock, timeout, fut).await;
                    if timed_out {
                        return Err(End::Timeout);
                    }
                    match res {
                        Ok(0) => return Err(End::Truncated),
                        Ok(n) => {
                            pos += n as u64;
                            by_sendfile += n as u64;
                            self.sent += n as u64;
                        }
                        Err(e) if io_kind_is_unsupported(&e) && by_sendfile == 0 => {
                            tracing::debug!("sendfile refused ({e}); reading and writing instead");
                            sendfile = false;
                        }
                        Err(e) => return Err(e.into()),
                    }
                    continue;
                }
            }
            // One chunk through the engine: the read + write path, or the rest of a cold range.
            let want = (end - pos).min(self.files.cfg.read_write_chunk.max(4096) as u64) as usize;
            let n = self.copy_chunk(stream, state, pos, want).await?;
            if cold {
                self.counters.cold(n as u64);
            }
            pos += n as u64;
            by_rw += n as u64;
            self.sent += n as u64;
        }
        Ok((by_sendfile, by_rw))
    }

    /// Reads up to `want` bytes at `pos` through the engine's file I/O and writes them to the
    /// client; returns how many went out. The bytes pass through a buffer the core lends for
    /// the chunk (`read_pooled_at`: a registered buffer where the engine has them, else a
    /// chunk of the core's pool), so a connection keeps no read + write buffer of its own.
    async fn copy_chunk<S: ConnStream>(
        &mut self,
        stream: &mut S,
        state: &mut FileState<R>,
        pos: u64,
        want: usize,
    ) -> Result<usize, End> {
        let chunk = state.engine()?.read_pooled_at(pos, want).await?;
        let n = chunk.len();
        if n == 0 {
            return Err(End::Truncated);
        }
        let sock = stream.as_raw_fd();
        let zc = self.files.cfg.send_zc_min.is_some_and(|min| n >= min);
        let write = async {
            let BufResult(res, _chunk) =
                if zc { stream.write_all_zc(chunk).await } else { stream.write_all(chunk).await };
            res
        };
        let (res, timed_out) = with_deadline::<R, _>(sock, self.send_timeout, write).await;
        if timed_out {
            return Err(End::Timeout);
        }
        res?;
        if zc {
            self.counters.send_zc(n as u64);
        }
        Ok(n)
    }
}

/// Reads a small file (a [`Body::Fill`]) whole through the engine's file I/O. Shorter than
/// `meta.len` when the file shrank since it was planned (the caller then does not remember it).
/// Every front end fills the memory cache this way.
pub async fn read_whole<R: Runtime>(file: Rc<File>, meta: &Metadata) -> Result<Bytes, End> {
    let len = meta.len;
    let f = R::File::from_std(owned(file)?).map_err(End::Io)?;
    let mut buf = Vec::with_capacity(len as usize);
    while (buf.len() as u64) < len {
        let at = buf.len();
        let BufResult(res, slice) = f.read_at(buf.slice(at..len as usize), at as u64).await;
        buf = slice.into_inner();
        match res {
            Ok(0) => break, // the file shrank
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(End::Io(e)),
        }
    }
    Ok(Bytes::from(buf))
}

/// A file being sent: a std handle (for `sendfile`), adopted by the engine the first time a
/// chunk must be read through it; sendfile then goes on with the engine file's descriptor.
/// The file itself when nothing else holds it, else a duplicate of its descriptor: the
/// engine's file closes what it is given, and the open-file cache may still hold this one.
/// Front ends that read a [`Body::File`] through the engine adopt it with this.
pub fn owned(file: Rc<File>) -> Result<File, End> {
    Rc::try_unwrap(file).or_else(|shared| shared.try_clone()).map_err(End::Io)
}

enum FileState<R: Runtime> {
    Std(Rc<File>),
    Engine(R::File),
    /// The engine refused to adopt the file (the error went to the caller).
    Lost,
}

impl<R: Runtime> FileState<R> {
    fn fd(&self) -> Result<BorrowedFd<'_>, End> {
        match self {
            FileState::Std(f) => Ok(f.as_fd()),
            // SAFETY: the engine's file owns this descriptor and lives as long as `self`, which
            // the returned borrow cannot outlive. (The engine's file trait offers only the raw
            // descriptor, hence the unsafe borrow.)
            FileState::Engine(f) => Ok(unsafe { BorrowedFd::borrow_raw(f.as_raw_fd()) }),
            FileState::Lost => Err(End::Io(io::Error::other("the file could not be adopted by the engine"))),
        }
    }

    fn engine(&mut self) -> Result<&R::File, End> {
        *self = match std::mem::replace(self, FileState::Lost) {
            FileState::Std(f) => FileState::Engine(R::File::from_std(owned(f)?).map_err(End::Io)?),
            other => other,
        };
        match self {
            FileState::Engine(f) => Ok(f),
            _ => Err(End::Io(io::Error::other("the file could not be adopted by the engine"))),
        }
    }
}
