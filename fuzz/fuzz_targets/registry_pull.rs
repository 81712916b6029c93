#![no_main]
//! A pull from a registry that answers with arbitrary manifests, indexes, configs and
//! layers, through the real client and store: a served in-process HTTP registry on
//! 127.0.0.1 gives the fuzzer's bytes. Odd first byte: the manifest is made here from the
//! fuzzed config and layer with their true digests (so the config and layer checks and the
//! streaming unpack are reached); even: every document is the fuzzer's own. The oracle: no
//! panic; a pull that succeeds leaves a store that `check` finds sound; one that fails
//! leaves no image and no blob.
use sha2::{Digest as _, Sha256};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Mutex, OnceLock};

#[derive(Default, Clone)]
struct Served {
    top: (Vec<u8>, &'static str),
    by_digest: (Vec<u8>, &'static str),
    blobs: Vec<Vec<u8>>,
}

static SERVED: Mutex<Option<Served>> = Mutex::new(None);

const TYPES: [&str; 4] = [
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
];
const LAYER_TYPES: [&str; 3] = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
];

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn answer(mut s: TcpStream) {
    let mut r = BufReader::new(match s.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut first = String::new();
    if r.read_line(&mut first).is_err() {
        return;
    }
    loop {
        let mut l = String::new();
        match r.read_line(&mut l) {
            Ok(0) | Err(_) => return,
            Ok(_) if l == "\r\n" => break,
            Ok(_) => {}
        }
    }
    let mut parts = first.split(' ');
    let method = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or_default();
    let served = SERVED.lock().ok().and_then(|g| g.clone()).unwrap_or_default();
    let found: Option<(Vec<u8>, &str)> = if path == "/v2/" {
        Some((b"{}".to_vec(), "application/json"))
    } else if let Some(r) = path.strip_prefix("/v2/fuzz/manifests/") {
        Some(if r.starts_with("sha256:") { served.by_digest } else { served.top })
    } else if let Some(d) = path.strip_prefix("/v2/fuzz/blobs/") {
        served
            .blobs
            .iter()
            .find(|b| sha(b) == d)
            .map(|b| (b.clone(), "application/octet-stream"))
    } else {
        None
    };
    let _ = match found {
        Some((body, ty)) => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {ty}\r\nDocker-Content-Digest: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                sha(&body),
                body.len()
            );
            s.write_all(head.as_bytes())
                .and_then(|()| if method == "HEAD" { Ok(()) } else { s.write_all(&body) })
        }
        None => s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    };
}

fn registry() -> u16 {
    static PORT: OnceLock<u16> = OnceLock::new();
    *PORT.get_or_init(|| {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                std::thread::spawn(move || answer(c));
            }
        });
        port
    })
}

fn served(data: &[u8]) -> Option<Served> {
    let (&mode, rest) = data.split_first()?;
    let (&types, rest) = rest.split_first()?;
    // Parts: a little-endian u16 length, then that many bytes (or what is left).
    let mut rest = rest;
    let mut next = || {
        let n = match rest {
            [a, b, tail @ ..] => {
                rest = tail;
                u16::from_le_bytes([*a, *b]) as usize
            }
            _ => 0,
        };
        let (part, tail) = rest.split_at(n.min(rest.len()));
        rest = tail;
        part.to_vec()
    };
    if mode % 2 == 1 {
        let config = next();
        let layer = next();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": TYPES[(types % 2) as usize],
            "config": {
                "mediaType": if types % 2 == 0 { "application/vnd.docker.container.image.v1+json" } else { "application/vnd.oci.image.config.v1+json" },
                "digest": sha(&config),
                "size": config.len(),
            },
            "layers": [{
                "mediaType": LAYER_TYPES[((types / 2) % 3) as usize],
                "digest": sha(&layer),
                "size": layer.len(),
            }],
        });
        let m = serde_json::to_vec(&manifest).ok()?;
        Some(Served {
            top: (m.clone(), TYPES[(types % 2) as usize]),
            by_digest: (m, TYPES[(types % 2) as usize]),
            blobs: vec![config, layer],
        })
    } else {
        let top = next();
        let second = next();
        Some(Served {
            top: (top, TYPES[(types % 4) as usize]),
            by_digest: (second, TYPES[((types / 4) % 2) as usize]),
            blobs: vec![next(), next()],
        })
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some(s) = served(data) else { return };
    let port = registry();
    if let Ok(mut g) = SERVED.lock() {
        *g = Some(s);
    }
    let host = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().expect("tmp");
    let registries = isula_registry::Registries::parse(
        "registries.toml",
        &format!("[[registry]]\nlocation = \"{host}\"\ninsecure = true\n"),
    )
    .expect("registries.toml");
    let ctx = isula_registry::Context {
        registries,
        policy: None,
        certs_dir: dir.path().join("certs.d"),
        auth: isula_registry::AuthFile::new(dir.path().join("auth.json")),
        stall_timeout: std::time::Duration::from_secs(2),
        // No lookaside signature stores: the policy (none) asks for no signatures.
        registries_d: Default::default(),
    };
    let (store, _) = isula_store::Store::open(&dir.path().join("store")).expect("store");
    let cancel = isula_transport::Cancel::default();
    let result = isula_registry::pull::pull(&ctx, &store, &format!("{host}/fuzz:1"), &cancel, &mut |_| {});
    match result {
        Ok(_) => {
            let report = store.check().expect("check");
            assert!(report.is_sound(), "a pulled image left problems: {report:?}");
            assert_eq!(store.images().len(), 1);
        }
        Err(_) => {
            assert!(store.images().is_empty(), "a failed pull left an image");
            let blobs = store.content().list().expect("list");
            assert!(blobs.is_empty(), "a failed pull left blobs: {blobs:?}");
        }
    }
});
