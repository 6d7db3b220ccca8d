//! The `https` check: the `http` request over TLS (rustls with the `ring` provider).
//!
//! With `tls_verify = false` (the default) any certificate is accepted, but the handshake's
//! signatures are still checked, so the backend must hold the key of the certificate it sends.
//! With `tls_verify = true` the chain is verified against `ca_file` (PEM), else the webpki
//! roots, for the name `sni` or, without it, the backend's IP address. SNI is sent only when
//! `sni` is given (an IP address cannot be a server name).

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::check::{Failed, describe, host_of, http_exchange, io_failure};
use crate::config::Health;

pub(super) async fn https_check(addr: SocketAddr, spec: &Health) -> Result<String, Failed> {
    let config = client_config(spec).await?;
    let name = match &spec.sni {
        Some(sni) => ServerName::try_from(sni.clone())
            .map_err(|_| Failed::lbd(format!("sni {sni:?} is not a DNS name")))?,
        None => ServerName::IpAddress(addr.ip().into()),
    };
    let tcp = TcpStream::connect(addr).await.map_err(io_failure)?;
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(tls_failure)?;
    let host = spec.sni.clone().unwrap_or_else(|| host_of(addr.ip()));
    let status = http_exchange(&mut tls, &host, &spec.path).await?;
    let detail = format!("HTTPS {status}");
    if status == spec.expect {
        Ok(detail)
    } else {
        Err(Failed::backend(detail))
    }
}

/// A TLS handshake error: "TLS: invalid peer certificate: UnknownIssuer", or the socket's.
fn tls_failure(e: std::io::Error) -> Failed {
    let tls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .map(|t| t.to_string());
    match tls {
        Some(t) => Failed::backend(format!("TLS: {t}")),
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Failed::backend("TLS: connection closed during the handshake")
        }
        None if e.kind() == std::io::ErrorKind::InvalidData => {
            Failed::backend(format!("TLS: {}", describe(e)))
        }
        None => io_failure(e),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The client configuration of one check (a `ca_file` is read each time, so a renewed one is
/// followed).
async fn client_config(spec: &Health) -> Result<ClientConfig, Failed> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| Failed::lbd(format!("TLS setup: {e}")))?;
    let config = if spec.tls_verify {
        let mut roots = RootCertStore::empty();
        match &spec.ca_file {
            Some(path) => {
                let pem = tokio::fs::read(path).await.map_err(|e| {
                    Failed::lbd(format!("ca_file {}: {}", path.display(), describe(e)))
                })?;
                let mut found = 0;
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert =
                        cert.map_err(|e| Failed::lbd(format!("ca_file {}: {e}", path.display())))?;
                    roots
                        .add(cert)
                        .map_err(|e| Failed::lbd(format!("ca_file {}: {e}", path.display())))?;
                    found += 1;
                }
                if found == 0 {
                    return Err(Failed::lbd(format!(
                        "ca_file {} holds no PEM certificate",
                        path.display()
                    )));
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth()
    };
    Ok(config)
}

/// `tls_verify = false`: any certificate chain and name is accepted; the handshake signatures
/// are verified as usual.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
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
