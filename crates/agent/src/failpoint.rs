//! Named crash points for the crash-point sweep. Compiled in only with the `failpoints`
//! feature; then `UPDRAFT_FAILPOINT=NAME` makes the agent SIGKILL itself at that point, exactly
//! as `kill -9` would.

/// Dies here if this build has fail points and the environment names this one.
#[inline]
pub fn hit(name: &str) {
    #[cfg(feature = "failpoints")]
    if std::env::var("UPDRAFT_FAILPOINT").is_ok_and(|v| v == name) {
        eprintln!("failpoint {name}: SIGKILL");
        // SAFETY: getpid and kill have no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}
