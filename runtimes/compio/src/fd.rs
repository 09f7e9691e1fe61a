//! Readiness of descriptors compio does not own (eventfd doorbells, AF_XDP sockets).
//!
//! The watch is compio's `PollFd` over a private close-on-exec duplicate of the descriptor:
//! each wait is one one-shot io_uring `POLL_ADD`, which the kernel evaluates against the
//! descriptor's current state when it is armed. That is level-triggered, as the contract asks
//! (a second wait completes at once while data remains), with no `poll(2)` confirmation
//! needed. The duplicate keeps a pending `POLL_ADD` pointed at the same open file even if the
//! caller closes its descriptor early; compio keeps it open until the operation completes.

use std::io;
use std::os::fd::{OwnedFd, RawFd};

use compio_runtime::fd::PollFd;
use corepin_core::engine::dup_cloexec;
use corepin_core::runtime as contract;

/// Waits for a foreign descriptor to become readable or writable (see the module docs).
pub struct FdWatch {
    fd: PollFd<OwnedFd>,
}

impl contract::FdWatch for FdWatch {
    fn new(fd: RawFd) -> io::Result<Self> {
        if compio_runtime::Runtime::try_current().is_none() {
            return Err(io::Error::other("FdWatch::new needs the compio runtime on this thread"));
        }
        Ok(Self { fd: PollFd::new(dup_cloexec(fd)?)? })
    }

    async fn readable(&self) -> io::Result<()> {
        self.fd.read_ready().await
    }

    async fn writable(&self) -> io::Result<()> {
        self.fd.write_ready().await
    }
}
