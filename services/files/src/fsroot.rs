//! The served root and the only way files are opened beneath it.
//!
//! Every open is `openat2(2)` relative to a descriptor of the root with `RESOLVE_BENEATH`
//! (and `RESOLVE_NO_MAGICLINKS`): the kernel refuses any resolution, through `..` or a
//! symlink, that would leave the root, atomically with the open, so no check-then-open race
//! exists. Symlinks that stay inside the root work. `--follow-symlinks` drops
//! `RESOLVE_BENEATH` (request paths never contain `..`, so only symlinks can then lead out).
//!
//! On kernels without `openat2` (before 5.6) the fallback opens with `openat(2)` and then
//! checks where the opened descriptor really is (`/proc/self/fd`), refusing it if that is
//! outside the root: still decided on what was opened, not on a path that could change.
//!
//! Opens are non-blocking (a FIFO planted in the root cannot stall a core) and these are
//! synchronous syscalls on the worker, as in nginx: cheap on a warm dentry cache.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Why a path could not be opened, as an HTTP answer.
#[derive(Debug)]
pub enum OpenError {
    /// No such file (404).
    NotFound,
    /// Outside the root, or not permitted (403).
    Forbidden,
    /// A name too long for the file system (414).
    TooLong,
    /// Anything else (500).
    Other(io::Error),
}

/// How opens are confined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confinement {
    /// `openat2` with `RESOLVE_BENEATH`.
    Openat2,
    /// `openat`, then a check of the opened descriptor's real path.
    CheckOpened,
}

/// The directory being served.
#[derive(Debug)]
pub struct Root {
    dir: OwnedFd,
    canonical: PathBuf,
    follow_symlinks: bool,
    confinement: Confinement,
}

/// `struct open_how` of openat2(2) (libc's is non-exhaustive).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

fn openat2(dir: &OwnedFd, path: &CString, flags: i32, resolve: u64) -> io::Result<OwnedFd> {
    let how = OpenHow { flags: flags as u64, mode: 0, resolve };
    // SAFETY: `dir` is an open directory descriptor, `path` a NUL-terminated string and `how`
    // a valid `open_how` of the size passed; the kernel only reads them.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a fresh descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn openat(dir: &OwnedFd, path: &CString, flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: as for openat2; plain openat with no mode argument needed (no O_CREAT).
    let fd = unsafe { libc::openat(dir.as_raw_fd(), path.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

const OPEN_FLAGS: i32 = libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY;

impl Root {
    /// Opens `path` as the root.
    pub fn open(path: &Path, follow_symlinks: bool) -> io::Result<Root> {
        Self::open_confined(path, follow_symlinks, None)
    }

    /// [`open`](Self::open), optionally forcing the confinement (tests use it to exercise the
    /// pre-5.6 fallback on a kernel that has `openat2`).
    pub fn open_confined(path: &Path, follow_symlinks: bool, force: Option<Confinement>) -> io::Result<Root> {
        let canonical = std::fs::canonicalize(path)?;
        let dir: OwnedFd = File::open(&canonical)?.into();
        let meta = std::fs::metadata(&canonical)?;
        if !meta.is_dir() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not a directory", path.display())));
        }
        let dot = CString::new(".").map_err(io::Error::other)?;
        let confinement = match (force, openat2(&dir, &dot, OPEN_FLAGS, libc::RESOLVE_BENEATH)) {
            (Some(c), _) => c,
            (None, Ok(_)) => Confinement::Openat2,
            (None, Err(e)) if e.raw_os_error() == Some(libc::ENOSYS) => Confinement::CheckOpened,
            (None, Err(e)) => return Err(e),
        };
        Ok(Root { dir, canonical, follow_symlinks, confinement })
    }

    /// The root's canonical path.
    pub fn path(&self) -> &Path {
        &self.canonical
    }

    /// How opens are confined on this kernel.
    pub fn confinement(&self) -> Confinement {
        self.confinement
    }

    /// Opens `relative` (already checked by `target::parse_target`) for reading.
    pub fn open_file(&self, relative: &str) -> Result<File, OpenError> {
        let c = CString::new(relative).map_err(|_| OpenError::NotFound)?;
        let res = match self.confinement {
            Confinement::Openat2 => {
                let resolve = if self.follow_symlinks {
                    libc::RESOLVE_NO_MAGICLINKS
                } else {
                    libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS
                };
                openat2(&self.dir, &c, OPEN_FLAGS, resolve)
            }
            Confinement::CheckOpened => openat(&self.dir, &c, OPEN_FLAGS).and_then(|fd| {
                if self.follow_symlinks || self.is_inside(&fd) {
                    Ok(fd)
                } else {
                    Err(io::Error::from_raw_os_error(libc::EXDEV))
                }
            }),
        };
        match res {
            Ok(fd) => Ok(File::from(fd)),
            Err(e) => Err(match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENOTDIR) => OpenError::NotFound,
                Some(libc::EXDEV) | Some(libc::ELOOP) | Some(libc::EACCES) | Some(libc::EPERM) => OpenError::Forbidden,
                Some(libc::ENAMETOOLONG) => OpenError::TooLong,
                _ => OpenError::Other(e),
            }),
        }
    }

    fn is_inside(&self, fd: &OwnedFd) -> bool {
        match std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
            Ok(real) => real.starts_with(&self.canonical),
            Err(_) => false,
        }
    }
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// The name (entries whose names are not UTF-8 are left out).
    pub name: String,
    /// A directory.
    pub is_dir: bool,
}

/// Lists the directory open as `dir`, sorted by name.
pub fn list(dir: &File) -> io::Result<Vec<DirEntry>> {
    // The directory as it was opened (confined), not a path that could have changed since.
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else { continue };
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        out.push(DirEntry { name, is_dir });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both confinements refuse symlinks that lead out of the root (a file, or a directory
    /// on the way) and allow those that stay inside; following them out takes the flag.
    #[test]
    fn both_confinements_keep_opens_inside_the_root() {
        let base = std::env::temp_dir().join(format!("corepin-fsroot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("root/sub")).unwrap();
        std::fs::create_dir_all(base.join("outside")).unwrap();
        std::fs::write(base.join("root/sub/in.txt"), b"in").unwrap();
        std::fs::write(base.join("outside/secret.txt"), b"out").unwrap();
        std::os::unix::fs::symlink("sub/in.txt", base.join("root/link-in")).unwrap();
        std::os::unix::fs::symlink(base.join("outside/secret.txt"), base.join("root/link-out")).unwrap();
        std::os::unix::fs::symlink("../outside", base.join("root/dir-out")).unwrap();
        for c in [Confinement::Openat2, Confinement::CheckOpened] {
            let root = Root::open_confined(&base.join("root"), false, Some(c)).unwrap();
            assert_eq!(root.confinement(), c);
            assert!(root.open_file("sub/in.txt").is_ok(), "{c:?}");
            assert!(root.open_file("link-in").is_ok(), "{c:?}: a symlink inside the root works");
            assert!(matches!(root.open_file("link-out"), Err(OpenError::Forbidden)), "{c:?}");
            assert!(matches!(root.open_file("dir-out/secret.txt"), Err(OpenError::Forbidden)), "{c:?}");
            assert!(matches!(root.open_file("missing"), Err(OpenError::NotFound)), "{c:?}");
            let follow = Root::open_confined(&base.join("root"), true, Some(c)).unwrap();
            assert!(follow.open_file("link-out").is_ok(), "{c:?}: --follow-symlinks");
        }
        let _ = std::fs::remove_dir_all(&base);
    }
}
