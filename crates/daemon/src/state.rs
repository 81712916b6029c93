//! What every RPC shares: settings, the store, and the registry of running operations
//! (so that shutdown can cancel them and Info can count them).

use crate::config::Settings;
use isula_store::Store;
use isula_transport::Cancel;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

pub struct State {
    pub settings: Settings,
    pub store: Store,
    /// The OCI runtime for RUN, or why it is unusable.
    pub runc: Result<isula_runtime::Runc, String>,
    pub builds: crate::rpc::build::Builds,
    /// Clients' build sessions (SSH agent forwarding).
    pub sessions: crate::rpc::session::Sessions,
    /// Registry configuration, credentials and certificates.
    pub registry: isula_registry::Context,
    /// Decrypts passwords and proxy build args (control-api.md, secrets in transit).
    pub key: isula_api::secret::KeyPair,
    /// Local manifest lists (experimental).
    pub lists: isula_registry::manifest_list::Lists,
    /// Pulls made for builds, one per image name at a time.
    pub pulls: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    ops: Mutex<Ops>,
    /// Signalled whenever an operation ends (shutdown waits on it).
    op_ended: tokio::sync::Notify,
}

#[derive(Default)]
struct Ops {
    next: u64,
    running: HashMap<u64, Cancel>,
}

/// A running operation; it unregisters itself when dropped.
pub struct OpGuard {
    state: Arc<State>,
    id: u64,
    pub cancel: Cancel,
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        let idle = {
            let mut ops = self.state.ops();
            ops.running.remove(&self.id);
            ops.running.is_empty()
        };
        self.state.op_ended.notify_waiters();
        // The last operation's transient buffers go back to the system.
        if idle {
            isula_sys::memory::release_free();
        }
    }
}

impl State {
    pub fn new(settings: Settings, store: Store, key: isula_api::secret::KeyPair) -> Arc<State> {
        let runc = isula_runtime::Runc::new(&settings.runtime, &settings.run_root.join("runc")).map_err(|e| {
            tracing::warn!(runtime = %settings.runtime, error = %e, "builds will fail until the runtime is installed");
            e.to_string()
        });
        let registry = isula_registry::Context {
            registries: settings.registries.clone(),
            policy: settings.policy.clone(),
            registries_d: settings.registries_d.clone(),
            certs_dir: settings.config_dir.join("certs.d"),
            auth: isula_registry::AuthFile::new(settings.config_dir.join("auth.json")),
            stall_timeout: settings.registry_stall_timeout,
        };
        let lists =
            isula_registry::manifest_list::Lists::new(settings.data_root.join("manifest-lists"));
        Arc::new(State {
            pulls: Mutex::default(),
            lists,
            registry,
            key,
            settings,
            store,
            runc,
            builds: Default::default(),
            sessions: Default::default(),
            ops: Mutex::default(),
            op_ended: tokio::sync::Notify::new(),
        })
    }

    fn ops(&self) -> std::sync::MutexGuard<'_, Ops> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn begin(self: &Arc<Self>) -> OpGuard {
        self.begin_with(Cancel::default())
    }

    /// Registers an operation whose cancel flag already exists (a build's), so that
    /// shutdown cancels it directly.
    pub fn begin_with(self: &Arc<Self>, cancel: Cancel) -> OpGuard {
        let mut ops = self.ops();
        ops.next += 1;
        let id = ops.next;
        ops.running.insert(id, cancel.clone());
        OpGuard {
            state: self.clone(),
            id,
            cancel,
        }
    }

    pub fn running(&self) -> usize {
        self.ops().running.len()
    }

    /// Waits until no operation runs; false if `limit` passed first.
    pub async fn wait_idle(&self, limit: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // Registered before the check, so an end in between is not missed.
            let ended = self.op_ended.notified();
            if self.running() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                return false;
            }
        }
    }

    /// Cancels every running operation (shutdown).
    pub fn cancel_all(&self) {
        for c in self.ops().running.values() {
            c.cancel();
        }
    }
}

pub type LineStream<T> = ReceiverStream<Result<T, Status>>;

/// Runs `work` on a blocking thread, streaming the lines it reports as `T`s. If the client
/// goes away the operation is cancelled; an error ends the stream as a gRPC status.
/// A progress event as its wire message.
pub fn progress_message(e: isula_transport::progress::Event) -> isula_api::v1::Progress {
    isula_api::v1::Progress {
        id: e.id,
        action: e.action,
        current: e.current.min(i64::MAX as u64) as i64,
        total: e.total.min(i64::MAX as u64) as i64,
    }
}

/// How a stream's lines become messages: text through `text`; progress events through
/// `event` when the client asked for them (else they are dropped).
pub struct Wrap<T> {
    pub text: fn(String) -> T,
    pub event: Option<fn(isula_api::v1::Progress) -> T>,
}

impl<T> Wrap<T> {
    /// Text only: events are dropped.
    pub fn text(text: fn(String) -> T) -> Self {
        Wrap { text, event: None }
    }

    fn message(&self, line: String) -> Option<T> {
        if isula_transport::progress::is_event(&line) {
            let e = isula_transport::progress::parse(&line)?;
            return self.event.map(|f| f(progress_message(e)));
        }
        Some((self.text)(line))
    }
}

pub fn stream_blocking<T, F>(state: &Arc<State>, wrap: Wrap<T>, work: F) -> LineStream<T>
where
    T: Send + 'static,
    F: FnOnce(&Arc<State>, &isula_transport::Cancel, &mut dyn FnMut(String)) -> Result<(), Status>
        + Send
        + 'static,
{
    let (tx, rx) = mpsc::channel::<Result<T, Status>>(64);
    let guard = state.begin();
    let watch_tx = tx.clone();
    let watch_cancel = guard.cancel.clone();
    // Ends when the work ends (its sender half is dropped), so it never keeps the stream open.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        tokio::select! {
            _ = watch_tx.closed() => watch_cancel.cancel(),
            _ = done_rx => {}
        }
    });
    let state = state.clone();
    tokio::task::spawn_blocking(move || {
        let _done = done_tx;
        let mut tap = crate::metrics::Tap::default();
        let mut send = |line: String| {
            tap.line(&line);
            if let Some(m) = wrap.message(line) {
                let _ = tx.blocking_send(Ok(m));
            }
        };
        let result = work(&state, &guard.cancel, &mut send);
        if let Err(status) = result {
            tracing::info!(error = %status.message(), "operation failed");
            let _ = tx.blocking_send(Err(status));
        }
        drop(guard);
    });
    ReceiverStream::new(rx)
}
