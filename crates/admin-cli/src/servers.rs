//! admin-cli's provider-server commands: the switchover pair, peer providers, discovery.
use serde_json::{Value, json};
use updraft_proto::v1::{
    Discovery, GetDiscoveryRequest, GetPairRequest, ListPeersRequest, PairMember, Peer, RemovePeerRequest,
};

use crate::cli::{DiscoveryCmd, ProviderCmd};
use crate::commands::{channel, connect, rpc};
use crate::output::{age, json as print_json, table};

fn peer_json(p: &Peer) -> Value {
    json!({"name": p.name, "address": p.address, "port": p.port, "tls": p.tls, "path": p.path})
}

fn member_json(m: &PairMember) -> Value {
    json!({
        "name": m.name, "url": m.url, "role": m.role, "epoch": m.epoch, "pid": m.pid,
        "last_seen_unix_ms": m.last_seen_unix_ms, "since_unix_ms": m.since_unix_ms,
    })
}

pub async fn provider(url: &str, cmd: ProviderCmd, as_json: bool) -> anyhow::Result<()> {
    if let ProviderCmd::Health = cmd {
        return health(url, as_json).await;
    }
    let mut c = connect(url).await?;
    let peers = match cmd {
        ProviderCmd::Pair => {
            let p = c.get_pair(GetPairRequest {}).await.map_err(rpc(url))?.into_inner();
            if as_json {
                print_json(&json!({
                    "epoch": p.epoch, "active": p.active,
                    "members": p.members.iter().map(member_json).collect::<Vec<_>>(),
                }));
            } else {
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
            return Ok(());
        }
        ProviderCmd::Health => unreachable!("answered above"),
        ProviderCmd::Add { name, address, port, tls, path } => {
            c.put_peer(Peer { name, address, port, tls, path }).await
        }
        ProviderCmd::Remove { name } => c.remove_peer(RemovePeerRequest { name }).await,
        ProviderCmd::List => c.list_peers(ListPeersRequest {}).await,
    }
    .map_err(rpc(url))?
    .into_inner()
    .peers;
    if as_json {
        print_json(&Value::Array(peers.iter().map(peer_json).collect()));
    } else {
        let rows: Vec<Vec<String>> = peers
            .iter()
            .map(|p| {
                vec![
                    p.name.clone(),
                    p.address.clone(),
                    p.port.to_string(),
                    if p.tls { "yes" } else { "no" }.into(),
                    if p.path.is_empty() { "-".into() } else { p.path.clone() },
                ]
            })
            .collect();
        table(&["NAME", "ADDRESS", "PORT", "TLS", "PATH"], &rows);
    }
    Ok(())
}

pub async fn discovery(url: &str, cmd: DiscoveryCmd, as_json: bool) -> anyhow::Result<()> {
    let mut c = connect(url).await?;
    let d = match cmd {
        DiscoveryCmd::On { key } => c.set_discovery(Discovery { enabled: true, key }).await,
        DiscoveryCmd::Off => c.set_discovery(Discovery { enabled: false, key: String::new() }).await,
        DiscoveryCmd::Status => c.get_discovery(GetDiscoveryRequest {}).await,
    }
    .map_err(rpc(url))?
    .into_inner();
    if as_json {
        print_json(&json!({"enabled": d.enabled, "key": d.key}));
    } else if d.enabled {
        println!("discovery on, key {}", d.key);
    } else {
        println!("discovery off");
    }
    Ok(())
}

/// The provider's gRPC health as a whole (`grpc.health.v1`, the empty service name).
async fn health(url: &str, as_json: bool) -> anyhow::Result<()> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut c = tonic_health::pb::health_client::HealthClient::new(channel(url).await?);
    let status = c.check(HealthCheckRequest { service: String::new() }).await.map_err(rpc(url))?.into_inner().status();
    let name = status.as_str_name();
    if as_json {
        print_json(&json!({"provider": url, "status": name}));
    } else {
        println!("{url}: {name}");
    }
    if status != ServingStatus::Serving {
        std::process::exit(3);
    }
    Ok(())
}
