//! `agentos image build`: the agent and carrier images, and the disk of the `base` template, from
//! Debian packages, into the cache.

use std::path::PathBuf;

use anyhow::Context;

use agentos_image::{self as image, BuildOptions, ImageSpec, template};

#[derive(clap::Subcommand, Debug)]
pub enum ImageCommand {
    /// Build (or bring up to date) the guest images and the `base` template's disk; a second run
    /// with nothing changed is a no-op.
    Build(BuildArgs),
}

#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    /// The guest agent binary to put in the images (default: `agentos-guest` next to this binary).
    #[arg(long)]
    pub guest_agent: Option<PathBuf>,
    /// Ask apt for the newest packages (kernel, busybox, the `base` template's) instead of the
    /// versions pinned by the last build.
    #[arg(long)]
    pub update: bool,
    /// Which images to build.
    #[arg(long, value_enum, default_value_t = Which::All)]
    pub image: Which,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Which {
    Agent,
    Carrier,
    /// The disk of the `base` template (bash, python3), for agents of the agent image.
    Base,
    All,
}

fn default_guest_agent() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the agentos binary")?;
    let agent = exe.with_file_name("agentos-guest");
    anyhow::ensure!(
        agent.is_file(),
        "{} does not exist: build it with `cargo build --release` or pass --guest-agent",
        agent.display()
    );
    Ok(agent)
}

pub fn run(cmd: &ImageCommand) -> anyhow::Result<i32> {
    let ImageCommand::Build(args) = cmd;
    let guest_agent = match &args.guest_agent {
        Some(path) => path.clone(),
        None => default_guest_agent()?,
    };
    let cache = image::default_cache_dir();
    let specs = match args.image {
        Which::Agent => vec![ImageSpec::agent()],
        Which::Carrier => vec![ImageSpec::carrier()],
        Which::Base => Vec::new(),
        Which::All => vec![ImageSpec::agent(), ImageSpec::carrier()],
    };
    let options = BuildOptions {
        guest_agent,
        refresh_packages: args.update,
    };
    for spec in &specs {
        let built = image::build_image(spec, &cache, &options, &mut |step| eprintln!("{step}"))
            .with_context(|| format!("cannot build the {} image", spec.name))?;
        println!("{}", built.dir.display());
    }
    if matches!(args.image, Which::Base | Which::All) {
        let agent = image::find_image(&cache, image::AGENT_IMAGE)
            .context("the `base` template's disk is built for the agent image")?;
        let started = std::time::Instant::now();
        let disk = template::build_base_disk(&cache, &agent.manifest, args.update)
            .context("cannot build the disk of the `base` template")?;
        let size = std::fs::metadata(&disk).map_or(0, |m| m.len());
        eprintln!(
            "base template disk: {:.1} MiB ({:.1} s)",
            size as f64 / (1024.0 * 1024.0),
            started.elapsed().as_secs_f64()
        );
        println!("{}", disk.display());
    }
    Ok(0)
}
