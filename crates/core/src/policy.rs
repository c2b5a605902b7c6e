//! Group policy as pure rules: download modes, the install window, and how a machine's status
//! is classified. Shared by the provider (which decides) and the agent (which obeys).
use std::fmt;
use std::str::FromStr;

use crate::error::CoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Download and install in the install window.
    #[default]
    Automatic,
    /// Download, then wait for someone to apply.
    Download,
    /// Only report that updates wait.
    Notify,
    /// Nothing until someone checks by hand.
    Manual,
}

impl Mode {
    pub const ALL: &'static str = "automatic, download, notify, manual";

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Automatic => "automatic",
            Mode::Download => "download",
            Mode::Notify => "notify",
            Mode::Manual => "manual",
        }
    }
    /// The protobuf enum number (`updraft.v1.DownloadMode`).
    pub fn to_wire(self) -> i32 {
        match self {
            Mode::Automatic => 1,
            Mode::Download => 2,
            Mode::Notify => 3,
            Mode::Manual => 4,
        }
    }
    pub fn from_wire(n: i32) -> Option<Self> {
        Some(match n {
            1 => Mode::Automatic,
            2 => Mode::Download,
            3 => Mode::Notify,
            4 => Mode::Manual,
            _ => return None,
        })
    }
}

impl FromStr for Mode {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "automatic" | "auto" => Mode::Automatic,
            "download" => Mode::Download,
            "notify" => Mode::Notify,
            "manual" => Mode::Manual,
            _ => return Err(CoreError::UnknownName { what: "download mode", input: s.into(), expected: Self::ALL }),
        })
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

const DAYS: [&str; 7] = ["sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday"];

/// Parses an install day: `every-day` (or `daily`, `any`) is -1, else 0 (Sunday) to 6.
pub fn parse_day(s: &str) -> Result<i32, CoreError> {
    let l = s.to_ascii_lowercase();
    if matches!(l.as_str(), "every-day" | "everyday" | "daily" | "any") {
        return Ok(-1);
    }
    DAYS.iter().position(|d| *d == l || d[..3] == l).map(|i| i as i32).ok_or_else(|| CoreError::UnknownName {
        what: "install day",
        input: s.into(),
        expected: "every-day, sunday .. saturday",
    })
}

pub fn day_name(day: i32) -> &'static str {
    usize::try_from(day).ok().and_then(|d| DAYS.get(d)).copied().unwrap_or("every-day")
}

/// Parses an install hour: `any` is -1, else 0 to 23.
pub fn parse_hour(s: &str) -> Result<i32, CoreError> {
    if s.eq_ignore_ascii_case("any") {
        return Ok(-1);
    }
    match s.parse::<i32>() {
        Ok(h) if (0..24).contains(&h) => Ok(h),
        _ => Err(CoreError::Invalid { what: "install hour", input: s.into(), reason: "expected 0-23 or any".into() }),
    }
}

pub fn hour_name(hour: i32) -> String {
    if hour < 0 { "any".into() } else { format!("{hour:02}:00") }
}

/// A moment in the machine's local time, as the window needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalTime {
    /// 0 = Sunday.
    pub weekday: i32,
    pub hour: i32,
    pub minute: i32,
}

/// Whether installs may happen now: on the install day (or every day), in the install hour
/// (or at any hour).
pub fn in_window(day: i32, hour: i32, now: LocalTime) -> bool {
    (day < 0 || day == now.weekday) && (hour < 0 || hour == now.hour)
}

/// Minutes from `now` until the window next opens (0 when it is open).
pub fn minutes_until_window(day: i32, hour: i32, now: LocalTime) -> u32 {
    // Walk forward hour by hour over one week; the window is hour-granular.
    for step in 0..(7 * 24) {
        let total_hours = now.hour + step;
        let t = LocalTime { weekday: (now.weekday + total_hours / 24) % 7, hour: total_hours % 24, minute: 0 };
        if in_window(day, hour, t) {
            return if step == 0 { 0 } else { (step * 60 - now.minute).max(0) as u32 };
        }
    }
    0 // unreachable for valid settings: every (day, hour) occurs within a week
}

/// The three statuses of the fleet report, worst first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Health {
    Error,
    NeedsAttention,
    UpToDate,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Error => "error",
            Health::NeedsAttention => "needs-attention",
            Health::UpToDate => "up-to-date",
        }
    }
}

/// Within this of its certificate's expiry, a machine whose certificate did not renew is
/// called out as expiring.
pub const CERT_WARNING_MS: i64 = 14 * 86_400 * 1000;

/// What a machine's newest certificate (valid `not_before_ms`..`not_after_ms`, revoked at
/// `revoked_ms` or 0) says about it at `now_ms`. Certificates renew at two thirds of their
/// life, so one still current a little after that (a minute, or a twentieth of its life when
/// shorter) failed to renew: that needs attention, said as expiring when it expires within
/// [`CERT_WARNING_MS`]. Expired or revoked is an error: the machine cannot reach a provider.
pub fn certificate_health(
    now_ms: i64,
    not_before_ms: i64,
    not_after_ms: i64,
    revoked_ms: i64,
) -> Option<(Health, String)> {
    if revoked_ms > 0 {
        return Some((Health::Error, "its certificate was revoked".into()));
    }
    if now_ms >= not_after_ms {
        return Some((Health::Error, "its certificate has expired".into()));
    }
    let life = (not_after_ms - not_before_ms).max(0);
    let late = not_before_ms + life * 2 / 3 + (life / 20).min(60_000);
    if now_ms < late {
        return None;
    }
    let left = not_after_ms - now_ms;
    let span = match left / 1000 {
        s if s >= 86_400 => format!("{} days", s / 86_400),
        s if s >= 3_600 => format!("{} hours", s / 3_600),
        s if s >= 60 => format!("{} minutes", s / 60),
        s => format!("{s} seconds"),
    };
    Some((
        Health::NeedsAttention,
        if left < CERT_WARNING_MS {
            format!("its certificate expires in {span} and failed to renew")
        } else {
            format!("its certificate failed to renew (it expires in {span})")
        },
    ))
}

/// The longest contact interval a machine's word counts for: one claiming more is still
/// expected within a week.
pub const MAX_CONTACT_INTERVAL_SECS: u32 = 7 * 24 * 3600;

/// When a machine last heard from at `last_ms` is due to make contact again at the latest: its
/// own contact interval (zero, as older agents send: `default_secs`; never more than
/// [`MAX_CONTACT_INTERVAL_SECS`]) plus `grace_ms`. Past it the machine is silent, which is an
/// error: a machine that stopped checking cannot be told it is up to date.
pub fn contact_due(last_ms: i64, interval_secs: u32, default_secs: u32, grace_ms: i64) -> i64 {
    let secs = if interval_secs == 0 { default_secs } else { interval_secs }.min(MAX_CONTACT_INTERVAL_SECS);
    last_ms.saturating_add(i64::from(secs) * 1000).saturating_add(grace_ms.max(0))
}

/// Classifies a machine: any problem is an error; updates waiting or a restart needed need
/// attention; otherwise it is up to date. Returns the reasons with the status.
pub fn classify(problems: &[String], waiting: &[String], restart_needed: bool) -> (Health, Vec<String>) {
    if !problems.is_empty() {
        return (Health::Error, problems.to_vec());
    }
    let mut notes = Vec::new();
    if !waiting.is_empty() {
        notes.push(format!("{} update(s) waiting: {}", waiting.len(), waiting.join(", ")));
    }
    if restart_needed {
        notes.push("restart needed".into());
    }
    if notes.is_empty() { (Health::UpToDate, notes) } else { (Health::NeedsAttention, notes) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_is_flagged_when_it_nears_expiry_fails_to_renew_or_is_gone() {
        let day = 86_400_000;
        // 30 days of life from day 0: renewal due at day 20; a minute later it failed.
        let h = |now: i64, revoked: i64| certificate_health(now, 0, 30 * day, revoked);
        assert_eq!(h(day, 0), None);
        assert_eq!(h(17 * day, 0), None, "renewing certificates are not flagged before their renewal is due");
        assert_eq!(h(20 * day, 0), None, "a renewal in progress is not a failure yet");
        let (health, note) = h(21 * day, 0).unwrap();
        assert_eq!(health, Health::NeedsAttention);
        assert!(note.contains("expires in 9 days and failed to renew"), "{note}");
        assert_eq!(h(30 * day, 0).unwrap().0, Health::Error);
        assert_eq!(h(day, day).unwrap().0, Health::Error);
        // A year's certificate that did not renew is called out well before its last 14 days.
        let year = 365 * day;
        assert_eq!(certificate_health(200 * day, 0, year, 0), None);
        let (_, note) = certificate_health(250 * day, 0, year, 0).unwrap();
        assert!(note.contains("failed to renew (it expires in 115 days)"), "{note}");
    }
    use proptest::prelude::*;

    fn t(weekday: i32, hour: i32, minute: i32) -> LocalTime {
        LocalTime { weekday, hour, minute }
    }

    #[test]
    fn contact_is_due_after_the_machines_own_interval_and_the_grace() {
        let min = 60_000;
        assert_eq!(contact_due(1_000, 30, 3600, min), 1_000 + 30_000 + min, "its own interval");
        assert_eq!(contact_due(1_000, 0, 3600, min), 1_000 + 3_600_000 + min, "none said: the provider's");
        let week = i64::from(MAX_CONTACT_INTERVAL_SECS) * 1000;
        assert_eq!(contact_due(0, u32::MAX, 3600, 0), week, "a claim of forever is held to a week");
        assert_eq!(contact_due(i64::MAX - 5, 30, 30, min), i64::MAX, "no overflow");
        assert_eq!(contact_due(0, 30, 30, -5), 30_000, "a negative grace counts as none");
    }

    proptest! {
        #[test]
        fn contact_due_grows_with_the_last_contact_and_is_never_before_it(
            last in 0i64..4_000_000_000_000, d in 0i64..1_000_000, secs in 0u32..u32::MAX, grace in 0i64..86_400_000
        ) {
            let due = contact_due(last, secs, 3600, grace);
            prop_assert!(due > last);
            prop_assert!(contact_due(last + d, secs, 3600, grace) >= due);
        }
    }

    #[test]
    fn parsing() {
        assert_eq!("download".parse::<Mode>().unwrap(), Mode::Download);
        assert!("sometimes".parse::<Mode>().unwrap_err().to_string().contains("automatic, download"));
        assert_eq!(parse_day("every-day").unwrap(), -1);
        assert_eq!(parse_day("Tue").unwrap(), 2);
        assert!(parse_day("someday").is_err());
        assert_eq!(parse_hour("3").unwrap(), 3);
        assert!(parse_hour("24").is_err());
        assert_eq!(day_name(6), "saturday");
    }

    #[test]
    fn windows() {
        assert!(in_window(-1, -1, t(3, 14, 0)));
        assert!(in_window(3, 14, t(3, 14, 59)));
        assert!(!in_window(3, 14, t(3, 15, 0)));
        assert_eq!(minutes_until_window(-1, 2, t(0, 1, 30)), 30);
        assert_eq!(minutes_until_window(-1, 2, t(0, 3, 0)), 23 * 60);
        assert_eq!(minutes_until_window(0, 0, t(6, 23, 50)), 10, "Saturday 23:50 to Sunday 00:00");
        assert_eq!(minutes_until_window(1, -1, t(1, 9, 0)), 0);
    }

    #[test]
    fn classification() {
        assert_eq!(classify(&["x".into()], &["u".into()], true).0, Health::Error);
        assert_eq!(classify(&[], &["u".into()], false).0, Health::NeedsAttention);
        assert_eq!(classify(&[], &[], true).0, Health::NeedsAttention);
        assert_eq!(classify(&[], &[], false), (Health::UpToDate, vec![]));
    }

    proptest! {
        #[test]
        fn window_is_reached_within_a_week(day in -1i32..7, hour in -1i32..24, wd in 0i32..7, h in 0i32..24, m in 0i32..60) {
            let now = t(wd, h, m);
            let wait = minutes_until_window(day, hour, now) as i32;
            prop_assert!(wait <= 7 * 24 * 60);
            let later = now.hour * 60 + now.minute + wait;
            let then = t((now.weekday + later / (24 * 60)) % 7, (later / 60) % 24, later % 60);
            prop_assert!(in_window(day, hour, then), "{:?} + {} min = {:?}", now, wait, then);
            if wait > 0 { prop_assert!(!in_window(day, hour, now)); }
        }
    }
}
