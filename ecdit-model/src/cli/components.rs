//! `ecdit components`: what the registry holds, as `ffmpeg -codecs` lists codecs.

use anyhow::{Context, Result};
use clap::Args;
use ecdit_engine::{ComponentInfo, Family};
use std::path::PathBuf;

/// Arguments of `ecdit components`.
#[derive(Args, Debug)]
pub struct ComponentsArgs {
    /// One JSON object per component, for machines.
    #[arg(long)]
    pub json: bool,
    /// Only this family (backend, router, expert, scheduler).
    #[arg(long)]
    pub family: Option<String>,
    /// Also start this backend (e.g. `cuda`) and report whether it is usable here.
    #[arg(long)]
    pub backend: Option<String>,
}

/// Prints the registry's components.
pub fn run(plugins: &[PathBuf], args: ComponentsArgs) -> Result<()> {
    let registry = super::registry(plugins)?;
    if let Some(kind) = &args.backend {
        let backend = registry
            .backend(&serde_json::json!({ "kind": kind }))
            .with_context(|| format!("--backend {kind}"))?;
        eprintln!(
            "backend '{}' is available ({} threads)",
            backend.name(),
            backend.threads()
        );
    }
    let mut list = registry.list();
    if let Some(f) = &args.family {
        list.retain(|c| c.family.to_string() == *f);
    }
    if args.json {
        for c in &list {
            println!("{}", serde_json::to_string(c)?);
        }
    } else {
        print!("{}", table(&list));
    }
    Ok(())
}

fn letter(f: Family) -> char {
    match f {
        Family::Backend => 'B',
        Family::Router => 'R',
        Family::Expert => 'E',
        Family::Scheduler => 'S',
    }
}

/// The human-readable listing.
fn table(list: &[ComponentInfo]) -> String {
    let mut s = String::from("Components:\n B. = backend\n R. = router\n E. = expert\n S. = scheduler\n ---\n");
    let width = list.iter().map(|c| c.kind.len()).max().unwrap_or(0);
    for c in list {
        s += &format!(
            " {}  {:width$}  {}  [{}]\n",
            letter(c.family),
            c.kind,
            c.description,
            c.origin
        );
        for p in &c.params {
            let default = match &p.default {
                Some(d) => format!("= {d}"),
                None => "(required)".into(),
            };
            s += &format!("      {:18} {:28} {:14} {}\n", p.name, p.ty.describe(), default, p.help);
        }
    }
    s
}
