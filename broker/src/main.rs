//! The `portcullis` command: the broker and its client tools.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    portcullis_broker::cli::main()
}
