//! Compiles `proto/control.proto` with protox (pure Rust; no system protoc needed).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read when the script runs (not when it was compiled: a build script compiled for
    // another checkout of the workspace must not read that checkout's proto).
    let proto_dir = format!("{}/../../proto", std::env::var("CARGO_MANIFEST_DIR")?);
    let proto = format!("{proto_dir}/control.proto");
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([&proto], [&proto_dir])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    build_info()?;
    Ok(())
}

/// Version facts both binaries print (`isula-build version`).
fn build_info() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("build_info.rs");
    let run = |cmd: &str, args: &[&str]| -> Option<String> {
        let o = std::process::Command::new(cmd).args(args).output().ok()?;
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rustc_version = run(&rustc, &["--version"]).unwrap_or_else(|| "rustc unknown".into());
    let commit = std::env::var("ISULA_BUILD_GIT_COMMIT")
        .ok()
        .or_else(|| run("git", &["rev-parse", "--short", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    let built = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(epoch) => run(
            "date",
            &["-u", "-d", &format!("@{epoch}"), "+%a %b %e %H:%M:%S %Y"],
        ),
        Err(_) => run("date", &["-u", "+%a %b %e %H:%M:%S %Y"]),
    }
    .unwrap_or_else(|| "unknown".into());
    let arch = match std::env::var("CARGO_CFG_TARGET_ARCH")?.as_str() {
        "x86_64" => "amd64".to_string(),
        "aarch64" => "arm64".to_string(),
        other => other.to_string(),
    };
    let text = format!(
        "pub const VERSION: &str = {:?};\npub const RUSTC_VERSION: &str = {:?};\npub const GIT_COMMIT: &str = {:?};\npub const BUILT: &str = {:?};\npub const OS_ARCH: &str = {:?};\n",
        std::env::var("CARGO_PKG_VERSION")?,
        rustc_version,
        commit,
        built,
        format!("linux/{arch}"),
    );
    std::fs::write(out, text)?;
    println!("cargo:rerun-if-changed=../../.git/HEAD");
    println!("cargo:rerun-if-changed=../../.git/refs/heads");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    Ok(())
}
