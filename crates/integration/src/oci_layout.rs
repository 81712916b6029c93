//! Writes OCI image layouts by hand, for tests that need images no builder here produces
//! as such: uncompressed layers, several platforms in one index, BuildKit-style attestation
//! entries, artifacts and unknown layer media types. `skopeo copy --preserve-digests
//! oci:DIR:REF docker://...` then puts them into a registry byte for byte.

use crate::sha256_hex;
use std::path::{Path, PathBuf};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A blob written to the layout.
#[derive(Clone, Debug)]
pub struct Blob {
    pub media_type: String,
    pub digest: String,
    pub size: usize,
}

impl Blob {
    pub fn descriptor(&self) -> serde_json::Value {
        serde_json::json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        })
    }
}

/// An image written to the layout: its manifest and config.
#[derive(Clone, Debug)]
pub struct LayoutImage {
    pub manifest: Blob,
    pub config: Blob,
}

pub struct Layout {
    pub dir: PathBuf,
    refs: Vec<serde_json::Value>,
}

impl Layout {
    pub fn new(dir: &Path) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).expect("layout dir");
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
            .expect("oci-layout");
        Layout {
            dir: dir.to_path_buf(),
            refs: Vec::new(),
        }
    }

    pub fn blob(&self, media_type: &str, data: &[u8]) -> Blob {
        let hex = sha256_hex(data);
        std::fs::write(self.dir.join("blobs/sha256").join(&hex), data).expect("blob");
        Blob {
            media_type: media_type.to_string(),
            digest: format!("sha256:{hex}"),
            size: data.len(),
        }
    }

    /// An image of one layer: `tar` stored as `layer_type` (gzip-compressed when the type
    /// ends in `+gzip`), with a config for linux/`arch`.
    pub fn image(&self, tar: &[u8], layer_type: &str, arch: &str) -> LayoutImage {
        let layer_bytes = if layer_type.ends_with("+gzip") {
            crate::gzip(tar)
        } else {
            tar.to_vec()
        };
        let layer = self.blob(layer_type, &layer_bytes);
        let config = serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(tar))]},
        });
        self.manifest_over(
            OCI_CONFIG,
            &serde_json::to_vec(&config).expect("config"),
            &[layer],
        )
    }

    /// A manifest over `config` bytes of `config_type` and the given layers.
    pub fn manifest_over(&self, config_type: &str, config: &[u8], layers: &[Blob]) -> LayoutImage {
        let config = self.blob(config_type, config);
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        });
        let manifest = self.blob(
            OCI_MANIFEST,
            &serde_json::to_vec(&manifest).expect("manifest"),
        );
        LayoutImage { manifest, config }
    }

    /// A BuildKit-style attestation manifest for `subject` (platform unknown/unknown).
    pub fn attestation(&self, subject: &LayoutImage) -> serde_json::Value {
        let statement = self.blob(
            "application/vnd.in-toto+json",
            br#"{"_type":"https://in-toto.io/Statement/v0.1","predicateType":"https://spdx.dev/Document"}"#,
        );
        let m = self.manifest_over(OCI_CONFIG, b"{}", &[statement]);
        let mut d = m.manifest.descriptor();
        d["platform"] = serde_json::json!({"architecture": "unknown", "os": "unknown"});
        d["annotations"] = serde_json::json!({
            "vnd.docker.reference.type": "attestation-manifest",
            "vnd.docker.reference.digest": subject.manifest.digest,
        });
        d
    }

    /// An index entry for `image` on linux/`arch`[/`variant`].
    pub fn entry(image: &LayoutImage, arch: &str, variant: Option<&str>) -> serde_json::Value {
        let mut d = image.manifest.descriptor();
        d["platform"] = serde_json::json!({"architecture": arch, "os": "linux"});
        if let Some(v) = variant {
            d["platform"]["variant"] = v.into();
        }
        d
    }

    /// An OCI index over `entries`.
    pub fn index(&self, entries: Vec<serde_json::Value>) -> Blob {
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": entries,
        });
        self.blob(OCI_INDEX, &serde_json::to_vec(&index).expect("index"))
    }

    /// Names `blob` (a manifest or an index) `name` in the layout's index.json.
    pub fn tag(&mut self, blob: &Blob, name: &str) {
        let mut d = blob.descriptor();
        d["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": name});
        self.refs.push(d);
        let index = serde_json::json!({"schemaVersion": 2, "manifests": self.refs});
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&index).expect("index.json"),
        )
        .expect("index.json");
    }

    /// `oci:DIR:NAME`, for skopeo.
    pub fn reference(&self, name: &str) -> String {
        format!("oci:{}:{name}", self.dir.display())
    }
}
