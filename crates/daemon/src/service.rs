//! The generated `Control` trait, routed to one function per RPC in `rpc/`. Store work runs
//! on blocking threads; streams carry the lines the user sees.

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
    /// Manifest lists are experimental: the daemon must run with --experimental.
    fn experimental<T>(&self, r: &Request<T>) -> Result<(), Status> {
        if !self.state.settings.experimental {
            return Err(Status::failed_precondition(
                "manifest commands are experimental: start isula-builder with --experimental",
            ));
        }
        root_only(r, "managing manifest lists")
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
        if !peer::is_root(&r) {
            // The build reads the whole context with the daemon's rights: root only.
            return Err(Status::permission_denied("building images requires root"));
        }
        let files = peer::files(&r)?;
        rpc::build::run(self.state.clone(), files, r.into_inner())
            .await
            .map(Response::new)
    }

    type StatusStream = LineStream<StatusResponse>;
    async fn status(
        &self,
        r: Request<StatusRequest>,
    ) -> Result<Response<Self::StatusStream>, Status> {
        rpc::build::status(self.state.clone(), r.into_inner().build_id)
            .await
            .map(Response::new)
    }

    async fn list(&self, r: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let state = self.state.clone();
        let req = r.into_inner();
        blocking(move || rpc::list::list(&state, req))
            .await
            .map(Response::new)
    }

    async fn version(&self, _r: Request<()>) -> Result<Response<VersionResponse>, Status> {
        Ok(Response::new(rpc::version::version()))
    }

    type PushStream = LineStream<PushResponse>;
    async fn push(&self, r: Request<PushRequest>) -> Result<Response<Self::PushStream>, Status> {
        root_only(&r, "pushing images")?;
        let (name, opts, note) =
            rpc::registry::validate_push(r.get_ref(), self.state.settings.compression)?;
        let wrap = Wrap {
            text: |response| PushResponse {
                response,
                progress: None,
            },
            event: r.get_ref().progress.then_some(|p| PushResponse {
                response: String::new(),
                progress: Some(p),
            }),
        };
        Ok(Response::new(stream_blocking(
            &self.state,
            wrap,
            move |state, cancel, out| {
                if let Some(note) = note {
                    out(note);
                }
                rpc::registry::push(state, name, opts, cancel, out)
            },
        )))
    }

    type PullStream = LineStream<PullResponse>;
    async fn pull(&self, r: Request<PullRequest>) -> Result<Response<Self::PullStream>, Status> {
        root_only(&r, "pulling images")?;
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
        root_only(&r, "removing images")?;
        let req = r.into_inner();
        let wrap = Wrap::text(|layer_message| RemoveResponse { layer_message });
        Ok(Response::new(stream_blocking(
            &self.state,
            wrap,
            move |state, cancel, out| rpc::remove::remove(state, req, cancel, out),
        )))
    }

    async fn health_check(&self, _r: Request<()>) -> Result<Response<HealthCheckResponse>, Status> {
        Ok(Response::new(rpc::health::health()))
    }

    async fn login(&self, r: Request<LoginRequest>) -> Result<Response<LoginResponse>, Status> {
        root_only(&r, "logging in to registries")?;
        let state = self.state.clone();
        let req = r.into_inner();
        blocking(move || rpc::registry::login(&state, req))
            .await
            .map(Response::new)
    }

    async fn logout(&self, r: Request<LogoutRequest>) -> Result<Response<LogoutResponse>, Status> {
        root_only(&r, "logging out of registries")?;
        let state = self.state.clone();
        let req = r.into_inner();
        blocking(move || rpc::registry::logout(&state, req))
            .await
            .map(Response::new)
    }

    type LoadStream = LineStream<LoadResponse>;
    async fn load(&self, r: Request<LoadRequest>) -> Result<Response<Self::LoadStream>, Status> {
        root_only(&r, "loading images")?;
        let files = peer::files(&r)?;
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
        root_only(&r, "importing images")?;
        let (source, reference) = rpc::import::validate(r.get_ref())?;
        let files = peer::files(&r)?;
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
        root_only(&r, "tagging images")?;
        let state = self.state.clone();
        let req = r.into_inner();
        blocking(move || rpc::tag::tag(&state, req))
            .await
            .map(Response::new)
    }

    type SaveStream = LineStream<SaveResponse>;
    async fn save(&self, r: Request<SaveRequest>) -> Result<Response<Self::SaveStream>, Status> {
        let files = peer::files(&r)?;
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
        let wrap = Wrap::text(|result| ManifestPushResponse { result });
        Ok(Response::new(stream_blocking(
            &self.state,
            wrap,
            move |state, cancel, out| rpc::manifest::push(state, req, cancel, out),
        )))
    }

    async fn builder_usage(
        &self,
        r: Request<BuilderUsageRequest>,
    ) -> Result<Response<BuilderUsageResponse>, Status> {
        // The records name the Dockerfile lines of everyone's builds: root only, like builds.
        root_only(&r, "reading the build cache")?;
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
        root_only(&r, "pruning the build cache")?;
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
        root_only(&r, "a build session")?;
        rpc::session::open(self.state.clone(), r.into_inner())
            .await
            .map(|rx| Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn image_inspect(
        &self,
        r: Request<ImageInspectRequest>,
    ) -> Result<Response<ImageInspectResponse>, Status> {
        let state = self.state.clone();
        let req = r.into_inner();
        blocking(move || rpc::inspect::inspect(&state, req))
            .await
            .map(Response::new)
    }
}
