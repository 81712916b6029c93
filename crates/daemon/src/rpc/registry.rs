//! Pull, Push, Login, Logout, and the pulls builds make for FROM. The network work runs on
//! blocking threads (the registry client is synchronous, like the store).

use crate::error;
use crate::rpc::local_index;
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
    let before = holders_of(state, &name);
    let _moves = local_index::note_moves(state, &full_names(state, &name)).map_err(error::store)?;
    let pulled = pull::pull_for(&state.registry, &state.store, &name, platform, cancel, out)
        .map_err(|e| error::status(e.kind(), format!("pulling {name} failed: {e}")))?;
    tracing::info!(image = %pulled.reference, id = %pulled.id, "pulled");
    adopt_pulled(state, &before, &pulled).map_err(status)?;
    // "Pull success with image: NAME" is the client's line (isula-build's client prints it).
    Ok(())
}

/// The images holding each full name `name` may be pulled as, before the pull.
fn holders_of(state: &State, name: &str) -> Vec<(String, ImageId)> {
    let candidates = resolve::candidates(&state.registry.registries, name).unwrap_or_default();
    local_index::holders(state, &candidates)
}

/// The full names `name` may be pulled as.
fn full_names(state: &State, name: &str) -> Vec<String> {
    resolve::candidates(&state.registry.registries, name)
        .unwrap_or_default()
        .iter()
        .map(|r| r.to_string())
        .collect()
}

/// A pulled image of another platform than the one its name stood for joins it under the
/// name (see `local_index`).
fn adopt_pulled(
    state: &State,
    before: &[(String, ImageId)],
    pulled: &pull::Pulled,
) -> Result<(), RegistryError> {
    let full = pulled.reference.to_string();
    let prev = before.iter().find(|(n, _)| *n == full).map(|(_, id)| id);
    local_index::adopt(state, &full, &pulled.id, prev)?;
    Ok(())
}

/// `name` in the store for `platform`, as given or under each search registry: a local
/// list's entry for it, or an image of that name (or ID) that is for it.
fn find_local(
    state: &State,
    name: &str,
    platform: &isula_types::platform::BuildPlatform,
) -> Result<Option<ImageId>, RegistryError> {
    let mut names = vec![name.to_string()];
    if let Ok(c) = resolve::candidates(&state.registry.registries, name) {
        names.extend(c.into_iter().map(|r| r.to_string()));
    }
    for n in &names {
        if let Ok(img) = state.store.resolve(n) {
            if local_index::fits(state, &img, platform) {
                return Ok(Some(img.id));
            }
            continue;
        }
        // A local list without this platform: it is pulled and joins the list.
        match state.lists.image_for(n, platform) {
            Ok(Some(id)) => return Ok(Some(id)),
            Ok(None) | Err(RegistryError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
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
    let failure = |e: RegistryError| isula_builder_core::PullFailure {
        kind: e.kind(),
        message: e.to_string(),
    };
    // An image of that name for the stage's platform, or a local manifest list's entry
    // for it (a build for several platforms, or pulls of several, made the list).
    if let Some(id) = find_local(state, name, platform).map_err(failure)? {
        return Ok(id);
    }
    // Builds that need the same missing image wait for one pull instead of each pulling;
    // pulls of other platforms of the name wait too (each may change what the name
    // stands for: see `local_index`).
    let gate_key = format!("pull {name}");
    let gate = {
        let mut pulls = state.pulls.lock().unwrap_or_else(|p| p.into_inner());
        pulls.entry(gate_key.clone()).or_default().clone()
    };
    let _turn = gate.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(id) = find_local(state, name, platform).map_err(failure)? {
        return Ok(id);
    }
    let before = holders_of(state, name);
    let _moves =
        local_index::note_moves(state, &full_names(state, name)).map_err(|e| failure(e.into()))?;
    // What the store has under that name, for other platforms (for the message).
    let other = match state.store.resolve(name) {
        Ok(img) => Some(format!(
            "is for {}",
            crate::rpc::list::platform(state, &img)
        )),
        Err(_) => state.lists.members(name).ok().map(|m| {
            let platforms: Vec<String> = m
                .iter()
                .map(|m| isula_registry::manifest_list::platform_text(&m.platform))
                .collect();
            format!(
                "stands for several platforms (it has {}, no {platform})",
                platforms.join(", ")
            )
        }),
    };
    let result = pull::pull_for(&state.registry, &state.store, name, platform, cancel, out)
        .and_then(|p| adopt_pulled(state, &before, &p).map(|()| p.id))
        .map_err(|e| isula_builder_core::PullFailure {
            kind: e.kind(),
            message: match &other {
                Some(have) => format!(
                    "image {name} in the local store {have}, and pulling its {platform} image failed: {e}"
                ),
                None => format!(
                    "image {name} is not in the local store and pulling it failed: {e}"
                ),
            },
        });
    state
        .pulls
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&gate_key);
    result
}

type Platform = isula_types::platform::BuildPlatform;

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
) -> Result<(String, push::PushOptions, Option<String>, Option<Platform>), Status> {
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
    let platform = match req.platform.trim() {
        "" => None,
        p => Some(Platform::parse(p).map_err(|e| error::invalid(format!("--platform: {e}")))?),
    };
    Ok((name.to_string(), opts, note, platform))
}

/// Pushes `name`: an image, or a name standing for several platforms (a local list) as a
/// whole (each image by digest, then the list under the name) or, with `platform`, the
/// one image for it under the name. `note` (the switch to OCI for zstd) is said first; a
/// whole list says its own.
pub fn push(
    state: &Arc<State>,
    name: String,
    opts: push::PushOptions,
    note: Option<String>,
    platform: Option<&Platform>,
    cancel: &Cancel,
    out: &mut dyn FnMut(String),
) -> Result<isula_types::Digest, Status> {
    let failed = |e: RegistryError| error::status(e.kind(), format!("pushing {name} failed: {e}"));
    let listed = matches!(
        state.store.resolve(&name),
        Err(isula_store::StoreError::ImageNotFound(_))
    ) && state.lists.exists(&name);
    if let Some(note) = note.filter(|_| !listed || platform.is_some()) {
        out(note);
    }
    let digest = match (listed, platform) {
        (true, None) => state
            .lists
            .push(
                &state.registry,
                &state.store,
                &name,
                &name,
                opts.compression,
                cancel,
                out,
            )
            .map_err(failed)?,
        (true, Some(p)) => {
            let id = state
                .lists
                .image_for(&name, p)
                .map_err(failed)?
                .ok_or_else(|| Status::not_found(format!("no image {name}")))?;
            push::push(
                &state.registry,
                &state.store,
                id.hex(),
                Some(&name),
                opts,
                cancel,
                out,
            )
            .map_err(failed)?
        }
        (false, p) => {
            if let (Some(p), Ok(img)) = (p, state.store.resolve(&name)) {
                if !local_index::fits(state, &img, p) {
                    return Err(error::invalid(format!(
                        "image {name} is for {}, not {p}",
                        crate::rpc::list::platform(state, &img)
                    )));
                }
            }
            push::push(
                &state.registry,
                &state.store,
                &name,
                None,
                opts,
                cancel,
                out,
            )
            .map_err(failed)?
        }
    };
    tracing::info!(image = %name, manifest = %digest, "pushed");
    // "Push success with image: NAME" is the client's line.
    Ok(digest)
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
