//! `manifest create|annotate|inspect|push` (experimental): local manifest lists over images
//! of the store, kept as small JSON files under `<data root>/manifest-lists/`. A list names
//! images and their platforms; its manifest list is made when it is inspected (over the
//! stored manifests) and when it is pushed (over the manifests as pushed: each image goes to
//! the destination repository by digest first, in the push's layer compression, so the list
//! is complete there).

use crate::error::{RegistryError, Result};
use crate::push::{push_image, Format, LayerCompression};
use crate::{resolve, Context};
use isula_store::Store;
use isula_transport::{Cancel, Progress};
use isula_types::image::{Descriptor, ImageConfig, Index, Platform};
use isula_types::{limits, media, Digest, ImageId, Reference};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Mutex;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    image: ImageId,
    /// The name it was added by, for messages.
    name: String,
    platform: Platform,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ListFile {
    name: String,
    entries: Vec<Entry>,
    /// An OCI image index (a build with `--format oci`), else a Docker manifest list.
    #[serde(default)]
    oci: bool,
}

/// An image a list names, and the platform the list gives it.
#[derive(Debug, Clone)]
pub struct Member {
    pub image: ImageId,
    pub name: String,
    pub platform: Platform,
}

/// `os/arch[/variant]`.
pub fn platform_text(p: &Platform) -> String {
    isula_types::image::platform_string(&p.os, &p.architecture, p.variant.as_deref())
}

/// Platform fields to set on a list entry; empty ones are left as they are.
#[derive(Debug, Default)]
pub struct Annotation {
    pub arch: String,
    pub os: String,
    pub os_features: Vec<String>,
    pub variant: String,
}

pub struct Lists {
    dir: PathBuf,
    lock: Mutex<()>,
}

fn list_name(name: &str) -> Result<Reference> {
    let r = Reference::parse(name.trim())
        .map_err(|e| RegistryError::Invalid(format!("manifest list name {name:?}: {e}")))?;
    if r.digest().is_some() {
        return Err(RegistryError::Invalid(format!(
            "manifest list name {name:?}: a list is named by a tag, not a digest"
        )));
    }
    Ok(r)
}

impl Lists {
    pub fn new(dir: impl Into<PathBuf>) -> Lists {
        Lists {
            dir: dir.into(),
            lock: Mutex::new(()),
        }
    }

    fn path(&self, r: &Reference) -> PathBuf {
        self.dir.join(format!(
            "{}.json",
            Digest::of_bytes(r.to_string().as_bytes()).hex()
        ))
    }

    fn io(&self, op: &str, e: std::io::Error) -> RegistryError {
        RegistryError::Config(format!("{op} {}: {e}", self.dir.display()))
    }

    fn read(&self, r: &Reference) -> Result<ListFile> {
        let p = self.path(r);
        let text = match std::fs::read(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(RegistryError::NotFound {
                    registry: "local store".into(),
                    what: format!("manifest list {}", r.familiar()),
                })
            }
            Err(e) => return Err(self.io("read", e)),
        };
        serde_json::from_slice(&text)
            .map_err(|e| RegistryError::Config(format!("manifest list file {}: {e}", p.display())))
    }

    fn write(&self, r: &Reference, list: &ListFile) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| self.io("create", e))?;
        let p = self.path(r);
        let tmp = p.with_extension(format!("tmp{:08x}", rand::random::<u32>()));
        let body = serde_json::to_vec_pretty(list)
            .map_err(|e| RegistryError::Config(format!("encoding manifest list: {e}")))?;
        let res = (|| {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &p)
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res.map_err(|e| self.io("write", e))?;
        isula_sys::fsync_dir(&self.dir).map_err(|e| RegistryError::Config(e.to_string()))
    }

    fn entry_for(store: &Store, image: &str) -> Result<Entry> {
        let rec = store.resolve(image).map_err(|e| match e {
            isula_store::StoreError::ImageNotFound(_) => RegistryError::NotFound {
                registry: "local store".into(),
                what: format!("image {image} (pull or build it first)"),
            },
            e => e.into(),
        })?;
        let raw = store
            .content()
            .read_small(rec.id.digest(), limits::MANIFEST_MAX)?;
        let config: ImageConfig = serde_json::from_slice(&raw)
            .map_err(|e| RegistryError::Invalid(format!("config of {image}: {e}")))?;
        let variant = serde_json::from_slice::<serde_json::Value>(&raw)
            .ok()
            .and_then(|v| v["variant"].as_str().map(str::to_string));
        Ok(Entry {
            image: rec.id,
            name: image.to_string(),
            platform: Platform {
                architecture: config.architecture.clone(),
                os: config.os.clone(),
                os_version: None,
                os_features: Vec::new(),
                variant,
            },
        })
    }

    /// Creates the list `name` over `images` (all in the store). Returns its ID (the
    /// digest of the list as it stands locally).
    pub fn create(&self, store: &Store, name: &str, images: &[String]) -> Result<Digest> {
        self.create_as(store, name, images, false, false)
    }

    /// [`Lists::create`], as an OCI image index when `oci`; over a list of that name when
    /// `overwrite` (the new file replaces the old one at once).
    fn create_as(
        &self,
        store: &Store,
        name: &str,
        images: &[String],
        oci: bool,
        overwrite: bool,
    ) -> Result<Digest> {
        let r = list_name(name)?;
        // No images is allowed, as in isula-build: an empty list.
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if !overwrite && self.path(&r).exists() {
            return Err(RegistryError::Invalid(format!(
                "manifest list {} already exists",
                r.familiar()
            )));
        }
        let mut entries: Vec<Entry> = Vec::new();
        for i in images {
            let e = Self::entry_for(store, i)?;
            if entries.iter().any(|x| x.image == e.image) {
                return Err(RegistryError::Invalid(format!("image {i} is listed twice")));
            }
            entries.push(e);
        }
        let list = ListFile {
            name: r.to_string(),
            entries,
            oci,
        };
        self.write(&r, &list)?;
        let bytes = self.local_index(store, &list)?;
        Ok(Digest::of_bytes(&bytes))
    }

    /// [`Lists::create`], over a list of that name if there is one (a build for several
    /// platforms names its list so again each time); an OCI image index when `oci`.
    pub fn replace(
        &self,
        store: &Store,
        name: &str,
        images: &[String],
        oci: bool,
    ) -> Result<Digest> {
        self.create_as(store, name, images, oci, true)
    }

    /// Whether a list of this name exists (a name that is no list's is not one).
    pub fn exists(&self, name: &str) -> bool {
        list_name(name).is_ok_and(|r| self.path(&r).exists())
    }

    /// The images of the list `name`, with their platforms, in list order.
    pub fn members(&self, name: &str) -> Result<Vec<Member>> {
        let r = list_name(name)?;
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        Ok(self
            .read(&r)?
            .entries
            .into_iter()
            .map(|e| Member {
                image: e.image,
                name: e.name,
                platform: e.platform,
            })
            .collect())
    }

    /// Whether the list `name` is an OCI image index.
    pub fn is_oci(&self, name: &str) -> Result<bool> {
        let r = list_name(name)?;
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        Ok(self.read(&r)?.oci)
    }

    /// The image of the list `name` for `platform`: `Ok(None)` when there is no such list,
    /// an error naming the platforms it has when it has none for `platform`.
    pub fn image_for(
        &self,
        name: &str,
        platform: &isula_types::platform::BuildPlatform,
    ) -> Result<Option<ImageId>> {
        if !self.exists(name) {
            return Ok(None);
        }
        let members = self.members(name)?;
        match members.iter().find(|m| {
            platform.matches(
                &m.platform.os,
                &m.platform.architecture,
                m.platform.variant.as_deref(),
            )
        }) {
            Some(m) => Ok(Some(m.image.clone())),
            None => Err(RegistryError::NotFound {
                registry: "local store".into(),
                what: format!(
                    "a {platform} image in manifest list {name} (it has {})",
                    if members.is_empty() {
                        "none".to_string()
                    } else {
                        members
                            .iter()
                            .map(|m| platform_text(&m.platform))
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ),
            }),
        }
    }

    /// Every image some list names (`ctr-img rm -p` keeps them).
    pub fn named_images(&self) -> Result<std::collections::HashSet<ImageId>> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        Ok(self
            .files()?
            .into_iter()
            .flat_map(|l| l.entries.into_iter().map(|e| e.image))
            .collect())
    }

    /// The names of every list, sorted.
    pub fn names(&self) -> Result<Vec<String>> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<String> = self.files()?.into_iter().map(|l| l.name).collect();
        out.sort();
        Ok(out)
    }

    /// Every list file (the caller holds the lock).
    fn files(&self) -> Result<Vec<ListFile>> {
        let dir = match std::fs::read_dir(&self.dir) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io("read", e)),
        };
        let mut out = Vec::new();
        for entry in dir {
            let p = entry.map_err(|e| self.io("read", e))?.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let text = std::fs::read(&p).map_err(|e| self.io("read", e))?;
            out.push(serde_json::from_slice(&text).map_err(|e| {
                RegistryError::Config(format!("manifest list file {}: {e}", p.display()))
            })?);
        }
        Ok(out)
    }

    /// Removes the list `name`; returns the images it named.
    pub fn remove(&self, name: &str) -> Result<Vec<ImageId>> {
        let r = list_name(name)?;
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let list = self.read(&r)?;
        std::fs::remove_file(self.path(&r)).map_err(|e| self.io("remove in", e))?;
        isula_sys::fsync_dir(&self.dir).map_err(|e| RegistryError::Config(e.to_string()))?;
        Ok(list.entries.into_iter().map(|e| e.image).collect())
    }

    /// Sets the platform fields of `image`'s entry (those given; empty ones stay).
    pub fn annotate(
        &self,
        store: &Store,
        name: &str,
        image: &str,
        patch: &Annotation,
    ) -> Result<()> {
        let Annotation {
            arch,
            os,
            os_features,
            variant,
        } = patch;
        let r = list_name(name)?;
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut list = self.read(&r)?;
        let id = store
            .resolve(image)
            .map_err(|_| RegistryError::NotFound {
                registry: "local store".into(),
                what: format!("image {image}"),
            })?
            .id;
        let e = list
            .entries
            .iter_mut()
            .find(|e| e.image == id)
            .ok_or_else(|| {
                RegistryError::Invalid(format!(
                    "image {image} is not in manifest list {}",
                    r.familiar()
                ))
            })?;
        if !arch.is_empty() {
            e.platform.architecture = arch.to_string();
        }
        if !os.is_empty() {
            e.platform.os = os.to_string();
        }
        if !os_features.is_empty() {
            e.platform.os_features = os_features.to_vec();
        }
        if !variant.is_empty() {
            e.platform.variant = Some(variant.to_string());
        }
        self.write(&r, &list)
    }

    fn index(entries: Vec<(Descriptor, Platform)>, oci: bool) -> Result<Vec<u8>> {
        let idx = Index {
            schema_version: 2,
            media_type: Some(
                if oci {
                    media::OCI_INDEX
                } else {
                    media::DOCKER_MANIFEST_LIST
                }
                .to_string(),
            ),
            manifests: entries
                .into_iter()
                .map(|(mut d, p)| {
                    d.platform = Some(p);
                    d
                })
                .collect(),
            annotations: None,
        };
        serde_json::to_vec_pretty(&idx)
            .map_err(|e| RegistryError::Invalid(format!("encoding manifest list: {e}")))
    }

    fn local_index(&self, store: &Store, list: &ListFile) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for e in &list.entries {
            let rec = store.image(&e.image).map_err(|_| RegistryError::NotFound {
                registry: "local store".into(),
                what: format!("image {} of manifest list {}", e.name, list.name),
            })?;
            let size = store.content().size(&rec.manifest)?;
            out.push((
                Descriptor::new(&rec.manifest_media_type, rec.manifest.clone(), size),
                e.platform.clone(),
            ));
        }
        Self::index(out, list.oci)
    }

    /// The list as a manifest list over the stored manifests.
    pub fn inspect(&self, store: &Store, name: &str) -> Result<Vec<u8>> {
        let r = list_name(name)?;
        let list = {
            let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.read(&r)?
        };
        self.local_index(store, &list)
    }

    /// Pushes every image of the list to `dest`'s repository (by digest), then the list.
    /// Every image's layers go up in `compression`; zstd (which a Docker schema 2 manifest
    /// cannot carry) makes the images OCI manifests and the list an OCI index, as a list
    /// made with `--format oci` is.
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &self,
        ctx: &Context,
        store: &Store,
        name: &str,
        dest: &str,
        compression: LayerCompression,
        cancel: &Cancel,
        progress: Progress<'_>,
    ) -> Result<Digest> {
        let r = list_name(name)?;
        let list = {
            let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.read(&r)?
        };
        let dest_ref =
            Reference::parse(dest).map_err(|e| RegistryError::Invalid(format!("{dest:?}: {e}")))?;
        if dest_ref.digest().is_some() {
            return Err(RegistryError::Invalid(format!(
                "{dest:?}: push to a tag, not a digest"
            )));
        }
        resolve::check_policy(ctx.policy.as_ref(), &dest_ref)?;
        let client = ctx.client(resolve::push_endpoint(&ctx.registries, &dest_ref)?)?;
        let repo = dest_ref.path().to_string();
        let oci = list.oci || compression.codec.is_zstd();
        if oci && !list.oci {
            progress(
                "Pushing in OCI format: zstd layers need OCI manifests and an OCI index\n".into(),
            );
        }
        let opts = crate::push::PushOptions {
            format: if oci { Format::Oci } else { Format::Docker },
            compression,
        };
        let mut entries = Vec::new();
        let mut attestations = Vec::new();
        for e in &list.entries {
            let rec = store.image(&e.image).map_err(|_| RegistryError::NotFound {
                registry: "local store".into(),
                what: format!("image {} of manifest list {}", e.name, list.name),
            })?;
            let pushed = push_image(
                store,
                &client,
                &rec,
                &repo,
                "",
                opts,
                cancel,
                &mut *progress,
            )?;
            // supply chain: each image's attestation manifest, listed after the images.
            let names = crate::attestations::subject_names(&dest_ref, &e.platform);
            attestations.extend(crate::attestations::push_attestations(
                store,
                &client,
                &rec,
                &pushed,
                &names,
                &repo,
                cancel,
                &mut *progress,
            )?);
            entries.push((
                Descriptor::new(&pushed.media_type, pushed.digest, pushed.size),
                e.platform.clone(),
            ));
        }
        // Attestation manifests are OCI manifests: their list is an OCI index.
        let oci = oci || !attestations.is_empty();
        let bytes = if attestations.is_empty() {
            Self::index(entries, oci)?
        } else {
            crate::attestations::index_bytes(
                entries
                    .into_iter()
                    .map(|(mut d, p)| {
                        d.platform = Some(p);
                        d
                    })
                    .collect(),
                attestations,
            )?
        };
        progress("Writing manifest list to image destination\n".into());
        let tag = dest_ref.tag().unwrap_or("latest");
        let media_type = if oci {
            media::OCI_INDEX
        } else {
            media::DOCKER_MANIFEST_LIST
        };
        let digest = crate::push::put_manifest(&client, &repo, tag, &bytes, media_type)?;
        progress("Storing list signatures\n".into());
        Ok(digest)
    }
}
