//! `policy.json` (containers-policy.json): a default requirement list and per-transport,
//! per-scope lists. We honour `insecureAcceptAnything` and `reject`. Signature requirements
//! (`signedBy`, `sigstoreSigned`, `signedBaseLayer`) are read, and the daemon starts, but
//! every pull or push they govern fails naming the requirement, since we cannot verify
//! signatures.

use crate::ConfigError;
use serde::Deserialize;
use std::collections::BTreeMap;

/// Signature requirement types: accepted in the file, refusing what they govern.
pub const SIGNATURE_TYPES: [&str; 3] = ["signedBy", "sigstoreSigned", "signedBaseLayer"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    InsecureAcceptAnything,
    Reject,
    /// A signature requirement (its type), which this daemon cannot verify.
    Signature(String),
}

impl<'de> Deserialize<'de> for Requirement {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Requirement, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        match v.get("type").and_then(|t| t.as_str()) {
            Some("insecureAcceptAnything") => Ok(Requirement::InsecureAcceptAnything),
            Some("reject") => Ok(Requirement::Reject),
            Some(t) if SIGNATURE_TYPES.contains(&t) => Ok(Requirement::Signature(t.to_string())),
            Some(t) => Err(serde::de::Error::custom(format!(
                "requirement type {t:?} is not supported"
            ))),
            None => Err(serde::de::Error::custom("a requirement without \"type\"")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub default: Vec<Requirement>,
    #[serde(default)]
    pub transports: BTreeMap<String, BTreeMap<String, Vec<Requirement>>>,
}

impl Policy {
    pub fn parse(file: &str, text: &str) -> Result<Policy, ConfigError> {
        let raw: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ConfigError::invalid(file, e.to_string()))?;
        // Name unsupported requirement types before serde's generic message.
        let mut lists: Vec<&serde_json::Value> = vec![&raw["default"]];
        if let Some(t) = raw["transports"].as_object() {
            for scopes in t.values() {
                if let Some(s) = scopes.as_object() {
                    lists.extend(s.values());
                }
            }
        }
        for list in lists {
            for req in list.as_array().into_iter().flatten() {
                if let Some(kind) = req["type"].as_str() {
                    if kind != "insecureAcceptAnything"
                        && kind != "reject"
                        && !SIGNATURE_TYPES.contains(&kind)
                    {
                        return Err(ConfigError::invalid(
                            file,
                            format!("requirement type {kind:?} is not supported (insecureAcceptAnything, reject, or a signature type: {})", SIGNATURE_TYPES.join(", ")),
                        ));
                    }
                }
            }
        }
        let p: Policy =
            serde_json::from_value(raw).map_err(|e| ConfigError::invalid(file, e.to_string()))?;
        if p.default.is_empty() {
            return Err(ConfigError::invalid(
                file,
                "\"default\" must list at least one requirement",
            ));
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let p = Policy::parse(
            "policy.json",
            r#"{"default":[{"type":"insecureAcceptAnything"}],"transports":{"docker":{"bad.io":[{"type":"reject"}]}}}"#,
        )
        .expect("parse");
        assert_eq!(p.transports["docker"]["bad.io"], vec![Requirement::Reject]);
        let p = Policy::parse(
            "policy.json",
            r#"{"default":[{"type":"insecureAcceptAnything"}],"transports":{"docker":{"signed.io":[{"type":"signedBy","keyType":"GPGKeys","keyPath":"/k.gpg"}]}}}"#,
        )
        .expect("a signature requirement is read");
        assert_eq!(
            p.transports["docker"]["signed.io"],
            vec![Requirement::Signature("signedBy".into())]
        );
        for bad in [
            "{",
            r#"{"default":[]}"#,
            r#"{"default":[{"type":"madeUp"}]}"#,
            r#"{"default":[{"type":"reject"}],"extra":1}"#,
        ] {
            assert!(Policy::parse("policy.json", bad).is_err(), "{bad}");
        }
    }
}
