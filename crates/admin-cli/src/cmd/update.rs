//! `admin-cli update`: the catalog — upload, list, show, and change updates.
use anyhow::{Context, bail};
use tokio::io::AsyncReadExt;
use updraft_core::model::UpdateState;
use updraft_core::package::Package;
use updraft_proto::v1::{
    DeleteUpdatesRequest, GetUpdateRequest, ListUpdatesRequest, ListUpdatesResponse, PrestageRequest,
    RelatedInstallsRequest, SetPriorityRequest, SetUpdateStateRequest, UploadChunk, UploadHeader, upload_chunk,
};

use crate::cli::UpdateCmd;
use crate::ctx::Ctx;
use crate::views::{UpdateView, updates, updates_table};

/// Upload chunk size: well under the provider's 4 MiB message limit.
const UPLOAD_CHUNK: usize = 1 << 20;

pub async fn run(ctx: &Ctx, cmd: UpdateCmd) -> anyhow::Result<()> {
    match cmd {
        UpdateCmd::Add { file } => add(ctx, &file).await,
        UpdateCmd::List { product_line, product, state, group_by } => {
            let state = match state {
                Some(s) => s.parse::<UpdateState>()?.to_wire(),
                None => 0,
            };
            let req = ListUpdatesRequest {
                product: product.unwrap_or_default(),
                state,
                product_line: product_line.unwrap_or_default(),
            };
            let resp = ctx.admin().await?.list_updates(req).await.map_err(ctx.failed())?.into_inner();
            for w in &resp.warnings {
                eprintln!("warning: {w}");
            }
            show_list(ctx, &resp, group_by.as_deref());
            Ok(())
        }
        UpdateCmd::Show { id } => {
            let detail =
                ctx.admin().await?.get_update(GetUpdateRequest { id }).await.map_err(ctx.failed())?.into_inner();
            let u = UpdateView::new(&detail.update.unwrap_or_default(), Some(&detail.status.unwrap_or_default()));
            ctx.show(&u, UpdateView::print_detail);
            Ok(())
        }
        UpdateCmd::State { mut args, retire_older } => {
            let state: UpdateState = args.pop().expect("clap requires two or more").parse()?;
            let req = SetUpdateStateRequest { ids: args, state: state.to_wire(), retire_older };
            let resp = ctx.admin().await?.set_update_state(req).await.map_err(ctx.failed())?.into_inner();
            show_list(ctx, &resp, None);
            Ok(())
        }
        UpdateCmd::Priority { mut args } => {
            let high = match args.pop().expect("clap requires two or more").as_str() {
                "high" => true,
                "normal" | "low" => false,
                other => bail!("priority {other:?}: expected high or normal"),
            };
            let resp =
                ctx.admin().await?.set_priority(SetPriorityRequest { ids: args, high }).await.map_err(ctx.failed())?;
            show_list(ctx, &resp.into_inner(), None);
            Ok(())
        }
        UpdateCmd::Prestage { ids, off } => {
            let resp = ctx.admin().await?.prestage(PrestageRequest { ids, off }).await.map_err(ctx.failed())?;
            show_list(ctx, &resp.into_inner(), None);
            Ok(())
        }
        UpdateCmd::Delete { ids, force } => {
            let resp = ctx.admin().await?.delete_updates(DeleteUpdatesRequest { ids, force }).await;
            let deleted: Vec<UpdateView> =
                resp.map_err(ctx.failed())?.into_inner().updates.iter().map(|u| UpdateView::new(u, None)).collect();
            ctx.show(&deleted, |d| d.iter().for_each(|u| println!("deleted {}", u.id)));
            Ok(())
        }
        UpdateCmd::Relate { ids, installs } => {
            relate(ctx, RelatedInstallsRequest { ids, products: installs, remove: false }).await
        }
        UpdateCmd::Unrelate { ids, installs } => {
            relate(ctx, RelatedInstallsRequest { ids, products: installs, remove: true }).await
        }
    }
}

fn show_list(ctx: &Ctx, resp: &ListUpdatesResponse, group_by: Option<&str>) {
    ctx.show(&updates(resp), |u| updates_table(u, group_by));
}

async fn relate(ctx: &Ctx, req: RelatedInstallsRequest) -> anyhow::Result<()> {
    let resp = ctx.admin().await?.set_related_installs(req).await.map_err(ctx.failed())?.into_inner();
    show_list(ctx, &resp, None);
    Ok(())
}

/// Uploads a package in chunks with a progress bar on a terminal; checked locally first, so a
/// bad file is refused without touching the provider.
async fn add(ctx: &Ctx, file: &std::path::Path) -> anyhow::Result<()> {
    let pkg = Package::open(file)?;
    let mut c = ctx.admin().await?;
    let size = std::fs::metadata(file)?.len();
    let name = file.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let bar = progress(size, ctx.json);
    let mut f = tokio::fs::File::open(file).await.with_context(|| file.display().to_string())?;
    let (tx, rx) = tokio::sync::mpsc::channel::<UploadChunk>(4);
    let header = UploadChunk { part: Some(upload_chunk::Part::Header(UploadHeader { file_name: name, size })) };
    let reader = {
        let bar = bar.clone();
        let file = file.to_path_buf();
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
    let u = UpdateView::new(&result.map_err(ctx.failed())?.into_inner(), None);
    ctx.show(&u, |u| {
        println!("{}", u.id);
        eprintln!(
            "imported {} {} as {} (state {}{})",
            pkg.manifest.product,
            pkg.manifest.version,
            u.id,
            u.state,
            if u.signature_verified {
                ", signature verified"
            } else {
                ", signature not verified: the provider trusts no release key"
            }
        );
    });
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
