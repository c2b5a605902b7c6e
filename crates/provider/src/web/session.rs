//! Console sessions and sign-in throttling, both in this provider's memory and both bounded.
//!
//! A session is a random 256-bit token in an `HttpOnly; Secure; SameSite=Strict` cookie, with
//! its own CSRF token that every form carries back. It ends when its user signs out, after
//! [`Sessions::idle`] without a request, or when its user's sessions exceed
//! [`PER_USER`] (the oldest goes). What a user may do is not kept here: every request asks the
//! store (`ops::check_user`), so a user removed or made a viewer loses the power at once.
//!
//! Failed sign-ins are counted per user name and per address: after [`FAILURES_ALLOWED`] within
//! [`FAILURE_WINDOW`], further attempts for that name or from that address are refused without
//! checking the password until the window has passed.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Sessions held at most, in all and per user.
pub const TOTAL: usize = 10_000;
pub const PER_USER: usize = 20;

/// Failed sign-ins allowed per user name and per address within the window.
pub const FAILURES_ALLOWED: u32 = 5;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(15 * 60);

/// The session cookie's name.
pub const COOKIE: &str = "updraft_session";

#[derive(Debug, Clone)]
pub struct Session {
    pub user: String,
    pub csrf: String,
    started: Instant,
    seen: Instant,
}

pub struct Sessions {
    idle: Duration,
    by_token: Mutex<HashMap<String, Session>>,
}

/// 32 random bytes from the OS, as hex.
pub fn token() -> String {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the OS random source");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Compares secrets in time independent of where they differ.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Sessions {
    pub fn new(idle: Duration) -> Self {
        Self { idle, by_token: Mutex::new(HashMap::new()) }
    }

    pub fn idle(&self) -> Duration {
        self.idle
    }

    /// Starts a session for `user`; returns its token.
    pub fn start(&self, user: &str) -> String {
        let now = Instant::now();
        let mut m = self.by_token.lock().expect("sessions");
        m.retain(|_, s| now.duration_since(s.seen) < self.idle);
        let mut mine: Vec<(Instant, String)> =
            m.iter().filter(|(_, s)| s.user == user).map(|(t, s)| (s.started, t.clone())).collect();
        mine.sort();
        while mine.len() >= PER_USER {
            m.remove(&mine.remove(0).1);
        }
        if m.len() >= TOTAL
            && let Some(oldest) = m.iter().min_by_key(|(_, s)| s.seen).map(|(t, _)| t.clone())
        {
            m.remove(&oldest);
        }
        let t = token();
        m.insert(t.clone(), Session { user: user.to_string(), csrf: token(), started: now, seen: now });
        t
    }

    /// The live session of `token`, marked as used now.
    pub fn get(&self, token: &str) -> Option<Session> {
        let now = Instant::now();
        let mut m = self.by_token.lock().expect("sessions");
        let s = m.get_mut(token)?;
        if now.duration_since(s.seen) >= self.idle {
            m.remove(token);
            return None;
        }
        s.seen = now;
        Some(s.clone())
    }

    pub fn end(&self, token: &str) {
        self.by_token.lock().expect("sessions").remove(token);
    }
}

#[derive(Default)]
pub struct SignInLimiter {
    failures: Mutex<HashMap<String, (Instant, u32)>>,
}

impl SignInLimiter {
    fn keys(user: &str, addr: Option<IpAddr>) -> [String; 2] {
        [format!("user:{user}"), format!("addr:{}", addr.map(|a| a.to_string()).unwrap_or_default())]
    }

    /// How long sign-ins for `user` from `addr` stay refused, if they are.
    pub fn blocked(&self, user: &str, addr: Option<IpAddr>) -> Option<Duration> {
        let now = Instant::now();
        let m = self.failures.lock().expect("sign-in limiter");
        Self::keys(user, addr)
            .iter()
            .filter_map(|k| m.get(k))
            .filter(|(start, n)| *n >= FAILURES_ALLOWED && now.duration_since(*start) < FAILURE_WINDOW)
            .map(|(start, _)| FAILURE_WINDOW - now.duration_since(*start))
            .max()
    }

    pub fn failed(&self, user: &str, addr: Option<IpAddr>) {
        let now = Instant::now();
        let mut m = self.failures.lock().expect("sign-in limiter");
        if m.len() > TOTAL {
            m.retain(|_, (start, _)| now.duration_since(*start) < FAILURE_WINDOW);
        }
        for k in Self::keys(user, addr) {
            let e = m.entry(k).or_insert((now, 0));
            if now.duration_since(e.0) >= FAILURE_WINDOW {
                *e = (now, 0);
            }
            e.1 += 1;
        }
    }

    /// A successful sign-in clears the user's count (not the address's).
    pub fn succeeded(&self, user: &str) {
        self.failures.lock().expect("sign-in limiter").remove(&format!("user:{user}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_end_when_idle_and_are_bounded_per_user() {
        let s = Sessions::new(Duration::from_millis(200));
        let t = s.start("alice");
        assert_eq!(s.get(&t).unwrap().user, "alice");
        assert_ne!(s.get(&t).unwrap().csrf, t);
        std::thread::sleep(Duration::from_millis(250));
        assert!(s.get(&t).is_none(), "idle past the timeout");
        let s = Sessions::new(Duration::from_secs(60));
        let first = s.start("bob");
        for _ in 0..PER_USER {
            s.start("bob");
        }
        assert!(s.get(&first).is_none(), "the oldest of too many goes");
        s.end(&s.start("carol"));
    }

    #[test]
    fn failures_block_the_name_and_the_address() {
        let l = SignInLimiter::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..FAILURES_ALLOWED {
            assert!(l.blocked("alice", Some(a)).is_none());
            l.failed("alice", Some(a));
        }
        assert!(l.blocked("alice", Some(a)).is_some());
        assert!(l.blocked("alice", Some(b)).is_some(), "the name is blocked from anywhere");
        assert!(l.blocked("bob", Some(a)).is_some(), "the address is blocked for any name");
        assert!(l.blocked("bob", Some(b)).is_none());
    }

    #[test]
    fn secrets_compare() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "ab"));
    }
}
