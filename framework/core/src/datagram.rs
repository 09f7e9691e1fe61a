//! The datagram service: user code that receives datagrams one by one, with their source,
//! destination and the core (and RX queue) they arrived on, the same way whichever source
//! delivered them (UDP sockets, AF_XDP). Owns only the contract; sources live with the
//! services that run them and must not be named here, nor any runtime.
//!
//! A source receives in batches and calls [`DatagramService::on_datagram`] for each datagram
//! of a batch, then [`DatagramService::on_batch`] once, inline on the core that received them:
//! the payload is borrowed from the source's buffer (a socket's receive buffer, an AF_XDP
//! frame) and goes back to it when the call returns, so the call must not wait. A service that
//! needs I/O per datagram (forwarding, replies) copies what it needs and hands it to a task of
//! its own on the core ([`crate::task::spawn`] with the runtime its factory was given).

use std::fmt;
use std::net::SocketAddr;
use std::time::SystemTime;

use crate::runtime::Runtime;
use crate::worker::Worker;

/// What delivered a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DatagramSource {
    /// A UDP socket of the kernel's stack (one `SO_REUSEPORT` socket per core).
    Socket,
    /// An AF_XDP socket: the frame came from the NIC's RX queue past the kernel's stack.
    AfXdp,
}

impl fmt::Display for DatagramSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DatagramSource::Socket => "socket",
            DatagramSource::AfXdp => "af_xdp",
        })
    }
}

/// One received datagram, borrowed for the duration of a call.
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    /// The UDP payload.
    pub payload: &'a [u8],
    /// Where it came from (the peer's address and port).
    pub from: SocketAddr,
    /// Where it was sent (the local address and port it arrived at).
    pub to: SocketAddr,
    /// The index of the worker that received it (0..workers).
    pub core: usize,
    /// The NIC receive queue it arrived on, where the source knows it (AF_XDP).
    pub queue: Option<u32>,
    /// When the source took it (one reading per batch).
    pub received: SystemTime,
    /// What delivered it.
    pub source: DatagramSource,
}

/// The per-core handler of datagrams. It stays on its core; `&mut self` needs no locking.
pub trait DatagramService {
    /// Handles one datagram. The payload is only valid during the call.
    fn on_datagram(&mut self, datagram: &Datagram<'_>);

    /// Called once after each batch (for flushing what a service accumulates per batch).
    fn on_batch(&mut self) {}

    /// Called once when the source stops (draining), after the last datagram.
    fn on_stop(&mut self) {}
}

/// Builds one [`DatagramService`] per core; crosses threads, so `Send + Sync`. The service may
/// be generic over the runtime `R` (to spawn tasks or open sockets of its own).
pub trait DatagramServiceFactory: Send + Sync + 'static {
    /// The per-core service for runtime `R`.
    type Service<R: Runtime>: DatagramService + 'static;
    /// Why a per-core instance could not be built.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Builds the instance for the worker it is called on, after pinning.
    fn new_service<R: Runtime>(&self, worker: &Worker) -> Result<Self::Service<R>, Self::Error>;
}

/// A service that ignores every datagram (for sources run only for their own counters).
#[derive(Debug, Clone, Copy, Default)]
pub struct Discard;

impl DatagramService for Discard {
    fn on_datagram(&mut self, _datagram: &Datagram<'_>) {}
}

impl DatagramServiceFactory for Discard {
    type Service<R: Runtime> = Discard;
    type Error = std::convert::Infallible;
    fn new_service<R: Runtime>(&self, _worker: &Worker) -> Result<Discard, Self::Error> {
        Ok(Discard)
    }
}

/// Two services side by side: each datagram goes to the first, then the second.
impl<A: DatagramService, B: DatagramService> DatagramService for (A, B) {
    fn on_datagram(&mut self, datagram: &Datagram<'_>) {
        self.0.on_datagram(datagram);
        self.1.on_datagram(datagram);
    }
    fn on_batch(&mut self) {
        self.0.on_batch();
        self.1.on_batch();
    }
    fn on_stop(&mut self) {
        self.0.on_stop();
        self.1.on_stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Count {
        datagrams: usize,
        bytes: usize,
        batches: usize,
        stopped: bool,
    }

    impl DatagramService for Count {
        fn on_datagram(&mut self, d: &Datagram<'_>) {
            self.datagrams += 1;
            self.bytes += d.payload.len();
        }
        fn on_batch(&mut self) {
            self.batches += 1;
        }
        fn on_stop(&mut self) {
            self.stopped = true;
        }
    }

    #[test]
    fn a_pair_hands_each_call_to_both_in_order() {
        let mut pair = (Count::default(), Count::default());
        let d = Datagram {
            payload: b"abc",
            from: "10.0.0.1:5000".parse().unwrap(),
            to: "10.0.0.2:6000".parse().unwrap(),
            core: 1,
            queue: Some(0),
            received: SystemTime::now(),
            source: DatagramSource::AfXdp,
        };
        pair.on_datagram(&d);
        pair.on_datagram(&d);
        pair.on_batch();
        pair.on_stop();
        for c in [&pair.0, &pair.1] {
            assert_eq!((c.datagrams, c.bytes, c.batches, c.stopped), (2, 6, 1, true));
        }
        assert_eq!(DatagramSource::Socket.to_string(), "socket");
        assert_eq!(DatagramSource::AfXdp.to_string(), "af_xdp");
    }
}
