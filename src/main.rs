//! `elpis-server`: parse the command line, load the configuration, run.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = elpis::cli::Cli::parse();
    match elpis::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One clear line on stderr, even when logs go to a file.
            elpis::logging::say(&format!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}
