//! `ctr-img pull` and the pulls a build makes for FROM: resolve the name (search
//! registries, mirrors, rewriting), fetch the manifest (picking this platform from a list),
//! then the config and layers. Layers download in parallel (bounded), each streamed into the
//! content store while hashed and committed only when digest and size match, then
//! unpacked and checked against the config's diff IDs. Nothing is recorded unless the whole
//! image checks out; the manifest and config are kept byte for byte.

use crate::client::{Client, Req};
use crate::error::{RegistryError, Result};
use crate::resolve::{self, Source};
use crate::Context;
use isula_store::{LayerRecord, Lease, NewImage, Store};
use isula_transport::{Cancel, Guarded, Progress};
use isula_types::image::{Descriptor, ImageConfig, Index, Manifest};
use isula_types::platform::BuildPlatform;
use isula_types::{limits, media, ChainId, Digest, ImageId, Reference};
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::Method;
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Layers downloaded at once.
pub const PARALLEL: usize = 3;

pub struct Pulled {
    pub id: ImageId,
    /// The name the image is recorded under (the search registry that had it).
    pub reference: Reference,
}

pub(crate) const MANIFEST_ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";

pub(crate) fn scope_pull(repo: &str) -> String {
    format!("repository:{repo}:pull")
}

/// A manifest as fetched: verbatim bytes, media type, digest.
pub struct Fetched {
    pub bytes: Vec<u8>,
    pub media_type: String,
    pub digest: Digest,
}

/// Fetches a manifest by tag or digest, verifying its digest when it was asked for by one
/// (and against `Docker-Content-Digest` when the registry sends it).
pub fn get_manifest(client: &Client, repo: &str, reference: &str) -> Result<Fetched> {
    let scopes = [scope_pull(repo)];
    let what = format!("manifest {repo}:{reference}");
    let resp = client.send(
        &Req::retryable(
            Method::GET,
            format!("/v2/{repo}/manifests/{reference}"),
            &scopes,
            what.clone(),
        ),
        &|rb| Ok(rb.header(ACCEPT, MANIFEST_ACCEPT)),
    )?;
    if !resp.status().is_success() {
        return Err(client.status_error(&what, resp));
    }
    let header_type = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or(v).trim().to_string());
    let header_digest = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Digest::parse(v).ok());
    let bad = |reason: String| RegistryError::BadContent {
        registry: client.host().to_string(),
        what: what.clone(),
        reason,
    };
    let mut bytes = Vec::new();
    resp.take(limits::MANIFEST_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| client.http_error(&what, client.describe_io(&e)))?;
    if bytes.len() as u64 > limits::MANIFEST_MAX {
        return Err(bad(format!(
            "larger than the limit of {} bytes",
            limits::MANIFEST_MAX
        )));
    }
    let digest = Digest::of_bytes(&bytes);
    if let Ok(want) = Digest::parse(reference) {
        if want != digest {
            return Err(bad(format!(
                "digest mismatch: asked for {want}, got {digest}"
            )));
        }
    }
    if let Some(h) = header_digest {
        if h != digest {
            return Err(bad(format!(
                "digest mismatch: registry says {h}, content is {digest}"
            )));
        }
    }
    // The body's own mediaType wins; OCI lets it be absent, then the registry's
    // Content-Type (what the pusher declared) says, then the body's shape.
    let body = serde_json::from_slice::<serde_json::Value>(&bytes)
        .map_err(|e| bad(format!("not JSON: {e}")))?;
    let media_type = match body["mediaType"].as_str() {
        Some(t) => t.to_string(),
        None => header_type
            .filter(|t| media::manifest_kind(t) != media::ManifestKind::Other)
            .or_else(|| media::guess_manifest_type(&body).map(str::to_string))
            .ok_or_else(|| bad("neither its body nor the registry says what it is".into()))?,
    };
    Ok(Fetched {
        bytes,
        media_type,
        digest,
    })
}

/// An index entry that describes another entry (a BuildKit attestation), not an image.
fn is_attestation(d: &Descriptor) -> bool {
    d.annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(media::REFERENCE_TYPE_ANNOTATION))
        || d.platform
            .as_ref()
            .is_some_and(|p| p.os == "unknown" && p.architecture == "unknown")
}

/// Refuses a manifest that is not an image manifest: schema 1, nested lists, artifacts.
fn check_manifest_kind(media_type: &str) -> std::result::Result<(), String> {
    match media::manifest_kind(media_type) {
        media::ManifestKind::Image => Ok(()),
        media::ManifestKind::Schema1 => Err(format!(
            "{media_type} (Docker schema 1) is not supported: push the image again with a current client"
        )),
        media::ManifestKind::List => Err(format!(
            "an entry of the manifest list is itself a list ({media_type})"
        )),
        media::ManifestKind::Other => Err(format!(
            "media type {media_type} is not a container image manifest"
        )),
    }
}

/// Refuses, before anything is downloaded, an image whose config or layers this builder
/// cannot use: artifact configs, foreign layers, encrypted or unknown layer media types.
fn check_image_contents(manifest: &Manifest) -> std::result::Result<(), String> {
    if !media::is_image_config(&manifest.config.media_type) {
        return Err(format!(
            "config media type {} is not a container image config (an artifact, not an image)",
            manifest.config.media_type
        ));
    }
    for d in &manifest.layers {
        let kind = media::layer_type(&d.media_type);
        if kind == media::LayerType::Unsupported {
            return Err(format!(
                "layer {} has media type {}, which is not an image layer this builder unpacks (tar, tar+gzip, tar+zstd)",
                d.digest, d.media_type
            ));
        }
        if kind == media::LayerType::Foreign || d.urls.is_some() {
            return Err(format!(
                "layer {} is a foreign layer ({}), stored outside the registry",
                d.digest, d.media_type
            ));
        }
    }
    Ok(())
}

/// The entry of a manifest list for linux on this machine's architecture.
pub fn pick_platform(index: &Index, what: &str) -> std::result::Result<Descriptor, String> {
    pick_platform_for(index, what, &BuildPlatform::host())
}

/// The entry of a manifest list for `want` (Docker's normalisation; an entry without a
/// variant is the architecture's default).
pub fn pick_platform_for(
    index: &Index,
    what: &str,
    want: &BuildPlatform,
) -> std::result::Result<Descriptor, String> {
    // Attestation entries (BuildKit's, platform unknown/unknown) are never images to run.
    let found = index.manifests.iter().find(|d| {
        !is_attestation(d)
            && d.platform
                .as_ref()
                .is_some_and(|p| want.matches(&p.os, &p.architecture, p.variant.as_deref()))
    });
    match found {
        Some(d) => Ok(d.clone()),
        None => {
            let have: Vec<String> = index
                .manifests
                .iter()
                .filter(|d| !is_attestation(d))
                .filter_map(|d| d.platform.as_ref())
                .map(|p| match &p.variant {
                    Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                    None => format!("{}/{}", p.os, p.architecture),
                })
                .collect();
            Err(format!(
                "{what} has no image for {want} (it has: {})",
                if have.is_empty() {
                    "none".to_string()
                } else {
                    have.join(", ")
                }
            ))
        }
    }
}

fn blob_what(repo: &str, desc: &Descriptor) -> String {
    format!("blob {} of {repo}", desc.digest)
}

/// Starts the download of a blob: the response, once its status says success.
pub(crate) fn get_blob(
    client: &Client,
    repo: &str,
    desc: &Descriptor,
) -> Result<reqwest::blocking::Response> {
    let what = blob_what(repo, desc);
    let resp = client.send(
        &Req::retryable(
            Method::GET,
            format!("/v2/{repo}/blobs/{}", desc.digest),
            &[scope_pull(repo)],
            what.clone(),
        ),
        &Ok,
    )?;
    if !resp.status().is_success() {
        return Err(client.status_error(&what, resp));
    }
    Ok(resp)
}

/// Downloads one blob into the content store (leased), verifying digest and size.
pub fn fetch_blob(
    client: &Client,
    repo: &str,
    desc: &Descriptor,
    store: &Store,
    lease: &Lease,
    cancel: &Cancel,
) -> Result<()> {
    let what = blob_what(repo, desc);
    let mut last = None;
    for attempt in 1..=3u32 {
        let resp = get_blob(client, repo, desc)?;
        let mut w = store.content().writer()?;
        let mut reader = Guarded {
            inner: resp,
            cancel: cancel.clone(),
            remaining: desc.size,
        };
        match std::io::copy(&mut reader, &mut w) {
            Ok(_) => {
                return lease
                    .commit_blob(w, Some((&desc.digest, Some(desc.size))))
                    .map(|_| ())
                    .map_err(|e| RegistryError::BadContent {
                        registry: client.host().to_string(),
                        what: what.clone(),
                        reason: e.to_string(),
                    });
            }
            Err(e) if isula_transport::is_cancelled(&e) => return Err(RegistryError::Cancelled),
            Err(e) if e.kind() == std::io::ErrorKind::FileTooLarge => {
                return Err(RegistryError::BadContent {
                    registry: client.host().to_string(),
                    what,
                    reason: format!("larger than the {} bytes the manifest says", desc.size),
                })
            }
            Err(e) => {
                tracing::debug!(%what, error = %e, attempt, "blob download interrupted");
                last = Some(e);
                std::thread::sleep(std::time::Duration::from_millis(250 << attempt));
            }
        }
    }
    Err(client.http_error(
        &what,
        last.map_or_else(|| "download failed".to_string(), |e| client.describe_io(&e)),
    ))
}

/// Pulls `name` into the store.
pub fn pull(
    ctx: &Context,
    store: &Store,
    name: &str,
    cancel: &Cancel,
    progress: Progress<'_>,
) -> Result<Pulled> {
    pull_for(ctx, store, name, &BuildPlatform::host(), cancel, progress)
}

/// [`pull`] of the image for `platform` (from a manifest list, its entry for it; a single
/// image must be for it).
pub fn pull_for(
    ctx: &Context,
    store: &Store,
    name: &str,
    platform: &BuildPlatform,
    cancel: &Cancel,
    progress: Progress<'_>,
) -> Result<Pulled> {
    let candidates = resolve::candidates(&ctx.registries, name)?;
    // Each candidate (search registries in order), each of its sources (mirrors first):
    // the first that delivers wins. Cancellation and local store failures stop at once.
    let mut errors: Vec<RegistryError> = Vec::new();
    for candidate in &candidates {
        let sources = resolve::check_policy(ctx.policy.as_ref(), candidate)
            .and_then(|()| resolve::pull_sources(&ctx.registries, candidate));
        let sources = match sources {
            Ok(s) => s,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        for source in &sources {
            match pull_from(ctx, store, source, candidate, platform, cancel, progress) {
                Ok(id) => {
                    return Ok(Pulled {
                        id,
                        reference: candidate.clone(),
                    })
                }
                Err(e @ (RegistryError::Cancelled | RegistryError::Store(_))) => return Err(e),
                Err(e) => {
                    tracing::debug!(source = %source.reference, error = %e, "source failed");
                    errors.push(e);
                }
            }
        }
    }
    if errors.len() == 1 {
        if let Some(e) = errors.pop() {
            return Err(e);
        }
    }
    let all_missing = errors
        .iter()
        .all(|e| matches!(e, RegistryError::NotFound { .. }));
    let msgs: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    Err(RegistryError::AllSourcesFailed {
        name: name.to_string(),
        missing: all_missing,
        errors: msgs.join("; "),
    })
}

fn pull_from(
    ctx: &Context,
    store: &Store,
    source: &Source,
    name: &Reference,
    platform: &BuildPlatform,
    cancel: &Cancel,
    progress: Progress<'_>,
) -> Result<ImageId> {
    let client = ctx.client(source.endpoint.clone())?;
    let repo = source.reference.path().to_string();
    let wanted = match source.reference.digest() {
        Some(d) => d.to_string(),
        None => source.reference.tag().unwrap_or("latest").to_string(),
    };
    let mut fetched = get_manifest(&client, &repo, &wanted)?;
    // supply chain: the attestation manifest an index has for the image taken.
    let mut attestation: Option<Descriptor> = None;
    if media::manifest_kind(&fetched.media_type) == media::ManifestKind::List {
        let what = format!("manifest list {repo}:{wanted}");
        let index: Index =
            serde_json::from_slice(&fetched.bytes).map_err(|e| RegistryError::BadContent {
                registry: client.host().to_string(),
                what: what.clone(),
                reason: e.to_string(),
            })?;
        let d = pick_platform_for(&index, &what, platform).map_err(RegistryError::Invalid)?;
        attestation = index
            .manifests
            .iter()
            .find(|e| isula_attest::intoto::attestation_target(e).as_ref() == Some(&d.digest))
            .cloned();
        fetched = get_manifest(&client, &repo, d.digest.as_str())?;
    }
    // supply chain: policy.json's signature requirements, on the image manifest taken (of
    // a list, the entry's, as containers/image checks the instance it copies), before
    // anything is stored.
    crate::signatures::verify_pull(ctx, &client, &repo, name, &fetched)?;
    let what = format!("manifest {repo}:{wanted}");
    let bad = |reason: String| RegistryError::BadContent {
        registry: client.host().to_string(),
        what: what.clone(),
        reason,
    };
    let unsupported = |reason: String| RegistryError::Unsupported {
        registry: client.host().to_string(),
        what: what.clone(),
        reason,
    };
    check_manifest_kind(&fetched.media_type).map_err(unsupported)?;
    let manifest: Manifest =
        serde_json::from_slice(&fetched.bytes).map_err(|e| bad(e.to_string()))?;
    check_image_contents(&manifest).map_err(unsupported)?;
    if manifest.config.size > limits::MANIFEST_MAX {
        return Err(bad(format!(
            "config of {} bytes is over the limit",
            manifest.config.size
        )));
    }
    let lease = store.lease();
    let result = pull_leased(
        store, &client, &repo, &fetched, &manifest, name, cancel, progress, &lease,
    );
    drop(lease);
    if result.is_err() {
        if let Err(e) = store.gc() {
            tracing::warn!(error = %e, "collecting after a failed pull");
        }
    }
    let id = result?;
    if let Some(entry) = &attestation {
        // The image is whole without them: attestations that cannot be read are said,
        // not a failed pull.
        match crate::attestations::pull_attestations(
            store,
            &client,
            &repo,
            entry,
            &fetched.digest,
            &id,
            cancel,
        ) {
            Ok(n) => progress(format!("Stored {n} attestations\n")),
            Err(e @ RegistryError::Cancelled) => return Err(e),
            Err(e) => {
                tracing::warn!(image = %id, error = %e, "attestations not stored");
                progress(format!("[Warning] attestations not stored: {e}\n"));
            }
        }
    }
    Ok(id)
}

#[allow(clippy::too_many_arguments)]
fn pull_leased(
    store: &Store,
    client: &Client,
    repo: &str,
    fetched: &Fetched,
    manifest: &Manifest,
    name: &Reference,
    cancel: &Cancel,
    progress: Progress<'_>,
    lease: &Lease,
) -> Result<ImageId> {
    progress("Getting image source signatures\n".into());
    // The config first: it says what the layers must be.
    if !store.content().contains(&manifest.config.digest) {
        fetch_blob(client, repo, &manifest.config, store, lease, cancel)?;
    } else {
        lease.blob(&manifest.config.digest);
    }
    let config_bytes = store
        .content()
        .read_small(&manifest.config.digest, limits::MANIFEST_MAX)?;
    let bad = |reason: String| RegistryError::BadContent {
        registry: client.host().to_string(),
        what: format!("image {repo}@{}", fetched.digest),
        reason,
    };
    let config: ImageConfig =
        serde_json::from_slice(&config_bytes).map_err(|e| bad(format!("config: {e}")))?;
    let diff_ids = &config.rootfs.diff_ids;
    if diff_ids.len() != manifest.layers.len() {
        return Err(bad(format!(
            "config lists {} layers, manifest {}",
            diff_ids.len(),
            manifest.layers.len()
        )));
    }
    if config.os != "linux" && !config.os.is_empty() {
        return Err(bad(format!("image is for {}, not linux", config.os)));
    }
    let chains = ChainId::chain(diff_ids);
    let mut sizes = vec![0u64; manifest.layers.len()];
    for (i, d) in manifest.layers.iter().enumerate() {
        progress(format!("Copying blob {}\n", d.digest));
        lease.layer(&chains[i]);
        lease.blob(&d.digest);
        if let Ok(rec) = store.layer(&chains[i]) {
            sizes[i] = rec.size;
        }
    }
    // Download and unpack, PARALLEL layers at a time; this thread reports their bytes.
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<RegistryError>> = Mutex::new(None);
    let sizes_out = Mutex::new(sizes);
    let meters: Vec<Arc<AtomicU64>> = manifest.layers.iter().map(|_| Arc::default()).collect();
    let phase = isula_store::phase::Phase::start("pull: download, store and unpack the layers");
    std::thread::scope(|s| {
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        for _ in 0..PARALLEL.min(manifest.layers.len()) {
            let done = done_tx.clone();
            let meters = &meters;
            let (next, failed, first_error, sizes_out) = (&next, &failed, &first_error, &sizes_out);
            let chains = &chains;
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= manifest.layers.len() || failed.load(Ordering::SeqCst) {
                    drop(done);
                    break;
                }
                let d = &manifest.layers[i];
                let r = layer(
                    store,
                    client,
                    repo,
                    d,
                    &diff_ids[i],
                    &chains[i],
                    lease,
                    cancel,
                    meters[i].clone(),
                );
                match r {
                    Ok(Some(size)) => {
                        if let Ok(mut s) = sizes_out.lock() {
                            s[i] = size;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        failed.store(true, Ordering::SeqCst);
                        if let Ok(mut f) = first_error.lock() {
                            f.get_or_insert(e);
                        }
                        drop(done);
                        break;
                    }
                }
            });
        }
        drop(done_tx);
        let report = |progress: &mut dyn FnMut(String)| {
            for (d, m) in manifest.layers.iter().zip(&meters) {
                let got = m.load(Ordering::Relaxed);
                if got > 0 {
                    progress(isula_transport::progress::event(
                        &isula_transport::progress::short(d.digest.as_str()),
                        "Downloading",
                        got,
                        d.size.max(got),
                    ));
                }
            }
        };
        // Every worker drops its sender when it stops: then the channel disconnects.
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            done_rx.recv_timeout(isula_transport::progress::INTERVAL)
        {
            report(progress);
        }
        report(progress);
    });
    drop(phase);
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let sizes = sizes_out.into_inner().unwrap_or_else(|p| p.into_inner());
    progress(format!("Copying config {}\n", manifest.config.digest));
    let manifest_digest = lease.put_blob(store.content(), &fetched.bytes)?;
    progress("Writing manifest to image destination\n".into());
    progress("Storing signatures\n".into());
    let records = chains
        .iter()
        .enumerate()
        .map(|(i, c)| LayerRecord {
            chain_id: c.clone(),
            diff_id: diff_ids[i].clone(),
            parent: i.checked_sub(1).map(|p| chains[p].clone()),
            size: sizes[i],
        })
        .collect();
    let id = ImageId(manifest.config.digest.clone());
    store.add_image(NewImage {
        id: id.clone(),
        manifest: manifest_digest,
        manifest_media_type: fetched.media_type.clone(),
        blobs: manifest.layers.iter().map(|d| d.digest.clone()).collect(),
        layers: records,
        created: config.created.clone(),
        names: vec![name.clone()],
    })?;
    // A build makes the directories of packed layers, or the machine when idle.
    for c in &chains {
        if !store.layer_unpacked(c) {
            store.queue_unpack(c);
        }
    }
    Ok(id)
}

/// Makes one layer present: its blob downloaded and its diff checked, kept packed (either
/// skipped when already there; the directory is made when a build needs it). Returns the
/// uncompressed size when it checked it.
#[allow(clippy::too_many_arguments)]
fn layer(
    store: &Store,
    client: &Client,
    repo: &str,
    desc: &Descriptor,
    diff_id: &isula_types::DiffId,
    chain: &ChainId,
    lease: &Lease,
    cancel: &Cancel,
    meter: Arc<AtomicU64>,
) -> Result<Option<u64>> {
    // Leased before they are looked at (see `transport::load`).
    lease.layer(chain);
    lease.blob(&desc.digest);
    let have_blob = store.content().contains(&desc.digest);
    if store.layer_present(chain) {
        if !have_blob {
            fetch_blob(client, repo, desc, store, lease, cancel)?;
        }
        return Ok(None);
    }
    let what = format!("layer {} of {repo}", desc.digest);
    let unpacked = fetch_unpacked_metered(store, client, repo, desc, lease, cancel, meter, true)?;
    if &unpacked.diff_id != diff_id {
        return Err(RegistryError::BadContent {
            registry: client.host().to_string(),
            what,
            reason: format!(
                "diff ID mismatch: config says {diff_id}, layer is {}",
                unpacked.diff_id
            ),
        });
    }
    let size = unpacked.size;
    match unpacked.staged {
        Some(staged) => store.commit_layer(staged, chain, lease)?,
        None => store.commit_packed_layer(chain, &desc.digest, lease)?,
    }
    Ok(Some(size))
}

/// A layer blob unpacked into a staged directory: the stored blob when the content store
/// has it, else downloaded and unpacked in one pass (retried on transport faults).
pub fn fetch_unpacked(
    store: &Store,
    client: &Client,
    repo: &str,
    desc: &Descriptor,
    lease: &Lease,
    cancel: &Cancel,
) -> Result<isula_transport::archive::Unpacked> {
    fetch_unpacked_metered(
        store,
        client,
        repo,
        desc,
        lease,
        cancel,
        Arc::default(),
        false,
    )
}

/// `fetch_unpacked`, adding the bytes downloaded to `meter` (reset on each attempt); with
/// `packed`, the layer is only checked and hashed, not unpacked.
#[allow(clippy::too_many_arguments)]
fn fetch_unpacked_metered(
    store: &Store,
    client: &Client,
    repo: &str,
    desc: &Descriptor,
    lease: &Lease,
    cancel: &Cancel,
    meter: Arc<AtomicU64>,
    packed: bool,
) -> Result<isula_transport::archive::Unpacked> {
    if store.content().contains(&desc.digest) {
        lease.blob(&desc.digest);
        return Ok(if packed {
            isula_transport::archive::check_blob(store, &desc.digest)?
        } else {
            isula_transport::archive::unpack_blob(store, &desc.digest)?
        });
    }
    let what = format!("layer {} of {repo}", desc.digest);
    let mut attempt = 0;
    loop {
        attempt += 1;
        meter.store(0, Ordering::Relaxed);
        match stream_layer(
            store,
            client,
            repo,
            desc,
            lease,
            cancel,
            meter.clone(),
            packed,
        ) {
            Ok(u) => return Ok(u),
            Err(e @ RegistryError::Http { .. }) if attempt < 3 => {
                tracing::debug!(%what, error = %e, attempt, "layer download interrupted; retrying");
                std::thread::sleep(std::time::Duration::from_millis(250 << attempt));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reads a channel of chunks as one stream.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(c) => {
                    // The chunk read goes back to the pool it came from.
                    isula_sys::memory::give_piece(std::mem::replace(&mut self.cur, c));
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Downloads a layer and unpacks it in one pass, on two threads: one receives, stores and
/// hashes the compressed blob and decompresses it; the other hashes the tar and unpacks it.
/// The blob is committed only if its digest and size match; the staged layer is dropped on
/// any failure. With `packed`, the tar is only checked as the unpack would check it.
#[allow(clippy::too_many_arguments)]
fn stream_layer(
    store: &Store,
    client: &Client,
    repo: &str,
    desc: &Descriptor,
    lease: &Lease,
    cancel: &Cancel,
    meter: Arc<AtomicU64>,
    packed: bool,
) -> Result<isula_transport::archive::Unpacked> {
    let what = blob_what(repo, desc);
    let resp = get_blob(client, repo, desc)?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(8);
    let host = client.host().to_string();
    let bad = |reason: String| RegistryError::BadContent {
        registry: host.clone(),
        what: what.clone(),
        reason,
    };
    let (produced, consumed) = std::thread::scope(|s| {
        // Network errors fail the producer; a stream that does not decompress is noted and
        // the rest still drained, so that the digest can say whether the blob was intact.
        type Produced =
            std::result::Result<(isula_store::BlobWriter, Option<String>), std::io::Error>;
        let producer = s.spawn(move || -> Produced {
            let mut writer = store.content().writer().map_err(std::io::Error::other)?;
            let mut decode_error = None;
            {
                let mut tee = isula_store::TeeReader {
                    inner: Guarded {
                        inner: isula_transport::progress::Counted {
                            inner: resp,
                            count: meter,
                        },
                        cancel: cancel.clone(),
                        remaining: desc.size,
                    },
                    sink: &mut writer,
                };
                let decoded = (|| -> std::io::Result<()> {
                    let (_, mut plain) = isula_store::compression::decompress(&mut tee)?;
                    loop {
                        // Pooled: a fresh 256 KiB buffer is mapped and faulted in each time.
                        let mut chunk = isula_sys::memory::take_piece(256 << 10);
                        chunk.resize(256 << 10, 0);
                        let n = plain.read(&mut chunk)?;
                        if n == 0 || {
                            chunk.truncate(n);
                            tx.send(chunk).is_err()
                        } {
                            return Ok(());
                        }
                    }
                })();
                drop(tx);
                if let Err(e) = decoded {
                    if e.kind() != std::io::ErrorKind::InvalidData
                        && e.kind() != std::io::ErrorKind::UnexpectedEof
                        && e.kind() != std::io::ErrorKind::InvalidInput
                    {
                        return Err(e);
                    }
                    decode_error = Some(format!("layer data: {e}"));
                }
                std::io::copy(&mut tee, &mut std::io::sink())?;
            }
            Ok((writer, decode_error))
        });
        let reader = ChannelReader {
            rx,
            cur: Vec::new(),
            pos: 0,
        };
        let consumed = if packed {
            isula_transport::archive::check_stream(reader, true)
        } else {
            isula_transport::archive::unpack_stream(store, reader, true)
        };
        let produced = producer
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("download thread panicked")));
        (produced, consumed)
    });
    let (writer, decode_error) = match produced {
        Ok(w) => w,
        Err(e) if isula_transport::is_cancelled(&e) => return Err(RegistryError::Cancelled),
        Err(e) if e.kind() == std::io::ErrorKind::FileTooLarge => {
            return Err(bad(format!(
                "larger than the {} bytes the manifest says",
                desc.size
            )))
        }
        Err(e) => return Err(client.http_error(&what, client.describe_io(&e))),
    };
    // A corrupted blob is named as such before whatever its unpacking tripped over.
    lease
        .commit_blob(writer, Some((&desc.digest, Some(desc.size))))
        .map_err(|e| bad(e.to_string()))?;
    if let Some(reason) = decode_error {
        return Err(bad(reason));
    }
    let unpacked = consumed.map_err(bad)?;
    Ok(unpacked.with_diff_id(&desc.digest))
}
