//! The console's page shell (navigation bar, who is signed in, sign-out) and the small pieces
//! every page uses: status badges, times, forms with their CSRF token.
use maud::{DOCTYPE, Markup, PreEscaped, html};

/// The pages of the navigation bar, in order: path and label.
pub const PAGES: [(&str, &str); 9] = [
    ("/about", "About"),
    ("/activity", "Activity"),
    ("/report", "Report"),
    ("/machines", "Machines"),
    ("/groups", "Groups"),
    ("/updates", "Updates"),
    ("/rollouts", "Rollouts"),
    ("/configuration", "Configuration"),
    ("/sites", "Sites"),
];

const STYLE: &str = r#"
:root { --fg:#1d2430; --muted:#5d6878; --line:#dde2ea; --bg:#f5f7fa; --card:#fff; --accent:#1f5fbf;
  --ok:#1c7c3c; --warn:#a86400; --err:#b3261e; }
* { box-sizing: border-box; }
body { margin:0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color:var(--fg); background:var(--bg); }
header { background:#17324d; color:#fff; display:flex; align-items:center; gap:1.5rem; padding:0 1.25rem; height:48px; }
header .brand { font-weight:700; letter-spacing:.02em; }
header nav { display:flex; gap:.25rem; flex:1; flex-wrap:wrap; }
header nav a { color:#cfe0f5; text-decoration:none; padding:.35rem .6rem; border-radius:4px; }
header nav a.here, header nav a:hover { background:#2b4f75; color:#fff; }
header .who { font-size:13px; color:#cfe0f5; display:flex; gap:.6rem; align-items:center; }
header .who button { background:none; border:1px solid #6d8bad; color:#fff; border-radius:4px; padding:.15rem .55rem; cursor:pointer; }
main { padding:1.25rem; max-width:1280px; margin:0 auto; }
h1 { font-size:20px; margin:.2rem 0 1rem; }
h2 { font-size:16px; margin:1.5rem 0 .6rem; }
.card { background:var(--card); border:1px solid var(--line); border-radius:6px; padding:1rem; margin-bottom:1rem; }
table { border-collapse:collapse; width:100%; background:var(--card); border:1px solid var(--line); }
th, td { text-align:left; padding:.4rem .6rem; border-bottom:1px solid var(--line); vertical-align:top; }
th { background:#eef2f7; font-weight:600; white-space:nowrap; }
th a { color:inherit; text-decoration:none; }
tr:hover td { background:#f8fafc; }
dl.facts { display:grid; grid-template-columns: 14rem 1fr; gap:.35rem 1rem; margin:0; }
dl.facts dt { color:var(--muted); }
dl.facts dd { margin:0; }
.badge { display:inline-block; padding:.05rem .5rem; border-radius:999px; font-size:12px; font-weight:600; white-space:nowrap; }
.s-up-to-date, .s-ga, .s-ok, .s-active { background:#e3f4e8; color:var(--ok); }
.s-needs-attention, .s-test, .s-standby { background:#fff2dc; color:var(--warn); }
.s-error, .s-remove, .s-gone { background:#fbe4e2; color:var(--err); }
.s-inactive, .s-new, .s-other { background:#eceff3; color:var(--muted); }
.muted { color:var(--muted); }
.flash { padding:.6rem .9rem; border-radius:6px; margin-bottom:1rem; }
.flash.ok { background:#e3f4e8; color:var(--ok); }
.flash.err { background:#fbe4e2; color:var(--err); }
form.inline { display:inline-flex; gap:.4rem; align-items:center; flex-wrap:wrap; margin:0; }
[hidden] { display:none !important; }
tr.group th { background:#eef2f7; text-align:left; padding-top:.6rem; }
pre.detail { white-space:pre-wrap; margin:0; font:inherit; }
.toolbar { display:flex; gap:1rem; align-items:center; flex-wrap:wrap; margin-bottom:.8rem; }
input, select, button { font:inherit; padding:.3rem .5rem; border:1px solid #b9c2cf; border-radius:4px; background:#fff; }
button { background:var(--accent); color:#fff; border-color:var(--accent); cursor:pointer; }
button.secondary { background:#fff; color:var(--accent); }
.login { max-width:360px; margin:8vh auto; }
.login label { display:block; margin:.6rem 0 .2rem; }
.login input { width:100%; }
.login button { margin-top:1rem; width:100%; padding:.5rem; }
.tabs a { margin-right:1rem; }
"#;

/// Every page's head: title, style, and for live pages a reload after `refresh` seconds.
fn head(title: &str, refresh: Option<u32>) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            @if let Some(s) = refresh { meta http-equiv="refresh" content=(s); }
            title { (title) " · Updraft" }
            style { (PreEscaped(STYLE)) }
            script src="/console.js" defer {}
        }
    }
}

/// A whole console page: the shell around `body`, with `here` marked in the navigation.
/// `refresh`: seconds after which the page reloads itself (live pages).
pub fn page(title: &str, here: &str, user: &str, csrf: &str, refresh: Option<u32>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title, refresh))
            body {
                header {
                    span.brand { "Updraft" }
                    nav {
                        @for (path, label) in PAGES {
                            a href=(path) class=[(path == here).then_some("here")] { (label) }
                        }
                    }
                    div.who {
                        span { "Signed in as " strong { (user) } }
                        form.inline method="post" action="/logout" {
                            (csrf_field(csrf))
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
}

/// The sign-in page.
pub fn login(error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head("Sign in", None))
            body {
                main.login {
                    div.card {
                        h1 { "Updraft provider console" }
                        @if let Some(e) = error { div.flash.err { (e) } }
                        form method="post" action="/login" {
                            label for="user" { "User" }
                            input #user name="user" autocomplete="username" required autofocus;
                            label for="password" { "Password" }
                            input #password name="password" type="password" autocomplete="current-password" required;
                            button type="submit" { "Sign in" }
                        }
                        p.muted { "An admin sets your password with " code { "admin-cli user passwd NAME --password-stdin" } "." }
                    }
                }
            }
        }
    }
}

pub fn csrf_field(csrf: &str) -> Markup {
    html! { input type="hidden" name="csrf" value=(csrf); }
}

/// A status word as a coloured badge.
pub fn badge(status: &str) -> Markup {
    let class = match status {
        "up-to-date" | "ga" | "GA" | "ok" | "active" | "installed" | "connected" | "valid" => "s-ok",
        "needs-attention" | "test" | "Test" | "standby" => "s-needs-attention",
        "error" | "remove" | "Remove" | "gone" | "disconnected" | "revoked" | "expired" => "s-error",
        _ => "s-other",
    };
    html! { span class={"badge " (class)} { (status) } }
}

/// Milliseconds since the epoch as a UTC time people read; `never` for 0.
pub fn when(unix_ms: i64) -> String {
    if unix_ms <= 0 { "never".into() } else { updraft_runtime::utc_text(unix_ms) }
}

/// A byte count in the unit that reads best.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// The outcome of the last change, shown at the top of the page it returns to.
pub fn flash(msg: Option<&str>, err: Option<&str>) -> Markup {
    html! {
        @if let Some(m) = msg { div.flash.ok { (m) } }
        @if let Some(e) = err { div.flash.err { (e) } }
    }
}
