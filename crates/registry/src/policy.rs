//! `policy.json`: the model and its evaluation live in `isula_trust::policy`; the registry
//! client consults it before it fetches (`reject`) and once it has the manifest (signature
//! requirements, see `signatures`).

pub use isula_trust::policy::{Policy, Requirement};
