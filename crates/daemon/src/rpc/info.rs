//! Info: memory, storage, registries and daemon facts for `isula-build info`.

use crate::state::State;
use isula_api::v1::{InfoRequest, InfoResponse, MemData, MemStat, RegistryData, StorageData};
use std::path::Path;

fn proc_kib(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
}

/// The name `isula-build info` shows for the file system under `path`.
pub fn backing_fs(path: &Path) -> String {
    let Ok(st) = rustix::fs::statfs(path) else {
        return "unknown".into();
    };
    match st.f_type as u64 {
        0xEF53 => "extfs".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x0102_1994 => "tmpfs".into(),
        0x794C_7630 => "overlayfs".into(),
        0x6969 => "nfs".into(),
        0x2FC1_2FC1 => "zfs".into(),
        0xF2F5_2010 => "f2fs".into(),
        other => format!("0x{other:x}"),
    }
}

/// The daemon's memory, each field measured (README, "info -V"): MemSys is the resident
/// size; the heap fields come from glibc's allocator statistics (HeapSys: obtained from the
/// system; HeapAlloc and HeapInUse: in allocated chunks, which glibc does not tell apart;
/// HeapIdle: in free chunks kept for reuse; HeapReleased: what a trim would return now).
fn mem_stat(status: &str) -> MemStat {
    let rss = proc_kib(status, "VmRSS") * 1024;
    match isula_sys::memory::allocator_stats() {
        Some(a) => MemStat {
            mem_sys: rss,
            heap_sys: a.obtained,
            heap_alloc: a.allocated,
            heap_in_use: a.allocated,
            heap_idle: a.free,
            heap_released: a.releasable,
        },
        None => MemStat {
            mem_sys: rss,
            ..Default::default()
        },
    }
}

pub fn info(state: &State, _req: InfoRequest) -> InfoResponse {
    let cache = state.store.cache().usage();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let s = &state.settings;
    let kib = |k: &str| (proc_kib(&meminfo, k) * 1024) as i64;
    InfoResponse {
        mem_info: Some(MemData {
            mem_total: kib("MemTotal"),
            mem_free: kib("MemFree"),
            swap_total: kib("SwapTotal"),
            swap_free: kib("SwapFree"),
        }),
        storage_info: Some(StorageData {
            storage_driver: s.storage_driver.clone(),
            storage_backing_fs: backing_fs(&s.data_root),
        }),
        registry_info: Some(RegistryData {
            registries_search: s.registries.search.clone(),
            registries_insecure: s.registries.insecure(),
            registries_block: s.registries.blocked(),
        }),
        data_root: s.data_root.display().to_string(),
        run_root: s.run_root.display().to_string(),
        oci_runtime: s.runtime.clone(),
        builder_num: state.builds.running() as i64,
        go_routines: proc_kib(&status, "Threads") as i64,
        mem_stat: Some(mem_stat(&status)),
        experimental: s.experimental,
        build_cache_size: cache.bytes as i64,
        build_cache_records: cache.records as i64,
        native_platforms: s.fleet.native_texts(),
        emulated_platforms: crate::fleet::emulated(&s.fleet.native),
    }
}
