//! Separated images (`ctr-img save -b/-l/-r/-d`, `ctr-img load -d/-b/-l/--no-check`), as
//! isula-build 0.9.6 defines them (the spec: `separated-images.md` in the project's shared
//! spec). An app image FROM an optional lib image FROM a one-layer base image is saved as
//! three gzip'd tarballs of docker-archive pieces (base layer, lib layers, app layers with
//! `manifest.json`) plus a `manifest` index with their sha256; apps that share a base or a
//! lib share its tarball. Load checks the hashes and merges the pieces back into one
//! docker-archive, streamed into the ordinary load.
//!
//! Where the original is plainly wrong (spec §9) this does the sensible thing: an empty
//! `lib` means no lib, rename values must be plain file names, two apps whose file names
//! would collide are refused, and apps with layers of equal content save fine.

use crate::load::{load_stream, Loaded};
use crate::save::{append_blob, append_bytes};
use crate::{copy_lines, Cancel, ClientFiles, Progress, Result, TransportError};
use isula_store::{ImageRecord, Store};
use isula_types::{limits, DiffId, Digest, Reference};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Every entry of a separated tarball carries this time (isula-build's "2017-01-00", which
/// Go normalises to 2016-12-31T00:00:00Z).
const PACK_MTIME: u64 = 1_483_142_400;
/// The largest manifest or rename file read.
const SMALL_FILE_MAX: u64 = 10 << 20;
/// The largest base or lib tarball a client may name.
const TARBALL_MAX: u64 = 50 << 30;

/// What `ctr-img save -b BASE [-l LIB] [-r RENAME] [-d DEST] APP...` asks for.
pub struct SaveSpec {
    pub apps: Vec<String>,
    pub base: String,
    pub lib: Option<String>,
    pub rename: Option<PathBuf>,
    pub dest: PathBuf,
}

/// What `ctr-img load -i APP -d DIR [-b BASE] [-l LIB] [--no-check]` asks for.
pub struct LoadSpec {
    pub app: String,
    pub dir: PathBuf,
    pub base: Option<PathBuf>,
    pub lib: Option<PathBuf>,
    pub skip_check: bool,
}

/// One app's entry of the `manifest` index (fields in isula-build's order).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexEntry {
    pub app: String,
    #[serde(rename = "appHash")]
    pub app_hash: String,
    #[serde(rename = "appLayers")]
    pub app_layers: Vec<String>,
    #[serde(default)]
    pub lib: String,
    #[serde(rename = "libHash", default)]
    pub lib_hash: String,
    #[serde(rename = "libImageName", default)]
    pub lib_image_name: String,
    #[serde(rename = "libLayers", default)]
    pub lib_layers: Option<Vec<String>>,
    pub base: String,
    #[serde(rename = "baseHash")]
    pub base_hash: String,
    #[serde(rename = "baseImageName")]
    pub base_image_name: String,
    #[serde(rename = "baseLayer")]
    pub base_layer: String,
}

fn invalid(msg: impl Into<String>) -> TransportError {
    TransportError::Invalid(msg.into())
}

/// `name` with `:latest` when it names no tag (isula-build's RepoTags: not normalised).
fn with_tag(name: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') || name.contains('@') {
        name.to_string()
    } else {
        format!("{name}:latest")
    }
}

/// Serialises like Go's `json.Marshal` of a map: keys sorted, compact, `<>&` and U+2028/9
/// escaped.
fn go_json(map: &BTreeMap<&str, serde_json::Value>) -> String {
    let text = serde_json::to_string(map).unwrap_or_default();
    text.replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
}

/// A layer of an app as a docker-archive's legacy layer directory.
struct LegacyLayer {
    /// The directory name `<L>`.
    id: String,
    /// Its `json` file.
    json: String,
    chain: isula_types::ChainId,
    blob: Digest,
}

/// The legacy layer IDs containers/image writes for an image (spec §5): each a digest of
/// its parent's ID and its chain ID; the top one also of parts of the config.
fn legacy_layers(
    img: &ImageRecord,
    config_bytes: &[u8],
    store: &Store,
) -> Result<Vec<LegacyLayer>> {
    let config: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(config_bytes)
            .map_err(|e| invalid(format!("image {}: config: {e}", img.id)))?;
    let mut out: Vec<LegacyLayer> = Vec::new();
    let mut chain_text = String::new();
    let n = img.layers.len();
    for (i, (chain, blob)) in img.layers.iter().zip(&img.blobs).enumerate() {
        let rec = store.layer(chain)?;
        let diff = rec.diff_id.to_string();
        chain_text = if i == 0 {
            diff.clone()
        } else {
            format!(
                "sha256:{}",
                hex::encode(sha2::Sha256::digest(format!("{chain_text} {diff}")))
            )
        };
        let mut m: BTreeMap<&str, serde_json::Value> = BTreeMap::new();
        if let Some(parent) = out.last() {
            m.insert("parent", parent.id.clone().into());
        }
        if i + 1 == n {
            for attr in [
                "architecture",
                "config",
                "container",
                "container_config",
                "created",
                "docker_version",
                "os",
            ] {
                m.insert(attr, config.get(attr).cloned().unwrap_or_default());
            }
        }
        m.insert("layer_id", chain_text.clone().into());
        let id = hex::encode(sha2::Sha256::digest(go_json(&m)));
        m.insert("id", id.clone().into());
        out.push(LegacyLayer {
            id,
            json: go_json(&m),
            chain: chain.clone(),
            blob: blob.clone(),
        });
    }
    Ok(out)
}

/// A gzip'd tarball being written into the destination, hashed as it is written.
struct Tarball {
    tar: tar::Builder<
        flate2::write::GzEncoder<
            HashingWriter<std::io::BufWriter<isula_sys::WriteBehind<std::fs::File>>>,
        >,
    >,
    pending: Option<isula_sys::PendingFile>,
    dirs: HashSet<String>,
}

struct HashingWriter<W> {
    inner: W,
    hash: sha2::Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl Tarball {
    fn new(files: &dyn ClientFiles, dest: &Path) -> Result<Tarball> {
        let mut pending = files
            .create_pending(dest)
            .map_err(|e| TransportError::io("create", dest, io::Error::other(e.to_string())))?;
        let file = pending
            .file()
            .try_clone()
            .map_err(|e| TransportError::io("create", dest, e))?;
        let hashing = HashingWriter {
            inner: std::io::BufWriter::with_capacity(1 << 20, isula_sys::WriteBehind::new(file)),
            hash: sha2::Sha256::new(),
        };
        Ok(Tarball {
            tar: tar::Builder::new(flate2::write::GzEncoder::new(
                hashing,
                flate2::Compression::default(),
            )),
            pending: Some(pending),
            dirs: HashSet::new(),
        })
    }

    fn dir(&mut self, name: &str) -> Result<()> {
        if !self.dirs.insert(name.to_string()) {
            return Ok(());
        }
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(0o755);
        h.set_mtime(PACK_MTIME);
        let _ = h.set_path(format!("{name}/"));
        h.set_cksum();
        self.tar
            .append(&h, io::empty())
            .map_err(|e| TransportError::io("write", name, e))
    }

    fn layer(&mut self, store: &Store, l: &LegacyLayer, cancel: &Cancel) -> Result<()> {
        self.dir(&l.id)?;
        let rec = store.layer(&l.chain)?;
        append_blob(
            store,
            &mut self.tar,
            &format!("{}/layer.tar", l.id),
            &l.blob,
            Some(&rec),
            cancel,
            PACK_MTIME,
        )?;
        append_bytes(
            &mut self.tar,
            &format!("{}/VERSION", l.id),
            b"1.0",
            PACK_MTIME,
        )?;
        append_bytes(
            &mut self.tar,
            &format!("{}/json", l.id),
            l.json.as_bytes(),
            PACK_MTIME,
        )
    }

    /// Finishes the tarball as `dest/name` (0644); returns its sha256 (hex).
    fn finish(mut self, files: &dyn ClientFiles, dest: &Path, name: &str) -> Result<String> {
        let path = dest.join(name);
        let gz = self
            .tar
            .into_inner()
            .map_err(|e| TransportError::io("write", &path, e))?;
        let mut hashing = gz
            .finish()
            .map_err(|e| TransportError::io("write", &path, e))?;
        hashing
            .flush()
            .map_err(|e| TransportError::io("write", &path, e))?;
        let hash = hex::encode(hashing.hash.finalize());
        let mut pending = self
            .pending
            .take()
            .ok_or_else(|| invalid("tarball finished twice"))?;
        {
            use std::os::unix::fs::PermissionsExt;
            let f = pending.file();
            f.set_permissions(std::fs::Permissions::from_mode(0o644))
                .map_err(|e| TransportError::io("chmod", &path, e))?;
            f.sync_all()
                .map_err(|e| TransportError::io("sync", &path, e))?;
        }
        files
            .persist(pending, &path)
            .map_err(|e| TransportError::io("create", &path, io::Error::other(e.to_string())))?;
        Ok(hash)
    }
}

#[derive(Deserialize)]
struct RenameEntry {
    name: String,
    rename: String,
}

fn read_small_client_file(files: &dyn ClientFiles, path: &Path) -> Result<Vec<u8>> {
    let f = files
        .open(path)
        .map_err(|e| TransportError::io("open", path, e))?;
    let meta = f
        .metadata()
        .map_err(|e| TransportError::io("stat", path, e))?;
    if !meta.is_file() {
        return Err(TransportError::bad(path, "not a regular file"));
    }
    if meta.len() == 0 {
        return Err(TransportError::bad(path, "the file is empty"));
    }
    if meta.len() > SMALL_FILE_MAX {
        return Err(TransportError::bad(path, "the file is over 10 MiB"));
    }
    let mut data = Vec::new();
    f.take(SMALL_FILE_MAX)
        .read_to_end(&mut data)
        .map_err(|e| TransportError::io("read", path, e))?;
    Ok(data)
}

fn read_rename(files: &dyn ClientFiles, path: &Path) -> Result<Vec<RenameEntry>> {
    let data = read_small_client_file(files, path)?;
    let entries: Vec<RenameEntry> =
        serde_json::from_slice(&data).map_err(|e| TransportError::bad(path, e.to_string()))?;
    for e in &entries {
        if !plain_file_name(&e.rename) {
            return Err(TransportError::bad(
                path,
                format!("{:?} is not a plain file name", e.rename),
            ));
        }
    }
    Ok(entries)
}

fn plain_file_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('\0')
}

/// Resolves a name for a separated save: an image ID is refused (the names travel).
fn resolve_named(store: &Store, name: &str) -> Result<ImageRecord> {
    let img = store.resolve(name).map_err(|e| {
        invalid(format!(
            "check save options failed: check image name failed when finding image name {name:?}: {e}"
        ))
    })?;
    let bare = name.strip_prefix("sha256:").unwrap_or(name);
    if img.id.hex().starts_with(bare) {
        return Err(invalid(format!(
            "check save options failed: using image ID {name:?} as image name to save separated image is not allowed"
        )));
    }
    Ok(img)
}

fn diff_ids(store: &Store, img: &ImageRecord) -> Result<Vec<DiffId>> {
    img.layers
        .iter()
        .map(|c| Ok(store.layer(c)?.diff_id))
        .collect()
}

/// One app to save: its image, tags and where its layers divide.
struct AppPlan {
    name_tag: String,
    tags: Vec<String>,
    image: ImageRecord,
    config: Vec<u8>,
    layers: Vec<LegacyLayer>,
    /// Layers `[0, base_end)` go to the base tarball, `[base_end, lib_end)` to the lib one.
    base_end: usize,
    lib_end: usize,
}

/// Saves the apps of `spec` as separated images into `spec.dest` (which must not exist).
pub fn save(
    store: &Store,
    files: &dyn ClientFiles,
    spec: &SaveSpec,
    cancel: &Cancel,
    progress: Progress<'_>,
) -> Result<()> {
    if spec.apps.is_empty() {
        return Err(invalid("save accepts at least one image"));
    }
    // The checks, in isula-build's order: apps, base, lib, rename file.
    let mut apps: Vec<(ImageRecord, Vec<String>)> = Vec::new();
    for name in &spec.apps {
        let img = resolve_named(store, name)?;
        let tag = with_tag(name);
        match apps.iter_mut().find(|(i, _)| i.id == img.id) {
            Some((_, tags)) => {
                if !tags.contains(&tag) {
                    tags.push(tag)
                }
            }
            None => apps.push((img, vec![tag])),
        }
    }
    let base = resolve_named(store, &spec.base)?;
    let lib = spec
        .lib
        .as_deref()
        .map(|l| resolve_named(store, l))
        .transpose()?;
    let renames = match &spec.rename {
        Some(p) => read_rename(files, p).map_err(|e| {
            invalid(format!(
                "check save options failed: check rename file failed: {e}"
            ))
        })?,
        None => Vec::new(),
    };
    let lease = store.lease();
    for (img, _) in &apps {
        for b in img.blobs.iter().chain([img.id.digest()]) {
            lease.blob(b);
        }
        for l in &img.layers {
            lease.layer(l);
        }
    }
    let base_ids = diff_ids(store, &base)?;
    let lib_ids = match &lib {
        Some(l) => diff_ids(store, l)?,
        None => Vec::new(),
    };
    let compare = |msg: String| {
        invalid(format!(
            "process image infos failed: construct image info failed: compare layers failed: {msg}"
        ))
    };
    let mut plans: Vec<AppPlan> = Vec::new();
    for (img, tags) in apps {
        let ids = diff_ids(store, &img)?;
        let distinct: HashSet<&DiffId> = ids.iter().collect();
        if base_ids.len() > 1 {
            return Err(compare(format!(
                "number of base layers {} more than one",
                base_ids.len()
            )));
        }
        if lib_ids.len() >= distinct.len() || base_ids.len() >= distinct.len() {
            return Err(compare(
                "number of base or lib layers is equal or greater than saved app layers".into(),
            ));
        }
        // The base and lib must be what the app is built on, layer for layer.
        if ids[..lib_ids.len()] != lib_ids[..] {
            return Err(compare(format!(
                "dismatch checksum for lib image {}",
                spec.lib.as_deref().unwrap_or_default()
            )));
        }
        if ids[..base_ids.len()] != base_ids[..] {
            return Err(compare(format!(
                "dismatch checksum for base image {}",
                spec.base
            )));
        }
        let config = store
            .content()
            .read_small(img.id.digest(), limits::MANIFEST_MAX)?;
        let layers = legacy_layers(&img, &config, store)?;
        let base_end = base_ids.len();
        let lib_end = if lib.is_some() {
            lib_ids.len()
        } else {
            base_end
        };
        plans.push(AppPlan {
            name_tag: tags[0].clone(),
            tags,
            image: img,
            config,
            layers,
            base_end,
            lib_end,
        });
    }
    plans.sort_by(|a, b| a.name_tag.cmp(&b.name_tag));
    plans.dedup_by(|a, b| a.name_tag == b.name_tag);
    let stem = |name_tag: &str| {
        let (repo, tag) = name_tag.rsplit_once(':').unwrap_or((name_tag, "latest"));
        let short = repo.rsplit('/').next().unwrap_or(repo);
        format!("{short}_{tag}")
    };
    let mut stems: HashMap<String, &str> = HashMap::new();
    for p in &plans {
        if let Some(other) = stems.insert(stem(&p.name_tag), &p.name_tag) {
            return Err(invalid(format!(
                "images {other} and {} would be saved under the same file names",
                p.name_tag
            )));
        }
    }
    files
        .create_dir(&spec.dest)
        .map_err(|e| TransportError::io("create", &spec.dest, e))?;
    let result = write_all(
        store, files, spec, &plans, &renames, &stem, cancel, progress,
    );
    if result.is_err() {
        // A failed split leaves nothing behind.
        let _ = std::fs::remove_dir_all(&spec.dest);
    }
    drop(lease);
    result
}

#[allow(clippy::too_many_arguments)]
fn write_all(
    store: &Store,
    files: &dyn ClientFiles,
    spec: &SaveSpec,
    plans: &[AppPlan],
    renames: &[RenameEntry],
    stem: &dyn Fn(&str) -> String,
    cancel: &Cancel,
    progress: Progress<'_>,
) -> Result<()> {
    let dest = &spec.dest;
    let renamed = |default: String| {
        renames
            .iter()
            .find(|r| r.name == default)
            .map(|r| r.rename.clone())
            .unwrap_or(default)
    };
    let mut used_names: HashSet<String> = HashSet::new();
    let mut claim = |name: String| -> Result<String> {
        if name == "manifest" || !used_names.insert(name.clone()) {
            return Err(invalid(format!(
                "check rename file failed: {name:?} would be written twice"
            )));
        }
        Ok(name)
    };
    // Tarballs already written: base by its layer, lib by its layer list.
    let mut bases: HashMap<String, (String, String)> = HashMap::new();
    let mut libs: HashMap<Vec<String>, (String, String)> = HashMap::new();
    let mut app_layer_owner: HashMap<String, String> = HashMap::new();
    let mut index: BTreeMap<String, IndexEntry> = BTreeMap::new();
    for p in plans {
        cancel
            .check()
            .map_err(|e| TransportError::io("save", dest, e))?;
        let s = stem(&p.name_tag);
        let base_layers = &p.layers[..p.base_end];
        let lib_layers = &p.layers[p.base_end..p.lib_end];
        let app_layers = &p.layers[p.lib_end..];
        // Base.
        let base_l = base_layers
            .first()
            .map(|l| l.id.clone())
            .unwrap_or_default();
        let (base_file, base_hash) = match bases.get(&base_l) {
            Some(done) => done.clone(),
            None => {
                let name = claim(renamed(format!("{s}_base_image.tar.gz")))?;
                let mut t = Tarball::new(files, dest)?;
                for l in base_layers {
                    t.layer(store, l, cancel)?;
                }
                let hash = t.finish(files, dest, &name).map_err(|e| {
                    invalid(format!("process base images {} failed: {e}", p.name_tag))
                })?;
                bases.insert(base_l.clone(), (name.clone(), hash.clone()));
                (name, hash)
            }
        };
        // Lib.
        let lib_ids: Vec<String> = lib_layers.iter().map(|l| l.id.clone()).collect();
        let (lib_file, lib_hash) = if spec.lib.is_none() {
            (String::new(), String::new())
        } else {
            match libs.get(&lib_ids) {
                Some(done) => done.clone(),
                None => {
                    let name = claim(renamed(format!("{s}_lib_image.tar.gz")))?;
                    let mut t = Tarball::new(files, dest)?;
                    for l in lib_layers {
                        t.layer(store, l, cancel)?;
                    }
                    let hash = t.finish(files, dest, &name).map_err(|e| {
                        invalid(format!("process lib images {} failed: {e}", p.name_tag))
                    })?;
                    libs.insert(lib_ids.clone(), (name.clone(), hash.clone()));
                    (name, hash)
                }
            }
        };
        // App.
        let app_file = claim(renamed(format!("{s}_app_image.tar.gz")))?;
        let mut t = Tarball::new(files, dest)?;
        for l in app_layers {
            if let Some(owner) = app_layer_owner.get(&l.id) {
                return Err(invalid(format!(
                    "process app images {} failed: lib layers {} already saved in {owner} for image {}",
                    p.name_tag, l.id, p.name_tag
                )));
            }
            app_layer_owner.insert(l.id.clone(), app_file.clone());
            t.layer(store, l, cancel)?;
        }
        let cfg_name = format!("{}.json", p.image.id.hex());
        append_bytes(&mut t.tar, &cfg_name, &p.config, PACK_MTIME)?;
        let manifest = serde_json::json!([{
            "Config": cfg_name,
            "RepoTags": p.tags,
            "Layers": p.layers.iter().map(|l| format!("{}/layer.tar", l.id)).collect::<Vec<_>>(),
        }]);
        append_bytes(
            &mut t.tar,
            "manifest.json",
            manifest.to_string().as_bytes(),
            PACK_MTIME,
        )?;
        let (repo, tag) = p
            .name_tag
            .rsplit_once(':')
            .unwrap_or((p.name_tag.as_str(), "latest"));
        let top = p.layers.last().map(|l| l.id.clone()).unwrap_or_default();
        let repositories = serde_json::json!({ repo: { tag: top } });
        append_bytes(
            &mut t.tar,
            "repositories",
            repositories.to_string().as_bytes(),
            PACK_MTIME,
        )?;
        let app_hash = t
            .finish(files, dest, &app_file)
            .map_err(|e| invalid(format!("process app images {} failed: {e}", p.name_tag)))?;
        copy_lines(progress, &p.image.blobs, p.image.id.digest());
        index.insert(
            p.name_tag.clone(),
            IndexEntry {
                app: app_file,
                app_hash,
                app_layers: app_layers.iter().map(|l| l.id.clone()).collect(),
                lib: lib_file,
                lib_hash,
                lib_image_name: spec.lib.clone().unwrap_or_default(),
                lib_layers: spec.lib.as_ref().map(|_| lib_ids.clone()),
                base: base_file,
                base_hash,
                base_image_name: spec.base.clone(),
                base_layer: base_l,
            },
        );
    }
    let data = serde_json::to_vec(&index).map_err(|e| invalid(e.to_string()))?;
    let path = dest.join("manifest");
    let mut pending = files
        .create_pending(dest)
        .map_err(|e| TransportError::io("create", &path, io::Error::other(e.to_string())))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let f = pending.file();
        f.write_all(&data)
            .and_then(|_| f.set_permissions(std::fs::Permissions::from_mode(0o600)))
            .and_then(|_| f.sync_all())
            .map_err(|e| TransportError::io("write", &path, e))?;
    }
    files
        .persist(pending, &path)
        .map_err(|e| TransportError::io("create", &path, io::Error::other(e.to_string())))
}

/// Hashes a client file (sha256 hex).
fn hash_file(files: &dyn ClientFiles, path: &Path, cancel: &Cancel) -> Result<String> {
    let f = files
        .open(path)
        .map_err(|e| TransportError::io("open", path, e))?;
    let mut r = crate::Guarded {
        inner: io::BufReader::with_capacity(1 << 20, f),
        cancel: cancel.clone(),
        remaining: TARBALL_MAX,
    };
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = r
            .read(&mut buf)
            .map_err(|e| TransportError::io("read", path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Loads the app `spec.app` from the separated images in `spec.dir`.
pub fn load(
    store: &Store,
    files: &dyn ClientFiles,
    spec: &LoadSpec,
    cancel: &Cancel,
    progress: Progress<'_>,
) -> Result<Vec<Loaded>> {
    Reference::parse(&spec.app)
        .map_err(|e| invalid(format!("process load options failed: {e}")))?;
    let app = with_tag(&spec.app);
    let info = |msg: String| invalid(format!("failed to get tarball info: {msg}"));
    let manifest_path = spec.dir.join("manifest");
    let data = read_small_client_file(files, &manifest_path)
        .map_err(|e| info(format!("load manifest file failed: {e}")))?;
    let index: HashMap<String, IndexEntry> = serde_json::from_slice(&data).map_err(|e| {
        info(format!(
            "load manifest file failed: {}: {e}",
            manifest_path.display()
        ))
    })?;
    let entry = index
        .get(&app)
        .ok_or_else(|| info(format!("failed to find app image {app}")))?;
    if entry.app.is_empty() {
        return Err(info(format!("app image {app} tarball can not be empty")));
    }
    if entry.base.is_empty() {
        return Err(info(format!("base image {app} tarball can not be empty")));
    }
    let in_dir = |name: &str| -> Result<PathBuf> {
        if !plain_file_name(name) {
            return Err(info(format!(
                "{name:?} in {} is not a file name in that directory",
                manifest_path.display()
            )));
        }
        Ok(spec.dir.join(name))
    };
    let base = match &spec.base {
        Some(b) => b.clone(),
        None => in_dir(&entry.base)?,
    };
    // An empty lib is no lib (isula-build would resolve it to the directory itself).
    let lib = match (&spec.lib, entry.lib.is_empty()) {
        (Some(l), _) => Some(l.clone()),
        (None, false) => Some(in_dir(&entry.lib)?),
        (None, true) => None,
    };
    let app_path = in_dir(&entry.app)?;
    let mut pieces: Vec<(&str, PathBuf, &str)> = vec![("base", base, &entry.base_hash)];
    if let Some(l) = lib {
        pieces.push(("lib", l, &entry.lib_hash));
    }
    pieces.push(("app", app_path, &entry.app_hash));
    if !spec.skip_check {
        for (_, path, want) in &pieces {
            let got = hash_file(files, path, cancel).map_err(|e| {
                invalid(format!(
                    "check sum for file {:?} failed: {e}",
                    path.display().to_string()
                ))
            })?;
            if got != **want {
                return Err(invalid(format!(
                    "check sum for file {:?} failed: check sum for path {} failed, got {got}, want {want}",
                    path.display().to_string(),
                    path.display()
                )));
            }
        }
    }
    let mut opened = Vec::new();
    for (kind, path, _) in &pieces {
        let f = files.open(path).map_err(|e| {
            invalid(format!(
                "unpack {kind} image tarball {:?} failed: {e}",
                path.display().to_string()
            ))
        })?;
        opened.push((*kind, path.clone(), f));
    }
    // The pieces merged into one docker-archive, streamed through a pipe into the load.
    let (reader, writer) = io::pipe().map_err(|e| TransportError::io("pipe", &spec.dir, e))?;
    let failure: std::sync::Arc<std::sync::Mutex<Option<String>>> = Default::default();
    let merge_failure = failure.clone();
    let merge_cancel = cancel.clone();
    let merger = std::thread::Builder::new()
        .name("separated-merge".into())
        .spawn(move || {
            let mut tar = tar::Builder::new(io::BufWriter::with_capacity(1 << 20, writer));
            let closing = |e: io::Error| format!("merging the separated images: {e}");
            let result = merge(opened, &mut tar, &merge_cancel)
                .and_then(|()| tar.finish().map_err(closing))
                .and_then(|()| tar.get_mut().flush().map_err(closing));
            // The failure is recorded before the pipe closes: the loader then sees an
            // error, never a clean end of a partial archive.
            if let Err(e) = result {
                *merge_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            }
            drop(tar);
        })
        .map_err(|e| TransportError::io("spawn", &spec.dir, e))?;
    let checked = MergedReader {
        inner: reader,
        failure: failure.clone(),
    };
    let loaded = load_stream(store, checked, &spec.dir, cancel, progress);
    let _ = merger.join();
    if let Some(e) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(invalid(e));
    }
    loaded
}

/// The merged archive: its end is an error when the merge failed.
struct MergedReader {
    inner: io::PipeReader,
    failure: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl Read for MergedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 {
            if let Some(e) = self
                .failure
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
            {
                return Err(io::Error::other(e.clone()));
            }
        }
        Ok(n)
    }
}

/// Writes the entries of every piece into one tar; a top-level name in two pieces is an
/// error, as isula-build's merge reports it.
fn merge<W: Write>(
    pieces: Vec<(&'static str, PathBuf, std::fs::File)>,
    tar: &mut tar::Builder<W>,
    cancel: &Cancel,
) -> std::result::Result<(), String> {
    let mut owners: HashMap<String, &'static str> = HashMap::new();
    for (kind, path, f) in pieces {
        let shown = path.display().to_string();
        let gz = flate2::read::GzDecoder::new(io::BufReader::with_capacity(1 << 20, f));
        let mut archive = tar::Archive::new(crate::Guarded {
            inner: gz,
            cancel: cancel.clone(),
            remaining: limits::LOAD_MAX,
        });
        let unpack = |e: io::Error| format!("unpack {kind} image tarball {shown:?} failed: {e}");
        let mut mine: HashSet<String> = HashSet::new();
        for entry in archive.entries().map_err(unpack)? {
            let mut entry = entry.map_err(unpack)?;
            let name = String::from_utf8_lossy(&entry.path_bytes()).to_string();
            let top = name
                .trim_start_matches("./")
                .split('/')
                .next()
                .unwrap_or_default()
                .to_string();
            if !top.is_empty() && mine.insert(top.clone()) {
                if let Some(other) = owners.insert(top.clone(), kind) {
                    return Err(format!(
                        "reconstruct {kind} file {top:?} failed: it is in the {other} tarball too"
                    ));
                }
            }
            let mut header = entry.header().clone();
            tar.append_data(&mut header, &name, &mut entry)
                .map_err(|e| format!("merging {shown}: {e}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_json_as_isula_build_writes_them() {
        assert_eq!(with_tag("app1"), "app1:latest");
        assert_eq!(with_tag("localhost:5000/app"), "localhost:5000/app:latest");
        assert_eq!(with_tag("a/b:2"), "a/b:2");
        let mut m = BTreeMap::new();
        m.insert("z", serde_json::Value::from("<&>"));
        m.insert("a", serde_json::Value::Null);
        assert_eq!(go_json(&m), r#"{"a":null,"z":"\u003c\u0026\u003e"}"#);
        assert!(!plain_file_name("a/b") && !plain_file_name("") && !plain_file_name(".."));
        assert!(plain_file_name("base1.tar.gz"));
    }
}
