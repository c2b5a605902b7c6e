//! The console's pages, one function each: read through the admin operations, render with
//! `layout`. Live pages (activity, report, sites) reload themselves every [`LIVE_SECS`].
use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::Html;
use maud::{Markup, html};
use updraft_core::model::{Role, UpdateState};
use updraft_core::policy::{Mode, day_name, hour_name};
use updraft_proto::v1::{
    Activity, ActivityKind, GetMachineRequest, GroupSummary, ListActivityRequest, ListMachinesRequest,
    ListUpdatesRequest, Machine, ReportRequest2,
};

use super::layout::{badge, bytes, csrf_field, flash, page, when};
use super::{Console, Query, Refusal, Signed};
use crate::error::ProviderError;

/// Seconds after which live pages reload.
pub const LIVE_SECS: u32 = 10;
/// Rows per page of the activity log.
pub const PAGE_ROWS: usize = 50;

type Page = Result<Html<String>, Refusal>;

fn done(m: Markup) -> Page {
    Ok(Html(m.into_string()))
}

fn outcome(q: &Query) -> Markup {
    flash(q.get("ok").map(String::as_str), q.get("err").map(String::as_str))
}

/// `ACTIVITY_KIND_DOWNLOAD_STARTED` → `download started`.
pub fn kind_name(kind: i32) -> String {
    ActivityKind::try_from(kind)
        .map(|k| k.as_str_name().trim_start_matches("ACTIVITY_KIND_").to_lowercase().replace('_', " "))
        .unwrap_or_else(|_| format!("kind {kind}"))
}

pub fn state_name(state: i32) -> &'static str {
    UpdateState::from_wire(state).map(UpdateState::as_str).unwrap_or("unknown")
}

/// A `group` select listing every group, `selected` chosen.
fn group_select(groups: &[GroupSummary], selected: &str) -> Markup {
    html! {
        select name="group" {
            @for g in groups {
                @let name = g.group.as_ref().map(|g| g.name.as_str()).unwrap_or_default();
                option value=(name) selected[name == selected] { (name) }
            }
        }
    }
}

/// A one-button form posting one hidden field (a removal, say).
fn one_field_form(action: &str, csrf: &str, (field, value): (&str, &str), label: &str) -> Markup {
    html! {
        form.inline method="post" action=(action) {
            (csrf_field(csrf))
            input type="hidden" name=(field) value=(value);
            button.secondary type="submit" { (label) }
        }
    }
}

fn name_of(m: &Machine) -> &str {
    m.info.as_ref().map(|i| i.name.as_str()).unwrap_or("?")
}

pub async fn about(State(c): State<Arc<Console>>, s: Signed, q: Query) -> Page {
    let shared = c.ops.shared();
    let cfg = &shared.config;
    let pair = c.ops.get_pair()?;
    let store = match &cfg.database {
        Some(url) => format!("PostgreSQL database {}", redact(url)),
        None => format!("directory {}", cfg.data_dir.display()),
    };
    let up = c.uptime().as_secs();
    let own_url = pair
        .members
        .iter()
        .find(|m| m.name == cfg.name)
        .map(|m| m.url.clone())
        .or_else(|| cfg.advertise.clone())
        .unwrap_or_default();
    let body = html! {
        (outcome(&q))
        div.card {
            dl.facts {
                dt { "Provider" } dd { (cfg.name) }
                dt { "Version" } dd { (env!("CARGO_PKG_VERSION")) }
                dt { "Address for agents and sites" } dd { (own_url) }
                dt { "Console" } dd { "https://" (c.address) }
                dt { "Role" } dd {
                    @if store_is_shared(&c) { (badge("active")) " every provider of the database is active" }
                    @else if pair.active == cfg.name { (badge("active")) " epoch " (pair.epoch) }
                    @else { (badge("standby")) " active: " (pair.active) }
                }
                dt { "Up for" } dd { (up / 3600) " h " (up % 3600 / 60) " min" }
                dt { "Store" } dd { (store) }
                dt { "Content location" } dd { (cfg.content_dir().display()) }
                dt { "Catalog version" } dd { (shared.known_seq()?) }
                dt { "Transport" } dd { @if cfg.transport.is_tls() { "mutual TLS" } @else { "plaintext (--insecure)" } }
            }
        }
        h2 { "Switchover pair / providers of the store" }
        table {
            tr { th { "Name" } th { "Address" } th { "Role" } th { "Epoch" } th { "Last seen" } }
            @for m in &pair.members {
                tr { td { (m.name) } td { (m.url) } td { (badge(&m.role)) } td { (m.epoch) } td { (when(m.last_seen_unix_ms)) } }
            }
        }
    };
    done(page("About", "/about", s.user(), s.csrf(), None, body))
}

fn store_is_shared(c: &Console) -> bool {
    c.ops.shared().store.is_shared()
}

/// A database URL without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or_default();
            format!("{}{user}{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// What the activity page shows: its filters, order, grouping, page and the entry opened.
#[derive(Clone, Default)]
struct ActivityView {
    machine: String,
    product: String,
    since: String,
    sort: String,
    by: String,
    page: usize,
    detail: Option<usize>,
}

/// How the activity page can group its entries: query value, label.
const ACTIVITY_GROUPS: [(&str, &str); 6] = [
    ("", "no grouping"),
    ("day", "by day"),
    ("machine", "by machine"),
    ("product", "by product"),
    ("release", "by release"),
    ("patch", "by patch"),
];

impl ActivityView {
    fn from_query(q: &Query) -> Self {
        let text = |k: &str| q.get(k).cloned().unwrap_or_default();
        Self {
            machine: text("machine"),
            product: text("product"),
            since: text("since"),
            sort: q.get("sort").cloned().unwrap_or_else(|| "time".into()),
            by: text("by"),
            page: q.get("page").and_then(|p| p.parse().ok()).unwrap_or(1),
            detail: q.get("detail").and_then(|d| d.parse().ok()),
        }
    }

    /// This view with `change` applied, as a link.
    fn href(&self, change: impl FnOnce(&mut Self)) -> String {
        let mut v = self.clone();
        change(&mut v);
        let mut out = format!(
            "/activity?page={}&sort={}&by={}&machine={}&product={}&since={}",
            v.page,
            super::encode(&v.sort),
            super::encode(&v.by),
            super::encode(&v.machine),
            super::encode(&v.product),
            super::encode(&v.since)
        );
        if let Some(d) = v.detail {
            out.push_str(&format!("&detail={d}"));
        }
        out
    }

    /// The group an entry falls in under this view's grouping.
    fn group_of(&self, a: &Activity) -> String {
        let or = |s: &str, none: &str| if s.is_empty() { none.to_string() } else { s.to_string() };
        match self.by.as_str() {
            "day" => when(a.at_unix_ms).chars().take(10).collect(),
            "machine" => or(&a.machine, "(the catalog)"),
            "product" => or(&a.product, "(no product)"),
            "release" => format!("{} {}", a.product, a.version.split('.').take(2).collect::<Vec<_>>().join(".")),
            "patch" => format!("{} {}", a.product, a.version),
            _ => String::new(),
        }
    }
}

pub async fn activity(State(c): State<Arc<Console>>, s: Signed, q: Query) -> Page {
    let v = ActivityView::from_query(&q);
    let since_unix_ms = if v.since.is_empty() { 0 } else { range_start(&v.since)? };
    let req = ListActivityRequest { machine: v.machine.clone(), limit: 10_000, since_unix_ms, ..Default::default() };
    let mut rows: Vec<Activity> = c.ops.list_activity(req).await?.activities;
    if !v.product.is_empty() {
        rows.retain(|a| a.product == v.product);
    }
    match v.sort.as_str() {
        "machine" => rows.sort_by(|a, b| (&a.machine, b.at_unix_ms).cmp(&(&b.machine, a.at_unix_ms))),
        "kind" => rows.sort_by_key(|a| (kind_name(a.kind), -a.at_unix_ms)),
        "product" => {
            rows.sort_by(|a, b| (&a.product, &a.version, b.at_unix_ms).cmp(&(&b.product, &b.version, a.at_unix_ms)))
        }
        _ => rows.sort_by_key(|a| -a.at_unix_ms),
    }
    if !v.by.is_empty() {
        // Stable: within a group, the order chosen above.
        rows.sort_by_cached_key(|a| v.group_of(a));
    }
    let pages = rows.len().div_ceil(PAGE_ROWS).max(1);
    let at = v.page.clamp(1, pages);
    let first = (at - 1) * PAGE_ROWS;
    let shown: Vec<(usize, &Activity)> = rows.iter().enumerate().skip(first).take(PAGE_ROWS).collect();
    let opened = v.detail.and_then(|d| rows.get(d).map(|a| (d, a)));
    let body = html! {
        (outcome(&q))
        div.toolbar {
            form.inline method="get" action="/activity" {
                input name="machine" placeholder="machine" value=(v.machine);
                input name="product" placeholder="product" value=(v.product);
                input name="since" placeholder="since: 2w, 3mo or YYYY-MM-DD" value=(v.since);
                select name="by" {
                    @for (key, label) in ACTIVITY_GROUPS { option value=(key) selected[key == v.by] { (label) } }
                }
                input type="hidden" name="sort" value=(v.sort);
                button.secondary type="submit" { "Show" }
            }
            span.muted { (rows.len()) " entries · page " (at) " of " (pages) }
            @if at > 1 { a href=(v.href(|v| { v.page = at - 1; v.detail = None; })) { "← newer" } }
            @if at < pages { a href=(v.href(|v| { v.page = at + 1; v.detail = None; })) { "older →" } }
            form.inline method="post" action="/activity/clear" {
                (csrf_field(s.csrf()))
                input type="hidden" name="machine" value=(v.machine);
                button.secondary type="submit" { @if v.machine.is_empty() { "Clear all activity" } @else { "Clear this machine's activity" } }
            }
        }
        @if let Some((i, a)) = opened {
            div.card #activity-detail {
                div.toolbar {
                    strong { "Entry " (i + 1) " of " (rows.len()) }
                    @if i > 0 { a href=(v.href(|v| { v.detail = Some(i - 1); v.page = (i - 1) / PAGE_ROWS + 1; })) { "← previous" } }
                    @if i + 1 < rows.len() { a href=(v.href(|v| { v.detail = Some(i + 1); v.page = (i + 1) / PAGE_ROWS + 1; })) { "next →" } }
                    a href=(v.href(|v| v.detail = None)) { "close" }
                }
                dl.facts {
                    dt { "Time" } dd { (when(a.at_unix_ms)) }
                    dt { "Machine" } dd { @if a.machine.is_empty() { "the catalog" } @else { a href={"/machines/" (super::encode(&a.machine))} { (a.machine) } } }
                    dt { "What" } dd { (kind_name(a.kind)) }
                    dt { "Product" } dd { (a.product) }
                    dt { "Version" } dd { (a.version) }
                    dt { "Update" } dd { code { (a.update_id) } }
                    dt { "Detail" } dd { pre.detail { (a.detail) } }
                }
            }
        }
        table #activity {
            tr {
                th { a href=(v.href(|v| { v.sort = "time".into(); v.page = 1; })) { "Time" } }
                th { a href=(v.href(|v| { v.sort = "machine".into(); v.page = 1; })) { "Machine" } }
                th { a href=(v.href(|v| { v.sort = "kind".into(); v.page = 1; })) { "What" } }
                th { a href=(v.href(|v| { v.sort = "product".into(); v.page = 1; })) { "Product / release" } }
                th { "Update" } th { "Detail" }
            }
            @for (n, (i, a)) in shown.iter().enumerate() {
                @let group = v.group_of(a);
                @if !v.by.is_empty() && (n == 0 || v.group_of(shown[n - 1].1) != group) {
                    tr.group { th colspan="6" { (group) } }
                }
                tr {
                    td { a href=(v.href(|v| { v.detail = Some(*i); v.page = at; })) { (when(a.at_unix_ms)) } }
                    td { @if !a.machine.is_empty() { a href={"/machines/" (super::encode(&a.machine))} { (a.machine) } } }
                    td { (kind_name(a.kind)) }
                    td { (a.product) " " (a.version) }
                    td.muted { (a.update_id) }
                    td { (a.detail) }
                }
            }
        }
    };
    done(page("Activity", "/activity", s.user(), s.csrf(), Some(LIVE_SECS), body))
}

/// The report's quick ranges: query value (a span as admin-cli's `--last` reads it), label.
const RANGES: [(&str, &str); 4] = [("2w", "2 weeks"), ("3mo", "3 months"), ("6mo", "6 months"), ("all", "all time")];

/// Where a report range starts (ms since the epoch): a quick range, or a start date
/// (YYYY-MM-DD) from the date field.
fn range_start(range: &str) -> crate::error::Result<i64> {
    if range == "all" {
        return Ok(0);
    }
    if let Ok(span) = updraft_core::when::parse_span(range) {
        return Ok(crate::now_ms() - span.as_millis() as i64);
    }
    Ok(updraft_core::when::parse_date(range)?)
}

pub async fn report(State(c): State<Arc<Console>>, s: Signed, q: Query) -> Page {
    let asked = q.get("range").map(String::as_str);
    if let Some(r) = asked {
        range_start(r)?; // a bad range is refused before it is remembered
    }
    let range = c.remembered_range(s.user(), asked);
    let since = range_start(&range)?;
    let date = if RANGES.iter().any(|r| r.0 == range) { String::new() } else { range.clone() };
    let report = c.ops.report(ReportRequest2 { since_unix_ms: since }).await?;
    let body = html! {
        (outcome(&q))
        div.toolbar {
            span { "Machines in contact within: " }
            @for (key, label) in RANGES {
                @if key == range { strong { (label) } } @else { a href={"/report?range=" (key)} { (label) } }
            }
            form.inline method="get" action="/report" {
                label for="from" { "or since" }
                input #from type="date" name="range" value=(date) required;
                button.secondary type="submit" { "Show" }
            }
            @if !date.is_empty() { span.muted { "since " (date) } }
        }
        @for g in &report.groups {
            details.card open[g.status != "up-to-date"] {
                summary { (badge(&g.status)) " " strong { (g.machines.len()) } " machine(s)" }
                table {
                    tr { th { "Machine" } th { "Group" } th { "Last contact" } th { "Why" } }
                    @for m in &g.machines {
                        tr {
                            td { a href={"/machines/" (super::encode(name_of(m)))} { (name_of(m)) } }
                            td { (m.group) }
                            td { (when(m.last_contact_unix_ms)) }
                            td { @for n in &m.notes { div { (n) } } }
                        }
                    }
                }
            }
        }
        @if !report.updates.is_empty() {
            h2 { "What machines did with each update" }
            table #outcomes {
                tr { th { "Update" } th { "Installed" } th { "Verified" } th { "Failed" } th { "Rolled back" } }
                @for u in &report.updates {
                    tr { td { (u.id) } td { (u.installed) } td { (u.verified) } td { (u.failed) } td { (u.rolled_back) } }
                }
            }
        }
    };
    done(page("Report", "/report", s.user(), s.csrf(), Some(LIVE_SECS), body))
}

pub async fn machines(State(c): State<Arc<Console>>, s: Signed, q: Query) -> Page {
    let filter = q.get("filter").cloned().unwrap_or_default();
    let by = q.get("by").map(String::as_str).unwrap_or("group");
    let list =
        c.ops.list_machines(ListMachinesRequest { filter: filter.clone(), group: String::new() }).await?.machines;
    let mut grouped: BTreeMap<String, Vec<&Machine>> = BTreeMap::new();
    for m in &list {
        let key = match by {
            "site" => {
                if m.via.is_empty() {
                    "direct".to_string()
                } else {
                    m.via.clone()
                }
            }
            "status" => m.status.clone(),
            "version" => m.info.as_ref().map(|i| i.agent_version.clone()).unwrap_or_default(),
            _ => m.group.clone(),
        };
        grouped.entry(key).or_default().push(m);
    }
    let body = html! {
        (outcome(&q))
        div.toolbar {
            form.inline method="get" action="/machines" {
                input name="filter" placeholder="name or address" value=(filter);
                select name="by" {
                    @for (v, l) in [("group", "by group"), ("site", "by site"), ("status", "by status"), ("version", "by agent version")] {
                        option value=(v) selected[v == by] { (l) }
                    }
                }
                button.secondary type="submit" { "Show" }
            }
            span.muted { (list.len()) " machine(s)" }
        }
        @for (key, ms) in &grouped {
            h2 { (key) " " span.muted { "(" (ms.len()) ")" } }
            table {
                tr { th { "Machine" } th { "Status" } th { "Group" } th { "Addresses" } th { "Role" } th { "Agent" } th { "Via" } th { "Last contact" } }
                @for m in ms {
                    tr {
                        td { a href={"/machines/" (super::encode(name_of(m)))} { (name_of(m)) } }
                        td { (badge(&m.status)) }
                        td { (m.group) }
                        td { (m.info.as_ref().map(|i| i.addresses.join(", ")).unwrap_or_default()) }
                        td { (m.role) }
                        td { (m.info.as_ref().map(|i| i.agent_version.as_str()).unwrap_or_default()) }
                        td { (m.via) }
                        td { (when(m.last_contact_unix_ms)) }
                    }
                }
            }
        }
    };
    done(page("Machines", "/machines", s.user(), s.csrf(), None, body))
}

pub async fn machine(State(c): State<Arc<Console>>, s: Signed, Path(name): Path<String>, q: Query) -> Page {
    let d = c.ops.get_machine(GetMachineRequest { name: name.clone() }).await?;
    let m = d.machine.clone().unwrap_or_default();
    let groups = c.ops.list_groups().await?.groups;
    let tab = q.get("tab").map(String::as_str).unwrap_or("status");
    let base = format!("/machines/{}", super::encode(&name));
    let body = html! {
        (outcome(&q))
        div.tabs.toolbar {
            a href={(base) "?tab=status"} { @if tab == "status" { strong { "Status" } } @else { "Status" } }
            a href={(base) "?tab=apps"} { @if tab == "apps" { strong { "Installed applications" } } @else { "Installed applications" } }
        }
        @if tab == "apps" {
            table #products {
                tr { th { "Product" } th { "Installed" } th { "Available" } th { "Pinned" } th { "Status" } th { "Held" } }
                @for p in &d.products {
                    tr {
                        td { (p.product) @if p.adopted { " " span.muted { "(adopted)" } } }
                        td { (p.installed_version) }
                        td { (p.available_version) }
                        td { (p.pinned_version) }
                        td { (badge(&p.status)) }
                        td { @for h in &p.held { div.muted { (h) } } }
                    }
                }
            }
        } @else {
            div.card {
                dl.facts {
                    dt { "Status" } dd { (badge(&m.status)) }
                    dt { "Notes" } dd { @for n in &m.notes { div { (n) } } }
                    dt { "Group" } dd { (m.group) }
                    dt { "Role" } dd { (m.role) }
                    dt { "Host name" } dd { (m.info.as_ref().map(|i| i.hostname.as_str()).unwrap_or_default()) }
                    dt { "Addresses" } dd { (m.info.as_ref().map(|i| i.addresses.join(", ")).unwrap_or_default()) }
                    dt { "Agent version" } dd { (m.info.as_ref().map(|i| i.agent_version.as_str()).unwrap_or_default()) }
                    dt { "Reaches us via" } dd { (m.via) }
                    dt { "Last contact" } dd { (when(m.last_contact_unix_ms)) }
                    dt { "Pins" } dd { @for (p, v) in &d.pins { div { (p) " " (v) } } }
                }
            }
            div.toolbar {
                form.inline method="post" action="/groups/assign" {
                    (csrf_field(s.csrf()))
                    input type="hidden" name="machine" value=(name);
                    input type="hidden" name="back" value=(base);
                    label { "Move to group " }
                    (group_select(&groups, &m.group))
                    button type="submit" { "Move" }
                }
                form.inline method="post" action={(base) "/pin"} {
                    (csrf_field(s.csrf()))
                    input name="product" placeholder="product" required;
                    input name="version" placeholder="version (empty: clear)";
                    button type="submit" { "Pin" }
                }
                form.inline method="post" action={(base) "/role"} {
                    (csrf_field(s.csrf()))
                    label for="role" { "Role " }
                    select #role name="role" {
                        option value="" { "as its agent says" }
                        @for r in [Role::Workstation, Role::Server, Role::Site] {
                            option value=(r.as_str()) selected[r.as_str() == m.role] { (r.as_str()) }
                        }
                    }
                    button type="submit" { "Set role" }
                }
            }
            h2 { "Recent activity" }
            table {
                tr { th { "Time" } th { "What" } th { "Product" } th { "Detail" } }
                @for a in &d.recent {
                    tr { td { (when(a.at_unix_ms)) } td { (kind_name(a.kind)) } td { (a.product) " " (a.version) } td { (a.detail) } }
                }
            }
        }
    };
    done(page(&format!("Machine {name}"), "/machines", s.user(), s.csrf(), None, body))
}

pub async fn groups(State(c): State<Arc<Console>>, s: Signed, q: Query) -> Page {
    let groups = c.ops.list_groups().await?.groups;
    let deployments = c.ops.list_deployments(Default::default()).await?.deployments;
    let machines = c.ops.list_machines(ListMachinesRequest::default()).await?.machines;
    let body = html! {
        (outcome(&q))
        table #groups {
            tr { th { "Group" } th { "Members" } th { "Mode" } th { "Install day" } th { "Hour" } th { "Providers" } th { "Deployed products" } }
            @for g in &groups {
                @let name = g.group.as_ref().map(|g| g.name.clone()).unwrap_or_default();
                @let st = g.group.as_ref().and_then(|g| g.settings.clone()).unwrap_or_default();
                tr {
                    td { strong { (name) } }
                    td { (g.members) }
                    td { (Mode::from_wire(st.mode).unwrap_or_default().as_str()) @if st.download_early { " (downloads early)" } }
                    td { (day_name(st.install_day)) }
                    td { (hour_name(st.install_hour)) }
                    td { (st.providers.join(", ")) }
                    td { (deployments.iter().filter(|d| d.group == name).map(|d| d.product.as_str()).collect::<Vec<_>>().join(", ")) }
                }
            }
        }
        h2 { "Change a group" }
        @for g in &groups {
            @let name = g.group.as_ref().map(|g| g.name.clone()).unwrap_or_default();
            @let st = g.group.as_ref().and_then(|g| g.settings.clone()).unwrap_or_default();
            @let mode = Mode::from_wire(st.mode).unwrap_or_default().as_str();
            details.card id={"group-" (name)} {
                summary { strong { (name) } }
                form.inline method="post" action="/groups/edit" {
                    (csrf_field(s.csrf()))
                    input type="hidden" name="name" value=(name);
                    select name="mode" {
                        @for m in ["automatic", "download", "notify", "manual"] { option value=(m) selected[m == mode] { (m) } }
                    }
                    label { "day " input name="day" type="number" min="-1" max="6" value=(st.install_day); }
                    label { "hour " input name="hour" type="number" min="-1" max="23" value=(st.install_hour); }
                    label { "providers " input name="providers" placeholder="name or URL, comma-separated" value=(st.providers.join(", ")); }
                    label { input type="checkbox" name="early" checked[st.download_early]; " download early" }
                    button type="submit" { "Save" }
                }
                @if name != "default" {
                    (one_field_form("/groups/remove", s.csrf(), ("name", &name), &format!("Remove group {name}")))
                }
            }
        }
        h2 { "Deploy a product" }
        form.inline.card method="post" action="/groups/deploy" {
            (csrf_field(s.csrf()))
            input name="product" placeholder="product" required;
            (group_select(&groups, ""))
            label { input type="checkbox" name="remove"; " stop deploying (uninstalls nothing)" }
            button type="submit" { "Deploy" }
        }
        h2 { "New group" }
        form.inline.card method="post" action="/groups/create" {
            (csrf_field(s.csrf()))
            input name="name" placeholder="name" required;
            select name="mode" {
                @for m in ["automatic", "download", "notify", "manual"] { option value=(m) { (m) } }
            }
            label { "day " input name="day" type="number" min="-1" max="6" value="-1"; }
            label { "hour " input name="hour" type="number" min="-1" max="23" value="-1"; }
            button type="submit" { "Create" }
        }
        h2 { "Assign machines" }
        form.inline.card method="post" action="/groups/assign" {
            (csrf_field(s.csrf()))
            select name="machine" multiple size="6" {
                @for m in &machines { option value=(name_of(m)) { (name_of(m)) " (" (m.group) ")" } }
            }
            (group_select(&groups, ""))
            button type="submit" { "Assign" }
        }
    };
    done(page("Groups", "/groups", s.user(), s.csrf(), None, body))
}

pub async fn updates(State(c): State<Arc<Console>>, s: Signed, q: Query) -> Page {
    let product = q.get("product").cloned().unwrap_or_default();
    let state = q.get("state").cloned().unwrap_or_default();
    let wire_state =
        if state.is_empty() { 0 } else { state.parse::<UpdateState>().map_err(ProviderError::from)?.to_wire() };
    let req = ListUpdatesRequest { product: product.clone(), state: wire_state, ..Default::default() };
    let listing = c.ops.list_updates(req).await?;
    let caps = c.ops.list_caps().await?.caps;
    let mut by_release: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, u) in listing.updates.iter().enumerate() {
        let release = if u.release_label.is_empty() { u.product.clone() } else { u.release_label.clone() };
        by_release.entry(release).or_default().push(i);
    }
    let body = html! {
        (outcome(&q))
        @for w in &listing.warnings { div.flash.err { (w) } }
        div.toolbar {
            form.inline method="get" action="/updates" {
                input name="product" placeholder="product" value=(product);
                select name="state" aria-label="state" {
                    option value="" { "any state" }
                    @for st in UpdateState::VALUES.map(UpdateState::as_str) { option value=(st) selected[st == state] { (st) } }
                }
                button.secondary type="submit" { "Filter" }
            }
            span.muted { (listing.updates.len()) " update(s)" }
        }
        // Shown by the console's script, which sends the file with a progress bar.
        form.inline.card #upload-form data-csrf=(s.csrf()) hidden {
            label for="upload-file" { "Add a package " }
            input #upload-file type="file" required;
            button type="submit" { "Upload" }
            progress #upload-progress value="0" max="1" hidden {}
            span #upload-msg.muted {}
        }
        noscript { p.muted { "Uploading from the console needs JavaScript; or use " code { "admin-cli update add FILE" } "." } }
        form method="post" action="/updates/state" #updates-form {
            (csrf_field(s.csrf()))
            div.toolbar {
                span { "Selected: " }
                select name="state" {
                    @for st in UpdateState::VALUES.map(UpdateState::as_str) { option value=(st) { (st) } }
                }
                button type="submit" { "Set state" }
                button.secondary type="submit" formaction="/updates/priority" name="high" value="true" { "Mark high priority" }
                button.secondary type="submit" formaction="/updates/priority" name="high" value="false" { "Normal priority" }
                button.secondary type="submit" formaction="/updates/prestage" name="prestage" value="on" { "Prestage to sites" }
                button.secondary type="submit" formaction="/updates/prestage" name="prestage" value="off" { "No prestage" }
                button.secondary type="submit" formaction="/updates/delete" { "Delete" }
                label.muted { input type="checkbox" name="force"; " even if machines keep it for rollback" }
            }
            div.toolbar {
                label for="related" { "Install alongside: " }
                input #related name="related" placeholder="products, comma-separated";
                button.secondary type="submit" formaction="/updates/related" { "Add related installs" }
                button.secondary type="submit" formaction="/updates/related" name="remove" value="on" { "Remove (all when empty)" }
            }
            @for (release, idx) in &by_release {
                h2 { (release) }
                table {
                    tr { th {} th { "Update" } th { "Product" } th { "Version" } th { "Type" } th { "State" } th { "Priority" } th { "Size" } th { "Installed / applicable / offered" } th { "Related" } th { "Notes" } }
                    @for i in idx {
                        @let u = &listing.updates[*i];
                        @let st = listing.statuses.get(*i).cloned().unwrap_or_default();
                        tr {
                            td { input type="checkbox" name="id" value=(u.id) aria-label={"select " (u.id)}; }
                            td { code { (u.id) } }
                            td { (u.product) }
                            td { (u.version) }
                            td { (updraft_core::model::InstallType::from_wire(u.install_type).map(|t| t.as_str()).unwrap_or("install")) }
                            td { (badge(state_name(u.state))) }
                            td { @if u.high_priority { (badge("high")) } }
                            td { (bytes(u.size)) }
                            td { (st.installed_count) " / " (st.applicable_count) " / " (st.offered_count) }
                            td { (u.related_installs.join(", ")) }
                            td { @for n in &st.notes { div.muted { (n) } } @if !st.held_by_cap.is_empty() { div { "held by cap " (st.held_by_cap) } } }
                        }
                    }
                }
            }
        }
        h2 { "Product line caps" }
        p.muted { "No machine is offered a version of a capped product line above its cap, or above the newest version a machine of the followed role runs (the ceiling)." }
        table {
            tr { th { "Product line" } th { "Cap" } th { "Follows role" } th { "Ceiling now" } th {} }
            @for cap in &caps {
                tr {
                    td { (cap.product_line) } td { (cap.version) } td { (cap.follow_role) } td { (cap.ceiling) }
                    td {
                        form.inline method="post" action="/updates/caps" {
                            (csrf_field(s.csrf()))
                            input type="hidden" name="line" value=(cap.product_line);
                            input type="hidden" name="uncap" value="on";
                            button.secondary type="submit" { "Uncap" }
                        }
                    }
                }
            }
        }
        form.inline.card method="post" action="/updates/caps" {
            (csrf_field(s.csrf()))
            input name="line" placeholder="product line" required;
            input name="version" placeholder="cap version (optional)";
            select name="role" {
                option value="" { "follows no role" }
                @for r in [Role::Workstation, Role::Server, Role::Site] { option value=(r.as_str()) { "follows " (r.as_str()) } }
            }
            button type="submit" { "Cap" }
        }
    };
    done(page("Updates", "/updates", s.user(), s.csrf(), None, body))
}

pub async fn configuration(State(c): State<Arc<Console>>, s: Signed, q: Query) -> Page {
    let pair = c.ops.get_pair()?;
    let peers = c.ops.list_peers()?.peers;
    let discovery = c.ops.get_discovery()?;
    let users = c.ops.list_users().await?.users;
    let watches = c.ops.list_watches().await?.folders;
    // Certificates, when this provider holds the CA (`--pki-dir`).
    let certs = match c.ops.list_certificates(updraft_proto::v1::ListCertificatesRequest::default()).await {
        Ok(l) => Some(l),
        Err(crate::error::ProviderError::Precondition(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let now = crate::now_ms();
    let body = html! {
        (outcome(&q))
        h2 { "Switchover pair" }
        table {
            tr { th { "Member" } th { "Address" } th { "Role" } th { "Since" } }
            @for m in &pair.members { tr { td { (m.name) } td { (m.url) } td { (badge(&m.role)) } td { (when(m.since_unix_ms)) } } }
        }
        h2 { "Provider servers" }
        table {
            tr { th { "Name" } th { "Address" } th { "Port" } th { "TLS" } th { "Path" } }
            @for p in &peers { tr { td { (p.name) } td { (p.address) } td { (p.port) } td { (p.tls) } td { (p.path) } } }
        }
        form.inline.card method="post" action="/configuration/providers" {
            (csrf_field(s.csrf()))
            input name="name" placeholder="name" required;
            input name="address" placeholder="host or address" required;
            input name="port" type="number" min="1" max="65535" value="8092" required;
            label { input type="checkbox" name="tls" checked; " TLS" }
            input name="path" placeholder="path prefix (optional)";
            button type="submit" { "Add or change" }
        }
        @for p in &peers {
            (one_field_form("/configuration/providers/remove", s.csrf(), ("name", &p.name), &format!("Remove {}", p.name)))
        }
        h2 { "Discovery" }
        form.inline.card method="post" action="/configuration/discovery" {
            (csrf_field(s.csrf()))
            @if discovery.enabled { (badge("ok")) " on" } @else { (badge("off")) " off" }
            label { input type="checkbox" name="enabled" checked[discovery.enabled]; " announce and browse" }
            label { "key " input name="key" value=(discovery.key) placeholder="Production"; }
            button type="submit" { "Save" }
        }
        h2 { "Authorized users" }
        table #users {
            tr { th { "User" } th { "Role" } th { "Password" } th {} }
            @for u in &users {
                tr {
                    td { (u.name) }
                    td { (u.role) }
                    td {
                        form.inline method="post" action="/configuration/users/password" {
                            (csrf_field(s.csrf()))
                            input type="hidden" name="name" value=(u.name);
                            input type="password" name="password" placeholder="new password" autocomplete="new-password" required;
                            button.secondary type="submit" { "Set" }
                        }
                    }
                    td {
                        (one_field_form("/configuration/users/remove", s.csrf(), ("name", &u.name), "Remove"))
                    }
                }
            }
        }
        form.inline.card method="post" action="/configuration/users" {
            (csrf_field(s.csrf()))
            input name="name" placeholder="user name" required;
            select name="role" { option value="viewer" { "viewer" } option value="admin" { "admin" } }
            button type="submit" { "Add or change role" }
        }
        h2 { "Certificates" }
        @match &certs {
            None => p.muted { "This provider issues no certificates (start it with --pki-dir, the CA from admin-cli pki init)." }
            Some(l) => {
                table #certificates {
                    tr { th { "Name" } th { "Role" } th { "Serial" } th { "Not after" } th { "State" } th { "Last used" } th { "Issued for" } th {} }
                    @for cert in &l.certificates {
                        @let state = if cert.revoked_unix_ms > 0 { "revoked" } else if cert.not_after_unix_ms <= now { "expired" } else { "valid" };
                        tr {
                            td { (cert.name) }
                            td { (cert.role) }
                            td { code { (cert.serial.chars().take(16).collect::<String>()) } }
                            td { (when(cert.not_after_unix_ms)) }
                            td { (badge(state)) }
                            td { (when(cert.last_used_unix_ms)) }
                            td { (cert.how) }
                            td {
                                @if state == "valid" {
                                    (one_field_form("/configuration/certificates/revoke", s.csrf(), ("what", &cert.serial), "Revoke"))
                                }
                            }
                        }
                    }
                }
                @if !l.pending.is_empty() {
                    h3 { "Waiting for approval" }
                    table #enrollments {
                        tr { th { "Name" } th { "Role" } th { "From" } th { "Key SHA-256" } th { "Asked" } th {} }
                        @for p in &l.pending {
                            tr {
                                td { (p.name) }
                                td { (p.role) }
                                td { (p.address) }
                                td { code { (p.key_sha256.chars().take(16).collect::<String>()) } }
                                td { (when(p.requested_unix_ms)) }
                                td {
                                    @if p.approved_by.is_empty() {
                                        (one_field_form("/configuration/certificates/approve", s.csrf(), ("name", &p.name), "Approve"))
                                    } @else {
                                        "approved by " (p.approved_by)
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Watched folders" }
        table {
            tr { th { "Folder" } th { "Mode" } th {} }
            @for w in &watches {
                tr {
                    td { (w.path) }
                    td { @if w.auto { "auto" } @else { "manual" } }
                    td {
                        (one_field_form("/configuration/watches/remove", s.csrf(), ("path", &w.path), "Stop watching"))
                    }
                }
            }
        }
        form.inline.card method="post" action="/configuration/watches" {
            (csrf_field(s.csrf()))
            input name="path" placeholder="folder on the provider" required;
            label { input type="checkbox" name="auto"; " import automatically" }
            button type="submit" { "Watch" }
        }
    };
    done(page("Configuration", "/configuration", s.user(), s.csrf(), None, body))
}

pub async fn sites(State(c): State<Arc<Console>>, s: Signed, q: Query) -> Page {
    let machines = c.ops.list_machines(ListMachinesRequest::default()).await?.machines;
    let seq = c.ops.shared().known_seq()?;
    let body = html! {
        (outcome(&q))
        table #sites {
            tr { th { "Site" } th { "Upstream" } th { "WAN bytes" } th { "Bytes served" } th { "Cache hit ratio" } th { "Catalog lag" } th { "Last contact" } }
            @for m in machines.iter().filter(|m| m.is_remote_provider) {
                @let st = m.site_stats.clone().unwrap_or_default();
                @let lookups = st.cache_hits + st.cache_misses;
                tr {
                    td { a href={"/machines/" (super::encode(name_of(m)))} { (name_of(m)) } }
                    td { (badge(if st.upstream_connected { "connected" } else { "disconnected" })) " " (st.upstream) }
                    td { (bytes(st.wan_bytes)) }
                    td { (bytes(st.served_bytes)) }
                    td { @if lookups > 0 { (format!("{:.0} %", 100.0 * st.cache_hits as f64 / lookups as f64)) } @else { span.muted { "no downloads yet" } } }
                    td { (seq.saturating_sub(st.catalog_seq)) " change(s)" }
                    td { (when(m.last_contact_unix_ms)) }
                }
            }
        }
    };
    done(page("Sites", "/sites", s.user(), s.csrf(), Some(LIVE_SECS), body))
}

/// Every rollout in waves: each wave's machines and what they did, what comes next, the
/// machines that failed; resume (accepting the failures, or not) and revert for a halted or
/// running one.
pub async fn rollouts(State(c): State<Arc<Console>>, s: Signed, q: Query) -> Page {
    use updraft_proto::v1::RolloutState;
    let all = c.ops.list_rollouts().await?.rollouts;
    let body = html! {
        (outcome(&q))
        @if all.is_empty() {
            p.muted { "No rollouts. `admin-cli rollout start ID --waves 1%,10%,50%,100%` approves an update in waves." }
        }
        @for r in &all {
            @let ro = r.rollout.clone().unwrap_or_default();
            @let state = RolloutState::try_from(ro.state).map(|s| s.as_str_name().trim_start_matches("ROLLOUT_STATE_").to_lowercase()).unwrap_or_default();
            section.rollout {
                h2 { (ro.update_id) " " (badge(&state)) }
                p {
                    "Waves " (ro.waves) "; "
                    @if ro.group.is_empty() { "every group" } @else { "group " (ro.group) }
                    "; next wave at " (updraft_core::rollout::pct(ro.min_verified_bp)) " verified, halts above "
                    (updraft_core::rollout::pct(ro.max_failed_bp)) " failed, " (ro.wave_wait_ms / 1000) " s per wave; started by "
                    (ro.started_by) " " (when(ro.started_at_unix_ms)) "."
                }
                table.waves {
                    tr { th { "Wave" } th { "Share" } th { "Open" } th { "Machines" } th { "Installed" } th { "Verified" } th { "Failed" } th { "Rolled back" } th { "Waiting" } }
                    @for w in &r.waves {
                        tr {
                            td { (w.wave) } td { (w.share) } td { @if w.open { "open" } @else { "-" } }
                            td { (w.machines) } td { (w.installed) } td { (w.verified) } td { (w.failed) } td { (w.rolled_back) } td { (w.waiting) }
                        }
                    }
                }
                p.next { "Next: " (r.next) }
                @for f in &r.failed_machines {
                    p.muted { "failed: " (f) }
                }
                @if state != "reverted" {
                    @if state == "halted" {
                        (one_field_form("/rollouts/resume", s.csrf(), ("id", &ro.update_id), "Resume"))
                        form.inline method="post" action="/rollouts/resume" {
                            (csrf_field(s.csrf()))
                            input type="hidden" name="id" value=(ro.update_id);
                            input type="hidden" name="ack" value="true";
                            button.secondary type="submit" { "Resume, accepting the failures" }
                        }
                    }
                    (one_field_form("/rollouts/revert", s.csrf(), ("id", &ro.update_id), "Revert"))
                }
            }
        }
    };
    done(page("Rollouts", "/rollouts", s.user(), s.csrf(), Some(LIVE_SECS), body))
}
