//! Secrets in transit (control-api.md): the daemon holds an RSA-2048 key pair for its
//! lifetime and publishes the public key (PEM, PKIX `PUBLIC KEY`); the client encrypts a
//! password or proxy build arg with RSA-OAEP (SHA-512, MGF1-SHA-512, no label) and sends
//! lower-case hex. A value too long for one RSA block (a build secret) is sealed: AES-256-GCM
//! under a fresh key, the key (hex) RSA-OAEP-encrypted as above. aws-lc-rs does the
//! cryptography.

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

/// The largest secret value sealed for the daemon (BuildKit's limit is 500 KB).
pub const SEALED_MAX: usize = 512 * 1024;

/// A value sealed for the daemon: `key` is the hex RSA-OAEP ciphertext of the hex AES-256
/// key; `ciphertext` is AES-256-GCM of the value (tag appended) under `nonce`.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

fn aead_key(raw: &[u8]) -> Result<aws_lc_rs::aead::LessSafeKey, SecretError> {
    aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, raw)
        .map(aws_lc_rs::aead::LessSafeKey::new)
        .map_err(|_| SecretError::Decrypt)
}

impl PublicKey {
    /// Seals `value` (at most [`SEALED_MAX`] bytes) for the daemon.
    pub fn seal(&self, value: &[u8]) -> Result<Sealed, SecretError> {
        if value.len() > SEALED_MAX {
            return Err(SecretError::Encrypt(format!(
                "the value is {} bytes, over the limit of {SEALED_MAX}",
                value.len()
            )));
        }
        let mut raw = [0u8; 32];
        let mut nonce = [0u8; aws_lc_rs::aead::NONCE_LEN];
        aws_lc_rs::rand::fill(&mut raw).map_err(|e| SecretError::Encrypt(e.to_string()))?;
        aws_lc_rs::rand::fill(&mut nonce).map_err(|e| SecretError::Encrypt(e.to_string()))?;
        let key = aead_key(&raw).map_err(|_| SecretError::Encrypt("AES key".into()))?;
        let mut ciphertext = value.to_vec();
        key.seal_in_place_append_tag(
            aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
            aws_lc_rs::aead::Aad::empty(),
            &mut ciphertext,
        )
        .map_err(|e| SecretError::Encrypt(e.to_string()))?;
        let wrapped = self.encrypt_hex(&hex::encode(raw))?;
        raw.fill(0);
        Ok(Sealed {
            key: wrapped,
            nonce: nonce.to_vec(),
            ciphertext,
        })
    }
}

impl KeyPair {
    /// Opens what [`PublicKey::seal`] sealed for this daemon.
    pub fn unseal(&self, sealed: &Sealed) -> Result<Vec<u8>, SecretError> {
        let hex_key = self.decrypt_hex(&sealed.key)?;
        let mut raw = hex::decode(hex_key.trim()).map_err(|_| SecretError::Decrypt)?;
        let key = aead_key(&raw);
        raw.fill(0);
        let nonce = aws_lc_rs::aead::Nonce::try_assume_unique_for_key(&sealed.nonce)
            .map_err(|_| SecretError::Decrypt)?;
        let mut buf = sealed.ciphertext.clone();
        let plain = key?
            .open_in_place(nonce, aws_lc_rs::aead::Aad::empty(), &mut buf)
            .map_err(|_| SecretError::Decrypt)?
            .len();
        buf.truncate(plain);
        Ok(buf)
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

    #[test]
    fn sealed_values_open_only_with_the_key_and_untouched() {
        let k = KeyPair::generate().expect("key");
        let p = PublicKey::from_pem(k.public_pem()).expect("pem");
        let value: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let s = p.seal(&value).expect("seal");
        assert!(!s.ciphertext.windows(16).any(|w| w == &value[..16]));
        assert_eq!(k.unseal(&s).expect("open"), value);
        assert_eq!(k.unseal(&p.seal(b"").expect("seal")).expect("open"), b"");
        let other = KeyPair::generate().expect("key");
        assert!(other.unseal(&s).is_err());
        let mut bad = s.clone();
        bad.ciphertext[5] ^= 1;
        assert!(k.unseal(&bad).is_err());
        let mut bad = s;
        bad.nonce.pop();
        assert!(k.unseal(&bad).is_err());
        assert!(p.seal(&vec![0; SEALED_MAX + 1]).is_err());
    }
}
