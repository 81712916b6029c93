//! BuilderUsage and BuilderPrune: what the build cache holds, and freeing it
//! (`isula-build builder du|prune`).

use crate::state::State;
use isula_api::v1::{
    BuilderPruneRequest, BuilderPruneResponse, BuilderUsageRequest, BuilderUsageResponse,
    CacheRecord,
};
use isula_store::cache::Record;
use isula_types::Digest;
use tonic::Status;

fn timestamp(secs: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: secs,
        nanos: 0,
    })
}

fn record(key: &Digest, r: &Record, in_use: bool, kept: bool) -> CacheRecord {
    CacheRecord {
        shared: 0,
        id: key.to_string(),
        description: r.description.clone(),
        size: r.size as i64,
        created: timestamp(r.created),
        last_used: timestamp(r.last_used),
        in_use,
        kept,
        parent: r.parent.as_ref().map(|p| p.to_string()).unwrap_or_default(),
    }
}

/// A `RUN --mount=type=cache` directory as a record: its key is the hash of its id.
fn cache_mount(m: &isula_store::CacheMount) -> CacheRecord {
    CacheRecord {
        id: format!(
            "sha256:{}",
            m.dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ),
        description: format!("cache mount id={}", m.id),
        size: m.size as i64,
        created: timestamp(m.created),
        last_used: timestamp(m.last_used),
        in_use: m.in_use,
        kept: false,
        parent: String::new(),
        shared: 0,
    }
}

pub fn usage(state: &State, _req: BuilderUsageRequest) -> Result<BuilderUsageResponse, Status> {
    let store = &state.store;
    let kept = store.cache_kept_by_images();
    let unique = store.cache().unique_usage();
    let mut records: Vec<CacheRecord> = store
        .cache()
        .records()
        .iter()
        .map(|(k, r)| CacheRecord {
            shared: unique.shared.get(k).copied().unwrap_or(0) as i64,
            ..record(k, r, store.cache_record_in_use(r), kept.contains(k))
        })
        .collect();
    let mounts = store.cache_mounts();
    let contexts = crate::rpc::context_sync::usage(state);
    let total = unique.bytes
        + mounts.iter().map(|m| m.size).sum::<u64>()
        + contexts.iter().map(|c| c.2).sum::<u64>();
    records.extend(mounts.iter().map(cache_mount));
    // The contexts remote clients sent, kept for their next build.
    records.extend(
        contexts
            .into_iter()
            .map(|(hex, owner, size, synced)| CacheRecord {
                id: format!("sha256:{hex}"),
                description: format!("build context of {owner}"),
                size: size as i64,
                created: timestamp(synced),
                last_used: timestamp(synced),
                ..Default::default()
            }),
    );
    Ok(BuilderUsageResponse {
        records,
        total: total as i64,
    })
}

pub fn prune(state: &State, req: BuilderPruneRequest) -> Result<BuilderPruneResponse, Status> {
    let keep = u64::try_from(req.keep_storage).map_err(|_| {
        crate::error::invalid(format!(
            "keep-storage must not be negative, got {}",
            req.keep_storage
        ))
    })?;
    let unused_since = match req.unused_for {
        0 => None,
        n if n < 0 => {
            return Err(crate::error::invalid(format!(
                "until must not be negative, got {n} seconds"
            )))
        }
        n => Some(chrono::Utc::now().timestamp().saturating_sub(n)),
    };
    let pruned = state
        .store
        .prune_cache(req.all, keep, unused_since)
        .map_err(crate::error::store)?;
    // Cache mounts no build holds go too, unless some storage is to be kept (their content
    // is not the steps' records, which --keep-storage ranks).
    let mounts = if keep == 0 {
        state
            .store
            .prune_cache_mounts(unused_since)
            .map_err(crate::error::store)?
    } else {
        Vec::new()
    };
    let mut mount_bytes: u64 = mounts.iter().map(|m| m.size).sum();
    // Contexts remote clients sent go with the rest (a build holding one keeps it).
    if keep == 0 {
        mount_bytes += crate::rpc::context_sync::prune(state);
    }
    tracing::info!(
        records = pruned.records,
        bytes = pruned.bytes,
        all = req.all,
        keep,
        unused_for = req.unused_for,
        "build cache pruned"
    );
    Ok(BuilderPruneResponse {
        removed: pruned
            .removed
            .iter()
            .map(|(k, r)| record(k, r, false, false))
            .chain(mounts.iter().map(cache_mount))
            .collect(),
        reclaimed: (pruned.bytes + mount_bytes) as i64,
    })
}
