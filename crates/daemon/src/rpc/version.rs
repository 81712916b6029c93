//! Version: the server half of `isula-build version`.

use isula_api::build_info;
use isula_api::v1::VersionResponse;

pub fn version() -> VersionResponse {
    VersionResponse {
        version: build_info::VERSION.into(),
        go_version: build_info::RUSTC_VERSION.into(),
        git_commit: build_info::GIT_COMMIT.into(),
        build_time: build_info::BUILT.into(),
        os_arch: build_info::OS_ARCH.into(),
    }
}
