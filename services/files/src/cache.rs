//! The per-core cache of small files: whole bodies in memory, keyed by inode and validated
//! against the metadata of every request's open file, so an edited file is never served
//! stale. One cache per core, so no lock and no cross-core cache line; each core warms its own.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::SystemTime;

use bytes::Bytes;
use corepin_core::runtime::Metadata;

struct Entry {
    generation: u64,
    modified: SystemTime,
    len: u64,
    data: Bytes,
}

/// The keys of a map in the order they were inserted, for evicting the oldest first. Each
/// insertion is stamped with a generation that the map's entry keeps, so the old place of a key
/// inserted again since is recognised and skipped.
pub(crate) struct InsertionOrder<K> {
    order: VecDeque<(K, u64)>,
    generation: u64,
}

impl<K: Eq + Hash + Clone> InsertionOrder<K> {
    pub(crate) fn new() -> Self {
        Self { order: VecDeque::new(), generation: 0 }
    }

    /// Records an insertion of `key`; returns the generation its entry must keep.
    pub(crate) fn push(&mut self, key: K) -> u64 {
        self.generation += 1;
        self.order.push_back((key, self.generation));
        self.generation
    }

    /// The oldest key whose entry is still the one inserted then (`current` gives an entry's
    /// generation), taken off the order; `None` when none is left.
    pub(crate) fn pop_oldest(&mut self, current: impl Fn(&K) -> Option<u64>) -> Option<K> {
        while let Some((k, g)) = self.order.pop_front() {
            if current(&k) == Some(g) {
                return Some(k);
            }
        }
        None
    }

    /// Drops the places of replaced or removed entries once they outnumber the live ones, so
    /// the order cannot grow without bound.
    pub(crate) fn compact(&mut self, live: usize, current: impl Fn(&K) -> Option<u64>) {
        if self.order.len() > 2 * live + 64 {
            self.order.retain(|(k, g)| current(k) == Some(*g));
        }
    }

    pub(crate) fn clear(&mut self) {
        self.order.clear();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }
}

/// The per-core caches' hasher: a request hashes its key once per lookup, and SipHash was most
/// of a lookup's cost. The keys are paths of files that opened beneath the root and (device,
/// inode) pairs, and the seed is random per process, so a client cannot choose colliding keys.
pub(crate) type Hasher = foldhash::fast::RandomState;

/// Small-file bodies of one core, evicted oldest-inserted first beyond a byte budget.
pub struct Cache {
    map: HashMap<(u64, u64), Entry, Hasher>,
    order: InsertionOrder<(u64, u64)>,
    bytes: u64,
    budget: u64,
}

impl Cache {
    /// An empty cache holding at most `budget` bytes of bodies.
    pub fn new(budget: u64) -> Self {
        Self { map: HashMap::default(), order: InsertionOrder::new(), bytes: 0, budget }
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
            let map = &self.map;
            match self.order.pop_oldest(|k| map.get(k).map(|e| e.generation)) {
                Some(k) => self.remove(&k),
                None => break,
            }
        }
        let generation = self.order.push(key);
        self.map.insert(key, Entry { generation, modified: meta.modified, len: meta.len, data });
        self.bytes += len;
        let map = &self.map;
        self.order.compact(map.len(), |k| map.get(k).map(|e| e.generation));
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
