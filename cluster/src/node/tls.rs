//! TLS between nodes: every node holds a certificate signed by the cluster's CA, presents it
//! both as a server and as a client, and accepts only peers whose certificate that CA signed
//! (mutual TLS, on top of the cookie). A plaintext node cannot open a session with a TLS node:
//! its handshake is refused before ractor's authentication starts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::ClusterError;

/// The files of a node's TLS identity (`--tls-cert`, `--tls-key`, `--tls-ca`).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The node's certificate chain, PEM.
    pub cert: PathBuf,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The cluster CA's certificate(s), PEM: the only signer a peer's certificate may have.
    pub ca: PathBuf,
}

/// What a node needs to accept and to open TLS sessions.
#[derive(Clone)]
pub(crate) struct Tls {
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) connector: TlsConnector,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

fn bad(path: &Path, what: &str, e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Tls(format!("{} ({what}): {e}", path.display()))
}

impl Tls {
    pub(crate) fn load(files: &TlsFiles) -> Result<Self, ClusterError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
            .map_err(|e| bad(&files.cert, "--tls-cert", e))?
            .collect::<Result<_, _>>()
            .map_err(|e| bad(&files.cert, "--tls-cert", e))?;
        if chain.is_empty() {
            return Err(bad(&files.cert, "--tls-cert", "no certificate in the file"));
        }
        let key = PrivateKeyDer::from_pem_file(&files.key)
            .map_err(|e| bad(&files.key, "--tls-key", e))?;
        let mut roots = RootCertStore::empty();
        let cas =
            CertificateDer::pem_file_iter(&files.ca).map_err(|e| bad(&files.ca, "--tls-ca", e))?;
        for ca in cas {
            let ca = ca.map_err(|e| bad(&files.ca, "--tls-ca", e))?;
            roots.add(ca).map_err(|e| bad(&files.ca, "--tls-ca", e))?;
        }
        if roots.is_empty() {
            return Err(bad(&files.ca, "--tls-ca", "no certificate in the file"));
        }
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder(roots.clone())
            .build()
            .map_err(|e| bad(&files.ca, "--tls-ca", e))?;
        let server = ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| bad(&files.key, "--tls-key does not match --tls-cert", e))?;
        let client = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| bad(&files.key, "--tls-key does not match --tls-cert", e))?;
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        })
    }
}

/// The name a seed's certificate must carry: its IP address, or its host name.
pub(crate) fn server_name(seed: &str) -> Result<ServerName<'static>, String> {
    let host = match seed.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => seed,
    };
    ServerName::try_from(host.to_owned()).map_err(|e| format!("{host:?} is not a server name: {e}"))
}
