//! The request-target decoder: whatever it accepts is a path beneath the root (no empty,
//! `.` or `..` segment, no separator, backslash, NUL or control character inside a segment),
//! and decoding is not applied twice (the displayed path, decoded again, is the same path).
#![no_main]

use corepin_files::target::parse_target;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = parse_target(data) else { return };
    for seg in &path.segments {
        assert!(!seg.is_empty() && seg != "." && seg != "..", "segment {seg:?}");
        assert!(!seg.contains(['/', '\\', '\0']), "segment {seg:?}");
        assert!(!seg.chars().any(char::is_control), "segment {seg:?}");
    }
    let rel = path.relative();
    assert!(!rel.starts_with('/'), "relative path {rel:?}");
    // The decoded form, sent as a request-target again, names the same path: nothing in it
    // decodes a second time into something else.
    let display = path.display();
    if !display.contains(['%', '?', '#']) {
        let again = parse_target(display.as_bytes()).expect("a decoded path parses again");
        assert_eq!(again.segments, path.segments);
    }
});
