//! Files over glommio's `BufferedFile` (page-cache I/O through io_uring). Glommio's
//! `DmaFile` would need O_DIRECT-aligned buffers and positions, which corepin's contract
//! does not promise.
//!
//! Costs, honestly: glommio reads into a buffer of its own (`ReadResult`), which this module
//! copies into the caller's buffer (one copy per read); glommio's write takes a `Vec<u8>` it
//! keeps, so each write copies the caller's bytes into a fresh `Vec` (one allocation and one
//! copy per write). `sync_all` is a real `fsync(2)` on glommio's blocking thread, because
//! glommio only offers `fdatasync`, which does not flush all metadata.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::Path;

use corepin_core::buf::{BufResult, IoBuf, IoBufMut};
use corepin_core::engine::dup_cloexec;
use corepin_core::pool::PooledBuf;
use corepin_core::runtime::{self, Metadata, OpenOptions};
use glommio::io::BufferedFile;

use crate::engine::require_engine;
use crate::to_io;

/// A file with positional owned-buffer I/O (glommio `BufferedFile`).
pub struct File {
    inner: BufferedFile,
}

impl runtime::File for File {
    async fn open_with(path: &Path, options: OpenOptions) -> io::Result<Self> {
        require_engine()?;
        let mut o = glommio::io::OpenOptions::new();
        o.read(options.read).write(options.write).create(options.create).truncate(options.truncate);
        let inner = o.buffered_open(path).await.map_err(to_io)?;
        Ok(Self { inner })
    }

    fn from_std(file: std::fs::File) -> io::Result<Self> {
        require_engine()?;
        let fd = std::os::fd::IntoRawFd::into_raw_fd(file);
        // SAFETY: `fd` is an open file whose ownership `into_raw_fd` just gave us; glommio's
        // buffered file takes it over and closes it on drop.
        Ok(Self { inner: unsafe { BufferedFile::from_raw_fd(fd) } })
    }

    async fn read_at<B: IoBufMut>(&self, mut buf: B, pos: u64) -> BufResult<usize, B> {
        let total = buf.bytes_total();
        if total == 0 {
            return BufResult(Ok(0), buf);
        }
        match self.inner.read_at(pos, total).await {
            Ok(data) => {
                let n = data.len().min(total);
                // SAFETY: `data` holds `n` initialised bytes, the destination is valid for
                // writes of `total >= n` bytes (IoBufMut contract), and the two are distinct
                // allocations. Afterwards the first `n` bytes are initialised.
                unsafe {
                    std::ptr::copy_nonoverlapping(data.as_ptr(), buf.stable_mut_ptr(), n);
                    buf.set_init(n);
                }
                BufResult(Ok(n), buf)
            }
            Err(e) => BufResult(Err(to_io(e)), buf),
        }
    }

    /// Into one of the core's registered buffers by READ_FIXED on corepin's auxiliary ring
    /// (`corepin_uring::aux`), or a chunk of the core's pool where there is none.
    async fn read_pooled_at(&self, pos: u64, len: usize) -> io::Result<PooledBuf> {
        corepin_uring::aux::read_pooled_at(self, self.inner.as_raw_fd(), pos, len).await
    }

    async fn write_at<B: IoBuf>(&self, buf: B, pos: u64) -> BufResult<usize, B> {
        if buf.bytes_init() == 0 {
            return BufResult(Ok(0), buf);
        }
        let owned = buf.as_init_slice().to_vec();
        let res = self.inner.write_at(owned, pos).await.map_err(to_io);
        BufResult(res, buf)
    }

    async fn metadata(&self) -> io::Result<Metadata> {
        // Glommio's async stat reports sizes only (no times, inode or kind).
        Metadata::from_fd(self.inner.as_raw_fd())
    }

    async fn sync_all(&self) -> io::Result<()> {
        // The blocking thread owns a duplicate, so a dropped future can never fsync a
        // descriptor number that was closed and reused meanwhile.
        let fd = dup_cloexec(self.inner.as_raw_fd())?;
        glommio::executor()
            .spawn_blocking(move || {
                // SAFETY: `fd` is an open descriptor owned by this closure.
                if unsafe { libc::fsync(fd.as_raw_fd()) } == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            })
            .await
    }

    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}
