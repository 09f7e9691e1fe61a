//! The TLS front end (corepin-tls's server session over rustls) fed arbitrary client bytes in
//! pieces of every size: it ends each input in a clean failure or a wait for more bytes, never
//! a panic, and never completes a handshake from bytes no client key produced.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    assert!(!corepin_tls::fuzzing::serve_bytes(data), "a handshake completed from fuzzer bytes");
});
