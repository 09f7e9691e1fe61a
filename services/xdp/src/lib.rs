//! AF_XDP packet ingest, the kernel half: corepin's own XDP program and its loader.
//!
//! Owns: the program (`bpf/ingest.c`, compiled for BPF by `build.rs` with clang and embedded
//! in the binary), loading it with the UDP port to take, attaching it to an interface
//! (native, generic, or whichever the driver allows) through a `bpf_link` that the kernel
//! removes if the process dies, detaching it on drop, the map that receives each RX queue's
//! AF_XDP socket, and reading its per-queue, per-CPU counters.
//!
//! Must not: touch packets in user space (the AF_XDP sockets and their UMEM are the worker's
//! business), or drop anything: whatever is not for the port, or for a queue without a socket,
//! goes on to the kernel.

#![warn(missing_docs)]

pub mod program;

pub use program::{AttachMode, Attached, IngestProgram, QueueCounters, Verdict, XdpError};
