//! Inputs the `tls_front` fuzz target (fuzz/) found, kept as regression tests: each must end
//! in a clean failure, not a panic.

/// A ClientHello whose handshake message spans records, followed by bytes that fail it: the
/// alert was then encoded by asking rustls to go on with an empty input buffer while it still
/// held progress into the real one, and rustls panicked slicing past the end.
#[test]
fn an_alert_after_a_partial_handshake_message_does_not_panic() {
    let input = include_bytes!("data/alert-after-partial-handshake-message.bin");
    assert!(!corepin_tls::fuzzing::serve_bytes(input), "no handshake completes from these bytes");
}
