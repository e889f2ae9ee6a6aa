//! What Nix says while it realises the guest, read from `--log-format internal-json`.
//!
//! Each line on stderr is `@nix {json}`: activities start and stop (`id`, `type`),
//! and report results against their `id`. The types used here are the same from Nix
//! 2.18 to today (`logging.hh`): activity 104 counts the derivations to build,
//! 103 the paths to fetch (substitutions), 105 is one build (`fields`: the
//! derivation and the machine); result 105 is progress `[done, expected, running,
//! failed]` of its activity, 101 a line of a build's log. `msg` lines are Nix's own
//! messages, level 0 an error. Everything becomes a readable line for the build log
//! and counts for `status`.

use std::collections::HashMap;

use serde::Deserialize;

const ACT_COPY_PATHS: u64 = 103;
const ACT_BUILDS: u64 = 104;
const ACT_BUILD: u64 = 105;
const RES_BUILD_LOG_LINE: u64 = 101;
const RES_PROGRESS: u64 = 105;
/// Nix's verbosity levels: 0 error, 1 warning, 2 notice, 3 info.
const LEVEL_INFO: u64 = 3;

/// Counts and the last words, as they stand.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub builds_done: u64,
    pub builds_expected: u64,
    pub builds_running: u64,
    pub fetched: u64,
    pub fetches_expected: u64,
    /// The build started last: derivation name, and where it runs when not here.
    pub current: Option<String>,
    /// The last error Nix printed (ANSI colours removed).
    pub last_error: Option<String>,
    /// Nix could not reach a binary cache (its warnings said so).
    pub network_trouble: bool,
}

impl Progress {
    /// `3 of 41 derivations built, 120 of 800 paths fetched (building etc on
    /// ssh-ng://…)`, or `starting` before Nix counted anything.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.builds_expected > 0 {
            parts.push(format!(
                "{} of {} derivations built",
                self.builds_done, self.builds_expected
            ));
        }
        if self.fetches_expected > 0 {
            parts.push(format!(
                "{} of {} paths fetched",
                self.fetched, self.fetches_expected
            ));
        }
        let mut text = if parts.is_empty() {
            "starting".to_string()
        } else {
            parts.join(", ")
        };
        if let Some(current) = &self.current
            && self.builds_running > 0
        {
            text.push_str(&format!(" (building {current})"));
        }
        text
    }
}

#[derive(Debug, Deserialize)]
struct Line {
    action: String,
    id: Option<u64>,
    #[serde(rename = "type")]
    kind: Option<u64>,
    level: Option<u64>,
    text: Option<String>,
    msg: Option<String>,
    raw_msg: Option<String>,
    #[serde(default)]
    fields: Vec<serde_json::Value>,
}

/// Folds Nix's lines into [`Progress`].
#[derive(Debug, Default)]
pub struct Parser {
    /// Activity id → type, for the activities whose results count.
    activities: HashMap<u64, u64>,
    progress: Progress,
}

impl Parser {
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// Reads one line of stderr; returns what the build log should say for it.
    pub fn line(&mut self, line: &str) -> Option<String> {
        let Some(json) = line.strip_prefix("@nix ") else {
            // Not JSON (Nix prints some things before its logger is set up).
            let text = strip_ansi(line);
            self.note_message(&text, None);
            return (!text.trim().is_empty()).then_some(text);
        };
        let Ok(line) = serde_json::from_str::<Line>(json) else {
            return Some(strip_ansi(json));
        };
        match line.action.as_str() {
            "start" => self.start(&line),
            "stop" => {
                if let Some(id) = line.id
                    && self.activities.remove(&id) == Some(ACT_BUILD)
                {
                    self.progress.builds_running = self.progress.builds_running.saturating_sub(1);
                }
                None
            }
            "result" => self.result(&line),
            "msg" => {
                let text = strip_ansi(line.msg.as_deref().unwrap_or_default());
                let raw = line.raw_msg.as_deref().map(strip_ansi);
                self.note_message(raw.as_deref().unwrap_or(&text), line.level);
                (line.level.unwrap_or(0) <= LEVEL_INFO).then_some(text)
            }
            _ => None,
        }
    }

    fn start(&mut self, line: &Line) -> Option<String> {
        let (Some(id), Some(kind)) = (line.id, line.kind) else {
            return None;
        };
        if matches!(kind, ACT_BUILDS | ACT_COPY_PATHS | ACT_BUILD) {
            self.activities.insert(id, kind);
        }
        if kind == ACT_BUILD {
            let drv = line.fields.first().and_then(|f| f.as_str()).unwrap_or("");
            let machine = line.fields.get(1).and_then(|f| f.as_str()).unwrap_or("");
            let name = super::nix::short_name(std::path::Path::new(drv));
            self.progress.current = Some(if machine.is_empty() {
                name
            } else {
                format!("{name} on {machine}")
            });
            self.progress.builds_running = self.progress.builds_running.saturating_add(1);
        }
        let text = strip_ansi(line.text.as_deref().unwrap_or_default());
        (line.level.unwrap_or(u64::MAX) <= LEVEL_INFO && !text.is_empty()).then_some(text)
    }

    fn result(&mut self, line: &Line) -> Option<String> {
        let kind = line.kind?;
        let activity = line.id.and_then(|id| self.activities.get(&id).copied());
        match (kind, activity) {
            (RES_PROGRESS, Some(ACT_BUILDS)) => {
                let [done, expected, _, _] = numbers(&line.fields);
                self.progress.builds_done = done;
                self.progress.builds_expected = expected;
                None
            }
            (RES_PROGRESS, Some(ACT_COPY_PATHS)) => {
                let [done, expected, _, _] = numbers(&line.fields);
                self.progress.fetched = done;
                self.progress.fetches_expected = expected;
                None
            }
            (RES_BUILD_LOG_LINE, _) => {
                let text = line.fields.first().and_then(|f| f.as_str())?;
                Some(strip_ansi(text))
            }
            _ => None,
        }
    }

    fn note_message(&mut self, text: &str, level: Option<u64>) {
        let lower = text.to_ascii_lowercase();
        if NETWORK_SIGNS.iter().any(|sign| lower.contains(sign)) {
            self.progress.network_trouble = true;
        }
        let is_error = level == Some(0) || (level.is_none() && lower.starts_with("error:"));
        if is_error {
            let text = text.trim();
            let text = text.strip_prefix("error:").unwrap_or(text).trim();
            self.progress.last_error = Some(text.to_string());
        }
    }
}

/// What Nix (curl) says when it cannot reach a cache.
const NETWORK_SIGNS: [&str; 5] = [
    "unable to download",
    "couldn't resolve host",
    "could not resolve host",
    "failed to connect",
    "network is unreachable",
];

/// The first four numbers of a result's fields (missing ones are 0).
fn numbers(fields: &[serde_json::Value]) -> [u64; 4] {
    let mut out = [0u64; 4];
    for (slot, field) in out.iter_mut().zip(fields) {
        *slot = field.as_u64().unwrap_or(0);
    }
    out
}

/// Removes terminal colour sequences (`ESC [ … m`) that Nix puts in its messages.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Why a realisation failed, as one line with the command that fixes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// No binary cache could be reached, so what should have been fetched was not.
    Network,
    /// Nix has no machine for a system (`a 'aarch64-linux' … is required to build`).
    NoBuilder {
        system: String,
    },
    /// A build ran and failed.
    BuildFailed {
        drv: String,
    },
    Other,
}

impl Cause {
    /// Classifies what Nix said last.
    pub fn of(progress: &Progress) -> Cause {
        let error = progress.last_error.as_deref().unwrap_or_default();
        if let Some(rest) = error.strip_prefix("builder for '")
            && let Some((drv, _)) = rest.split_once('\'')
        {
            return Cause::BuildFailed {
                drv: drv.to_string(),
            };
        }
        if progress.network_trouble {
            return Cause::Network;
        }
        if error.contains("is required to build") {
            let system = error
                .strip_prefix("a '")
                .and_then(|rest| rest.split_once('\''))
                .map_or_else(|| "aarch64-linux".to_string(), |(s, _)| s.to_string());
            return Cause::NoBuilder { system };
        }
        Cause::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Nix 2.8 printed here for a derivation whose second build fails
    /// (`nix-store --realise … --log-format internal-json`), trimmed, with the
    /// second build's machine field set as a remote build reports it.
    const FAILING_BUILD: &str = r#"@nix {"action":"msg","level":3,"msg":"these 2 derivations will be built:"}
@nix {"action":"start","id":10,"level":0,"text":"","type":102}
@nix {"action":"start","id":11,"level":0,"text":"","type":104}
@nix {"action":"start","id":12,"level":0,"text":"","type":103}
@nix {"action":"result","fields":[0,2,0,0],"id":11,"type":105}
@nix {"action":"result","fields":[0,0,0,0],"id":12,"type":105}
@nix {"action":"start","fields":["/nix/store/awsikf9h6si2396zcf8x4ndbf9d99bl5-dep-a.drv","",1,1],"id":14,"level":3,"text":"building '/nix/store/awsikf9h6si2396zcf8x4ndbf9d99bl5-dep-a.drv'","type":105}
@nix {"action":"result","fields":[0,2,1,0],"id":11,"type":105}
@nix {"action":"result","fields":["building a"],"id":14,"type":101}
@nix {"action":"result","fields":[1,2,0,0],"id":11,"type":105}
@nix {"action":"stop","id":14}
@nix {"action":"start","fields":["/nix/store/jr6f07qjrk5ixswmyy03hl6iy4ky1sgg-top.drv","ssh-ng://builder@darwin-vz-nix",1,1],"id":15,"level":3,"text":"building '/nix/store/jr6f07qjrk5ixswmyy03hl6iy4ky1sgg-top.drv' on 'ssh-ng://builder@darwin-vz-nix'","type":105}
@nix {"action":"result","fields":[1,2,1,0],"id":11,"type":105}
@nix {"action":"result","fields":["sh: 1: mkdir: not found"],"id":15,"type":101}"#;

    const FAILED: &str = r#"@nix {"action":"result","fields":[1,2,0,1],"id":11,"type":105}
@nix {"action":"stop","id":15}
@nix {"action":"msg","column":null,"file":null,"level":0,"line":null,"msg":"\u001b[31;1merror:\u001b[0m builder for '\u001b[35;1m/nix/store/jr6f07qjrk5ixswmyy03hl6iy4ky1sgg-top.drv\u001b[0m' failed with exit code 127","raw_msg":"builder for '\u001b[35;1m/nix/store/jr6f07qjrk5ixswmyy03hl6iy4ky1sgg-top.drv\u001b[0m' failed with exit code 127"}"#;

    #[test]
    fn counts_builds_and_names_the_running_one() {
        let mut parser = Parser::default();
        let log: Vec<String> = FAILING_BUILD
            .lines()
            .filter_map(|l| parser.line(l))
            .collect();
        assert_eq!(
            parser.progress().describe(),
            "1 of 2 derivations built (building top on ssh-ng://builder@darwin-vz-nix)"
        );
        assert_eq!(
            log,
            [
                "these 2 derivations will be built:",
                "building '/nix/store/awsikf9h6si2396zcf8x4ndbf9d99bl5-dep-a.drv'",
                "building a",
                "building '/nix/store/jr6f07qjrk5ixswmyy03hl6iy4ky1sgg-top.drv' on 'ssh-ng://builder@darwin-vz-nix'",
                "sh: 1: mkdir: not found",
            ]
        );
        for line in FAILED.lines() {
            parser.line(line);
        }
        assert_eq!(
            parser.progress().last_error.as_deref(),
            Some(
                "builder for '/nix/store/jr6f07qjrk5ixswmyy03hl6iy4ky1sgg-top.drv' failed with exit code 127"
            )
        );
        assert_eq!(
            Cause::of(parser.progress()),
            Cause::BuildFailed {
                drv: "/nix/store/jr6f07qjrk5ixswmyy03hl6iy4ky1sgg-top.drv".into()
            }
        );
        assert_eq!(parser.progress().describe(), "1 of 2 derivations built");
    }

    #[test]
    fn no_builder_and_no_network_are_told_apart() {
        // What Nix 2.8 printed for an aarch64-linux derivation on a machine with no
        // builder for it.
        let no_builder = r#"@nix {"action":"msg","column":null,"file":null,"level":0,"line":null,"msg":"\u001b[31;1merror:\u001b[0m a '\u001b[35;1maarch64-linux\u001b[0m' with features {\u001b[35;1m\u001b[0m} is required to build '\u001b[35;1m/nix/store/iw13j3xxa5d125yy8c4dapr26za3swnl-linux-only.drv\u001b[0m', but I am a '\u001b[35;1mx86_64-linux\u001b[0m' with features {\u001b[35;1mbenchmark, big-parallel, kvm, nixos-test\u001b[0m}","raw_msg":"a '\u001b[35;1maarch64-linux\u001b[0m' with features {\u001b[35;1m\u001b[0m} is required to build '\u001b[35;1m/nix/store/iw13j3xxa5d125yy8c4dapr26za3swnl-linux-only.drv\u001b[0m', but I am a '\u001b[35;1mx86_64-linux\u001b[0m' with features {\u001b[35;1mbenchmark, big-parallel, kvm, nixos-test\u001b[0m}"}"#;
        let mut parser = Parser::default();
        parser.line(no_builder);
        assert_eq!(
            Cause::of(parser.progress()),
            Cause::NoBuilder {
                system: "aarch64-linux".into()
            }
        );
        // Offline, the same error follows warnings that no cache answered: the
        // cause is the network.
        let mut parser = Parser::default();
        parser.line(r#"@nix {"action":"msg","level":1,"msg":"\u001b[35;1mwarning:\u001b[0m unable to download 'https://cache.nixos.org/nix-cache-info': Couldn't resolve host name (6)","raw_msg":"unable to download 'https://cache.nixos.org/nix-cache-info': Couldn't resolve host name (6)"}"#);
        parser.line(no_builder);
        assert_eq!(Cause::of(parser.progress()), Cause::Network);
    }

    #[test]
    fn fetches_count_and_plain_lines_pass_through() {
        let mut parser = Parser::default();
        parser.line(r#"@nix {"action":"start","id":7,"level":0,"text":"","type":103}"#);
        parser.line(r#"@nix {"action":"result","fields":[120,800,3,0],"id":7,"type":105}"#);
        assert_eq!(parser.progress().describe(), "120 of 800 paths fetched");
        assert_eq!(
            parser
                .line("error: cannot connect to socket at '/nix/var/nix/daemon-socket/socket'")
                .as_deref(),
            Some("error: cannot connect to socket at '/nix/var/nix/daemon-socket/socket'")
        );
        assert_eq!(
            Cause::of(parser.progress()),
            Cause::Other,
            "{:?}",
            parser.progress()
        );
        assert_eq!(
            parser.progress().last_error.as_deref(),
            Some("cannot connect to socket at '/nix/var/nix/daemon-socket/socket'")
        );
        assert_eq!(Parser::default().progress().describe(), "starting");
        assert_eq!(strip_ansi("\u{1b}[31;1merror:\u{1b}[0m x"), "error: x");
    }
}
