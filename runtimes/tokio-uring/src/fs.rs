//! Files on tokio-uring: `OPENAT`, positional `READ` / `WRITE` into the caller's buffers,
//! `FSYNC`, and `STATX` for metadata, all as io_uring operations.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::time::{Duration, SystemTime};

use corepin_core::buf::{BufResult, IoBuf, IoBufMut};
use corepin_core::pool::PooledBuf;
use corepin_core::runtime::{self as contract, Metadata, OpenOptions};

use crate::buf::Owned;
use crate::net::back;

/// A file with positional owned-buffer I/O through io_uring.
pub struct File {
    inner: tokio_uring::fs::File,
}

impl contract::File for File {
    async fn open_with(path: &Path, options: OpenOptions) -> io::Result<Self> {
        let inner = tokio_uring::fs::OpenOptions::new()
            .read(options.read)
            .write(options.write)
            .create(options.create)
            .truncate(options.truncate)
            .open(path)
            .await?;
        Ok(Self { inner })
    }

    fn from_std(file: std::fs::File) -> io::Result<Self> {
        Ok(Self { inner: tokio_uring::fs::File::from_std(file) })
    }

    async fn read_at<B: IoBufMut>(&self, buf: B, pos: u64) -> BufResult<usize, B> {
        back(self.inner.read_at(Owned(buf), pos).await)
    }

    /// Into one of the core's registered buffers by READ_FIXED on corepin's auxiliary ring
    /// (`corepin_uring::aux`), or a chunk of the core's pool where there is none.
    async fn read_pooled_at(&self, pos: u64, len: usize) -> io::Result<PooledBuf> {
        corepin_uring::aux::read_pooled_at(self, self.inner.as_raw_fd(), pos, len).await
    }
    async fn write_at<B: IoBuf>(&self, buf: B, pos: u64) -> BufResult<usize, B> {
        back(self.inner.write_at(Owned(buf), pos).submit().await)
    }

    async fn metadata(&self) -> io::Result<Metadata> {
        Ok(from_statx(&self.inner.statx().await?))
    }

    async fn sync_all(&self) -> io::Result<()> {
        self.inner.sync_all().await
    }

    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

/// The corepin view of a `statx` result, with the same numbers `fstat(2)` would give.
fn from_statx(st: &libc::statx) -> Metadata {
    let fmt = u32::from(st.stx_mode) & libc::S_IFMT;
    let nanos = st.stx_mtime.tv_nsec.min(999_999_999);
    let modified = if st.stx_mtime.tv_sec >= 0 {
        SystemTime::UNIX_EPOCH + Duration::new(st.stx_mtime.tv_sec as u64, nanos)
    } else {
        SystemTime::UNIX_EPOCH
    };
    Metadata {
        len: st.stx_size,
        modified,
        is_file: fmt == libc::S_IFREG,
        is_dir: fmt == libc::S_IFDIR,
        ino: st.stx_ino,
        dev: libc::makedev(st.stx_dev_major, st.stx_dev_minor),
    }
}
