//! TLS to PostgreSQL tenant databases (rustls): the `sslmode` a database server was
//! registered with (`SslMode`, as libpq's), the client configurations it needs (built
//! once per data plane: `TlsConfigs`), the stream a connection speaks over (`PgStream`,
//! plain TCP or TLS) and the SSLRequest that starts TLS, and the channel-binding data of
//! SCRAM-SHA-256-PLUS (`tls-server-end-point`, RFC 5929).

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConfig, WebPkiServerVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::error::PgError;
use crate::routing::SslMode;

/// The rustls client configurations of the data plane, one per kind of check, built once
/// from the trusted roots (the system's, plus `postgres_ssl_root_cert`).
pub(crate) struct TlsConfigs {
    unchecked: Arc<ClientConfig>,
    verify_ca: Arc<ClientConfig>,
    verify_full: Arc<ClientConfig>,
}

impl std::fmt::Debug for TlsConfigs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfigs").finish_non_exhaustive()
    }
}

/// rustls's *ring* provider, as sqlx's admin connection uses: aws-lc-rs (rustls's other
/// provider, with post-quantum key exchange) needs a C toolchain with CMake to build,
/// and PostgreSQL servers built on OpenSSL 3.0 (Debian 12, RHEL 9) offer no post-quantum
/// group to agree on anyway (docs/adr/0004).
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsConfigs {
    /// Trusts the system's root certificates and those of `root_cert` (a PEM file), if
    /// given. Fails with a message naming the file or the store.
    pub(crate) fn new(root_cert: Option<&Path>) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            // A system certificate rustls cannot use is skipped, as by every client.
            let _ = roots.add(cert);
        }
        if let Some(path) = root_cert {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|error| {
                    format!(
                        "cannot read postgres_ssl_root_cert {}: {error}",
                        path.display()
                    )
                })?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| {
                    format!(
                        "postgres_ssl_root_cert {} is not a PEM certificate file: {error}",
                        path.display()
                    )
                })?;
            if certs.is_empty() {
                return Err(format!(
                    "postgres_ssl_root_cert {} holds no certificate",
                    path.display()
                ));
            }
            for cert in certs {
                roots.add(cert).map_err(|error| {
                    format!(
                        "postgres_ssl_root_cert {} holds a certificate rustls cannot use: {error}",
                        path.display()
                    )
                })?;
            }
        }
        let roots = Arc::new(roots);
        let builder = || {
            ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|error| format!("cannot set up TLS: {error}"))
        };
        let webpki = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|error| format!("cannot set up TLS certificate checks: {error}"));
        let verify_full = match &webpki {
            Ok(verifier) => builder()?
                .with_webpki_verifier(verifier.clone())
                .with_no_client_auth(),
            // No trusted root at all: verify-ca and verify-full fail at connect time
            // with this reason.
            Err(reason) => builder()?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Refuse(reason.clone())))
                .with_no_client_auth(),
        };
        let verify_ca = builder()?
            .dangerous()
            .with_custom_certificate_verifier(match webpki {
                Ok(verifier) => Arc::new(AnyName(verifier)) as Arc<dyn ServerCertVerifier>,
                Err(reason) => Arc::new(Refuse(reason)),
            })
            .with_no_client_auth();
        let unchecked = builder()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unchecked(provider())))
            .with_no_client_auth();
        Ok(Self {
            unchecked: Arc::new(unchecked),
            verify_ca: Arc::new(verify_ca),
            verify_full: Arc::new(verify_full),
        })
    }

    fn for_mode(&self, mode: SslMode) -> Arc<ClientConfig> {
        match mode {
            SslMode::VerifyFull => self.verify_full.clone(),
            SslMode::VerifyCa => self.verify_ca.clone(),
            SslMode::Disable | SslMode::Prefer | SslMode::Require => self.unchecked.clone(),
        }
    }
}

/// verify-ca: the chain must lead to a trusted root; the name is not checked.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// prefer and require: any certificate (the handshake's signatures are still checked,
/// so the session is encrypted to whoever holds the certificate's key).
#[derive(Debug)]
struct Unchecked(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unchecked {
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

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// No trusted root could be loaded: every checked connection fails, saying why.
#[derive(Debug)]
struct Refuse(String);

impl ServerCertVerifier for Refuse {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Err(rustls::Error::General(self.0.clone()))
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(self.0.clone()))
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(self.0.clone()))
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What a connection speaks over.
pub(crate) enum PgStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl PgStream {
    /// Starts TLS as `mode` asks (an SSLRequest, then the handshake), or stays plain.
    pub(super) async fn open(
        mut tcp: TcpStream,
        host: &str,
        mode: SslMode,
        configs: &TlsConfigs,
    ) -> Result<Self, PgError> {
        if !mode.wants_tls() {
            return Ok(Self::Plain(tcp));
        }
        let mut request = bytes::BytesMut::with_capacity(8);
        postgres_protocol::message::frontend::ssl_request(&mut request);
        tcp.write_all(&request).await.map_err(PgError::Io)?;
        let answer = tcp.read_u8().await.map_err(PgError::Io)?;
        match answer {
            b'S' => {}
            b'N' if !mode.needs_tls() => return Ok(Self::Plain(tcp)),
            b'N' => {
                return Err(PgError::Tls(format!(
                    "the server does not accept TLS connections, and sslmode={} demands TLS",
                    mode.as_str()
                )));
            }
            _ => {
                return Err(PgError::Protocol(
                    "the server answered the TLS request with neither yes nor no".to_owned(),
                ));
            }
        }
        let name = ServerName::try_from(host.to_owned()).map_err(|_| {
            PgError::Tls(format!(
                "{host:?} is not a host name or address TLS can check a certificate against"
            ))
        })?;
        let connector = tokio_rustls::TlsConnector::from(configs.for_mode(mode));
        let tls = connector.connect(name, tcp).await.map_err(|error| {
            PgError::Tls(format!(
                "the TLS handshake with the server failed (sslmode={}): {error}",
                mode.as_str()
            ))
        })?;
        Ok(Self::Tls(Box::new(tls)))
    }

    pub(super) fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(tcp) => tcp,
            Self::Tls(tls) => tls.get_ref().0,
        }
    }

    pub(super) fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }

    /// The `tls-server-end-point` channel-binding data (RFC 5929): the hash of the
    /// server's certificate, by the hash of its signature algorithm (SHA-256 for MD5 and
    /// SHA-1). None on plain TCP or for an algorithm this client does not know.
    pub(super) fn server_end_point(&self) -> Option<Vec<u8>> {
        let Self::Tls(tls) = self else {
            return None;
        };
        let certificate = tls.get_ref().1.peer_certificates()?.first()?;
        let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref()).ok()?;
        let algorithm = parsed.signature_algorithm.algorithm.to_id_string();
        let der = certificate.as_ref();
        Some(match algorithm.as_str() {
            // sha384WithRSAEncryption, ecdsa-with-SHA384
            "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => sha2::Sha384::digest(der).to_vec(),
            // sha512WithRSAEncryption, ecdsa-with-SHA512
            "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => sha2::Sha512::digest(der).to_vec(),
            // sha256 (RSA, ECDSA), and MD5 and SHA-1 (which RFC 5929 maps to SHA-256).
            "1.2.840.113549.1.1.11"
            | "1.2.840.10045.4.3.2"
            | "1.2.840.113549.1.1.4"
            | "1.2.840.113549.1.1.5"
            | "1.2.840.10045.4.1" => sha2::Sha256::digest(der).to_vec(),
            // Ed25519 and others: no hash defined; the server binds none either.
            _ => return None,
        })
    }
}

impl AsyncRead for PgStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PgStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}
