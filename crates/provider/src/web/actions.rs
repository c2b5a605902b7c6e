//! The console's forms, one function each (the CSRF token already checked by [`Posted`]): turn the fields
//! into an admin operation's request, run it through [`Console::change`] (access check and
//! audit), and return to the page with the outcome. Nothing here validates what the operation
//! itself validates.
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::Response;
use updraft_core::model::UpdateState;
use updraft_core::policy::Mode;
use updraft_proto::v1::{
    AssignRequest, ClearActivityRequest, DeleteUpdatesRequest, DeployRequest, Discovery, GroupSettings, Peer,
    PinRequest, PrestageRequest, ProductLineCap, PutGroupRequest, RelatedInstallsRequest, RemoveGroupRequest,
    RemoveUserRequest, RemoveWatchRequest, SetPasswordRequest, SetPriorityRequest, SetRoleRequest,
    SetUpdateStateRequest, UploadHeader, User, WatchFolder,
};

use super::{Console, Fields, Posted, Signed, back};
use crate::error::{ProviderError, Result};
use crate::ops::Op;

fn bad(msg: String) -> ProviderError {
    ProviderError::InvalidArgument(msg)
}

/// A page of this console to return to (never anywhere else).
fn local(path: Option<&str>, default: &str) -> String {
    match path {
        Some(p) if p.starts_with('/') && !p.starts_with("//") && !p.contains(['\\', '\r', '\n']) => p.to_string(),
        _ => default.to_string(),
    }
}

pub async fn update_state(State(c): State<Arc<Console>>, Posted { signed: s, fields: f }: Posted) -> Response {
    let run = async {
        let ids = f.all("id");
        let state: UpdateState = f.need("state")?.parse()?;
        let n = ids.len();
        let req = SetUpdateStateRequest { ids, state: state.to_wire(), retire_older: false };
        c.change(&s, Op::SetUpdateState, async |ops, who| ops.set_update_state(&who, req).await).await?;
        Ok(format!("{n} update(s) set to {state}"))
    };
    back("/updates", run.await)
}

pub async fn update_priority(State(c): State<Arc<Console>>, Posted { signed: s, fields: f }: Posted) -> Response {
    let run = async {
        let high = f.get("high") == Some("true");
        let req = SetPriorityRequest { ids: f.all("id"), high };
        let n = req.ids.len();
        c.change(&s, Op::SetPriority, async |ops, who| ops.set_priority(&who, req).await).await?;
        Ok(format!("{n} update(s) {}", if high { "marked high priority" } else { "back to normal priority" }))
    };
    back("/updates", run.await)
}

pub async fn group_create(State(c): State<Arc<Console>>, Posted { signed: s, fields: f }: Posted) -> Response {
    let run = async {
        let name = f.need("name")?.trim().to_string();
        let mode: Mode = f.get("mode").unwrap_or("automatic").parse()?;
        let number = |field: &str| -> Result<i32> {
            let v = f.get(field).unwrap_or("-1").trim();
            v.parse().map_err(|_| bad(format!("{field} {v:?} is not a number")))
        };
        let settings = GroupSettings {
            mode: mode.to_wire(),
            install_day: number("day")?,
            install_hour: number("hour")?,
            ..Default::default()
        };
        let req = PutGroupRequest {
            name: name.clone(),
            create: true,
            settings: Some(settings),
            set_mode: true,
            set_day: true,
            set_hour: true,
            ..Default::default()
        };
        c.change(&s, Op::PutGroup, async |ops, who| ops.put_group(&who, req).await).await?;
        Ok(format!("group {name} created"))
    };
    back("/groups", run.await)
}

pub async fn group_assign(State(c): State<Arc<Console>>, Posted { signed: s, fields: f }: Posted) -> Response {
    let to = local(f.get("back"), "/groups");
    let run = async {
        let machines = f.all("machine");
        let group = f.need("group")?.to_string();
        let req = AssignRequest { machines: machines.clone(), group: group.clone() };
        c.change(&s, Op::Assign, async |ops, who| ops.assign(&who, req).await).await?;
        Ok(format!("{} moved to group {group}", machines.join(", ")))
    };
    back(&to, run.await)
}

pub async fn machine_pin(
    State(c): State<Arc<Console>>,
    Path(name): Path<String>,
    Posted { signed: s, fields: f }: Posted,
) -> Response {
    let to = format!("/machines/{}", super::encode(&name));
    let run = async {
        let product = f.need("product")?.trim().to_string();
        let version = f.get("version").unwrap_or_default().trim().to_string();
        let req = PinRequest { machines: vec![name.clone()], product: product.clone(), version: version.clone() };
        c.change(&s, Op::Pin, async |ops, who| ops.pin(&who, req).await).await?;
        Ok(if version.is_empty() {
            format!("{name} unpinned from {product}")
        } else {
            format!("{name} pinned to {product} {version}")
        })
    };
    back(&to, run.await)
}

pub async fn activity_clear(State(c): State<Arc<Console>>, Posted { signed: s, fields: f }: Posted) -> Response {
    let run = async {
        let req = ClearActivityRequest { machine: f.get("machine").unwrap_or_default().to_string() };
        let r = c.change(&s, Op::ClearActivity, async |ops, who| ops.clear_activity(&who, req).await).await?;
        Ok(format!("{} entries cleared", r.removed))
    };
    back("/activity", run.await)
}

/// A checkbox's value: present and "on" (or "true").
fn ticked(f: &Fields, name: &str) -> bool {
    matches!(f.get(name), Some("on" | "true"))
}

pub async fn update_delete(State(c): State<Arc<Console>>, Posted { signed: s, fields: f }: Posted) -> Response {
    let req = DeleteUpdatesRequest { ids: f.all("id"), force: ticked(&f, "force") };
    let n = req.ids.len();
    let r = c.change(&s, Op::DeleteUpdates, async |ops, who| ops.delete_updates(&who, req).await).await;
    back("/updates", r.map(|_| format!("{n} update(s) deleted")))
}

pub async fn update_prestage(State(c): State<Arc<Console>>, Posted { signed: s, fields: f }: Posted) -> Response {
    let off = f.get("prestage") == Some("off");
    let req = PrestageRequest { ids: f.all("id"), off };
    let n = req.ids.len();
    let r = c.change(&s, Op::Prestage, async |ops, who| ops.prestage(&who, req).await).await;
    back(
        "/updates",
        r.map(|_| format!("{n} update(s) {}", if off { "no longer prestaged" } else { "prestaged to sites" })),
    )
}

pub async fn group_edit(State(c): State<Arc<Console>>, Posted { signed: s, fields: f }: Posted) -> Response {
    let run = async {
        let name = f.need("name")?.to_string();
        let mode: Mode = f.need("mode")?.parse()?;
        let number = |field: &str| -> Result<i32> {
            let v = f.need(field)?.trim();
            v.parse().map_err(|_| bad(format!("{field} {v:?} is not a number")))
        };
        let providers = f.list("providers");
        let settings = GroupSettings {
            mode: mode.to_wire(),
            install_day: number("day")?,
            install_hour: number("hour")?,
            providers,
            download_early: ticked(&f, "early"),
        };
        let req = PutGroupRequest {
            name: name.clone(),
            create: false,
            settings: Some(settings),
            set_mode: true,
            set_day: true,
            set_hour: true,
            set_providers: true,
            set_download_early: true,
        };
        c.change(&s, Op::PutGroup, async |ops, who| ops.put_group(&who, req).await).await?;
        Ok(format!("group {name} changed"))
    };
    back("/groups", run.await)
}

pub async fn deploy(State(c): State<Arc<Console>>, Posted { signed: s, fields: f }: Posted) -> Response {
    let run = async {
        let req = DeployRequest {
            product: f.need("product")?.trim().to_string(),
            group: f.need("group")?.to_string(),
            machine: String::new(),
            remove: ticked(&f, "remove"),
        };
        let what = format!(
            "{} {} group {}",
            req.product,
            if req.remove { "no longer deployed to" } else { "deployed to" },
            req.group
        );
        c.change(&s, Op::Deploy, async |ops, who| ops.deploy(&who, req).await).await?;
        Ok(what)
    };
    back("/groups", run.await)
}

pub async fn user_put(State(c): State<Arc<Console>>, Posted { signed: s, fields: f }: Posted) -> Response {
    let run = async {
        let u = User { name: f.need("name")?.trim().to_string(), role: f.need("role")?.to_string() };
        let what = format!("user {} is {}", u.name, u.role);
        c.change(&s, Op::PutUser, async |ops, who| ops.put_user(&who, u).await).await?;
        Ok(what)
    };
    back("/configuration", run.await)
}

pub async fn user_remove(State(c): State<Arc<Console>>, Posted { signed: s, fields: f }: Posted) -> Response {
    let run = async {
        let name = f.need("name")?.to_string();
        let req = RemoveUserRequest { name: name.clone() };
        c.change(&s, Op::RemoveUser, async |ops, who| ops.remove_user(&who, req).await).await?;
        Ok(format!("user {name} removed"))
    };
    back("/configuration", run.await)
}

pub async fn certificate_revoke(State(c): State<Arc<Console>>, Posted { signed: s, fields: f }: Posted) -> Response {
    let run = async {
        let what = f.need("what")?.to_string();
        let req = updraft_proto::v1::RevokeCertificateRequest { name_or_serial: what.clone() };
        c.change(&s, Op::RevokeCertificate, async |ops, who| ops.revoke_certificate(&who, req).await).await?;
        Ok(format!("certificate {what} revoked"))
    };
    back("/configuration", run.await)
}

pub async fn certificate_approve(State(c): State<Arc<Console>>, Posted { signed: s, fields: f }: Posted) -> Response {
    let run = async {
        let name = f.need("name")?.to_string();
        let req = updraft_proto::v1::ApproveEnrollmentRequest { name: name.clone() };
        c.change(&s, Op::ApproveEnrollment, async |ops, who| ops.approve_enrollment(&who, req).await).await?;
        Ok(format!("enrollment of {name} approved: the host collects its certificate with its next request"))
    };
    back("/configuration", run.await)
}

pub async fn user_password(State(c): State<Arc<Console>>, Posted { signed: s, fields: f }: Posted) -> Response {
    let run = async {
        let name = f.need("name")?.to_string();
        let req = SetPasswordRequest { name: name.clone(), password: f.need("password")?.to_string() };
        c.change(&s, Op::SetPassword, async |ops, who| ops.set_password(&who, req).await).await?;
        Ok(format!("password of {name} set"))
    };
    back("/configuration", run.await)
}

pub async fn discovery(State(c): State<Arc<Console>>, Posted { signed: s, fields: f }: Posted) -> Response {
    let d = Discovery { enabled: ticked(&f, "enabled"), key: f.get("key").unwrap_or_default().trim().to_string() };
    let r = c.change(&s, Op::SetDiscovery, async |ops, who| ops.set_discovery(&who, d).await).await;
    back(
        "/configuration",
        r.map(|d| if d.enabled { format!("discovery on, key {}", d.key) } else { "discovery off".into() }),
    )
}

pub async fn peer_put(State(c): State<Arc<Console>>, Posted { signed: s, fields: f }: Posted) -> Response {
    let run = async {
        let port = f.need("port")?.trim();
        let peer = Peer {
            name: f.need("name")?.trim().to_string(),
            address: f.need("address")?.trim().to_string(),
            port: port.parse().map_err(|_| bad(format!("port {port:?} is not a number")))?,
            tls: ticked(&f, "tls"),
            path: f.get("path").unwrap_or_default().trim().to_string(),
        };
        let name = peer.name.clone();
        c.change(&s, Op::PutPeer, async |ops, who| ops.put_peer(&who, peer).await).await?;
        Ok(format!("provider server {name} saved"))
    };
    back("/configuration", run.await)
}

pub async fn peer_remove(State(c): State<Arc<Console>>, Posted { signed: s, fields: f }: Posted) -> Response {
    let run = async {
        let name = f.need("name")?.to_string();
        let n = name.clone();
        c.change(&s, Op::RemovePeer, async |ops, who| ops.remove_peer(&who, n).await).await?;
        Ok(format!("provider server {name} removed"))
    };
    back("/configuration", run.await)
}

pub async fn watch_add(State(c): State<Arc<Console>>, Posted { signed: s, fields: f }: Posted) -> Response {
    let run = async {
        let w = WatchFolder { path: f.need("path")?.trim().to_string(), auto: ticked(&f, "auto") };
        let path = w.path.clone();
        c.change(&s, Op::AddWatch, async |ops, who| ops.add_watch(&who, w).await).await?;
        Ok(format!("watching {path}"))
    };
    back("/configuration", run.await)
}

pub async fn watch_remove(State(c): State<Arc<Console>>, Posted { signed: s, fields: f }: Posted) -> Response {
    let run = async {
        let req = RemoveWatchRequest { path: f.need("path")?.to_string() };
        let path = req.path.clone();
        c.change(&s, Op::RemoveWatch, async |ops, who| ops.remove_watch(&who, req).await).await?;
        Ok(format!("stopped watching {path}"))
    };
    back("/configuration", run.await)
}

pub async fn update_related(State(c): State<Arc<Console>>, Posted { signed: s, fields: f }: Posted) -> Response {
    let run = async {
        let remove = ticked(&f, "remove");
        let products = f.list("related");
        let req = RelatedInstallsRequest { ids: f.all("id"), products: products.clone(), remove };
        let n = req.ids.len();
        c.change(&s, Op::SetRelatedInstalls, async |ops, who| ops.set_related_installs(&who, req).await).await?;
        Ok(match (remove, products.is_empty()) {
            (true, true) => format!("{n} update(s) install nothing alongside"),
            (true, false) => format!("{n} update(s) no longer install {} alongside", products.join(", ")),
            (false, _) => format!("{n} update(s) install {} alongside", products.join(", ")),
        })
    };
    back("/updates", run.await)
}

pub async fn cap_put(State(c): State<Arc<Console>>, Posted { signed: s, fields: f }: Posted) -> Response {
    let field = |name: &str| f.get(name).unwrap_or_default().trim().to_string();
    let cap = ProductLineCap {
        product_line: field("line"),
        version: if ticked(&f, "uncap") { String::new() } else { field("version") },
        follow_role: if ticked(&f, "uncap") { String::new() } else { field("role") },
        ceiling: String::new(),
    };
    let what = if cap.version.is_empty() && cap.follow_role.is_empty() {
        format!("product line {} uncapped", cap.product_line)
    } else {
        format!("product line {} capped", cap.product_line)
    };
    let r = c.change(&s, Op::SetCap, async |ops, who| ops.set_cap(&who, cap).await).await;
    back("/updates", r.map(|_| what))
}

pub async fn machine_role(
    State(c): State<Arc<Console>>,
    Path(name): Path<String>,
    Posted { signed: s, fields: f }: Posted,
) -> Response {
    let to = format!("/machines/{}", super::encode(&name));
    let role = f.get("role").unwrap_or_default().trim().to_string();
    let what = if role.is_empty() { format!("{name}: role as its agent says") } else { format!("{name}: role {role}") };
    let req = SetRoleRequest { machines: vec![name], role };
    let r = c.change(&s, Op::SetRole, async |ops, who| ops.set_role(&who, req).await).await;
    back(&to, r.map(|_| what))
}

pub async fn group_remove(State(c): State<Arc<Console>>, Posted { signed: s, fields: f }: Posted) -> Response {
    let run = async {
        let name = f.need("name")?.to_string();
        let req = RemoveGroupRequest { name: name.clone() };
        c.change(&s, Op::RemoveGroup, async |ops, who| ops.remove_group(&who, req).await).await?;
        Ok(format!("group {name} removed; its machines are in the default group"))
    };
    back("/groups", run.await)
}

/// A package uploaded by the console's script: the body is the package (its length from
/// `Content-Length`), the file name in the query, the CSRF token in `x-csrf-token`. Access is
/// checked before a byte is read; one upload per user at a time, [`super::MAX_UPLOADS`] in all.
pub async fn upload(
    State(c): State<Arc<Console>>,
    s: Signed,
    headers: axum::http::HeaderMap,
    q: super::Query,
    body: axum::body::Body,
) -> Response {
    let run = async {
        s.check_csrf_token(headers.get("x-csrf-token").and_then(|v| v.to_str().ok()))?;
        let name = q.get("name").map(|n| n.rsplit(['/', '\\']).next().unwrap_or_default().to_string());
        let name = name.filter(|n| !n.is_empty()).ok_or_else(|| bad("the upload names no file".into()))?;
        let size = headers
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .ok_or_else(|| bad(format!("{name}: the upload does not say its length")))?;
        let _slot = c.upload_slot(s.user())?;
        let header = UploadHeader { file_name: name, size };
        let u = c
            .change(&s, Op::AddUpdate, async |ops, who| {
                let mut rx = ops.start_upload(&header)?;
                let mut data = body.into_data_stream();
                while let Some(chunk) = futures::StreamExt::next(&mut data).await {
                    let chunk = chunk.map_err(|e| bad(format!("{}: upload interrupted: {e}", header.file_name)))?;
                    ops.upload_data(&header, &mut rx, &chunk).await?;
                }
                ops.finish_upload(&who, &header, rx).await
            })
            .await?;
        let state = UpdateState::from_wire(u.state).map(|s| s.to_string()).unwrap_or_default();
        Ok(format!("imported {} as {} (state {state})", header.file_name, u.id))
    };
    back("/updates", run.await)
}

pub async fn rollout_resume(State(c): State<Arc<Console>>, Posted { signed: s, fields: f }: Posted) -> Response {
    let run = async {
        let id = f.need("id")?.to_string();
        let ack_failures = f.get("ack") == Some("true");
        let req = updraft_proto::v1::ResumeRolloutRequest { update_id: id.clone(), ack_failures };
        c.change(&s, Op::ResumeRollout, async |ops, who| ops.resume_rollout(&who, req).await).await?;
        Ok(format!("rollout of {id} resumed"))
    };
    back("/rollouts", run.await)
}

pub async fn rollout_revert(State(c): State<Arc<Console>>, Posted { signed: s, fields: f }: Posted) -> Response {
    let run = async {
        let id = f.need("id")?.to_string();
        let req = updraft_proto::v1::GetRolloutRequest { update_id: id.clone() };
        c.change(&s, Op::RevertRollout, async |ops, who| ops.revert_rollout(&who, req).await).await?;
        Ok(format!("rollout of {id} reverted: the machines that took it go back"))
    };
    back("/rollouts", run.await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_return_only_to_this_console() {
        assert_eq!(local(Some("/machines/pc-1"), "/groups"), "/machines/pc-1");
        assert_eq!(local(Some("//evil.example/x"), "/groups"), "/groups");
        assert_eq!(local(Some("https://evil.example/"), "/groups"), "/groups");
        assert_eq!(local(Some("/x\r\nSet-Cookie: a=b"), "/groups"), "/groups");
        assert_eq!(local(None, "/groups"), "/groups");
    }
}
