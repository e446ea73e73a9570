//! `cargo run -p xtask -- docs OUTDIR`: man pages (OUTDIR/man/) and bash, zsh and fish
//! completions (OUTDIR/completions/) for every binary, from their clap definitions, so the
//! documentation cannot drift from the flags.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Command, CommandFactory};
use clap_complete::Shell;

/// (binary, man section, its clap command).
fn binaries() -> Vec<(&'static str, &'static str, Command)> {
    vec![
        ("kata-ksm-throttler", "8", kata_ksm_throttler::startup::cli::Args::command()),
        ("ksmtctl", "1", ksmtctl::cli::Cli::command()),
        ("kata-ksm-throttler-grpc", "8", kata_ksm_throttler_grpc::cli::Args::command()),
        ("kata-vc-throttler", "8", kata_vc_throttler::cli::Args::command()),
        ("kata-ksm-throttler-exporter", "8", kata_ksm_throttler_exporter::cli::Args::command()),
    ]
}

fn docs(out: &Path) -> Result<Vec<PathBuf>> {
    let mut written = vec![];
    let man = out.join("man");
    let completions = out.join("completions");
    for dir in [&man, &completions] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    for (name, section, cmd) in binaries() {
        let cmd = cmd.name(name);
        // One page for the command and one per subcommand, which the first one refers to.
        let mut pages = vec![(name.to_owned(), cmd.clone())];
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            let full = format!("{name}-{}", sub.get_name());
            pages.push((full.clone(), sub.clone().name(full)));
        }
        for (page_name, page_cmd) in pages {
            let page = man.join(format!("{page_name}.{section}"));
            let mut buf = vec![];
            clap_mangen::Man::new(page_cmd).section(section).render(&mut buf)?;
            std::fs::write(&page, buf).with_context(|| format!("writing {}", page.display()))?;
            written.push(page);
        }
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let path = clap_complete::generate_to(shell, &mut cmd.clone(), name, &completions)?;
            written.push(path);
        }
    }
    Ok(written)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [task, out] if task == "docs" => {
            for path in docs(Path::new(out))? {
                println!("{}", path.display());
            }
            Ok(())
        }
        _ => bail!("usage: cargo run -p xtask -- docs OUTDIR"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_binary_gets_a_man_page_and_three_completions_naming_its_flags() {
        let dir = tempfile_dir();
        let written = docs(&dir).expect("docs");
        // 5 binaries x 3 completions, 5 main pages, 8 ksmtctl subcommand pages.
        assert_eq!(written.len(), 5 * 3 + 5 + 8, "{written:?}");
        for page in ["set-mode", "sandboxes", "top", "doctor", "metrics"] {
            assert!(dir.join(format!("man/ksmtctl-{page}.1")).exists(), "{page}");
        }
        let man = std::fs::read_to_string(dir.join("man/kata-ksm-throttler.8")).expect("man page");
        assert!(man.contains("exit\\-idle\\-after") && man.contains("check\\-config"), "flags documented");
        let shim = std::fs::read_to_string(dir.join("man/kata-ksm-throttler-grpc.8")).expect("shim page");
        assert!(shim.contains("max\\-connections") && shim.contains("ksm.KSMThrottler"), "shim flags documented");
        let trigger = std::fs::read_to_string(dir.join("man/kata-vc-throttler.8")).expect("trigger page");
        assert!(trigger.contains("kata\\-root") && trigger.contains("inotify"), "trigger flags documented");
        let fish = std::fs::read_to_string(dir.join("completions/kata-vc-throttler.fish")).expect("fish");
        assert!(fish.contains("no-kata-root"), "trigger flags completed");
        let bash = std::fs::read_to_string(dir.join("completions/ksmtctl.bash")).expect("bash");
        assert!(bash.contains("set-mode") && bash.contains("watch"), "subcommands completed");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-docs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }
}
