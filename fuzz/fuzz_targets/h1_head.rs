//! The HTTP/1.1 request-head parser on arbitrary bytes: it never panics, never claims more
//! bytes than it was given, and its verdict on a complete head does not depend on what
//! follows the head (a pipelined next request, or garbage).
#![no_main]

use corepin_files::http::{parse, Limits, Parsed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Small limits too, so the limit checks themselves are reached.
    for limits in [Limits::default(), Limits { max_request_line: 64, max_head: 256, max_headers: 4, max_discard_body: 16 }]
    {
        match parse(data, &limits) {
            Parsed::Complete(head, n) => {
                assert!(n <= data.len(), "claimed {n} of {} bytes", data.len());
                let skip = data.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
                assert!(n - skip <= limits.max_head, "a head of {} bytes passed a limit of {}", n - skip, limits.max_head);
                assert!(head.minor <= 1);
                assert!(!head.method.is_empty());
                // The same head, cut right after it, parses the same way.
                match parse(&data[..n], &limits) {
                    Parsed::Complete(again, m) => {
                        assert_eq!(m, n);
                        assert_eq!(again.method, head.method);
                        assert_eq!(again.target, head.target);
                        assert_eq!(again.keep_alive, head.keep_alive);
                        assert_eq!(again.body_len, head.body_len);
                        assert_eq!(again.range, head.range);
                    }
                    other => panic!("the head alone parsed as {other:?}"),
                }
            }
            Parsed::Rejected(r) => assert!((400..=505).contains(&r.status), "status {}", r.status),
            Parsed::Partial => {}
        }
    }
});
