//! `keibictl prefetch PATH...`: make files local, with progress.
//!
//! Paths are turned into paths of the share first ([`share_path`]): a path
//! under one of the mountpoints syncd lists in its status (made absolute
//! without touching the mount, which may hang) loses the mountpoint;
//! another absolute path is taken as a path from the share's root. Then
//! `Control::prefetch` is called every [`STEP`] with the files not yet
//! local: each call starts fetches of missing chunks (a window per file,
//! see syncd's `sync::prefetch`) and answers each file's size and bytes
//! present, which drive the progress (bytes, rate, ETA). A file whose path
//! syncd cannot use (no such file, not a regular file) is reported and
//! left; the others go on. The command ends when every other file is
//! local, or at `--timeout` (the fetches started go on in syncd).

use crate::output::PrefetchOutput;
use crate::progress::{Mode, Progress};
use ipc_schema::service::ControlClient;
use ipc_schema::transport::{connect_control, context_with_timeout};
use ipc_schema::{MountStatus, PrefetchFile};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;

/// The pause between two steps.
pub const STEP: Duration = Duration::from_millis(200);

/// The path in the share of `path` (see the module doc), or why it has
/// none.
pub fn share_path(path: &Path, mounts: &[MountStatus]) -> Result<String, String> {
    let abs = std::path::absolute(path)
        .map_err(|e| format!("{}: cannot make it absolute: {e}", path.display()))?;
    let inside = mounts
        .iter()
        .filter_map(|m| abs.strip_prefix(&m.info.mountpoint).ok())
        .min_by_key(|rest| rest.components().count());
    let rest: PathBuf = match inside {
        Some(rest) => rest.to_path_buf(),
        None if path.is_absolute() => path.to_path_buf(),
        None => {
            return Err(format!(
                "{}: not under a mountpoint of this keibi-syncd ({}); give a path from the share's root, like /dir/file",
                path.display(),
                if mounts.is_empty() {
                    "it has none".to_string()
                } else {
                    mounts
                        .iter()
                        .map(|m| m.info.mountpoint.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ));
        }
    };
    let text = rest
        .to_str()
        .ok_or_else(|| format!("{}: not UTF-8", path.display()))?;
    Ok(format!("/{}", text.trim_start_matches('/')))
}

/// How the command ended.
pub struct Outcome {
    /// The JSON (and the facts for the text).
    pub report: PrefetchOutput,
    /// Paths that had no share path (the reason each).
    pub refused: Vec<String>,
    /// Why it stopped early, when it did (syncd unreachable).
    pub failed: Option<String>,
}

/// Run `prefetch` on `paths` until done or `timeout`.
pub async fn run(socket: &Path, timeout: Duration, paths: &[PathBuf], mode: Mode) -> Outcome {
    let started = Instant::now();
    let deadline = started + timeout;
    let call = |now: Instant| {
        deadline
            .saturating_duration_since(now)
            .min(crate::wait::CALL_MAX)
    };
    let mut outcome = Outcome {
        report: PrefetchOutput {
            done: false,
            waited_ms: 0,
            files: Vec::new(),
        },
        refused: Vec::new(),
        failed: None,
    };
    // One connection for the mountpoints and the first step.
    let first = async {
        let c = connect_control(socket).await.map_err(|e| e.to_string())?;
        let status = c
            .status(context_with_timeout(call(Instant::now())))
            .await
            .map_err(|e| format!("keibi-syncd did not answer: {e}"))?;
        Ok::<_, String>((c, status.mounts))
    };
    let (mut client, mounts) = match tokio::time::timeout(call(Instant::now()), first).await {
        Ok(Ok((c, m))) => (Some(c), m),
        Ok(Err(e)) => {
            outcome.failed = Some(e);
            return outcome;
        }
        Err(_) => {
            outcome.failed = Some(format!(
                "keibi-syncd did not answer on {} in time (ETIMEDOUT)",
                socket.display()
            ));
            return outcome;
        }
    };
    let mut files: Vec<PrefetchFile> = Vec::new();
    for p in paths {
        match share_path(p, &mounts) {
            Ok(path) => files.push(PrefetchFile {
                path,
                ino: None,
                size: 0,
                present_bytes: 0,
                error: None,
            }),
            Err(why) => outcome.refused.push(why),
        }
    }
    let mut progress = Progress::bytes(mode, "prefetch", 0);
    let mut seen = false;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let wanted: Vec<String> = files
            .iter()
            .filter(|f| retried(f) && !(seen && f.present_bytes >= f.size))
            .map(|f| f.path.clone())
            .collect();
        if seen && wanted.is_empty() {
            outcome.report.done = true;
            break;
        }
        if client.is_none() {
            client = match tokio::time::timeout(call(now), connect_control(socket)).await {
                Ok(Ok(c)) => Some(c),
                _ => None,
            };
        }
        if let Some(c) = &client {
            match step(c, wanted, call(Instant::now())).await {
                Ok(answers) => {
                    for a in answers {
                        if let Some(f) = files.iter_mut().find(|f| f.path == a.path) {
                            if let (Some(e), None) = (&a.error, &f.error) {
                                progress.note(&format!("{}: {e}", a.path));
                            }
                            *f = a;
                        }
                    }
                    seen = true;
                    let ok = files.iter().filter(|f| f.error.is_none());
                    let (done, total) = ok.fold((0, 0), |(d, t), f| {
                        (d + f.present_bytes.min(f.size), t + f.size)
                    });
                    progress.set_bytes(done, total);
                    if files
                        .iter()
                        .all(|f| !retried(f) || f.present_bytes >= f.size)
                    {
                        outcome.report.done = true;
                        break;
                    }
                }
                Err(_) => client = None,
            }
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep(STEP.min(deadline - now)).await;
    }
    progress.finish();
    outcome.report.done &= files.iter().all(|f| f.error.is_none());
    outcome.report.waited_ms = started.elapsed().as_millis() as u64;
    outcome.report.files = files;
    outcome
}

/// Whether `f` is still asked for: no error, or only a store that was
/// slow to answer (`ETIMEDOUT`), which the next step may not be.
fn retried(f: &PrefetchFile) -> bool {
    f.error.as_ref().is_none_or(|e| e.ends_with("(ETIMEDOUT)"))
}

async fn step(
    c: &ControlClient,
    paths: Vec<String>,
    call: Duration,
) -> Result<Vec<PrefetchFile>, String> {
    match tokio::time::timeout(call, c.prefetch(context_with_timeout(call), paths)).await {
        Ok(Ok(files)) => Ok(files),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer in time".into()),
    }
}

/// The outcome for people: one line per file.
pub fn text(report: &PrefetchOutput) -> String {
    let mut rows = vec![["PATH", "SIZE", "PRESENT", "STATE"].map(String::from)];
    for f in &report.files {
        rows.push([
            f.path.clone(),
            f.size.to_string(),
            f.present_bytes.to_string(),
            match &f.error {
                Some(e) => e.clone(),
                None if f.present_bytes >= f.size => "local".into(),
                None => "fetching".into(),
            },
        ]);
    }
    crate::render::table(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc_schema::MountInfo;

    fn mount(at: &str) -> MountStatus {
        MountStatus {
            info: MountInfo {
                mountpoint: at.into(),
                pid: 1,
                passthrough: true,
                reconnect: false,
            },
            connected_secs: 0,
            open_handles: 0,
        }
    }

    #[test]
    fn only_a_slow_store_is_asked_again() {
        let file = |error: Option<&str>| PrefetchFile {
            path: "/f".into(),
            ino: None,
            size: 1,
            present_bytes: 0,
            error: error.map(String::from),
        };
        assert!(retried(&file(None)));
        assert!(retried(&file(Some("slow (ETIMEDOUT)"))));
        assert!(!retried(&file(Some("/f: no such entry (ENOENT)"))));
    }

    #[test]
    fn paths_under_a_mount_lose_it_and_others_are_share_paths() {
        let m = [mount("/mnt/keibi")];
        assert_eq!(
            share_path(Path::new("/mnt/keibi/a/b.txt"), &m),
            Ok("/a/b.txt".into())
        );
        assert_eq!(share_path(Path::new("/mnt/keibi"), &m), Ok("/".into()));
        assert_eq!(share_path(Path::new("/docs/x"), &m), Ok("/docs/x".into()));
        // A mount inside another: the innermost wins.
        let nested = [mount("/mnt"), mount("/mnt/keibi")];
        assert_eq!(
            share_path(Path::new("/mnt/keibi/f"), &nested),
            Ok("/f".into())
        );
        let err = share_path(Path::new("relative/x"), &[]).expect_err("not under a mount");
        assert!(err.contains("it has none"), "{err}");
    }
}
