//! `sha256:<hex>` digests and the IDs that are digests underneath. Only sha256 is accepted:
//! it is what every image we read or write uses, and one algorithm keeps the store simple.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("invalid digest {0:?}: expected sha256:<64 lower-case hex>")]
    Invalid(String),
}

/// A validated `sha256:<64 hex>` digest.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    pub fn parse(s: &str) -> Result<Self, DigestError> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| DigestError::Invalid(s.to_string()))?;
        Self::from_hex(hex).map_err(|_| DigestError::Invalid(s.to_string()))
    }

    /// From 64 lower-case hex digits.
    pub fn from_hex(hex: &str) -> Result<Self, DigestError> {
        if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Digest(format!("sha256:{hex}")))
        } else {
            Err(DigestError::Invalid(hex.to_string()))
        }
    }

    pub fn from_sha256(hash: Sha256) -> Self {
        Digest(format!("sha256:{}", hex::encode(hash.finalize())))
    }

    pub fn of_bytes(data: &[u8]) -> Self {
        Self::from_sha256(Sha256::new_with_prefix(data))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0[7..]
    }

    /// The first 12 hex digits, as `images` shows.
    pub fn short(&self) -> &str {
        &self.0[7..19]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

macro_rules! digest_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Digest);

        impl $name {
            pub fn digest(&self) -> &Digest {
                &self.0
            }
            pub fn hex(&self) -> &str {
                self.0.hex()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

digest_newtype!(
    /// Image ID: the digest of the image config.
    ImageId
);
digest_newtype!(
    /// Digest of an uncompressed layer tar.
    DiffId
);
digest_newtype!(
    /// Identity of a layer stack: the OCI chain ID of its diff IDs.
    ChainId
);

impl ChainId {
    /// The chain ID of `diff` stacked on `parent` (OCI image spec: for the bottom layer the
    /// chain ID is the diff ID, else `sha256(parent + " " + diff)`).
    pub fn next(parent: Option<&ChainId>, diff: &DiffId) -> ChainId {
        match parent {
            None => ChainId(diff.0.clone()),
            Some(p) => ChainId(Digest::of_bytes(
                format!("{} {}", p.0.as_str(), diff.0.as_str()).as_bytes(),
            )),
        }
    }

    /// Chain IDs for every prefix of `diffs`.
    pub fn chain(diffs: &[DiffId]) -> Vec<ChainId> {
        let mut out: Vec<ChainId> = Vec::with_capacity(diffs.len());
        for d in diffs {
            let next = ChainId::next(out.last(), d);
            out.push(next);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_reject() {
        let d = Digest::of_bytes(b"");
        assert_eq!(
            d.as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(Digest::parse(d.as_str()), Ok(d.clone()));
        assert_eq!(d.short(), "e3b0c44298fc");
        for bad in [
            "",
            "sha256:",
            "sha512:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85",
            "sha256:../../../../etc/passwd000000000000000000000000000000000000000000",
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn chain_ids() {
        let a = DiffId(Digest::of_bytes(b"a"));
        let b = DiffId(Digest::of_bytes(b"b"));
        let chain = ChainId::chain(&[a.clone(), b.clone()]);
        assert_eq!(chain[0].0, a.0);
        let expect = Digest::of_bytes(format!("{} {}", a.0, b.0).as_bytes());
        assert_eq!(chain[1].0, expect);
    }
}
