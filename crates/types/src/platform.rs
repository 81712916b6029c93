//! Build platforms (`--platform linux/arm64`, `FROM --platform=...`) with Docker's
//! (containerd's) normalisation: `aarch64` is `arm64` (and `arm64/v8` is `arm64`),
//! `x86_64` is `amd64`, `armhf` is `arm/v7`, `arm` alone is `arm/v7`, `i386` is `386`.

use std::fmt;

/// One os/architecture[/variant], normalised.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct BuildPlatform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

/// Docker's architecture aliases and default variants: (architecture, variant).
fn normalize_arch(arch: &str, variant: Option<&str>) -> (String, Option<String>) {
    let v = variant.map(|v| v.to_ascii_lowercase());
    let with_v = |v: Option<String>| {
        v.map(|v| {
            if v.starts_with('v') {
                v
            } else {
                format!("v{v}")
            }
        })
    };
    match arch.to_ascii_lowercase().as_str() {
        "x86_64" | "x86-64" | "amd64" => ("amd64".into(), with_v(v).filter(|v| v != "v1")),
        "aarch64" | "arm64" => (
            "arm64".into(),
            with_v(v).filter(|v| v != "v8" && v != "v8.0"),
        ),
        "armhf" => ("arm".into(), Some("v7".into())),
        "armel" => ("arm".into(), Some("v6".into())),
        "arm" => ("arm".into(), Some(with_v(v).unwrap_or_else(|| "v7".into()))),
        "i386" | "i486" | "i586" | "i686" | "386" => ("386".into(), with_v(v)),
        other => (other.to_string(), with_v(v)),
    }
}

impl BuildPlatform {
    /// `os/arch[/variant]` (or `arch` alone, linux), normalised.
    pub fn parse(text: &str) -> Result<BuildPlatform, String> {
        let parts: Vec<&str> = text.trim().split('/').collect();
        let (os, arch, variant) = match parts.as_slice() {
            [arch] if !arch.is_empty() => ("linux", *arch, None),
            [os, arch] => (*os, *arch, None),
            [os, arch, variant] => (*os, *arch, Some(*variant)),
            _ => {
                return Err(format!(
                    "invalid platform {text:?}: expected os/arch[/variant], as linux/arm64"
                ))
            }
        };
        if os.is_empty() || arch.is_empty() || variant.is_some_and(str::is_empty) {
            return Err(format!(
                "invalid platform {text:?}: expected os/arch[/variant], as linux/arm64"
            ));
        }
        let os = os.to_ascii_lowercase();
        if os != "linux" {
            return Err(format!(
                "platform {text:?}: this builder builds linux images only"
            ));
        }
        if !arch
            .bytes()
            .chain(variant.unwrap_or_default().bytes())
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        {
            return Err(format!("invalid platform {text:?}"));
        }
        let (architecture, variant) = normalize_arch(arch, variant);
        Ok(BuildPlatform {
            os,
            architecture,
            variant,
        })
    }

    /// This machine's platform.
    pub fn host() -> BuildPlatform {
        let (architecture, variant) = normalize_arch(crate::image::host_architecture(), None);
        BuildPlatform {
            os: "linux".into(),
            architecture,
            variant: if std::env::consts::ARCH == "arm" {
                Some("v7".into())
            } else {
                variant
            },
        }
    }

    pub fn is_host(&self) -> bool {
        *self == BuildPlatform::host()
    }

    /// Whether an image config's os/architecture/variant is this platform (a config without
    /// a variant is taken as the architecture's default).
    pub fn matches(&self, os: &str, architecture: &str, variant: Option<&str>) -> bool {
        let (arch, v) = normalize_arch(architecture, variant.filter(|v| !v.is_empty()));
        let os_ok = os.is_empty() || os.eq_ignore_ascii_case(&self.os);
        os_ok
            && arch == self.architecture
            && (variant.is_none_or(str::is_empty) || v == self.variant)
    }

    /// The variant as BuildKit's `TARGETVARIANT` shows it (empty when none).
    pub fn variant_str(&self) -> &str {
        self.variant.as_deref().unwrap_or_default()
    }

    /// The name of QEMU's user-mode emulator (and its binfmt_misc entry `qemu-NAME`).
    pub fn qemu_name(&self) -> &str {
        match self.architecture.as_str() {
            "amd64" => "x86_64",
            "arm64" => "aarch64",
            "386" => "i386",
            "arm" => "arm",
            "loong64" => "loongarch64",
            other => other,
        }
    }
}

impl fmt::Display for BuildPlatform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.variant {
            Some(v) => write!(f, "{}/{}/{v}", self.os, self.architecture),
            None => write!(f, "{}/{}", self.os, self.architecture),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_normalisation() {
        for (text, want) in [
            ("linux/arm64", "linux/arm64"),
            ("linux/arm64/v8", "linux/arm64"),
            ("linux/aarch64", "linux/arm64"),
            ("arm64", "linux/arm64"),
            ("linux/amd64", "linux/amd64"),
            ("linux/x86_64", "linux/amd64"),
            ("linux/amd64/v3", "linux/amd64/v3"),
            ("linux/arm", "linux/arm/v7"),
            ("linux/arm/7", "linux/arm/v7"),
            ("linux/arm/v6", "linux/arm/v6"),
            ("linux/armhf", "linux/arm/v7"),
            ("linux/386", "linux/386"),
            ("linux/i686", "linux/386"),
            ("linux/ppc64le", "linux/ppc64le"),
            ("linux/s390x", "linux/s390x"),
            ("linux/riscv64", "linux/riscv64"),
            ("LINUX/ARM64", "linux/arm64"),
        ] {
            assert_eq!(
                BuildPlatform::parse(text).map(|p| p.to_string()).as_deref(),
                Ok(want),
                "{text}"
            );
        }
        for bad in [
            "",
            "linux/",
            "/arm64",
            "linux/arm64/",
            "windows/amd64",
            "linux/a b",
            "a/b/c/d",
        ] {
            assert!(BuildPlatform::parse(bad).is_err(), "{bad}");
        }
        let arm64 = BuildPlatform::parse("linux/arm64").expect("arm64");
        assert!(arm64.matches("linux", "arm64", Some("v8")));
        assert!(arm64.matches("linux", "aarch64", None));
        assert!(!arm64.matches("linux", "amd64", None));
        let arm = BuildPlatform::parse("linux/arm/v7").expect("arm");
        assert!(arm.matches("linux", "arm", None));
        assert!(!arm.matches("linux", "arm", Some("v6")));
        assert_eq!(arm64.qemu_name(), "aarch64");
        assert!(BuildPlatform::host().is_host());
    }
}
