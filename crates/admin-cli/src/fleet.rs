//! admin-cli's fleet commands: groups, deployments, machine detail, pins and roles, the status
//! report, activity.
use anyhow::{Context, anyhow, bail};
use serde_json::{Value, json};
use updraft_core::policy::{Mode, day_name, hour_name, parse_day, parse_hour};
use updraft_proto::v1::{
    AssignRequest, ClearActivityRequest, DeployRequest, ForgetMachineRequest, GetGroupRequest, GetMachineRequest,
    GroupSettings, ListActivityRequest, ListDeploymentsRequest, ListDeploymentsResponse, ListGroupsRequest,
    ListMachinesRequest, Machine, PinRequest, PutGroupRequest, RemoveGroupRequest, ReportRequest2, SetRoleRequest,
    SiteStats, SiteStatusRequest, replication_client::ReplicationClient,
};

use crate::cli::{ActivityCmd, DeployTarget, GroupCmd, GroupSettingsArgs, MachineCmd, ReportCmd, Since, SiteCmd};
use crate::commands::{activity_json, connect, kind_name, machine_json, rpc};
use crate::output::{age, json as print_json, safe, table};

/// Milliseconds since the epoch for `--since DATE` or `--last SPAN`; 0 when neither is given.
pub fn since_ms(s: &Since) -> anyhow::Result<i64> {
    if let Some(d) = &s.since {
        let parts: Vec<i64> = d
            .split('-')
            .map(|p| p.parse::<i64>())
            .collect::<Result<_, _>>()
            .map_err(|_| anyhow!("--since {d:?}: expected YYYY-MM-DD"))?;
        let [y, m, day] = parts[..] else { bail!("--since {d:?}: expected YYYY-MM-DD") };
        if !(1..=12).contains(&m) || !(1..=31).contains(&day) {
            bail!("--since {d:?}: month or day out of range");
        }
        return Ok(days_from_civil(y, m, day) * 86_400_000);
    }
    if let Some(l) = &s.last {
        let (n, unit) = l.split_at(l.len().saturating_sub(1));
        let n: i64 = n.parse().map_err(|_| anyhow!("--last {l:?}: expected a number and a unit, e.g. 2w, 3m"))?;
        let hours = match unit {
            "h" => n,
            "d" => n * 24,
            "w" => n * 24 * 7,
            "m" => n * 24 * 30,
            _ => bail!("--last {l:?}: unit must be h, d, w or m"),
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
        return Ok(now - hours * 3_600_000);
    }
    Ok(0)
}

/// Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn settings_request(name: String, create: bool, a: GroupSettingsArgs) -> anyhow::Result<PutGroupRequest> {
    let mut s = GroupSettings::default();
    let mut req = PutGroupRequest { name, create, ..Default::default() };
    if let Some(m) = &a.mode {
        s.mode = m.parse::<Mode>()?.to_wire();
        req.set_mode = true;
    } else if create {
        s.mode = Mode::Automatic.to_wire();
        req.set_mode = true;
    }
    if let Some(d) = &a.day {
        s.install_day = parse_day(d)?;
        req.set_day = true;
    } else if create {
        s.install_day = -1;
        req.set_day = true;
    }
    if let Some(h) = &a.hour {
        s.install_hour = parse_hour(h)?;
        req.set_hour = true;
    } else if create {
        s.install_hour = -1;
        req.set_hour = true;
    }
    if let Some(p) = a.providers {
        s.providers = p.into_iter().filter(|u| !u.is_empty()).collect();
        req.set_providers = true;
    }
    if let Some(early) = a.download_early {
        s.download_early = early;
        req.set_download_early = true;
    }
    req.settings = Some(s);
    Ok(req)
}

fn settings_json(s: &GroupSettings) -> Value {
    json!({
        "mode": Mode::from_wire(s.mode).unwrap_or_default().to_string(),
        "install_day": day_name(s.install_day),
        "install_hour": hour_name(s.install_hour),
        "providers": s.providers,
        "download_early": s.download_early,
    })
}

fn settings_row(s: &GroupSettings) -> Vec<String> {
    vec![
        Mode::from_wire(s.mode).unwrap_or_default().to_string() + if s.download_early { " (early)" } else { "" },
        day_name(s.install_day).to_string(),
        hour_name(s.install_hour),
        if s.providers.is_empty() { "-".into() } else { s.providers.join(",") },
    ]
}

pub async fn group(url: &str, cmd: GroupCmd, as_json: bool) -> anyhow::Result<()> {
    let mut c = connect(url).await?;
    let detail = match cmd {
        GroupCmd::Create { name, settings } => c.put_group(settings_request(name, true, settings)?).await,
        GroupCmd::Set { name, settings } => c.put_group(settings_request(name, false, settings)?).await,
        GroupCmd::Show { name } => c.get_group(GetGroupRequest { name }).await,
        GroupCmd::Remove { name } => {
            c.remove_group(RemoveGroupRequest { name: name.clone() }).await.map_err(rpc(url))?;
            println!("removed group {name}; its machines are in the default group");
            return Ok(());
        }
        GroupCmd::List => {
            let groups = c.list_groups(ListGroupsRequest {}).await.map_err(rpc(url))?.into_inner().groups;
            if as_json {
                print_json(&Value::Array(
                    groups
                        .iter()
                        .map(|g| {
                            let grp = g.group.clone().unwrap_or_default();
                            json!({"name": grp.name, "members": g.members, "settings": settings_json(&grp.settings.unwrap_or_default())})
                        })
                        .collect(),
                ));
            } else {
                let rows: Vec<Vec<String>> = groups
                    .iter()
                    .map(|g| {
                        let grp = g.group.clone().unwrap_or_default();
                        let mut row = vec![grp.name, g.members.to_string()];
                        row.extend(settings_row(&grp.settings.unwrap_or_default()));
                        row
                    })
                    .collect();
                table(&["GROUP", "MACHINES", "MODE", "DAY", "HOUR", "PROVIDERS"], &rows);
            }
            return Ok(());
        }
        GroupCmd::Assign { group, machines } => {
            let ms = c.assign(AssignRequest { group, machines }).await.map_err(rpc(url))?.into_inner().machines;
            return print_machines(&ms, as_json);
        }
        GroupCmd::Unassign { machines } => {
            let ms = c.assign(AssignRequest { group: String::new(), machines }).await.map_err(rpc(url))?.into_inner().machines;
            return print_machines(&ms, as_json);
        }
    }
    .map_err(rpc(url))?
    .into_inner();
    let g = detail.group.unwrap_or_default();
    let s = g.settings.unwrap_or_default();
    if as_json {
        print_json(&json!({"name": g.name, "settings": settings_json(&s), "members": detail.members}));
    } else {
        let row = settings_row(&s);
        println!("group      {}", g.name);
        println!("mode       {}", row[0]);
        println!("day        {}", row[1]);
        println!("hour       {}", row[2]);
        println!("providers  {}", row[3]);
        println!("machines   {}", if detail.members.is_empty() { "-".into() } else { detail.members.join(", ") });
    }
    Ok(())
}

/// A machine's status for a table: a silent one says since when, since its other columns
/// (what it last said) no longer hold.
fn status_text(m: &Machine) -> String {
    match m.notes.first() {
        Some(note) if m.silent => format!("{} ({})", m.status, safe(note)),
        _ => m.status.clone(),
    }
}

pub fn print_machines(ms: &[Machine], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        print_json(&Value::Array(ms.iter().map(machine_json).collect()));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = ms
        .iter()
        .map(|m| {
            let info = m.info.clone().unwrap_or_default();
            let installed =
                info.installed.iter().map(|p| format!("{} {}", p.product, p.version)).collect::<Vec<_>>().join(", ");
            let kind = if m.is_remote_provider { "remote-provider" } else { "agent" };
            vec![
                info.name,
                kind.into(),
                m.group.clone(),
                status_text(m),
                m.via.clone(),
                age(m.last_contact_unix_ms),
                if installed.is_empty() { "-".into() } else { installed },
            ]
        })
        .collect();
    table(&["MACHINE", "KIND", "GROUP", "STATUS", "VIA", "LAST CONTACT", "INSTALLED"], &rows);
    Ok(())
}

pub async fn machine(url: &str, cmd: MachineCmd, as_json: bool) -> anyhow::Result<()> {
    let mut c = connect(url).await?;
    match cmd {
        MachineCmd::List { filter, group } => {
            let req = ListMachinesRequest { filter: filter.unwrap_or_default(), group: group.unwrap_or_default() };
            let ms = c.list_machines(req).await.map_err(rpc(url))?.into_inner().machines;
            print_machines(&ms, as_json)
        }
        MachineCmd::Show { name } => {
            let d = c.get_machine(GetMachineRequest { name }).await.map_err(rpc(url))?.into_inner();
            let m = d.machine.clone().unwrap_or_default();
            let p = d.policy.clone().unwrap_or_default();
            let s = p.settings.clone().unwrap_or_default();
            if as_json {
                let mut v = machine_json(&m);
                v["policy"] = json!({"group": p.group, "managed": p.managed, "settings": settings_json(&s)});
                v["products"] = Value::Array(d.products.iter().map(|ps| json!({
                    "product": ps.product, "installed_version": ps.installed_version,
                    "available_version": ps.available_version, "pinned_version": ps.pinned_version, "status": ps.status,
                    "held": ps.held, "adopted": ps.adopted,
                })).collect());
                v["pins"] = json!(d.pins);
                v["recent"] = Value::Array(d.recent.iter().map(activity_json).collect());
                print_json(&v);
                return Ok(());
            }
            let info = m.info.clone().unwrap_or_default();
            // What a machine says about itself is shown escaped (see `output::safe`).
            println!("machine       {}", safe(&info.name));
            println!("host          {}", safe(&info.hostname));
            println!("addresses     {}", safe(&info.addresses.join(", ")));
            println!("agent         {}", safe(&info.agent_version));
            println!("role          {}", m.role);
            println!("via           {}", safe(&m.via));
            println!("last contact  {}", age(m.last_contact_unix_ms));
            println!(
                "group         {}{}",
                p.group,
                if p.managed { "" } else { " (machine may change its own settings)" }
            );
            let row = settings_row(&s);
            println!("settings      mode {}, day {}, hour {}, providers {}", row[0], row[1], row[2], row[3]);
            println!(
                "status        {}{}",
                m.status,
                if m.notes.is_empty() { String::new() } else { format!(": {}", safe(&m.notes.join("; "))) }
            );
            println!();
            let rows: Vec<Vec<String>> = d
                .products
                .iter()
                .map(|ps| {
                    let or_dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
                    let installed = if ps.adopted {
                        format!("{} (adopted)", ps.installed_version)
                    } else {
                        or_dash(&ps.installed_version)
                    };
                    vec![
                        ps.product.clone(),
                        installed,
                        or_dash(&ps.available_version),
                        or_dash(&ps.pinned_version),
                        ps.status.clone(),
                        if ps.held.is_empty() { "-".into() } else { ps.held.join("; ") },
                    ]
                })
                .collect();
            table(&["PRODUCT", "INSTALLED", "AVAILABLE", "PINNED", "STATUS", "HELD"], &rows);
            println!();
            let rows: Vec<Vec<String>> = d
                .recent
                .iter()
                .map(|a| vec![age(a.at_unix_ms), kind_name(a.kind), a.update_id.clone(), a.detail.clone()])
                .collect();
            table(&["WHEN", "EVENT", "UPDATE", "DETAIL"], &rows);
            Ok(())
        }
        MachineCmd::Pin { machines, product, version } => {
            version.parse::<updraft_core::Version>()?;
            let ms = c.pin(PinRequest { machines, product, version }).await.map_err(rpc(url))?.into_inner().machines;
            print_machines(&ms, as_json)
        }
        MachineCmd::Role { machine, role } => {
            let role =
                if role == "agent" { String::new() } else { role.parse::<updraft_core::model::Role>()?.to_string() };
            let req = SetRoleRequest { machines: vec![machine], role };
            let ms = c.set_role(req).await.map_err(rpc(url))?.into_inner().machines;
            print_machines(&ms, as_json)
        }
        MachineCmd::Forget { machine } => {
            let r = c.forget_machine(ForgetMachineRequest { name: machine }).await.map_err(rpc(url))?.into_inner();
            if as_json {
                print_json(&json!({"forgot": r.name, "removed": r.removed}));
            } else {
                println!("forgot {}", r.name);
                for what in &r.removed {
                    println!("  removed {what}");
                }
            }
            Ok(())
        }
        MachineCmd::Unpin { machines, product } => {
            let ms = c
                .pin(PinRequest { machines, product, version: String::new() })
                .await
                .map_err(rpc(url))?
                .into_inner()
                .machines;
            print_machines(&ms, as_json)
        }
    }
}

fn print_deployments(resp: &ListDeploymentsResponse, as_json: bool) {
    for w in &resp.warnings {
        eprintln!("warning: {w}");
    }
    if as_json {
        print_json(&Value::Array(
            resp.deployments
                .iter()
                .map(|d| json!({"product": d.product, "group": d.group, "machine": d.machine}))
                .collect(),
        ));
        return;
    }
    let rows: Vec<Vec<String>> = resp
        .deployments
        .iter()
        .map(|d| {
            let to = if d.machine.is_empty() { format!("group {}", d.group) } else { format!("machine {}", d.machine) };
            vec![d.product.clone(), to]
        })
        .collect();
    table(&["PRODUCT", "DEPLOYED TO"], &rows);
}

pub async fn deploy_list(url: &str, product: String, as_json: bool) -> anyhow::Result<()> {
    let mut c = connect(url).await?;
    let resp = c.list_deployments(ListDeploymentsRequest { product }).await.map_err(rpc(url))?.into_inner();
    print_deployments(&resp, as_json);
    Ok(())
}

pub async fn deploy(url: &str, target: DeployTarget, remove: bool, as_json: bool) -> anyhow::Result<()> {
    let product = target.product.unwrap_or_default();
    updraft_core::model::validate_product(&product)?;
    let mut c = connect(url).await?;
    let req = DeployRequest {
        product,
        group: target.group.unwrap_or_default(),
        machine: target.machine.unwrap_or_default(),
        remove,
    };
    let resp = c.deploy(req).await.map_err(rpc(url))?.into_inner();
    print_deployments(&resp, as_json);
    Ok(())
}

pub async fn report(url: &str, cmd: Option<ReportCmd>, since: &Since, as_json: bool) -> anyhow::Result<()> {
    let since_unix_ms = since_ms(since)?;
    let mut c = connect(url).await?;
    if let Some(ReportCmd::Show { name }) = cmd {
        let d = c.get_machine(GetMachineRequest { name }).await.map_err(rpc(url))?.into_inner();
        let m = d.machine.unwrap_or_default();
        if as_json {
            print_json(&machine_json(&m));
            return Ok(());
        }
        let info = m.info.clone().unwrap_or_default();
        println!("machine       {}", safe(&info.name));
        println!("status        {}", m.status);
        for n in &m.notes {
            println!("note          {}", safe(n));
        }
        println!("last contact  {}", age(m.last_contact_unix_ms));
        for p in &info.installed {
            println!("installed     {} {}", p.product, p.version);
        }
        return Ok(());
    }
    let r = c.report(ReportRequest2 { since_unix_ms }).await.map_err(rpc(url))?.into_inner();
    if as_json {
        print_json(&Value::Array(
            r.groups
                .iter()
                .map(|g| json!({"status": g.status, "count": g.machines.len(), "machines": g.machines.iter().map(machine_json).collect::<Vec<_>>()}))
                .collect(),
        ));
        return Ok(());
    }
    let counts: Vec<String> = r.groups.iter().map(|g| format!("{} {}", g.status, g.machines.len())).collect();
    println!("{}", counts.join(" | "));
    for g in r.groups.iter().filter(|g| !g.machines.is_empty()) {
        println!();
        println!("{} ({})", g.status, g.machines.len());
        let rows: Vec<Vec<String>> = g
            .machines
            .iter()
            .map(|m| {
                let name = m.info.as_ref().map(|i| i.name.clone()).unwrap_or_default();
                vec![
                    name,
                    age(m.last_contact_unix_ms),
                    if m.notes.is_empty() { "-".into() } else { m.notes.join("; ") },
                ]
            })
            .collect();
        table(&["MACHINE", "LAST CONTACT", "NOTES"], &rows);
    }
    Ok(())
}

pub async fn activity(
    url: &str,
    cmd: Option<ActivityCmd>,
    machine: Option<String>,
    update: Option<String>,
    since: &Since,
    limit: u32,
    as_json: bool,
) -> anyhow::Result<()> {
    let mut c = connect(url).await?;
    if let Some(ActivityCmd::Clear { machine }) = cmd {
        let n = c
            .clear_activity(ClearActivityRequest { machine: machine.unwrap_or_default() })
            .await
            .map_err(rpc(url))?
            .into_inner()
            .removed;
        println!("removed {n} activity entries");
        return Ok(());
    }
    let req = ListActivityRequest {
        machine: machine.unwrap_or_default(),
        update_id: update.unwrap_or_default(),
        limit,
        since_unix_ms: since_ms(since).context("reading the time span")?,
    };
    let acts = c.list_activity(req).await.map_err(rpc(url))?.into_inner().activities;
    if as_json {
        print_json(&Value::Array(acts.iter().map(activity_json).collect()));
    } else {
        let rows: Vec<Vec<String>> = acts
            .iter()
            .map(|a| {
                let who = if a.machine.is_empty() { "-".to_string() } else { a.machine.clone() };
                vec![age(a.at_unix_ms), who, kind_name(a.kind), a.update_id.clone(), a.detail.clone()]
            })
            .collect();
        table(&["WHEN", "MACHINE", "EVENT", "UPDATE", "DETAIL"], &rows);
    }
    Ok(())
}

fn stats_json(s: &SiteStats) -> Value {
    let total = s.cache_hits + s.cache_misses;
    json!({
        "site": s.site, "upstream": s.upstream, "upstream_connected": s.upstream_connected,
        "upstream_since_unix_ms": s.upstream_since_unix_ms, "catalog_seq": s.catalog_seq,
        "wan_bytes": s.wan_bytes, "served_bytes": s.served_bytes, "cache_hits": s.cache_hits,
        "cache_misses": s.cache_misses,
        "cache_hit_ratio": if total == 0 { Value::Null } else { json!(s.cache_hits as f64 / total as f64) },
        "prefetch_passes": s.prefetch_passes, "prefetch_failed": s.prefetch_failed,
    })
}

fn ratio(s: &SiteStats) -> String {
    let total = s.cache_hits + s.cache_misses;
    if total == 0 { "-".into() } else { format!("{:.2}", s.cache_hits as f64 / total as f64) }
}

pub async fn site(url: &str, cmd: SiteCmd, as_json: bool) -> anyhow::Result<()> {
    match cmd {
        SiteCmd::List => {
            let mut c = connect(url).await?;
            let ms = c.list_machines(ListMachinesRequest::default()).await.map_err(rpc(url))?.into_inner().machines;
            let sites: Vec<&Machine> = ms.iter().filter(|m| m.is_remote_provider).collect();
            if as_json {
                let rows = sites.iter().map(|m| {
                    let mut v = stats_json(&m.site_stats.clone().unwrap_or_default());
                    v["last_contact_unix_ms"] = json!(m.last_contact_unix_ms);
                    v["silent"] = json!(m.silent);
                    v["contact_due_unix_ms"] = json!(m.contact_due_unix_ms);
                    v["site"] = json!(m.info.as_ref().map(|i| i.name.clone()).unwrap_or_default());
                    v
                });
                print_json(&Value::Array(rows.collect()));
            } else {
                let rows: Vec<Vec<String>> = sites
                    .iter()
                    .map(|m| {
                        let s = m.site_stats.clone().unwrap_or_default();
                        vec![
                            m.info.as_ref().map(|i| i.name.clone()).unwrap_or_default(),
                            age(m.last_contact_unix_ms),
                            if m.silent {
                                status_text(m)
                            } else if s.upstream_connected {
                                "connected".into()
                            } else {
                                "working alone".into()
                            },
                            s.wan_bytes.to_string(),
                            s.served_bytes.to_string(),
                            ratio(&s),
                        ]
                    })
                    .collect();
                table(&["SITE", "LAST CONTACT", "UPSTREAM", "WAN BYTES", "SERVED BYTES", "CACHE HIT RATIO"], &rows);
            }
        }
        SiteCmd::Status => {
            let ch = crate::commands::channel(url).await?;
            let s = ReplicationClient::new(ch).site_status(SiteStatusRequest {}).await.map_err(rpc(url))?.into_inner();
            if as_json {
                print_json(&stats_json(&s));
            } else {
                println!("site          {}", s.site);
                if s.upstream.is_empty() {
                    println!("upstream      - (a local provider)");
                } else {
                    let state = if s.upstream_connected {
                        "connected"
                    } else {
                        "unreachable: working alone from cache and the last catalog"
                    };
                    println!("upstream      {} ({state} since {})", s.upstream, age(s.upstream_since_unix_ms));
                }
                println!("catalog       {}", s.catalog_seq);
                println!("wan bytes     {}", s.wan_bytes);
                println!("served bytes  {}", s.served_bytes);
                println!("cache         {} hits, {} misses (hit ratio {})", s.cache_hits, s.cache_misses, ratio(&s));
                println!(
                    "prefetch      {} passes{}",
                    s.prefetch_passes,
                    if s.prefetch_failed == 0 {
                        String::new()
                    } else {
                        format!(", {} failed in the last", s.prefetch_failed)
                    }
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_spans() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        let s = Since { since: Some("2026-11-21".into()), last: None };
        assert_eq!(since_ms(&s).unwrap(), days_from_civil(2026, 11, 21) * 86_400_000);
        assert!(since_ms(&Since { since: Some("21/11/2026".into()), last: None }).is_err());
        assert!(since_ms(&Since { since: None, last: Some("2x".into()) }).is_err());
        let two_weeks = since_ms(&Since { since: None, last: Some("2w".into()) }).unwrap();
        assert!(two_weeks > 0);
    }
}
