//! The per-sandbox certificate authority (rcgen): generated on the host when the proxy is
//! built, its certificate exported as PEM for the guest's trust store, its key never leaving
//! the host. It issues (and caches) one leaf certificate per intercepted host, and builds the
//! rustls configurations of both interception sides.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Leaf certificates kept per CA at most (one per intercepted host name).
const MAX_LEAVES: usize = 1024;

/// Errors of the CA and the TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// rcgen failed to generate a key or a certificate.
    #[error("generating the sandbox CA or a leaf certificate")]
    Rcgen(#[source] rcgen::Error),
    /// rustls refused a configuration.
    #[error("building a TLS configuration")]
    Rustls(#[source] rustls::Error),
    /// The PEM given as upstream roots has no usable certificate.
    #[error("upstream root PEM: {0}")]
    Roots(String),
}

/// The sandbox CA.
pub struct SandboxCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    leaves: Mutex<HashMap<String, Arc<ServerConfig>>>,
}

impl std::fmt::Debug for SandboxCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxCa").finish_non_exhaustive()
    }
}

impl SandboxCa {
    /// Generates a new CA (ECDSA P-256) named after `label` (e.g. the sandbox id).
    pub fn generate(label: &str) -> Result<Self, CaError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("Kiln sandbox egress CA {label}"),
        );
        dn.push(DnType::OrganizationName, "Kiln");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().map_err(CaError::Rcgen)?;
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(CaError::Rcgen)?;
        Ok(Self {
            issuer,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate, PEM (what the guest trusts).
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// The rustls server configuration presenting a leaf for `host` (issued once, cached).
    /// Only HTTP/1.1 is offered through ALPN.
    pub fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, CaError> {
        let mut leaves = self.leaves.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = leaves.get(host) {
            return Ok(c.clone());
        }
        let mut params = CertificateParams::new(vec![host.to_string()]).map_err(CaError::Rcgen)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().map_err(CaError::Rcgen)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(CaError::Rcgen)?;
        let chain = vec![cert.der().clone(), self.issuer.der().clone()];
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(CaError::Rustls)?
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .map_err(CaError::Rustls)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        if leaves.len() >= MAX_LEAVES {
            leaves.clear();
        }
        leaves.insert(host.to_string(), config.clone());
        Ok(config)
    }
}

/// The crypto provider every rustls configuration here uses (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Where upstream (real server) certificates are verified against.
#[derive(Debug, Clone, Default)]
pub enum UpstreamRoots {
    /// The host's trust store (rustls-native-certs).
    #[default]
    Native,
    /// Exactly the certificates of this PEM (tests: a test CA).
    Pem(String),
}

/// Builds the upstream client configuration: certificates verified against `roots`, ALPN
/// HTTP/1.1.
pub fn client_config(roots: &UpstreamRoots) -> Result<Arc<ClientConfig>, CaError> {
    let mut store = RootCertStore::empty();
    match roots {
        UpstreamRoots::Native => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // A certificate the store cannot parse is skipped, as browsers do.
                let _ = store.add(cert);
            }
        }
        UpstreamRoots::Pem(pem) => {
            for cert in pem_certs(pem)? {
                store
                    .add(cert)
                    .map_err(|e| CaError::Roots(format!("certificate rejected: {e}")))?;
            }
        }
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(CaError::Rustls)?
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The certificates of a PEM text.
pub fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| CaError::Roots(format!("bad PEM: {e:?}")))?;
    if certs.is_empty() {
        return Err(CaError::Roots("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// PEM-encodes one DER certificate.
pub fn der_to_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// The CA bundle the guest uses as its whole trust store (`SSL_CERT_FILE`, ...): the host's
/// roots (so end-to-end TLS to other hosts still verifies) followed by the sandbox CA.
pub fn guest_ca_bundle(ca: &SandboxCa) -> String {
    let mut out = String::new();
    for cert in rustls_native_certs::load_native_certs().certs {
        out.push_str(&der_to_pem(&cert));
    }
    out.push_str(&ca.cert_pem());
    out
}
