//! `isula-builder`: the daemon. Reads its settings, takes its data root, and serves the
//! control API until SIGTERM/SIGINT.

mod config;
mod error;
mod fleet;
mod health_probe;
mod metrics;
mod peer;
mod rootless;
mod rpc;
mod server;
mod service;
mod state;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser};
use config::{Command, Flags, Settings};

fn init_logging(level: &str) {
    // ISULA_BUILD_PHASES=1 adds the timed phases of each operation (isula_store::phase).
    // A TCP client refused at the TLS handshake (no certificate, another CA's, an expired
    // one) is logged with the reason (tonic says it at debug level).
    let phases = match std::env::var("ISULA_BUILD_PHASES").as_deref() {
        Ok("1") => ",isula_phase=debug",
        _ => "",
    };
    let filter = tracing_subscriber::EnvFilter::new(format!(
        "{level},h2=warn,tower=warn,hyper=warn,pgp=warn{phases},tonic::transport::server::io_stream=debug"
    ));
    // Colour only for a terminal: a journal or a file gets plain lines.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
}

fn prepare_dirs(s: &mut Settings) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for (dir, mode) in [(&mut s.data_root, 0o700), (&mut s.run_root, 0o700)] {
        std::fs::create_dir_all(&*dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(&*dir, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", dir.display()))?;
        // Without symlinks on the way (Debian's /var/run is /run): runc refuses a rootfs
        // path that has one.
        *dir =
            std::fs::canonicalize(&*dir).with_context(|| format!("resolving {}", dir.display()))?;
    }
    match rpc::info::backing_fs(&s.data_root).as_str() {
        "tmpfs" | "overlayfs" => tracing::warn!(
            data_root = %s.data_root.display(),
            "the data root is on tmpfs or overlayfs, which is not supported: use a disk file system"
        ),
        _ => {}
    }
    Ok(())
}

fn open_store(s: &Settings) -> Result<isula_store::Store> {
    match isula_store::Store::open(&s.data_root) {
        Ok((store, report)) => {
            tracing::info!(
                data_root = %s.data_root.display(),
                swept_ingest = report.swept_ingest,
                swept_tmp = report.swept_tmp,
                gc_blobs = report.gc.blobs,
                gc_layers = report.gc.layers.len(),
                "store opened"
            );
            Ok(store)
        }
        Err(isula_store::StoreError::Sys(e)) if isula_sys::lock::is_held_elsewhere(&e) => {
            anyhow::bail!(
                "another isula-builder is already running on data root {}{}",
                s.data_root.display(),
                rootless::holder_of(&s.data_root)
            )
        }
        Err(e) => Err(e).with_context(|| format!("opening the store in {}", s.data_root.display())),
    }
}

/// What a crash of an earlier daemon left behind: RUN containers still running, mounts
/// under the run root and the data root's temp area, build work directories.
fn recover_run_root(s: &Settings) {
    if let Ok(runc) = isula_runtime::Runc::new(&s.runtime, &s.run_root.join("runc")) {
        let removed = runc.remove_all();
        if !removed.is_empty() {
            tracing::warn!(containers = ?removed, "removed RUN containers an earlier daemon left");
        }
    }
    let mut mounts = isula_sys::mount::mounts_below(&s.run_root);
    mounts.extend(isula_sys::mount::mounts_below(&s.data_root.join("tmp")));
    for m in &mounts {
        match isula_sys::mount::unmount_path(m) {
            Ok(()) => tracing::warn!(mount = %m.display(), "unmounted what an earlier daemon left"),
            Err(e) => {
                tracing::error!(mount = %m.display(), error = %e, "cannot unmount what an earlier daemon left")
            }
        }
    }
    // Remote clients' uploads and undelivered outputs of an earlier daemon.
    rpc::remote_files::reset(&s.data_root);
    let builds = s.run_root.join("builds");
    if let Ok(entries) = std::fs::read_dir(&builds) {
        for e in entries.flatten() {
            // Never delete through a mount that would not go.
            if !isula_sys::mount::mounts_below(&e.path()).is_empty() {
                continue;
            }
            if let Err(err) = std::fs::remove_dir_all(e.path()) {
                tracing::error!(dir = %e.path().display(), error = %err, "cannot remove an earlier build's work directory");
            }
        }
    }
}

/// The record of the one migration from an isula-build 0.9.x store (see `migrate_old_store`).
const MIGRATION_RECORD: &str = "migrated-from-isula-build.json";

/// On the first start on a data root that holds isula-build 0.9.x's containers/storage
/// store, brings its images into ours (names and IDs kept; the old files untouched) and
/// records that it did, with what failed. Later starts leave it alone: remove the record
/// to run it again.
fn migrate_old_store(s: &Settings, store: &isula_store::Store) {
    let record = s.data_root.join(MIGRATION_RECORD);
    if record.exists() {
        return;
    }
    let Some(old) = isula_transport::migrate::find_old_store(&s.data_root) else {
        return;
    };
    tracing::info!(from = %old.display(), "migrating the images of isula-build's store");
    let results = match isula_transport::migrate::migrate(store, &old) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(from = %old.display(), error = %e, "the isula-build store cannot be read: nothing migrated (this is tried again at the next start)");
            return;
        }
    };
    let mut entries = Vec::new();
    let (mut ok, mut failed) = (0, 0);
    for m in &results {
        match &m.outcome {
            isula_transport::migrate::Outcome::Migrated { id, names } => {
                ok += 1;
                tracing::info!(old_id = %m.old_id, id = %id.hex(), names = ?names, "migrated image");
                entries
                    .push(serde_json::json!({"image": m.old_id, "names": names, "id": id.hex()}));
            }
            isula_transport::migrate::Outcome::Failed { error } => {
                failed += 1;
                tracing::error!(old_id = %m.old_id, names = ?m.names, error = %error, "image not migrated");
                entries
                    .push(serde_json::json!({"image": m.old_id, "names": m.names, "error": error}));
            }
        }
    }
    tracing::info!(
        migrated = ok,
        failed,
        from = %old.display(),
        "migration from isula-build done; its files are left as they were (remove them when no longer needed)"
    );
    let text = serde_json::json!({ "from": old, "images": entries });
    if let Err(e) = std::fs::write(&record, format!("{text:#}\n")) {
        tracing::warn!(path = %record.display(), error = %e, "cannot record the migration: it runs again at the next start");
    }
}

fn main() {
    // Before any thread: the daemon's memory stays near what is live (see isula_sys::memory).
    isula_sys::memory::limit_malloc_arenas(1);
    // Usage errors exit 1, as isula-builder's do (help and version exit 0).
    let flags = Flags::try_parse().unwrap_or_else(|e| {
        let _ = e.print();
        std::process::exit(if e.use_stderr() { 1 } else { 0 });
    });
    if let Some(Command::Completion { shell }) = flags.command {
        clap_complete::generate(
            shell.unwrap_or(clap_complete::Shell::Bash),
            &mut Flags::command(),
            "isula-builder",
            &mut std::io::stdout(),
        );
        return;
    }
    if let Err(e) = run(flags) {
        eprintln!("isula-builder: {e:#}");
        std::process::exit(1);
    }
}

fn run(flags: Flags) -> Result<()> {
    rootless::set_daemonless(flags.daemonless);
    if flags.daemonless {
        // The builder of one client command goes when that command goes, even killed.
        let parent = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get() as u32);
        if !isula_sys::userns::die_with_parent(parent)? {
            anyhow::bail!("the daemonless command that started this builder is gone");
        }
    }
    let mut settings = Settings::load(&flags)?;
    // As an ordinary user: into a user namespace first (before any thread is started).
    if let rootless::Start::Exit(code) = rootless::enter(&settings)? {
        std::process::exit(code);
    }
    init_logging(&settings.log_level);
    for w in &settings.warnings {
        tracing::warn!("{w}");
    }
    tracing::info!(
        debug = settings.debug,
        runtime = %settings.runtime,
        storage_driver = %settings.storage_driver,
        mount_options = ?settings.mount_options,
        policy = if settings.policy.is_some() { "policy.json" } else { "none" },
        "settings loaded"
    );
    prepare_dirs(&mut settings)?;
    isula_store::apply::set_limits(settings.unpack_limits);
    let store = open_store(&settings)?;
    // Only now (the store's lock is ours) is what the run root holds ours to clean.
    rootless::record_holder(&settings, flags.daemonless);
    recover_run_root(&settings);
    migrate_old_store(&settings, &store);
    if flags.check_store {
        let started = std::time::Instant::now();
        let report = store.check()?;
        for r in &report.repaired {
            println!("repaired: {r}");
        }
        for p in &report.problems {
            println!("{p}");
        }
        if !report.problems.is_empty() {
            anyhow::bail!("store check found {} problem(s)", report.problems.len());
        }
        println!(
            "store check: {} images, {} blobs and {} layer directories verified ({} MB hashed in {:.1} s){}",
            store.images().len(),
            report.blobs,
            report.layers,
            report.bytes / 1_000_000,
            started.elapsed().as_secs_f64(),
            match report.repaired.len() {
                0 => String::new(),
                n => format!(", {n} layer(s) repaired"),
            }
        );
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("isula-builder")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(server::run(settings, store))
}
