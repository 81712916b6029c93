//! The standard `grpc.health.v1.Health` service (what Kubernetes gRPC probes and
//! `grpc_health_probe` ask), beside the control API on every listener, and alone on
//! `--health-addr ADDR:PORT`: a plain TCP listener that answers health checks and nothing
//! else (the kubelet's gRPC probe speaks no TLS, and the control port wants mutual TLS).
//! Both the server ("") and `isula.build.v1.Control` report SERVING while the daemon
//! serves and NOT_SERVING once it shuts down. Health only: no operation is reachable here.

use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// The control API's service name, as a probe names it.
pub const CONTROL_SERVICE: &str = "isula.build.v1.Control";

pub type HealthService =
    tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>;

/// The reporter and the service, both names serving.
pub async fn service() -> (HealthReporter, HealthService) {
    let reporter = HealthReporter::new();
    reporter
        .set_service_status(CONTROL_SERVICE, ServingStatus::Serving)
        .await;
    let service = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
    );
    (reporter, service)
}

/// Says NOT_SERVING for both names (at shutdown, before the listeners close).
pub async fn not_serving(reporter: &HealthReporter) {
    for name in ["", CONTROL_SERVICE] {
        reporter
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
}
