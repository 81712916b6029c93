//! The generated `Control` trait, routed to one function per RPC in `rpc/`. Store work runs
//! on blocking threads; streams carry the lines the user sees.

use crate::config::Role;
use crate::state::{stream_blocking, LineStream, State, Wrap};
use crate::{peer, rpc};
use isula_api::v1::control_server::Control;
use isula_api::v1::*;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct Service {
    pub state: Arc<State>,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| crate::error::internal(format!("task failed: {e}")))?
}

impl Service {
    /// How the files this request names are opened: a remote client's travel over the
    /// connection (uploaded ahead, downloaded after); a local one's with its rights.
    fn files<T>(&self, r: &Request<T>) -> Result<Box<dyn isula_transport::ClientFiles>, Status> {
        if peer::is_remote(r) {
            return Ok(Box::new(rpc::remote_files::RemoteFiles::new(
                &self.state,
                &peer::owner(r),
            )));
        }
        peer::files(r)
    }

    /// Manifest lists are experimental: the daemon must run with --experimental.
    fn experimental<T>(&self, r: &Request<T>) -> Result<(), Status> {
        if !self.state.settings.experimental {
            return Err(Status::failed_precondition(
                "manifest commands are experimental: start isula-builder with --experimental",
            ));
        }
        self.allow(r, "managing manifest lists", Role::Admin, true)
    }

    /// Whether the caller may do `what`. Over the unix socket: anyone in the socket's
    /// group, or only root (`root`), as always. Over TCP: the role its certificate's
    /// common name has in `[roles]` must be `need` or more; the log names who did what.
    fn allow<T>(&self, r: &Request<T>, what: &str, need: Role, root: bool) -> Result<(), Status> {
        match peer::caller(r) {
            peer::Caller::Local => {
                if root {
                    root_only(r, what)
                } else {
                    Ok(())
                }
            }
            peer::Caller::Remote(cn) => {
                let cn = cn?;
                let Some(role) = self.state.settings.roles.of(&cn) else {
                    tracing::warn!(cn = %cn, what, "refused: the certificate is in no role");
                    return Err(Status::permission_denied(format!(
                        "the certificate CN={cn} has no role on this daemon ([roles] in configuration.toml)"
                    )));
                };
                if role < need {
                    tracing::warn!(cn = %cn, role = role.name(), what, "refused: role too low");
                    return Err(Status::permission_denied(format!(
                        "{what} needs the {} role; the certificate CN={cn} has {}",
                        need.name(),
                        role.name()
                    )));
                }
                tracing::info!(cn = %cn, role = role.name(), what, "remote operation");
                Ok(())
            }
            peer::Caller::InsecureTcp => {
                tracing::info!(
                    what,
                    "remote operation over TCP without TLS (--insecure-tcp)"
                );
                Ok(())
            }
        }
    }
}

/// What changes the store or its names, and registry operations (they use the daemon's
/// stored credentials), are root's. Members of the socket's group may list, inspect, read
/// `info` and `version`, and save to paths they can write.
fn root_only<T>(r: &Request<T>, what: &str) -> Result<(), Status> {
    if peer::is_root(r) {
        Ok(())
    } else {
        Err(Status::permission_denied(format!("{what} requires root")))
    }
}

#[tonic::async_trait]
impl Control for Service {
    async fn build(&self, r: Request<BuildRequest>) -> Result<Response<BuildResponse>, Status> {
        self.allow(&r, "building images", Role::Builder, false)?;
        if !peer::is_remote(&r) && !peer::is_root(&r) {
            // The build reads the whole context with the daemon's rights: root only.
            return Err(Status::permission_denied("building images requires root"));
        }
        let files = self.files(&r)?;
        let caller = rpc::build::Caller {
            owner: peer::owner(&r),
            remote: peer::is_remote(&r),
        };
        rpc::build::run(self.state.clone(), files, caller, r.into_inner())
            .await
            .map(Response::new)
    }

    type StatusStream = LineStream<StatusResponse>;
    async fn status(
        &self,
        r: Request<StatusRequest>,
    ) -> Result<Response<Self::StatusStream>, Status> {
        self.allow(&r, "following a build", Role::Builder, false)?;
        rpc::build::status(self.state.clone(), r.into_inner().build_id)
            .await
            .map(Response::new)
    }

    async fn list(&self, r: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        self.allow(&r, "listing images", Role::Reader, false)?;
        let state = self.state.clone();
        let req = r.into_inner();
        blocking(move || rpc::list::list(&state, req))
            .await
            .map(Response::new)
    }

    async fn version(&self, r: Request<()>) -> Result<Response<VersionResponse>, Status> {
        self.allow(&r, "reading the version", Role::Reader, false)?;
        Ok(Response::new(rpc::version::version()))
    }

    type PushStream = LineStream<PushResponse>;
    async fn push(&self, r: Request<PushRequest>) -> Result<Response<Self::PushStream>, Status> {
        self.allow(&r, "pushing images", Role::Builder, true)?;
        let (name, opts, note, platform) =
            rpc::registry::validate_push(r.get_ref(), self.state.settings.compression)?;
        // supply chain
        let sign = rpc::sign::Wanted {
            simple: r.get_ref().sign_simple,
            sigstore: r.get_ref().sign_sigstore,
        };
        let signed_dest = rpc::sign::check_before_push(&self.state, &name, sign)?;
        let wrap = Wrap {
            text: rpc::sign::push_message,
            event: r.get_ref().progress.then_some(|p| PushResponse {
                response: String::new(),
                progress: Some(p),
                sign_request: None,
            }),
        };
        Ok(Response::new(stream_blocking(
            &self.state,
            wrap,
            move |state, cancel, out| {
                let digest =
                    rpc::registry::push(state, name, opts, note, platform.as_ref(), cancel, out)?;
                match signed_dest {
                    Some(dest) => rpc::sign::sign_pushed(state, &dest, &digest, sign, cancel, out),
                    None => Ok(()),
                }
            },
        )))
    }

    async fn put_signatures(
        &self,
        r: Request<isula_api::v1::PutSignaturesRequest>,
    ) -> Result<Response<()>, Status> {
        self.allow(&r, "pushing images", Role::Builder, true)?;
        let req = r.into_inner();
        blocking(move || rpc::sign::put_signatures(req))
            .await
            .map(Response::new)
    }

    type PullStream = LineStream<PullResponse>;
    async fn pull(&self, r: Request<PullRequest>) -> Result<Response<Self::PullStream>, Status> {
        self.allow(&r, "pulling images", Role::Builder, true)?;
        let (name, platform) = rpc::registry::validate_pull(r.get_ref())?;
        let wrap = Wrap {
            text: |response| PullResponse {
                response,
                progress: None,
            },
            event: r.get_ref().progress.then_some(|p| PullResponse {
                response: String::new(),
                progress: Some(p),
            }),
        };
        Ok(Response::new(stream_blocking(
            &self.state,
            wrap,
            move |state, cancel, out| rpc::registry::pull(state, name, &platform, cancel, out),
        )))
    }

    type RemoveStream = LineStream<RemoveResponse>;
    async fn remove(
        &self,
        r: Request<RemoveRequest>,
    ) -> Result<Response<Self::RemoveStream>, Status> {
        self.allow(&r, "removing images", Role::Admin, true)?;
        let req = r.into_inner();
        let wrap = Wrap::text(|layer_message| RemoveResponse { layer_message });
        Ok(Response::new(stream_blocking(
            &self.state,
            wrap,
            move |state, cancel, out| rpc::remove::remove(state, req, cancel, out),
        )))
    }

    async fn health_check(&self, r: Request<()>) -> Result<Response<HealthCheckResponse>, Status> {
        self.allow(&r, "a health check", Role::Reader, false)?;
        Ok(Response::new(rpc::health::health()))
    }

    async fn login(&self, r: Request<LoginRequest>) -> Result<Response<LoginResponse>, Status> {
        self.allow(&r, "logging in to registries", Role::Admin, true)?;
        let state = self.state.clone();
        let req = r.into_inner();
        blocking(move || rpc::registry::login(&state, req))
            .await
            .map(Response::new)
    }

    async fn logout(&self, r: Request<LogoutRequest>) -> Result<Response<LogoutResponse>, Status> {
        self.allow(&r, "logging out of registries", Role::Admin, true)?;
        let state = self.state.clone();
        let req = r.into_inner();
        blocking(move || rpc::registry::logout(&state, req))
            .await
            .map(Response::new)
    }

    type LoadStream = LineStream<LoadResponse>;
    async fn load(&self, r: Request<LoadRequest>) -> Result<Response<Self::LoadStream>, Status> {
        self.allow(&r, "loading images", Role::Admin, true)?;
        let files = self.files(&r)?;
        let wrap = Wrap {
            text: |log| LoadResponse {
                log,
                progress: None,
            },
            event: r.get_ref().progress.then_some(|p| LoadResponse {
                log: String::new(),
                progress: Some(p),
            }),
        };
        let job = rpc::load::validate(r.into_inner())?;
        Ok(Response::new(stream_blocking(
            &self.state,
            wrap,
            move |state, cancel, out| rpc::load::load(state, files.as_ref(), job, cancel, out),
        )))
    }

    type ImportStream = LineStream<ImportResponse>;
    async fn import(
        &self,
        r: Request<ImportRequest>,
    ) -> Result<Response<Self::ImportStream>, Status> {
        self.allow(&r, "importing images", Role::Admin, true)?;
        let (source, reference) = rpc::import::validate(r.get_ref())?;
        let files = self.files(&r)?;
        let wrap = Wrap::text(|log| ImportResponse { log });
        Ok(Response::new(stream_blocking(
            &self.state,
            wrap,
            move |state, cancel, out| {
                rpc::import::import(state, files.as_ref(), source, reference, cancel, out)
            },
        )))
    }

    async fn tag(&self, r: Request<TagRequest>) -> Result<Response<()>, Status> {
        self.allow(&r, "tagging images", Role::Admin, true)?;
        let state = self.state.clone();
        let req = r.into_inner();
        blocking(move || rpc::tag::tag(&state, req))
            .await
            .map(Response::new)
    }

    type SaveStream = LineStream<SaveResponse>;
    async fn save(&self, r: Request<SaveRequest>) -> Result<Response<Self::SaveStream>, Status> {
        self.allow(&r, "saving images", Role::Builder, false)?;
        let files = self.files(&r)?;
        let wrap = Wrap {
            text: |log| SaveResponse {
                log,
                progress: None,
            },
            event: r.get_ref().progress.then_some(|p| SaveResponse {
                log: String::new(),
                progress: Some(p),
            }),
        };
        let job = rpc::save::validate(r.into_inner())?;
        Ok(Response::new(stream_blocking(
            &self.state,
            wrap,
            move |state, cancel, out| rpc::save::save(state, files.as_ref(), job, cancel, out),
        )))
    }

    async fn info(&self, r: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        self.allow(&r, "reading info", Role::Reader, false)?;
        Ok(Response::new(rpc::info::info(&self.state, r.into_inner())))
    }

    async fn manifest_create(
        &self,
        r: Request<ManifestCreateRequest>,
    ) -> Result<Response<ManifestCreateResponse>, Status> {
        self.experimental(&r)?;
        let state = self.state.clone();
        let req = r.into_inner();
        blocking(move || rpc::manifest::create(&state, req))
            .await
            .map(Response::new)
    }

    async fn manifest_annotate(
        &self,
        r: Request<ManifestAnnotateRequest>,
    ) -> Result<Response<()>, Status> {
        self.experimental(&r)?;
        let state = self.state.clone();
        let req = r.into_inner();
        blocking(move || rpc::manifest::annotate(&state, req))
            .await
            .map(Response::new)
    }

    async fn manifest_inspect(
        &self,
        r: Request<ManifestInspectRequest>,
    ) -> Result<Response<ManifestInspectResponse>, Status> {
        self.experimental(&r)?;
        let state = self.state.clone();
        let req = r.into_inner();
        blocking(move || rpc::manifest::inspect(&state, req))
            .await
            .map(Response::new)
    }

    type ManifestPushStream = LineStream<ManifestPushResponse>;
    async fn manifest_push(
        &self,
        r: Request<ManifestPushRequest>,
    ) -> Result<Response<Self::ManifestPushStream>, Status> {
        self.experimental(&r)?;
        let req = r.into_inner();
        let compression = rpc::manifest::push_compression(&req, self.state.settings.compression)?;
        // supply chain
        let sign = rpc::sign::Wanted {
            simple: req.sign_simple,
            sigstore: req.sign_sigstore,
        };
        let signed_dest = rpc::sign::check_before_push(&self.state, &req.dest, sign)?;
        let wrap = Wrap::text(rpc::sign::manifest_push_message);
        Ok(Response::new(stream_blocking(
            &self.state,
            wrap,
            move |state, cancel, out| {
                let digest = rpc::manifest::push(state, req, compression, cancel, out)?;
                match signed_dest {
                    Some(dest) => rpc::sign::sign_pushed(state, &dest, &digest, sign, cancel, out),
                    None => Ok(()),
                }
            },
        )))
    }

    async fn builder_usage(
        &self,
        r: Request<BuilderUsageRequest>,
    ) -> Result<Response<BuilderUsageResponse>, Status> {
        // The records name the Dockerfile lines of everyone's builds: root only, like builds.
        self.allow(&r, "reading the build cache", Role::Reader, true)?;
        let state = self.state.clone();
        let req = r.into_inner();
        blocking(move || rpc::builder_cache::usage(&state, req))
            .await
            .map(Response::new)
    }

    async fn builder_prune(
        &self,
        r: Request<BuilderPruneRequest>,
    ) -> Result<Response<BuilderPruneResponse>, Status> {
        self.allow(&r, "pruning the build cache", Role::Admin, true)?;
        let state = self.state.clone();
        let req = r.into_inner();
        blocking(move || rpc::builder_cache::prune(&state, req))
            .await
            .map(Response::new)
    }

    type SessionStream = tokio_stream::wrappers::ReceiverStream<Result<SessionFrame, Status>>;
    async fn session(
        &self,
        r: Request<tonic::Streaming<SessionFrame>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        // Only builds (root's) have sessions.
        self.allow(&r, "a build session", Role::Builder, true)?;
        rpc::session::open(self.state.clone(), r.into_inner())
            .await
            .map(|rx| Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    type SyncContextStream = tokio_stream::wrappers::ReceiverStream<Result<ContextReply, Status>>;
    async fn sync_context(
        &self,
        r: Request<tonic::Streaming<ContextUpload>>,
    ) -> Result<Response<Self::SyncContextStream>, Status> {
        self.allow(&r, "sending a build context", Role::Builder, true)?;
        let owner = peer::owner(&r);
        let rx = rpc::context_sync::serve(self.state.clone(), owner, r.into_inner());
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn upload(
        &self,
        r: Request<tonic::Streaming<UploadChunk>>,
    ) -> Result<Response<UploadReply>, Status> {
        self.allow(&r, "sending files", Role::Builder, true)?;
        let owner = peer::owner(&r);
        rpc::remote_files::upload(self.state.clone(), owner, r.into_inner())
            .await
            .map(Response::new)
    }

    type DownloadStream = tokio_stream::wrappers::ReceiverStream<Result<DownloadChunk, Status>>;
    async fn download(
        &self,
        r: Request<DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        self.allow(&r, "receiving files", Role::Builder, false)?;
        let owner = peer::owner(&r);
        let rx = rpc::remote_files::download(&self.state, &owner, &r.get_ref().token)?;
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn public_key(&self, r: Request<()>) -> Result<Response<PublicKeyResponse>, Status> {
        self.allow(&r, "reading the public key", Role::Reader, false)?;
        Ok(Response::new(PublicKeyResponse {
            pem: self.state.key.public_pem().to_string(),
        }))
    }

    async fn image_inspect(
        &self,
        r: Request<ImageInspectRequest>,
    ) -> Result<Response<ImageInspectResponse>, Status> {
        self.allow(&r, "inspecting images", Role::Reader, false)?;
        let state = self.state.clone();
        let req = r.into_inner();
        blocking(move || rpc::inspect::inspect(&state, req))
            .await
            .map(Response::new)
    }
}
