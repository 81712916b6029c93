//! Leaf vocabulary shared by every crate: digests and the ID newtypes built on them, image
//! references with Docker's normalisation, media types, and the serde types of manifests and
//! image configs. Pure data: no I/O, no policy.

pub mod digest;
pub mod image;
pub mod reference;

pub use digest::{ChainId, DiffId, Digest, DigestError, ImageId};
pub use reference::{Reference, ReferenceError};

/// Media types we read and write.
pub mod media {
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_MANIFEST_LIST: &str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
}

/// Size limits shared by the daemon and the CLI (STYLE.md §3).
pub mod limits {
    /// Dockerfile, .dockerignore and every config file.
    pub const CONFIG_FILE_MAX: u64 = 1 << 20;
    /// A manifest, an image config, an archive's manifest.json or index.json.
    pub const MANIFEST_MAX: u64 = 4 << 20;
    /// A docker-archive's manifest.json (the manual's 1 MiB).
    pub const ARCHIVE_MANIFEST_MAX: u64 = 1 << 20;
    /// `ctr-img import`: the tarball as given (compressed size).
    pub const IMPORT_MAX: u64 = 1 << 30;
    /// `ctr-img load`: the archive.
    pub const LOAD_MAX: u64 = 50 << 30;
    /// Builds running at once.
    pub const CONCURRENT_BUILDS_MAX: usize = 100;
}
