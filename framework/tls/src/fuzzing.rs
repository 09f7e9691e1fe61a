//! The entry point of the `tls_front` fuzz target (fuzz/): the server side of the TLS front
//! end fed bytes as if a client sent them, through the same session code the sockets use. Not
//! part of corepin's API.

use std::sync::{Arc, OnceLock};

use rustls::server::{ServerConfig, UnbufferedServerConnection};

use crate::certs::CertStore;
use crate::session::{Goal, Reached, Session, IN_CAP};

fn config() -> Arc<ServerConfig> {
    static CONFIG: OnceLock<Arc<ServerConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let (certs, _) = CertStore::self_signed(&["localhost"]).expect("a self-signed certificate");
            let cfg =
                crate::server_config(Arc::new(certs), vec![b"http/1.1".to_vec()]).expect("a server configuration");
            Arc::new(cfg)
        })
        .clone()
}

/// Feeds `input` to a fresh server session: its first byte sets the size of the pieces the
/// rest arrives in (1 to 17,086 bytes, as reads of any size would deliver them), each piece
/// goes in as a socket read would put it, and the session runs the handshake, then reads, as
/// far as the bytes allow; what it would send is dropped. Returns whether the handshake
/// completed. Any input must end in a clean failure or a wait for more bytes, never a panic.
pub fn serve_bytes(input: &[u8]) -> bool {
    let Some((&first, mut rest)) = input.split_first() else { return false };
    let piece = 1 + usize::from(first) * 67;
    let conn = UnbufferedServerConnection::new(config()).expect("a connection from a valid configuration");
    let mut s = Session::new(conn);
    let mut rx = vec![0u8; IN_CAP];
    let mut handshaken = false;
    while !rest.is_empty() {
        // As `stream::receive` does around a socket read; Oversized closes the connection.
        let Ok((gen, leftover)) = s.stage_read(&mut rx) else { return handshaken };
        let n = piece.min(rest.len()).min(rx.len() - leftover);
        rx[leftover..leftover + n].copy_from_slice(&rest[..n]);
        rest = &rest[n..];
        if s.absorb(&mut rx, gen, leftover, n).is_err() {
            return handshaken;
        }
        loop {
            let mut sink = |plain: &[u8]| plain.len();
            let goal = if handshaken { Goal::Read(&mut sink) } else { Goal::Handshake };
            match s.drive(goal) {
                Ok(Reached::Handshaken) => {
                    handshaken = true;
                    drop_output(&mut s);
                }
                Ok(Reached::Transmit) => drop_output(&mut s),
                Ok(Reached::NeedInput) => {
                    drop_output(&mut s);
                    break;
                }
                Ok(Reached::PeerClosed) => return handshaken,
                Ok(other) => panic!("a read or handshake pass reached {other:?}"),
                Err(_) => {
                    s.encode_alert();
                    drop_output(&mut s);
                    return handshaken;
                }
            }
        }
    }
    handshaken
}

/// What `stream::flush` does after a successful socket write.
fn drop_output(s: &mut Session) {
    if let Some(out) = s.tls_out.take() {
        s.return_out(out);
    }
}
