//! `ctr-img push` and `-o docker://`: every layer goes up compressed, gzip or zstd as the
//! push asks (`--compression`, else the daemon's `compression`). A layer stored in that
//! compression goes as it is; else its form in that compression, made already (gzip in the
//! background, or either by an earlier push) is skipped when the registry has it, mounted
//! from another repository of the same registry when one is known to hold it, else
//! uploaded in one PUT (chunked PATCH as the fallback). A form not made yet goes up as it
//! is made on every core, in one streamed PATCH, while the store keeps it beside the
//! layer's other forms (the ordinary way if the stream fails). Blob bodies go through
//! [`crate::upload`] in big pieces. Then the config, then the
//! manifest. zstd layers need an OCI manifest (a Docker schema 2 manifest has no media type
//! for them): see [`format_for`].

use crate::client::{Client, Req};
use crate::error::{RegistryError, Result};
use crate::pull::scope_pull;
use crate::upload::{self, Answer};
use crate::{resolve, Context};
use isula_store::compression::Compression;
use isula_store::{ImageRecord, Lease, Store};
use isula_transport::{Cancel, Progress};
use isula_types::image::{Descriptor, Manifest};
use isula_types::{limits, media, Digest, Reference};
use reqwest::header::{HeaderName, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::{Method, StatusCode};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `--format`: docker (default) or oci media types, as for archives.
pub use isula_transport::save::Format;
pub use isula_types::compression::{Codec, LayerCompression};

/// How a push sends an image: its manifest format and its layers' compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushOptions {
    pub format: Format,
    pub compression: LayerCompression,
}

/// The manifest format of a push of `compression` layers: `named` is the format the
/// request named ("" names none), `compression_named` whether the request itself named
/// the compression (not the daemon's default). A Docker schema 2 manifest cannot carry
/// zstd layers, so zstd goes in OCI format, unless the same request named both docker and
/// zstd: that is refused (as skopeo and buildah refuse zstd under a forced v2s2 format).
/// Returns the format and, when it was switched, a line saying so.
pub fn format_for(
    named: &str,
    compression: LayerCompression,
    compression_named: bool,
) -> Result<(Format, Option<String>)> {
    let format = Format::parse(named)?;
    if !compression.codec.is_zstd() || format == Format::Oci {
        return Ok((format, None));
    }
    if named == "docker" && compression_named {
        return Err(RegistryError::Invalid(
            "--compression zstd needs the oci format: a docker (schema 2) manifest has no \
             media type for zstd layers; push with --format oci, or with --compression gzip"
                .into(),
        ));
    }
    Ok((
        Format::Oci,
        Some("Pushing in OCI format: zstd layers need an OCI manifest\n".into()),
    ))
}

pub(crate) fn scope_push(repo: &str) -> String {
    format!("repository:{repo}:pull,push")
}

/// How one blob got to the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Exists,
    Mounted,
    Uploaded,
}

pub(crate) fn location(
    client: &Client,
    resp: &reqwest::blocking::Response,
    what: &str,
) -> Result<String> {
    location_in(client, resp.headers(), resp.url(), what)
}

/// The `Location` of an answer from `base`, made absolute.
fn location_in(
    client: &Client,
    headers: &reqwest::header::HeaderMap,
    base: &reqwest::Url,
    what: &str,
) -> Result<String> {
    let loc = headers
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| client.http_error(what, "upload answer has no Location"))?;
    base.join(loc)
        .map(|u| u.to_string())
        .map_err(|e| client.http_error(what, format!("bad Location {loc:?}: {e}")))
}

pub(crate) fn with_digest(url: &str, d: &Digest) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}digest={d}")
}

/// Sends one blob (read from the content store) to `repo`.
pub fn send_blob(
    client: &Client,
    store: &Store,
    repo: &str,
    digest: &Digest,
    mount_from: &[String],
    cancel: &Cancel,
) -> Result<Sent> {
    send_blob_metered(
        client,
        store,
        repo,
        digest,
        mount_from,
        cancel,
        &Arc::default(),
    )
}

/// `send_blob`, counting the bytes uploaded into `meter` (from 0 on each attempt).
fn send_blob_metered(
    client: &Client,
    store: &Store,
    repo: &str,
    digest: &Digest,
    mount_from: &[String],
    cancel: &Cancel,
    meter: &Arc<AtomicU64>,
) -> Result<Sent> {
    let path = store.content().path(digest);
    let size = store.content().size(digest)?;
    let what = format!("blob {digest} to {repo}");
    let push_scopes = [scope_push(repo)];
    let head = client.send(
        &Req::retryable(
            Method::HEAD,
            format!("/v2/{repo}/blobs/{digest}"),
            &push_scopes,
            what.clone(),
        ),
        &Ok,
    )?;
    if head.status().is_success() {
        return Ok(Sent::Exists);
    }
    // A cross-repository mount: 201 means done, 202 means the registry opened an upload.
    let mut session = None;
    for from in mount_from.iter().filter(|f| f.as_str() != repo) {
        let scopes = [scope_push(repo), scope_pull(from)];
        let resp = client.send(
            &Req::retryable(
                Method::POST,
                format!("/v2/{repo}/blobs/uploads/?mount={digest}&from={from}"),
                &scopes,
                what.clone(),
            ),
            &|rb| Ok(rb.header(CONTENT_LENGTH, 0)),
        )?;
        match resp.status() {
            StatusCode::CREATED => return Ok(Sent::Mounted),
            StatusCode::ACCEPTED => {
                session = Some(location(client, &resp, &what)?);
                break;
            }
            _ => {}
        }
    }
    let mut last = None;
    for attempt in 1..=3u32 {
        cancel.check().map_err(|_| RegistryError::Cancelled)?;
        let start = match session.take() {
            Some(s) => s,
            None => start_upload(client, repo, &what)?,
        };
        let blob = BlobUpload {
            path: &path,
            digest,
            size,
            what: &what,
            meter,
        };
        match put_monolithic(client, repo, &start, &blob) {
            Ok(()) => return Ok(Sent::Uploaded),
            Err(Upload::Refused(status)) => {
                // Some registries want the data in a PATCH: try that way once.
                tracing::debug!(%what, %status, "monolithic upload refused; uploading in a PATCH");
                let start = start_upload(client, repo, &what)?;
                return put_chunked(client, repo, &start, &blob).map(|()| Sent::Uploaded);
            }
            Err(Upload::Fatal(e)) => return Err(e),
            Err(Upload::Retry(e)) => {
                tracing::debug!(%what, error = %e, attempt, "upload failed; retrying");
                last = Some(e);
                std::thread::sleep(Duration::from_millis(250 << attempt));
            }
        }
    }
    Err(last.unwrap_or_else(|| client.http_error(&what, "upload failed")))
}

enum Upload {
    Refused(StatusCode),
    Retry(RegistryError),
    Fatal(RegistryError),
}

fn start_upload(client: &Client, repo: &str, what: &str) -> Result<String> {
    let scopes = [scope_push(repo)];
    let resp = client.send(
        &Req::retryable(
            Method::POST,
            format!("/v2/{repo}/blobs/uploads/"),
            &scopes,
            what.to_string(),
        ),
        &|rb| Ok(rb.header(CONTENT_LENGTH, 0)),
    )?;
    if resp.status() != StatusCode::ACCEPTED {
        return Err(client.status_error(what, resp));
    }
    location(client, &resp, what)
}

fn classify(client: &Client, what: &str, r: Result<Answer>) -> std::result::Result<Answer, Upload> {
    match r {
        Err(e @ RegistryError::Http { .. }) => Err(Upload::Retry(e)),
        Err(e) => Err(Upload::Fatal(e)),
        Ok(a) if a.status.is_server_error() => {
            Err(Upload::Retry(client.answer_error(what, a.status, &a.body)))
        }
        Ok(a) => Ok(a),
    }
}

/// One blob being uploaded.
struct BlobUpload<'a> {
    path: &'a std::path::Path,
    digest: &'a Digest,
    size: u64,
    what: &'a str,
    /// Counts the bytes sent.
    meter: &'a Arc<AtomicU64>,
}

fn put_monolithic(
    client: &Client,
    repo: &str,
    session: &str,
    blob: &BlobUpload<'_>,
) -> std::result::Result<(), Upload> {
    let BlobUpload {
        path,
        digest,
        size,
        what,
        meter,
    } = *blob;
    let scopes = [scope_push(repo)];
    let r = client.send_upload(
        &Req::once(
            Method::PUT,
            with_digest(session, digest),
            &scopes,
            what.to_string(),
        ),
        &[],
        client.upload_timeout(size),
        &|| upload::file_body(path, size, meter),
    );
    let a = classify(client, what, r)?;
    match a.status {
        StatusCode::CREATED => Ok(()),
        StatusCode::BAD_REQUEST => {
            // The registry checked the digest and disagreed: our blob is what it is, so
            // this is not a transport fault; say so.
            Err(Upload::Fatal(client.answer_error(what, a.status, &a.body)))
        }
        s if s == StatusCode::METHOD_NOT_ALLOWED
            || s == StatusCode::RANGE_NOT_SATISFIABLE
            || s == StatusCode::NOT_IMPLEMENTED =>
        {
            Err(Upload::Refused(s))
        }
        _ => Err(Upload::Fatal(client.answer_error(what, a.status, &a.body))),
    }
}

fn put_chunked(client: &Client, repo: &str, session: &str, blob: &BlobUpload<'_>) -> Result<()> {
    let BlobUpload {
        path,
        digest,
        size,
        what,
        meter,
    } = *blob;
    let scopes = [scope_push(repo)];
    let a = client.send_upload(
        &Req::once(
            Method::PATCH,
            session.to_string(),
            &scopes,
            what.to_string(),
        ),
        &[(
            HeaderName::from_static("content-range"),
            format!("0-{}", size.saturating_sub(1)),
        )],
        client.upload_timeout(size),
        &|| upload::file_body(path, size, meter),
    )?;
    if a.status != StatusCode::ACCEPTED && a.status != StatusCode::NO_CONTENT {
        return Err(client.answer_error(what, a.status, &a.body));
    }
    let next = location_in(client, &a.headers, &a.url, what)?;
    let resp = client.send(
        &Req::once(
            Method::PUT,
            with_digest(&next, digest),
            &scopes,
            what.to_string(),
        ),
        &|rb| Ok(rb.header(CONTENT_LENGTH, 0)),
    )?;
    if resp.status() != StatusCode::CREATED {
        return Err(client.status_error(what, resp));
    }
    Ok(())
}

/// Puts a manifest under `tag` (or digest) and checks the digest the registry reports.
pub fn put_manifest(
    client: &Client,
    repo: &str,
    reference: &str,
    bytes: &[u8],
    media_type: &str,
) -> Result<Digest> {
    let scopes = [scope_push(repo)];
    let what = format!("manifest {repo}:{reference}");
    let resp = client.send(
        &Req::retryable(
            Method::PUT,
            format!("/v2/{repo}/manifests/{reference}"),
            &scopes,
            what.clone(),
        ),
        &|rb| Ok(rb.header(CONTENT_TYPE, media_type).body(bytes.to_vec())),
    )?;
    if resp.status() != StatusCode::CREATED && resp.status() != StatusCode::OK {
        return Err(client.status_error(&what, resp));
    }
    let digest = Digest::of_bytes(bytes);
    if let Some(h) = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Digest::parse(v).ok())
    {
        if h != digest {
            return Err(RegistryError::BadContent {
                registry: client.host().to_string(),
                what,
                reason: format!("registry stored {h}, we sent {digest}"),
            });
        }
    }
    Ok(digest)
}

/// One layer of a push: a stored blob that goes up as it is, or one whose compressed form
/// is made while it goes up (its digest known only then).
#[derive(Debug, Clone)]
enum PlannedLayer {
    Ready(Descriptor),
    Compress {
        source: Digest,
        media_type: &'static str,
    },
}

/// The layer media type of `codec` in `format` (zstd only in OCI: [`format_for`]).
fn layer_media_type(format: Format, codec: Codec) -> &'static str {
    match (format, codec) {
        (Format::Docker, Codec::Gzip) => media::DOCKER_LAYER_GZIP,
        (Format::Oci, Codec::Gzip) => media::OCI_LAYER_GZIP,
        (_, Codec::Zstd | Codec::ZstdChunked) => media::OCI_LAYER_ZSTD,
    }
}

/// `d` with `annotations` (none: as it is).
fn with_annotations(
    mut d: Descriptor,
    annotations: std::collections::BTreeMap<String, String>,
) -> Descriptor {
    if !annotations.is_empty() {
        d.annotations = Some(annotations.into_iter().collect());
    }
    d
}

/// How one layer went up, under which descriptor.
type LayerSent = Result<(Descriptor, Sent)>;

/// What a push sends: the layers, and the stored manifest they come from.
struct PushPlan {
    stored: Vec<u8>,
    manifest: Manifest,
    manifest_type: &'static str,
    config_type: &'static str,
    layers: Vec<PlannedLayer>,
    /// The stored manifest cannot go up as it is.
    changed: bool,
}

/// A manifest refused for what it says (a 4xx answer other than auth or not-found) that
/// lists zstd layers: said to be the zstd, naming the registry, the first zstd layer and
/// its media type, so the user knows to push with `--compression gzip`.
pub(crate) fn refused_zstd(client: &Client, manifest: &[u8], e: RegistryError) -> RegistryError {
    let RegistryError::Http { what, reason, .. } = &e else {
        return e;
    };
    // Only a refusal (4xx): a server error or a broken connection says nothing of zstd.
    let refused = reason
        .strip_prefix(crate::client::ANSWERED)
        .is_some_and(|r| r.trim_start().starts_with('4'));
    if !refused {
        return e;
    }
    let Ok(m) = serde_json::from_slice::<Manifest>(manifest) else {
        return e;
    };
    let Some(layer) = m
        .layers
        .iter()
        .find(|l| l.media_type == media::OCI_LAYER_ZSTD)
    else {
        return e;
    };
    RegistryError::Unsupported {
        registry: client.host().to_string(),
        what: what.clone(),
        reason: format!(
            "the registry refused a manifest with zstd layers (layer {}, media type {}): {reason}; \
             push with --compression gzip",
            layer.digest,
            media::OCI_LAYER_ZSTD
        ),
    }
}

/// The manifest to push and the blobs it needs: the stored manifest verbatim when it is
/// already in the target format with layers in the asked compression, else a new one over
/// the layers' forms in that compression.
fn plan_push(
    store: &Store,
    image: &ImageRecord,
    opts: PushOptions,
    lease: &Lease,
) -> Result<PushPlan> {
    let PushOptions {
        format,
        compression,
    } = opts;
    if format == Format::Docker && compression.codec.is_zstd() {
        return Err(RegistryError::Invalid(
            "zstd layers need the oci format (a docker manifest cannot carry them)".into(),
        ));
    }
    let stored = store
        .content()
        .read_small(&image.manifest, limits::MANIFEST_MAX)?;
    let manifest: Manifest = serde_json::from_slice(&stored)
        .map_err(|e| RegistryError::Invalid(format!("stored manifest of {}: {e}", image.id)))?;
    let (manifest_type, config_type) = match format {
        Format::Docker => (media::DOCKER_MANIFEST, media::DOCKER_CONFIG),
        Format::Oci => (media::OCI_MANIFEST, media::OCI_CONFIG),
    };
    let media_type = layer_media_type(format, compression.codec);
    let mut layers = Vec::new();
    let mut changed = image.manifest_media_type != manifest_type;
    for d in &manifest.layers {
        let stored_as = match store.blob_compression(&d.digest)? {
            Compression::Gzip => Some(Codec::Gzip),
            Compression::Zstd => Some(Codec::Zstd),
            _ => None,
        };
        if stored_as == Some(compression.codec) {
            // Stored in the asked compression: it goes up as it is.
            if media_type != d.media_type {
                changed = true;
            }
            layers.push(PlannedLayer::Ready(Descriptor::new(
                media_type,
                d.digest.clone(),
                d.size,
            )));
            continue;
        }
        // Anything else goes up as its form in the asked compression, kept in the store.
        changed = true;
        match store.compressed_form(&d.digest, compression.codec) {
            Some(form) => {
                lease.blob(&form.digest);
                layers.push(PlannedLayer::Ready(with_annotations(
                    Descriptor::new(media_type, form.digest, form.size),
                    form.annotations,
                )));
            }
            None => layers.push(PlannedLayer::Compress {
                source: d.digest.clone(),
                media_type,
            }),
        }
    }
    Ok(PushPlan {
        stored,
        manifest,
        manifest_type,
        config_type,
        layers,
        changed,
    })
}

impl PushPlan {
    /// The manifest to put, its media type and its config, once every layer has its
    /// descriptor (`layers`, in order).
    fn finish(self, layers: Vec<Descriptor>) -> Result<(Vec<u8>, String, Digest)> {
        let config = self.manifest.config.digest.clone();
        if !self.changed && self.manifest.config.media_type == self.config_type {
            return Ok((self.stored, self.manifest_type.to_string(), config));
        }
        let out = Manifest {
            schema_version: 2,
            media_type: Some(self.manifest_type.to_string()),
            config: Descriptor::new(self.config_type, config.clone(), self.manifest.config.size),
            layers,
            annotations: self.manifest.annotations.clone(),
        };
        let bytes = serde_json::to_vec(&out)
            .map_err(|e| RegistryError::Invalid(format!("encoding manifest: {e}")))?;
        Ok((bytes, self.manifest_type.to_string(), config))
    }
}

/// Sends the `how` form (gzip or zstd) of the layer blob `source` while it is made: the
/// form goes into the store and, piece by piece, into one streamed PATCH of an upload,
/// which the digest then closes. When the stream fails, the stored form is sent the
/// ordinary way (with its retries); when the form already exists, only that way.
#[allow(clippy::too_many_arguments)]
fn send_compressed(
    client: &Client,
    store: &Store,
    repo: &str,
    source: &Digest,
    how: LayerCompression,
    lease: &Lease,
    cancel: &Cancel,
    meter: &Arc<AtomicU64>,
) -> Result<(Digest, u64, Sent)> {
    let what = format!("{} of layer {source} to {repo}", how.codec);
    // The stored gzip, the ordinary way.
    let send_stored = |digest: Digest, size: u64| -> Result<(Digest, u64, Sent)> {
        let sources = mount_sources(store, client.host(), &digest);
        let sent = send_blob_metered(client, store, repo, &digest, &sources, cancel, meter)?;
        Ok((digest, size, sent))
    };
    if let Some(made) = store.compressed_form(source, how.codec) {
        // Made since the plan (in idle time, or by another push): no stream to open.
        lease.blob(&made.digest);
        return send_stored(made.digest, made.size);
    }
    let session = start_upload(client, repo, &what)?;
    meter.store(0, Ordering::Relaxed);
    let (tx, pieces) = upload::pieces(None, meter.clone());
    let body = std::sync::Mutex::new(Some(pieces));
    // Each piece the compressor writes goes to the connection whole; a request that is
    // gone stops the copies, never the compression.
    let side: isula_store::Side = Box::new(move |piece: &[u8]| {
        tx.send(bytes::Bytes::from_owner(isula_sys::memory::Piece::copy_of(
            piece,
        )))
    });
    let estimate = store.blob_size(source).unwrap_or(0);
    let scopes = [scope_push(repo)];
    let (gzip, streamed) = std::thread::scope(|s| {
        let gzip = s.spawn(|| store.compressed_blob_streaming(source, how, lease, Some(side)));
        let streamed = client.send_upload(
            &Req::once(Method::PATCH, session.clone(), &scopes, what.clone()),
            &[],
            client.upload_timeout(estimate),
            &|| {
                body.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                    .ok_or_else(|| client.http_error(&what, "the stream cannot be sent twice"))
            },
        );
        // A failed request drops the body, and with it the stream: the gzip goes on into
        // the store alone.
        drop(body.lock().unwrap_or_else(|p| p.into_inner()).take());
        let gzip = gzip.join().unwrap_or_else(|_| {
            Err(isula_store::StoreError::io(
                "gzip",
                store.content().path(source),
                std::io::Error::other("the compressing thread stopped"),
            ))
        });
        (gzip, streamed)
    });
    let (digest, size, made_here) = gzip?;
    if made_here {
        let closed = streamed.and_then(|a| {
            if a.status != StatusCode::ACCEPTED && a.status != StatusCode::NO_CONTENT {
                return Err(client.answer_error(&what, a.status, &a.body));
            }
            let next = location_in(client, &a.headers, &a.url, &what)?;
            let resp = client.send(
                &Req::once(
                    Method::PUT,
                    with_digest(&next, &digest),
                    &scopes,
                    what.clone(),
                ),
                &|rb| Ok(rb.header(CONTENT_LENGTH, 0)),
            )?;
            if resp.status() != StatusCode::CREATED {
                return Err(client.status_error(&what, resp));
            }
            Ok(())
        });
        match closed {
            Ok(()) => return Ok((digest, size, Sent::Uploaded)),
            Err(e) => {
                tracing::debug!(%what, error = %e, "streamed upload failed; sending the stored {}", how.codec)
            }
        }
    }
    send_stored(digest, size)
}

/// Repositories of the same registry that hold `blob`, from the names of stored images
/// that use it (pulled images): candidates for a cross-repository mount.
fn mount_sources(store: &Store, host: &str, blob: &Digest) -> Vec<String> {
    let mut out = Vec::new();
    for img in store.images() {
        if !img.blobs.contains(blob) {
            continue;
        }
        for n in &img.names {
            if let Ok(r) = Reference::parse(n) {
                if r.domain() == host && !out.contains(&r.path().to_string()) {
                    out.push(r.path().to_string());
                }
            }
        }
    }
    out
}

/// Pushes the stored image `name` to `dest` (default: `name` itself).
pub fn push(
    ctx: &Context,
    store: &Store,
    name: &str,
    dest: Option<&str>,
    opts: PushOptions,
    cancel: &Cancel,
    progress: Progress<'_>,
) -> Result<Digest> {
    let image = store.resolve(name)?;
    let dest_name = dest.unwrap_or(name);
    let dest = Reference::parse(dest_name)
        .map_err(|e| RegistryError::Invalid(format!("{dest_name:?}: {e}")))?;
    if dest.digest().is_some() {
        return Err(RegistryError::Invalid(format!(
            "{dest_name:?}: push to a tag, not a digest"
        )));
    }
    resolve::check_policy(ctx.policy.as_ref(), &dest)?;
    let endpoint = resolve::push_endpoint(&ctx.registries, &dest)?;
    let client = ctx.client(endpoint)?;
    let repo = dest.path().to_string();
    let tag = dest.tag().unwrap_or("latest").to_string();
    if store.attestations(&image.id).is_empty() {
        return push_image(store, &client, &image, &repo, &tag, opts, cancel, progress)
            .map(|p| p.digest);
    }
    // supply chain: an image with attestations goes up as BuildKit's layout, an image
    // index of the image and its attestation manifest.
    let pushed = push_image(store, &client, &image, &repo, "", opts, cancel, progress)?;
    let platform = crate::attestations::platform_of(store, &image)?;
    let names = crate::attestations::subject_names(&dest, &platform);
    let att = crate::attestations::push_attestations(
        store, &client, &image, &pushed, &names, &repo, cancel, progress,
    )?;
    let mut desc = Descriptor::new(&pushed.media_type, pushed.digest.clone(), pushed.size);
    desc.platform = Some(platform);
    let bytes = crate::attestations::index_bytes(vec![desc], att.into_iter().collect())?;
    progress("Writing image index with attestations\n".into());
    put_manifest(&client, &repo, &tag, &bytes, media::OCI_INDEX)
}

/// What a pushed image manifest is, for listing it in a manifest list.
pub struct Pushed {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
}

/// Sends `image`'s blobs and then its manifest to `repo`, under `reference` (a tag, or the
/// manifest's own digest when empty).
#[allow(clippy::too_many_arguments)]
pub fn push_image(
    store: &Store,
    client: &Client,
    image: &ImageRecord,
    repo: &str,
    reference: &str,
    opts: PushOptions,
    cancel: &Cancel,
    progress: Progress<'_>,
) -> Result<Pushed> {
    let lease = store.lease();
    let plan = plan_push(store, image, opts, &lease)?;
    progress("Getting image source signatures\n".into());
    // Layers go up PARALLEL at a time; their lines follow in manifest order.
    let layers = &plan.layers;
    let next = std::sync::atomic::AtomicUsize::new(0);
    let outcomes: Vec<std::sync::Mutex<Option<LayerSent>>> =
        layers.iter().map(|_| std::sync::Mutex::new(None)).collect();
    let failed = std::sync::atomic::AtomicBool::new(false);
    let meters: Vec<Arc<AtomicU64>> = layers.iter().map(|_| Arc::default()).collect();
    let phase =
        isula_store::phase::Phase::start("push: the blobs (gzip or zstd if not made, upload)");
    std::thread::scope(|s| {
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        for _ in 0..crate::pull::PARALLEL.min(layers.len()) {
            let done = done_tx.clone();
            let (next, failed, outcomes, meters, lease) =
                (&next, &failed, &outcomes, &meters, &lease);
            s.spawn(move || loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= layers.len() || failed.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(done);
                    break;
                }
                let r = cancel
                    .check()
                    .map_err(|_| RegistryError::Cancelled)
                    .and_then(|()| match &layers[i] {
                        PlannedLayer::Ready(d) => {
                            let sources = mount_sources(store, client.host(), &d.digest);
                            send_blob_metered(
                                client, store, repo, &d.digest, &sources, cancel, &meters[i],
                            )
                            .map(|sent| (d.clone(), sent))
                        }
                        PlannedLayer::Compress { source, media_type } => send_compressed(
                            client,
                            store,
                            repo,
                            source,
                            opts.compression,
                            lease,
                            cancel,
                            &meters[i],
                        )
                        .map(|(digest, size, sent)| {
                            // A zstd:chunked form's table positions go on its descriptor.
                            let annotations = store
                                .compressed_form(source, opts.compression.codec)
                                .map(|f| f.annotations)
                                .unwrap_or_default();
                            (
                                with_annotations(
                                    Descriptor::new(media_type, digest, size),
                                    annotations,
                                ),
                                sent,
                            )
                        }),
                    });
                if r.is_err() {
                    failed.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                if let Ok(mut slot) = outcomes[i].lock() {
                    *slot = Some(r);
                }
            });
        }
        drop(done_tx);
        // This thread reports the uploads' bytes until every worker has stopped. A gzip
        // being made is shown under its layer's blob, against that blob's size.
        let report = |progress: &mut dyn FnMut(String)| {
            for (l, m) in layers.iter().zip(&meters) {
                let sent = m.load(Ordering::Relaxed);
                if sent > 0 {
                    let (b, total) = match l {
                        PlannedLayer::Ready(d) => (&d.digest, d.size),
                        PlannedLayer::Compress { source, .. } => {
                            (source, store.blob_size(source).unwrap_or(sent))
                        }
                    };
                    progress(isula_transport::progress::event(
                        &isula_transport::progress::short(b.as_str()),
                        "Uploading",
                        sent,
                        total.max(sent),
                    ));
                }
            }
        };
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            done_rx.recv_timeout(isula_transport::progress::INTERVAL)
        {
            report(progress);
        }
        report(progress);
    });
    drop(phase);
    let mut descriptors = Vec::new();
    for outcome in outcomes {
        match outcome.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(Ok((d, Sent::Exists))) => {
                progress(format!(
                    "Copying blob {} skipped: already exists\n",
                    d.digest
                ));
                descriptors.push(d);
            }
            Some(Ok((d, _))) => {
                progress(format!("Copying blob {}\n", d.digest));
                descriptors.push(d);
            }
            Some(Err(e)) => return Err(e),
            None => {}
        }
    }
    if failed.load(std::sync::atomic::Ordering::SeqCst) || descriptors.len() != layers.len() {
        return Err(client.http_error(&format!("push to {repo}"), "a layer upload failed"));
    }
    let (manifest, media_type, config) = plan.finish(descriptors)?;
    progress(format!("Copying config {config}\n"));
    send_blob(client, store, repo, &config, &[], cancel)?;
    progress("Writing manifest to image destination\n".into());
    let by_digest = Digest::of_bytes(&manifest).to_string();
    let reference = if reference.is_empty() {
        by_digest.as_str()
    } else {
        reference
    };
    let digest = put_manifest(client, repo, reference, &manifest, &media_type)
        .map_err(|e| refused_zstd(client, &manifest, e))?;
    progress("Storing signatures\n".into());
    drop(lease);
    Ok(Pushed {
        digest,
        size: manifest.len() as u64,
        media_type,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zstd() -> LayerCompression {
        LayerCompression {
            codec: Codec::Zstd,
            level: None,
        }
    }

    #[test]
    fn zstd_goes_in_oci_unless_docker_and_zstd_were_both_named() {
        // gzip keeps the format asked for, docker by default.
        let gzip = LayerCompression::default();
        for (named, want) in [
            ("", Format::Docker),
            ("docker", Format::Docker),
            ("oci", Format::Oci),
        ] {
            let (f, note) = format_for(named, gzip, true).expect("gzip");
            assert_eq!(f, want, "{named:?}");
            assert!(note.is_none());
        }
        // zstd: OCI, said when it was switched.
        let (f, note) = format_for("oci", zstd(), true).expect("oci zstd");
        assert_eq!((f, note), (Format::Oci, None));
        let (f, note) = format_for("", zstd(), true).expect("zstd, no format");
        assert_eq!(f, Format::Oci);
        assert!(note.is_some_and(|n| n.contains("OCI")));
        // The daemon's default zstd with a client that always names docker (0.9.6): OCI.
        let (f, _) = format_for("docker", zstd(), false).expect("default zstd");
        assert_eq!(f, Format::Oci);
        // Both named: refused, saying what to do.
        let e = format_for("docker", zstd(), true).expect_err("docker and zstd");
        assert_eq!(e.kind(), isula_store::ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("--format oci"), "{e}");
        assert!(format_for("v2s1", gzip, true).is_err());
    }

    #[test]
    fn layer_media_types() {
        assert_eq!(
            layer_media_type(Format::Docker, Codec::Gzip),
            media::DOCKER_LAYER_GZIP
        );
        assert_eq!(
            layer_media_type(Format::Oci, Codec::Gzip),
            media::OCI_LAYER_GZIP
        );
        assert_eq!(
            layer_media_type(Format::Oci, Codec::Zstd),
            media::OCI_LAYER_ZSTD
        );
    }
}
