//! Named fail points for the crash-point sweep and fault tests. Compiled in only with the
//! `failpoints` feature; then `UPDRAFT_FAILPOINT=NAME` makes the agent SIGKILL itself at that
//! point, exactly as `kill -9` would; `NAME=error` makes the step fail there with an I/O error,
//! and `NAME=delay:MS` holds it for MS milliseconds (the `fail` crate's model: kill, error,
//! delay). [`POINTS`] is every point there is: the sweeps must cover all of them.

/// Every fail point, in the order an install (then a removal) reaches them.
pub const POINTS: &[&str] = &[
    "download:mid",
    "download:done",
    "verified",
    "stage:mid",
    "staged",
    "carried",
    "swap:moved-out",
    "swap:exchanged",
    "swap:journaled",
    "swap:old-kept",
    "health:before",
    "healthy",
    "state:saved",
    "remove:before",
    "remove:done",
];

/// What a point armed in the environment does.
#[derive(Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
enum Action {
    Kill,
    Error,
    Delay(u64),
}

/// `NAME`, `NAME=error` or `NAME=delay:MS`: the action armed for `name`, if it is the one.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
fn armed(spec: &str, name: &str) -> Option<Action> {
    let (point, action) = spec.split_once('=').unwrap_or((spec, "kill"));
    if point != name {
        return None;
    }
    match action {
        "kill" => Some(Action::Kill),
        "error" => Some(Action::Error),
        a => a.strip_prefix("delay:").and_then(|ms| ms.parse().ok()).map(Action::Delay),
    }
}

/// Acts here if this build has fail points and the environment arms this one: dies, fails
/// (the `Err` the caller passes on as that step's failure) or waits.
#[inline]
pub fn hit(name: &str) -> std::io::Result<()> {
    debug_assert!(POINTS.contains(&name), "fail point {name} is not in POINTS");
    #[cfg(feature = "failpoints")]
    if let Ok(spec) = std::env::var("UPDRAFT_FAILPOINT") {
        match armed(&spec, name) {
            Some(Action::Kill) => {
                eprintln!("failpoint {name}: SIGKILL");
                // SAFETY: getpid and kill have no memory-safety preconditions.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
            }
            Some(Action::Error) => {
                eprintln!("failpoint {name}: error");
                return Err(std::io::Error::other(format!("fail point {name}")));
            }
            Some(Action::Delay(ms)) => {
                eprintln!("failpoint {name}: delay {ms} ms");
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
            None => {}
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
    Ok(())
}

/// [`hit`] where the step's error is the agent's: an injected error fails the step as an I/O
/// error at the point's name.
pub fn check(name: &str) -> crate::error::Result<()> {
    hit(name).map_err(|source| crate::error::AgentError::Io { path: name.into(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_arms_one_point_with_one_action() {
        assert_eq!(armed("staged", "staged"), Some(Action::Kill));
        assert_eq!(armed("staged=error", "staged"), Some(Action::Error));
        assert_eq!(armed("staged=delay:250", "staged"), Some(Action::Delay(250)));
        assert_eq!(armed("staged", "verified"), None);
        assert_eq!(armed("staged=delay:soon", "staged"), None, "a malformed action arms nothing");
    }
}
