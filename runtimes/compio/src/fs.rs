//! Files on compio: `OPENAT`, positional `READ` / `WRITE` into the caller's buffers, `FSYNC`,
//! and `STATX` for metadata, all as io_uring operations.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::path::Path;
use std::time::{Duration, SystemTime};

use compio_driver::ToSharedFd;
use compio_io::{AsyncReadAt as _, AsyncWriteAt as _};
use corepin_core::buf::{BufResult, IoBuf, IoBufMut};
use corepin_core::runtime::{self as contract, Metadata, OpenOptions};

use crate::buf::{back, Owned};

/// A file with positional owned-buffer I/O through io_uring.
pub struct File {
    inner: compio_fs::File,
}

impl contract::File for File {
    async fn open_with(path: &Path, options: OpenOptions) -> io::Result<Self> {
        let inner = compio_fs::OpenOptions::new()
            .read(options.read)
            .write(options.write)
            .create(options.create)
            .truncate(options.truncate)
            .open(path)
            .await?;
        Ok(Self { inner })
    }

    fn from_std(file: std::fs::File) -> io::Result<Self> {
        // compio-fs adopts std files only through `FromRawFd` (its `from_std` is private).
        // SAFETY: `into_raw_fd` hands over sole ownership of an open file descriptor, which
        // the compio file now owns and closes.
        let inner = unsafe { compio_fs::File::from_raw_fd(file.into_raw_fd()) };
        Ok(Self { inner })
    }

    async fn read_at<B: IoBufMut>(&self, buf: B, pos: u64) -> BufResult<usize, B> {
        back(self.inner.read_at(Owned(buf), pos).await)
    }

    /// Into one of the core's registered buffers by READ_FIXED on corepin's auxiliary ring
    /// (`corepin_uring::aux`, which compio 0.19 lacks), or a chunk of the core's pool where
    /// there is none.
    async fn read_pooled_at(&self, pos: u64, len: usize) -> io::Result<corepin_core::pool::PooledBuf> {
        corepin_uring::aux::read_pooled_at(self, self.as_raw_fd(), pos, len).await
    }

    async fn write_at<B: IoBuf>(&self, buf: B, pos: u64) -> BufResult<usize, B> {
        let mut file = &self.inner;
        back(file.write_at(Owned(buf), pos).await)
    }

    async fn metadata(&self) -> io::Result<Metadata> {
        // compio's own `Metadata` keeps inode and device behind platform extensions, so the
        // STATX op is submitted directly and read as the `stat` compio converts it to.
        let op = compio_driver::op::FileStat::new(self.inner.to_shared_fd());
        let compio_buf::BufResult(res, op) = compio_runtime::submit(op).await;
        res?;
        let st = compio_buf::IntoInner::into_inner(op);
        let fmt = st.st_mode & libc::S_IFMT;
        let nanos = st.st_mtime_nsec.clamp(0, 999_999_999) as u32;
        let modified = if st.st_mtime >= 0 {
            SystemTime::UNIX_EPOCH + Duration::new(st.st_mtime as u64, nanos)
        } else {
            SystemTime::UNIX_EPOCH
        };
        Ok(Metadata {
            len: st.st_size.max(0) as u64,
            modified,
            is_file: fmt == libc::S_IFREG,
            is_dir: fmt == libc::S_IFDIR,
            ino: st.st_ino,
            dev: st.st_dev,
        })
    }

    async fn sync_all(&self) -> io::Result<()> {
        self.inner.sync_all().await
    }

    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}
