//! HealthCheck: SERVING while the daemon runs.

use isula_api::v1::health_check_response::ServingStatus;
use isula_api::v1::HealthCheckResponse;

pub fn health() -> HealthCheckResponse {
    HealthCheckResponse {
        status: ServingStatus::Serving as i32,
    }
}
