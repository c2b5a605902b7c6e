//! What admin-cli prints about each kind of record the provider returns: one `Serialize`
//! struct per record (its `--json` form, field names stable for scripts) built from the wire
//! type, and the table people read. Views several command groups print live here; a view only
//! one group prints lives in that group's module.
use std::collections::BTreeMap;

use serde::Serialize;
use updraft_core::model::{InstallType, UpdateState};
use updraft_core::policy::{Mode, day_name, hour_name};
use updraft_proto::v1 as pb;

use crate::render::{age, dash, list, safe, table};

pub fn state_name(n: i32) -> String {
    UpdateState::from_wire(n).map(|s| s.to_string()).unwrap_or_else(|| format!("unknown({n})"))
}

pub fn kind_name(n: i32) -> String {
    pb::ActivityKind::try_from(n)
        .map(|k| k.as_str_name().trim_start_matches("ACTIVITY_KIND_").to_lowercase().replace('_', "-"))
        .unwrap_or_else(|_| format!("unknown({n})"))
}

#[derive(Serialize)]
pub struct UpdateView {
    pub id: String,
    pub product_line: String,
    pub product: String,
    pub upgrade_code: String,
    pub product_code: String,
    pub install_type: String,
    pub version: String,
    pub release_label: String,
    pub patch_label: String,
    pub install_properties: BTreeMap<String, String>,
    pub doc_url: String,
    pub size: u64,
    pub content_hash: String,
    pub signing_key_id: String,
    pub signature_verified: bool,
    pub state: String,
    pub high_priority: bool,
    pub prestage: bool,
    pub inserted_unix: i64,
    pub related_installs: Vec<String>,
    pub catalog_seq: u64,
    pub requires_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusView>,
}

/// Where an update stands across the fleet.
#[derive(Serialize, Default)]
pub struct StatusView {
    pub installed_count: u32,
    pub held_by_cap: String,
    pub notes: Vec<String>,
    pub applicable_count: u32,
    pub offered_count: u32,
    pub held_count: u32,
    pub held: Vec<String>,
    pub verified_count: u32,
    pub failed_count: u32,
    pub rolled_back_count: u32,
}

impl From<&pb::UpdateStatus> for StatusView {
    fn from(s: &pb::UpdateStatus) -> Self {
        Self {
            installed_count: s.installed_count,
            held_by_cap: s.held_by_cap.clone(),
            notes: s.notes.clone(),
            applicable_count: s.applicable_count,
            offered_count: s.offered_count,
            held_count: s.held_count,
            held: s.held.clone(),
            verified_count: s.verified_count,
            failed_count: s.failed_count,
            rolled_back_count: s.rolled_back_count,
        }
    }
}

impl UpdateView {
    pub fn new(u: &pb::Update, status: Option<&pb::UpdateStatus>) -> Self {
        Self {
            id: u.id.clone(),
            product_line: u.product_line.clone(),
            product: u.product.clone(),
            upgrade_code: u.upgrade_code.clone(),
            product_code: u.product_code.clone(),
            install_type: InstallType::from_wire(u.install_type).unwrap_or_default().to_string(),
            version: u.version.clone(),
            release_label: u.release_label.clone(),
            patch_label: u.patch_label.clone(),
            install_properties: u.install_properties.clone().into_iter().collect(),
            doc_url: u.doc_url.clone(),
            size: u.size,
            content_hash: u.content_hash.clone(),
            signing_key_id: u.signing_key_id.clone(),
            signature_verified: u.signature_verified,
            state: state_name(u.state),
            high_priority: u.high_priority,
            prestage: u.prestage,
            inserted_unix: u.inserted_unix,
            related_installs: u.related_installs.clone(),
            catalog_seq: u.catalog_seq,
            requires_version: u.requires_version.clone(),
            status: status.map(StatusView::from),
        }
    }

    /// The release an update belongs to, as people name it: its label, else MM.mm.
    pub fn release(&self) -> String {
        if !self.release_label.is_empty() {
            return self.release_label.clone();
        }
        self.version.split('.').take(2).collect::<Vec<_>>().join(".")
    }

    /// The STATUS cell of the catalog table.
    fn status_cell(&self) -> String {
        let mut notes: Vec<String> = Vec::new();
        if let Some(st) = &self.status {
            if !st.held_by_cap.is_empty() {
                notes.push(format!("held by cap {}", st.held_by_cap));
            }
            if st.applicable_count > 0 || st.offered_count > 0 {
                notes.push(format!("offered {}/{}", st.offered_count, st.applicable_count));
            }
            if st.held_count > 0 {
                notes.push(format!("held on {}", st.held_count));
            }
            if st.installed_count > 0 {
                notes.push(format!("{} installed", st.installed_count));
            }
            if st.verified_count > 0 {
                notes.push(format!("{} verified", st.verified_count));
            }
            if st.failed_count > 0 {
                notes.push(format!("{} failed", st.failed_count));
            }
        }
        if !self.related_installs.is_empty() {
            notes.push(format!("+{}", self.related_installs.join(",")));
        }
        list(&notes, "; ")
    }

    fn row(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.product.clone(),
            self.version.clone(),
            self.install_type.clone(),
            self.release(),
            self.state.clone(),
            if self.high_priority { "high".into() } else { "-".into() },
            self.status_cell(),
        ]
    }

    /// One update, field by field, for `update show`.
    pub fn print_detail(&self) {
        let yes = |b: bool| if b { "yes" } else { "no" };
        let props: Vec<String> = self.install_properties.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let fields: Vec<(&str, String)> = vec![
            ("id", self.id.clone()),
            ("product", self.product.clone()),
            ("product line", dash(&self.product_line)),
            ("version", self.version.clone()),
            ("install type", self.install_type.clone()),
            ("release", self.release()),
            ("patch label", dash(&self.patch_label)),
            ("requires", dash(&self.requires_version)),
            ("state", self.state.clone()),
            ("priority", if self.high_priority { "high".into() } else { "normal".into() }),
            ("prestage", yes(self.prestage).into()),
            ("related installs", list(&self.related_installs, ", ")),
            ("install properties", list(&props, ", ")),
            ("size", format!("{} bytes", self.size)),
            ("content hash", self.content_hash.clone()),
            (
                "signed by",
                format!(
                    "key {} ({})",
                    self.signing_key_id,
                    if self.signature_verified {
                        "verified"
                    } else {
                        "not verified: the provider trusts no release key"
                    }
                ),
            ),
            ("upgrade code", dash(&self.upgrade_code)),
            ("product code", dash(&self.product_code)),
            ("documentation", dash(&self.doc_url)),
            ("added", age(self.inserted_unix * 1000)),
            ("catalog change", self.catalog_seq.to_string()),
        ];
        for (k, v) in fields {
            println!("{k:<20} {}", safe(&v));
        }
        if let Some(st) = &self.status {
            println!(
                "{:<20} installed on {}, offered to {} of {} it applies to, held on {}",
                "fleet", st.installed_count, st.offered_count, st.applicable_count, st.held_count
            );
            println!(
                "{:<20} {} verified, {} failed, {} rolled back",
                "reported", st.verified_count, st.failed_count, st.rolled_back_count
            );
            if !st.held_by_cap.is_empty() {
                println!("{:<20} {}", "held by cap", st.held_by_cap);
            }
            for h in &st.held {
                println!("{:<20} {}", "held", safe(h));
            }
            for n in &st.notes {
                println!("{:<20} {}", "note", safe(n));
            }
        }
    }
}

/// The updates of a listing with their fleet status, in the provider's order.
pub fn updates(resp: &pb::ListUpdatesResponse) -> Vec<UpdateView> {
    resp.updates.iter().map(|u| UpdateView::new(u, resp.statuses.iter().find(|s| s.id == u.id))).collect()
}

const UPDATE_HEADERS: [&str; 8] = ["ID", "PRODUCT", "VERSION", "TYPE", "RELEASE", "STATE", "PRIORITY", "STATUS"];

/// The catalog table; with `group_by` (release, product, product-line, state, type), one table
/// per value of that column.
pub fn updates_table(updates: &[UpdateView], group_by: Option<&str>) {
    let Some(column) = group_by else {
        return table(&UPDATE_HEADERS, &updates.iter().map(UpdateView::row).collect::<Vec<_>>());
    };
    let key = |u: &UpdateView| match column {
        "release" => format!("{} {}", u.product, u.release()),
        "product" => u.product.clone(),
        "product-line" => {
            if u.product_line.is_empty() {
                "(none)".into()
            } else {
                u.product_line.clone()
            }
        }
        "state" => u.state.clone(),
        _ => u.install_type.clone(),
    };
    let mut groups: BTreeMap<String, Vec<Vec<String>>> = BTreeMap::new();
    for u in updates {
        groups.entry(key(u)).or_default().push(u.row());
    }
    for (i, (k, rows)) in groups.iter().enumerate() {
        if i > 0 {
            println!();
        }
        println!("{column}: {k} ({} update{})", rows.len(), if rows.len() == 1 { "" } else { "s" });
        table(&UPDATE_HEADERS, rows);
    }
}

#[derive(Serialize)]
pub struct InstalledView {
    pub product: String,
    pub version: String,
    pub update_id: String,
    pub previous_version: String,
    pub upgrade_code: String,
    pub product_code: String,
    pub adopted: bool,
}

#[derive(Serialize)]
pub struct MachineView {
    pub name: String,
    pub hostname: String,
    pub addresses: Vec<String>,
    pub agent_version: String,
    pub via: String,
    pub is_remote_provider: bool,
    pub last_contact_unix_ms: i64,
    pub last_error: String,
    pub group: String,
    pub status: String,
    pub notes: Vec<String>,
    pub problems: Vec<String>,
    pub restart_needed: bool,
    pub waiting: Vec<String>,
    pub role: String,
    pub silent: bool,
    pub contact_due_unix_ms: i64,
    pub installed: Vec<InstalledView>,
}

impl From<&pb::Machine> for MachineView {
    fn from(m: &pb::Machine) -> Self {
        let info = m.info.clone().unwrap_or_default();
        Self {
            name: info.name,
            hostname: info.hostname,
            addresses: info.addresses,
            agent_version: info.agent_version,
            via: m.via.clone(),
            is_remote_provider: m.is_remote_provider,
            last_contact_unix_ms: m.last_contact_unix_ms,
            last_error: m.last_error.clone(),
            group: m.group.clone(),
            status: m.status.clone(),
            notes: m.notes.clone(),
            problems: info.problems,
            restart_needed: info.restart_needed,
            waiting: info.waiting,
            role: m.role.clone(),
            silent: m.silent,
            contact_due_unix_ms: m.contact_due_unix_ms,
            installed: info
                .installed
                .into_iter()
                .map(|p| InstalledView {
                    product: p.product,
                    version: p.version,
                    update_id: p.update_id,
                    previous_version: p.previous_version,
                    upgrade_code: p.upgrade_code,
                    product_code: p.product_code,
                    adopted: p.adopted,
                })
                .collect(),
        }
    }
}

impl MachineView {
    /// Its status for a table: a silent one says since when, since its other columns (what it
    /// last said) no longer hold.
    pub fn status_text(&self) -> String {
        match self.notes.first() {
            Some(note) if self.silent => format!("{} ({note})", self.status),
            _ => self.status.clone(),
        }
    }
}

pub fn machines(ms: &[pb::Machine]) -> Vec<MachineView> {
    ms.iter().map(MachineView::from).collect()
}

/// The machines table (every cell made safe by [`table`]).
pub fn machines_table(ms: &[MachineView]) {
    let rows: Vec<Vec<String>> = ms
        .iter()
        .map(|m| {
            let installed: Vec<String> = m.installed.iter().map(|p| format!("{} {}", p.product, p.version)).collect();
            vec![
                m.name.clone(),
                if m.is_remote_provider { "remote-provider" } else { "agent" }.into(),
                m.group.clone(),
                m.status_text(),
                m.via.clone(),
                age(m.last_contact_unix_ms),
                list(&installed, ", "),
            ]
        })
        .collect();
    table(&["MACHINE", "KIND", "GROUP", "STATUS", "VIA", "LAST CONTACT", "INSTALLED"], &rows);
}

#[derive(Serialize)]
pub struct ActivityView {
    pub at_unix_ms: i64,
    pub machine: String,
    pub kind: String,
    pub update_id: String,
    pub product: String,
    pub version: String,
    pub detail: String,
}

impl From<&pb::Activity> for ActivityView {
    fn from(a: &pb::Activity) -> Self {
        Self {
            at_unix_ms: a.at_unix_ms,
            machine: a.machine.clone(),
            kind: kind_name(a.kind),
            update_id: a.update_id.clone(),
            product: a.product.clone(),
            version: a.version.clone(),
            detail: a.detail.clone(),
        }
    }
}

/// A group's update policy.
#[derive(Serialize)]
pub struct SettingsView {
    pub mode: String,
    pub install_day: String,
    pub install_hour: String,
    pub providers: Vec<String>,
    pub download_early: bool,
}

impl From<&pb::GroupSettings> for SettingsView {
    fn from(s: &pb::GroupSettings) -> Self {
        Self {
            mode: Mode::from_wire(s.mode).unwrap_or_default().to_string(),
            install_day: day_name(s.install_day).to_string(),
            install_hour: hour_name(s.install_hour),
            providers: s.providers.clone(),
            download_early: s.download_early,
        }
    }
}

impl SettingsView {
    /// MODE, DAY, HOUR, PROVIDERS cells.
    pub fn cells(&self) -> Vec<String> {
        vec![
            self.mode.clone() + if self.download_early { " (early)" } else { "" },
            self.install_day.clone(),
            self.install_hour.clone(),
            list(&self.providers, ","),
        ]
    }
}
