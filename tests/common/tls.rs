//! TLS test helpers: certificates made at test time with rcgen, and an HTTPS client
//! (tokio-rustls + hyper) that reports the certificate it saw and whether the session
//! was resumed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, HandshakeKind, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::client::Error;

/// A certificate and key written as PEM files.
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The certificate, DER, to compare with what a client saw.
    pub der: Vec<u8>,
}

/// Writes `<name>.crt` and `<name>.key` in `dir`: a self-signed certificate for
/// `localhost` whose subject is `CN=<name>`, valid from `days_from` to `days_to` days
/// from now.
pub fn make_cert(dir: &Path, name: &str, days_from: i64, days_to: i64) -> CertFiles {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + time::Duration::days(days_from);
    params.not_after = now + time::Duration::days(days_to);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let files = CertFiles {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
        der: cert.der().to_vec(),
    };
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    files
}

/// A valid certificate for the next 90 days.
pub fn good_cert(dir: &Path, name: &str) -> CertFiles {
    make_cert(dir, name, -1, 90)
}

/// A `listen` table for a TLS listener on 127.0.0.1:0 with `files`.
pub fn listen_entry(files: &CertFiles) -> String {
    format!(
        "{{ addr = \"127.0.0.1:0\", tls_cert = {:?}, tls_key = {:?} }}",
        files.cert, files.key
    )
}

/// A client configuration that trusts any certificate (tests check which one they got)
/// and keeps sessions for resumption across connections.
pub fn client_config(alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// What one HTTPS request saw.
#[derive(Debug, Clone)]
pub struct TlsResp {
    pub status: u16,
    pub body: Bytes,
    pub version: http::Version,
    /// The server's leaf certificate.
    pub cert: Vec<u8>,
    /// The handshake resumed an earlier session.
    pub resumed: bool,
}

impl TlsResp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One request on a new TLS connection: HTTP/2 if ALPN chose `h2`, else HTTP/1.1.
pub fn get(addr: SocketAddr, config: &Arc<ClientConfig>, path: &str) -> Result<TlsResp, Error> {
    runtime().block_on(get_async(addr, config.clone(), path))
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub async fn get_async(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    path: &str,
) -> Result<TlsResp, Error> {
    let tcp = TcpStream::connect(addr).await?;
    let tls = TlsConnector::from(config)
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let (_, conn) = tls.get_ref();
    let cert = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    let resumed = conn.handshake_kind() == Some(HandshakeKind::Resumed);
    let h2 = conn.alpn_protocol() == Some(b"h2");
    let req = http::Request::builder()
        .uri(format!("https://localhost{path}"))
        .header(http::header::HOST, "localhost")
        .body(Full::new(Bytes::new()))?;
    let io = TokioIo::new(tls);
    let resp = if h2 {
        let (mut sender, conn) = http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        sender.send_request(req).await?
    } else {
        let (mut sender, conn) = http1::handshake(io).await?;
        tokio::spawn(conn);
        sender.send_request(req).await?
    };
    let status = resp.status().as_u16();
    let version = resp.version();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(TlsResp {
        status,
        body,
        version,
        cert,
        resumed,
    })
}

/// The address of the TLS listener a gem logged (`listening on https://ADDR`).
pub fn https_addr(gem: &super::Gem) -> SocketAddr {
    let line = gem.wait_log("listening on https://");
    let rest = line.split("https://").nth(1).unwrap();
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

/// Trusts any server certificate, but checks the handshake's signatures.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
