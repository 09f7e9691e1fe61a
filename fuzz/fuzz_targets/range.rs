//! The Range header resolver: every range it grants lies inside the representation, is
//! non-empty, and a multi-range answer has at most MAX_RANGES ranges that do not overlap.
#![no_main]

use corepin_files::range::{resolve, RangeAnswer, MAX_RANGES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (len, value) = data.split_at(8);
    // Lengths near the extremes and small ones both matter.
    let raw = u64::from_le_bytes(len.try_into().unwrap());
    for len in [raw, raw % 4096, 0] {
        match resolve(value, len) {
            RangeAnswer::Whole | RangeAnswer::Unsatisfiable => {}
            RangeAnswer::One(r) => {
                assert!(r.first <= r.last && r.last < len, "{r:?} of {len}");
            }
            RangeAnswer::Many(rs) => {
                assert!(rs.len() >= 2 && rs.len() <= MAX_RANGES, "{} ranges", rs.len());
                for r in &rs {
                    assert!(r.first <= r.last && r.last < len, "{r:?} of {len}");
                }
                let mut sorted = rs.clone();
                sorted.sort_by_key(|r| r.first);
                for w in sorted.windows(2) {
                    assert!(w[0].last < w[1].first, "overlapping {:?} and {:?}", w[0], w[1]);
                }
            }
        }
    }
});
