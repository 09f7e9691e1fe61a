//! Certificates: loading a PEM chain and key, a self-signed certificate for localhost, and
//! the swappable current certificate every core's handshakes read.
//!
//! Owns the certificate and key the server presents. [`CertStore`] is the `ResolvesServerCert`
//! of the one `ServerConfig` all cores share; [`CertStore::reload`] (from any thread, e.g.
//! the signal thread on SIGHUP) swaps in a new certificate for new handshakes on every core
//! at once, without a lock on the handshake path and without touching open connections. A
//! file that does not load leaves the current certificate in place.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use base64::Engine as _;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate or key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read or holds malformed PEM.
    #[error("{what} {path}: {source}")]
    Pem {
        /// "certificate" or "private key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: rustls_pki_types::pem::Error,
    },
    /// The certificate file holds no certificate.
    #[error("certificate {0}: no CERTIFICATE block found")]
    NoCertificate(PathBuf),
    /// The key file holds no private key (PKCS#8, PKCS#1 RSA or SEC1 EC).
    #[error("private key {0}: no PRIVATE KEY block found (PKCS#8, RSA or EC)")]
    NoKey(PathBuf),
    /// The key is of a kind the crypto provider cannot sign with, or does not belong to the
    /// certificate.
    #[error("private key {path}: {source}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// rustls's reason.
        source: rustls::Error,
    },
    /// Generating the self-signed certificate failed.
    #[error("generating a self-signed certificate: {0}")]
    SelfSigned(#[from] rcgen::Error),
    /// A self-signed store has no files to reload.
    #[error("the certificate is self-signed and was not loaded from files; there is nothing to reload")]
    NothingToReload,
}

/// The SHA-256 of a certificate's SubjectPublicKeyInfo, base64 (the form Chromium's
/// `--ignore-certificate-errors-spki-list` and HPKP pins take).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpkiFingerprint(pub String);

impl fmt::Display for SpkiFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl SpkiFingerprint {
    /// The fingerprint of a DER SubjectPublicKeyInfo.
    pub fn of_spki(spki: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, spki);
        Self(base64::engine::general_purpose::STANDARD.encode(digest.as_ref()))
    }
}

/// A certificate chain and its key, checked and ready to serve.
#[derive(Debug, Clone)]
pub struct LoadedCert {
    /// What rustls presents.
    pub key: Arc<CertifiedKey>,
    /// Its SPKI fingerprint, when the key can tell its public key (RSA and ECDSA keys can).
    pub fingerprint: Option<SpkiFingerprint>,
    /// When the chain stops being valid: the earliest `notAfter` of its certificates (an
    /// expired intermediate fails clients as surely as an expired leaf). `None` when no
    /// certificate of the chain parses as X.509 (rustls does not need to parse them).
    pub expiry: Option<Expiry>,
}

/// The end of a chain's validity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiry {
    /// Unix time, in seconds, of the earliest `notAfter`.
    pub unix: i64,
    /// The same instant as RFC 2822 text, for logs.
    pub text: String,
}

impl Expiry {
    /// The earliest `notAfter` among the certificates of `chain` that parse.
    pub fn of_chain(chain: &[CertificateDer<'_>]) -> Option<Self> {
        chain
            .iter()
            .filter_map(|der| x509_parser::parse_x509_certificate(der.as_ref()).ok())
            .map(|(_, cert)| cert.validity().not_after)
            .min_by_key(|t| t.timestamp())
            .map(|t| Self { unix: t.timestamp(), text: t.to_rfc2822().unwrap_or_else(|_| t.to_string()) })
    }

    /// Whole days from now until the expiry (negative once expired).
    pub fn days_left(&self) -> i64 {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        (self.unix - now).div_euclid(86_400)
    }
}

impl fmt::Display for Expiry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = self.days_left();
        let unit = |n: i64| if n == 1 { "day" } else { "days" };
        if days < 0 {
            write!(f, "{} (EXPIRED {} {} ago)", self.text, -days, unit(-days))
        } else {
            write!(f, "{} (in {days} {})", self.text, unit(days))
        }
    }
}

impl LoadedCert {
    /// Loads a PEM certificate chain (end entity first) and a PEM private key (PKCS#8,
    /// PKCS#1 RSA or SEC1 EC), and checks that the key belongs to the certificate.
    pub fn from_pem_files(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<Self, CertError> {
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|source| CertError::Pem { what: "certificate", path: cert.to_path_buf(), source })?;
        if chain.is_empty() {
            return Err(CertError::NoCertificate(cert.to_path_buf()));
        }
        let key_der = match PrivateKeyDer::from_pem_file(key) {
            Ok(k) => k,
            Err(rustls_pki_types::pem::Error::NoItemsFound) => return Err(CertError::NoKey(key.to_path_buf())),
            Err(source) => return Err(CertError::Pem { what: "private key", path: key.to_path_buf(), source }),
        };
        Self::from_der(chain, key_der, provider).map_err(|source| CertError::Key { path: key.to_path_buf(), source })
    }

    /// Loads PEM text (a chain and a key), as [`from_pem_files`](Self::from_pem_files) does.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8], provider: &CryptoProvider) -> Result<Self, CertError> {
        let here = PathBuf::from("<memory>");
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| CertError::Pem { what: "certificate", path: here.clone(), source })?;
        if chain.is_empty() {
            return Err(CertError::NoCertificate(here));
        }
        let key_der = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| match source {
            rustls_pki_types::pem::Error::NoItemsFound => CertError::NoKey(here.clone()),
            source => CertError::Pem { what: "private key", path: here.clone(), source },
        })?;
        Self::from_der(chain, key_der, provider).map_err(|source| CertError::Key { path: here, source })
    }

    fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        provider: &CryptoProvider,
    ) -> Result<Self, rustls::Error> {
        // from_der parses the key with the provider and compares its public key with the
        // certificate's: a key that belongs to another certificate is refused here.
        let expiry = Expiry::of_chain(&chain);
        let ck = CertifiedKey::from_der(chain, key, provider)?;
        let fingerprint = ck.key.public_key().map(|spki| SpkiFingerprint::of_spki(spki.as_ref()));
        Ok(Self { key: Arc::new(ck), fingerprint, expiry })
    }
}

/// A self-signed certificate, as PEM, for clients to trust (`curl --cacert`).
#[derive(Debug, Clone)]
pub struct SelfSigned {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM (PKCS#8).
    pub key_pem: String,
    /// The SPKI fingerprint.
    pub fingerprint: SpkiFingerprint,
}

/// Generates a self-signed certificate (ECDSA P-256) for `names` (DNS names or IP
/// addresses), e.g. `["localhost", "127.0.0.1", "::1"]`.
pub fn self_signed(names: &[&str]) -> Result<SelfSigned, CertError> {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let rcgen::CertifiedKey { cert, key_pair } = rcgen::generate_simple_self_signed(names)?;
    Ok(SelfSigned {
        cert_pem: cert.pem(),
        key_pem: key_pair.serialize_pem(),
        fingerprint: SpkiFingerprint::of_spki(&key_pair.public_key_der()),
    })
}

/// The certificate every core's handshakes present, swappable from any thread.
pub struct CertStore {
    current: ArcSwap<LoadedCert>,
    files: Option<(PathBuf, PathBuf)>,
    provider: Arc<CryptoProvider>,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("files", &self.files)
            .field("fingerprint", &self.current.load().fingerprint)
            .finish_non_exhaustive()
    }
}

impl CertStore {
    /// Serves the chain in `cert` with the key in `key`; [`reload`](Self::reload) reads both
    /// files again.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, CertError> {
        let provider = Arc::new(crate::provider());
        let loaded = LoadedCert::from_pem_files(cert, key, &provider)?;
        Ok(Self::with(loaded, Some((cert.to_path_buf(), key.to_path_buf())), provider))
    }

    /// Serves a self-signed certificate for `names`; returns it too (PEM and fingerprint).
    pub fn self_signed(names: &[&str]) -> Result<(Self, SelfSigned), CertError> {
        let provider = Arc::new(crate::provider());
        let made = self_signed(names)?;
        let loaded = LoadedCert::from_pem(made.cert_pem.as_bytes(), made.key_pem.as_bytes(), &provider)?;
        Ok((Self::with(loaded, None, provider), made))
    }

    fn with(loaded: LoadedCert, files: Option<(PathBuf, PathBuf)>, provider: Arc<CryptoProvider>) -> Self {
        Self {
            current: ArcSwap::from_pointee(loaded),
            files,
            provider,
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
        }
    }

    /// The certificate new handshakes get.
    pub fn current(&self) -> Arc<LoadedCert> {
        self.current.load_full()
    }

    /// The files this store was loaded from, if any.
    pub fn files(&self) -> Option<(&Path, &Path)> {
        self.files.as_ref().map(|(c, k)| (c.as_path(), k.as_path()))
    }

    /// Reads the certificate and key files again and, if they load and match, serves them to
    /// every new handshake from now on (open connections keep theirs). On any error the
    /// current certificate stays. Returns the new certificate.
    pub fn reload(&self) -> Result<Arc<LoadedCert>, CertError> {
        let result = match &self.files {
            Some((cert, key)) => LoadedCert::from_pem_files(cert, key, &self.provider),
            None => Err(CertError::NothingToReload),
        };
        match result {
            Ok(loaded) => {
                let loaded = Arc::new(loaded);
                self.current.store(Arc::clone(&loaded));
                self.reloads.fetch_add(1, Ordering::Relaxed);
                Ok(loaded)
            }
            Err(e) => {
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Replaces the certificate with `loaded` (for callers that load it themselves).
    pub fn replace(&self, loaded: LoadedCert) {
        self.current.store(Arc::new(loaded));
        self.reloads.fetch_add(1, Ordering::Relaxed);
    }

    /// Successful reloads so far.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Reloads that failed (and kept the old certificate).
    pub fn reload_failures(&self) -> u64 {
        self.reload_failures.load(Ordering::Relaxed)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.load().key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_is_the_base64_sha256_of_the_spki() {
        let made = self_signed(&["localhost"]).unwrap();
        let loaded =
            LoadedCert::from_pem(made.cert_pem.as_bytes(), made.key_pem.as_bytes(), &crate::provider()).unwrap();
        assert_eq!(loaded.fingerprint.as_ref(), Some(&made.fingerprint));
        assert_eq!(made.fingerprint.0.len(), 44, "32 bytes in base64 with padding: {}", made.fingerprint);
        assert_eq!(SpkiFingerprint::of_spki(b"").0, "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=");
    }

    #[test]
    fn the_expiry_is_the_earliest_not_after_of_the_chain() {
        use rcgen::{date_time_ymd, BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.not_after = date_time_ymd(2029, 2, 3);
        let ca = ca.self_signed(&ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        leaf.not_after = date_time_ymd(2031, 5, 17);
        let leaf = leaf.signed_by(&leaf_key, &ca, &ca_key).unwrap();
        // 2031-05-17T00:00:00Z and 2029-02-03T00:00:00Z.
        let alone = Expiry::of_chain(&[leaf.der().clone()]).unwrap();
        assert_eq!(alone.unix, 1_936_742_400, "{alone:?}");
        let pem = format!("{}{}", leaf.pem(), ca.pem());
        let loaded =
            LoadedCert::from_pem(pem.as_bytes(), leaf_key.serialize_pem().as_bytes(), &crate::provider()).unwrap();
        let chain = loaded.expiry.expect("the chain parses");
        assert_eq!(chain.unix, 1_864_771_200, "the CA expires first: {chain:?}");
        assert!(chain.text.contains("2029"), "{}", chain.text);
        assert!(chain.to_string().contains("EXPIRED") == (chain.days_left() < 0), "{chain}");
        assert_eq!(Expiry::of_chain(&[CertificateDer::from(vec![1u8, 2, 3])]), None, "not X.509: no expiry");
    }

    #[test]
    fn bad_pem_is_a_typed_error_not_a_panic() {
        let p = crate::provider();
        let a = self_signed(&["localhost"]).unwrap();
        let b = self_signed(&["localhost"]).unwrap();
        let err = LoadedCert::from_pem(a.cert_pem.as_bytes(), b.key_pem.as_bytes(), &p).unwrap_err();
        assert!(matches!(err, CertError::Key { .. }), "a key from another certificate: {err}");
        let err = LoadedCert::from_pem(b"", a.key_pem.as_bytes(), &p).unwrap_err();
        assert!(matches!(err, CertError::NoCertificate(_)), "{err}");
        let err = LoadedCert::from_pem(a.cert_pem.as_bytes(), a.cert_pem.as_bytes(), &p).unwrap_err();
        assert!(matches!(err, CertError::NoKey(_)), "{err}");
        let err =
            CertStore::from_pem_files(Path::new("/nonexistent/c.pem"), Path::new("/nonexistent/k.pem")).unwrap_err();
        assert!(err.to_string().starts_with("certificate /nonexistent/c.pem: "), "{err}");
        let (store, _) = CertStore::self_signed(&["localhost"]).unwrap();
        assert!(matches!(store.reload(), Err(CertError::NothingToReload)));
        assert_eq!(store.reload_failures(), 1);
    }
}
