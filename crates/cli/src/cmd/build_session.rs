//! `ctr-img build --secret` and `--ssh`: the client reads each secret itself (file or
//! variable, with the caller's rights) and seals it for the daemon's key; the SSH agents
//! it forwards are served over a `Session` call for the build, each of the daemon's
//! connections relayed to the agent's socket here.

use super::Client;
use anyhow::{bail, Context as _, Result};
use isula_api::v1::{SealedSecret, SessionFrame};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// One `--secret` as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

/// `id=ID[,src=FILE|,env=VAR][,type=file|env]` (docker build's spelling; `source` for
/// `src`). Without src and env: the variable named ID when it is set, else the file ID.
pub fn parse_secret(spec: &str) -> Result<(String, SecretSource), String> {
    let (mut id, mut src, mut env, mut kind) = (None, None, None, None);
    for field in spec.split(',') {
        let (k, v) = field
            .split_once('=')
            .ok_or_else(|| format!("--secret {spec:?}: {field:?} is not KEY=VALUE"))?;
        match k.trim().to_ascii_lowercase().as_str() {
            "id" => id = Some(v.to_string()),
            "src" | "source" => src = Some(v.to_string()),
            "env" => env = Some(v.to_string()),
            "type" if v == "file" || v == "env" => kind = Some(v.to_string()),
            "type" => return Err(format!("--secret {spec:?}: type must be file or env")),
            other => return Err(format!("--secret {spec:?}: unexpected key {other:?}")),
        }
    }
    let id = id
        .filter(|i| !i.is_empty())
        .ok_or_else(|| format!("--secret {spec:?}: needs id=ID"))?;
    if id.contains('/') || id == ".." {
        return Err(format!(
            "--secret id={id}: must be a plain name (no '/', not '..')"
        ));
    }
    let source = match (src, env, kind.as_deref()) {
        (Some(_), Some(_), _) => {
            return Err(format!("--secret id={id}: give src or env, not both"))
        }
        (Some(s), None, Some("env")) | (None, Some(s), _) => SecretSource::Env(s),
        (Some(s), None, _) => SecretSource::File(s.into()),
        (None, None, Some("env")) => SecretSource::Env(id.clone()),
        (None, None, Some(_)) => SecretSource::File(id.clone().into()),
        (None, None, None) if std::env::var_os(&id).is_some() => SecretSource::Env(id.clone()),
        (None, None, None) => SecretSource::File(id.clone().into()),
    };
    Ok((id, source))
}

/// Reads and seals every secret for the daemon; errors name the id and where it was
/// looked for, never the value.
pub fn seal_secrets(
    specs: &[String],
    key: Option<&isula_api::secret::PublicKey>,
) -> Result<Vec<SealedSecret>> {
    if specs.is_empty() {
        return Ok(Vec::new());
    }
    let key = key.context("no public key of the daemon to seal secrets with")?;
    let mut out: Vec<SealedSecret> = Vec::new();
    for spec in specs {
        let (id, source) = parse_secret(spec).map_err(anyhow::Error::msg)?;
        if out.iter().any(|s| s.id == id) {
            bail!("--secret id={id} is given twice");
        }
        let value = match &source {
            SecretSource::Env(var) => std::env::var_os(var)
                .map(std::os::unix::ffi::OsStringExt::into_vec)
                .with_context(|| format!("--secret id={id}: the variable {var} is not set"))?,
            SecretSource::File(path) => {
                let meta = std::fs::metadata(path)
                    .with_context(|| format!("--secret id={id}: reading {}", path.display()))?;
                if meta.len() > isula_api::secret::SEALED_MAX as u64 {
                    bail!(
                        "--secret id={id}: {} is {} bytes, over the limit of {}",
                        path.display(),
                        meta.len(),
                        isula_api::secret::SEALED_MAX
                    );
                }
                std::fs::read(path)
                    .with_context(|| format!("--secret id={id}: reading {}", path.display()))?
            }
        };
        let sealed = key
            .seal(&value)
            .with_context(|| format!("--secret id={id}"))?;
        out.push(SealedSecret {
            id,
            key: sealed.key,
            nonce: sealed.nonce,
            ciphertext: sealed.ciphertext,
        });
    }
    Ok(out)
}

/// The agents forwarded, by id: their sockets here, and the agents we started for key
/// files (stopped when this drops).
pub struct Agents {
    sockets: HashMap<String, PathBuf>,
    _started: Vec<StartedAgent>,
}

struct StartedAgent {
    pid: rustix::process::Pid,
    dir: PathBuf,
}

impl Drop for StartedAgent {
    fn drop(&mut self) {
        let _ = rustix::process::kill_process(self.pid, rustix::process::Signal::TERM);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Agents {
    pub fn ids(&self) -> Vec<String> {
        let mut v: Vec<String> = self.sockets.keys().cloned().collect();
        v.sort();
        v
    }
}

fn is_socket(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// `--ssh ID[=SOCKET|KEY[,KEY...]]`: ID alone is the agent of `SSH_AUTH_SOCK`; key files
/// are loaded into an `ssh-agent` of our own for the build.
pub fn agents(specs: &[String]) -> Result<Agents> {
    let mut agents = Agents {
        sockets: HashMap::new(),
        _started: Vec::new(),
    };
    for spec in specs {
        let (id, paths) = match spec.split_once('=') {
            Some((id, p)) => (id.to_string(), p.split(',').map(PathBuf::from).collect()),
            None => (spec.clone(), Vec::new()),
        };
        if id.is_empty() || id.contains('/') || id == ".." {
            bail!("--ssh {spec:?}: the id must be a plain name (no '/', not '..')");
        }
        if agents.sockets.contains_key(&id) {
            bail!("--ssh {id} is given twice");
        }
        let socket = match paths.as_slice() {
            [] => {
                let sock = std::env::var_os("SSH_AUTH_SOCK").with_context(|| {
                    format!("--ssh {id}: SSH_AUTH_SOCK is not set; name an agent socket or key files (--ssh {id}=PATH)")
                })?;
                PathBuf::from(sock)
            }
            [one] if is_socket(one) => one.clone(),
            keys => {
                let started = start_agent(&id, keys)?;
                let sock = started.dir.join("agent.sock");
                agents._started.push(started);
                sock
            }
        };
        if !is_socket(&socket) {
            bail!("--ssh {id}: {} is not an agent socket", socket.display());
        }
        agents.sockets.insert(id, socket);
    }
    Ok(agents)
}

/// An `ssh-agent` holding `keys`, for the build only.
fn start_agent(id: &str, keys: &[PathBuf]) -> Result<StartedAgent> {
    for k in keys {
        std::fs::metadata(k).with_context(|| format!("--ssh {id}: key file {}", k.display()))?;
    }
    let dir = std::env::temp_dir().join(format!(
        "isula-build-ssh-{}",
        hex::encode(rand::random::<[u8; 6]>())
    ));
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let sock = dir.join("agent.sock");
    // ssh-agent binds its socket before it forks, so it serves once this returns.
    let out = std::process::Command::new("ssh-agent")
        .arg("-s")
        .arg("-a")
        .arg(&sock)
        .stdin(std::process::Stdio::null())
        .output();
    let out = match out {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            let _ = std::fs::remove_dir_all(&dir);
            bail!(
                "--ssh {id}: ssh-agent failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            bail!("--ssh {id}: starting ssh-agent (is openssh-client installed?): {e}")
        }
    };
    let pid = String::from_utf8_lossy(&out.stdout)
        .split(';')
        .find_map(|part| {
            part.trim()
                .strip_prefix("SSH_AGENT_PID=")?
                .parse::<i32>()
                .ok()
        })
        .and_then(rustix::process::Pid::from_raw);
    let Some(pid) = pid else {
        let _ = std::fs::remove_dir_all(&dir);
        bail!("--ssh {id}: ssh-agent did not say its pid");
    };
    let started = StartedAgent { pid, dir };
    let out = std::process::Command::new("ssh-add")
        .args(keys)
        .env("SSH_AUTH_SOCK", &sock)
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("--ssh {id}: running ssh-add"))?;
    if !out.status.success() {
        bail!(
            "--ssh {id}: ssh-add could not load the key: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(started)
}

/// Opens the build's session and serves the agents until the call ends (the returned
/// task is aborted when the build is over).
pub async fn serve(
    client: &mut Client,
    build_id: String,
    agents: &Agents,
) -> Result<tokio::task::JoinHandle<()>> {
    let (tx, rx) = mpsc::channel::<SessionFrame>(64);
    tx.send(SessionFrame {
        build_id,
        ..Default::default()
    })
    .await
    .context("session")?;
    let mut inbound = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .context("opening the build's session")?
        .into_inner();
    let sockets = agents.sockets.clone();
    Ok(tokio::spawn(async move {
        let mut conns: HashMap<u32, mpsc::Sender<Vec<u8>>> = HashMap::new();
        let mut tasks = tokio::task::JoinSet::new();
        while let Ok(Some(f)) = inbound.message().await {
            if f.open {
                let Some(sock) = sockets.get(&f.ssh_id) else {
                    let _ = tx
                        .send(SessionFrame {
                            conn: f.conn,
                            close: true,
                            ..Default::default()
                        })
                        .await;
                    continue;
                };
                let (qtx, qrx) = mpsc::channel(64);
                conns.insert(f.conn, qtx);
                tasks.spawn(relay(sock.clone(), f.conn, qrx, tx.clone()));
            } else if f.close {
                conns.remove(&f.conn);
            } else if let Some(q) = conns.get(&f.conn) {
                if q.send(f.data).await.is_err() {
                    conns.remove(&f.conn);
                }
            }
        }
    }))
}

/// One daemon connection relayed to the agent socket `sock`.
async fn relay(
    sock: PathBuf,
    conn: u32,
    mut from_daemon: mpsc::Receiver<Vec<u8>>,
    to_daemon: mpsc::Sender<SessionFrame>,
) {
    let close = SessionFrame {
        conn,
        close: true,
        ..Default::default()
    };
    let Ok(stream) = tokio::net::UnixStream::connect(&sock).await else {
        let _ = to_daemon.send(close).await;
        return;
    };
    let (mut rd, mut wr) = stream.into_split();
    let up = to_daemon.clone();
    let upstream = async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let f = SessionFrame {
                        conn,
                        data: buf[..n].to_vec(),
                        ..Default::default()
                    };
                    if up.send(f).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let downstream = async move {
        while let Some(d) = from_daemon.recv().await {
            if wr.write_all(&d).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
    }
    let _ = to_daemon.send(close).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_specs_read_as_docker_build() {
        assert_eq!(
            parse_secret("id=tok,src=/run/tok"),
            Ok(("tok".into(), SecretSource::File("/run/tok".into())))
        );
        assert_eq!(
            parse_secret("id=tok,source=f"),
            Ok(("tok".into(), SecretSource::File("f".into())))
        );
        assert_eq!(
            parse_secret("id=tok,env=TOKEN"),
            Ok(("tok".into(), SecretSource::Env("TOKEN".into())))
        );
        assert_eq!(
            parse_secret("id=tok,type=env,src=TOKEN"),
            Ok(("tok".into(), SecretSource::Env("TOKEN".into())))
        );
        assert_eq!(
            parse_secret("id=ISULA_TEST_SURELY_UNSET_VAR"),
            Ok((
                "ISULA_TEST_SURELY_UNSET_VAR".into(),
                SecretSource::File("ISULA_TEST_SURELY_UNSET_VAR".into())
            ))
        );
        for (bad, want) in [
            ("src=x", "needs id"),
            ("id=a/b,src=x", "plain name"),
            ("id=a,src=x,env=Y", "not both"),
            ("id=a,colour=red", "unexpected key"),
            ("id=a,type=socket", "file or env"),
            ("id=a,src", "not KEY=VALUE"),
        ] {
            let e = parse_secret(bad).expect_err(bad);
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
