//! `portcullis driver lint [DIR]`: what `kextutil -tn` is to a kext, for a `drivers.d`
//! directory of personalities. Every error at `file:line:col`; exit status 1 when there is
//! one (the broker refuses to start on such a set).

use std::path::PathBuf;

use clap::{Args, Subcommand};

use portcullis_broker::{config::Config, registry::personality::Personalities};

#[derive(Debug, Subcommand)]
pub(crate) enum DriverCommand {
    /// Check a directory of driver personalities: ids, versions, drivers, keys, duplicates,
    /// personalities that can never match, ambiguous pairs, and files others could change.
    Lint(LintArgs),
}

#[derive(Debug, Args)]
pub(crate) struct LintArgs {
    /// The `drivers.d` directory [default: the one the configuration names].
    dir: Option<PathBuf>,
    /// The broker configuration whose `drivers` directory to check.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print JSON: `{"personalities": [...], "errors": [...]}`.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(command: DriverCommand) -> Result<(), String> {
    match command {
        DriverCommand::Lint(args) => lint(args),
    }
}

fn lint(args: LintArgs) -> Result<(), String> {
    let dir = match args.dir {
        Some(dir) => dir,
        None => Config::load(args.config.as_deref())
            .map_err(|e| e.to_string())?
            .drivers
            .ok_or("no directory given, and the configuration names no `drivers` directory")?,
    };
    // Root ownership and mode 644 are asked of every install, whoever runs the check.
    let result = Personalities::load_dir(&dir, true);
    let (set, errors) = match result {
        Ok(set) => (Some(set), Vec::new()),
        Err(errors) => (None, errors),
    };
    if args.json {
        let personalities: Vec<serde_json::Value> = set
            .iter()
            .flat_map(|s| s.all())
            .map(|p| {
                serde_json::json!({
                    "id": p.id, "version": p.version, "driver": p.driver,
                    "provider_class": p.provider_class, "probe_score": p.probe_score,
                    "category": p.category, "origin": p.origin.place(),
                })
            })
            .collect();
        let errors: Vec<serde_json::Value> = errors
            .iter()
            .map(|e| serde_json::json!({ "place": e.place(), "message": e.message }))
            .collect();
        println!(
            "{}",
            serde_json::json!({ "personalities": personalities, "errors": errors })
        );
    } else {
        for e in &errors {
            println!("{e}");
        }
        if let Some(set) = &set {
            println!(
                "{}: {} personalities in {} files, no errors",
                dir.display(),
                set.all().len(),
                set.files().len()
            );
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("{}: {} errors", dir.display(), errors.len()))
    }
}
