//! `keibictl`: the scripting and admin client of keibi-syncd's control
//! socket.
//!
//! The program is three small steps, each in its own module: [`cli`] parses
//! the command line, [`query`] asks syncd over the control socket with one
//! bound on the whole exchange (connect, handshake and call), and [`render`]
//! turns the answer into a table for people or JSON for scripts.
//!
//! Exit status: 0 when the command succeeded; 1 with one line
//! `keibictl: <reason>` on stderr when syncd could not be reached, refused
//! the connection or did not answer in time; 2 for a bad command line
//! (clap's own convention).

mod cli;
mod query;
mod render;

use clap::Parser;
use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("keibictl: {}", one_line(&reason));
            ExitCode::from(1)
        }
    }
}

/// Run the command; the error is the reason shown to the user.
fn run(args: &cli::Args) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let answer = match &args.command {
        cli::Command::Status { .. } => runtime.block_on(query::status(&args.socket, args.timeout)),
    };
    // A handshake stuck on a stalled syncd sits in a blocking thread that
    // would keep a plain drop of the runtime waiting; we already gave up on it.
    runtime.shutdown_background();
    match &args.command {
        cli::Command::Status { json } => {
            let status = answer?;
            let text = if *json {
                render::status_json(&status)?
            } else {
                render::status_table(&status)
            };
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .map_err(|e| format!("cannot write the answer: {e}"))
        }
    }
}

/// Scripts read the reason as one line: fold any newline the server or an
/// error chain put into it.
fn one_line(reason: &str) -> String {
    reason.split_whitespace().collect::<Vec<_>>().join(" ")
}
