//! Per-core counters of the file server and their collector for the framework's metrics
//! endpoint ([`corepin_core::metrics`]).
//!
//! Each core writes only its own cache-padded counters (a relaxed load and store, no locked
//! instruction); a scrape reads every core's values and renders them per core (`core="N"`) and
//! summed over cores (the `*_all_cores` families, so that `sum()` over a per-core family never
//! double counts). The connection counters and the capability report are the framework's
//! collectors; [`FilesCollector`] adds the file server's own families next to them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use corepin_core::metrics::{per_core_counter, Collector, DescriptorEncoder, Registry};
use corepin_core::worker::{CoreCounters, PerCore};

/// How a response body reached the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferPath {
    /// `sendfile(2)`: page cache to socket, no user-space copy.
    Sendfile,
    /// From the per-core in-memory cache (small hot files), one write with the headers.
    Memory,
    /// Read into a buffer, then written: the fallback where sendfile cannot be used.
    ReadWrite,
}

impl TransferPath {
    /// Every path, in exposition order.
    pub const ALL: [TransferPath; 3] = [TransferPath::Sendfile, TransferPath::Memory, TransferPath::ReadWrite];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            TransferPath::Sendfile => "sendfile",
            TransferPath::Memory => "memory",
            TransferPath::ReadWrite => "read-write",
        }
    }
}

/// One core's file-server counters (written by that core only).
#[derive(Debug, Default)]
pub struct CoreFileCounters {
    /// Responses by status class: index 0 is 1xx, ..., 4 is 5xx.
    pub responses: [AtomicU64; 5],
    /// Response bytes sent (headers and bodies).
    pub bytes_sent: AtomicU64,
    /// Bodies sent, by [`TransferPath`].
    pub transfers: [AtomicU64; 3],
    /// Body bytes sent, by [`TransferPath`].
    pub transfer_bytes: [AtomicU64; 3],
    /// Connections closed for a timeout (header, idle, or slow reader).
    pub timeouts: AtomicU64,
    /// Body bytes read by the engine (off the worker's thread) instead of by sendfile, because
    /// the page cache missed part of their range.
    pub cold_bytes: AtomicU64,
    /// Body bytes handed to zero-copy sends (`send_zc_min`).
    pub send_zc_bytes: AtomicU64,
    /// Open-file cache lookups: hit, miss, expired (see [`crate::open_cache::Lookup`]).
    pub open_lookups: [AtomicU64; 3],
    /// Open-file cache entries dropped because their file changed.
    pub open_invalidated: AtomicU64,
    /// Reads of the open-file cache's inotify queue.
    pub open_queue_reads: AtomicU64,
}

impl CoreFileCounters {
    /// Counts a response with `status`.
    pub fn response(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        CoreCounters::add(&self.responses[class], 1);
    }
    /// Counts a connection closed by a timeout.
    pub fn timeout(&self) {
        CoreCounters::add(&self.timeouts, 1);
    }
    /// Counts body bytes read through the engine because the page cache did not hold them.
    pub fn cold(&self, bytes: u64) {
        CoreCounters::add(&self.cold_bytes, bytes);
    }
    /// Counts body bytes handed to a zero-copy send.
    pub fn send_zc(&self, bytes: u64) {
        CoreCounters::add(&self.send_zc_bytes, bytes);
    }
    /// Counts an open-file cache lookup.
    pub fn open_lookup(&self, how: crate::open_cache::Lookup) {
        use crate::open_cache::Lookup;
        let i = match how {
            Lookup::Hit => 0,
            Lookup::Miss => 1,
            Lookup::Expired => 2,
        };
        CoreCounters::add(&self.open_lookups[i], 1);
    }
    /// Counts open-file cache entries dropped because their file changed.
    pub fn open_invalidated(&self, n: u64) {
        CoreCounters::add(&self.open_invalidated, n);
    }
    /// Counts reads of the open-file cache's inotify queue.
    pub fn open_queue_reads(&self, n: u64) {
        CoreCounters::add(&self.open_queue_reads, n);
    }
    /// Counts one body sent by `path`.
    pub fn transfer(&self, path: TransferPath, bytes: u64) {
        let i = TransferPath::ALL.iter().position(|p| *p == path).unwrap_or(0);
        CoreCounters::add(&self.transfers[i], 1);
        CoreCounters::add(&self.transfer_bytes[i], bytes);
    }
}

/// Every core's file-server counters.
pub type FileMetrics = PerCore<CoreFileCounters>;

/// Exports the file server's counters: responses by status class, bytes sent, bodies and body
/// bytes by transfer path, timeouts and bytes read after a page-cache miss, per core and
/// summed over cores.
#[derive(Debug, Clone)]
pub struct FilesCollector {
    files: Arc<FileMetrics>,
}

impl FilesCollector {
    /// Exports `files` (a factory's are [`FilesFactory::metrics`](crate::FilesFactory::metrics)).
    pub fn new(files: Arc<FileMetrics>) -> Self {
        Self { files }
    }

    /// Adds this collector to `registry` (usually one from
    /// [`registry_for`](corepin_core::metrics::registry_for), which already holds the
    /// framework's connection counters and capability report).
    pub fn register(self, registry: &mut Registry) {
        registry.register_collector(Box::new(self));
    }
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl Collector for FilesCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let n = self.files.len();
        let files = &self.files;
        per_core_counter(
            &mut enc,
            "corepin_http_responses",
            "HTTP responses by status class",
            Some(("class", &CLASSES)),
            n,
            |c, i| get(&files.core(c).responses[i]),
        )?;
        per_core_counter(
            &mut enc,
            "corepin_http_sent_bytes",
            "Response bytes sent (headers and bodies)",
            None,
            n,
            |c, _| get(&files.core(c).bytes_sent),
        )?;
        let paths: Vec<&str> = TransferPath::ALL.iter().map(|p| p.name()).collect();
        per_core_counter(
            &mut enc,
            "corepin_file_transfers",
            "Response bodies sent, by transfer path",
            Some(("path", &paths)),
            n,
            |c, i| get(&files.core(c).transfers[i]),
        )?;
        per_core_counter(
            &mut enc,
            "corepin_file_transfer_bytes",
            "Body bytes sent, by transfer path",
            Some(("path", &paths)),
            n,
            |c, i| get(&files.core(c).transfer_bytes[i]),
        )?;
        per_core_counter(
            &mut enc,
            "corepin_http_timeouts",
            "Connections closed by a header, idle or send timeout",
            None,
            n,
            |c, _| get(&files.core(c).timeouts),
        )?;
        per_core_counter(
            &mut enc,
            "corepin_file_cold_bytes",
            "Body bytes read by the engine instead of by sendfile, after a page-cache miss in their range",
            None,
            n,
            |c, _| get(&files.core(c).cold_bytes),
        )?;
        per_core_counter(
            &mut enc,
            "corepin_file_send_zc_bytes",
            "Body bytes handed to zero-copy sends (--send-zc-min; SEND_ZC where the capability report says it is used)",
            None,
            n,
            |c, _| get(&files.core(c).send_zc_bytes),
        )?;
        per_core_counter(
            &mut enc,
            "corepin_file_open_cache_lookups",
            "Open-file cache lookups: hit (no open, fstat or close), miss, expired (the path was checked again)",
            Some(("result", &["hit", "miss", "expired"])),
            n,
            |c, i| get(&files.core(c).open_lookups[i]),
        )?;
        per_core_counter(
            &mut enc,
            "corepin_file_open_cache_invalidations",
            "Open-file cache entries dropped because inotify reported a change to their file",
            None,
            n,
            |c, _| get(&files.core(c).open_invalidated),
        )?;
        per_core_counter(
            &mut enc,
            "corepin_file_open_cache_queue_reads",
            "Reads of the open-file cache's inotify queue (only when it holds events, a change or a removed watch, where a posted io_uring poll says so; else one per lookup or per receive)",
            None,
            n,
            |c, _| get(&files.core(c).open_queue_reads),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_files_families_render_per_core_and_summed() {
        let files = FileMetrics::new(2);
        files.core(0).response(200);
        files.core(1).response(404);
        files.core(1).response(206);
        files.core(0).transfer(TransferPath::Memory, 10);
        files.core(1).transfer(TransferPath::Sendfile, 1000);
        files.core(1).timeout();
        files.core(0).cold(7);
        files.core(1).open_lookup(crate::open_cache::Lookup::Hit);
        files.core(1).open_invalidated(3);
        files.core(0).open_queue_reads(2);
        let mut registry = Registry::default();
        FilesCollector::new(files).register(&mut registry);
        let text = corepin_core::metrics::render(&registry);
        for line in [
            "# TYPE corepin_http_responses counter",
            "corepin_http_responses_total{core=\"0\",class=\"2xx\"} 1",
            "corepin_http_responses_total{core=\"1\",class=\"2xx\"} 1",
            "corepin_http_responses_total{core=\"1\",class=\"4xx\"} 1",
            "corepin_http_responses_all_cores_total{class=\"2xx\"} 2",
            "corepin_http_responses_all_cores_total{class=\"4xx\"} 1",
            "corepin_file_transfers_total{core=\"0\",path=\"memory\"} 1",
            "corepin_file_transfers_all_cores_total{path=\"sendfile\"} 1",
            "corepin_file_transfers_all_cores_total{path=\"read-write\"} 0",
            "corepin_file_transfer_bytes_all_cores_total{path=\"sendfile\"} 1000",
            "corepin_http_timeouts_all_cores_total 1",
            "corepin_file_cold_bytes_total{core=\"0\"} 7",
            "corepin_file_cold_bytes_all_cores_total 7",
            "corepin_file_open_cache_lookups_all_cores_total{result=\"hit\"} 1",
            "corepin_file_open_cache_lookups_all_cores_total{result=\"miss\"} 0",
            "corepin_file_open_cache_invalidations_total{core=\"1\"} 3",
            "corepin_file_open_cache_queue_reads_all_cores_total 2",
        ] {
            assert!(text.lines().any(|l| l == line), "no line `{line}` in\n{text}");
        }
        assert!(!text.contains("corepin_connections"), "the connection counters are the framework's: {text}");
    }
}
