//! Readiness of descriptors Monoio does not own: a duplicate of the descriptor adopted by
//! Monoio as a socket it only polls (`POLL_ADD` on io_uring, epoll on the fallback driver).

use std::io;
use std::os::fd::{IntoRawFd, RawFd};

use corepin_core::engine::dup_cloexec;
use corepin_core::runtime as rt;

/// Readiness of a foreign descriptor: a duplicate of it, adopted by Monoio, awaited with
/// `POLL_ADD` on io_uring or epoll on the fallback driver.
pub struct FdWatch(monoio::net::udp::UdpSocket);

impl rt::FdWatch for FdWatch {
    fn new(fd: RawFd) -> io::Result<Self> {
        let dup = dup_cloexec(fd)?;
        // SAFETY: `dup` is a fresh descriptor owned by nobody else; the std socket takes it
        // over. It is only polled, never read or written as a UDP socket.
        let std_sock = unsafe { <std::net::UdpSocket as std::os::fd::FromRawFd>::from_raw_fd(dup.into_raw_fd()) };
        monoio::net::udp::UdpSocket::from_std(std_sock).map(Self)
    }
    async fn readable(&self) -> io::Result<()> {
        self.0.readable(false).await
    }
    async fn writable(&self) -> io::Result<()> {
        self.0.writable(false).await
    }
}
