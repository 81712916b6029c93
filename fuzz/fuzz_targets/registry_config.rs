#![no_main]
//! registries.toml and policy.json from arbitrary text: parsed or refused with an error,
//! never a panic (the first byte picks which).
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    if which % 2 == 0 {
        if let Ok(r) = isula_registry::registries::Registries::parse("registries.toml", text) {
            let _ = (r.insecure(), r.blocked());
            for name in ["busybox", "a/b:1", "localhost:5000/x@sha256:0000000000000000000000000000000000000000000000000000000000000000"] {
                let _ = isula_registry::resolve::candidates(&r, name);
            }
        }
    } else {
        let _ = isula_registry::policy::Policy::parse("policy.json", text);
    }
});
