//! What each admin-cli command does: local key and package work, and calls to a provider.
use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use updraft_core::keys::{PublicKey, ReleaseKey};
use updraft_core::model::{InstallType, UpdateState};
use updraft_core::package::{self, Package, PackageMeta};
use updraft_proto::v1::admin_client::AdminClient;
use updraft_proto::v1::{
    ActivityKind, DeleteUpdatesRequest, GetUpdateRequest, ImportPendingRequest, ListCapsRequest, ListPendingRequest,
    ListUpdatesRequest, ListUpdatesResponse, ListWatchesRequest, Machine, PrestageRequest, ProductLineCap,
    RelatedInstallsRequest, RemoveWatchRequest, SetPriorityRequest, SetUpdateStateRequest, Update, UpdateStatus,
    UploadChunk, UploadHeader, WatchFolder, upload_chunk,
};

use crate::cli::{BuildArgs, Cli, Cmd, DeployCmd, KeyCmd, PackageCmd, PkiCmd, ProductLineCmd, UpdateCmd, WatchCmd};
use crate::output::{age, json as print_json, table};

/// Upload chunk size: well under the provider's 4 MiB message limit.
const UPLOAD_CHUNK: usize = 1 << 20;

/// Adds the caller's trace context and who is calling to every request. The provider logs the
/// latter with each change until callers are authenticated by certificate.
#[derive(Clone)]
pub(crate) struct Caller(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Caller {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let mut req = updraft_runtime::telemetry::inject(req)?;
        req.metadata_mut().insert("x-updraft-user", self.0.clone());
        Ok(req)
    }
}

pub(crate) type Admin = AdminClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Caller>>;

/// The transport flags of this invocation; turned into a transport (and checked) only by
/// commands that talk to a provider.
static TLS: std::sync::OnceLock<updraft_runtime::tls::TlsArgs> = std::sync::OnceLock::new();

fn transport() -> anyhow::Result<updraft_runtime::tls::Transport> {
    Ok(TLS.get().cloned().unwrap_or_default().transport("admin-cli")?)
}

/// A channel to the provider at `url`, with this invocation's transport.
pub(crate) async fn channel(url: &str) -> anyhow::Result<tonic::transport::Channel> {
    transport()?.endpoint(url)?.connect_timeout(Duration::from_secs(5)).connect().await.map_err(|e| {
        anyhow::Error::new(RpcFailure {
            code: tonic::Code::Unavailable,
            message: format!("cannot reach provider {url}: {}", updraft_runtime::tls::describe(&e)),
        })
    })
}

pub(crate) async fn connect(url: &str) -> anyhow::Result<Admin> {
    let ch = channel(url).await?;
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let caller = format!("{user}@{}", updraft_runtime::hostname()).replace(|c: char| !c.is_ascii_graphic(), "_");
    let caller = Caller(caller.parse().unwrap_or_else(|_| tonic::metadata::MetadataValue::from_static("unknown")));
    Ok(AdminClient::with_interceptor(ch, caller).max_decoding_message_size(64 << 20))
}

/// Turns a gRPC status into the provider's own message.
/// A call the provider answered with a failure (or could not be made): what to tell the user,
/// and the gRPC code, which decides admin-cli's exit status (see [`RpcFailure::exit_code`]).
#[derive(Debug)]
pub(crate) struct RpcFailure {
    pub code: tonic::Code,
    pub message: String,
}

impl std::fmt::Display for RpcFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RpcFailure {}

/// admin-cli's exit statuses: 0 done, 1 failed (bad input included), 2 usage error (the
/// command line itself), 3 a provider not serving (`provider health`), 4 not found, 5 refused
/// (not allowed), 6 provider unavailable.
pub(crate) const EXIT_FAILED: i32 = 1;
pub(crate) const EXIT_NOT_FOUND: i32 = 4;
pub(crate) const EXIT_REFUSED: i32 = 5;
pub(crate) const EXIT_UNAVAILABLE: i32 = 6;

impl RpcFailure {
    pub fn exit_code(&self) -> i32 {
        use tonic::Code;
        match self.code {
            Code::NotFound => EXIT_NOT_FOUND,
            Code::PermissionDenied | Code::Unauthenticated => EXIT_REFUSED,
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded => EXIT_UNAVAILABLE,
            _ => EXIT_FAILED,
        }
    }
}

/// The exit status for an error: an RPC failure's own, else 1.
pub(crate) fn exit_code(e: &anyhow::Error) -> i32 {
    e.chain().find_map(|c| c.downcast_ref::<RpcFailure>()).map_or(EXIT_FAILED, RpcFailure::exit_code)
}

pub(crate) fn rpc(url: &str) -> impl Fn(tonic::Status) -> anyhow::Error + '_ {
    move |s| {
        let message = match s.code() {
            // A refused certificate surfaces as a bare "transport error": the reason is in its causes.
            tonic::Code::Cancelled => format!(
                "cannot reach provider {url}: {} ({})",
                updraft_runtime::tls::describe(&s),
                updraft_runtime::tls::REFUSED_HINT
            ),
            tonic::Code::Unavailable | tonic::Code::Unknown => {
                format!("cannot reach provider {url}: {}", updraft_runtime::tls::describe(&s))
            }
            _ => s.message().to_string(),
        };
        anyhow::Error::new(RpcFailure { code: s.code(), message })
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let default_url = format!("{}://127.0.0.1:8092", if cli.tls.insecure { "http" } else { "https" });
    let url = cli.provider.clone().unwrap_or(default_url);
    let url = url.as_str();
    let _ = TLS.set(cli.tls.clone());
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
        Cmd::Pki(PkiCmd::Init { dir, name }) => {
            let crt = updraft_runtime::tls::pki::init(&dir, &name)?;
            if cli.json {
                print_json(&json!({"ca": crt}));
            } else {
                println!("created CA {} (its key, {}, stays with you)", crt.display(), dir.join("ca.key").display());
            }
        }
        Cmd::Pki(PkiCmd::Issue { name, role, dir, san, days }) => {
            let role: updraft_runtime::tls::Role = role.parse()?;
            if !(1..=3650).contains(&days) {
                bail!("--days must be 1-3650, got {days}");
            }
            let now = time::OffsetDateTime::now_utc() - time::Duration::minutes(5);
            let valid = Duration::from_secs(u64::from(days) * 86_400);
            let (crt, key) = updraft_runtime::tls::pki::issue(&dir, role, &name, &san, now, valid, &dir.join(&name))?;
            if cli.json {
                print_json(&json!({"cert": crt, "key": key, "role": role.as_str(), "name": name}));
            } else {
                println!("issued {} and {} ({role} {name}, {days} days)", crt.display(), key.display());
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
        Cmd::Machine(cmd) => crate::fleet::machine(url, cmd, cli.json).await?,
        Cmd::Group(cmd) => crate::fleet::group(url, cmd, cli.json).await?,
        Cmd::Site(cmd) => crate::fleet::site(url, cmd, cli.json).await?,
        Cmd::Provider(cmd) => crate::servers::provider(url, cmd, cli.json).await?,
        Cmd::Discovery(cmd) => crate::servers::discovery(url, cmd, cli.json).await?,
        Cmd::User(cmd) => crate::access::user(url, cmd, cli.json).await?,
        Cmd::Audit(cmd) => crate::access::audit(url, cmd, cli.json).await?,
        Cmd::Report { cmd, since } => crate::fleet::report(url, cmd, &since, cli.json).await?,
        Cmd::Deploy { cmd: Some(DeployCmd::List { product }), .. } => {
            crate::fleet::deploy_list(url, product.unwrap_or_default(), cli.json).await?
        }
        Cmd::Deploy { cmd: None, target } => crate::fleet::deploy(url, target, false, cli.json).await?,
        Cmd::Undeploy { target } => crate::fleet::deploy(url, target, true, cli.json).await?,
        Cmd::ProductLine(cmd) => {
            let mut c = connect(url).await?;
            let caps = match cmd {
                ProductLineCmd::Cap { line, version, follow_role } => {
                    let version = version.unwrap_or_default();
                    if !version.is_empty() {
                        version.parse::<updraft_core::Version>()?;
                    }
                    let follow_role = follow_role.unwrap_or_default();
                    if !follow_role.is_empty() {
                        follow_role.parse::<updraft_core::model::Role>()?;
                    }
                    c.set_cap(ProductLineCap { product_line: line, version, follow_role, ceiling: String::new() }).await
                }
                ProductLineCmd::Uncap { line } => {
                    c.set_cap(ProductLineCap { product_line: line, ..Default::default() }).await
                }
                ProductLineCmd::List => c.list_caps(ListCapsRequest {}).await,
            }
            .map_err(rpc(url))?
            .into_inner()
            .caps;
            if cli.json {
                print_json(&Value::Array(
                    caps.iter()
                        .map(|c| {
                            json!({"product_line": c.product_line, "cap": c.version, "follow_role": c.follow_role,
                                "ceiling": c.ceiling})
                        })
                        .collect(),
                ));
            } else {
                let dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
                let rows: Vec<Vec<String>> = caps
                    .iter()
                    .map(|c| {
                        let ceiling = match (c.follow_role.as_str(), c.ceiling.as_str()) {
                            ("", _) => "-".to_string(),
                            (role, "") => format!("none yet (no {role} runs it)"),
                            (_, v) => v.to_string(),
                        };
                        vec![c.product_line.clone(), dash(&c.version), dash(&c.follow_role), ceiling]
                    })
                    .collect();
                table(&["PRODUCT LINE", "CAP", "FOLLOWS ROLE", "CEILING"], &rows);
            }
        }
        Cmd::Watch(cmd) => watch(url, cmd, cli.json).await?,
        Cmd::Activity { cmd, machine, update, since, limit } => {
            crate::fleet::activity(url, cmd, machine, update, &since, limit, cli.json).await?
        }
    }
    Ok(())
}

/// Paths are resolved here, where the operator typed them; the provider sees absolute paths.
fn absolute(p: &std::path::Path) -> anyhow::Result<String> {
    Ok(std::path::absolute(p).with_context(|| p.display().to_string())?.to_string_lossy().into_owned())
}

async fn watch(url: &str, cmd: WatchCmd, as_json: bool) -> anyhow::Result<()> {
    let mut c = connect(url).await?;
    let folders = match cmd {
        WatchCmd::Add { dir, auto } => c.add_watch(WatchFolder { path: absolute(&dir)?, auto }).await,
        WatchCmd::Remove { dir } => c.remove_watch(RemoveWatchRequest { path: absolute(&dir)? }).await,
        WatchCmd::List => c.list_watches(ListWatchesRequest {}).await,
        WatchCmd::Pending { dir } => {
            let path = dir.map(|d| absolute(&d)).transpose()?.unwrap_or_default();
            let files = c.list_pending(ListPendingRequest { path }).await.map_err(rpc(url))?.into_inner().files;
            if as_json {
                print_json(&Value::Array(
                    files.iter().map(|f| json!({"path": f.path, "folder": f.folder, "size": f.size, "modified_unix": f.modified_unix})).collect(),
                ));
            } else {
                let rows: Vec<Vec<String>> =
                    files.iter().map(|f| vec![f.path.clone(), f.size.to_string(), age(f.modified_unix * 1000)]).collect();
                table(&["FILE", "SIZE", "MODIFIED"], &rows);
            }
            return Ok(());
        }
        WatchCmd::Import { files } => {
            let files = files.iter().map(|f| absolute(f)).collect::<anyhow::Result<Vec<_>>>()?;
            let results = c.import_pending(ImportPendingRequest { files }).await.map_err(rpc(url))?.into_inner().results;
            let failed = results.iter().filter(|r| !r.error.is_empty()).count();
            if as_json {
                print_json(&Value::Array(
                    results.iter().map(|r| json!({"file": r.file, "update_id": r.update_id, "error": r.error})).collect(),
                ));
            } else {
                for r in &results {
                    if r.error.is_empty() {
                        println!("imported {} as {}", r.file, r.update_id);
                    } else {
                        eprintln!("refused {}: {}", r.file, r.error);
                    }
                }
                if results.is_empty() {
                    println!("nothing to import");
                }
            }
            if failed > 0 {
                bail!("{failed} of {} file(s) not imported", results.len());
            }
            return Ok(());
        }
    }
    .map_err(rpc(url))?
    .into_inner()
    .folders;
    if as_json {
        print_json(&Value::Array(folders.iter().map(|f| json!({"path": f.path, "auto": f.auto})).collect()));
    } else {
        let rows: Vec<Vec<String>> =
            folders.iter().map(|f| vec![f.path.clone(), if f.auto { "auto" } else { "manual" }.to_string()]).collect();
        table(&["FOLDER", "MODE"], &rows);
    }
    Ok(())
}

fn build(a: BuildArgs, as_json: bool) -> anyhow::Result<()> {
    let mut props = BTreeMap::new();
    if a.apply_at == "restart" {
        // In the catalog record too, so agents know before they download.
        props.insert(package::APPLY_AT.to_string(), "restart".to_string());
    }
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
        requires: a.requires.as_deref().map(str::parse).transpose()?,
        lifecycle: package::Lifecycle {
            pre_install: a.pre_install,
            stop: a.stop_hook,
            post_install: a.post_install,
            start: a.start_hook,
            health: a.health_check,
            health_process: a.health_process,
            health_window_secs: a.health_window,
            hook_timeout_secs: a.hook_timeout,
            processes: a.processes,
            lock_file: a.lock_file,
            data: a.data,
            keep: a.keep,
            backups: a.backups,
        },
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
        UpdateCmd::List { product_line, product, state, group_by } => {
            let state = match state {
                Some(s) => s.parse::<UpdateState>()?.to_wire(),
                None => 0,
            };
            let mut c = connect(url).await?;
            let resp = c
                .list_updates(ListUpdatesRequest {
                    product: product.unwrap_or_default(),
                    state,
                    product_line: product_line.unwrap_or_default(),
                })
                .await
                .map_err(rpc(url))?
                .into_inner();
            for w in &resp.warnings {
                eprintln!("warning: {w}");
            }
            print_updates(&resp, as_json, group_by.as_deref());
        }
        UpdateCmd::Show { id } => {
            let mut c = connect(url).await?;
            let detail = c.get_update(GetUpdateRequest { id }).await.map_err(rpc(url))?.into_inner();
            let u = detail.update.unwrap_or_default();
            let status = detail.status.unwrap_or_default();
            let mut v = update_json(&u);
            v["status"] = status_json(&status);
            if as_json {
                print_json(&v);
            } else if let Value::Object(map) = v {
                for (k, v) in map {
                    let shown = match v {
                        Value::String(s) => s,
                        Value::Object(_) => status.notes.join("; "),
                        other => other.to_string(),
                    };
                    println!("{k:<20} {shown}");
                }
            }
        }
        UpdateCmd::State { mut args, retire_older } => {
            let state: UpdateState = args.pop().expect("clap requires two or more").parse()?;
            let mut c = connect(url).await?;
            let resp = c
                .set_update_state(SetUpdateStateRequest { ids: args, state: state.to_wire(), retire_older })
                .await
                .map_err(rpc(url))?
                .into_inner();
            print_updates(&resp, as_json, None);
        }
        UpdateCmd::Priority { mut args } => {
            let high = match args.pop().expect("clap requires two or more").as_str() {
                "high" => true,
                "normal" | "low" => false,
                other => bail!("priority {other:?}: expected high or normal"),
            };
            let mut c = connect(url).await?;
            let resp = c.set_priority(SetPriorityRequest { ids: args, high }).await.map_err(rpc(url))?.into_inner();
            print_updates(&resp, as_json, None);
        }
        UpdateCmd::Prestage { ids, off } => {
            let mut c = connect(url).await?;
            let resp = c.prestage(PrestageRequest { ids, off }).await.map_err(rpc(url))?.into_inner();
            print_updates(&resp, as_json, None);
        }
        UpdateCmd::Delete { ids, force } => {
            let mut c = connect(url).await?;
            let resp = c.delete_updates(DeleteUpdatesRequest { ids, force }).await.map_err(rpc(url))?.into_inner();
            if as_json {
                print_json(&Value::Array(resp.updates.iter().map(update_json).collect()));
            } else {
                for u in &resp.updates {
                    println!("deleted {}", u.id);
                }
            }
        }
        UpdateCmd::Relate { ids, installs } => {
            let mut c = connect(url).await?;
            let req = RelatedInstallsRequest { ids, products: installs, remove: false };
            let resp = c.set_related_installs(req).await.map_err(rpc(url))?.into_inner();
            print_updates(&resp, as_json, None);
        }
        UpdateCmd::Unrelate { ids, installs } => {
            let mut c = connect(url).await?;
            let req = RelatedInstallsRequest { ids, products: installs, remove: true };
            let resp = c.set_related_installs(req).await.map_err(rpc(url))?.into_inner();
            print_updates(&resp, as_json, None);
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

fn print_updates(resp: &ListUpdatesResponse, as_json: bool, group_by: Option<&str>) {
    let status = |u: &Update| resp.statuses.iter().find(|s| s.id == u.id).cloned().unwrap_or_default();
    if as_json {
        let rows = resp.updates.iter().map(|u| {
            let mut v = update_json(u);
            v["status"] = status_json(&status(u));
            v
        });
        return print_json(&Value::Array(rows.collect()));
    }
    let headers = ["ID", "PRODUCT", "VERSION", "TYPE", "RELEASE", "STATE", "PRIORITY", "STATUS"];
    let row = |u: &Update| {
        let st = status(u);
        let mut notes: Vec<String> = Vec::new();
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
        if !u.related_installs.is_empty() {
            notes.push(format!("+{}", u.related_installs.join(",")));
        }
        vec![
            u.id.clone(),
            u.product.clone(),
            u.version.clone(),
            InstallType::from_wire(u.install_type).unwrap_or_default().to_string(),
            release_of(u),
            state_name(u.state),
            if u.high_priority { "high".into() } else { "-".into() },
            if notes.is_empty() { "-".into() } else { notes.join("; ") },
        ]
    };
    let Some(column) = group_by else {
        return table(&headers, &resp.updates.iter().map(row).collect::<Vec<_>>());
    };
    let key = |u: &Update| match column {
        "release" => format!("{} {}", u.product, release_of(u)),
        "product" => u.product.clone(),
        "product-line" => {
            if u.product_line.is_empty() {
                "(none)".into()
            } else {
                u.product_line.clone()
            }
        }
        "state" => state_name(u.state),
        _ => InstallType::from_wire(u.install_type).unwrap_or_default().to_string(),
    };
    let mut groups: BTreeMap<String, Vec<Vec<String>>> = BTreeMap::new();
    for u in &resp.updates {
        groups.entry(key(u)).or_default().push(row(u));
    }
    for (i, (k, rows)) in groups.iter().enumerate() {
        if i > 0 {
            println!();
        }
        println!("{column}: {k} ({} update{})", rows.len(), if rows.len() == 1 { "" } else { "s" });
        table(&headers, rows);
    }
}

/// The release an update belongs to, as people name it: its label, else MM.mm.
fn release_of(u: &Update) -> String {
    if !u.release_label.is_empty() {
        return u.release_label.clone();
    }
    u.version.split('.').take(2).collect::<Vec<_>>().join(".")
}

fn status_json(s: &UpdateStatus) -> Value {
    json!({"installed_count": s.installed_count, "held_by_cap": s.held_by_cap, "notes": s.notes,
        "applicable_count": s.applicable_count, "offered_count": s.offered_count, "held_count": s.held_count,
        "held": s.held})
}

fn state_name(n: i32) -> String {
    UpdateState::from_wire(n).map(|s| s.to_string()).unwrap_or_else(|| format!("unknown({n})"))
}

pub(crate) fn kind_name(n: i32) -> String {
    ActivityKind::try_from(n)
        .map(|k| k.as_str_name().trim_start_matches("ACTIVITY_KIND_").to_lowercase().replace('_', "-"))
        .unwrap_or_else(|_| format!("unknown({n})"))
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
        "requires_version": u.requires_version,
    })
}

pub(crate) fn machine_json(m: &Machine) -> Value {
    let info = m.info.clone().unwrap_or_default();
    json!({
        "name": info.name, "hostname": info.hostname, "addresses": info.addresses,
        "agent_version": info.agent_version, "via": m.via, "is_remote_provider": m.is_remote_provider,
        "last_contact_unix_ms": m.last_contact_unix_ms, "last_error": m.last_error,
        "group": m.group, "status": m.status, "notes": m.notes, "problems": info.problems,
        "restart_needed": info.restart_needed, "waiting": info.waiting,
        "role": m.role, "silent": m.silent, "contact_due_unix_ms": m.contact_due_unix_ms,
        "installed": info.installed.iter().map(|p| json!({"product": p.product, "version": p.version, "update_id": p.update_id,
            "previous_version": p.previous_version, "upgrade_code": p.upgrade_code, "product_code": p.product_code,
            "adopted": p.adopted})).collect::<Vec<_>>(),
    })
}

pub(crate) fn activity_json(a: &updraft_proto::v1::Activity) -> Value {
    json!({"at_unix_ms": a.at_unix_ms, "machine": a.machine, "kind": kind_name(a.kind), "update_id": a.update_id,
        "product": a.product, "version": a.version, "detail": a.detail})
}
