//! Secrets in transit (control-api.md): the daemon holds an RSA-2048 key pair for its
//! lifetime and publishes the public key (PEM, PKIX `PUBLIC KEY`); the client encrypts a
//! password or proxy build arg with RSA-OAEP (SHA-512, MGF1-SHA-512, no label) and sends
//! lower-case hex. aws-lc-rs does the cryptography.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{
    KeySize, OaepPrivateDecryptingKey, OaepPublicEncryptingKey, PrivateDecryptingKey,
    PublicEncryptingKey, OAEP_SHA512_MGF1SHA512,
};
use base64::Engine as _;

/// Where the daemon writes its public key.
pub const PUBLIC_KEY_FILE: &str = "isula-build.pub";

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("RSA key: {0}")]
    Key(String),
    #[error("cannot encrypt: {0}")]
    Encrypt(String),
    #[error("cannot decrypt: the value is not hex RSA-OAEP ciphertext for this daemon's key (was the key file replaced? restart the client)")]
    Decrypt,
}

/// The daemon's key pair.
pub struct KeyPair {
    private: OaepPrivateDecryptingKey,
    public_pem: String,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyPair(<private>)")
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

impl KeyPair {
    pub fn generate() -> Result<KeyPair, SecretError> {
        let private = PrivateDecryptingKey::generate(KeySize::Rsa2048)
            .map_err(|e| SecretError::Key(e.to_string()))?;
        let der = private
            .public_key()
            .as_der()
            .map_err(|e| SecretError::Key(e.to_string()))?;
        let public_pem = pem("PUBLIC KEY", der.as_ref());
        let private =
            OaepPrivateDecryptingKey::new(private).map_err(|e| SecretError::Key(e.to_string()))?;
        Ok(KeyPair {
            private,
            public_pem,
        })
    }

    pub fn public_pem(&self) -> &str {
        &self.public_pem
    }

    /// Decrypts a lower-case hex ciphertext to UTF-8 text.
    pub fn decrypt_hex(&self, hex_text: &str) -> Result<String, SecretError> {
        let ct = hex::decode(hex_text.trim()).map_err(|_| SecretError::Decrypt)?;
        let mut out = vec![0u8; self.private.min_output_size()];
        let pt = self
            .private
            .decrypt(&OAEP_SHA512_MGF1SHA512, &ct, &mut out, None)
            .map_err(|_| SecretError::Decrypt)?;
        String::from_utf8(pt.to_vec()).map_err(|_| SecretError::Decrypt)
    }
}

/// A public key read from the daemon's PEM file.
pub struct PublicKey(OaepPublicEncryptingKey);

impl PublicKey {
    pub fn from_pem(text: &str) -> Result<PublicKey, SecretError> {
        let body: String = text
            .lines()
            .map(str::trim)
            .skip_while(|l| *l != "-----BEGIN PUBLIC KEY-----")
            .skip(1)
            .take_while(|l| !l.starts_with("-----END"))
            .collect();
        if body.is_empty() {
            return Err(SecretError::Key("no PUBLIC KEY block".into()));
        }
        let der = base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|e| SecretError::Key(format!("PEM body: {e}")))?;
        let key =
            PublicEncryptingKey::from_der(&der).map_err(|e| SecretError::Key(e.to_string()))?;
        OaepPublicEncryptingKey::new(key)
            .map(PublicKey)
            .map_err(|e| SecretError::Key(e.to_string()))
    }

    /// The largest plaintext one ciphertext can carry (126 bytes for RSA-2048).
    pub fn max_plaintext(&self) -> usize {
        self.0.max_plaintext_size(&OAEP_SHA512_MGF1SHA512)
    }

    pub fn encrypt_hex(&self, plaintext: &str) -> Result<String, SecretError> {
        if plaintext.len() > self.max_plaintext() {
            return Err(SecretError::Encrypt(format!(
                "the value is {} bytes; at most {} fit in one RSA-2048 block",
                plaintext.len(),
                self.max_plaintext()
            )));
        }
        let mut out = vec![0u8; self.0.ciphertext_size()];
        let ct = self
            .0
            .encrypt(
                &OAEP_SHA512_MGF1SHA512,
                plaintext.as_bytes(),
                &mut out,
                None,
            )
            .map_err(|e| SecretError::Encrypt(e.to_string()))?;
        Ok(hex::encode(ct))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let k = KeyPair::generate().expect("key");
        assert!(k.public_pem().starts_with("-----BEGIN PUBLIC KEY-----\n"));
        let p = PublicKey::from_pem(k.public_pem()).expect("pem");
        assert_eq!(p.max_plaintext(), 126);
        let ct = p.encrypt_hex("s3cret:pässword").expect("enc");
        assert_eq!(ct.len(), 512);
        assert!(ct
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_eq!(k.decrypt_hex(&ct).expect("dec"), "s3cret:pässword");
        // Another daemon's key cannot read it; junk is refused.
        let other = KeyPair::generate().expect("key");
        assert!(other.decrypt_hex(&ct).is_err());
        assert!(k.decrypt_hex("zz").is_err());
        assert!(p.encrypt_hex(&"x".repeat(127)).is_err());
        assert!(PublicKey::from_pem("nonsense").is_err());
    }
}
