//! `Range: bytes=...` (RFC 9110 §14.1-14.2) resolved against a representation's length.

/// One satisfiable byte range, inclusive `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub first: u64,
    /// Last byte (inclusive).
    pub last: u64,
}

impl ByteRange {
    /// Number of bytes.
    pub fn len(&self) -> u64 {
        self.last - self.first + 1
    }
    /// Never empty (kept for clippy's `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// What a Range header asks of a representation of a given length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeAnswer {
    /// No usable Range header (absent, another unit, or malformed): send the whole body (200).
    Whole,
    /// One range (206 with Content-Range).
    One(ByteRange),
    /// Several non-overlapping ranges in the order asked (206 multipart/byteranges).
    Many(Vec<ByteRange>),
    /// Every range lies beyond the end (416 with `Content-Range: bytes */LEN`).
    Unsatisfiable,
}

/// Ranges beyond this many are answered with the whole representation: a request for
/// thousands of tiny ranges would cost more to frame than to send.
pub const MAX_RANGES: usize = 16;

fn number(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Resolves a Range header value against a representation of `len` bytes.
pub fn resolve(value: &[u8], len: u64) -> RangeAnswer {
    let Ok(value) = std::str::from_utf8(value) else { return RangeAnswer::Whole };
    let value = value.trim();
    let Some((unit, set)) = value.split_once('=') else { return RangeAnswer::Whole };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return RangeAnswer::Whole;
    }
    let mut ranges = Vec::new();
    let mut any = false;
    for spec in set.split(',') {
        let spec = spec.trim();
        if spec.is_empty() {
            continue; // the list syntax allows empty elements
        }
        any = true;
        let Some((a, b)) = spec.split_once('-') else { return RangeAnswer::Whole };
        let (a, b) = (a.trim(), b.trim());
        let range = if a.is_empty() {
            // suffix: the last N bytes
            let Some(n) = number(b) else { return RangeAnswer::Whole };
            if n == 0 || len == 0 {
                None
            } else {
                Some(ByteRange { first: len.saturating_sub(n), last: len - 1 })
            }
        } else {
            let Some(first) = number(a) else { return RangeAnswer::Whole };
            let last = if b.is_empty() {
                None
            } else {
                match number(b) {
                    Some(l) if l >= first => Some(l),
                    _ => return RangeAnswer::Whole, // invalid: last < first
                }
            };
            if first >= len {
                None
            } else {
                Some(ByteRange { first, last: last.map_or(len - 1, |l| l.min(len - 1)) })
            }
        };
        if let Some(r) = range {
            ranges.push(r);
        }
    }
    if !any {
        return RangeAnswer::Whole;
    }
    match ranges.len() {
        0 => RangeAnswer::Unsatisfiable,
        1 => RangeAnswer::One(ranges[0]),
        n if n > MAX_RANGES => RangeAnswer::Whole,
        _ => {
            let mut sorted = ranges.clone();
            sorted.sort_by_key(|r| r.first);
            if sorted.windows(2).any(|w| w[1].first <= w[0].last) {
                // Overlapping ranges: a server may ignore the header (RFC 9110 §14.2).
                RangeAnswer::Whole
            } else {
                RangeAnswer::Many(ranges)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(first: u64, last: u64) -> ByteRange {
        ByteRange { first, last }
    }

    #[test]
    fn forms() {
        assert_eq!(resolve(b"bytes=0-99", 1000), RangeAnswer::One(r(0, 99)));
        assert_eq!(resolve(b"bytes=500-", 1000), RangeAnswer::One(r(500, 999)));
        assert_eq!(resolve(b"bytes=-100", 1000), RangeAnswer::One(r(900, 999)));
        assert_eq!(resolve(b"bytes=-5000", 1000), RangeAnswer::One(r(0, 999)));
        assert_eq!(resolve(b"bytes=900-5000", 1000), RangeAnswer::One(r(900, 999)));
        assert_eq!(resolve(b"Bytes = 1-2 , 5-6", 10), RangeAnswer::Many(vec![r(1, 2), r(5, 6)]));
        assert_eq!(resolve(b"bytes=5-6,1-2", 10), RangeAnswer::Many(vec![r(5, 6), r(1, 2)]));
    }

    #[test]
    fn unsatisfiable_and_ignored() {
        assert_eq!(resolve(b"bytes=1000-", 1000), RangeAnswer::Unsatisfiable);
        assert_eq!(resolve(b"bytes=-0", 1000), RangeAnswer::Unsatisfiable);
        assert_eq!(resolve(b"bytes=0-0", 0), RangeAnswer::Unsatisfiable);
        assert_eq!(resolve(b"bytes=-1", 0), RangeAnswer::Unsatisfiable);
        assert_eq!(resolve(b"bytes=2000-3000,1500-", 1000), RangeAnswer::Unsatisfiable);
        assert_eq!(resolve(b"bytes=2000-3000,5-", 1000), RangeAnswer::One(r(5, 999)));
        assert_eq!(resolve(b"items=0-1", 10), RangeAnswer::Whole);
        assert_eq!(resolve(b"bytes=5-1", 10), RangeAnswer::Whole);
        assert_eq!(resolve(b"bytes=x-1", 10), RangeAnswer::Whole);
        assert_eq!(resolve(b"bytes=", 10), RangeAnswer::Whole);
        assert_eq!(resolve(b"bytes=0-5,3-8", 10), RangeAnswer::Whole);
        assert_eq!(resolve(b"bytes=99999999999999999999-", 10), RangeAnswer::Whole);
        let many: Vec<String> = (0..17).map(|i| format!("{}-{}", i * 2, i * 2)).collect();
        assert_eq!(resolve(format!("bytes={}", many.join(",")).as_bytes(), 100), RangeAnswer::Whole);
    }
}
