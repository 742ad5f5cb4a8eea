//! `keibictl`: the scripting and admin client of keibi-syncd's control
//! socket.
//!
//! The program is three small steps, each in its own module: [`cli`] parses
//! the command line, [`query`] asks syncd over the control socket with one
//! bound on the whole exchange (connect, handshake and call), and [`render`]
//! turns the answer into a table for people or JSON for scripts.
//!
//! `debug ops` ([`debug_ops`]) asks syncd and each named mount's mountd at
//! once; it succeeds when at least one of them answered. `debug
//! passthrough` ([`passthrough`]) asks one mount's mountd how its opens
//! were answered.
//!
//! `id` asks syncd for its peer identity ([`render::identity_text`] groups
//! the fingerprint for reading aloud).
//!
//! `check` asks syncd to scan its store ([`render::check_text`] shows the
//! report).
//!
//! `peer add|list|remove|bench` pair with other machines and show their
//! connections ([`peers`]).
//!
//! `wait` ([`wait`]) polls syncd until it answers or is in sync;
//! `prefetch` ([`prefetch`]) makes files local. Both, and `peer bench`,
//! show progress on stderr ([`progress`]).
//!
//! Every `--json` output is serde's form of one type, and [`output`]
//! derives its JSON Schema (checked in under `docs/json-schema/`).
//!
//! Exit status: 0 when the command succeeded; 1 with one line
//! `keibictl: <reason>` on stderr when syncd could not be reached, refused
//! the connection or did not answer in time, for `check` when
//! inconsistencies were found (and, with `--repair`, some are left), and
//! for `prefetch` when a path is not a file of the share; 2 for a bad
//! command line (clap's own convention), and for a bad fingerprint or
//! address in a `peer` command; 3 when a `peer` command names a peer that
//! was never added, or `peer bench` one that is not connected; 4
//! ([`EXIT_TIMEOUT`]) when `wait` or `prefetch` reached `--timeout` first.

mod cli;
mod debug_ops;
mod output;
mod passthrough;
mod peers;
mod prefetch;
mod progress;
mod query;
mod render;
mod wait;

/// Exit status: `wait` or `prefetch` reached `--timeout` first.
const EXIT_TIMEOUT: u8 = 4;

use clap::Parser;
use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    // `keibictl --generate-docs DIR`: man page and completions.
    if let Some(code) =
        clidoc::generate_if_asked(|| vec![(<cli::Args as clap::CommandFactory>::command(), "1")])
    {
        return code;
    }
    let args = cli::Args::parse();
    if let cli::Command::Peer { what } = &args.command {
        return match run_peer(&args, what) {
            Ok(()) => ExitCode::SUCCESS,
            Err(f) => {
                eprintln!("keibictl: {}", one_line(&f.reason));
                ExitCode::from(f.code)
            }
        };
    }
    if let cli::Command::JsonSchema { name } = &args.command {
        let all = output::schemas();
        let text = match name {
            None => Ok(all.iter().map(|(n, _)| format!("{n}\n")).collect()),
            Some(n) => match all.iter().find(|(have, _)| have == n) {
                Some((_, schema)) => output::to_json(schema),
                None => {
                    let names: Vec<&str> = all.iter().map(|(n, _)| *n).collect();
                    return fail(
                        2,
                        &format!("no JSON output named {n:?} (one of: {})", names.join(", ")),
                    );
                }
            },
        };
        return match text.and_then(|t| print(&t)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(1, &e),
        };
    }
    if let cli::Command::Wait { synced, json } = &args.command {
        return run_wait(&args, *synced, *json);
    }
    if let cli::Command::Prefetch { paths, json } = &args.command {
        return run_prefetch(&args, paths, *json);
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("keibictl: {}", one_line(&reason));
            ExitCode::from(1)
        }
    }
}

/// The most files `status --files` lists.
const NOT_LOCAL_LIMIT: u32 = 10_000;

/// Run the command; the error is the reason shown to the user.
fn run(args: &cli::Args) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    match &args.command {
        cli::Command::Status { json, files: true } => {
            let answer = runtime.block_on(query::not_local(
                &args.socket,
                args.timeout(),
                NOT_LOCAL_LIMIT,
            ));
            runtime.shutdown_background();
            let list = answer?;
            let text = if *json {
                render::not_local_json(&list)?
            } else {
                render::not_local_table(&list)
            };
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .map_err(|e| format!("cannot write the answer: {e}"))
        }
        cli::Command::Status { json, files: false } => {
            let answer = runtime.block_on(query::status_with_sync(&args.socket, args.timeout()));
            // A handshake stuck on a stalled syncd sits in a blocking thread
            // that would keep a plain drop of the runtime waiting; we already
            // gave up on it.
            runtime.shutdown_background();
            let (status, sync) = answer?;
            let text = if *json {
                render::status_json(&status, &sync)?
            } else {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0);
                render::status_table(&status) + &render::sync_text(&sync, now)
            };
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .map_err(|e| format!("cannot write the answer: {e}"))
        }
        cli::Command::Id { json } => {
            let answer = runtime.block_on(query::identity(&args.socket, args.timeout()));
            runtime.shutdown_background();
            let id = answer?;
            let text = if *json {
                render::identity_json(&id)?
            } else {
                render::identity_text(&id)
            };
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .map_err(|e| format!("cannot write the answer: {e}"))
        }
        cli::Command::Check { repair, json } => {
            let answer = runtime.block_on(query::check(&args.socket, args.timeout(), *repair));
            runtime.shutdown_background();
            let report = answer?;
            let text = if *json {
                render::check_json(&report)?
            } else {
                render::check_text(&report)
            };
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .map_err(|e| format!("cannot write the answer: {e}"))?;
            match report.unrepaired() {
                0 => Ok(()),
                n => Err(format!(
                    "{n} inconsistenc{} {}",
                    if n == 1 { "y" } else { "ies" },
                    if *repair {
                        "left after the repairs"
                    } else {
                        "found (`keibictl check --repair` fixes what it can)"
                    }
                )),
            }
        }
        cli::Command::Peer { .. }
        | cli::Command::Wait { .. }
        | cli::Command::Prefetch { .. }
        | cli::Command::JsonSchema { .. } => {
            Err("internal: this command has its own runner".into())
        }
        cli::Command::Debug {
            what:
                cli::DebugCommand::Ops {
                    mounts,
                    mountd_sockets,
                    lock_dir,
                    json,
                },
        } => {
            let targets = debug_ops::Targets {
                mounts: mounts.clone(),
                sockets: mountd_sockets.clone(),
                lock_dir: lock_dir.clone(),
            };
            let report =
                runtime.block_on(debug_ops::gather(&args.socket, &targets, args.timeout()));
            runtime.shutdown_background();
            print_debug_ops(&report, *json)
        }
        cli::Command::Debug {
            what:
                cli::DebugCommand::Passthrough {
                    mount,
                    mountd_socket,
                    lock_dir,
                    json,
                },
        } => {
            let sock = passthrough::socket(mount.as_deref(), mountd_socket.as_deref(), lock_dir);
            let answer = runtime.block_on(passthrough::ask(&sock, args.timeout()));
            runtime.shutdown_background();
            let status = answer?;
            let text = if *json {
                passthrough::json(&status)?
            } else {
                passthrough::table(&status)
            };
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .map_err(|e| format!("cannot write the answer: {e}"))
        }
    }
}

/// Run a `peer` command; the error carries its exit status.
fn run_peer(args: &cli::Args, what: &cli::PeerCommand) -> Result<(), peers::Failure> {
    use cli::PeerCommand;
    let failed = |reason: String| peers::Failure { code: 1, reason };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failed(format!("cannot start the async runtime: {e}")))?;
    let (socket, timeout) = (args.socket.as_path(), args.timeout());
    let text = match what {
        PeerCommand::Add {
            fingerprint,
            addr,
            name,
            json,
        } => {
            let answer = runtime.block_on(peers::add(
                socket,
                timeout,
                fingerprint.clone(),
                addr.clone(),
                name.clone(),
            ));
            runtime.shutdown_background();
            let p = answer?;
            if *json {
                output::to_json(&p).map_err(failed)?
            } else {
                peers::one_text("added:", &p)
            }
        }
        PeerCommand::List { json } => {
            let answer = runtime.block_on(peers::list(socket, timeout));
            runtime.shutdown_background();
            let list = answer?;
            if *json {
                output::to_json(&list).map_err(failed)?
            } else {
                peers::table(&list, peers::now_unix_ms())
            }
        }
        PeerCommand::Remove { fingerprint, json } => {
            let answer = runtime.block_on(peers::remove(socket, timeout, fingerprint.clone()));
            runtime.shutdown_background();
            let p = answer?;
            if *json {
                output::to_json(&p).map_err(failed)?
            } else {
                peers::one_text("removed (its connection is closed):", &p)
            }
        }
        PeerCommand::Bench {
            fingerprint,
            bytes,
            streams,
            time_limit,
            json,
        } => {
            let answer = runtime.block_on(peers::bench_watched(
                socket,
                *time_limit,
                fingerprint.clone(),
                *bytes,
                *streams,
                progress::Mode::pick(*json),
            ));
            runtime.shutdown_background();
            let r = answer?;
            if *json {
                output::to_json(&r).map_err(failed)?
            } else {
                peers::bench_text(&r)
            }
        }
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| failed(format!("cannot write the answer: {e}")))
}

/// Write `text` to stdout.
fn print(text: &str) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| format!("cannot write the answer: {e}"))
}

/// The reason on stderr and `code`.
fn fail(code: u8, reason: &str) -> ExitCode {
    eprintln!("keibictl: {}", one_line(reason));
    ExitCode::from(code)
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// `wait`: 0 when done, 1 when syncd refused the connection, 4 at the
/// timeout (the JSON, with `--json`, in every case).
fn run_wait(args: &cli::Args, synced: bool, json: bool) -> ExitCode {
    let runtime = match runtime() {
        Ok(r) => r,
        Err(e) => return fail(1, &e),
    };
    let timeout = args.timeout();
    let outcome = runtime.block_on(wait::run(
        &args.socket,
        timeout,
        synced,
        progress::Mode::pick(json),
    ));
    runtime.shutdown_background();
    let r = &outcome.report;
    let text = if json {
        output::to_json(r)
    } else if r.done {
        Ok(match (synced, r.not_waited_for.len()) {
            (false, _) => "keibi-syncd answers\n".to_string(),
            (true, 0) => "in sync\n".to_string(),
            (true, n) => format!("in sync with every connected peer ({n} not connected)\n"),
        })
    } else {
        Ok(String::new())
    };
    if let Err(e) = text.and_then(|t| print(&t)) {
        return fail(1, &e);
    }
    if r.done {
        ExitCode::SUCCESS
    } else if outcome.refused {
        fail(1, r.pending.as_deref().unwrap_or("refused"))
    } else {
        fail(
            EXIT_TIMEOUT,
            &format!(
                "timed out after {}: {}",
                humantime::format_duration(timeout),
                r.pending.as_deref().unwrap_or("not done")
            ),
        )
    }
}

/// `prefetch`: 0 when every file is local, 1 when a path is not a file of
/// the share or syncd cannot be reached, 4 at the timeout.
fn run_prefetch(args: &cli::Args, paths: &[std::path::PathBuf], json: bool) -> ExitCode {
    let runtime = match runtime() {
        Ok(r) => r,
        Err(e) => return fail(1, &e),
    };
    let timeout = args.timeout();
    let outcome = runtime.block_on(prefetch::run(
        &args.socket,
        timeout,
        paths,
        progress::Mode::pick(json),
    ));
    runtime.shutdown_background();
    if let Some(why) = &outcome.failed {
        return fail(1, why);
    }
    for why in &outcome.refused {
        eprintln!("keibictl: {}", one_line(why));
    }
    let r = &outcome.report;
    let text = if json {
        output::to_json(r)
    } else {
        Ok(prefetch::text(r))
    };
    if let Err(e) = text.and_then(|t| print(&t)) {
        return fail(1, &e);
    }
    let errors = r.files.iter().filter(|f| f.error.is_some()).count() + outcome.refused.len();
    let missing: u64 = r
        .files
        .iter()
        .filter(|f| f.error.is_none())
        .map(|f| f.size.saturating_sub(f.present_bytes))
        .sum();
    // Not done: files still missing, or no answer at all before the
    // deadline, is the timeout; done but for refused paths is 1.
    if !r.done && (missing > 0 || errors == 0) {
        fail(
            EXIT_TIMEOUT,
            &format!(
                "timed out after {}: {} still missing (are peers connected? see `keibictl status`)",
                humantime::format_duration(timeout),
                progress::size(missing)
            ),
        )
    } else if errors > 0 {
        fail(1, &format!("{errors} path(s) could not be fetched"))
    } else {
        ExitCode::SUCCESS
    }
}

/// Print `debug ops`: tables (or JSON) on stdout; with JSON, the sources
/// that did not answer are named on stderr. Fails when none answered.
fn print_debug_ops(report: &debug_ops::Report, json: bool) -> Result<(), String> {
    let text = if json {
        for line in debug_ops::failures(report) {
            eprintln!("keibictl: {}", one_line(&line));
        }
        debug_ops::json(report)?
    } else {
        debug_ops::table(report)
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| format!("cannot write the answer: {e}"))?;
    if report.any_answer() {
        Ok(())
    } else {
        Err("no source answered".into())
    }
}

/// Scripts read the reason as one line: fold any newline the server or an
/// error chain put into it.
fn one_line(reason: &str) -> String {
    reason.split_whitespace().collect::<Vec<_>>().join(" ")
}
