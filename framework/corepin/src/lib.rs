//! corepin: write a network service once against [`Service`] and owned-buffer I/O, and run it
//! thread-per-core on any backend compiled in.
//!
//! This facade re-exports the runtime-agnostic core and adds one Cargo feature per backend
//! (all on by default). [`RuntimeKind`] picks the backend at run time; [`start`] monomorphises
//! the app for it; [`per_runtime_tests!`] instantiates generic test bodies once per backend.
//!
//! # The backend list
//! Every backend appears once, in [`__corepin_backends!`]: its `RuntimeKind` variant, CLI name,
//! Cargo feature, leaf crate, runtime type, and any extra test-only variants (Monoio's epoll
//! driver). `RuntimeKind`, the CLI's runtime names, [`start`], the re-exports and the per-backend
//! test modules all expand from that one table, with the `cfg(feature = ..)` checks evaluated
//! here in the facade (not in the crate that uses the test macro). Adding a backend is its leaf
//! crate, its line in the table, and its optional dependency and feature in Cargo.toml.

#![warn(missing_docs)]

pub use corepin_core::*;

/// TLS as a stream adapter (rustls): [`tls::TlsAcceptor`] for `TcpServer::with_acceptor`.
/// Compiled with the `tls` feature (on by default).
#[cfg(feature = "tls")]
pub use corepin_tls as tls;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use corepin_core::topology::Cpu;

/// The one list of backends. `__corepin_backends!({ args } callback)` calls
/// `callback! { { args } <table> }`; each table line is
/// `Variant "cli-name" "feature" gate_macro leaf_crate::Runtime [test_module: Runtime, ..]`, the
/// first test module being the backend itself and any further ones extra variants tested with the
/// same bodies.
#[doc(hidden)]
#[macro_export]
macro_rules! __corepin_backends {
    ({ $($args:tt)* } $($callback:tt)*) => {
        $($callback)*! { { $($args)* }
            Monoio     "monoio"      "monoio"      __corepin_if_monoio      corepin_monoio      [monoio: MonoioRuntime, monoio_epoll: MonoioEpollRuntime]
            Glommio    "glommio"     "glommio"     __corepin_if_glommio     corepin_glommio     [glommio: GlommioRuntime]
            TokioUring "tokio-uring" "tokio-uring" __corepin_if_tokio_uring corepin_tokio_uring [tokio_uring: TokioUringRuntime]
            Compio     "compio"      "compio"      __corepin_if_compio      corepin_compio      [compio: CompioRuntime]
        }
    };
}

/// Expands, from the table, the parts that live in this crate: the re-exports of each compiled
/// backend's runtime types, its gate macro (emits its input only when the backend is compiled
/// in, so that crates using [`per_runtime_tests!`] never evaluate a feature of their own), and
/// [`RuntimeKind`] with its names and dispatch.
macro_rules! backend_items {
    ({ $d:tt }
     $( $variant:ident $name:literal $feature:literal $gate:ident $krate:ident
        [ $first_mod:ident : $first_ty:ident $(, $mod:ident : $ty:ident)* ] )*) => {
        $(
            #[cfg(feature = $feature)]
            pub use $krate::{$first_ty $(, $ty)*};

            #[cfg(feature = $feature)]
            #[doc(hidden)]
            #[macro_export]
            macro_rules! $gate { ($d($d t:tt)*) => { $d($d t)* }; }

            #[cfg(not(feature = $feature))]
            #[doc(hidden)]
            #[macro_export]
            macro_rules! $gate { ($d($d t:tt)*) => {}; }
        )*

        /// A backend, chosen at run time among those compiled in.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum RuntimeKind {
            $(
                #[doc = concat!("The `", $name, "` backend (crate `", stringify!($krate), "`).")]
                $variant,
            )*
        }

        impl RuntimeKind {
            /// Every backend corepin knows, compiled in or not.
            pub const ALL: &'static [RuntimeKind] = &[$(RuntimeKind::$variant),*];

            /// Its name as `--runtime` spells it.
            pub fn name(self) -> &'static str {
                match self {
                    $(RuntimeKind::$variant => $name,)*
                }
            }

            /// Whether this build contains the backend.
            pub fn is_compiled(self) -> bool {
                match self {
                    $(RuntimeKind::$variant => cfg!(feature = $feature),)*
                }
            }

            /// The Cargo feature that compiles it in.
            pub fn feature(self) -> &'static str {
                match self {
                    $(RuntimeKind::$variant => $feature,)*
                }
            }
        }

        /// Starts `app` on every CPU of `cpus` with backend `kind`.
        pub fn start<A: App>(kind: RuntimeKind, cfg: &LaunchConfig, cpus: &[Cpu], app: Arc<A>) -> Result<Server, LaunchError> {
            match kind {
                $(
                    #[cfg(feature = $feature)]
                    RuntimeKind::$variant => Server::start::<$krate::$first_ty, A>(cfg, cpus, app),
                )*
                #[allow(unreachable_patterns)]
                other => Err(LaunchError::Setup(RuntimeChoiceError::not_compiled(other).to_string())),
            }
        }
    };
}

__corepin_backends!({ $ } backend_items);

impl RuntimeKind {
    /// The backends compiled into this build.
    pub fn compiled() -> Vec<RuntimeKind> {
        Self::ALL.iter().copied().filter(|k| k.is_compiled()).collect()
    }

    /// Every known name, for messages and help texts (`monoio, glommio, ...`).
    pub fn known_names() -> String {
        names(Self::ALL)
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
    #[error("unknown runtime {name:?} (known: {known})")]
    Unknown {
        /// What was asked for.
        name: String,
        /// Every known name.
        known: String,
    },
    /// Known but not in this build.
    #[error(
        "runtime {kind} is not compiled into this build (compiled: {compiled}); rebuild with `--features {feature}`"
    )]
    NotCompiled {
        /// The backend.
        kind: RuntimeKind,
        /// The backends this build has.
        compiled: String,
        /// The feature that would add it.
        feature: &'static str,
    },
}

impl RuntimeChoiceError {
    fn not_compiled(kind: RuntimeKind) -> Self {
        Self::NotCompiled { kind, compiled: names(&RuntimeKind::compiled()), feature: kind.feature() }
    }
}

impl FromStr for RuntimeKind {
    type Err = RuntimeChoiceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase().replace('_', "-");
        let kind = Self::ALL
            .iter()
            .copied()
            .find(|k| k.name() == wanted || k.name().replace('-', "") == wanted)
            .ok_or_else(|| RuntimeChoiceError::Unknown { name: wanted.clone(), known: Self::known_names() })?;
        if !kind.is_compiled() {
            return Err(RuntimeChoiceError::not_compiled(kind));
        }
        Ok(kind)
    }
}

/// Instantiates generic test bodies once per compiled backend: each listed `name` (a function
/// `fn name<R: Runtime>()` in the calling module) becomes `#[test] fn name()` in a module per
/// backend variant (`monoio`, `monoio_epoll`, `glommio`, `tokio_uring`, ...), from the backend
/// table. Which backends are compiled is decided by this crate's features, so the calling crate
/// needs no backend features of its own.
#[macro_export]
macro_rules! per_runtime_tests {
    ($($name:ident),* $(,)?) => {
        $crate::__corepin_backends!({ $($name),* } $crate::__corepin_test_modules);
    };
}

/// The expansion behind [`per_runtime_tests!`]: one gated group per backend.
#[doc(hidden)]
#[macro_export]
macro_rules! __corepin_test_modules {
    ($names:tt
     $( $variant:ident $cli:literal $feature:literal $gate:ident $krate:ident
        [ $( $mod:ident : $ty:ident ),+ ] )*) => {
        $( $crate::$gate! { $( $crate::__corepin_test_module! { $names $mod $ty } )+ } )*
    };
}

/// One test module: every named body instantiated with runtime `$ty`.
#[doc(hidden)]
#[macro_export]
macro_rules! __corepin_test_module {
    ({ $($name:ident),* } $mod:ident $ty:ident) => {
        mod $mod { $( #[test] fn $name() { super::$name::<$crate::$ty>() } )* }
    };
}

#[cfg(doctest)]
#[doc = include_str!("../../../docs/writing-services.md")]
pub struct WritingServicesGuide;
