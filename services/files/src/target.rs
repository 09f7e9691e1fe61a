//! From a request-target to a path relative to the served root, decoded exactly once.
//!
//! The rules are strict on purpose: anything that could name something outside the root, or
//! that means different things to different decoders, is refused before the file system is
//! touched. The kernel then confines the open as well (`RESOLVE_BENEATH`, see `fsroot`), so a
//! mistake here still cannot escape the root.

use std::fmt;

/// Why a request-target was refused (each is a 400 Bad Request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetError {
    /// Not origin-form (`/path`) or absolute-form (`http://host/path`).
    NotAPath,
    /// A `%` not followed by two hex digits.
    BadPercent,
    /// `%2f` or `%5c`: an encoded separator, which decoders disagree about.
    EncodedSeparator,
    /// A NUL byte, raw or encoded.
    Nul,
    /// A backslash, raw or encoded.
    Backslash,
    /// A `..` segment (raw or encoded).
    DotDot,
    /// The decoded path is not valid UTF-8 (this includes overlong encodings such as
    /// `%c0%ae`).
    NotUtf8,
    /// A control character in the decoded path.
    Control,
}

impl fmt::Display for TargetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TargetError::NotAPath => "the request-target is not a path",
            TargetError::BadPercent => "bad percent-encoding",
            TargetError::EncodedSeparator => "encoded path separator",
            TargetError::Nul => "NUL byte in path",
            TargetError::Backslash => "backslash in path",
            TargetError::DotDot => "'..' segment in path",
            TargetError::NotUtf8 => "path is not valid UTF-8",
            TargetError::Control => "control character in path",
        })
    }
}

/// A request path that is safe to resolve beneath the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafePath {
    /// The decoded segments joined by `/` (`.` when there are none), in one allocation. No
    /// segment is empty, `.` or `..`, or contains `/`, `\` or NUL, so splitting at `/` gives
    /// the segments back.
    rel: String,
    /// The request path ended with `/` (a directory was asked for).
    pub trailing_slash: bool,
}

impl SafePath {
    /// The path relative to the root (`.` for the root itself).
    pub fn relative(&self) -> &str {
        &self.rel
    }

    /// The decoded segments, in order (none for the root).
    pub fn segments(&self) -> impl DoubleEndedIterator<Item = &str> + '_ {
        let rel = if self.is_root() { "" } else { self.rel.as_str() };
        rel.split('/').filter(|s| !s.is_empty())
    }

    /// Whether this is the root itself.
    pub fn is_root(&self) -> bool {
        self.rel == "."
    }

    /// The decoded path as the client sees it, starting with `/`.
    pub fn display(&self) -> String {
        let mut s = String::with_capacity(self.rel.len() + 2);
        for seg in self.segments() {
            s.push('/');
            s.push_str(seg);
        }
        if self.is_root() || self.trailing_slash {
            s.push('/');
        }
        s
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The path part of a request-target (query removed), for origin-form and absolute-form.
fn path_part(target: &[u8]) -> Result<&[u8], TargetError> {
    let path = if target.first() == Some(&b'/') {
        target
    } else {
        // absolute-form: scheme "://" authority path (RFC 9112 §3.2.2).
        let lower: Vec<u8> = target.iter().take(8).map(u8::to_ascii_lowercase).collect();
        let rest = if lower.starts_with(b"http://") {
            &target[7..]
        } else if lower.starts_with(b"https://") {
            &target[8..]
        } else {
            return Err(TargetError::NotAPath);
        };
        match rest.iter().position(|&b| b == b'/' || b == b'?') {
            Some(i) if rest[i] == b'/' => &rest[i..],
            _ => b"/",
        }
    };
    let end = path.iter().position(|&b| b == b'?' || b == b'#').unwrap_or(path.len());
    Ok(&path[..end])
}

/// Decodes and checks a request-target.
pub fn parse_target(target: &[u8]) -> Result<SafePath, TargetError> {
    let raw = path_part(target)?;
    let trailing_slash = raw.last() == Some(&b'/');
    // Each segment is decoded onto the end of `rel`, checked there, and taken back if it is
    // `.`: one buffer for the whole path, never longer than the raw path.
    let mut rel: Vec<u8> = Vec::with_capacity(raw.len());
    for seg in raw.split(|&b| b == b'/') {
        if seg.is_empty() {
            continue; // "//" collapses, as in most servers
        }
        let start = if rel.is_empty() { 0 } else { rel.len() + 1 };
        if start > 0 {
            rel.push(b'/');
        }
        let mut i = 0;
        while i < seg.len() {
            let b = seg[i];
            if b == b'%' {
                let (Some(h), Some(l)) = (seg.get(i + 1).copied().and_then(hex), seg.get(i + 2).copied().and_then(hex))
                else {
                    return Err(TargetError::BadPercent);
                };
                let d = h << 4 | l;
                match d {
                    b'/' => return Err(TargetError::EncodedSeparator),
                    b'\\' => return Err(TargetError::Backslash),
                    0 => return Err(TargetError::Nul),
                    _ => rel.push(d),
                }
                i += 3;
            } else {
                match b {
                    b'\\' => return Err(TargetError::Backslash),
                    0 => return Err(TargetError::Nul),
                    _ => rel.push(b),
                }
                i += 1;
            }
        }
        // Decoded once: a `%25` stays a literal `%` and is never decoded again.
        let s = std::str::from_utf8(&rel[start..]).map_err(|_| TargetError::NotUtf8)?;
        if s.chars().any(char::is_control) {
            return Err(TargetError::Control);
        }
        match s {
            "." => rel.truncate(start.saturating_sub(1)),
            ".." => return Err(TargetError::DotDot),
            _ => {}
        }
    }
    if rel.is_empty() {
        rel.push(b'.');
    }
    // Every segment was checked to be UTF-8, and `/` joins them.
    let rel = String::from_utf8(rel).map_err(|_| TargetError::NotUtf8)?;
    Ok(SafePath { rel, trailing_slash })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(t: &str) -> String {
        parse_target(t.as_bytes()).unwrap().relative().to_string()
    }
    fn err(t: &[u8]) -> TargetError {
        parse_target(t).unwrap_err()
    }

    #[test]
    fn decodes_once() {
        assert_eq!(ok("/"), ".");
        assert_eq!(ok("/a/b.txt"), "a/b.txt");
        assert_eq!(ok("/a%20b"), "a b");
        assert_eq!(ok("/100%25"), "100%");
        assert_eq!(ok("/%2541"), "%41");
        assert_eq!(ok("/a//b/./c?x=../../etc"), "a/b/c");
        assert_eq!(ok("/caf%C3%A9"), "café");
        assert_eq!(ok("http://example.com/x/y?q"), "x/y");
        assert_eq!(ok("HTTP://example.com"), ".");
        assert!(parse_target(b"/dir/").unwrap().trailing_slash);
    }

    #[test]
    fn refuses_escapes() {
        assert_eq!(err(b"/../etc/passwd"), TargetError::DotDot);
        assert_eq!(err(b"/a/%2e%2e/b"), TargetError::DotDot);
        assert_eq!(err(b"/a/.%2E"), TargetError::DotDot);
        assert_eq!(err(b"/a%2fb"), TargetError::EncodedSeparator);
        assert_eq!(err(b"/a%2Fb"), TargetError::EncodedSeparator);
        assert_eq!(err(b"/a\\..\\b"), TargetError::Backslash);
        assert_eq!(err(b"/a%5cb"), TargetError::Backslash);
        assert_eq!(err(b"/a%00b"), TargetError::Nul);
        assert_eq!(err(b"/a\0b"), TargetError::Nul);
        assert_eq!(err(b"/%c0%ae%c0%ae/x"), TargetError::NotUtf8);
        assert_eq!(err(b"/%e0%80%ae"), TargetError::NotUtf8);
        assert_eq!(err(b"/%ff"), TargetError::NotUtf8);
        assert_eq!(err(b"/%zz"), TargetError::BadPercent);
        assert_eq!(err(b"/%4"), TargetError::BadPercent);
        assert_eq!(err(b"etc/passwd"), TargetError::NotAPath);
        assert_eq!(err(b"*"), TargetError::NotAPath);
        assert_eq!(err(b"/a%0ab"), TargetError::Control);
    }

    #[test]
    fn never_panics_on_any_bytes() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let alphabet = b"/%.\\?#0aF2eEc5\0\xff\xc0";
        for _ in 0..20_000 {
            let n = rng.gen_range(0..24);
            let t: Vec<u8> = (0..n).map(|_| alphabet[rng.gen_range(0..alphabet.len())]).collect();
            if let Ok(p) = parse_target(&t) {
                let segments: Vec<&str> = p.segments().collect();
                for s in &segments {
                    assert!(!s.is_empty() && *s != "." && *s != ".." && !s.contains(['/', '\\', '\0']), "{t:?}");
                }
                // The relative path is exactly the segments, joined.
                let joined = if segments.is_empty() { ".".to_string() } else { segments.join("/") };
                assert_eq!(p.relative(), joined, "{t:?}");
            }
        }
    }
}
