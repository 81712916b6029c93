//! OpenPGP for simple signing, in pure Rust (rpgp): keyrings from `keyPath`, `keyPaths`
//! or `keyData` (binary or ASCII-armoured, one or many keys), and verification of a
//! signed (usually compressed) message, returning the literal data it signs. A signature
//! by the primary key or by one of its bound subkeys counts for the key.

use pgp::composed::{Deserializable, Message, SignedPublicKey};
use pgp::types::KeyDetails;
use std::io::Cursor;

/// Trusted public keys.
pub struct Keyring {
    keys: Vec<SignedPublicKey>,
}

impl Keyring {
    /// Parses every key of each `(name, bytes)`; a source without any key is an error
    /// naming it.
    pub fn load(sources: &[(String, Vec<u8>)]) -> Result<Keyring, (String, String)> {
        let mut keys = Vec::new();
        for (name, bytes) in sources {
            let fail = |reason: String| (name.clone(), reason);
            let (iter, _) = SignedPublicKey::from_reader_many(Cursor::new(bytes.clone()))
                .map_err(|e| fail(format!("not an OpenPGP key: {e}")))?;
            let mut found = 0;
            for k in iter {
                let k = k.map_err(|e| fail(format!("not an OpenPGP key: {e}")))?;
                k.verify()
                    .map_err(|e| fail(format!("key {:X}: {e}", k.fingerprint())))?;
                keys.push(k);
                found += 1;
            }
            if found == 0 {
                return Err(fail("not an OpenPGP key: holds no key".into()));
            }
        }
        Ok(Keyring { keys })
    }

    /// Verifies a simple-signing signature (an OpenPGP signed message) and returns what
    /// it signs.
    pub fn verify(&self, signature: &[u8]) -> Result<Vec<u8>, String> {
        let mut msg = Message::from_bytes(Cursor::new(signature))
            .map_err(|e| format!("not an OpenPGP message: {e}"))?;
        // Compressed(Signed(Literal)) as gpg makes it, or Signed(Literal).
        for _ in 0..2 {
            if msg.is_compressed() {
                msg = msg
                    .decompress()
                    .map_err(|e| format!("OpenPGP message: {e}"))?;
            }
        }
        if !msg.is_signed() {
            return Err("the OpenPGP message is not signed".into());
        }
        let mut data = Vec::new();
        {
            use std::io::Read;
            msg.by_ref()
                .take(crate::SIGNATURE_MAX + 1)
                .read_to_end(&mut data)
                .map_err(|e| format!("OpenPGP message: {e}"))?;
        }
        if data.len() as u64 > crate::SIGNATURE_MAX {
            return Err("signed payload over the size limit".into());
        }
        for key in &self.keys {
            if msg.verify(&key.primary_key).is_ok() {
                return Ok(data);
            }
            for sub in &key.public_subkeys {
                if sub.verify(&key.primary_key).is_ok() && msg.verify(sub).is_ok() {
                    return Ok(data);
                }
            }
        }
        // A trusted key that the signature names yet does not verify: altered data.
        if let Some(fpr) = self.named_issuer(&msg) {
            return Err(format!(
                "the signature by trusted key {fpr} does not verify: the signature or what it signs was altered"
            ));
        }
        let issuer = signer_hint(&msg);
        Err(format!(
            "not signed by any key the policy names{issuer} (trusted: {})",
            self.fingerprints().join(", ")
        ))
    }

    /// The trusted key (primary fingerprint) a message's signature says it is from.
    fn named_issuer(&self, msg: &Message<'_>) -> Option<String> {
        let sig = match msg {
            Message::Signed { reader, .. } => Some(reader.signature()),
            Message::SignedOnePass { reader, .. } => reader.signature(),
            _ => None,
        }?;
        let ids = sig.issuer();
        let fprs = sig.issuer_fingerprint();
        self.keys.iter().find_map(|k| {
            let mine = std::iter::once((k.primary_key.key_id(), k.primary_key.fingerprint()))
                .chain(
                    k.public_subkeys
                        .iter()
                        .map(|s| (s.key_id(), s.fingerprint())),
                )
                .any(|(id, fpr)| ids.contains(&&id) || fprs.contains(&&fpr));
            mine.then(|| format!("{:X}", k.fingerprint()))
        })
    }

    pub fn fingerprints(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| format!("{:X}", k.fingerprint()))
            .collect()
    }
}

fn signer_hint(msg: &Message<'_>) -> String {
    let sig = match msg {
        Message::Signed { reader, .. } => Some(reader.signature()),
        Message::SignedOnePass { reader, .. } => reader.signature(),
        _ => None,
    };
    match sig.and_then(|s| s.issuer_fingerprint().first().map(|f| format!("{f:X}"))) {
        Some(f) => format!(" (signed by {f})"),
        None => String::new(),
    }
}

/// What a simple-signing signature says it signs, read without verifying it (the daemon
/// checks that a client's new signature covers what it was asked to sign).
pub fn signed_data(signature: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut msg = Message::from_bytes(Cursor::new(signature))
        .map_err(|e| format!("not an OpenPGP message: {e}"))?;
    for _ in 0..2 {
        if msg.is_compressed() {
            msg = msg
                .decompress()
                .map_err(|e| format!("OpenPGP message: {e}"))?;
        }
    }
    if !msg.is_signed() {
        return Err("the OpenPGP message is not signed".into());
    }
    let mut data = Vec::new();
    msg.by_ref()
        .take(crate::SIGNATURE_MAX + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("OpenPGP message: {e}"))?;
    if data.len() as u64 > crate::SIGNATURE_MAX {
        return Err("signed payload over the size limit".into());
    }
    Ok(data)
}
