//! How OpenSSH reaches the guest: a `Host` block whose `ProxyCommand` is
//! `darwin-vz-nix proxy`, with the guest's host key pinned under a fixed alias.
//!
//! The same text is produced by `nix/lib.nix` (`sshConfig`) for nix-darwin; a test
//! compares the two, so change both together.
//!
//! The block answers two names: the builder's alias, which Nix's machines line uses
//! for aarch64-linux, and [`X86_ALIAS`] for the other systems (x86_64-linux through
//! Rosetta). The ProxyCommand passes the name ssh was asked for (`%n`): while the
//! first guest is built, the bootstrap builder may answer the first (it builds
//! aarch64-linux), never the second (see `crate::bootstrap`). Both pin host keys
//! under the one alias: the guest's in `known_hosts`, and the bootstrap builder's in
//! `bootstrap_known_hosts`, which exists only while it runs.
//!
//! Every value that reaches ssh — in the printed block or on its command line — is
//! checked here, in `SshTarget::options`, whichever layer it came from (config file,
//! environment, `--ssh-user`, `ssh -l`, `ssh-config --user`, paths): a newline in a
//! user name would otherwise start a new ssh_config line (`ProxyCommand …`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::contract;
use crate::state::StateDir;

/// The second name of the builder's Host block: the machines line for every system
/// but aarch64-linux connects through it, which only the guest answers.
pub const X86_ALIAS: &str = "darwin-vz-nix-x86";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SshConfigError {
    #[error("{} contains {found:?}, which cannot be written into ssh_config (ssh hands ProxyCommand to `sh -c`); choose a path without \", newline, $, ` or \\", path.display())]
    Unquotable { path: PathBuf, found: char },
    #[error("{} is not valid UTF-8, so ssh_config cannot name it; choose a path whose name is UTF-8", path.display())]
    NotUtf8 { path: PathBuf },
    #[error("user {0}")]
    BadUser(String),
}

/// Checks a guest user name: the only form that can reach ssh (`User …`, `-l`).
/// The message starts with the value, to follow the name of the input it came from.
pub fn check_user(user: &str) -> Result<(), String> {
    let max = crate::config::ranges::SSH_USER_BYTES;
    // Not `-…`: ssh would read it as an option.
    if crate::config::is_account_name(user, max) && !user.starts_with('-') {
        Ok(())
    } else {
        Err(format!(
            "{user:?} is not a user name; use letters, digits, `_`, `-` or `.` (at most {max} characters, not starting with `-`)"
        ))
    }
}

/// Everything the `Host` block is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    /// The `darwin-vz-nix` binary that ssh runs as `ProxyCommand`.
    pub proxy_bin: PathBuf,
    pub state_dir: PathBuf,
    pub user: String,
}

/// One ssh_config option: keyword and value as ssh parses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshOption {
    pub keyword: &'static str,
    pub value: String,
}

impl SshTarget {
    /// The options, in the order they are written: those of the Host block, whose
    /// ProxyCommand says which of its names ssh was asked for.
    pub fn options(&self) -> Result<Vec<SshOption>, SshConfigError> {
        self.options_for(true)
    }

    /// `with_alias`: the ProxyCommand passes `--alias %n` (the Host block, for
    /// Nix); without it the proxy reaches the guest only (`darwin-vz-nix ssh`).
    fn options_for(&self, with_alias: bool) -> Result<Vec<SshOption>, SshConfigError> {
        check_user(&self.user).map_err(SshConfigError::BadUser)?;
        let state = StateDir::new(&self.state_dir);
        let option = |keyword, value: String| SshOption { keyword, value };
        Ok(vec![
            option("User", self.user.clone()),
            option("HostKeyAlias", contract::HOST_KEY_ALIAS.to_string()),
            // ssh takes the guest stream's descriptor from the proxy and uses it
            // directly: no byte is copied on the way (see proxy.rs).
            option(
                "ProxyCommand",
                format!(
                    "{} proxy --fdpass --state-dir {}{}",
                    quote(&self.proxy_bin)?,
                    quote(&self.state_dir)?,
                    if with_alias { " --alias %n" } else { "" }
                ),
            ),
            option("ProxyUseFdpass", "yes".into()),
            option(
                "UserKnownHostsFile",
                format!(
                    "{} {}",
                    quote(&state.known_hosts())?,
                    quote(&state.bootstrap_known_hosts())?
                ),
            ),
            option("IdentityFile", quote(&state.client_key())?),
            option("IdentitiesOnly", "yes".into()),
            option("StrictHostKeyChecking", "yes".into()),
            // No connection sharing: a master that lingers (`ControlPersist yes` in
            // a `Host *` block) would hold a session open and keep the VM from its
            // idle poweroff, and its socket would let others in (see README).
            option("ControlMaster", "no".into()),
            option("ControlPath", "none".into()),
        ])
    }

    /// The `Host` block for `ssh_config` (what `darwin-vz-nix ssh-config` prints).
    pub fn config_block(&self) -> Result<String, SshConfigError> {
        let mut text = format!("Host {} {X86_ALIAS}\n", contract::HOST_KEY_ALIAS);
        for SshOption { keyword, value } in self.options()? {
            text.push_str(&format!("  {keyword} {value}\n"));
        }
        Ok(text)
    }

    /// Arguments for `ssh` that need no config file: `-F /dev/null` keeps the user's
    /// and the system's configuration (ControlMaster, `Host *` …) out of the way.
    pub fn ssh_args(&self, command: &[OsString]) -> Result<Vec<OsString>, SshConfigError> {
        let mut args: Vec<OsString> = vec!["-F".into(), "/dev/null".into()];
        for SshOption { keyword, value } in self.options_for(false)? {
            args.push("-o".into());
            args.push(format!("{keyword}={value}").into());
        }
        args.push(contract::HOST_KEY_ALIAS.into());
        if !command.is_empty() {
            args.push("--".into());
            args.extend(command.iter().cloned());
        }
        Ok(args)
    }
}

/// Characters a quoted path cannot carry: `"` and line breaks end the ssh_config
/// argument; `$`, backquote and backslash keep their meaning inside the double quotes
/// that `sh -c` sees in ProxyCommand. The same set as `sshConfigForbidden` in nix/lib.nix.
pub const FORBIDDEN_IN_PATHS: [char; 6] = ['"', '\n', '\r', '$', '`', '\\'];

/// Quotes a path for ssh_config: double quotes for spaces, `%%` because ssh expands
/// `%` tokens in these options.
fn quote(path: &Path) -> Result<String, SshConfigError> {
    // A lossy conversion would print a path that does not exist.
    let Some(text) = path.to_str() else {
        return Err(SshConfigError::NotUtf8 {
            path: path.to_path_buf(),
        });
    };
    if let Some(found) = text.chars().find(|c| FORBIDDEN_IN_PATHS.contains(c)) {
        return Err(SshConfigError::Unquotable {
            path: path.to_path_buf(),
            found,
        });
    }
    Ok(format!("\"{}\"", text.replace('%', "%%")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(state_dir: &str) -> SshTarget {
        SshTarget {
            proxy_bin: "/nix/store/x-darwin-vz-nix/bin/darwin-vz-nix".into(),
            state_dir: state_dir.into(),
            user: "builder".into(),
        }
    }

    #[test]
    fn the_host_block_is_exact() {
        assert_eq!(
            target("/var/lib/darwin-vz").config_block().unwrap(),
            "Host darwin-vz-nix darwin-vz-nix-x86\n\
             \x20 User builder\n\
             \x20 HostKeyAlias darwin-vz-nix\n\
             \x20 ProxyCommand \"/nix/store/x-darwin-vz-nix/bin/darwin-vz-nix\" proxy --fdpass --state-dir \"/var/lib/darwin-vz\" --alias %n\n\
             \x20 ProxyUseFdpass yes\n\
             \x20 UserKnownHostsFile \"/var/lib/darwin-vz/keys/known_hosts\" \"/var/lib/darwin-vz/keys/bootstrap_known_hosts\"\n\
             \x20 IdentityFile \"/var/lib/darwin-vz/keys/client_ed25519\"\n\
             \x20 IdentitiesOnly yes\n\
             \x20 StrictHostKeyChecking yes\n\
             \x20 ControlMaster no\n\
             \x20 ControlPath none\n"
        );
    }

    #[test]
    fn spaces_are_quoted_and_percent_escaped() {
        let block = target("/Users/a b/100%").config_block().unwrap();
        assert!(
            block.contains("IdentityFile \"/Users/a b/100%%/keys/client_ed25519\""),
            "{block}"
        );
        let err = target("/tmp/a$b").config_block().unwrap_err();
        assert_eq!(
            err.to_string(),
            "/tmp/a$b contains '$', which cannot be written into ssh_config (ssh hands ProxyCommand to `sh -c`); choose a path without \", newline, $, ` or \\"
        );
        for bad in ["/tmp/a\"b", "/tmp/a\nb", "/tmp/a`b", "/tmp/a\\b"] {
            assert!(target(bad).config_block().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_user_that_could_inject_an_option_is_refused_in_the_block_and_the_arguments() {
        let mut bad = target("/s");
        bad.user = "builder\n  ProxyCommand sh -c 'touch /tmp/pwned'".into();
        let err = bad.config_block().unwrap_err();
        assert_eq!(
            err.to_string(),
            "user \"builder\\n  ProxyCommand sh -c 'touch /tmp/pwned'\" is not a user name; use letters, digits, `_`, `-` or `.` (at most 32 characters, not starting with `-`)"
        );
        assert!(bad.ssh_args(&[]).is_err());
        for user in ["", "-oProxyCommand=x", "a b", "a=b", &"u".repeat(33)] {
            assert!(check_user(user).is_err(), "{user:?}");
        }
        for user in ["builder", "_darwin-vz", "a.b-c_d", &"u".repeat(32)] {
            assert!(check_user(user).is_ok(), "{user:?}");
        }
    }

    #[test]
    fn a_path_that_is_not_utf8_is_refused_not_printed_lossily() {
        use std::os::unix::ffi::OsStrExt;
        let mut bad = target("/s");
        bad.state_dir = PathBuf::from(std::ffi::OsStr::from_bytes(b"/tmp/st\xffate"));
        let err = bad.config_block().unwrap_err();
        assert!(matches!(err, SshConfigError::NotUtf8 { .. }), "{err}");
    }

    #[test]
    fn ssh_args_isolate_from_other_config_and_pass_the_command() {
        let args = target("/s")
            .ssh_args(&["echo".into(), "ok".into()])
            .unwrap();
        let args: Vec<String> = args.into_iter().map(|a| a.into_string().unwrap()).collect();
        assert_eq!(&args[..2], ["-F", "/dev/null"]);
        assert!(args.contains(&"StrictHostKeyChecking=yes".to_string()));
        // `darwin-vz-nix ssh` reaches the guest only, never the bootstrap builder.
        let proxy = args
            .iter()
            .find(|a| a.starts_with("ProxyCommand="))
            .unwrap();
        assert!(!proxy.contains("--alias"), "{proxy}");
        assert_eq!(
            &args[args.len() - 4..],
            ["darwin-vz-nix", "--", "echo", "ok"]
        );
    }
}
