//! `admin-cli watch`: folders on the provider's machine it imports packages from.
use anyhow::{Context, bail};
use serde::Serialize;
use updraft_proto::v1::{
    ImportPendingRequest, ListPendingRequest, ListWatchesRequest, RemoveWatchRequest, WatchFolder,
};

use crate::cli::WatchCmd;
use crate::ctx::Ctx;
use crate::render::{age, table};

#[derive(Serialize)]
struct Folder {
    path: String,
    auto: bool,
}

#[derive(Serialize)]
struct Pending {
    path: String,
    folder: String,
    size: u64,
    modified_unix: i64,
}

#[derive(Serialize)]
struct Imported {
    file: String,
    update_id: String,
    error: String,
}

/// Paths are resolved here, where the operator typed them; the provider sees absolute paths.
fn absolute(p: &std::path::Path) -> anyhow::Result<String> {
    Ok(std::path::absolute(p).with_context(|| p.display().to_string())?.to_string_lossy().into_owned())
}

pub async fn run(ctx: &Ctx, cmd: WatchCmd) -> anyhow::Result<()> {
    let mut c = ctx.admin().await?;
    let folders = match cmd {
        WatchCmd::Add { dir, auto } => c.add_watch(WatchFolder { path: absolute(&dir)?, auto }).await,
        WatchCmd::Remove { dir } => c.remove_watch(RemoveWatchRequest { path: absolute(&dir)? }).await,
        WatchCmd::List => c.list_watches(ListWatchesRequest {}).await,
        WatchCmd::Pending { dir } => {
            let path = dir.map(|d| absolute(&d)).transpose()?.unwrap_or_default();
            let files = c.list_pending(ListPendingRequest { path }).await.map_err(ctx.failed())?.into_inner().files;
            let files: Vec<Pending> = files
                .into_iter()
                .map(|f| Pending { path: f.path, folder: f.folder, size: f.size, modified_unix: f.modified_unix })
                .collect();
            ctx.show(&files, |fs| {
                let rows: Vec<Vec<String>> =
                    fs.iter().map(|f| vec![f.path.clone(), f.size.to_string(), age(f.modified_unix * 1000)]).collect();
                table(&["FILE", "SIZE", "MODIFIED"], &rows);
            });
            return Ok(());
        }
        WatchCmd::Import { files } => {
            let files = files.iter().map(|f| absolute(f)).collect::<anyhow::Result<Vec<_>>>()?;
            let results = c.import_pending(ImportPendingRequest { files }).await.map_err(ctx.failed())?;
            let results: Vec<Imported> = results
                .into_inner()
                .results
                .into_iter()
                .map(|r| Imported { file: r.file, update_id: r.update_id, error: r.error })
                .collect();
            ctx.show(&results, |rs| {
                for r in rs {
                    if r.error.is_empty() {
                        println!("imported {} as {}", r.file, r.update_id);
                    } else {
                        eprintln!("refused {}: {}", r.file, r.error);
                    }
                }
                if rs.is_empty() {
                    println!("nothing to import");
                }
            });
            let failed = results.iter().filter(|r| !r.error.is_empty()).count();
            if failed > 0 {
                bail!("{failed} of {} file(s) not imported", results.len());
            }
            return Ok(());
        }
    }
    .map_err(ctx.failed())?
    .into_inner()
    .folders;
    let folders: Vec<Folder> = folders.into_iter().map(|f| Folder { path: f.path, auto: f.auto }).collect();
    ctx.show(&folders, |fs| {
        let rows: Vec<Vec<String>> =
            fs.iter().map(|f| vec![f.path.clone(), if f.auto { "auto" } else { "manual" }.to_string()]).collect();
        table(&["FOLDER", "MODE"], &rows);
    });
    Ok(())
}
