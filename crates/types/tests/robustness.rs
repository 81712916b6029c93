//! Random inputs never panic reference, digest or manifest parsing.

use isula_types::image::{ImageConfig, Index, Manifest};
use isula_types::{Digest, Reference};

#[test]
fn random_references_and_documents_never_panic() {
    let pieces = [
        "a",
        "B",
        "/",
        ":",
        "@",
        "sha256:",
        ".",
        "-",
        "_",
        "__",
        "localhost",
        "5000",
        "[",
        "]",
        "::1",
        "\u{e9}",
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "{",
        "}",
        "\"",
        ",",
        "[]",
        "null",
        "1",
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..50_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = (x % 12) as usize;
        let mut s = String::new();
        let mut y = x;
        for _ in 0..n {
            y = y.rotate_left(7) ^ 0x5851_f42d_4c95_7f2d;
            s.push_str(pieces[(y % pieces.len() as u64) as usize]);
        }
        if let Ok(r) = Reference::parse(&s) {
            // A parsed reference round-trips through its own display forms.
            assert_eq!(
                Reference::parse(&r.to_string()).ok().as_ref(),
                Some(&r),
                "{s}"
            );
            assert!(Reference::parse(&r.familiar()).is_ok(), "{s}");
        }
        let _ = Digest::parse(&s);
        let _ = serde_json::from_str::<Manifest>(&s);
        let _ = serde_json::from_str::<Index>(&s);
        let _ = serde_json::from_str::<ImageConfig>(&s);
    }
}
