//! Build sessions (the `Session` call): the client's SSH agents forwarded into RUN steps
//! (`--ssh`, `RUN --mount=type=ssh`). The client opens the call with a frame naming its
//! build and keeps it open while the build runs. A step's ssh mount is a unix socket
//! served here; each connection to it is a connection number on the call (`open` with
//! the agent's id), its bytes go both ways as `data` frames, and either side ends it
//! with `close`. Nothing of what passes is logged or kept.

use crate::state::State;
use isula_api::v1::SessionFrame;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

/// How long a build step waits for its client's session to attach.
const ATTACH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The most bytes one data frame carries.
const FRAME: usize = 32 * 1024;
/// Frames queued towards one side before the sender waits.
const QUEUE: usize = 64;

/// The open sessions, by build ID.
#[derive(Default)]
pub struct Sessions {
    open: Mutex<HashMap<String, Arc<Session>>>,
    attached: tokio::sync::Notify,
}

/// One client's session.
pub struct Session {
    to_client: mpsc::Sender<Result<SessionFrame, Status>>,
    /// Each connection's queue towards the step's socket.
    conns: Mutex<HashMap<u32, mpsc::Sender<Vec<u8>>>>,
    next: AtomicU32,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session of `build`, waiting a while for the client to open it.
    async fn wait_for(&self, build: &str) -> Option<Arc<Session>> {
        let wait = async {
            loop {
                let notified = self.attached.notified();
                if let Some(s) = self.lock().get(build).cloned() {
                    return s;
                }
                notified.await;
            }
        };
        tokio::time::timeout(ATTACH_TIMEOUT, wait).await.ok()
    }
}

impl Session {
    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<u32, mpsc::Sender<Vec<u8>>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The `Session` call: registers the session under the build ID of the first frame and
/// relays the client's frames until it hangs up.
pub async fn open(
    state: Arc<State>,
    mut inbound: Streaming<SessionFrame>,
) -> Result<mpsc::Receiver<Result<SessionFrame, Status>>, Status> {
    let first = inbound
        .message()
        .await?
        .ok_or_else(|| crate::error::invalid("a session starts with a frame naming its build"))?;
    let build = first.build_id;
    if build.is_empty() || build.len() > 128 || !build.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(crate::error::invalid(
            "a session's buildID must be 1 to 128 letters or digits",
        ));
    }
    let (tx, rx) = mpsc::channel(QUEUE);
    let session = Arc::new(Session {
        to_client: tx,
        conns: Mutex::default(),
        next: AtomicU32::new(1),
    });
    {
        let mut open = state.sessions.lock();
        if open.contains_key(&build) {
            return Err(Status::already_exists(format!(
                "build {build} already has a session"
            )));
        }
        open.insert(build.clone(), session.clone());
    }
    state.sessions.attached.notify_waiters();
    tokio::spawn(async move {
        while let Ok(Some(f)) = inbound.message().await {
            let queue = session.conns().get(&f.conn).cloned();
            if f.close {
                session.conns().remove(&f.conn);
            } else if let Some(q) = queue {
                if !f.data.is_empty() && q.send(f.data).await.is_err() {
                    session.conns().remove(&f.conn);
                }
            }
        }
        session.conns().clear();
        let mut open = state.sessions.lock();
        if open.get(&build).is_some_and(|s| Arc::ptr_eq(s, &session)) {
            open.remove(&build);
        }
    });
    Ok(rx)
}

/// What the builder calls to serve an agent in a step: a socket relayed over the build's
/// session.
pub struct Forwarder {
    pub state: Arc<State>,
    pub build: String,
    pub ids: Vec<String>,
    pub runtime: tokio::runtime::Handle,
}

/// Serving one agent socket; dropping it stops the listener and every connection.
struct Serving(tokio::task::JoinHandle<()>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl isula_builder_core::SshForward for Forwarder {
    fn ids(&self) -> Vec<String> {
        self.ids.clone()
    }

    fn serve(&self, id: &str, path: &Path) -> Result<Box<dyn Send>, String> {
        let session = self
            .runtime
            .block_on(self.state.sessions.wait_for(&self.build))
            .ok_or_else(|| {
                format!(
                    "the client did not open the build's session within {}s to forward it",
                    ATTACH_TIMEOUT.as_secs()
                )
            })?;
        let listener = std::os::unix::net::UnixListener::bind(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let _enter = self.runtime.enter();
        let listener = tokio::net::UnixListener::from_std(listener).map_err(|e| e.to_string())?;
        let id = id.to_string();
        let task = self.runtime.spawn(async move {
            // The connections go with the listener.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let session = session.clone();
                let id = id.clone();
                conns.spawn(relay(session, id, stream));
            }
        });
        Ok(Box::new(Serving(task)))
    }
}

/// One connection of a step to an agent socket, relayed to the client and back.
async fn relay(session: Arc<Session>, id: String, stream: tokio::net::UnixStream) {
    let conn = session.next.fetch_add(1, Ordering::Relaxed);
    let (tx, mut from_client) = mpsc::channel::<Vec<u8>>(QUEUE);
    session.conns().insert(conn, tx);
    let frame = |f: SessionFrame| SessionFrame { conn, ..f };
    if session
        .to_client
        .send(Ok(frame(SessionFrame {
            ssh_id: id,
            open: true,
            ..Default::default()
        })))
        .await
        .is_err()
    {
        return;
    }
    let (mut rd, mut wr) = stream.into_split();
    let to_client = session.to_client.clone();
    let upstream = async move {
        let mut buf = vec![0u8; FRAME];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let f = frame(SessionFrame {
                        data: buf[..n].to_vec(),
                        ..Default::default()
                    });
                    if to_client.send(Ok(f)).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let downstream = async move {
        while let Some(data) = from_client.recv().await {
            if wr.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    };
    // Either side ending ends the connection.
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
    }
    session.conns().remove(&conn);
    let _ = session
        .to_client
        .send(Ok(frame(SessionFrame {
            close: true,
            ..Default::default()
        })))
        .await;
}
