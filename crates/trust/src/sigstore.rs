//! Sigstore (cosign) with public keys: PEM public keys (`PUBLIC KEY`, PKIX) and their
//! base64 ASN.1 ECDSA (or Ed25519, RSA) signatures over the payload; encrypted private
//! keys in cosign's format (PEM `ENCRYPTED SIGSTORE PRIVATE KEY` or `ENCRYPTED COSIGN
//! PRIVATE KEY` holding JSON: scrypt key derivation, NaCl secretbox, a PKCS#8 key), which
//! the client decrypts to sign. Attachments (the `sha256-<hex>.sig` manifest) are the
//! registry crate's; their constants are here.

use aws_lc_rs::rand::SecureRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair, UnparsedPublicKey};
use base64::Engine as _;
use crypto_secretbox::aead::{Aead, KeyInit};
use crypto_secretbox::XSalsa20Poly1305;

/// Media type of a signature layer in an attachment manifest.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The layer annotation holding the base64 signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";

/// The attachment tag for a manifest digest (`sha256:<hex>` → `sha256-<hex>.sig`).
pub fn attachment_tag(digest: &str) -> String {
    format!("{}.sig", digest.replacen(':', "-", 1))
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Parses a PEM document: its type and body.
pub fn pem_decode(text: &[u8]) -> Result<(String, Vec<u8>), String> {
    let text = std::str::from_utf8(text).map_err(|_| "not a PEM file (not text)".to_string())?;
    let start = text
        .find("-----BEGIN ")
        .ok_or_else(|| "not a PEM file (no BEGIN line)".to_string())?;
    let rest = &text[start + 11..];
    let end_label = rest
        .find("-----")
        .ok_or_else(|| "not a PEM file (bad BEGIN line)".to_string())?;
    let label = rest[..end_label].to_string();
    let body_start = end_label + 5;
    let end_marker = format!("-----END {label}-----");
    let body_end = rest
        .find(&end_marker)
        .ok_or_else(|| format!("not a PEM file (no END {label} line)"))?;
    let body: String = rest[body_start..body_end]
        .lines()
        .filter(|l| !l.contains(':'))
        .collect::<Vec<_>>()
        .concat();
    let der = B64
        .decode(body.trim())
        .map_err(|e| format!("PEM {label}: bad base64: {e}"))?;
    Ok((label, der))
}

pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let b = B64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A sigstore public key (PKIX DER).
pub struct PublicKey {
    spki: Vec<u8>,
}

impl PublicKey {
    pub fn from_pem(bytes: &[u8]) -> Result<PublicKey, String> {
        let (label, der) = pem_decode(bytes)?;
        if label != "PUBLIC KEY" {
            return Err(format!("a PEM {label}, not a PUBLIC KEY"));
        }
        let k = PublicKey { spki: der };
        // A key no algorithm accepts is refused now, not at each signature.
        if k.algorithms().next().is_none() {
            return Err("not an ECDSA, Ed25519 or RSA public key".into());
        }
        Ok(k)
    }

    fn algorithms(
        &self,
    ) -> impl Iterator<Item = &'static dyn signature::VerificationAlgorithm> + '_ {
        let all: [&'static dyn signature::VerificationAlgorithm; 5] = [
            &signature::ECDSA_P256_SHA256_ASN1,
            &signature::ECDSA_P384_SHA384_ASN1,
            &signature::ED25519,
            &signature::RSA_PKCS1_2048_8192_SHA256,
            &signature::RSA_PSS_2048_8192_SHA256,
        ];
        all.into_iter()
            .filter(move |alg| signature::ParsedPublicKey::new(*alg, &self.spki).is_ok())
    }

    /// Verifies a base64 signature over `payload`.
    pub fn verify(&self, payload: &[u8], signature_b64: &str) -> Result<(), String> {
        let sig = B64
            .decode(signature_b64.trim())
            .map_err(|e| format!("signature is not base64: {e}"))?;
        for alg in self.algorithms() {
            if UnparsedPublicKey::new(alg, &self.spki)
                .verify(payload, &sig)
                .is_ok()
            {
                return Ok(());
            }
        }
        Err("signature does not verify".into())
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ScryptParams {
    #[serde(rename = "N")]
    n: u64,
    r: u32,
    p: u32,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Kdf {
    name: String,
    params: ScryptParams,
    salt: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Cipher {
    name: String,
    nonce: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Encrypted {
    kdf: Kdf,
    cipher: Cipher,
    ciphertext: String,
}

fn derive(pass: &[u8], salt: &[u8], p: &ScryptParams) -> Result<[u8; 32], String> {
    if !p.n.is_power_of_two() || p.n < 2 || p.n > 1 << 20 {
        return Err(format!("scrypt N={} is not a power of two up to 2^20", p.n));
    }
    let params = scrypt::Params::new(p.n.trailing_zeros() as u8, p.r, p.p, 32)
        .map_err(|e| format!("scrypt parameters: {e}"))?;
    let mut key = [0u8; 32];
    scrypt::scrypt(pass, salt, &params, &mut key).map_err(|e| format!("scrypt: {e}"))?;
    Ok(key)
}

/// A decrypted signing key.
pub struct PrivateKey {
    pair: EcdsaKeyPair,
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey(..)")
    }
}

/// The passphrase as a passphrase file holds it: its first line.
pub fn passphrase_from_file(bytes: &[u8]) -> Vec<u8> {
    let line = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
    line.strip_suffix(b"\r").unwrap_or(line).to_vec()
}

impl PrivateKey {
    /// Decrypts a cosign-format encrypted private key (`what` names it in errors).
    pub fn decrypt(
        what: &str,
        pem: &[u8],
        passphrase: &[u8],
    ) -> Result<PrivateKey, crate::TrustError> {
        let err = |reason: String| crate::TrustError::SigningKey {
            what: what.to_string(),
            reason,
        };
        let (label, body) = pem_decode(pem).map_err(err)?;
        if label != "ENCRYPTED SIGSTORE PRIVATE KEY" && label != "ENCRYPTED COSIGN PRIVATE KEY" {
            return Err(err(format!(
                "a PEM {label}, not an ENCRYPTED SIGSTORE PRIVATE KEY or ENCRYPTED COSIGN PRIVATE KEY"
            )));
        }
        let enc: Encrypted = serde_json::from_slice(&body)
            .map_err(|e| err(format!("encrypted key is not cosign's JSON: {e}")))?;
        if enc.kdf.name != "scrypt" || enc.cipher.name != "nacl/secretbox" {
            return Err(err(format!(
                "unsupported encryption {} / {}",
                enc.kdf.name, enc.cipher.name
            )));
        }
        let b = |s: &str, f: &str| B64.decode(s).map_err(|e| err(format!("{f}: {e}")));
        let salt = b(&enc.kdf.salt, "salt")?;
        let nonce = b(&enc.cipher.nonce, "nonce")?;
        let ct = b(&enc.ciphertext, "ciphertext")?;
        if nonce.len() != 24 {
            return Err(err("nonce is not 24 bytes".into()));
        }
        let key = derive(passphrase, &salt, &enc.kdf.params).map_err(err)?;
        let cipher = XSalsa20Poly1305::new(&key.into());
        let plain = cipher
            .decrypt(crypto_secretbox::Nonce::from_slice(&nonce), ct.as_ref())
            .map_err(|_| err("wrong passphrase (the key does not decrypt)".into()))?;
        let pair = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &plain)
            .map_err(|e| err(format!("not an ECDSA P-256 PKCS#8 key: {e}")))?;
        Ok(PrivateKey { pair })
    }

    /// Signs `payload`: the base64 ASN.1 signature.
    pub fn sign(&self, payload: &[u8]) -> Result<String, crate::TrustError> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let sig = self
            .pair
            .sign(&rng, payload)
            .map_err(|_| crate::TrustError::Signature("ECDSA signing failed".into()))?;
        Ok(B64.encode(sig.as_ref()))
    }

    /// The public key as PEM (PKIX).
    pub fn public_pem(&self) -> Result<String, crate::TrustError> {
        use aws_lc_rs::encoding::AsDer;
        let der = self
            .pair
            .public_key()
            .as_der()
            .map_err(|_| crate::TrustError::Signature("encoding the public key".into()))?;
        Ok(pem_encode("PUBLIC KEY", der.as_ref()))
    }
}

/// A new P-256 key pair: the encrypted private key PEM (cosign's format, `label` either
/// of the two it accepts) and the public key PEM. For tests and for users without cosign.
pub fn generate(passphrase: &[u8], label: &str) -> Result<(String, String), crate::TrustError> {
    let fail = |what: &str| crate::TrustError::Signature(format!("generating a key: {what}"));
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| fail("ECDSA"))?;
    let mut salt = [0u8; 32];
    let mut nonce = [0u8; 24];
    rng.fill(&mut salt).map_err(|_| fail("random"))?;
    rng.fill(&mut nonce).map_err(|_| fail("random"))?;
    let params = ScryptParams {
        n: 32768,
        r: 8,
        p: 1,
    };
    let key = derive(passphrase, &salt, &params).map_err(|e| fail(&e))?;
    let ct = XSalsa20Poly1305::new(&key.into())
        .encrypt(crypto_secretbox::Nonce::from_slice(&nonce), pkcs8.as_ref())
        .map_err(|_| fail("secretbox"))?;
    let enc = Encrypted {
        kdf: Kdf {
            name: "scrypt".into(),
            params,
            salt: B64.encode(salt),
        },
        cipher: Cipher {
            name: "nacl/secretbox".into(),
            nonce: B64.encode(nonce),
        },
        ciphertext: B64.encode(ct),
    };
    let body = serde_json::to_vec(&enc).map_err(|_| fail("JSON"))?;
    let private = pem_encode(label, &body);
    let decrypted = PrivateKey::decrypt("new key", private.as_bytes(), passphrase)?;
    Ok((private, decrypted.public_pem()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_sign_verify() {
        let (private, public) = generate(b"pw", "ENCRYPTED SIGSTORE PRIVATE KEY").expect("gen");
        let k = PrivateKey::decrypt("k", private.as_bytes(), b"pw").expect("decrypt");
        let sig = k.sign(b"hello").expect("sign");
        let p = PublicKey::from_pem(public.as_bytes()).expect("public");
        p.verify(b"hello", &sig).expect("verifies");
        assert!(p.verify(b"hellO", &sig).is_err());
        let e = PrivateKey::decrypt("k", private.as_bytes(), b"wrong").expect_err("wrong pw");
        assert!(e.to_string().contains("wrong passphrase"), "{e}");
        assert!(PublicKey::from_pem(b"garbage").is_err());
        assert_eq!(attachment_tag("sha256:abc"), "sha256-abc.sig");
    }
}
