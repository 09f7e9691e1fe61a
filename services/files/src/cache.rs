//! The per-core cache of small files: whole bodies in memory, keyed by inode and validated
//! against the metadata of every request's open file, so an edited file is never served
//! stale. One cache per core, so no lock and no cross-core cache line; each core warms its own.

use std::collections::{HashMap, VecDeque};
use std::time::SystemTime;

use bytes::Bytes;
use corepin_core::runtime::Metadata;

struct Entry {
    generation: u64,
    modified: SystemTime,
    len: u64,
    data: Bytes,
}

/// Small-file bodies of one core, evicted oldest-inserted first beyond a byte budget.
pub struct Cache {
    map: HashMap<(u64, u64), Entry>,
    order: VecDeque<((u64, u64), u64)>,
    generation: u64,
    bytes: u64,
    budget: u64,
}

impl Cache {
    /// An empty cache holding at most `budget` bytes of bodies.
    pub fn new(budget: u64) -> Self {
        Self { map: HashMap::new(), order: VecDeque::new(), generation: 0, bytes: 0, budget }
    }

    /// The body of the file `meta` describes, if cached and unchanged.
    pub fn get(&self, meta: &Metadata) -> Option<Bytes> {
        let e = self.map.get(&(meta.dev, meta.ino))?;
        (e.modified == meta.modified && e.len == meta.len && e.data.len() as u64 == meta.len).then(|| e.data.clone())
    }

    fn remove(&mut self, key: &(u64, u64)) {
        if let Some(old) = self.map.remove(key) {
            self.bytes -= old.data.len() as u64;
        }
    }

    /// Stores the body of the file `meta` describes.
    pub fn insert(&mut self, meta: &Metadata, data: Bytes) {
        let key = (meta.dev, meta.ino);
        let len = data.len() as u64;
        self.remove(&key);
        if len > self.budget {
            return;
        }
        while self.bytes + len > self.budget {
            match self.order.pop_front() {
                // Only the entry inserted with this generation; a later re-insert stays.
                Some((k, g)) if self.map.get(&k).is_some_and(|e| e.generation == g) => self.remove(&k),
                Some(_) => {}
                None => break,
            }
        }
        self.generation += 1;
        let generation = self.generation;
        self.map.insert(key, Entry { generation, modified: meta.modified, len: meta.len, data });
        self.order.push_back((key, generation));
        self.bytes += len;
        // Replaced entries leave stale keys in `order`; keep it from growing without bound.
        if self.order.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            self.order.retain(|(k, g)| map.get(k).is_some_and(|e| e.generation == *g));
        }
    }

    /// Forgets the body of the inode `(dev, ino)` (its file changed).
    pub fn forget(&mut self, dev: u64, ino: u64) {
        self.remove(&(dev, ino));
    }

    /// Bytes of bodies held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn meta(ino: u64, len: u64, secs: u64) -> Metadata {
        Metadata {
            len,
            modified: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            is_file: true,
            is_dir: false,
            ino,
            dev: 1,
        }
    }

    #[test]
    fn validates_and_evicts() {
        let mut c = Cache::new(10);
        c.insert(&meta(1, 4, 1), Bytes::from_static(b"abcd"));
        assert_eq!(c.get(&meta(1, 4, 1)).as_deref(), Some(&b"abcd"[..]));
        assert!(c.get(&meta(1, 4, 2)).is_none(), "a newer mtime is a miss");
        assert!(c.get(&meta(1, 5, 1)).is_none(), "another length is a miss");
        c.insert(&meta(2, 4, 1), Bytes::from_static(b"efgh"));
        c.insert(&meta(3, 4, 1), Bytes::from_static(b"ijkl"));
        assert!(c.get(&meta(1, 4, 1)).is_none(), "oldest evicted past the budget");
        assert_eq!(c.bytes(), 8);
        c.insert(&meta(4, 11, 1), Bytes::from(vec![0u8; 11]));
        assert!(c.get(&meta(4, 11, 1)).is_none(), "larger than the whole budget: not cached");
        for _ in 0..1000 {
            c.insert(&meta(2, 4, 1), Bytes::from_static(b"efgh"));
        }
        assert!(c.order.len() < 100);
    }
}
