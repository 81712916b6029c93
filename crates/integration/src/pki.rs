//! A test PKI made with openssl: CAs, server certificates for 127.0.0.1 and client
//! certificates by common name; and a daemon serving TCP with mutual TLS on them. For the
//! fleet and daemon-image tests (several daemons, one CA, a rogue one from another CA).

use crate::registry::free_port;
use crate::Daemon;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Pki {
    pub dir: tempfile::TempDir,
}

/// A client certificate's extensions.
pub const CLIENT_EXT: &str = "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n";
/// A server certificate's extensions, for 127.0.0.1 (and `localhost`).
pub const SERVER_EXT: &str =
    "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n";

fn openssl(dir: &Path, args: &[String]) {
    let o = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

impl Pki {
    /// CAs `ca` and `other-ca`; `server` (from `ca`) and `rogue-server` (from `other-ca`),
    /// both for 127.0.0.1.
    pub fn new() -> Pki {
        let p = Pki {
            dir: tempfile::tempdir().expect("pki"),
        };
        p.ca("ca");
        p.ca("other-ca");
        p.sign("ca", "server", "127.0.0.1", SERVER_EXT);
        p.sign("other-ca", "rogue-server", "127.0.0.1", SERVER_EXT);
        p
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn ca(&self, name: &str) {
        openssl(
            self.dir.path(),
            &strings(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.pem"),
                "-days",
                "30",
                "-subj",
                &format!("/CN={name}"),
            ]),
        );
    }

    /// `name.pem` and `name.key`, CN=`cn`, signed by `ca`, with the extensions `ext`.
    pub fn sign(&self, ca: &str, name: &str, cn: &str, ext: &str) {
        self.sign_days(ca, name, cn, 30, ext);
    }

    /// As [`Pki::sign`], valid for `days` (negative: already expired).
    pub fn sign_days(&self, ca: &str, name: &str, cn: &str, days: i32, ext: &str) {
        let d = self.dir.path();
        openssl(
            d,
            &strings(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ]),
        );
        std::fs::write(d.join(format!("{name}.ext")), ext).expect("ext");
        openssl(
            d,
            &strings(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-days",
                &days.to_string(),
                "-out",
                &format!("{name}.pem"),
                "-extfile",
                &format!("{name}.ext"),
            ]),
        );
    }

    /// The client flags for certificate `name` (trusting `ca`).
    pub fn client(&self, name: &str) -> Vec<String> {
        vec![
            "--tlscacert".into(),
            self.path("ca.pem").display().to_string(),
            "--tlscert".into(),
            self.path(&format!("{name}.pem")).display().to_string(),
            "--tlskey".into(),
            self.path(&format!("{name}.key")).display().to_string(),
        ]
    }

    /// A daemon serving its socket and `tcp://127.0.0.1:PORT` with mutual TLS (server
    /// certificate `server`, clients of `ca`), its config directory holding `files` (name,
    /// text), and `extra` flags; and its `tcp://` address.
    pub fn daemon(&self, server: &str, files: &[(&str, &str)], extra: &[&str]) -> (Daemon, String) {
        // A port found free may be taken again before the daemon binds it (by another
        // test's connection): then another port is tried.
        for _ in 0..5 {
            match self.try_daemon(server, files, extra) {
                Ok(started) => return started,
                Err(e) if e.contains("Address already in use") => continue,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("no free port for the daemon's tcp:// address in 5 tries")
    }

    fn try_daemon(
        &self,
        server: &str,
        files: &[(&str, &str)],
        extra: &[&str],
    ) -> Result<(Daemon, String), String> {
        let addr = format!("127.0.0.1:{}", free_port());
        let path = |n: &str| self.path(n).display().to_string();
        let mut flags: Vec<String> = vec![
            "--host".into(),
            format!("tcp://{addr}"),
            "--tlsverify".into(),
            "--tlscacert".into(),
            path("ca.pem"),
            "--tlscert".into(),
            path(&format!("{server}.pem")),
            "--tlskey".into(),
            path(&format!("{server}.key")),
        ];
        flags.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
        let d = Daemon::try_start_in(None, files, &refs, &[])?;
        Ok((d, format!("tcp://{addr}")))
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}
