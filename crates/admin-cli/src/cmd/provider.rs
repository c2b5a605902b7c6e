//! `admin-cli provider`: the switchover pair, provider servers, and a provider's health.
use serde::Serialize;
use updraft_proto::v1::{GetPairRequest, ListPeersRequest, Peer, RemovePeerRequest};

use crate::cli::ProviderCmd;
use crate::ctx::Ctx;
use crate::render::{age, dash, table};
use crate::rpc::EXIT_NOT_SERVING;

#[derive(Serialize)]
struct PeerView {
    name: String,
    address: String,
    port: u32,
    tls: bool,
    path: String,
}

#[derive(Serialize)]
struct Member {
    name: String,
    url: String,
    role: String,
    epoch: u64,
    pid: u32,
    last_seen_unix_ms: i64,
    since_unix_ms: i64,
}

#[derive(Serialize)]
struct Pair {
    epoch: u64,
    active: String,
    members: Vec<Member>,
}

#[derive(Serialize)]
struct Health {
    provider: String,
    status: &'static str,
}

pub async fn run(ctx: &Ctx, cmd: ProviderCmd) -> anyhow::Result<()> {
    if let ProviderCmd::Health = cmd {
        return health(ctx).await;
    }
    let mut c = ctx.admin().await?;
    let peers = match cmd {
        ProviderCmd::Pair => {
            let p = c.get_pair(GetPairRequest {}).await.map_err(ctx.failed())?.into_inner();
            let pair = Pair {
                epoch: p.epoch,
                active: p.active,
                members: p
                    .members
                    .into_iter()
                    .map(|m| Member {
                        name: m.name,
                        url: m.url,
                        role: m.role,
                        epoch: m.epoch,
                        pid: m.pid,
                        last_seen_unix_ms: m.last_seen_unix_ms,
                        since_unix_ms: m.since_unix_ms,
                    })
                    .collect(),
            };
            ctx.show(&pair, print_pair);
            return Ok(());
        }
        ProviderCmd::Health => unreachable!("answered above"),
        ProviderCmd::Add { name, address, port, tls, path } => {
            c.put_peer(Peer { name, address, port, tls, path }).await
        }
        ProviderCmd::Remove { name } => c.remove_peer(RemovePeerRequest { name }).await,
        ProviderCmd::List => c.list_peers(ListPeersRequest {}).await,
    }
    .map_err(ctx.failed())?
    .into_inner()
    .peers;
    let peers: Vec<PeerView> = peers
        .into_iter()
        .map(|p| PeerView { name: p.name, address: p.address, port: p.port, tls: p.tls, path: p.path })
        .collect();
    ctx.show(&peers, |peers| {
        let rows: Vec<Vec<String>> = peers
            .iter()
            .map(|p| {
                vec![
                    p.name.clone(),
                    p.address.clone(),
                    p.port.to_string(),
                    if p.tls { "yes" } else { "no" }.into(),
                    dash(&p.path),
                ]
            })
            .collect();
        table(&["NAME", "ADDRESS", "PORT", "TLS", "PATH"], &rows);
    });
    Ok(())
}

fn print_pair(p: &Pair) {
    println!("store epoch {}, active: {}", p.epoch, if p.active.is_empty() { "none" } else { &p.active });
    let rows: Vec<Vec<String>> = p
        .members
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                m.role.clone(),
                m.url.clone(),
                if m.role == "active" { m.epoch.to_string() } else { "-".into() },
                age(m.since_unix_ms),
                age(m.last_seen_unix_ms),
            ]
        })
        .collect();
    table(&["PROVIDER", "ROLE", "URL", "EPOCH", "ROLE SINCE", "LAST SEEN"], &rows);
}

/// The provider's gRPC health as a whole (`grpc.health.v1`, the empty service name); exits 3
/// when it is not serving.
async fn health(ctx: &Ctx) -> anyhow::Result<()> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut c = tonic_health::pb::health_client::HealthClient::new(ctx.channel().await?);
    let answer = c.check(HealthCheckRequest { service: String::new() }).await.map_err(ctx.failed())?;
    let status = answer.into_inner().status();
    let h = Health { provider: ctx.url.clone(), status: status.as_str_name() };
    ctx.show(&h, |h| println!("{}: {}", h.provider, h.status));
    if status != ServingStatus::Serving {
        std::process::exit(EXIT_NOT_SERVING);
    }
    Ok(())
}
