//! Times people type: spans back from now (`2w`, `90m`, `6mo`) and calendar dates
//! (`2026-11-01`), read the same way by admin-cli and the web console.
use std::time::Duration;

use crate::error::{CoreError, Result};

/// Units of a span, longest suffix first so `mo` is not read as `m`: seconds, minutes, hours,
/// days, weeks, 30-day months, 365-day years.
const UNITS: [(&str, u64); 7] =
    [("mo", 30 * 86_400), ("s", 1), ("m", 60), ("h", 3_600), ("d", 86_400), ("w", 7 * 86_400), ("y", 365 * 86_400)];

const SPAN_FORM: &str = "a number and a unit: s, m (minutes), h, d, w, mo (30 days) or y, e.g. 2w, 90m, 6mo";

/// A span such as `2w`: a whole number and one unit (see [`UNITS`]).
pub fn parse_span(s: &str) -> Result<Duration> {
    let bad = |reason: &str| CoreError::Invalid { what: "time span", input: s.to_string(), reason: reason.into() };
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| bad(&format!("no unit; expected {SPAN_FORM}")))?;
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad(&format!("expected {SPAN_FORM}")))?;
    let secs = UNITS
        .iter()
        .find(|(u, _)| *u == unit)
        .map(|(_, secs)| *secs)
        .ok_or_else(|| bad(&format!("unknown unit {unit:?}; expected {SPAN_FORM}")))?;
    n.checked_mul(secs)
        .filter(|s| *s <= 100 * 365 * 86_400)
        .map(Duration::from_secs)
        .ok_or_else(|| bad("longer than 100 years"))
}

/// Milliseconds since the Unix epoch at the start (00:00 UTC) of a `YYYY-MM-DD` date.
pub fn parse_date(s: &str) -> Result<i64> {
    let bad = |reason: String| CoreError::Invalid { what: "date", input: s.to_string(), reason };
    let parts: Vec<&str> = s.trim().split('-').collect();
    let [y, m, d] = parts[..] else { return Err(bad("expected YYYY-MM-DD".into())) };
    let (Ok(y), Ok(m), Ok(d)) = (y.parse::<i32>(), m.parse::<u8>(), d.parse::<u8>()) else {
        return Err(bad("expected YYYY-MM-DD".into()));
    };
    if y < 1970 {
        return Err(bad("before 1970".into()));
    }
    let month = time::Month::try_from(m).map_err(|e| bad(e.to_string()))?;
    let date = time::Date::from_calendar_date(y, month, d).map_err(|e| bad(e.to_string()))?;
    Ok(date.midnight().assume_utc().unix_timestamp() * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_read_like_other_tools() {
        assert_eq!(parse_span("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_span("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_span("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_span("2w").unwrap(), Duration::from_secs(14 * 86_400));
        assert_eq!(parse_span("3mo").unwrap(), Duration::from_secs(90 * 86_400));
        assert_eq!(parse_span("1y").unwrap(), Duration::from_secs(365 * 86_400));
        for bad in ["", "2", "w", "2x", "-1d", "2 w", "1.5h", "999999999y"] {
            let e = parse_span(bad).unwrap_err().to_string();
            assert!(e.contains("time span") && e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }

    #[test]
    fn dates_are_checked_days() {
        assert_eq!(parse_date("1970-01-01").unwrap(), 0);
        assert_eq!(parse_date("2000-03-01").unwrap(), 11_017 * 86_400_000);
        assert_eq!(parse_date("2024-02-29").unwrap(), parse_date("2024-03-01").unwrap() - 86_400_000);
        for bad in ["2026-02-29", "2026-13-01", "2026-04-31", "21/11/2026", "2026-11", "1969-12-31"] {
            assert!(parse_date(bad).unwrap_err().to_string().contains(bad), "{bad}");
        }
    }
}
