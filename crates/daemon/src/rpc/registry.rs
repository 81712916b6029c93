//! Pull, Push, Login, Logout, and the pulls builds make for FROM. The network work runs on
//! blocking threads (the registry client is synchronous, like the store).

use crate::error;
use crate::state::State;
use isula_api::v1::{
    LoginRequest, LoginResponse, LogoutRequest, LogoutResponse, PullRequest, PushRequest,
};
use isula_registry::{auth, pull, push, resolve, Credentials, RegistryError};
use isula_transport::Cancel;
use isula_types::ImageId;
use std::sync::Arc;
use tonic::{Code, Status};

pub fn status(e: RegistryError) -> Status {
    error::status(e.kind(), e.to_string())
}

fn check_id(what: &str, id: &str) -> Result<(), Status> {
    if id.len() > 128 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(error::invalid(format!(
            "{what} must be at most 128 letters or digits"
        )));
    }
    Ok(())
}

pub fn validate_pull(
    req: &PullRequest,
) -> Result<(String, isula_types::platform::BuildPlatform), Status> {
    check_id("pullID", &req.pull_id)?;
    let name = req.image_name.trim();
    if name.is_empty() {
        return Err(error::invalid("pull needs an image name"));
    }
    let platform = match req.platform.trim() {
        "" => isula_types::platform::BuildPlatform::host(),
        p => isula_types::platform::BuildPlatform::parse(p)
            .map_err(|e| error::invalid(format!("--platform: {e}")))?,
    };
    Ok((name.to_string(), platform))
}

pub fn pull(
    state: &Arc<State>,
    name: String,
    platform: &isula_types::platform::BuildPlatform,
    cancel: &Cancel,
    out: &mut dyn FnMut(String),
) -> Result<(), Status> {
    let pulled = pull::pull_for(&state.registry, &state.store, &name, platform, cancel, out)
        .map_err(|e| error::status(e.kind(), format!("pulling {name} failed: {e}")))?;
    tracing::info!(image = %pulled.reference, id = %pulled.id, "pulled");
    // "Pull success with image: NAME" is the client's line (isula-build's client prints it).
    Ok(())
}

/// `name` in the store, as given or under each search registry.
fn find_local(state: &State, name: &str) -> Option<ImageId> {
    if let Ok(img) = state.store.resolve(name) {
        return Some(img.id);
    }
    resolve::candidates(&state.registry.registries, name)
        .ok()?
        .into_iter()
        .find_map(|c| state.store.resolve(&c.to_string()).ok().map(|img| img.id))
}

/// The image `name` from the store, or pulled (FROM, `COPY --from`). A short name is looked
/// up under each search registry before anything is pulled.
pub fn resolve_or_pull(
    state: &State,
    name: &str,
    platform: &isula_types::platform::BuildPlatform,
    cancel: &Cancel,
    out: &mut dyn FnMut(String),
) -> Result<ImageId, isula_builder_core::PullFailure> {
    if let Some(id) = find_local(state, name) {
        return Ok(id);
    }
    // A local manifest list (a build for several platforms made it): its entry for the
    // stage's platform.
    match state.lists.image_for(name, platform) {
        Ok(Some(id)) => return Ok(id),
        Ok(None) => {}
        Err(e) => {
            return Err(isula_builder_core::PullFailure {
                kind: e.kind(),
                message: e.to_string(),
            })
        }
    }
    // Builds that need the same missing image wait for one pull instead of each pulling.
    let gate_key = format!("{name} {platform}");
    let gate = {
        let mut pulls = state.pulls.lock().unwrap_or_else(|p| p.into_inner());
        pulls.entry(gate_key.clone()).or_default().clone()
    };
    let _turn = gate.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(id) = find_local(state, name) {
        return Ok(id);
    }
    let result = pull::pull_for(&state.registry, &state.store, name, platform, cancel, out)
        .map(|p| p.id)
        .map_err(|e| isula_builder_core::PullFailure {
            kind: e.kind(),
            message: format!("image {name} is not in the local store and pulling it failed: {e}"),
        });
    state
        .pulls
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&gate_key);
    result
}

/// How a push or build output sends its layers: the request's format, compression and
/// level over the daemon's `compression` default. Returns the options and, when zstd
/// moved the push to the OCI format, a line saying so.
pub fn push_options(
    format: &str,
    compression: &str,
    level: Option<i32>,
    default: push::LayerCompression,
) -> Result<(push::PushOptions, Option<String>), Status> {
    // Check the format first: a wrong format is wrong whatever the compression.
    push::Format::parse(format).map_err(error::transport)?;
    let named = !compression.trim().is_empty();
    let compression = push::LayerCompression::parse(compression, level, default)
        .map_err(|e| error::invalid(e.to_string()))?;
    let (format, note) = push::format_for(format, compression, named).map_err(status)?;
    Ok((
        push::PushOptions {
            format,
            compression,
        },
        note,
    ))
}

pub fn validate_push(
    req: &PushRequest,
    default: push::LayerCompression,
) -> Result<(String, push::PushOptions, Option<String>), Status> {
    check_id("pushID", &req.push_id)?;
    let name = req.image_name.trim();
    if name.is_empty() {
        return Err(error::invalid("push needs an image name"));
    }
    let (opts, note) = push_options(
        &req.format,
        &req.compression,
        req.compression_level,
        default,
    )?;
    Ok((name.to_string(), opts, note))
}

pub fn push(
    state: &Arc<State>,
    name: String,
    opts: push::PushOptions,
    cancel: &Cancel,
    out: &mut dyn FnMut(String),
) -> Result<(), Status> {
    let digest = push::push(
        &state.registry,
        &state.store,
        &name,
        None,
        opts,
        cancel,
        out,
    )
    .map_err(|e| error::status(e.kind(), format!("pushing {name} failed: {e}")))?;
    tracing::info!(image = %name, manifest = %digest, "pushed");
    // "Push success with image: NAME" is the client's line.
    Ok(())
}

pub fn login(state: &State, req: LoginRequest) -> Result<LoginResponse, Status> {
    let server = auth::normalize_server(&req.server).map_err(status)?;
    if req.username.is_empty() && req.password.is_empty() {
        let creds = state
            .registry
            .auth
            .get(&server)
            .map_err(status)?
            .ok_or_else(|| {
                Status::unauthenticated(format!(
                    "Failed to authenticate existing credentials: not logged in to {server}"
                ))
            })?;
        let client = state
            .registry
            .client_with(&server, Some(creds))
            .map_err(status)?;
        client.check_login().map_err(|e| {
            Status::unauthenticated(format!("Failed to authenticate existing credentials: {e}"))
        })?;
        return Ok(LoginResponse {
            content: "Login Succeed with AuthFile".into(),
        });
    }
    if req.username.is_empty() || req.password.is_empty() {
        return Err(error::invalid("login needs both a username and a password"));
    }
    let password = state
        .key
        .decrypt_hex(&req.password)
        .map_err(|e| error::invalid(format!("password: {e}")))?;
    let creds = Credentials {
        username: req.username.clone(),
        password,
    };
    let client = state
        .registry
        .client_with(&server, Some(creds.clone()))
        .map_err(status)?;
    match client.check_login() {
        Ok(()) => {}
        Err(e @ RegistryError::Unauthorized { .. }) => {
            tracing::info!(server = %server, user = %creds.username, "login refused by the registry");
            return Err(Status::new(
                Code::Unauthenticated,
                format!("Unauthorized login attempt: {e}"),
            ));
        }
        Err(e) => return Err(Status::new(Code::Unavailable, format!("Login Failed: {e}"))),
    }
    state.registry.auth.set(&server, &creds).map_err(status)?;
    tracing::info!(server = %server, user = %creds.username, "logged in");
    Ok(LoginResponse {
        content: "Login Succeeded".into(),
    })
}

pub fn logout(state: &State, req: LogoutRequest) -> Result<LogoutResponse, Status> {
    if req.all {
        state.registry.auth.clear().map_err(status)?;
        return Ok(LogoutResponse {
            result: "Removed authentications".into(),
        });
    }
    if req.server.trim().is_empty() {
        return Err(error::invalid("logout needs a registry server, or --all"));
    }
    let server = auth::normalize_server(&req.server).map_err(status)?;
    // As isula-build: logging out of a registry one is not logged in to is an error.
    if !state.registry.auth.remove(&server).map_err(status)? {
        return Err(Status::failed_precondition(format!(
            "not logged in registry {server}"
        )));
    }
    Ok(LogoutResponse {
        result: format!("Removed authentication for {server}"),
    })
}
