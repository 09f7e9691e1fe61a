//! io_uring pieces shared by the backends on io-uring 0.6 (Monoio and tokio-uring), kept
//! outside the runtime-agnostic core so that the core's public API names no engine's types:
//! * [`builder`]: ring setup for the engines that take an `io_uring::Builder` from corepin
//!   (backends on another io-uring version write their own two lines);
//! * [`aux`]: the auxiliary ring, corepin's own per-core ring beside the engine's, for the
//!   operations the engine lacks (provided-buffer receives behind `read_pooled`).

#![warn(missing_docs)]

pub mod aux;

use corepin_core::runtime::RingFlags;

/// An `io_uring::Builder` with the setup flags of `flags`.
pub fn builder(flags: &RingFlags) -> io_uring::Builder {
    let mut b = io_uring::IoUring::builder();
    if flags.single_issuer {
        b.setup_single_issuer();
    }
    if flags.defer_taskrun {
        b.setup_defer_taskrun();
    }
    if flags.coop_taskrun {
        b.setup_coop_taskrun();
    }
    if let Some(ms) = flags.sqpoll_idle_ms {
        b.setup_sqpoll(ms);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builder_carries_the_flags_to_the_kernel() {
        let flags = RingFlags { single_issuer: true, ..RingFlags::NONE };
        let Ok(ring) = builder(&flags).build(8) else {
            println!("skipped: io_uring is unavailable here");
            return;
        };
        let got = ring.params();
        assert!(got.is_setup_single_issuer());
        assert!(!got.is_setup_sqpoll());
        let sq = builder(&RingFlags { sqpoll_idle_ms: Some(10), ..RingFlags::NONE }).build(8);
        if let Ok(sq) = sq {
            assert!(sq.params().is_setup_sqpoll());
        }
    }
}
