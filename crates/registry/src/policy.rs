//! `policy.json` (containers-policy.json): a default requirement list and per-transport,
//! per-scope lists. We honour `insecureAcceptAnything` and `reject`; signature
//! requirements are recognised and refused clearly, since we cannot verify them.

use crate::ConfigError;
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type")]
pub enum Requirement {
    #[serde(rename = "insecureAcceptAnything")]
    InsecureAcceptAnything,
    #[serde(rename = "reject")]
    Reject,
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
                    if kind != "insecureAcceptAnything" && kind != "reject" {
                        return Err(ConfigError::invalid(
                            file,
                            format!("requirement type {kind:?} is not supported (insecureAcceptAnything or reject)"),
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
        for bad in [
            "{",
            r#"{"default":[]}"#,
            r#"{"default":[{"type":"signedBy","keyType":"GPGKeys"}]}"#,
            r#"{"default":[{"type":"reject"}],"extra":1}"#,
        ] {
            assert!(Policy::parse("policy.json", bad).is_err(), "{bad}");
        }
    }
}
