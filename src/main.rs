//! The `darwin-vz-nix` binary: everything lives in the library; see `cli`.

fn main() -> std::process::ExitCode {
    darwin_vz_nix::cli::main()
}
