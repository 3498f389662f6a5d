//! The `outpost` binary: parse the command line, hand over to the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    outpost::cli::main(outpost::cli::Cli::parse())
}
