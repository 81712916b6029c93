//! `version`: client facts, then the server's (or why they are missing).

use anyhow::Result;
use isula_api::build_info;

fn section(title: &str, version: &str, toolchain: &str, commit: &str, built: &str, arch: &str) {
    println!("{title}:");
    println!("  Version:       {version}");
    println!("  Go Version:    {toolchain}");
    println!("  Git Commit:    {commit}");
    println!("  Built:         {built}");
    println!("  OS/Arch:       {arch}");
}

pub async fn run(connect: impl std::future::Future<Output = Result<super::Client>>) -> Result<()> {
    section(
        "Client",
        build_info::VERSION,
        build_info::RUSTC_VERSION,
        build_info::GIT_COMMIT,
        build_info::BUILT,
        build_info::OS_ARCH,
    );
    println!();
    let mut client = connect.await?;
    let v = client.version(()).await?.into_inner();
    section(
        "Server",
        &v.version,
        &v.go_version,
        &v.git_commit,
        &v.build_time,
        &v.os_arch,
    );
    Ok(())
}
