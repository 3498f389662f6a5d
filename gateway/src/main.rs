//! The `outpost` binary: parse the command line, hand over to the library.

use std::process::ExitCode;

use clap::Parser;

/// mimalloc, not glibc's malloc: readings held for a checkpoint keep thousands of small blocks
/// alive across turns, where glibc's slow paths showed in the profile and mimalloc measured
/// cheaper; why and the figures are in the workspace Cargo.toml. The library's unit tests keep the system allocator; the end-to-end
/// tests run this binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    outpost::cli::main(outpost::cli::Cli::parse())
}
