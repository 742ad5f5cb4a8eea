//! Man pages and shell completions of keibi's binaries.
//!
//! Each binary writes its own, from the same clap definition that parses
//! its command line, so they cannot drift from the real flags:
//!
//! ```text
//! keibi-syncd --generate-docs DIR
//! ```
//!
//! writes `DIR/man/keibi-syncd.8` (roff, by clap_mangen; keibi-mountd
//! also writes `mount.fuse.keibi.8` for its mount helper), and the
//! completions (by clap_complete) `DIR/bash/keibi-syncd`,
//! `DIR/zsh/_keibi-syncd` and `DIR/fish/keibi-syncd.fish`, then exits 0.
//! The flag is recognised only as the whole command line (the binary's
//! name, the flag, a directory), before clap parses anything, so it needs
//! no place in any binary's own arguments and is not in `--help`.
//! `packaging/deb.sh` calls it for the package; nothing is generated at
//! build time, so a build costs nothing extra but these two small crates.
//!
//! [`env`] parses a command line whose flags may also come from `KEIBI_*`
//! environment variables.

pub mod env;

use clap::Command;
use clap_complete::Shell;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The flag that asks a binary for its man page and completions.
pub const FLAG: &str = "--generate-docs";

/// If the command line is `BINARY --generate-docs DIR`, write the man page
/// and the completions of each of `commands()` under DIR (each with its
/// manual section: "1" for commands, "8" for daemons) and return the exit
/// code; otherwise `None`, and the binary goes on as usual.
pub fn generate_if_asked(
    commands: impl FnOnce() -> Vec<(Command, &'static str)>,
) -> Option<ExitCode> {
    let dir = requested_dir(std::env::args_os().collect())?;
    for (command, section) in commands() {
        if let Err(e) = write_all(command, section, &dir) {
            eprintln!("{FLAG} {}: {e}", dir.display());
            return Some(ExitCode::FAILURE);
        }
    }
    Some(ExitCode::SUCCESS)
}

fn requested_dir(args: Vec<OsString>) -> Option<PathBuf> {
    match args.as_slice() {
        [_, flag, dir] if flag == FLAG => Some(PathBuf::from(dir)),
        _ => None,
    }
}

/// Write `DIR/man/NAME.SECTION`, `DIR/bash/NAME`, `DIR/zsh/_NAME` and
/// `DIR/fish/NAME.fish` for `command` (NAME is its name).
pub fn write_all(command: Command, section: &str, dir: &Path) -> io::Result<()> {
    let mut command = command;
    command.build();
    let name = command.get_name().to_string();

    let man_dir = dir.join("man");
    fs::create_dir_all(&man_dir)?;
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone())
        .section(section)
        .manual("keibi")
        .render(&mut page)?;
    fs::write(man_dir.join(format!("{name}.{section}")), page)?;

    for (shell, sub, file) in [
        (Shell::Bash, "bash", name.clone()),
        (Shell::Zsh, "zsh", format!("_{name}")),
        (Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let shell_dir = dir.join(sub);
        fs::create_dir_all(&shell_dir)?;
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut command, &name, &mut script);
        fs::write(shell_dir.join(file), script)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_whole_command_line_asks() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            requested_dir(args(&["b", FLAG, "/tmp/x"])),
            Some(PathBuf::from("/tmp/x"))
        );
        assert_eq!(requested_dir(args(&["b", FLAG])), None);
        assert_eq!(requested_dir(args(&["b", "--state-dir", FLAG])), None);
        assert_eq!(requested_dir(args(&["b", FLAG, "/tmp/x", "more"])), None);
    }

    #[test]
    fn writes_a_page_and_three_completions() {
        let dir = std::env::temp_dir().join(format!("clidoc-test-{}", std::process::id()));
        let cmd = Command::new("demo")
            .about("A demo.")
            .arg(
                clap::Arg::new("verbose")
                    .long("verbose")
                    .action(clap::ArgAction::SetTrue),
            )
            .subcommand(Command::new("status").about("Show the status."));
        write_all(cmd, "1", &dir).expect("generate");
        let page = fs::read_to_string(dir.join("man/demo.1")).expect("man page");
        assert!(page.contains(".TH demo 1"), "{page}");
        assert!(page.contains("status"), "{page}");
        let bash = fs::read_to_string(dir.join("bash/demo")).expect("bash");
        assert!(bash.contains("complete -F _demo"), "{bash}");
        assert!(bash.contains("--verbose"), "{bash}");
        assert!(dir.join("zsh/_demo").is_file());
        assert!(dir.join("fish/demo.fish").is_file());
        fs::remove_dir_all(&dir).expect("clean up");
    }
}
