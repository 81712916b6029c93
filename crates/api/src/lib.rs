//! Generated gRPC code for `isula.build.v1.Control` plus the unix-socket plumbing both binaries
//! share. No logic lives here: the daemon implements the service, the CLI only calls it.

#![allow(clippy::all, missing_docs, rust_2018_idioms)]

pub mod secret;

pub mod v1 {
    tonic::include_proto!("isula.build.v1");
}

/// Version, toolchain, commit and build time of this build.
pub mod build_info {
    include!(concat!(env!("OUT_DIR"), "/build_info.rs"));
}

use std::path::{Path, PathBuf};

/// Default control socket of the system daemon.
pub const DEFAULT_SOCKET: &str = "/var/run/isula_build.sock";
/// The control socket of a user's rootless daemon in `runtime_dir` ($XDG_RUNTIME_DIR).
pub fn user_socket_in(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("isula_build.sock")
}

/// Environment variable naming another control socket (`unix:///path`).
pub const HOST_ENV: &str = "ISULABUILD_HOST";

/// Parses a `unix:///path` host (a bare absolute path is accepted too).
pub fn socket_path_from_host(host: &str) -> Result<PathBuf, String> {
    let path = host.strip_prefix("unix://").unwrap_or(host);
    if !path.starts_with('/') {
        return Err(format!(
            "invalid host {host:?}: expected unix:///absolute/path/to/socket"
        ));
    }
    Ok(PathBuf::from(path))
}

/// Connects a gRPC channel to the daemon's unix socket.
pub async fn connect(
    socket: &Path,
) -> Result<v1::control_client::ControlClient<tonic::transport::Channel>, tonic::transport::Error> {
    let socket = socket.to_path_buf();
    // The URI is required by tonic but ignored: every connection goes to the socket.
    let channel = tonic::transport::Endpoint::from_static("http://[::1]:50051")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(v1::control_client::ControlClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

/// The files of a client's mutual TLS (PEM): the CA that signed the daemon's certificate,
/// and the client's own certificate and key.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

/// Connects a gRPC channel to a daemon's TCP listener at `addr` (HOST:PORT): with mutual
/// TLS (the daemon's certificate checked against the CA for HOST), or plain without.
pub async fn connect_tcp(
    addr: &str,
    tls: Option<&ClientTls>,
) -> Result<v1::control_client::ControlClient<tonic::transport::Channel>, tonic::transport::Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))?;
    if let Some(t) = tls {
        let host = addr
            .rsplit_once(':')
            .map_or(addr, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        endpoint = endpoint.tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&t.ca))
                .identity(tonic::transport::Identity::from_pem(&t.cert, &t.key))
                .domain_name(host),
        )?;
    }
    let channel = endpoint.connect().await?;
    Ok(v1::control_client::ControlClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_parsing() {
        assert_eq!(
            socket_path_from_host("unix:///tmp/x.sock").ok(),
            Some(PathBuf::from("/tmp/x.sock"))
        );
        assert!(socket_path_from_host("tcp://1.2.3.4:5").is_err());
        assert!(socket_path_from_host("unix://relative").is_err());
    }
}
