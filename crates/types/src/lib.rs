//! Leaf vocabulary shared by every crate: digests and the ID newtypes built on them, image
//! references with Docker's normalisation, media types, and the serde types of manifests and
//! image configs. Pure data: no I/O, no policy.

pub mod compression;
pub mod digest;
pub mod image;
pub mod platform;
pub mod reference;

/// Sizes as `docker images` and `isula-build info -H` show them: powers of 1000, three
/// significant digits (`5.85 MB`, `500 MB`, `7.63 GB`).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 999.5 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    let mut s = if v >= 99.95 {
        format!("{v:.0}")
    } else if v >= 9.995 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    if s.contains('.') {
        s = s.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    format!("{s} {}", UNITS[unit])
}

/// A Go `time.ParseDuration` string, as isula-build's flags and configuration take them:
/// numbers with units (ns, us, µs, ms, s, m, h), e.g. `1m30s`, `1.5s`; a bare `0` is zero.
pub fn parse_go_duration(text: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("time: invalid duration {text:?}");
    let mut rest = text;
    let mut total = 0f64;
    if rest == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let value: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    std::time::Duration::try_from_secs_f64(total).map_err(|_| bad())
}

/// Parses a size as people write it: `1073741824`, `500MB`, `10 GB`, `2GiB`, `512k`
/// (decimal units without `i`, binary with; a bare letter is decimal).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected a number with an optional unit"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "invalid size {s:?}: unknown unit {other:?} (use B, kB, MB, GB, TB, KiB, MiB, GiB or TiB)"
            ))
        }
    };
    let out_of_range = || format!("invalid size {s:?}: out of range");
    // Whole numbers exactly; fractions ("1.5GB") through floating point.
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(out_of_range);
    }
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
        return Err(out_of_range());
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::{human_size, parse_size};

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("10 GB"), Ok(10_000_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5k"), Ok(1500));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert!(parse_size("20000000TB").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(999), "999 B");
        assert_eq!(human_size(5_850_000), "5.85 MB");
        assert_eq!(human_size(1_450_000), "1.45 MB");
        assert_eq!(human_size(500_000_000), "500 MB");
        assert_eq!(human_size(12_345_678), "12.3 MB");
        assert_eq!(human_size(2_000_000_000), "2 GB");
        assert_eq!(human_size(7_630_000_000), "7.63 GB");
        assert_eq!(human_size(25_325_000_000), "25.3 GB");
        assert_eq!(human_size(999_999), "1 MB");
    }
}

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
    /// Docker's schema 1 (signed and unsigned): read by nothing here.
    pub const DOCKER_MANIFEST_V1: &str = "application/vnd.docker.distribution.manifest.v1+json";
    pub const DOCKER_MANIFEST_V1_SIGNED: &str =
        "application/vnd.docker.distribution.manifest.v1+prettyjws";
    /// The annotation BuildKit puts on the attestation entries of an index.
    pub const REFERENCE_TYPE_ANNOTATION: &str = "vnd.docker.reference.type";

    /// What a fetched manifest is, by its media type.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum ManifestKind {
        /// Docker v2 schema 2 or OCI image manifest.
        Image,
        /// Docker manifest list or OCI image index.
        List,
        /// Docker v2 schema 1.
        Schema1,
        /// Anything else (artifacts, unknown types).
        Other,
    }

    pub fn manifest_kind(media_type: &str) -> ManifestKind {
        match media_type {
            DOCKER_MANIFEST | OCI_MANIFEST => ManifestKind::Image,
            DOCKER_MANIFEST_LIST | OCI_INDEX => ManifestKind::List,
            DOCKER_MANIFEST_V1 | DOCKER_MANIFEST_V1_SIGNED => ManifestKind::Schema1,
            _ => ManifestKind::Other,
        }
    }

    /// The media type of a manifest whose body names none (allowed for OCI): schema 1 by
    /// its `schemaVersion`, an index by its `manifests`, an image manifest by its `config`.
    pub fn guess_manifest_type(body: &serde_json::Value) -> Option<&'static str> {
        if body["schemaVersion"] == 1 {
            Some(DOCKER_MANIFEST_V1)
        } else if body["manifests"].is_array() {
            Some(OCI_INDEX)
        } else if body["config"].is_object() && body["layers"].is_array() {
            Some(OCI_MANIFEST)
        } else {
            None
        }
    }

    /// Image config media types.
    pub fn is_image_config(media_type: &str) -> bool {
        matches!(media_type, DOCKER_CONFIG | OCI_CONFIG)
    }

    /// How a layer's media type says it is stored.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum LayerType {
        Tar,
        Gzip,
        Zstd,
        /// Foreign (Docker) or non-distributable (OCI): its blob lives elsewhere.
        Foreign,
        /// Not an image layer we can unpack (encrypted, an artifact's blob, unknown).
        Unsupported,
    }

    pub fn layer_type(media_type: &str) -> LayerType {
        match media_type {
            DOCKER_LAYER | OCI_LAYER => LayerType::Tar,
            DOCKER_LAYER_GZIP | OCI_LAYER_GZIP => LayerType::Gzip,
            OCI_LAYER_ZSTD => LayerType::Zstd,
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => LayerType::Foreign,
            _ => LayerType::Unsupported,
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn oci_manifests_are_not_schema_1() {
            assert_eq!(manifest_kind(OCI_MANIFEST), ManifestKind::Image);
            assert_eq!(manifest_kind(DOCKER_MANIFEST), ManifestKind::Image);
            assert_eq!(manifest_kind(OCI_INDEX), ManifestKind::List);
            assert_eq!(manifest_kind(DOCKER_MANIFEST_LIST), ManifestKind::List);
            assert_eq!(manifest_kind(DOCKER_MANIFEST_V1), ManifestKind::Schema1);
            assert_eq!(
                manifest_kind(DOCKER_MANIFEST_V1_SIGNED),
                ManifestKind::Schema1
            );
            assert_eq!(
                manifest_kind("application/vnd.oci.artifact.manifest.v1+json"),
                ManifestKind::Other
            );
        }

        #[test]
        fn guesses_untyped_bodies() {
            let v = |s: &str| serde_json::from_str::<serde_json::Value>(s).expect("json");
            assert_eq!(
                guess_manifest_type(&v(r#"{"schemaVersion":1,"fsLayers":[]}"#)),
                Some(DOCKER_MANIFEST_V1)
            );
            assert_eq!(
                guess_manifest_type(&v(r#"{"schemaVersion":2,"manifests":[]}"#)),
                Some(OCI_INDEX)
            );
            assert_eq!(
                guess_manifest_type(&v(r#"{"schemaVersion":2,"config":{},"layers":[]}"#)),
                Some(OCI_MANIFEST)
            );
            assert_eq!(guess_manifest_type(&v(r#"{"schemaVersion":2}"#)), None);
        }

        #[test]
        fn layer_types() {
            assert_eq!(layer_type(OCI_LAYER), LayerType::Tar);
            assert_eq!(layer_type(DOCKER_LAYER_GZIP), LayerType::Gzip);
            assert_eq!(layer_type(OCI_LAYER_GZIP), LayerType::Gzip);
            assert_eq!(layer_type(OCI_LAYER_ZSTD), LayerType::Zstd);
            assert_eq!(
                layer_type("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"),
                LayerType::Foreign
            );
            assert_eq!(
                layer_type("application/vnd.oci.image.layer.v1.tar+gzip+encrypted"),
                LayerType::Unsupported
            );
            assert_eq!(
                layer_type("application/vnd.in-toto+json"),
                LayerType::Unsupported
            );
        }
    }
}

/// The proxy variables: usable as build args without an ARG, never stored in an image, and
/// sent by the client only RSA-encrypted (control-api.md).
pub const PROXY_ARGS: [&str; 8] = [
    "http_proxy",
    "https_proxy",
    "ftp_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "FTP_PROXY",
    "NO_PROXY",
];

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

#[cfg(test)]
mod duration_tests {
    use super::parse_go_duration;
    use std::time::Duration;

    #[test]
    fn go_durations() {
        for (text, want) in [
            ("0", Duration::ZERO),
            ("3s", Duration::from_secs(3)),
            ("1m30s", Duration::from_secs(90)),
            ("1.5s", Duration::from_millis(1500)),
            ("500ms", Duration::from_millis(500)),
            ("2h", Duration::from_secs(7200)),
            ("10us", Duration::from_micros(10)),
        ] {
            assert_eq!(parse_go_duration(text), Ok(want), "{text}");
        }
        for bad in ["", "s", "5", "5x", "1m-3s", "1e400s"] {
            let e = parse_go_duration(bad).expect_err(bad);
            assert!(e.contains("invalid duration"), "{bad}: {e}");
        }
    }
}
