//! TLS listeners: a listener's certificate and key read and checked (every generation
//! reads them afresh, so a restart rotates them), what the certificate says for
//! `gem status` and `gem check`, and the session-ticket key ring that outlives a
//! restart without ever touching the disk.
//!
//! The crypto provider is rustls's `aws-lc-rs`: its X25519 and P-256 have assembly
//! for current x86_64 and aarch64 CPUs, where `ring`'s X25519 is portable C (about 40 %
//! of gem's CPU under a handshake load). The session tickets are sealed with its AEAD
//! too, so one crypto library is built.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::aead::{self, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::hmac;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use rustls::ServerConfig;
use rustls::pki_types::pem::{self, PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::ProducesTickets;
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsFiles;

/// Fewer days than this left on a certificate is worth a warning at start.
pub const EXPIRY_WARNING_DAYS: i64 = 14;

/// How long one session-ticket key is used to issue tickets. A ticket stays valid for
/// this long and at most twice this long: the previous key is still accepted.
pub const TICKET_PERIOD: Duration = Duration::from_secs(6 * 3600);

/// A TLS listener's certificate or key that cannot be used; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file cannot be read.
    #[error("cannot read the {what} {}: {source}", path.display())]
    Read {
        /// `TLS certificate` or `TLS key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file was read but holds no usable certificate or key.
    #[error("the {what} {} {reason}", path.display())]
    Invalid {
        /// `TLS certificate` or `TLS key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The key is not the certificate's.
    #[error("the TLS key {} does not match the certificate {}: {reason}", key.display(), cert.display())]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls's word for it.
        reason: String,
    },
    /// The certificate is not valid now.
    #[error("the TLS certificate {} {when}", path.display())]
    NotValidNow {
        /// The certificate file.
        path: PathBuf,
        /// `expired on DATE` or `is not valid before DATE`.
        when: String,
    },
}

const CERT: &str = "TLS certificate";
const KEY: &str = "TLS key";

/// What a listener's certificate says, for `gem status` and `gem check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertInfo {
    /// The certificate file.
    pub cert: PathBuf,
    /// The leaf certificate's subject, e.g. `CN=example.com`.
    pub subject: String,
    /// Its DNS names (subject alternative names).
    pub dns_names: Vec<String>,
    /// When it expires, RFC 3339 (UTC).
    pub not_after: String,
    /// Whole days left until then.
    pub days_left: i64,
    /// `not_after` in seconds since the Unix epoch, to count the days anew.
    #[serde(skip)]
    pub(crate) not_after_unix: i64,
}

/// `listeners` with the days left counted as of now.
pub(crate) fn refreshed(
    listeners: &[crate::control::ListenerTls],
) -> Vec<crate::control::ListenerTls> {
    let now = unix_now();
    listeners
        .iter()
        .cloned()
        .map(|mut l| {
            if l.cert.not_after_unix != 0 {
                l.cert.days_left = (l.cert.not_after_unix - now).div_euclid(86_400);
            }
            l
        })
        .collect()
}

impl CertInfo {
    /// One line: `subject CN=a (DNS a, b), not after 2027-01-01T00:00:00Z (30 days left)`.
    pub fn line(&self) -> String {
        format!(
            "subject {} (DNS {}), not after {} ({} days left)",
            self.subject,
            if self.dns_names.is_empty() {
                "-".to_owned()
            } else {
                self.dns_names.join(", ")
            },
            self.not_after,
            self.days_left
        )
    }
}

/// A TLS listener's rustls setup and what its certificate says.
#[derive(Clone)]
pub(crate) struct TlsSetup {
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) info: CertInfo,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// Reads and checks `files` (the certificate is valid now, the key is the
/// certificate's): what `gem check` runs, and every generation before it serves.
pub fn check(files: &TlsFiles) -> Result<CertInfo, TlsError> {
    load_certified(files).map(|(_, info)| info)
}

/// Checks every TLS listener of `listen`: what a supervisor does before it starts a
/// worker, and `gem check`.
pub(crate) fn check_listeners(
    listen: &[crate::config::ListenAddr],
) -> Result<Vec<crate::control::ListenerTls>, crate::Error> {
    listen
        .iter()
        .filter_map(|l| l.tls.as_ref().map(|files| (l, files)))
        .map(|(l, files)| {
            check(files)
                .map(|cert| crate::control::ListenerTls {
                    listen: l.spec.clone(),
                    cert,
                })
                .map_err(|source| crate::Error::Tls {
                    addr: l.spec.clone(),
                    source,
                })
        })
        .collect()
}

/// Reads and checks `files` and builds the listener's rustls setup: ALPN `h2` and
/// `http/1.1`, tickets from this process's key ring.
pub(crate) fn load(files: &TlsFiles) -> Result<TlsSetup, TlsError> {
    let (certified, info) = load_certified(files)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid {
            what: CERT,
            path: files.cert.clone(),
            reason: e.to_string(),
        })?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // The server's order (AES-128-GCM first) rather than the client's: see `provider`.
    config.ignore_client_order = true;
    config.ticketer = ticket_keys();
    // One TLS 1.3 ticket per handshake, not rustls's two: each is sealed and sent on
    // every handshake (one gave about 3 % more handshakes per second), and a client
    // resumes with one (one that opens two connections at once resumes only one).
    config.send_tls13_tickets = 1;
    Ok(TlsSetup {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        info,
    })
}

/// rustls's `aws-lc-rs` provider with the AES-128-GCM suites first. Most clients (OpenSSL
/// among them) list AES-256-GCM with SHA-384 first; SHA-256 has instructions of its own
/// on current x86 CPUs (SHA-NI) and SHA-384 has none, so a handshake's key schedule
/// costs less with it, and AES-128 encrypts faster, for the same practical security.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| !format!("{:?}", s.suite()).contains("AES_128_GCM"));
    Arc::new(provider)
}

fn load_certified(files: &TlsFiles) -> Result<(CertifiedKey, CertInfo), TlsError> {
    let chain = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let info = describe(&files.cert, &chain[0])?;
    let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key).map_err(|e| {
        TlsError::Invalid {
            what: KEY,
            path: files.key.clone(),
            reason: format!("holds a key rustls cannot use: {e}"),
        }
    })?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|e| TlsError::Mismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
        reason: e.to_string(),
    })?;
    Ok((certified, info))
}

/// Every PEM section of `path`, with a reason that names the file when there is none.
fn sections(what: &'static str, path: &Path) -> Result<Vec<(SectionKind, Vec<u8>)>, TlsError> {
    let invalid = |reason: String| TlsError::Invalid {
        what,
        path: path.to_owned(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(invalid("is empty".into()));
    }
    let sections = <(SectionKind, Vec<u8>)>::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| match e {
            pem::Error::MissingSectionEnd { end_marker } => invalid(format!(
                "is truncated: no `{}` line",
                String::from_utf8_lossy(&end_marker)
            )),
            other => invalid(format!("is not valid PEM: {other}")),
        })?;
    if sections.is_empty() {
        return Err(invalid("holds no PEM section (`-----BEGIN ...`)".into()));
    }
    Ok(sections)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain: Vec<_> = sections(CERT, path)?
        .into_iter()
        .filter(|(kind, _)| *kind == SectionKind::Certificate)
        .map(|(_, der)| CertificateDer::from(der))
        .collect();
    if chain.is_empty() {
        return Err(TlsError::Invalid {
            what: CERT,
            path: path.to_owned(),
            reason: "holds no certificate (`-----BEGIN CERTIFICATE-----`)".into(),
        });
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let sections = sections(KEY, path)?;
    let holds_cert = sections
        .iter()
        .any(|(kind, _)| *kind == SectionKind::Certificate);
    let key = sections
        .into_iter()
        .find_map(|(kind, der)| PrivateKeyDer::from_pem(kind, der));
    key.ok_or_else(|| TlsError::Invalid {
        what: KEY,
        path: path.to_owned(),
        reason: if holds_cert {
            "holds a certificate, not a private key (is it the `tls_cert` file?)".into()
        } else {
            "holds no private key (PKCS#8, PKCS#1 or SEC1 PEM)".into()
        },
    })
}

/// The leaf's subject, names and validity; a certificate not valid now is an error.
fn describe(path: &Path, leaf: &CertificateDer<'_>) -> Result<CertInfo, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| TlsError::Invalid {
        what: CERT,
        path: path.to_owned(),
        reason: format!("holds a certificate that cannot be parsed: {e}"),
    })?;
    let now = unix_now();
    let validity = cert.validity();
    let (not_before, not_after) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    let not_valid = |when: String| TlsError::NotValidNow {
        path: path.to_owned(),
        when,
    };
    if now > not_after {
        return Err(not_valid(format!("expired on {}", rfc3339(not_after))));
    }
    if now < not_before {
        return Err(not_valid(format!(
            "is not valid before {}",
            rfc3339(not_before)
        )));
    }
    let dns_names = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok(CertInfo {
        cert: path.to_owned(),
        subject: cert.subject().to_string(),
        dns_names,
        not_after: rfc3339(not_after),
        days_left: (not_after - now).div_euclid(86_400),
        not_after_unix: not_after,
    })
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn rfc3339(unix: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap_or(0));
    humantime::format_rfc3339_seconds(at).to_string()
}

/// This process's session-ticket key ring: the one handed over by the process that
/// started this one, else a fresh random one.
pub(crate) fn ticket_keys() -> Arc<TicketKeys> {
    TICKET_KEYS
        .get_or_init(|| Arc::new(TicketKeys::random()))
        .clone()
}

static TICKET_KEYS: OnceLock<Arc<TicketKeys>> = OnceLock::new();

/// Adopts the key ring a parent or supervisor handed over (its [`TicketKeys::export`]).
/// Returns `false` (and keeps nothing) if the bytes are not a key ring, or a ring is
/// already in use.
pub(crate) fn adopt_ticket_keys(bytes: &[u8]) -> bool {
    match TicketKeys::import(bytes) {
        Some(keys) => TICKET_KEYS.set(Arc::new(keys)).is_ok(),
        None => false,
    }
}

/// This process's ticket key ring in a sealed memfd, for a child (or for this process
/// re-executed): a copy in memory that nothing can change once made.
pub(crate) fn sealed_ticket_keys() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::io::Write as _;
    let memfd = memfd::MemfdOptions::new()
        .allow_sealing(true)
        .close_on_exec(true)
        .create("gem-tls-tickets")
        .map_err(std::io::Error::other)?;
    memfd.as_file().write_all(&ticket_keys().export())?;
    memfd
        .add_seals(&crate::plugin::SEALS)
        .map_err(std::io::Error::other)?;
    Ok(memfd.into_file().into())
}

/// Session-ticket keys that rotate every [`TICKET_PERIOD`] and can be handed to the
/// next generation (rustls's own ticketer cannot export its keys).
///
/// The ring is a ratchet: the secret of period `n + 1` is HMAC-SHA256 of period `n`'s
/// secret, so a process that holds the oldest secret still accepted (the previous
/// period's) derives the current one, and every process given the same secret rotates
/// in step without talking to the others (a supervisor and its workers). Older secrets
/// cannot be derived back, so a leaked ring opens no ticket older than the previous
/// period. Tickets are sealed with ChaCha20-Poly1305 under a key derived from the
/// period's secret, and carry their period number.
pub(crate) struct TicketKeys {
    ring: Mutex<Ring>,
    rng: SystemRandom,
}

/// The previous period's secret, and the AEAD keys of it and of the current period.
struct Ring {
    /// The previous period's number.
    index: u64,
    secret: [u8; 32],
    previous: LessSafeKey,
    current: LessSafeKey,
}

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketKeys").finish_non_exhaustive()
    }
}

/// What an exported ring starts with (and its format's version).
const EXPORT_MAGIC: &[u8; 8] = b"gemtkt1\n";
const EXPORT_LEN: usize = 8 + 8 + 32;
/// A ticket: period number, nonce, then the sealed state and its tag.
const TICKET_HEADER: usize = 8 + aead::NONCE_LEN;

fn period_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / TICKET_PERIOD.as_secs())
}

fn ratchet(secret: &[u8; 32]) -> [u8; 32] {
    derive(secret, b"gem ticket ratchet")
}

fn derive(secret: &[u8; 32], label: &[u8]) -> [u8; 32] {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), label);
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

fn aead_key(secret: &[u8; 32]) -> LessSafeKey {
    let key = derive(secret, b"gem ticket aead");
    // A 32-byte key is exactly what ChaCha20-Poly1305 takes.
    #[allow(clippy::expect_used)]
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &key).expect("a 32-byte key"))
}

impl Ring {
    fn new(index: u64, secret: [u8; 32]) -> Ring {
        Ring {
            index,
            previous: aead_key(&secret),
            current: aead_key(&ratchet(&secret)),
            secret,
        }
    }

    /// Rotates to the period `now` (never back: a clock set back keeps the keys).
    fn advance(&mut self, now: u64) {
        let behind = now.saturating_sub(1).saturating_sub(self.index);
        if behind == 0 {
            return;
        }
        let mut secret = self.secret;
        // Far behind (a suspended machine): the ring is ratcheted all the way, one HMAC
        // per period; a day is 4 periods.
        for _ in 0..behind.min(1 << 20) {
            secret = ratchet(&secret);
        }
        *self = Ring::new(now - 1, secret);
    }
}

impl TicketKeys {
    fn random() -> TicketKeys {
        let mut secret = [0u8; 32];
        let rng = SystemRandom::new();
        // The system's random source failing is beyond recovery; tickets sealed with a
        // zero key would still be authenticated, just not secret, so make it loud.
        if rng.fill(&mut secret).is_err() {
            tracing::error!("no random bytes for the TLS ticket keys: tickets are not secret");
        }
        TicketKeys {
            ring: Mutex::new(Ring::new(period_now().saturating_sub(1), secret)),
            rng,
        }
    }

    fn import(bytes: &[u8]) -> Option<TicketKeys> {
        if bytes.len() != EXPORT_LEN || !bytes.starts_with(EXPORT_MAGIC) {
            return None;
        }
        let index = u64::from_be_bytes(bytes[8..16].try_into().ok()?);
        let secret: [u8; 32] = bytes[16..].try_into().ok()?;
        Some(TicketKeys {
            ring: Mutex::new(Ring::new(index, secret)),
            rng: SystemRandom::new(),
        })
    }

    /// The ring as bytes, for the next generation: the previous period's number and
    /// secret (the current one derives from it). Secret: hand it over in memory only.
    pub(crate) fn export(&self) -> Vec<u8> {
        let mut ring = self.lock();
        ring.advance(period_now());
        let mut out = Vec::with_capacity(EXPORT_LEN);
        out.extend_from_slice(EXPORT_MAGIC);
        out.extend_from_slice(&ring.index.to_be_bytes());
        out.extend_from_slice(&ring.secret);
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn seal(&self, now: u64, plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; aead::NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut ring = self.lock();
        ring.advance(now);
        let period = (ring.index + 1).to_be_bytes();
        let mut out = Vec::with_capacity(TICKET_HEADER + plain.len() + aead::MAX_TAG_LEN);
        out.extend_from_slice(&period);
        out.extend_from_slice(&nonce);
        let mut sealed = plain.to_vec();
        ring.current
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(period),
                &mut sealed,
            )
            .ok()?;
        out.extend_from_slice(&sealed);
        Some(out)
    }

    fn open(&self, now: u64, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() < TICKET_HEADER + aead::MAX_TAG_LEN {
            return None;
        }
        let period: [u8; 8] = ticket[..8].try_into().ok()?;
        let nonce = Nonce::try_assume_unique_for_key(&ticket[8..TICKET_HEADER]).ok()?;
        let mut ring = self.lock();
        ring.advance(now);
        let n = u64::from_be_bytes(period);
        let key = if n == ring.index + 1 {
            &ring.current
        } else if n == ring.index {
            &ring.previous
        } else {
            return None;
        };
        let mut buf = ticket[TICKET_HEADER..].to_vec();
        let plain = key.open_in_place(nonce, Aad::from(period), &mut buf).ok()?;
        Some(plain.to_vec())
    }
}

impl ProducesTickets for TicketKeys {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        u32::try_from(TICKET_PERIOD.as_secs()).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal(period_now(), plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open(period_now(), cipher)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_opens_in_its_period_and_the_next_only() {
        let keys = TicketKeys::random();
        let now = period_now();
        let ticket = keys.seal(now, b"state").unwrap();
        assert_eq!(keys.open(now, &ticket).unwrap(), b"state");
        assert_eq!(
            keys.open(now + 1, &ticket).unwrap(),
            b"state",
            "previous key"
        );
        assert!(
            keys.open(now + 2, &ticket).is_none(),
            "two periods on: gone"
        );
    }

    #[test]
    fn an_exported_ring_opens_the_tickets_and_rotates_in_step() {
        let keys = TicketKeys::random();
        let now = period_now();
        let ticket = keys.seal(now, b"state").unwrap();
        let other = TicketKeys::import(&keys.export()).unwrap();
        assert_eq!(other.open(now, &ticket).unwrap(), b"state");
        // Both rotate on their own and still agree.
        let later = keys.seal(now + 3, b"later").unwrap();
        assert_eq!(other.open(now + 3, &later).unwrap(), b"later");
        assert!(TicketKeys::import(b"not a ring").is_none());
    }

    #[test]
    fn a_tampered_ticket_is_refused() {
        let keys = TicketKeys::random();
        let now = period_now();
        let mut ticket = keys.seal(now, b"state").unwrap();
        let last = ticket.len() - 1;
        ticket[last] ^= 1;
        assert!(keys.open(now, &ticket).is_none());
        assert!(keys.open(now, &ticket[..10]).is_none());
        let other = TicketKeys::random();
        assert!(other.open(now, &keys.seal(now, b"x").unwrap()).is_none());
    }
}
