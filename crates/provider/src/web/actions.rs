//! The console's forms, one function each: check the session's CSRF token, turn the fields
//! into an admin operation's request, run it through [`Console::change`] (access check and
//! audit), and return to the page with the outcome. Nothing here validates what the operation
//! itself validates.
use std::sync::Arc;

use axum::Form;
use axum::extract::{Path, State};
use axum::response::Response;
use updraft_core::model::UpdateState;
use updraft_core::policy::Mode;
use updraft_proto::v1::{
    AssignRequest, ClearActivityRequest, GroupSettings, PinRequest, PutGroupRequest, SetPriorityRequest,
    SetUpdateStateRequest,
};

use super::{Console, Fields, Signed, back};
use crate::error::{ProviderError, Result};
use crate::ops::Op;

type Posted = Form<Vec<(String, String)>>;

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

pub async fn update_state(State(c): State<Arc<Console>>, s: Signed, Form(f): Posted) -> Response {
    let f = Fields(f);
    let run = async {
        s.check_csrf(&f)?;
        let ids = f.all("id");
        let state: UpdateState = f.need("state")?.parse()?;
        let n = ids.len();
        let req = SetUpdateStateRequest { ids, state: state.to_wire(), retire_older: false };
        c.change(&s, Op::SetUpdateState, async |ops, who| ops.set_update_state(&who, req).await).await?;
        Ok(format!("{n} update(s) set to {state}"))
    };
    back("/updates", run.await)
}

pub async fn update_priority(State(c): State<Arc<Console>>, s: Signed, Form(f): Posted) -> Response {
    let f = Fields(f);
    let run = async {
        s.check_csrf(&f)?;
        let high = f.get("high") == Some("true");
        let req = SetPriorityRequest { ids: f.all("id"), high };
        let n = req.ids.len();
        c.change(&s, Op::SetPriority, async |ops, who| ops.set_priority(&who, req).await).await?;
        Ok(format!("{n} update(s) {}", if high { "marked high priority" } else { "back to normal priority" }))
    };
    back("/updates", run.await)
}

pub async fn group_create(State(c): State<Arc<Console>>, s: Signed, Form(f): Posted) -> Response {
    let f = Fields(f);
    let run = async {
        s.check_csrf(&f)?;
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

pub async fn group_assign(State(c): State<Arc<Console>>, s: Signed, Form(f): Posted) -> Response {
    let f = Fields(f);
    let to = local(f.get("back"), "/groups");
    let run = async {
        s.check_csrf(&f)?;
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
    s: Signed,
    Path(name): Path<String>,
    Form(f): Posted,
) -> Response {
    let f = Fields(f);
    let to = format!("/machines/{}", super::encode(&name));
    let run = async {
        s.check_csrf(&f)?;
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

pub async fn activity_clear(State(c): State<Arc<Console>>, s: Signed, Form(f): Posted) -> Response {
    let f = Fields(f);
    let run = async {
        s.check_csrf(&f)?;
        let req = ClearActivityRequest { machine: f.get("machine").unwrap_or_default().to_string() };
        let r = c.change(&s, Op::ClearActivity, async |ops, who| ops.clear_activity(&who, req).await).await?;
        Ok(format!("{} entries cleared", r.removed))
    };
    back("/activity", run.await)
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
