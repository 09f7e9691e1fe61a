//! Standard pcap files (the classic format tcpdump and tshark read), one series per core,
//! rotated by size. Owns the files of its core; writes headers by hand (24-byte file header,
//! 16-byte record headers, microsecond timestamps).
//!
//! AF_XDP captures hold the Ethernet frames as received (link type 1); the socket source has
//! no frame, so its captures hold each datagram behind IP and UDP headers rebuilt from its
//! addresses (link type 101, raw IP). Writes go to the page cache through a buffer flushed
//! once per batch; a write error (a full disk) stops this core's capture, says so once, and
//! never stops the ingest.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use corepin_core::datagram::Datagram;

/// The link layer of a capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkType {
    /// Ethernet frames (`LINKTYPE_ETHERNET`).
    Ethernet,
    /// IP packets, v4 or v6 (`LINKTYPE_RAW`).
    RawIp,
}

impl LinkType {
    fn code(self) -> u32 {
        match self {
            LinkType::Ethernet => 1,
            LinkType::RawIp => 101,
        }
    }
}

/// Where and how big.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcapConfig {
    /// The directory the files go to (created if missing).
    pub dir: PathBuf,
    /// A file is closed and the next one started before it would pass this size.
    pub rotate_bytes: u64,
}

const FILE_HEADER: usize = 24;
const RECORD_HEADER: usize = 16;
const SNAPLEN: u32 = 65_535;

/// One core's capture.
pub struct PcapWriter {
    cfg: PcapConfig,
    core: usize,
    link: LinkType,
    file: Option<BufWriter<File>>,
    written: u64,
    seq: u32,
    scratch: Vec<u8>,
    records: u64,
    failed: bool,
}

impl std::fmt::Debug for PcapWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PcapWriter").field("core", &self.core).field("seq", &self.seq).finish_non_exhaustive()
    }
}

/// The name of core `core`'s `seq`-th file.
pub fn file_name(core: usize, seq: u32) -> String {
    format!("corepin-core{core}-{seq:06}.pcap")
}

impl PcapWriter {
    /// A capture for core `core`; the first file is opened at once, so a directory that
    /// cannot be written is an error here, before any datagram.
    pub fn new(cfg: PcapConfig, core: usize, link: LinkType) -> io::Result<Self> {
        std::fs::create_dir_all(&cfg.dir)?;
        let mut w = Self {
            cfg,
            core,
            link,
            file: None,
            written: 0,
            seq: 0,
            scratch: Vec::with_capacity(64),
            records: 0,
            failed: false,
        };
        w.rotate()?;
        Ok(w)
    }

    fn path(&self, seq: u32) -> PathBuf {
        self.cfg.dir.join(file_name(self.core, seq))
    }

    fn rotate(&mut self) -> io::Result<()> {
        if let Some(mut f) = self.file.take() {
            f.flush()?;
        }
        self.seq += 1;
        let mut f = BufWriter::with_capacity(256 * 1024, File::create(self.path(self.seq))?);
        let mut h = [0u8; FILE_HEADER];
        h[0..4].copy_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        h[4..6].copy_from_slice(&2u16.to_le_bytes());
        h[6..8].copy_from_slice(&4u16.to_le_bytes());
        h[16..20].copy_from_slice(&SNAPLEN.to_le_bytes());
        h[20..24].copy_from_slice(&self.link.code().to_le_bytes());
        f.write_all(&h)?;
        self.written = FILE_HEADER as u64;
        self.file = Some(f);
        Ok(())
    }

    fn record(&mut self, at: SystemTime, parts: [&[u8]; 2]) -> io::Result<()> {
        let len = parts[0].len() + parts[1].len();
        let size = (RECORD_HEADER + len) as u64;
        if self.written > FILE_HEADER as u64 && self.written + size > self.cfg.rotate_bytes {
            self.rotate()?;
        }
        let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
        let caplen = (len as u32).min(SNAPLEN);
        let mut h = [0u8; RECORD_HEADER];
        h[0..4].copy_from_slice(&(since.as_secs() as u32).to_le_bytes());
        h[4..8].copy_from_slice(&since.subsec_micros().to_le_bytes());
        h[8..12].copy_from_slice(&caplen.to_le_bytes());
        h[12..16].copy_from_slice(&(len as u32).to_le_bytes());
        let Some(f) = self.file.as_mut() else { return Ok(()) };
        f.write_all(&h)?;
        let mut left = caplen as usize;
        for p in parts {
            let n = p.len().min(left);
            f.write_all(&p[..n])?;
            left -= n;
        }
        self.written += (RECORD_HEADER + caplen as usize) as u64;
        self.records += 1;
        Ok(())
    }

    fn check(&mut self, r: io::Result<()>) {
        if let Err(e) = r {
            self.failed = true;
            self.file = None;
            tracing::error!(core = self.core, "pcap capture stopped on this core: {e}");
        }
    }

    /// Writes an Ethernet frame (captures of link type Ethernet).
    pub fn write_frame(&mut self, at: SystemTime, frame: &[u8]) {
        if self.failed {
            return;
        }
        let r = self.record(at, [frame, &[]]);
        self.check(r);
    }

    /// Writes a datagram behind rebuilt IP and UDP headers (captures of link type raw IP).
    pub fn write_datagram(&mut self, d: &Datagram<'_>) {
        if self.failed {
            return;
        }
        let mut headers = std::mem::take(&mut self.scratch);
        headers.clear();
        let r = if crate::packet::ip_udp_headers(&mut headers, d.from, d.to, d.payload) {
            self.record(d.received, [&headers, d.payload])
        } else {
            Ok(())
        };
        self.scratch = headers;
        self.check(r);
    }

    /// Pushes buffered records to the file (once per batch).
    pub fn flush(&mut self) {
        if let Some(f) = self.file.as_mut() {
            let r = f.flush();
            self.check(r);
        }
    }

    /// Records written.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Files started.
    pub fn files(&self) -> u32 {
        self.seq
    }

    /// Whether a write error stopped the capture.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }
}

impl Drop for PcapWriter {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corepin_core::datagram::DatagramSource;

    /// Reads a capture back by the format's rules: (link type, records' captured bytes).
    fn read(path: &Path) -> (u32, Vec<Vec<u8>>) {
        let b = std::fs::read(path).unwrap();
        assert_eq!(u32::from_le_bytes(b[0..4].try_into().unwrap()), 0xa1b2_c3d4);
        let link = u32::from_le_bytes(b[20..24].try_into().unwrap());
        let mut at = FILE_HEADER;
        let mut out = Vec::new();
        while at < b.len() {
            let cap = u32::from_le_bytes(b[at + 8..at + 12].try_into().unwrap()) as usize;
            out.push(b[at + RECORD_HEADER..at + RECORD_HEADER + cap].to_vec());
            at += RECORD_HEADER + cap;
        }
        assert_eq!(at, b.len(), "no trailing bytes");
        (link, out)
    }

    #[test]
    fn files_rotate_before_passing_the_size_and_hold_every_record_once() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = PcapConfig { dir: dir.path().join("caps"), rotate_bytes: 1000 };
        let mut w = PcapWriter::new(cfg, 3, LinkType::RawIp).unwrap();
        let payloads: Vec<Vec<u8>> = (0..30u8).map(|i| vec![i; 10 + usize::from(i) * 7]).collect();
        for p in &payloads {
            w.write_datagram(&Datagram {
                payload: p,
                from: "10.0.0.1:1000".parse().unwrap(),
                to: "10.0.0.2:2000".parse().unwrap(),
                core: 3,
                queue: None,
                received: SystemTime::now(),
                source: DatagramSource::Socket,
            });
        }
        w.flush();
        let files = w.files();
        assert!(files > 1, "rotated");
        let mut got = Vec::new();
        for seq in 1..=files {
            let path = dir.path().join("caps").join(file_name(3, seq));
            assert!(std::fs::metadata(&path).unwrap().len() <= 1000, "{path:?} within the size");
            let (link, recs) = read(&path);
            assert_eq!(link, 101);
            for r in recs {
                let u = crate::packet::parse_udp(&[&[0u8; 12][..], &[0x08, 0x00], &r].concat()).unwrap();
                got.push(r[u.payload.start - 14..u.payload.end - 14].to_vec());
            }
        }
        assert_eq!(got, payloads);
        assert_eq!(w.records(), 30);
    }
}
