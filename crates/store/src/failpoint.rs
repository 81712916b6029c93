//! Named pause points for crash tests: a debug build whose `ISULA_FAILPOINT` environment
//! variable names a point stops there for good, after logging `failpoint NAME reached`, so
//! that a test can SIGKILL the daemon at exactly that step of a multi-step write (a stage
//! commit, say) instead of racing a timer. Error points ([`fails`]) make the step fail
//! instead, as a device would (a writeback error this machine cannot make). Release builds
//! compile every point to nothing and never read the variable.

#[cfg(debug_assertions)]
fn armed() -> Option<&'static str> {
    static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    ARMED
        .get_or_init(|| std::env::var("ISULA_FAILPOINT").ok())
        .as_deref()
}

/// Whether the step named `name` must fail (`ISULA_FAILPOINT` names it; debug builds only).
#[inline]
pub fn fails(name: &str) -> bool {
    #[cfg(debug_assertions)]
    {
        if armed() == Some(name) {
            tracing::warn!("failpoint {name} reached: failing the step");
            return true;
        }
    }
    let _ = name;
    false
}

/// Pauses this thread forever when `ISULA_FAILPOINT` names `name` (debug builds only).
#[inline]
pub fn hit(name: &str) {
    #[cfg(debug_assertions)]
    {
        if armed() == Some(name) {
            tracing::warn!("failpoint {name} reached: pausing until killed");
            // Nothing unparks it: the thread stays here until the process is killed.
            loop {
                std::thread::park();
            }
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}
