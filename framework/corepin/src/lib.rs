//! corepin: write a network service once against [`Service`] and owned-buffer I/O, and run it
//! thread-per-core on Monoio, Glommio or tokio-uring.
//!
//! This facade re-exports the runtime-agnostic core and adds one Cargo feature per backend
//! (`monoio`, `glommio`, `tokio-uring`; all on by default). [`RuntimeKind`] picks the backend at
//! run time; [`start`] monomorphises the app for it.

pub use corepin_core::*;

#[cfg(feature = "glommio")]
pub use corepin_glommio::GlommioRuntime;
#[cfg(feature = "monoio")]
pub use corepin_monoio::{MonoioEpollRuntime, MonoioRuntime};
#[cfg(feature = "tokio-uring")]
pub use corepin_tokio_uring::TokioUringRuntime;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use corepin_core::topology::Cpu;

/// A backend, chosen at run time among those compiled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuntimeKind {
    /// Monoio (io_uring, epoll fallback).
    Monoio,
    /// Glommio (io_uring only).
    Glommio,
    /// tokio-uring (io_uring only).
    TokioUring,
}

impl RuntimeKind {
    /// Every backend corepin knows.
    pub const ALL: [RuntimeKind; 3] = [RuntimeKind::Monoio, RuntimeKind::Glommio, RuntimeKind::TokioUring];

    /// Its name as the CLI spells it.
    pub fn name(self) -> &'static str {
        match self {
            RuntimeKind::Monoio => "monoio",
            RuntimeKind::Glommio => "glommio",
            RuntimeKind::TokioUring => "tokio-uring",
        }
    }

    /// Whether this build contains the backend.
    pub fn is_compiled(self) -> bool {
        match self {
            RuntimeKind::Monoio => cfg!(feature = "monoio"),
            RuntimeKind::Glommio => cfg!(feature = "glommio"),
            RuntimeKind::TokioUring => cfg!(feature = "tokio-uring"),
        }
    }

    /// The backends compiled into this build.
    pub fn compiled() -> Vec<RuntimeKind> {
        Self::ALL.into_iter().filter(|k| k.is_compiled()).collect()
    }
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn names(kinds: &[RuntimeKind]) -> String {
    kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
}

/// A runtime name that is unknown or not compiled in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeChoiceError {
    /// No such backend.
    #[error("unknown runtime {0:?} (known: monoio, glommio, tokio-uring)")]
    Unknown(String),
    /// Known but not in this build.
    #[error("runtime {0} is not compiled into this build (compiled: {1}); rebuild with `--features {0}`")]
    NotCompiled(RuntimeKind, String),
}

impl FromStr for RuntimeKind {
    type Err = RuntimeChoiceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let kind = match s.trim().to_ascii_lowercase().as_str() {
            "monoio" => RuntimeKind::Monoio,
            "glommio" => RuntimeKind::Glommio,
            "tokio-uring" | "tokio_uring" | "tokiouring" => RuntimeKind::TokioUring,
            other => return Err(RuntimeChoiceError::Unknown(other.to_string())),
        };
        if !kind.is_compiled() {
            return Err(RuntimeChoiceError::NotCompiled(kind, names(&Self::compiled())));
        }
        Ok(kind)
    }
}

/// Starts `app` on every CPU of `cpus` with backend `kind`.
pub fn start<A: App>(kind: RuntimeKind, cfg: &LaunchConfig, cpus: &[Cpu], app: Arc<A>) -> Result<Server, LaunchError> {
    match kind {
        #[cfg(feature = "monoio")]
        RuntimeKind::Monoio => Server::start::<MonoioRuntime, A>(cfg, cpus, app),
        #[cfg(feature = "glommio")]
        RuntimeKind::Glommio => Server::start::<GlommioRuntime, A>(cfg, cpus, app),
        #[cfg(feature = "tokio-uring")]
        RuntimeKind::TokioUring => Server::start::<TokioUringRuntime, A>(cfg, cpus, app),
        #[allow(unreachable_patterns)]
        other => {
            Err(LaunchError::Setup(RuntimeChoiceError::NotCompiled(other, names(&RuntimeKind::compiled())).to_string()))
        }
    }
}

/// Instantiates generic test bodies once per compiled backend: each listed `name` (a
/// function `fn name<R: Runtime>()` in the calling module) becomes `#[test] fn name()` in a
/// module per backend (`monoio`, `monoio_epoll`, `glommio`, `tokio_uring`). The backend
/// features are those of the calling crate.
#[macro_export]
macro_rules! per_runtime_tests {
    ($($name:ident),* $(,)?) => {
        #[cfg(feature = "monoio")]
        mod monoio { $( #[test] fn $name() { super::$name::<$crate::MonoioRuntime>() } )* }
        #[cfg(feature = "monoio")]
        mod monoio_epoll { $( #[test] fn $name() { super::$name::<$crate::MonoioEpollRuntime>() } )* }
        #[cfg(feature = "glommio")]
        mod glommio { $( #[test] fn $name() { super::$name::<$crate::GlommioRuntime>() } )* }
        #[cfg(feature = "tokio-uring")]
        mod tokio_uring { $( #[test] fn $name() { super::$name::<$crate::TokioUringRuntime>() } )* }
    };
}
