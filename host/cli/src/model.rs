//! `agentos model ls|add|rm`: the model bundles agents can run.

use std::io::{self, Write};
use std::path::PathBuf;

use serde::Serialize;

use agentos_image as image;
use agentos_image::model::{ModelStore, verify};

#[derive(clap::Subcommand, Debug)]
pub enum ModelCommand {
    /// List the installed bundles: name, tasks, size, description.
    Ls(LsArgs),
    /// Check a bundle directory (manifest, files, checksums) and install it under its name.
    Add(AddArgs),
    /// Check an installed bundle's files against its manifest.
    Verify(NameArgs),
    /// Remove an installed bundle.
    Rm(NameArgs),
}

#[derive(clap::Args, Debug)]
pub struct LsArgs {
    /// One JSON object per bundle, with its whole manifest.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct AddArgs {
    /// Directory holding agentos-model.toml and the files it lists.
    pub dir: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct NameArgs {
    pub name: String,
}

#[derive(Serialize)]
struct Listed<'a> {
    dir: String,
    bytes: u64,
    #[serde(flatten)]
    manifest: &'a agentos_protocol::bundle::BundleManifest,
}

pub fn run(cmd: &ModelCommand) -> anyhow::Result<i32> {
    let store = ModelStore::new(&image::default_cache_dir());
    match cmd {
        ModelCommand::Ls(args) => ls(&store, args),
        ModelCommand::Add(args) => {
            let bundle = store.add(&args.dir)?;
            println!(
                "installed model `{}` ({}) in {}",
                bundle.manifest.name,
                tasks(&bundle.manifest),
                bundle.dir.display()
            );
            Ok(0)
        }
        ModelCommand::Verify(args) => {
            let bundle = store.find(&args.name)?;
            verify(&bundle.dir)?;
            println!(
                "model `{}`: {} files match its manifest",
                args.name,
                bundle.manifest.files.len()
            );
            Ok(0)
        }
        ModelCommand::Rm(args) => {
            store.remove(&args.name)?;
            println!("removed model `{}`", args.name);
            Ok(0)
        }
    }
}

fn tasks(manifest: &agentos_protocol::bundle::BundleManifest) -> String {
    manifest
        .tasks
        .iter()
        .map(|t| t.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

fn ls(store: &ModelStore, args: &LsArgs) -> anyhow::Result<i32> {
    let (bundles, broken) = store.list();
    let mut out = io::stdout().lock();
    if !args.json {
        writeln!(
            out,
            "{:<18} {:<22} {:>9}  DESCRIPTION",
            "NAME", "TASKS", "SIZE"
        )?;
    }
    for bundle in &bundles {
        let bytes: u64 = bundle
            .manifest
            .files
            .keys()
            .filter_map(|f| std::fs::metadata(bundle.dir.join(f)).ok())
            .map(|m| m.len())
            .sum();
        if args.json {
            let listed = Listed {
                dir: bundle.dir.display().to_string(),
                bytes,
                manifest: &bundle.manifest,
            };
            serde_json::to_writer(&mut out, &listed)?;
            writeln!(out)?;
        } else {
            writeln!(
                out,
                "{:<18} {:<22} {:>7.1}MB  {}",
                bundle.manifest.name,
                tasks(&bundle.manifest),
                bytes as f64 / 1e6,
                bundle.manifest.description
            )?;
        }
    }
    if bundles.is_empty() && !args.json {
        writeln!(
            out,
            "(no models in {}; `scripts/setup` builds the default ones)",
            store.models_dir().display()
        )?;
    }
    for err in &broken {
        eprintln!("agentos: skipping a broken bundle: {err}");
    }
    Ok(0)
}
