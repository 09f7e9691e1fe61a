//! corepin-core: the runtime-agnostic heart of corepin.
//!
//! Owned-buffer I/O ([`buf`], [`io`], [`copy`](mod@copy)), the contract every backend implements ([`runtime`]),
//! the service abstraction ([`service`]) and its datagram counterpart ([`datagram`]), the thread-per-core launcher ([`launcher`],
//! [`topology`], [`worker`]), cross-core messaging ([`mesh`]), the capability report
//! ([`caps`]), the metrics endpoint every service registers with ([`metrics`]), a
//! page-cache probe that keeps disk reads off the worker ([`pagecache`]), and, for per-core
//! caches that learn of changes from a kernel queue, a check of that queue without a system
//! call, exact but for the windows its module names ([`posted`], with [`arrivals`] where it
//! cannot be had).
//! No engine is named here; backends are leaf crates that implement [`runtime`].

#![warn(missing_docs)]

pub mod arrivals;
pub mod buf;
pub mod caps;
pub mod copy;
pub mod datagram;
pub mod engine;
pub mod io;
pub mod launcher;
pub mod mesh;
pub mod metrics;
pub mod pagecache;
pub mod pool;
pub mod posted;
pub mod runtime;
pub mod service;
pub mod sharded;
pub mod task;
pub mod tcp;
pub mod topology;
pub mod udp;
pub mod worker;

pub use buf::{BufResult, EitherBuf, IoBuf, IoBufMut, Slice};
pub use caps::Capabilities;
pub use copy::{copy, copy_bidirectional};
pub use datagram::{Datagram, DatagramService, DatagramServiceFactory, DatagramSource};
pub use io::{AsyncReadRent, AsyncReadRentExt, AsyncWriteRent, AsyncWriteRentExt, CancelToken};
pub use launcher::{App, AppError, LaunchConfig, LaunchError, Server, ShutdownHandle, Signals};
pub use mesh::{post_to, submit_to};
pub use pool::PooledBuf;
pub use runtime::{EngineSettings, FdWatch, File, RingFlags, Runtime, TcpListener, TcpStream, UdpSocket};
pub use service::{Acceptor, ConnStream, Connection, Plain, ReadHalf, Service, ServiceFactory, Stream, WriteHalf};
pub use sharded::Sharded;
pub use tcp::{Joined, PortSharing, TcpServer};
pub use worker::{Worker, WorkerInfo};
