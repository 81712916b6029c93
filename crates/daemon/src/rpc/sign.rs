//! supply chain: signing a push in the client. Once the manifest is pushed, the push's
//! stream ends with a `SignRequest` (the payloads to sign, a token); the client signs with
//! its own key (gpg, or its sigstore key) and answers with `PutSignatures`, which hands
//! the signatures to the waiting push; the push checks they cover what it asked for and
//! stores them (lookaside staging, sigstore attachment). The private keys never reach the
//! daemon. This module owns the pending requests; it must not sign anything itself.

use crate::error;
use crate::state::State;
use isula_api::v1::{ManifestPushResponse, PushResponse, PutSignaturesRequest, SignRequest};
use isula_registry::signatures::{self, NewSignature};
use isula_transport::Cancel;
use isula_trust::payload::{self, Format};
use isula_types::{Digest, Reference};
use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};
use tonic::Status;

/// How long a push waits for its client's signatures.
pub const SIGN_TIMEOUT: Duration = Duration::from_secs(300);

/// A stream line carrying a sign request (turned into `PushResponse.signRequest` by
/// [`push_message`]; never shown as text).
const LINE_PREFIX: &str = "\u{0}sign-request ";

/// What a push's client asked to sign with.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wanted {
    pub simple: bool,
    pub sigstore: bool,
}

impl Wanted {
    pub fn any(self) -> bool {
        self.simple || self.sigstore
    }
}

struct Delivery {
    req: PutSignaturesRequest,
    reply: SyncSender<Result<(), Status>>,
}

/// Pushes waiting for signatures, by token.
static PENDING: LazyLock<Mutex<HashMap<String, SyncSender<Delivery>>>> =
    LazyLock::new(Mutex::default);

fn pending() -> std::sync::MutexGuard<'static, HashMap<String, SyncSender<Delivery>>> {
    PENDING.lock().unwrap_or_else(|p| p.into_inner())
}

/// `PushResponse` for a stream line: text, or the sign request a line carries.
pub fn push_message(line: String) -> PushResponse {
    match sign_request_of(&line) {
        Some(r) => PushResponse {
            response: String::new(),
            progress: None,
            sign_request: Some(r),
        },
        None => PushResponse {
            response: line,
            progress: None,
            sign_request: None,
        },
    }
}

/// `ManifestPushResponse` for a stream line, as [`push_message`].
pub fn manifest_push_message(line: String) -> ManifestPushResponse {
    match sign_request_of(&line) {
        Some(r) => ManifestPushResponse {
            result: String::new(),
            sign_request: Some(r),
        },
        None => ManifestPushResponse {
            result: line,
            sign_request: None,
        },
    }
}

/// The sign request a stream line carries, if it is one.
fn sign_request_of(line: &str) -> Option<SignRequest> {
    let json = line.strip_prefix(LINE_PREFIX)?;
    let v = serde_json::from_str::<serde_json::Value>(json).ok()?;
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    let b = |k: &str| -> Vec<u8> {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(v[k].as_str().unwrap_or_default())
            .unwrap_or_default()
    };
    Some(SignRequest {
        token: s("token"),
        docker_reference: s("reference"),
        manifest_digest: s("digest"),
        simple_payload: b("simple"),
        sigstore_payload: b("sigstore"),
    })
}

/// The destination of a signed push, checked before anything is pushed: somewhere to put
/// each kind of signature.
pub fn check_before_push(
    state: &State,
    dest: &str,
    wanted: Wanted,
) -> Result<Option<Reference>, Status> {
    if !wanted.any() {
        return Ok(None);
    }
    let r = Reference::parse(dest).map_err(|e| error::invalid(format!("{dest:?}: {e}")))?;
    signatures::check_destination(&state.registry, &r, wanted.simple, wanted.sigstore)
        .map_err(crate::rpc::registry::status)?;
    Ok(Some(r))
}

/// After the push of `digest` as `dest`: has the client sign it (and, for a list, each of
/// its images first), one request at a time.
pub fn sign_pushed(
    state: &State,
    dest: &Reference,
    digest: &Digest,
    wanted: Wanted,
    cancel: &Cancel,
    out: &mut dyn FnMut(String),
) -> Result<(), Status> {
    let digests = signatures::digests_to_sign(&state.registry, dest, digest).map_err(|e| {
        error::status(
            e.kind(),
            format!("{dest}: pushed as {digest}, but reading it back to sign it failed: {e}"),
        )
    })?;
    for d in &digests {
        sign_one(state, dest, d, wanted, cancel, out)?;
    }
    Ok(())
}

/// One manifest waiting for its client's signatures: registered under a fresh token
/// until [`Pending::wait`] ends.
struct Pending {
    token: String,
    reference: String,
    digest: Digest,
    simple: Option<Vec<u8>>,
    sigstore: Option<Vec<u8>>,
    rx: std::sync::mpsc::Receiver<Delivery>,
}

impl Pending {
    fn new(dest: &Reference, digest: &Digest, wanted: Wanted) -> Pending {
        let token = hex::encode(rand::random::<[u8; 16]>());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default();
        let reference = dest.to_string();
        let simple = wanted
            .simple
            .then(|| payload::make(Format::SimpleSigning, &reference, digest.as_str(), now));
        let sigstore = wanted
            .sigstore
            .then(|| payload::make(Format::Sigstore, &reference, digest.as_str(), now));
        let (tx, rx) = sync_channel::<Delivery>(1);
        pending().insert(token.clone(), tx);
        Pending {
            token,
            reference,
            digest: digest.clone(),
            simple,
            sigstore,
            rx,
        }
    }

    fn request(&self) -> SignRequest {
        SignRequest {
            token: self.token.clone(),
            docker_reference: self.reference.clone(),
            manifest_digest: self.digest.to_string(),
            simple_payload: self.simple.clone().unwrap_or_default(),
            sigstore_payload: self.sigstore.clone().unwrap_or_default(),
        }
    }

    /// The request as a stream line (see [`push_message`]).
    fn line(&self) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let line = serde_json::json!({
            "token": self.token,
            "reference": self.reference,
            "digest": self.digest.to_string(),
            "simple": self.simple.as_ref().map(|p| b64.encode(p)).unwrap_or_default(),
            "sigstore": self.sigstore.as_ref().map(|p| b64.encode(p)).unwrap_or_default(),
        });
        format!("{LINE_PREFIX}{line}")
    }

    /// Waits for the signatures (the token is gone afterwards, whatever happened), checks
    /// and stores them, and tells `PutSignatures` how that went.
    fn wait(self, state: &State, dest: &Reference, cancel: &Cancel) -> Result<(), Status> {
        let deadline = Instant::now() + SIGN_TIMEOUT;
        let delivery = loop {
            if cancel.check().is_err() {
                pending().remove(&self.token);
                return Err(Status::cancelled(
                    "push cancelled while waiting for signatures",
                ));
            }
            match self.rx.recv_timeout(Duration::from_millis(200)) {
                Ok(d) => break d,
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(_) => {
                    pending().remove(&self.token);
                    return Err(Status::deadline_exceeded(format!(
                        "{}: pushed as {}, but the client sent no signatures within {}s: it is not signed",
                        self.reference,
                        self.digest,
                        SIGN_TIMEOUT.as_secs()
                    )));
                }
            }
        };
        pending().remove(&self.token);
        let result = check_and_store(
            state,
            dest,
            &self.digest,
            self.simple,
            self.sigstore,
            &delivery.req,
        );
        let _ = delivery.reply.send(result.clone());
        if result.is_ok() {
            tracing::info!(image = %self.reference, manifest = %self.digest, "signatures stored");
        }
        result
    }
}

/// Asks the client to sign `digest` as `dest` over the push's stream, waits for the
/// signatures, checks and stores them.
fn sign_one(
    state: &State,
    dest: &Reference,
    digest: &Digest,
    wanted: Wanted,
    cancel: &Cancel,
    out: &mut dyn FnMut(String),
) -> Result<(), Status> {
    let p = Pending::new(dest, digest, wanted);
    out(format!("Signing manifest {digest} as {dest}\n"));
    out(p.line());
    p.wait(state, dest, cancel)?;
    out(format!("Storing signatures of {dest}\n"));
    Ok(())
}

/// For a unary call (a build's `-o docker://`): the sign requests for what was pushed,
/// each waited for on a thread of its own (up to [`SIGN_TIMEOUT`]) and stored when its
/// signatures come.
pub fn ask_later(
    state: &Arc<State>,
    dest: &Reference,
    digest: &Digest,
    wanted: Wanted,
) -> Result<Vec<SignRequest>, Status> {
    let digests = signatures::digests_to_sign(&state.registry, dest, digest).map_err(|e| {
        error::status(
            e.kind(),
            format!("{dest}: pushed as {digest}, but reading it back to sign it failed: {e}"),
        )
    })?;
    let mut out = Vec::new();
    for d in &digests {
        let p = Pending::new(dest, d, wanted);
        out.push(p.request());
        let (state, dest) = (state.clone(), dest.clone());
        std::thread::spawn(move || {
            let never = Cancel::from_flag(Arc::new(std::sync::atomic::AtomicBool::new(false)));
            if let Err(e) = p.wait(&state, &dest, &never) {
                tracing::warn!(image = %dest, error = %e.message(), "signing a built image");
            }
        });
    }
    Ok(out)
}

fn check_and_store(
    state: &State,
    dest: &Reference,
    digest: &Digest,
    simple: Option<Vec<u8>>,
    sigstore: Option<Vec<u8>>,
    req: &PutSignaturesRequest,
) -> Result<(), Status> {
    let mut new = Vec::new();
    if let Some(p) = simple {
        if req.simple_signature.len() as u64 > isula_trust::SIGNATURE_MAX {
            return Err(error::invalid("the simple-signing signature is over 4 MiB"));
        }
        let signed = isula_trust::gpg::signed_data(&req.simple_signature)
            .map_err(|e| error::invalid(format!("simple-signing signature: {e}")))?;
        if signed != p {
            return Err(error::invalid(
                "simple-signing signature: it does not sign the payload the push asked for",
            ));
        }
        new.push(NewSignature::Simple(req.simple_signature.clone()));
    }
    if let Some(p) = sigstore {
        if req.sigstore_signature.trim().is_empty() || req.sigstore_signature.len() > 4096 {
            return Err(error::invalid("sigstore signature: missing or malformed"));
        }
        new.push(NewSignature::Sigstore {
            payload: p,
            signature_b64: req.sigstore_signature.trim().to_string(),
        });
    }
    signatures::store(&state.registry, dest, digest, &new).map_err(|e| {
        error::status(
            e.kind(),
            format!("{dest}: pushed as {digest}, but storing its signatures failed: {e}"),
        )
    })
}

/// `PutSignatures`: hands the signatures to the push waiting for them and returns what
/// storing them gave.
pub fn put_signatures(req: PutSignaturesRequest) -> Result<(), Status> {
    let tx = pending()
        .get(&req.token)
        .cloned()
        .ok_or_else(|| Status::not_found("no push is waiting for signatures with this token"))?;
    let (reply_tx, reply_rx) = sync_channel(1);
    tx.send(Delivery {
        req,
        reply: reply_tx,
    })
    .map_err(|_| Status::not_found("the push waiting for these signatures has ended"))?;
    reply_rx
        .recv()
        .map_err(|_| Status::aborted("the push ended before storing the signatures"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_requests_travel_as_stream_lines() {
        let dest = Reference::parse("r.io/a:1").expect("ref");
        let digest = Digest::of_bytes(b"manifest");
        let p = Pending::new(
            &dest,
            &digest,
            Wanted {
                simple: true,
                sigstore: false,
            },
        );
        let m = push_message(p.line());
        assert!(m.response.is_empty());
        let r = m.sign_request.expect("a sign request");
        assert_eq!(r, p.request());
        let claims = payload::parse(Format::SimpleSigning, &r.simple_payload).expect("payload");
        assert_eq!(claims.docker_reference, "r.io/a:1");
        assert_eq!(claims.manifest_digest, digest.to_string());
        assert!(r.sigstore_payload.is_empty());
        assert_eq!(manifest_push_message(p.line()).sign_request, Some(r));
        assert_eq!(push_message("text\n".into()).response, "text\n");
        pending().remove(&p.token);
        // An unknown token finds no push.
        let e = put_signatures(PutSignaturesRequest {
            token: p.token.clone(),
            ..Default::default()
        })
        .expect_err("no such push");
        assert_eq!(e.code(), tonic::Code::NotFound);
    }
}
