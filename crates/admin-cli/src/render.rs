//! How admin-cli prints: aligned tables for people, JSON for scripts, and text from elsewhere
//! made safe for a terminal.
use serde::Serialize;

/// Text from elsewhere (machine inventories, activity details, names) made safe for a
/// terminal: control and invisible formatting characters are shown escaped (`\u{1b}`), so
/// nothing a machine reports can move the cursor, clear the screen or hide in a name.
pub fn safe(s: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        c.is_control()
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
    };
    if !s.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(s);
    }
    std::borrow::Cow::Owned(
        s.chars().map(|c| if unsafe_char(c) { c.escape_unicode().to_string() } else { c.to_string() }).collect(),
    )
}

/// Prints rows under headers with each column as wide as its widest cell; every cell passes
/// through [`safe`].
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let rows: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(|c| safe(c).into_owned()).collect()).collect();
    let rows = &rows;
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(headers.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// Prints any serialisable value as pretty JSON.
pub fn json<T: Serialize + ?Sized>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("output values serialise"));
}

/// A cell: the text, or `-` when empty.
pub fn dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.to_string() }
}

/// A list cell: the items joined, or `-` when none.
pub fn list(items: &[String], sep: &str) -> String {
    if items.is_empty() { "-".into() } else { items.join(sep) }
}

/// "5m ago"-style age of a unix-millisecond timestamp.
pub fn age(at_ms: i64) -> String {
    if at_ms <= 0 {
        return "never".into();
    }
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    let s = ((now - at_ms) / 1000).max(0);
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_machines_cannot_drive_the_terminal() {
        assert_eq!(safe("pc-1"), "pc-1");
        assert_eq!(safe("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(safe("pc\u{200b}-1"), "pc\\u{200b}-1");
        assert_eq!(safe("line\nbreak"), "line\\u{a}break");
        assert_eq!(safe("café"), "café");
    }
}
