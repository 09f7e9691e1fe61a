//! Files on Monoio: io_uring reads and writes at an offset (on the epoll driver, `pread` and
//! `pwrite` on the worker).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use corepin_core::buf::{BufResult, IoBuf, IoBufMut};
use corepin_core::pool::PooledBuf;
use corepin_core::runtime::{self as rt, Metadata, OpenOptions};

use crate::buf::{back, Owned};

/// A file.
pub struct File(monoio::fs::File);

impl rt::File for File {
    async fn open_with(path: &Path, o: OpenOptions) -> io::Result<Self> {
        monoio::fs::OpenOptions::new()
            .read(o.read)
            .write(o.write)
            .create(o.create)
            .truncate(o.truncate)
            .open(path)
            .await
            .map(Self)
    }
    fn from_std(file: std::fs::File) -> io::Result<Self> {
        monoio::fs::File::from_std(file).map(Self)
    }
    async fn read_at<B: IoBufMut>(&self, buf: B, pos: u64) -> BufResult<usize, B> {
        back(self.0.read_at(Owned(buf), pos).await)
    }
    /// Into one of the core's registered buffers by READ_FIXED on corepin's auxiliary ring
    /// (`corepin_uring::aux`), or a chunk of the core's pool where there is none.
    async fn read_pooled_at(&self, pos: u64, len: usize) -> io::Result<PooledBuf> {
        corepin_uring::aux::read_pooled_at(self, self.0.as_raw_fd(), pos, len).await
    }
    async fn write_at<B: IoBuf>(&self, buf: B, pos: u64) -> BufResult<usize, B> {
        back(self.0.write_at(Owned(buf), pos).await)
    }
    async fn metadata(&self) -> io::Result<Metadata> {
        Metadata::from_fd(self.0.as_raw_fd())
    }
    async fn sync_all(&self) -> io::Result<()> {
        self.0.sync_all().await
    }
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
