//! What each admin-cli command does: local key and package work, and calls to a provider.
use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tonic::transport::Endpoint;
use updraft_core::keys::{PublicKey, ReleaseKey};
use updraft_core::model::{InstallType, UpdateState};
use updraft_core::package::{self, Package, PackageMeta};
use updraft_proto::v1::admin_client::AdminClient;
use updraft_proto::v1::{
    ActivityKind, GetUpdateRequest, ListActivityRequest, ListMachinesRequest, ListUpdatesRequest, Machine,
    SetPriorityRequest, SetUpdateStateRequest, Update, UploadChunk, UploadHeader, upload_chunk,
};
use updraft_runtime::TracedChannel;

use crate::cli::{BuildArgs, Cli, Cmd, KeyCmd, MachineCmd, PackageCmd, UpdateCmd};
use crate::output::{age, json as print_json, table};

/// Upload chunk size: well under the provider's 4 MiB message limit.
const UPLOAD_CHUNK: usize = 1 << 20;

type Admin = AdminClient<TracedChannel>;

async fn connect(url: &str) -> anyhow::Result<Admin> {
    let ep = Endpoint::from_shared(url.to_string()).with_context(|| format!("provider URL {url:?} is not valid"))?;
    let ch = ep
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| anyhow!("cannot reach provider {url}: {e}"))?;
    Ok(AdminClient::new(updraft_runtime::traced(ch)).max_decoding_message_size(64 << 20))
}

/// Turns a gRPC status into the provider's own message.
fn rpc(url: &str) -> impl Fn(tonic::Status) -> anyhow::Error + '_ {
    move |s| match s.code() {
        tonic::Code::Unavailable => anyhow!("cannot reach provider {url}: {}", s.message()),
        _ => anyhow!("{}", s.message()),
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let url = cli.provider.as_str();
    match cli.cmd {
        Cmd::Key(KeyCmd::Generate { out }) => {
            let key = ReleaseKey::generate()?;
            let (k, p) = key.save(&out)?;
            if cli.json {
                print_json(&json!({"key": k, "pub": p, "key_id": key.public().key_id()}));
            } else {
                println!("wrote {} and {} (key id {})", k.display(), p.display(), key.public().key_id());
            }
        }
        Cmd::Package(PackageCmd::Build(args)) => build(*args, cli.json)?,
        Cmd::Package(PackageCmd::Inspect { file, key }) => {
            let pkg = Package::open(&file)?;
            let verified = match key {
                Some(k) => {
                    pkg.verify(&PublicKey::load(&k)?)?;
                    Some(true)
                }
                None => None,
            };
            let m = &pkg.manifest;
            if cli.json {
                let mut v = serde_json::to_value(m)?;
                v["signature_verified"] = json!(verified);
                print_json(&v);
            } else {
                println!("{} {} ({}) signed by key {}", m.product, m.version, m.install_type, m.key_id);
                if verified.is_some() {
                    println!("signature verified");
                }
                table(
                    &["MODE", "SIZE", "PATH"],
                    &m.files
                        .iter()
                        .map(|f| vec![format!("{:o}", f.mode), f.size.to_string(), f.path.clone()])
                        .collect::<Vec<_>>(),
                );
            }
        }
        Cmd::Update(cmd) => update(url, cmd, cli.json).await?,
        Cmd::Machine(MachineCmd::List { filter }) => {
            let mut c = connect(url).await?;
            let mut ms = c
                .list_machines(ListMachinesRequest { filter: filter.unwrap_or_default() })
                .await
                .map_err(rpc(url))?
                .into_inner()
                .machines;
            ms.sort_by(|a, b| name_of(a).cmp(name_of(b)));
            if cli.json {
                print_json(&Value::Array(ms.iter().map(machine_json).collect()));
            } else {
                let rows: Vec<Vec<String>> = ms
                    .iter()
                    .map(|m| {
                        let info = m.info.clone().unwrap_or_default();
                        let installed = info
                            .installed
                            .iter()
                            .map(|p| format!("{} {}", p.product, p.version))
                            .collect::<Vec<_>>()
                            .join(", ");
                        let kind = if m.is_remote_provider { "remote-provider" } else { "agent" };
                        vec![
                            info.name,
                            kind.into(),
                            m.via.clone(),
                            age(m.last_contact_unix_ms),
                            if installed.is_empty() { "-".into() } else { installed },
                        ]
                    })
                    .collect();
                table(&["MACHINE", "KIND", "VIA", "LAST CONTACT", "INSTALLED"], &rows);
            }
        }
        Cmd::Activity { machine, update, limit } => {
            let mut c = connect(url).await?;
            let acts = c
                .list_activity(ListActivityRequest {
                    machine: machine.unwrap_or_default(),
                    update_id: update.unwrap_or_default(),
                    limit,
                })
                .await
                .map_err(rpc(url))?
                .into_inner()
                .activities;
            if cli.json {
                print_json(&Value::Array(
                    acts.iter()
                        .map(|a| json!({"at_unix_ms": a.at_unix_ms, "machine": a.machine, "kind": kind_name(a.kind), "update_id": a.update_id, "product": a.product, "version": a.version, "detail": a.detail}))
                        .collect(),
                ));
            } else {
                let rows: Vec<Vec<String>> = acts
                    .iter()
                    .map(|a| {
                        vec![
                            age(a.at_unix_ms),
                            a.machine.clone(),
                            kind_name(a.kind),
                            a.update_id.clone(),
                            a.detail.clone(),
                        ]
                    })
                    .collect();
                table(&["WHEN", "MACHINE", "EVENT", "UPDATE", "DETAIL"], &rows);
            }
        }
    }
    Ok(())
}

fn build(a: BuildArgs, as_json: bool) -> anyhow::Result<()> {
    let mut props = BTreeMap::new();
    for p in &a.properties {
        let (k, v) = p.split_once('=').ok_or_else(|| anyhow!("--property {p:?}: expected KEY=VALUE"))?;
        props.insert(k.to_string(), v.to_string());
    }
    let meta = PackageMeta {
        product: a.product,
        version: Some(a.version.parse()?),
        install_type: a.install_type.parse::<InstallType>()?,
        product_line: a.product_line,
        upgrade_code: a.upgrade_code,
        product_code: a.product_code,
        release_label: a.release_label,
        patch_label: a.patch_label,
        doc_url: a.doc_url,
        install_properties: props,
        related_installs: a.related,
    };
    let key = ReleaseKey::load(&a.key)?;
    let m = package::build(&a.from, &meta, &key, &a.out)?;
    let size = std::fs::metadata(&a.out)?.len();
    if as_json {
        print_json(
            &json!({"file": a.out, "product": m.product, "version": m.version.to_string(), "files": m.files.len(), "size": size, "key_id": m.key_id}),
        );
    } else {
        println!(
            "built {} ({} {}, {} files, {} bytes, key {})",
            a.out.display(),
            m.product,
            m.version,
            m.files.len(),
            size,
            m.key_id
        );
    }
    Ok(())
}

async fn update(url: &str, cmd: UpdateCmd, as_json: bool) -> anyhow::Result<()> {
    match cmd {
        UpdateCmd::Add { file } => {
            // Check locally first: a bad file is refused without touching the provider.
            let pkg = Package::open(&file)?;
            let mut c = connect(url).await?;
            let size = std::fs::metadata(&file)?.len();
            let name = file.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            let bar = progress(size, as_json);
            let mut f = tokio::fs::File::open(&file).await.with_context(|| file.display().to_string())?;
            let (tx, rx) = tokio::sync::mpsc::channel::<UploadChunk>(4);
            let header = UploadChunk { part: Some(upload_chunk::Part::Header(UploadHeader { file_name: name, size })) };
            let reader = {
                let bar = bar.clone();
                let file = file.clone();
                tokio::spawn(async move {
                    if tx.send(header).await.is_err() {
                        return Ok(());
                    }
                    loop {
                        let mut buf = vec![0u8; UPLOAD_CHUNK];
                        let n = f.read(&mut buf).await.with_context(|| file.display().to_string())?;
                        if n == 0 {
                            return Ok::<(), anyhow::Error>(());
                        }
                        buf.truncate(n);
                        bar.inc(n as u64);
                        if tx.send(UploadChunk { part: Some(upload_chunk::Part::Data(buf)) }).await.is_err() {
                            return Ok(());
                        }
                    }
                })
            };
            let result = c.add_update(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
            bar.finish_and_clear();
            reader.await??;
            let u = result.map_err(rpc(url))?.into_inner();
            if as_json {
                print_json(&update_json(&u));
            } else {
                println!("{}", u.id);
                eprintln!(
                    "imported {} {} as {} (state {}{})",
                    pkg.manifest.product,
                    pkg.manifest.version,
                    u.id,
                    state_name(u.state),
                    if u.signature_verified {
                        ", signature verified"
                    } else {
                        ", signature not verified: the provider trusts no release key"
                    }
                );
            }
        }
        UpdateCmd::List { product, state } => {
            let state = match state {
                Some(s) => s.parse::<UpdateState>()?.to_wire(),
                None => 0,
            };
            let mut c = connect(url).await?;
            let us = c
                .list_updates(ListUpdatesRequest { product: product.unwrap_or_default(), state })
                .await
                .map_err(rpc(url))?
                .into_inner()
                .updates;
            print_updates(&us, as_json);
        }
        UpdateCmd::Show { id } => {
            let mut c = connect(url).await?;
            let u = c.get_update(GetUpdateRequest { id }).await.map_err(rpc(url))?.into_inner();
            let v = update_json(&u);
            if as_json {
                print_json(&v);
            } else if let Value::Object(map) = v {
                for (k, v) in map {
                    let shown = match v {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    println!("{k:<20} {shown}");
                }
            }
        }
        UpdateCmd::State { mut args } => {
            let state: UpdateState = args.pop().expect("clap requires two or more").parse()?;
            let mut c = connect(url).await?;
            let us = c
                .set_update_state(SetUpdateStateRequest { ids: args, state: state.to_wire() })
                .await
                .map_err(rpc(url))?
                .into_inner()
                .updates;
            print_updates(&us, as_json);
        }
        UpdateCmd::Priority { mut args } => {
            let high = match args.pop().expect("clap requires two or more").as_str() {
                "high" => true,
                "normal" | "low" => false,
                other => bail!("priority {other:?}: expected high or normal"),
            };
            let mut c = connect(url).await?;
            let us =
                c.set_priority(SetPriorityRequest { ids: args, high }).await.map_err(rpc(url))?.into_inner().updates;
            print_updates(&us, as_json);
        }
    }
    Ok(())
}

fn progress(size: u64, quiet: bool) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if quiet || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(size);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}

fn print_updates(us: &[Update], as_json: bool) {
    if as_json {
        return print_json(&Value::Array(us.iter().map(update_json).collect()));
    }
    let rows: Vec<Vec<String>> = us
        .iter()
        .map(|u| {
            vec![
                u.id.clone(),
                u.product.clone(),
                u.version.clone(),
                InstallType::from_wire(u.install_type).unwrap_or_default().to_string(),
                state_name(u.state),
                if u.high_priority { "high".into() } else { "-".into() },
                u.size.to_string(),
            ]
        })
        .collect();
    table(&["ID", "PRODUCT", "VERSION", "TYPE", "STATE", "PRIORITY", "SIZE"], &rows);
}

fn state_name(n: i32) -> String {
    UpdateState::from_wire(n).map(|s| s.to_string()).unwrap_or_else(|| format!("unknown({n})"))
}

fn kind_name(n: i32) -> String {
    ActivityKind::try_from(n)
        .map(|k| k.as_str_name().trim_start_matches("ACTIVITY_KIND_").to_lowercase().replace('_', "-"))
        .unwrap_or_else(|_| format!("unknown({n})"))
}

fn name_of(m: &Machine) -> &str {
    m.info.as_ref().map(|i| i.name.as_str()).unwrap_or("")
}

fn update_json(u: &Update) -> Value {
    json!({
        "id": u.id, "product_line": u.product_line, "product": u.product, "upgrade_code": u.upgrade_code,
        "product_code": u.product_code,
        "install_type": InstallType::from_wire(u.install_type).unwrap_or_default().to_string(),
        "version": u.version, "release_label": u.release_label, "patch_label": u.patch_label,
        "install_properties": u.install_properties, "doc_url": u.doc_url, "size": u.size,
        "content_hash": u.content_hash, "signing_key_id": u.signing_key_id,
        "signature_verified": u.signature_verified, "state": state_name(u.state),
        "high_priority": u.high_priority, "inserted_unix": u.inserted_unix,
        "related_installs": u.related_installs, "catalog_seq": u.catalog_seq,
    })
}

fn machine_json(m: &Machine) -> Value {
    let info = m.info.clone().unwrap_or_default();
    json!({
        "name": info.name, "hostname": info.hostname, "addresses": info.addresses,
        "agent_version": info.agent_version, "via": m.via, "is_remote_provider": m.is_remote_provider,
        "last_contact_unix_ms": m.last_contact_unix_ms, "last_error": m.last_error,
        "installed": info.installed.iter().map(|p| json!({"product": p.product, "version": p.version, "update_id": p.update_id})).collect::<Vec<_>>(),
    })
}
