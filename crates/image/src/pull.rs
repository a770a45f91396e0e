//! `kiln image pull REF`: fetch an image from an OCI / Docker registry v2 with oci-client
//! (on a small current-thread tokio runtime), verify every blob, apply its layers and store
//! it by manifest digest.

use std::fs::File;
use std::io::Write;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};

use crate::meta::{ImageFormat, ImageSource};
use crate::oci::{self, Document, LayerFile, MAX_DOCUMENT, MAX_LAYER};
use crate::progress::Event;
use crate::store::{digest_key, hex, Image, ImageStore, Made};
use crate::{ImageError, Result};

/// Registry credentials.
#[derive(Clone, Default)]
pub enum Auth {
    #[default]
    Anonymous,
    /// HTTP basic (also used to obtain a bearer token when the registry asks for one).
    Basic { username: String, password: String },
    /// A bearer token given as is.
    Bearer(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Anonymous => write!(f, "Anonymous"),
            Auth::Basic { username, .. } => write!(f, "Basic({username}, ***)"),
            Auth::Bearer(_) => write!(f, "Bearer(***)"),
        }
    }
}

impl Auth {
    fn to_oci(&self) -> RegistryAuth {
        match self {
            Auth::Anonymous => RegistryAuth::Anonymous,
            Auth::Basic { username, password } => {
                RegistryAuth::Basic(username.clone(), password.clone())
            }
            Auth::Bearer(t) => RegistryAuth::Bearer(t.clone()),
        }
    }
}

/// Options of [`ImageStore::pull`].
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    pub auth: Auth,
    /// Use plain HTTP for a registry that is not on a loopback address.
    pub insecure: bool,
    pub format: ImageFormat,
    /// Store under this name instead of the reference as given.
    pub name: Option<String>,
}

/// Whether `registry` (`host[:port]`) is a loopback address, reached over plain HTTP.
pub fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry.rsplit_once(':').map_or(registry, |(h, p)| {
            if p.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                registry
            }
        })
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Maps oci-client errors onto the crate's kinds.
fn map_err(e: OciDistributionError, reference: &str, registry: &str) -> ImageError {
    let r = reference.to_string();
    match &e {
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => ImageError::Unauthorized {
            reference: r,
            reason: e.to_string(),
        },
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|x| &x.code).collect();
            if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                ImageError::Unauthorized {
                    reference: r,
                    reason: envelope.to_string(),
                }
            } else if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::ManifestBlobUnknown
                )
            }) {
                ImageError::UnknownManifest {
                    reference: r,
                    reason: envelope.to_string(),
                }
            } else {
                ImageError::Registry {
                    reference: r,
                    source: Box::new(e),
                }
            }
        }
        OciDistributionError::ServerError {
            code: 401 | 403,
            message,
            ..
        } => ImageError::Unauthorized {
            reference: r,
            reason: message.clone(),
        },
        OciDistributionError::ServerError {
            code: 404, message, ..
        } => ImageError::UnknownManifest {
            reference: r,
            reason: message.clone(),
        },
        OciDistributionError::ImageManifestNotFoundError(m) => ImageError::UnknownManifest {
            reference: r,
            reason: m.clone(),
        },
        OciDistributionError::DigestError(oci_client::errors::DigestError::VerificationError {
            expected,
            actual,
        }) => ImageError::DigestMismatch {
            what: format!("manifest of {reference}"),
            expected: expected.clone(),
            actual: actual.clone(),
        },
        OciDistributionError::RequestError(re)
            if re.is_connect() || re.is_timeout() || re.is_request() =>
        {
            ImageError::RegistryUnreachable {
                registry: registry.to_string(),
                reason: chain(re),
            }
        }
        _ => ImageError::Registry {
            reference: r,
            source: Box::new(e),
        },
    }
}

const ACCEPT: &[&str] = &[
    oci::MT_OCI_MANIFEST,
    oci::MT_DOCKER_MANIFEST,
    oci::MT_OCI_INDEX,
    oci::MT_DOCKER_LIST,
];

impl ImageStore {
    /// Pulls `reference` (`host[:port]/name:tag` or `@sha256:...`) and stores it under the
    /// reference as given (or `opts.name`). A manifest already stored returns at once.
    pub fn pull(
        &self,
        reference: &str,
        opts: &PullOptions,
        progress: &mut dyn FnMut(Event<'_>),
    ) -> Result<Image> {
        let r: Reference = reference.parse().map_err(|e: oci_client::ParseError| {
            ImageError::invalid("image reference", format!("`{reference}`: {e}"))
        })?;
        let name = opts.name.clone().unwrap_or_else(|| reference.to_string());
        crate::store::validate_name(&name)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ImageError::io("starting the pull runtime", "tokio", e))?;
        rt.block_on(self.pull_async(&r, reference, &name, opts, progress))
    }

    async fn pull_async(
        &self,
        r: &Reference,
        reference: &str,
        name: &str,
        opts: &PullOptions,
        progress: &mut dyn FnMut(Event<'_>),
    ) -> Result<Image> {
        let started = Instant::now();
        let registry = r.resolve_registry().to_string();
        let protocol = if is_loopback(&registry) || opts.insecure {
            ClientProtocol::HttpsExcept(vec![registry.clone()])
        } else {
            ClientProtocol::Https
        };
        // reqwest is built without a crypto provider of its own (no aws-lc C build): use
        // ring, the provider the rest of Kiln uses, unless the process already chose one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::new(ClientConfig {
            protocol,
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(120)),
            ..Default::default()
        });
        let auth = opts.auth.to_oci();
        let me = |e| map_err(e, reference, &registry);

        progress(Event::Step(&format!("resolving {reference}")));
        let (bytes, digest) = client
            .pull_manifest_raw(r, &auth, ACCEPT)
            .await
            .map_err(me)?;
        if bytes.len() as u64 > MAX_DOCUMENT {
            return Err(ImageError::corrupt(
                format!("manifest of {reference}"),
                "larger than 4 MiB",
            ));
        }
        if let Some(want) = r.digest() {
            oci::verify_bytes(&bytes, want, &format!("manifest of {reference}"))?;
        }
        let doc = Document::parse(&bytes, &format!("manifest of {reference}"))?;
        let (manifest, manifest_digest) = if doc.is_index() {
            let entries = doc.manifests.clone().unwrap_or_default();
            let d = oci::select_platform(&entries, reference)?;
            let pr = r.clone_with_digest(d.digest.clone());
            let (b, _) = client
                .pull_manifest_raw(&pr, &auth, ACCEPT)
                .await
                .map_err(me)?;
            oci::verify_bytes(
                &b,
                &d.digest,
                &format!("linux/amd64 manifest of {reference}"),
            )?;
            (
                Document::parse(&b, &format!("manifest of {reference}"))?,
                d.digest.clone(),
            )
        } else {
            (doc, digest)
        };
        oci::check_algorithm(&manifest_digest, "manifest digest")?;
        let key = digest_key("oci", &manifest_digest, opts.format);
        if let Some(img) = self.reuse(name, &key, progress) {
            return img;
        }

        let config_desc = manifest
            .config
            .clone()
            .ok_or_else(|| ImageError::corrupt(format!("manifest of {reference}"), "no config"))?;
        if config_desc.size > MAX_DOCUMENT {
            return Err(ImageError::corrupt(
                format!("config of {reference}"),
                "larger than 4 MiB",
            ));
        }
        let mut config = Vec::new();
        client
            .pull_blob(r, &oci_descriptor(&config_desc), &mut config)
            .await
            .map_err(|e| blob_err(e, reference, &registry, &config_desc.digest))?;
        oci::verify_bytes(
            &config,
            &config_desc.digest,
            &format!("config of {reference}"),
        )?;
        let cfg = oci::parse_config(&config, reference)?;
        let layers = manifest.layers.clone().unwrap_or_default();
        oci::check_layer_count(&cfg, layers.len(), reference)?;

        let staging = self.staging()?;
        let dl = staging.path().join("layers");
        std::fs::create_dir(&dl).map_err(|e| ImageError::io("creating", &dl, e))?;
        let mut files = Vec::new();
        for (i, layer) in layers.iter().enumerate() {
            oci::check_algorithm(&layer.digest, "layer digest")?;
            if !layer.media_type.contains("tar") {
                return Err(ImageError::invalid(
                    format!("layer {} of {reference}", layer.digest),
                    format!("unsupported media type `{}`", layer.media_type),
                ));
            }
            if layer.size > MAX_LAYER {
                return Err(ImageError::corrupt(
                    format!("layer {} of {reference}", layer.digest),
                    "too large",
                ));
            }
            let path = dl.join(i.to_string());
            self.download(&client, r, layer, &path, reference, &registry, progress)
                .await?;
            files.push(LayerFile {
                path,
                name: layer.digest.clone(),
                diff_id: oci::diff_id(&cfg, i, layers.len()),
            });
        }
        let stats = oci::apply_layers(&staging.rootfs(), &files, reference, progress)?;
        let _ = std::fs::remove_dir_all(&dl);
        progress(Event::Step(&format!("mkfs.{}", opts.format.as_str())));
        let made = Made {
            key,
            format: opts.format,
            source: ImageSource::Registry {
                reference: r.whole(),
                manifest_digest: manifest_digest.clone(),
            },
            exec: cfg.exec,
            content_bytes: stats.bytes,
            started,
        };
        self.store_made(staging, name, made, progress)
    }

    #[allow(clippy::too_many_arguments)]
    async fn download(
        &self,
        client: &Client,
        r: &Reference,
        layer: &oci::Descriptor,
        path: &std::path::Path,
        reference: &str,
        registry: &str,
        progress: &mut dyn FnMut(Event<'_>),
    ) -> Result<()> {
        let what = format!("layer {}", oci::short(&layer.digest));
        let mismatch = |actual: String| ImageError::DigestMismatch {
            what: format!("layer {} of {reference}", layer.digest),
            expected: layer.digest.clone(),
            actual,
        };
        let mut stream = client
            .pull_blob_stream(r, &oci_descriptor(layer))
            .await
            .map_err(|e| blob_err(e, reference, registry, &layer.digest))?;
        let mut f =
            File::create(path).map_err(|e| ImageError::io("creating layer file", path, e))?;
        let mut h = Sha256::new();
        let mut n = 0u64;
        let mut last = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    // oci-client's own digest check fails at the end of the stream; say so
                    // as a mismatch when every byte arrived.
                    if n == layer.size {
                        let actual = format!("sha256:{}", hex(&h.clone().finalize()));
                        if actual != layer.digest {
                            return Err(mismatch(actual));
                        }
                    }
                    return Err(ImageError::RegistryUnreachable {
                        registry: registry.to_string(),
                        reason: format!("downloading layer {}: {}", layer.digest, chain(&e)),
                    });
                }
            };
            n += chunk.len() as u64;
            if layer.size > 0 && n > layer.size {
                return Err(ImageError::corrupt(
                    format!("layer {} of {reference}", layer.digest),
                    format!(
                        "registry sent more than the {} bytes of the manifest",
                        layer.size
                    ),
                ));
            }
            h.update(&chunk);
            f.write_all(&chunk)
                .map_err(|e| ImageError::io("writing layer", path, e))?;
            if n - last >= 1 << 20 || n == layer.size {
                last = n;
                progress(Event::Bytes {
                    what: &what,
                    done: n,
                    total: Some(layer.size),
                });
            }
        }
        f.sync_all()
            .map_err(|e| ImageError::io("fsync layer", path, e))?;
        let actual = format!("sha256:{}", hex(&h.finalize()));
        if actual != layer.digest {
            return Err(mismatch(actual));
        }
        if layer.size > 0 && n != layer.size {
            return Err(ImageError::corrupt(
                format!("layer {} of {reference}", layer.digest),
                format!("{n} bytes, manifest says {}", layer.size),
            ));
        }
        Ok(())
    }
}

fn blob_err(e: OciDistributionError, reference: &str, registry: &str, digest: &str) -> ImageError {
    match e {
        OciDistributionError::DigestError(oci_client::errors::DigestError::VerificationError {
            expected,
            actual,
        }) => ImageError::DigestMismatch {
            what: format!("blob {digest} of {reference}"),
            expected,
            actual,
        },
        e => map_err(e, reference, registry),
    }
}

fn oci_descriptor(d: &oci::Descriptor) -> oci_client::manifest::OciDescriptor {
    oci_client::manifest::OciDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: i64::try_from(d.size).unwrap_or(i64::MAX),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::is_loopback;

    #[test]
    fn loopback_registries_use_http_others_need_insecure() {
        for r in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.1.2.3",
            "[::1]:5000",
            "[::1]",
        ] {
            assert!(is_loopback(r), "{r}");
        }
        for r in [
            "docker.io",
            "registry.example:5000",
            "10.0.0.1:5000",
            "localhost.evil:80",
            "[fe80::1]:5000",
        ] {
            assert!(!is_loopback(r), "{r}");
        }
    }
}
