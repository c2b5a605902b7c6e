//! `admin-cli package`: build and inspect signed packages (no provider involved).
use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::anyhow;
use serde::Serialize;
use updraft_core::keys::{PublicKey, ReleaseKey};
use updraft_core::model::InstallType;
use updraft_core::package::{self, Manifest, Package, PackageMeta};

use crate::cli::{BuildArgs, PackageCmd};
use crate::ctx::Ctx;
use crate::render::table;

pub fn run(ctx: &Ctx, cmd: PackageCmd) -> anyhow::Result<()> {
    match cmd {
        PackageCmd::Build(args) => build(ctx, *args),
        PackageCmd::Inspect { file, key } => inspect(ctx, &file, key),
    }
}

#[derive(Serialize)]
struct Built {
    file: PathBuf,
    product: String,
    version: String,
    files: usize,
    size: u64,
    key_id: String,
}

fn build(ctx: &Ctx, a: BuildArgs) -> anyhow::Result<()> {
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
            verify_window_secs: a.verify_window.map(|d| d.as_secs().min(u64::from(u32::MAX)) as u32),
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
    let built = Built {
        size: std::fs::metadata(&a.out)?.len(),
        file: a.out,
        product: m.product,
        version: m.version.to_string(),
        files: m.files.len(),
        key_id: m.key_id,
    };
    ctx.show(&built, |b| {
        println!(
            "built {} ({} {}, {} files, {} bytes, key {})",
            b.file.display(),
            b.product,
            b.version,
            b.files,
            b.size,
            b.key_id
        )
    });
    Ok(())
}

#[derive(Serialize)]
struct Inspected<'a> {
    #[serde(flatten)]
    manifest: &'a Manifest,
    /// Checked against `--key` (null without one).
    signature_verified: Option<bool>,
}

fn inspect(ctx: &Ctx, file: &std::path::Path, key: Option<PathBuf>) -> anyhow::Result<()> {
    let pkg = Package::open(file)?;
    let signature_verified = match key {
        Some(k) => {
            pkg.verify(&PublicKey::load(&k)?)?;
            Some(true)
        }
        None => None,
    };
    ctx.show(&Inspected { manifest: &pkg.manifest, signature_verified }, |i| {
        let m = i.manifest;
        println!("{} {} ({}) signed by key {}", m.product, m.version, m.install_type, m.key_id);
        if i.signature_verified.is_some() {
            println!("signature verified");
        }
        let rows: Vec<Vec<String>> =
            m.files.iter().map(|f| vec![format!("{:o}", f.mode), f.size.to_string(), f.path.clone()]).collect();
        table(&["MODE", "SIZE", "PATH"], &rows);
    });
    Ok(())
}
