//! The `darwin-vz-nix` command: parses arguments, resolves configuration, and runs one
//! command. Each command is a thin client of the library.

mod args;
mod bootstrap;
mod commands;

use std::process::ExitCode;

use clap::Parser;

pub use args::{Cli, Command, GlobalArgs, VmArgs};

/// What went wrong, and which exit status it gets.
#[derive(Debug)]
pub enum CliError {
    /// Bad arguments or configuration: exit 2.
    Usage(String),
    /// Something failed while running: exit 1.
    Failure(String),
    /// No supervisor answers (for `status`): exit 3.
    NotRunning(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Failure(_) => 1,
            CliError::Usage(_) => 2,
            CliError::NotRunning(_) => 3,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            CliError::Usage(m) | CliError::Failure(m) | CliError::NotRunning(m) => m,
        }
    }
}

impl From<crate::config::ConfigErrors> for CliError {
    fn from(e: crate::config::ConfigErrors) -> Self {
        CliError::Usage(e.to_string())
    }
}

impl From<crate::control::ClientError> for CliError {
    fn from(e: crate::control::ClientError) -> Self {
        CliError::Failure(e.to_string())
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match commands::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // `status` prints its own "not running" report.
            if !matches!(e, CliError::NotRunning(_)) || !e.message().is_empty() {
                eprintln!("darwin-vz-nix: {}", e.message());
            }
            ExitCode::from(e.exit_code())
        }
    }
}
