//! `--sbom` and `--provenance`: once the image is recorded, its attestations are made and
//! kept with it in the store (`Store::set_attestations`). The SBOM reads the image's own
//! package databases from a read-only overlay of its layers; the provenance says what the
//! build was asked and what it fetched. Both take `SOURCE_DATE_EPOCH` (or
//! `--build-static`) as their time, so a reproducible build gives the same documents.

use crate::{BuildError, BuildOptions, Context};
use isula_attest::slsa::{BuildInfo, Material, Mode};
use isula_store::{AttestationRecord, StoreError};
use isula_types::ImageId;

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Makes the attestations `opts` asks for and records them with image `id`.
pub(crate) fn attach(
    ctx: &mut Context<'_>,
    opts: &BuildOptions,
    id: &ImageId,
    materials: Vec<Material>,
    started: chrono::DateTime<chrono::Utc>,
) -> Result<(), BuildError> {
    let store = ctx.store;
    let lease = store.lease();
    let name = opts
        .tags
        .first()
        .map(|t| t.familiar())
        .unwrap_or_else(|| id.hex().to_string());
    let created = opts
        .build_time
        .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
        .map(rfc3339)
        .unwrap_or_else(|| rfc3339(chrono::Utc::now()));
    let tool = format!("isula-build-{}", opts.version);
    let mut records = Vec::new();
    let mut put = |predicate_type: &str, body: Vec<u8>| -> Result<(), BuildError> {
        // What a registry or archive reader takes (BuildKit's cap on an attestation).
        if body.len() as u64 > isula_attest::PREDICATE_MAX {
            return Err(BuildError::Invalid(format!(
                "the {predicate_type} attestation is {} bytes, over the limit of {} bytes",
                body.len(),
                isula_attest::PREDICATE_MAX
            )));
        }
        let blob = lease.put_blob(store.content(), &body)?;
        records.push(AttestationRecord {
            predicate_type: predicate_type.to_string(),
            blob,
            size: body.len() as u64,
        });
        Ok(())
    };
    if opts.sbom {
        (ctx.log)("Generating SBOM from the image's package databases\n".into());
        let inv = inventory(ctx, opts, id, &lease)?;
        (ctx.log)(format!(
            "SBOM: {} packages ({}), {} files of no package\n",
            inv.packages.len(),
            if inv.databases.is_empty() {
                "no package database".to_string()
            } else {
                inv.databases.join(", ")
            },
            inv.unowned.len()
        ));
        let doc = isula_attest::spdx::document(
            &inv,
            &isula_attest::spdx::DocumentInfo {
                name: &name,
                id: id.hex(),
                created: &created,
                tool: &tool,
            },
        );
        put(isula_attest::SPDX_PREDICATE, doc)?;
    }
    if let Some(mode) = opts.provenance {
        (ctx.log)(format!(
            "Generating provenance (mode={})\n",
            if mode == Mode::Max { "max" } else { "min" }
        ));
        let ssh = ctx.ssh.map(|s| s.ids()).unwrap_or_default();
        let platform = opts.platform.as_ref().map(|p| p.to_string());
        let builder_platform = isula_types::platform::BuildPlatform::host().to_string();
        // With SOURCE_DATE_EPOCH the times are the build's time: still only in max.
        let (started_on, finished_on) = match opts.build_time {
            Some(_) => (created.clone(), created.clone()),
            None => (rfc3339(started), rfc3339(chrono::Utc::now())),
        };
        let body = isula_attest::slsa::predicate(&BuildInfo {
            mode,
            dockerfile: opts.dockerfile.as_bytes(),
            dockerfile_name: "Dockerfile",
            build_args: &opts.build_args,
            target: opts.target.as_deref(),
            platform: platform.as_deref(),
            secrets: opts.secrets.ids(),
            ssh,
            materials,
            builder_id: "isula-builder",
            version: &opts.version,
            builder_platform: &builder_platform,
            invocation_id: &opts.build_id,
            started_on: &started_on,
            finished_on: &finished_on,
        });
        put(isula_attest::SLSA_PROVENANCE_V1, body)?;
    }
    store.set_attestations(id, records)?;
    Ok(())
}

/// Reads the image's packages and files from a read-only overlay of its layers.
fn inventory(
    ctx: &mut Context<'_>,
    opts: &BuildOptions,
    id: &ImageId,
    lease: &isula_store::Lease,
) -> Result<isula_attest::scan::Inventory, BuildError> {
    let store = ctx.store;
    let img = store.image(id)?;
    let dir = opts.work_dir.join("sbom");
    let (view, empty, scratch) = (dir.join("rootfs"), dir.join("empty"), dir.join("scratch"));
    for d in [&view, &empty, &scratch] {
        std::fs::create_dir_all(d).map_err(|e| StoreError::io("create", d, e))?;
    }
    let mut lowers = Vec::new();
    for c in img.layers.iter().rev() {
        lowers.push(store.layer_diff(c, lease)?);
    }
    if lowers.is_empty() {
        return Ok(Default::default());
    }
    let guard = isula_sys::mount::mount_overlay_ro_inert(&lowers, &view, &empty)
        .map_err(|e| BuildError::Invalid(format!("mounting the image for its SBOM: {e}")))?;
    let inv = isula_attest::scan::scan(&view, &scratch);
    drop(guard);
    let _ = isula_sys::rooted::remove_tree(&dir);
    inv.map_err(|e| BuildError::Invalid(format!("SBOM of the image: {e}")))
}
