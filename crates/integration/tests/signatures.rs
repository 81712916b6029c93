//! supply chain: policy.json signature requirements and signing, with skopeo 1.9 as the
//! oracle both ways. skopeo signs (GnuPG simple signing into a lookaside directory,
//! sigstore as attachments) and we verify on pull; we sign (`push --sign-by`,
//! `--sign-by-sigstore-private-key`) and skopeo, given the same policy.json and
//! registries.d, accepts. A missing signature, a tampered one, the wrong key and a
//! re-tagged image are refused by both, each beside a positive control, and nothing is
//! stored by a refused pull. Everything runs against docker-registry on 127.0.0.1.

use base64::Engine as _;
use isula_integration::registry::{Registry, RegistryOptions};
use isula_integration::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The tools these tests need: missing ones fail the test (scripts/deps.sh test installs
/// them), never skip it.
fn need_tools() {
    assert!(
        rustix::process::geteuid().is_root(),
        "the signature tests run as root"
    );
    for tool in ["docker-registry", "skopeo", "gpg", "gpgconf"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(found, "{tool} is missing: run scripts/deps.sh test");
    }
}

/// A GnuPG home of its own with one fresh signing key (no passphrase).
struct Gpg {
    home: tempfile::TempDir,
    fpr: String,
    /// `gpg --export` (binary keyring).
    public: PathBuf,
    /// `gpg --export --armor`.
    armored: String,
}

impl Gpg {
    /// A key of gpg's default algorithm (RSA with GnuPG 2.2).
    fn new(name: &str) -> Gpg {
        Gpg::with_algo(name, "default")
    }

    /// A key of `algo` (`ed25519`: GnuPG 2.4's default).
    fn with_algo(name: &str, algo: &str) -> Gpg {
        let home = tempfile::Builder::new()
            .prefix("gpg-")
            .tempdir_in("/tmp")
            .expect("tmp");
        let gpg = |args: &[&str]| {
            run_ok(
                Command::new("gpg")
                    .env("GNUPGHOME", home.path())
                    .args(["--batch", "--no-tty"])
                    .args(args),
            )
        };
        gpg(&[
            "--passphrase",
            "",
            "--quick-gen-key",
            &format!("{name} <{name}@example.com>"),
            algo,
            "sign",
            "never",
        ]);
        let colons = gpg(&["--list-keys", "--with-colons"]);
        let fpr = colons
            .lines()
            .find(|l| l.starts_with("fpr:"))
            .and_then(|l| l.split(':').nth(9))
            .expect("fingerprint")
            .to_string();
        let public = home.path().join("public.gpg");
        gpg(&["--output", public.to_str().expect("path"), "--export", &fpr]);
        let armored = gpg(&["--export", "--armor", &fpr]);
        Gpg {
            home,
            fpr,
            public,
            armored,
        }
    }

    fn env(&self, c: &mut Command) {
        c.env("GNUPGHOME", self.home.path());
    }
}

impl Drop for Gpg {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf")
            .env("GNUPGHOME", self.home.path())
            .args(["--kill", "gpg-agent"])
            .output();
    }
}

/// A sigstore key pair in cosign's encrypted format, with its passphrase file.
struct SigstoreKey {
    private: PathBuf,
    passphrase: PathBuf,
    public: PathBuf,
    public_pem: String,
}

fn sigstore_key(dir: &Path, name: &str, label: &str) -> SigstoreKey {
    let pass = format!("pass-{name}");
    let (private, public_pem) =
        isula_trust::sigstore::generate(pass.as_bytes(), label).expect("generate a key");
    let k = SigstoreKey {
        private: dir.join(format!("{name}.key")),
        passphrase: dir.join(format!("{name}.pass")),
        public: dir.join(format!("{name}.pub")),
        public_pem,
    };
    std::fs::write(&k.private, private).expect("key");
    std::fs::write(&k.passphrase, format!("{pass}\n")).expect("pass");
    std::fs::write(&k.public, &k.public_pem).expect("pub");
    k
}

/// skopeo with the given policy and registries.d (None: `--insecure-policy`).
fn skopeo(policy: Option<(&Path, &Path)>, gpg: Option<&Gpg>, args: &[&str]) -> Output {
    let mut c = Command::new("skopeo");
    match policy {
        Some((p, d)) => {
            c.arg("--policy").arg(p).arg("--registries.d").arg(d);
        }
        None => {
            c.arg("--insecure-policy");
        }
    }
    if let Some(g) = gpg {
        g.env(&mut c);
    }
    c.args(args).output().expect("run skopeo")
}

fn skopeo_ok(policy: Option<(&Path, &Path)>, gpg: Option<&Gpg>, args: &[&str]) -> String {
    let o = skopeo(policy, gpg, args);
    assert!(
        o.status.success(),
        "skopeo {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Copies `from` to `to` inside the registry (no policy), with extra skopeo flags.
fn copy(gpg: Option<&Gpg>, regd: Option<&Path>, from: &str, to: &str, extra: &[&str]) {
    let mut args = vec!["copy", "--src-tls-verify=false", "--dest-tls-verify=false"];
    args.extend_from_slice(extra);
    let src = format!("docker://{from}");
    let dst = format!("docker://{to}");
    args.push(&src);
    args.push(&dst);
    let mut c = Command::new("skopeo");
    c.arg("--insecure-policy");
    if let Some(d) = regd {
        c.arg("--registries.d").arg(d);
    }
    if let Some(g) = gpg {
        g.env(&mut c);
    }
    run_ok(c.args(&args));
}

/// Whether skopeo, enforcing `policy` with `regd`, accepts pulling `image`; its error.
fn skopeo_accepts(policy: &Path, regd: &Path, image: &str) -> Result<(), String> {
    let out = tempfile::tempdir().expect("tmp");
    let o = skopeo(
        Some((policy, regd)),
        None,
        &[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{image}"),
            &format!("dir:{}", out.path().display()),
        ],
    );
    if o.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).to_string())
    }
}

/// The signature files under a lookaside directory, by relative path.
fn lookaside_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The lookaside directory of `repo_path` (`signed/app`) at its only signed digest.
fn signature_dir(lookaside: &Path, repo_path: &str) -> PathBuf {
    let parent = lookaside
        .join(repo_path)
        .parent()
        .expect("parent")
        .to_path_buf();
    let leaf = Path::new(repo_path)
        .file_name()
        .expect("leaf")
        .to_string_lossy()
        .to_string();
    let dirs: Vec<PathBuf> = std::fs::read_dir(&parent)
        .expect("lookaside dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{leaf}@sha256=")))
        })
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs[0].clone()
}

/// The digest a lookaside directory is for (`…/app@sha256=HEX`).
fn digest_of(sig_dir: &Path) -> String {
    let name = sig_dir
        .file_name()
        .expect("name")
        .to_string_lossy()
        .to_string();
    let hex = name.split("@sha256=").nth(1).expect("digest").to_string();
    format!("sha256:{hex}")
}

/// Flips a byte in the middle of a signature file (inside gpg's compressed packet: the
/// signed data or the signature no longer match).
fn tamper(p: &Path) {
    let mut b = std::fs::read(p).expect("signature");
    let mid = b.len() / 2;
    b[mid] ^= 0x55;
    std::fs::write(p, b).expect("tamper");
}

/// Pull `image` and require a refusal naming it, the requirement and `why`, with the
/// store as it was.
fn refused(d: &Daemon, image: &str, requirement: &str, why: &str) -> String {
    let before = d.store_snapshot();
    let err = d.fails(&["ctr-img", "pull", image]);
    eprintln!("refused as expected: {err}");
    assert!(
        err.contains(image) && err.contains(requirement) && err.contains(why),
        "pulling {image}: want {requirement:?} and {why:?} in: {err}"
    );
    assert_eq!(
        d.store_snapshot(),
        before,
        "a refused pull stored something"
    );
    assert!(d.leftovers().is_empty(), "{:?}", d.leftovers());
    err
}

/// A registry with `REPO/base:1` pushed unsigned by a daemon of its own.
fn seeded() -> (Registry, String) {
    let reg = Registry::start(RegistryOptions::default());
    let host = reg.host();
    let seeder = Daemon::for_registries(&[&host]);
    let base = format!("{host}/base:1");
    seeder.import_busybox(&base, &[]);
    seeder.ok(&["ctr-img", "push", &base]);
    (reg, base)
}

fn signed_by(key: &str, identity: &str) -> String {
    format!("[{{\"type\":\"signedBy\",\"keyType\":\"GPGKeys\",{key}{identity}}}]")
}

#[test]
fn skopeo_gpg_signatures_verify_on_pull_and_the_refusals_match_skopeo() {
    need_tools();
    let (reg, base) = seeded();
    let host = reg.host();
    let ours = Gpg::new("trusted");
    let other = Gpg::new("stranger");
    let modern = Gpg::with_algo("modern", "ed25519");
    let work = tempfile::tempdir().expect("tmp");
    let sigs = work.path().join("sigstore");
    // skopeo writes signatures where this registries.d says.
    let stage = work.path().join("stage.d");
    std::fs::create_dir(&stage).expect("mkdir");
    std::fs::write(
        stage.join("s.yaml"),
        format!(
            "default-docker:\n  lookaside-staging: file://{}\n",
            sigs.display()
        ),
    )
    .expect("yaml");
    let sign_copy = |gpg: &Gpg, to: &str| {
        copy(Some(gpg), Some(&stage), &base, to, &["--sign-by", &gpg.fpr]);
    };
    let key_path = format!("\"keyPath\":\"{}\"", ours.public.display());
    let key_data = format!(
        "\"keyData\":\"{}\"",
        base64::engine::general_purpose::STANDARD.encode(&ours.armored)
    );
    let key_paths = format!(
        "\"keyPaths\":[\"{}\",\"{}\",\"{}\"]",
        other.public.display(),
        modern.public.display(),
        ours.public.display()
    );
    let policy = format!(
        "{{\"default\":[{{\"type\":\"insecureAcceptAnything\"}}],\"transports\":{{\"docker\":{{\
         \"{host}/signed\":{},\
         \"{host}/bydata\":{},\
         \"{host}/bypaths\":{},\
         \"{host}/remapped\":{},\
         \"{host}/viahttp\":{},\
         \"{host}/exactrepo\":{},\
         \"{host}/exactref\":{},\
         \"{host}/matchexact\":{}}}}}}}",
        signed_by(&key_path, ""),
        signed_by(
            &key_data,
            ",\"signedIdentity\":{\"type\":\"matchRepository\"}"
        ),
        signed_by(&key_paths, ""),
        signed_by(
            &key_path,
            &format!(
                ",\"signedIdentity\":{{\"type\":\"remapIdentity\",\"prefix\":\"{host}/remapped\",\"signedPrefix\":\"{host}/signed\"}}"
            )
        ),
        signed_by(&key_path, ""),
        signed_by(
            &key_path,
            &format!(",\"signedIdentity\":{{\"type\":\"exactRepository\",\"dockerRepository\":\"{host}/signed/app\"}}")
        ),
        signed_by(
            &key_path,
            &format!(",\"signedIdentity\":{{\"type\":\"exactReference\",\"dockerReference\":\"{host}/signed/app:1\"}}")
        ),
        signed_by(&key_path, ",\"signedIdentity\":{\"type\":\"matchExact\"}"),
    );
    // The same signatures over HTTP for one scope (a `docker:` entry over the default).
    std::fs::create_dir_all(&sigs).expect("mkdir");
    let http = isula_integration::http_files::HttpFiles::serve(&sigs);
    let lookaside = format!(
        "default-docker:\n  lookaside: file://{}\ndocker:\n  {host}/viahttp:\n    lookaside: {}\n",
        sigs.display(),
        http.url("")
    );
    let d = Daemon::start_configured(
        &[
            ("registries.toml", &insecure_registries(&[&host])),
            ("policy.json", &policy),
            ("registries.d/lookaside.yaml", &lookaside),
        ],
        &["--log-level", "debug"],
        &[],
    );
    let (policy_file, regd) = (d.etc().join("policy.json"), d.etc().join("registries.d"));

    // Positive controls: skopeo's signatures verify, by keyPath, keyData and keyPaths.
    let app = format!("{host}/signed/app:1");
    sign_copy(&ours, &app);
    sign_copy(&ours, &format!("{host}/bydata/app:7"));
    sign_copy(&ours, &format!("{host}/bypaths/app:1"));
    let sig_dir = signature_dir(&sigs, "signed/app");
    assert!(
        sig_dir.join("signature-1").is_file(),
        "skopeo's lookaside layout"
    );
    let digest = digest_of(&sig_dir);
    // An Ed25519 key among keyPaths.
    sign_copy(&modern, &format!("{host}/bypaths/ed25519:1"));
    for image in [
        app.clone(),
        format!("{host}/bydata/app:7"),
        format!("{host}/bypaths/app:1"),
        format!("{host}/bypaths/ed25519:1"),
    ] {
        skopeo_accepts(&policy_file, &regd, &image).expect("skopeo accepts");
        d.ok(&["ctr-img", "pull", &image]);
    }
    // An http:// lookaside: found there, and only there (no signature: refused).
    let via_http = format!("{host}/viahttp/app:1");
    sign_copy(&ours, &via_http);
    skopeo_accepts(&policy_file, &regd, &via_http).expect("skopeo over http");
    d.ok(&["ctr-img", "pull", &via_http]);
    assert!(
        http.hits()
            .iter()
            .any(|h| h.starts_with("/viahttp/app@sha256=") && h.ends_with("/signature-1")),
        "{:?}",
        http.hits()
    );
    let http_unsigned = format!("{host}/viahttp/unsigned:1");
    copy(None, None, &base, &http_unsigned, &[]);
    refused(
        &d,
        &http_unsigned,
        "signedBy",
        "no simple-signing signature",
    );
    assert!(skopeo_accepts(&policy_file, &regd, &http_unsigned).is_err());
    // matchRepoDigestOrExact takes the repository's signature for a pull by digest.
    d.ok(&["ctr-img", "pull", &format!("{host}/signed/app@{digest}")]);
    // remapIdentity: the signature for signed/app:1 stands for remapped/app:1.
    copy(None, None, &app, &format!("{host}/remapped/app:1"), &[]);
    let remapped_dir = sigs.join(format!(
        "remapped/{}",
        sig_dir.file_name().expect("name").to_string_lossy()
    ));
    std::fs::create_dir_all(&remapped_dir).expect("mkdir");
    std::fs::copy(
        sig_dir.join("signature-1"),
        remapped_dir.join("signature-1"),
    )
    .expect("cp");
    skopeo_accepts(&policy_file, &regd, &format!("{host}/remapped/app:1")).expect("remap");
    d.ok(&["ctr-img", "pull", &format!("{host}/remapped/app:1")]);
    // exactRepository and exactReference: the signature for signed/app:1 stands for any
    // image the rule names it for; the same image under a tag exactReference does not name
    // is still accepted (the rule ignores the pulled name), as skopeo agrees.
    for (repo, tag) in [("exactrepo", "5"), ("exactref", "9")] {
        let image = format!("{host}/{repo}/app:{tag}");
        copy(None, None, &app, &image, &[]);
        let dir = sigs.join(format!(
            "{repo}/{}",
            sig_dir.file_name().expect("name").to_string_lossy()
        ));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::copy(sig_dir.join("signature-1"), dir.join("signature-1")).expect("cp");
        skopeo_accepts(&policy_file, &regd, &image).expect("skopeo exact rules");
        d.ok(&["ctr-img", "pull", &image]);
    }
    // matchExact: the signed tag passes; a pull by digest does not (the signature names a
    // tag), where matchRepoDigestOrExact took it: both tools agree.
    let exact = format!("{host}/matchexact/app:1");
    sign_copy(&ours, &exact);
    skopeo_accepts(&policy_file, &regd, &exact).expect("skopeo matchExact");
    d.ok(&["ctr-img", "pull", &exact]);
    d.ok(&["ctr-img", "rm", "-a"]);
    let exact_digest = format!("{host}/matchexact/app@{digest}");
    assert!(skopeo_accepts(&policy_file, &regd, &exact_digest).is_err());
    refused(&d, &exact_digest, "signedBy", "matchExact does not accept");
    d.ok(&["ctr-img", "rm", "-a"]);

    // No signature at all.
    let unsigned = format!("{host}/signed/unsigned:1");
    copy(None, None, &base, &unsigned, &[]);
    refused(&d, &unsigned, "signedBy", "no simple-signing signature");
    assert!(skopeo_accepts(&policy_file, &regd, &unsigned).is_err());

    // Re-tagged: the same manifest under another tag; its signature names tag 1.
    let retagged = format!("{host}/signed/app:retag");
    copy(None, None, &app, &retagged, &[]);
    refused(&d, &retagged, "signedBy", "does not accept");
    assert!(skopeo_accepts(&policy_file, &regd, &retagged).is_err());
    // ... while matchRepository (bydata) takes a re-tag in the same repository.
    let bydata_retag = format!("{host}/bydata/app:8");
    copy(
        None,
        None,
        &format!("{host}/bydata/app:7"),
        &bydata_retag,
        &[],
    );
    skopeo_accepts(&policy_file, &regd, &bydata_retag).expect("skopeo matchRepository");
    d.ok(&["ctr-img", "pull", &bydata_retag]);
    d.ok(&["ctr-img", "rm", "-a"]);

    // Signed with a key the policy does not name.
    let stranger = format!("{host}/signed/stranger:1");
    sign_copy(&other, &stranger);
    refused(
        &d,
        &stranger,
        "signedBy",
        "not signed by any key the policy names",
    );
    assert!(skopeo_accepts(&policy_file, &regd, &stranger).is_err());

    // Tampered: it verified before the byte flip, not after.
    let tampered = format!("{host}/signed/tampered:1");
    sign_copy(&ours, &tampered);
    skopeo_accepts(&policy_file, &regd, &tampered).expect("before tampering");
    d.ok(&["ctr-img", "pull", &tampered]);
    d.ok(&["ctr-img", "rm", "-a"]);
    tamper(&signature_dir(&sigs, "signed/tampered").join("signature-1"));
    refused(&d, &tampered, "signedBy", "signature 1: ");
    assert!(skopeo_accepts(&policy_file, &regd, &tampered).is_err());

    // A build's FROM is held to the same policy.
    let ctx = work.path().join("ctx");
    std::fs::create_dir(&ctx).expect("ctx");
    std::fs::write(ctx.join("Dockerfile"), format!("FROM {stranger}\n")).expect("df");
    let err = d.fails(&["ctr-img", "build", ctx.to_str().expect("path")]);
    assert!(
        err.contains("not signed by any key the policy names"),
        "{err}"
    );
    std::fs::write(ctx.join("Dockerfile"), format!("FROM {app}\n")).expect("df");
    d.ok(&["ctr-img", "build", ctx.to_str().expect("path")]);
    // So is a named context's image.
    std::fs::write(ctx.join("Dockerfile"), "FROM base\n").expect("df");
    let err = d.fails(&[
        "ctr-img",
        "build",
        "--build-context",
        &format!("base=docker-image://{stranger}"),
        ctx.to_str().expect("path"),
    ]);
    assert!(
        err.contains("not signed by any key the policy names"),
        "{err}"
    );
    d.ok(&["ctr-img", "rm", "-a"]);
    d.ok(&[
        "ctr-img",
        "build",
        "--build-context",
        &format!("base=docker-image://{app}"),
        ctx.to_str().expect("path"),
    ]);
}

#[test]
fn our_gpg_signed_push_is_accepted_by_skopeo() {
    need_tools();
    let reg = Registry::start(RegistryOptions::default());
    let host = reg.host();
    let ours = Gpg::new("pusher");
    let other = Gpg::new("outsider");
    let work = tempfile::tempdir().expect("tmp");
    let sigs = work.path().join("sigstore");
    let policy_for = |g: &Gpg| {
        format!(
            "{{\"default\":[{{\"type\":\"insecureAcceptAnything\"}}],\"transports\":{{\"docker\":{{\"{host}/mine\":{}}}}}}}",
            signed_by(&format!("\"keyPath\":\"{}\"", g.public.display()), "")
        )
    };
    let d = Daemon::start_configured(
        &[
            ("registries.toml", &insecure_registries(&[&host])),
            ("policy.json", &policy_for(&ours)),
            (
                "registries.d/default.yaml",
                &format!(
                    "default-docker:\n  lookaside: file://{0}\n  lookaside-staging: file://{0}\n",
                    sigs.display()
                ),
            ),
        ],
        &["--log-level", "debug", "--experimental"],
        &[],
    );
    let (policy_file, regd) = (d.etc().join("policy.json"), d.etc().join("registries.d"));
    let wrong_policy = work.path().join("wrong-policy.json");
    std::fs::write(&wrong_policy, policy_for(&other)).expect("policy");

    // An unknown key fails before anything is pushed.
    let never = format!("{host}/mine/never:1");
    d.import_busybox(&never, &[]);
    let mut c = d.cli_command(&["ctr-img", "push", "--sign-by", "0123456789ABCDEF", &never]);
    ours.env(&mut c);
    let o = c.output().expect("push");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("0123456789ABCDEF"),
        "{err}"
    );
    assert_eq!(
        reg.count_requests("PUT", "/manifests/"),
        0,
        "nothing pushed"
    );

    // The positive control: signed by us, accepted by skopeo and by us.
    let app = format!("{host}/mine/app:1");
    d.import_busybox(&app, &[]);
    let mut c = d.cli_command(&["ctr-img", "push", "--sign-by", &ours.fpr, &app]);
    ours.env(&mut c);
    let o = c.output().expect("push");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}\n{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        d.log()
    );
    assert!(out.contains("Storing signatures"), "{out}");
    let sig = signature_dir(&sigs, "mine/app").join("signature-1");
    assert!(sig.is_file(), "{:?}", lookaside_files(&sigs));
    skopeo_accepts(&policy_file, &regd, &app).expect("skopeo accepts our signature");
    // skopeo agrees on what was signed: its standalone verifier reads our signature.
    let manifest = work.path().join("manifest.json");
    skopeo_ok(
        None,
        None,
        &[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{app}"),
            &format!("dir:{}", work.path().join("copy").display()),
        ],
    );
    std::fs::copy(work.path().join("copy/manifest.json"), &manifest).expect("manifest");
    let verified = skopeo_ok(
        None,
        Some(&ours),
        &[
            "standalone-verify",
            manifest.to_str().expect("path"),
            &app,
            &ours.fpr,
            sig.to_str().expect("path"),
        ],
    );
    assert!(verified.contains("Signature verified"), "{verified}");
    d.ok(&["ctr-img", "rm", "-a"]);
    d.ok(&["ctr-img", "pull", &app]);
    d.ok(&["ctr-img", "rm", "-a"]);

    // The wrong key: skopeo refuses under a policy naming another key.
    let err = skopeo_accepts(&wrong_policy, &regd, &app).expect_err("wrong key");
    assert!(err.to_lowercase().contains("signature"), "{err}");

    // Re-tagged: refused by both.
    let retagged = format!("{host}/mine/app:2");
    copy(None, None, &app, &retagged, &[]);
    assert!(skopeo_accepts(&policy_file, &regd, &retagged).is_err());
    refused(&d, &retagged, "signedBy", "does not accept");

    // Tampered: refused by both.
    tamper(&sig);
    assert!(skopeo_accepts(&policy_file, &regd, &app).is_err());
    refused(&d, &app, "signedBy", "signature 1: ");

    // `manifest push --sign-by` signs the list's own digest: skopeo and we accept it;
    // unsigned, the same list is refused.
    let one = format!("{host}/mine/one:1");
    d.import_busybox(&one, &[]);

    // `build -o docker:// --sign-by` signs what it pushed; without a push it is refused.
    let ctx = work.path().join("ctx");
    std::fs::create_dir(&ctx).expect("ctx");
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {one}\nLABEL signed=yes\n"),
    )
    .expect("df");
    let built = format!("{host}/mine/built:1");
    let out = format!("docker://{built}");
    let mut c = d.cli_command(&[
        "ctr-img",
        "build",
        "--sign-by",
        &ours.fpr,
        "-o",
        &out,
        ctx.to_str().expect("path"),
    ]);
    ours.env(&mut c);
    let o = c.output().expect("build");
    assert!(
        o.status.success(),
        "{}\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        d.log()
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("Signed {built}")));
    skopeo_accepts(&policy_file, &regd, &built).expect("skopeo accepts the signed build");
    let mut c = d.cli_command(&[
        "ctr-img",
        "build",
        "--sign-by",
        &ours.fpr,
        ctx.to_str().expect("path"),
    ]);
    ours.env(&mut c);
    let o = c.output().expect("build");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("-o docker://"), "{err}");
    let list = format!("{host}/mine/list:1");
    d.ok(&["manifest", "create", &list, &one]);
    let unsigned_list = format!("{host}/mine/unsigned-list:1");
    d.ok(&["manifest", "push", &list, &unsigned_list]);
    let mut c = d.cli_command(&["manifest", "push", "--sign-by", &ours.fpr, &list, &list]);
    ours.env(&mut c);
    let o = c.output().expect("manifest push");
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    skopeo_accepts(&policy_file, &regd, &list).expect("skopeo accepts the signed list");
    assert!(skopeo_accepts(&policy_file, &regd, &unsigned_list).is_err());
    d.ok(&["ctr-img", "rm", "-a"]);
    d.ok(&["ctr-img", "pull", &list]);
    refused(
        &d,
        &unsigned_list,
        "signedBy",
        "no simple-signing signature",
    );
}

/// The manifest digest of `image` in the registry.
fn manifest_digest(image: &str) -> String {
    let out = skopeo_ok(
        None,
        None,
        &[
            "inspect",
            "--tls-verify=false",
            &format!("docker://{image}"),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("inspect JSON");
    v["Digest"].as_str().expect("Digest").to_string()
}

/// Checks, with openssl, the sigstore attachment of `image` (in `repo` at `host`): one
/// layer of cosign's media type whose payload names the image and its digest, signed
/// (the base64 annotation) by `public`.
fn openssl_verifies_attachment(host: &str, repo: &str, image: &str, public: &Path) {
    let digest = manifest_digest(image);
    let tag = format!("{}.sig", digest.replacen(':', "-", 1));
    let raw = skopeo_ok(
        None,
        None,
        &[
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{host}/{repo}:{tag}"),
        ],
    );
    let m: serde_json::Value = serde_json::from_str(&raw).expect("attachment manifest");
    let layer = &m["layers"][0];
    assert_eq!(
        layer["mediaType"], "application/vnd.dev.cosign.simplesigning.v1+json",
        "{raw}"
    );
    let sig_b64 = layer["annotations"]["dev.cosignproject.cosign/signature"]
        .as_str()
        .expect("signature annotation");
    let dir = tempfile::tempdir().expect("tmp");
    let payload_file = dir.path().join("payload");
    run_ok(
        Command::new("curl")
            .args(["-sSf", "-o"])
            .arg(&payload_file)
            .arg(format!(
                "http://{host}/v2/{repo}/blobs/{}",
                layer["digest"].as_str().expect("digest")
            )),
    );
    let payload: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&payload_file).expect("payload"))
            .expect("payload JSON");
    assert_eq!(
        payload["critical"]["type"],
        "cosign container image signature"
    );
    assert_eq!(
        payload["critical"]["image"]["docker-manifest-digest"],
        digest.as_str()
    );
    assert_eq!(payload["critical"]["identity"]["docker-reference"], image);
    let sig_file = dir.path().join("sig.der");
    std::fs::write(
        &sig_file,
        base64::engine::general_purpose::STANDARD
            .decode(sig_b64)
            .expect("base64"),
    )
    .expect("sig");
    let out = run_ok(
        Command::new("openssl")
            .args(["dgst", "-sha256", "-verify"])
            .arg(public)
            .arg("-signature")
            .arg(&sig_file)
            .arg(&payload_file),
    );
    assert!(out.contains("Verified OK"), "{out}");
}

/// A cosign payload for `digest` claiming `identity`, signed by openssl with `private`:
/// the payload (one byte more than what was signed when `tamper`) and the base64
/// signature.
fn openssl_sign(
    digest: &str,
    identity: &str,
    private: &Path,
    dir: &Path,
    tamper: bool,
) -> (String, String) {
    let payload = serde_json::json!({
        "critical": {
            "identity": {"docker-reference": identity},
            "image": {"docker-manifest-digest": digest},
            "type": "cosign container image signature",
        },
        "optional": null,
    })
    .to_string();
    let payload_file = dir.join("payload");
    std::fs::write(&payload_file, &payload).expect("payload");
    let sig_file = dir.join("sig.der");
    run_ok(
        Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(private)
            .arg("-out")
            .arg(&sig_file)
            .arg(&payload_file),
    );
    let sig_b64 =
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(&sig_file).expect("sig"));
    let payload = if tamper {
        format!("{payload} ")
    } else {
        payload
    };
    (payload, sig_b64)
}

/// Writes an openssl-made sigstore signature of `image` into a lookaside directory, in
/// containers/image's tagged format (a 0 byte, `sigstore-json`, then JSON).
fn lookaside_openssl_signature(
    lookaside: &Path,
    repo: &str,
    image: &str,
    private: &Path,
    work: &Path,
) {
    let digest = manifest_digest(image);
    let tmp = tempfile::tempdir_in(work).expect("tmp");
    let (payload, sig_b64) = openssl_sign(&digest, image, private, tmp.path(), false);
    let json = serde_json::json!({
        "mimeType": "application/vnd.dev.cosign.simplesigning.v1+json",
        "payload": base64::engine::general_purpose::STANDARD.encode(payload.as_bytes()),
        "annotations": {"dev.cosignproject.cosign/signature": sig_b64},
    });
    let dir = lookaside.join(format!("{repo}@{}", digest.replacen(':', "=", 1)));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mut blob = b"\x00sigstore-json\n".to_vec();
    blob.extend_from_slice(json.to_string().as_bytes());
    std::fs::write(dir.join("signature-1"), blob).expect("signature");
}

/// Signs, with openssl and `private`, a cosign payload claiming `identity` for `image`,
/// and attaches it as cosign does (tag `sha256-<hex>.sig`, laid out by this test).
fn attach_openssl_signature(
    host: &str,
    repo: &str,
    image: &str,
    identity: &str,
    private: &Path,
    work: &Path,
    tamper_payload: bool,
) {
    let digest = manifest_digest(image);
    let dir = tempfile::tempdir_in(work).expect("tmp");
    let (payload, sig_b64) = openssl_sign(&digest, identity, private, dir.path(), tamper_payload);
    let mut layout = isula_integration::oci_layout::Layout::new(&dir.path().join("layout"));
    let mut layer = layout
        .blob(
            "application/vnd.dev.cosign.simplesigning.v1+json",
            payload.as_bytes(),
        )
        .descriptor();
    layer["annotations"] = serde_json::json!({"dev.cosignproject.cosign/signature": sig_b64});
    let config = layout.blob(
        isula_integration::oci_layout::OCI_CONFIG,
        serde_json::json!({"architecture": "", "os": "", "config": {}, "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]}}).to_string().as_bytes(),
    );
    let manifest = layout.blob(
        isula_integration::oci_layout::OCI_MANIFEST,
        serde_json::json!({"schemaVersion": 2, "mediaType": isula_integration::oci_layout::OCI_MANIFEST, "config": config.descriptor(), "layers": [layer]}).to_string().as_bytes(),
    );
    layout.tag(&manifest, "sig");
    let tag = format!("{}.sig", digest.replacen(':', "-", 1));
    skopeo_ok(
        None,
        None,
        &[
            "copy",
            "--preserve-digests",
            "--dest-tls-verify=false",
            &layout.reference("sig"),
            &format!("docker://{host}/{repo}:{tag}"),
        ],
    );
}

/// Debian's skopeo 1.9 neither makes nor verifies sigstore signatures ("Debian-local
/// change: sigstore disabled"), so openssl is the independent party here: it verifies the
/// signature in the attachment we push (over the payload cosign's format defines), and it
/// signs, with a key it made, a payload in an attachment this test assembles by hand as
/// cosign lays it out, which we verify. Refusals beside positive controls as above.
#[test]
fn sigstore_signatures_verify_with_openssl_both_ways() {
    need_tools();
    let (reg, base) = seeded();
    let host = reg.host();
    let work = tempfile::tempdir().expect("tmp");
    let key = sigstore_key(work.path(), "ours", "ENCRYPTED SIGSTORE PRIVATE KEY");
    let other = sigstore_key(work.path(), "other", "ENCRYPTED COSIGN PRIVATE KEY");
    let attachments = "default-docker:\n  use-sigstore-attachments: true\n";
    let policy = format!(
        "{{\"default\":[{{\"type\":\"insecureAcceptAnything\"}}],\"transports\":{{\"docker\":{{\
         \"{host}/ss\":[{{\"type\":\"sigstoreSigned\",\"keyPath\":\"{}\"}}],\
         \"{host}/ssdata\":[{{\"type\":\"sigstoreSigned\",\"keyData\":\"{}\",\"signedIdentity\":{{\"type\":\"matchRepository\"}}}}]}}}}}}",
        key.public.display(),
        base64::engine::general_purpose::STANDARD.encode(&key.public_pem),
    );
    let d = Daemon::start_configured(
        &[
            ("registries.toml", &insecure_registries(&[&host])),
            ("policy.json", &policy),
            ("registries.d/attachments.yaml", attachments),
        ],
        &["--log-level", "debug"],
        &[],
    );
    let push_signed = |k: &SigstoreKey, name: &str| {
        d.import_busybox(name, &[]);
        let out = d.ok(&[
            "ctr-img",
            "push",
            "--sign-by-sigstore-private-key",
            k.private.to_str().expect("path"),
            "--sign-passphrase-file",
            k.passphrase.to_str().expect("path"),
            name,
        ]);
        assert!(out.contains("Storing signatures"), "{out}");
    };

    // We sign (both PEM labels cosign uses), skopeo verifies; and we do, by keyPath and
    // by keyData.
    let app = format!("{host}/ss/app:1");
    push_signed(&key, &app);
    openssl_verifies_attachment(&host, "ss/app", &app, &key.public);
    d.ok(&["ctr-img", "rm", "-a"]);
    d.ok(&["ctr-img", "pull", &app]);
    let data_app = format!("{host}/ssdata/app:1");
    push_signed(&key, &data_app);
    d.ok(&["ctr-img", "rm", "-a"]);
    d.ok(&["ctr-img", "pull", &data_app]);
    d.ok(&["ctr-img", "rm", "-a"]);

    // openssl signs (its own key), the attachment laid out by hand: we verify it; the
    // same under a policy naming our key is refused.
    let ext = format!("{host}/ssext/app:1");
    copy(None, None, &base, &ext, &[]);
    let ec = work.path().join("ec.pem");
    let ec_pub = work.path().join("ec.pub");
    run_ok(
        Command::new("openssl")
            .args([
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
            ])
            .arg(&ec),
    );
    run_ok(
        Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&ec)
            .arg("-out")
            .arg(&ec_pub),
    );
    attach_openssl_signature(&host, "ssext/app", &ext, &ext, &ec, work.path(), false);
    let sigstore_lookaside = work.path().join("sigstore-lookaside");
    let d2 = Daemon::start_configured(
        &[
            ("registries.toml", &insecure_registries(&[&host])),
            (
                "policy.json",
                &format!(
                    "{{\"default\":[{{\"type\":\"reject\"}}],\"transports\":{{\"docker\":{{\"{host}/ssext/app\":[{{\"type\":\"sigstoreSigned\",\"keyPath\":\"{}\"}}],\"{host}/ssext/other\":[{{\"type\":\"sigstoreSigned\",\"keyPath\":\"{}\"}}],\"{host}/sslookaside\":[{{\"type\":\"sigstoreSigned\",\"keyPath\":\"{}\"}}]}}}}}}",
                    ec_pub.display(),
                    key.public.display(),
                    ec_pub.display()
                ),
            ),
            (
                "registries.d/attachments.yaml",
                &format!("{attachments}  lookaside: file://{}\n", sigstore_lookaside.display()),
            ),
        ],
        &[],
        &[],
    );
    d2.ok(&["ctr-img", "pull", &ext]);
    let ext_other = format!("{host}/ssext/other:1");
    copy(None, None, &base, &ext_other, &[]);
    attach_openssl_signature(
        &host,
        "ssext/other",
        &ext_other,
        &ext_other,
        &ec,
        work.path(),
        false,
    );
    refused(
        &d2,
        &ext_other,
        "sigstoreSigned",
        "does not verify with any key",
    );
    // Tampered: the payload differs by a byte from what openssl signed.
    let ext_tampered = format!("{host}/ssext/app/tampered:1");
    copy(None, None, &base, &ext_tampered, &[]);
    attach_openssl_signature(
        &host,
        "ssext/app/tampered",
        &ext_tampered,
        &ext_tampered,
        &ec,
        work.path(),
        true,
    );
    refused(
        &d2,
        &ext_tampered,
        "sigstoreSigned",
        "does not verify with any key",
    );
    // A sigstore signature in the lookaside (containers/image's tagged format) counts
    // too; without it, the same image is refused.
    let in_lookaside = format!("{host}/sslookaside/app:1");
    copy(None, None, &base, &in_lookaside, &[]);
    refused(
        &d2,
        &in_lookaside,
        "sigstoreSigned",
        "no sigstore signature",
    );
    lookaside_openssl_signature(
        &sigstore_lookaside,
        "sslookaside/app",
        &in_lookaside,
        &ec,
        work.path(),
    );
    d2.ok(&["ctr-img", "pull", &in_lookaside]);
    drop(d2);

    // Unsigned, signed with another key, re-tagged: refused by both.
    let unsigned = format!("{host}/ss/unsigned:1");
    copy(None, None, &base, &unsigned, &[]);
    refused(&d, &unsigned, "sigstoreSigned", "no sigstore signature");
    let stranger = format!("{host}/ss/stranger:1");
    push_signed(&other, &stranger);
    d.ok(&["ctr-img", "rm", "-a"]);
    refused(
        &d,
        &stranger,
        "sigstoreSigned",
        "does not verify with any key",
    );
    let retagged = format!("{host}/ss/app:2");
    copy(None, None, &app, &retagged, &[]);
    refused(&d, &retagged, "sigstoreSigned", "does not accept");
    // ... which matchRepository (ssdata) takes.
    let data_retag = format!("{host}/ssdata/app:2");
    copy(None, None, &data_app, &data_retag, &[]);
    d.ok(&["ctr-img", "pull", &data_retag]);

    // A wrong passphrase fails before anything is pushed, naming the key.
    let bad_pass = work.path().join("bad.pass");
    std::fs::write(&bad_pass, "not it\n").expect("pass");
    let never = format!("{host}/ss/never:1");
    d.import_busybox(&never, &[]);
    let puts = reg.count_requests("PUT", "/manifests/");
    let err = d.fails(&[
        "ctr-img",
        "push",
        "--sign-by-sigstore-private-key",
        key.private.to_str().expect("path"),
        "--sign-passphrase-file",
        bad_pass.to_str().expect("path"),
        &never,
    ]);
    assert!(
        err.contains(key.private.to_str().expect("path"))
            && err.contains("bad.pass")
            && err.contains("wrong passphrase"),
        "{err}"
    );
    assert_eq!(
        reg.count_requests("PUT", "/manifests/"),
        puts,
        "nothing pushed"
    );
}

#[test]
fn bad_keys_and_oversized_signatures_fail_clearly_and_store_nothing() {
    need_tools();
    let (reg, base) = seeded();
    let host = reg.host();
    let ours = Gpg::new("bad-input");
    let work = tempfile::tempdir().expect("tmp");
    let sigs = work.path().join("sigstore");
    let not_a_key = work.path().join("not-a-key.gpg");
    std::fs::write(&not_a_key, "hello, I am not a key\n").expect("write");
    let policy = format!(
        "{{\"default\":[{{\"type\":\"insecureAcceptAnything\"}}],\"transports\":{{\"docker\":{{\
         \"{host}/missing\":{},\
         \"{host}/notakey\":{},\
         \"{host}/ssnotakey\":[{{\"type\":\"sigstoreSigned\",\"keyPath\":\"{}\"}}],\
         \"{host}/big\":{}}}}}}}",
        signed_by("\"keyPath\":\"/nonexistent/isula-test/key.gpg\"", ""),
        signed_by(&format!("\"keyPath\":\"{}\"", not_a_key.display()), ""),
        not_a_key.display(),
        signed_by(&format!("\"keyPath\":\"{}\"", ours.public.display()), ""),
    );
    let d = Daemon::start_configured(
        &[
            ("registries.toml", &insecure_registries(&[&host])),
            ("policy.json", &policy),
            (
                "registries.d/l.yaml",
                &format!("default-docker:\n  lookaside: file://{}\n", sigs.display()),
            ),
        ],
        &[],
        &[],
    );
    // The positive control: the default scope pulls.
    d.ok(&["ctr-img", "pull", &base]);
    d.ok(&["ctr-img", "rm", "-a"]);
    for repo in ["missing", "notakey", "ssnotakey"] {
        copy(None, None, &base, &format!("{host}/{repo}/app:1"), &[]);
    }
    refused(
        &d,
        &format!("{host}/missing/app:1"),
        "/nonexistent/isula-test/key.gpg",
        "No such file",
    );
    refused(
        &d,
        &format!("{host}/notakey/app:1"),
        not_a_key.to_str().expect("path"),
        "not an OpenPGP key",
    );
    refused(
        &d,
        &format!("{host}/ssnotakey/app:1"),
        not_a_key.to_str().expect("path"),
        "not a PEM file",
    );
    // A signature over the 4 MiB cap: refused, named; the same image with a real
    // signature passes.
    let stage = work.path().join("stage.d");
    std::fs::create_dir(&stage).expect("mkdir");
    std::fs::write(
        stage.join("s.yaml"),
        format!(
            "default-docker:\n  lookaside-staging: file://{}\n",
            sigs.display()
        ),
    )
    .expect("yaml");
    let big = format!("{host}/big/app:1");
    copy(
        Some(&ours),
        Some(&stage),
        &base,
        &big,
        &["--sign-by", &ours.fpr],
    );
    d.ok(&["ctr-img", "pull", &big]);
    d.ok(&["ctr-img", "rm", "-a"]);
    let sig = signature_dir(&sigs, "big/app").join("signature-1");
    std::fs::write(&sig, vec![0x89u8; (4 << 20) + 1]).expect("big");
    refused(&d, &big, "signature-1", "larger than the limit");

    // A sigstore signature with nowhere to go (no use-sigstore-attachments): refused
    // before anything is pushed.
    let key = sigstore_key(work.path(), "k", "ENCRYPTED SIGSTORE PRIVATE KEY");
    let nowhere = format!("{host}/nowhere/app:1");
    d.import_busybox(&nowhere, &[]);
    let puts = reg.count_requests("PUT", "/manifests/");
    let err = d.fails(&[
        "ctr-img",
        "push",
        "--sign-by-sigstore-private-key",
        key.private.to_str().expect("path"),
        "--sign-passphrase-file",
        key.passphrase.to_str().expect("path"),
        &nowhere,
    ]);
    assert!(err.contains("use-sigstore-attachments"), "{err}");
    assert_eq!(
        reg.count_requests("PUT", "/manifests/"),
        puts,
        "nothing pushed"
    );

    // Configuration the daemon cannot use stops its start, naming the file and the fault.
    for (file, text, want) in [
        (
            "policy.json",
            "{\"default\":[{\"type\":\"signedByMagic\"}]}".to_string(),
            "signedByMagic",
        ),
        (
            "registries.d/bad.yaml",
            "default-docker:\n  lookaside: ftp://sigs.example.com\n".to_string(),
            "bad.yaml",
        ),
    ] {
        let dir = tempfile::tempdir().expect("tmp");
        let etc = dir.path().join("etc");
        let p = etc.join(file);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, text).expect("write");
        let out = Command::new(bin("isula-builder"))
            .arg("--dataroot")
            .arg(dir.path().join("data"))
            .arg("--runroot")
            .arg(dir.path().join("run"))
            .arg("--config-dir")
            .arg(&etc)
            .arg("--host")
            .arg(format!("unix://{}", dir.path().join("s.sock").display()))
            .output()
            .expect("daemon");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{file}: {err}");
    }
}

/// Bad input (issue 32): a lookaside URL on another host, where nothing answers. The pull
/// is refused naming that URL's host, and nothing is stored; the positive control is the
/// same image under a scope whose lookaside is on a host that serves its signature.
#[test]
fn a_lookaside_on_another_host_that_does_not_answer_is_named_and_stores_nothing() {
    need_tools();
    let (reg, base) = seeded();
    let host = reg.host();
    let ours = Gpg::new("elsewhere");
    let work = tempfile::tempdir().expect("tmp");
    let sigs = work.path().join("sigstore");
    std::fs::create_dir_all(&sigs).expect("mkdir");
    let policy = format!(
        "{{\"default\":[{{\"type\":\"insecureAcceptAnything\"}}],\"transports\":{{\"docker\":{{\
         \"{host}/elsewhere\":{},\"{host}/here\":{}}}}}}}",
        signed_by(&format!("\"keyPath\":\"{}\"", ours.public.display()), ""),
        signed_by(&format!("\"keyPath\":\"{}\"", ours.public.display()), ""),
    );
    // Another host (127.0.0.2) on a port where nothing listens.
    let elsewhere = format!(
        "http://127.0.0.2:{}/sigstore",
        isula_integration::registry::free_port()
    );
    let http = isula_integration::http_files::HttpFiles::serve(&sigs);
    let regd = format!(
        "docker:\n  {host}/elsewhere:\n    lookaside: {elsewhere}\n  {host}/here:\n    lookaside: {}\n",
        http.url("")
    );
    // Both images signed by our key, the signatures where the `here` lookaside serves them.
    let staging = work.path().join("regd");
    std::fs::create_dir_all(&staging).expect("mkdir");
    std::fs::write(
        staging.join("s.yaml"),
        format!(
            "default-docker:\n  lookaside-staging: file://{}\n",
            sigs.display()
        ),
    )
    .expect("staging");
    for repo in ["elsewhere", "here"] {
        copy(
            Some(&ours),
            Some(&staging),
            &base,
            &format!("{host}/{repo}/app:1"),
            &["--sign-by", &ours.fpr],
        );
    }
    let d = Daemon::start_configured(
        &[
            ("registries.toml", &insecure_registries(&[&host])),
            ("policy.json", &policy),
            ("registries.d/l.yaml", &regd),
        ],
        &[],
        &[],
    );
    d.ok(&["ctr-img", "pull", &format!("{host}/here/app:1")]);
    d.ok(&["ctr-img", "rm", "-a"]);
    let err = refused(
        &d,
        &format!("{host}/elsewhere/app:1"),
        "policy.json's scope",
        "http://127.0.0.2:",
    );
    assert!(err.contains("/elsewhere"), "{err}");
}
