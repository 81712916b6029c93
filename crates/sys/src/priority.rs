//! CPU priority of background work: the layer compressor runs niced, so a build or an RPC
//! that needs the CPU now is not slowed by work that can wait.

/// Lowers the calling thread's CPU priority to `nice` (threads it starts inherit it).
/// Failure only means the work competes at the normal priority, so it is logged, not
/// returned.
pub fn lower_current_thread(nice: i32) {
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), nice) {
        tracing::debug!(nice, error = %e, "could not lower the thread's priority");
    }
}
