//! The daemon's life: take the data root, bind the socket (0660 root:group), serve, tell
//! systemd we are ready, and on SIGTERM/SIGINT stop accepting, cancel running work, wait
//! for it to clean up, remove the socket and return.

use crate::config::Settings;
use crate::service::Service;
use crate::state::State;
use anyhow::{bail, Context, Result};
use isula_api::v1::control_server::ControlServer;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

/// How long shutdown waits for cancelled work to finish its cleanup.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

fn group_id(name: &str) -> Option<u32> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.next()?;
        f.next()?.parse().ok()
    })
}

/// The accepted connections, each with its peer's identity taken from the socket.
fn incoming(
    listener: UnixListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<crate::peer::PeerStream>> {
    use tokio_stream::StreamExt;
    UnixListenerStream::new(listener).map(|s| s.map(crate::peer::PeerStream::new))
}

fn bind(socket: &Path, group: &str) -> Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if std::fs::symlink_metadata(socket).is_ok() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            bail!(
                "socket {} is in use by another running daemon",
                socket.display()
            );
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("removing stale socket {}", socket.display()))?;
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    // A rootless daemon's socket is its user's alone, a daemonless command's its own.
    if crate::rootless::private_socket() {
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
        return Ok(listener);
    }
    match group_id(group) {
        Some(gid) => {
            rustix::fs::chown(
                socket,
                Some(rustix::fs::Uid::ROOT),
                Some(rustix::fs::Gid::from_raw(gid)),
            )
            .with_context(|| format!("chown {}", socket.display()))?;
            std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))?;
        }
        None => {
            tracing::warn!(group, socket = %socket.display(), "group does not exist: socket is only for root (0600)");
            std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(listener)
}

fn settings_tcp_addrs(state: &State) -> Vec<String> {
    state
        .settings
        .tcp
        .iter()
        .map(|t| t.addr.to_string())
        .collect()
}

/// Tells systemd (Type=notify) that the socket is up.
fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => return tracing::warn!(error = %e, "sd_notify"),
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let result = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(b"READY=1", &a))
    } else {
        sock.send_to(b"READY=1", &path)
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "sd_notify READY=1");
    }
}

/// SIGTERM and SIGINT, caught from the moment this is made: made before the socket serves,
/// so that a stop sent as soon as the daemon answers (systemd's, a test's) is never the
/// default action that kills it without its cleanup.
struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn catch() -> Result<ShutdownSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(ShutdownSignals {
            term: signal(SignalKind::terminate()).context("catching SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("catching SIGINT")?,
        })
    }

    async fn recv(mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Publishes the public key (0644) for clients, atomically: a client never reads half a key.
fn write_public_key(dir: &std::path::Path, pem: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(isula_api::secret::PUBLIC_KEY_FILE);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.{}",
        isula_api::secret::PUBLIC_KEY_FILE,
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        f.write_all(pem.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing the public key {}", path.display()))
}

/// How often an idle daemon looks at what its allocator keeps free.
const IDLE_TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
/// How often (in idle-trim ticks) an idle daemon checks `build_cache_keep_free`: 30 s.
const KEEP_FREE_EVERY_TICKS: u64 = 6;
/// Free memory the allocator may keep while idle before it is given back.
const IDLE_TRIM_OVER: u64 = 1 << 20;

/// The TLS configuration of a TCP listener: the daemon's identity, and client
/// certificates required, signed by the CA.
fn server_tls(files: &crate::config::TlsFiles) -> Result<tonic::transport::ServerTlsConfig> {
    let read = |what: &str, p: &Path| {
        std::fs::read(p).with_context(|| format!("reading the TLS {what} {}", p.display()))
    };
    let ca = read("CA certificate", &files.ca)?;
    let cert = read("certificate", &files.cert)?;
    let key = read("key", &files.key)?;
    Ok(tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(cert, key))
        .client_ca_root(tonic::transport::Certificate::from_pem(ca))
        .client_auth_optional(false))
}

pub async fn run(settings: Settings, store: isula_store::Store) -> Result<()> {
    let socket = settings.socket.clone();
    let key = isula_api::secret::KeyPair::generate().context("generating the RSA key pair")?;
    let listener = match &socket {
        Some(path) => Some(bind(path, &settings.group)?),
        None => None,
    };
    // TCP listeners: bound (and their TLS files read) before anything is served, so a bad
    // address or file stops the start with a message.
    let mut tcp = Vec::new();
    for t in &settings.tcp {
        let tls = t.tls.as_ref().map(server_tls).transpose()?;
        // No Nagle delay on replies (a context sync's list of files it needs, each
        // window update of a stream the client sends).
        let incoming = tonic::transport::server::TcpIncoming::bind(t.addr)
            .map_err(|e| anyhow::anyhow!("binding tcp://{}: {e}", t.addr))?
            .with_nodelay(Some(true));
        match &tls {
            Some(_) => tracing::info!(addr = %t.addr, "serving TCP with mutual TLS"),
            None => tracing::warn!(
                addr = %t.addr,
                "serving TCP WITHOUT TLS (--insecure-tcp, loopback only): any local process may use it as an admin"
            ),
        }
        if settings.roles == crate::config::Roles::default() && tls.is_some() {
            tracing::warn!(
                "no [roles] in configuration.toml: every TCP client certificate is refused"
            );
        }
        tcp.push((t.addr, tls, incoming));
    }
    let health_incoming = match settings.health_addr {
        Some(addr) => Some(
            tonic::transport::server::TcpIncoming::bind(addr)
                .map_err(|e| anyhow::anyhow!("binding the health address {addr}: {e}"))?,
        ),
        None => None,
    };
    let metrics = match settings.metrics_addr {
        Some(addr) => Some(crate::metrics::bind(addr).await?),
        None => None,
    };
    write_public_key(&crate::rootless::key_dir(&settings), key.public_pem())?;
    if let Some(listener) = metrics {
        tracing::info!(addr = ?listener.local_addr().ok(), "serving metrics on /metrics");
        tokio::spawn(crate::metrics::serve(listener, settings.data_root.clone()));
    }
    let state = State::new(settings, store, key);
    // Names a stopped daemon left between an image and the list that keeps its platforms.
    crate::rpc::local_index::recover(&state);
    // The store's background work (unpacking loaded and pulled layers, hashing their
    // directories): only while no operation runs, at the lowest CPU priority.
    let compressor = {
        let state = state.clone();
        std::thread::Builder::new()
            .name("compressor".into())
            .spawn(move || {
                isula_sys::priority::lower_current_thread(19);
                state.store.run_compressor()
            })
            .context("starting the compressor thread")?
    };
    // What the allocator keeps after work goes back to the system once the daemon idles:
    // the one place that trims after background work (unpack), and after the replies
    // and cache records that follow the last operation's end (which trims at once).
    let trimmer = {
        let state = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(IDLE_TRIM_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // A trim leaves the free chunks in place (their pages given back): the stats
            // just after it tell whether anything happened since.
            let mut after_last = None;
            let mut ticks: u64 = 0;
            loop {
                tick.tick().await;
                ticks += 1;
                // The build cache's free-space floor, when idle (builds check it as they end).
                if ticks.is_multiple_of(KEEP_FREE_EVERY_TICKS) && state.running() == 0 {
                    if let Some(free) = crate::rpc::build::cache_keep_free(&state) {
                        let state = state.clone();
                        let _ = tokio::task::spawn_blocking(move || {
                            if let Err(e) = state.store.prune_cache_for_free(free) {
                                tracing::warn!(error = %e, "trimming the build cache for free space");
                            }
                        })
                        .await;
                    }
                }
                let now = isula_sys::memory::allocator_stats();
                let kept = now.map_or(0, |s| s.free);
                if state.running() == 0 && kept >= IDLE_TRIM_OVER && now != after_last {
                    isula_sys::memory::release_free();
                    after_last = isula_sys::memory::allocator_stats();
                }
            }
        })
    };
    let service = ControlServer::new(Service {
        state: state.clone(),
    })
    .max_decoding_message_size(64 << 20)
    .max_encoding_message_size(64 << 20);
    let (health, health_service) = crate::health_probe::service().await;
    let signals = ShutdownSignals::catch()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut servers = Vec::new();
    if let Some(listener) = listener {
        servers.push(tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service.clone())
                .add_service(health_service.clone())
                .serve_with_incoming_shutdown(incoming(listener), stopped()),
        ));
    }
    for (addr, tls, incoming) in tcp {
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder
                .tls_config(tls)
                .map_err(|e| anyhow::anyhow!("TLS of tcp://{addr}: {e}"))?;
        }
        servers.push(tokio::spawn(
            builder
                .add_service(service.clone())
                .add_service(health_service.clone())
                .serve_with_incoming_shutdown(incoming, stopped()),
        ));
    }
    if let Some(incoming) = health_incoming {
        tracing::info!(addr = ?state.settings.health_addr, "serving grpc.health.v1 alone, plain TCP");
        servers.push(tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health_service.clone())
                .serve_with_incoming_shutdown(incoming, stopped()),
        ));
    }
    let server = async move {
        let mut first = Ok(());
        for s in servers {
            match s.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) if first.is_ok() => first = Err(anyhow::anyhow!("server: {e}")),
                Err(e) if first.is_ok() => first = Err(anyhow::anyhow!("server task: {e}")),
                _ => {}
            }
        }
        first
    };
    tracing::info!(
        socket = socket.as_ref().map(|s| s.display().to_string()).unwrap_or_default(),
        tcp = ?settings_tcp_addrs(&state),
        "isula-builder is serving"
    );
    notify_ready();
    let signal = signals.recv().await;
    tracing::info!(signal, running = state.running(), "shutting down");
    // Stop accepting first, then cancel what runs, then wait for it to clean up.
    if let Some(socket) = &socket {
        let _ = std::fs::remove_file(socket);
    }
    crate::health_probe::not_serving(&health).await;
    state.cancel_all();
    state.store.stop_compressor();
    let _ = stop_tx.send(true);
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "serving"),
        Err(_) => tracing::error!("running operations did not finish within {SHUTDOWN_GRACE:?}"),
    }
    // Blocking tasks hold the state; wait for them to release it (and the store lock).
    if !state.wait_idle(SHUTDOWN_GRACE).await {
        tracing::error!(
            running = state.running(),
            "operations still running after {SHUTDOWN_GRACE:?}"
        );
    }
    trimmer.abort();
    if compressor.join().is_err() {
        tracing::error!("the compressor thread panicked");
    }
    tracing::info!("isula-builder stopped");
    Ok(())
}
