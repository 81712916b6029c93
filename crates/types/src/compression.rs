//! The compression a push asks for (`--compression`, `--compression-level`, the daemon's
//! `compression` and `compression_level` keys): which form of each layer goes to a
//! registry. Parsing and range checks only; the store makes the forms.

use std::fmt;

/// A layer compression a registry push can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Codec {
    #[default]
    Gzip,
    Zstd,
    /// zstd with a table of contents (containers/storage's zstd:chunked): a zstd stream to
    /// any reader, whose files a reader that knows the format can fetch one by one.
    ZstdChunked,
}

impl Codec {
    pub fn name(self) -> &'static str {
        match self {
            Codec::Gzip => "gzip",
            Codec::Zstd => "zstd",
            Codec::ZstdChunked => "zstd:chunked",
        }
    }

    /// The levels this codec takes.
    pub fn levels(self) -> std::ops::RangeInclusive<i32> {
        match self {
            Codec::Gzip => 1..=9,
            Codec::Zstd | Codec::ZstdChunked => 1..=22,
        }
    }

    /// Whether its layers are zstd streams (OCI's `tar+zstd` media type).
    pub fn is_zstd(self) -> bool {
        matches!(self, Codec::Zstd | Codec::ZstdChunked)
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What was wrong with a compression or its level.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompressionError {
    #[error("invalid compression {0:?}: use gzip, zstd or zstd:chunked")]
    Unknown(String),
    #[error("compression level {level} is out of range for {codec}: use {} to {}", .codec.levels().start(), .codec.levels().end())]
    LevelOutOfRange { codec: Codec, level: i32 },
}

/// A codec and, when asked for, its level (else the store's own for the codec).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LayerCompression {
    pub codec: Codec,
    pub level: Option<i32>,
}

impl LayerCompression {
    /// Reads `gzip`, `zstd` or `zstd:chunked` ("" is `default`) and checks `level` against
    /// the codec's range.
    pub fn parse(
        name: &str,
        level: Option<i32>,
        default: LayerCompression,
    ) -> Result<LayerCompression, CompressionError> {
        let codec = match name.trim() {
            "" => default.codec,
            "gzip" => Codec::Gzip,
            "zstd" => Codec::Zstd,
            "zstd:chunked" => Codec::ZstdChunked,
            other => return Err(CompressionError::Unknown(other.to_string())),
        };
        // The default's level goes with the default's codec only.
        let level = match (level, name.trim().is_empty()) {
            (Some(l), _) => Some(l),
            (None, true) => default.level,
            (None, false) if codec == default.codec => default.level,
            (None, false) => None,
        };
        if let Some(l) = level {
            if !codec.levels().contains(&l) {
                return Err(CompressionError::LevelOutOfRange { codec, level: l });
            }
        }
        Ok(LayerCompression { codec, level })
    }
}

impl fmt::Display for LayerCompression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.level {
            Some(l) => write!(f, "{} level {l}", self.codec),
            None => write!(f, "{}", self.codec),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_checks_levels() {
        let d = LayerCompression::default();
        assert_eq!(LayerCompression::parse("", None, d), Ok(d));
        assert_eq!(
            LayerCompression::parse("zstd", Some(19), d),
            Ok(LayerCompression {
                codec: Codec::Zstd,
                level: Some(19)
            })
        );
        assert_eq!(
            LayerCompression::parse("gzip", Some(9), d).map(|c| c.codec),
            Ok(Codec::Gzip)
        );
        assert_eq!(
            LayerCompression::parse("foo", None, d),
            Err(CompressionError::Unknown("foo".into()))
        );
        assert_eq!(
            LayerCompression::parse("zstd:chunked", Some(5), d),
            Ok(LayerCompression {
                codec: Codec::ZstdChunked,
                level: Some(5)
            })
        );
        assert_eq!(
            LayerCompression::parse("gzip", Some(10), d),
            Err(CompressionError::LevelOutOfRange {
                codec: Codec::Gzip,
                level: 10
            })
        );
        assert_eq!(
            LayerCompression::parse("zstd", Some(23), d),
            Err(CompressionError::LevelOutOfRange {
                codec: Codec::Zstd,
                level: 23
            })
        );
        assert!(LayerCompression::parse("zstd", Some(0), d).is_err());
        assert!(LayerCompression::parse("zstd", Some(22), d).is_ok());
        assert!(LayerCompression::parse("zstd", Some(1), d).is_ok());
    }

    #[test]
    fn the_default_level_goes_with_the_default_codec() {
        let d = LayerCompression {
            codec: Codec::Zstd,
            level: Some(15),
        };
        assert_eq!(LayerCompression::parse("", None, d), Ok(d));
        assert_eq!(LayerCompression::parse("zstd", None, d), Ok(d));
        assert_eq!(
            LayerCompression::parse("gzip", None, d),
            Ok(LayerCompression {
                codec: Codec::Gzip,
                level: None
            })
        );
        // Given with no name, the level applies to the default codec and is checked there.
        assert!(LayerCompression::parse("", Some(20), LayerCompression::default()).is_err());
    }
}
