//! corepin's UDP ingest service: datagrams for one port taken off an interface and handed to
//! a user's [`DatagramService`](corepin_core::DatagramService), counted per flow, optionally
//! written to pcap files.
//!
//! Two sources deliver them the same way: AF_XDP sockets fed by corepin's own XDP program
//! ([`program`]: C compiled for BPF by `build.rs` and embedded; attached through a `bpf_link`
//! the kernel removes if the process dies; per-queue, per-CPU verdict counters), or, where
//! AF_XDP is unavailable, one `SO_REUSEPORT` UDP socket per worker ([`socket`]).
//!
//! Must not: drop anything in the kernel (whatever is not for the port, or for a queue without
//! a socket, goes on to the kernel's stack), or name a runtime.

#![warn(missing_docs)]

pub mod flows;
pub mod ingest;
pub mod legacy;
pub mod packet;
pub mod pcap;
pub mod program;
pub mod socket;
pub mod xsk;

pub use flows::{FlowCollector, FlowCounter, FlowKey, FlowStats, FlowTable, Flows};
pub use ingest::{Ingest, IngestConfig, IngestError, Prepared, Shared, Source, SourceChoice};
pub use pcap::PcapConfig;
pub use program::{AttachMode, Attached, IngestProgram, QueueCounters, Verdict, XdpError};
