//! The guest's own account of its boot: systemd's `systemd-analyze time`, which the
//! guest prints to its console once the boot has finished, on a line starting with
//! `contract::CONSOLE_MARKER_BOOT_TIMING` (nix/nixos/scripts/boot-timing.sh):
//!
//! ```text
//! darwin-vz-nix-boot-timing: Startup finished in 812ms (kernel) + 1.201s (initrd) + 1.954s (userspace) = 3.968s (system running)
//! ```
//!
//! The host reads it from the tail of `console.log` to show where a boot's seconds
//! went: kernel, initrd, userspace.

use std::time::Duration;

use crate::contract::CONSOLE_MARKER_BOOT_TIMING;

/// Where the guest's boot time went, as systemd measured it. A phase systemd did not
/// report (no initrd; the kernel's share inside a container) is `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestBootTiming {
    pub kernel: Option<Duration>,
    pub initrd: Option<Duration>,
    pub userspace: Option<Duration>,
}

/// No phase of a boot the supervisor waits for takes this long; a larger figure is
/// not a boot timing.
const LONGEST_PHASE: Duration = Duration::from_secs(24 * 60 * 60);

/// The timing on the last marker line of a console log (or its tail). `None` when
/// there is no such line, or when the last one is not a timing (systemd said the
/// boot had not finished): an earlier line belongs to an earlier boot.
pub fn last_boot_timing(console: &[u8]) -> Option<GuestBootTiming> {
    let marker = CONSOLE_MARKER_BOOT_TIMING.as_bytes();
    let line = console
        .split(|&b| b == b'\n')
        .rev()
        .find(|line| find(line, marker).is_some())?;
    let start = find(line, marker)? + marker.len();
    parse_startup_line(&String::from_utf8_lossy(&line[start..]))
}

/// Parses systemd-analyze's "Startup finished in A (kernel) + B (initrd) + C
/// (userspace) = D" (with or without firmware/loader/initrd phases).
pub fn parse_startup_line(text: &str) -> Option<GuestBootTiming> {
    let (_, rest) = text.split_once("Startup finished in ")?;
    let (phases, _total) = rest.split_once(" = ")?;
    let mut timing = GuestBootTiming {
        kernel: None,
        initrd: None,
        userspace: None,
    };
    let mut any = false;
    for phase in phases.split(" + ") {
        let (value, label) = phase.trim().split_once(" (")?;
        let label = label.strip_suffix(')')?;
        let duration = parse_timespan(value)?;
        match label {
            "kernel" => timing.kernel = Some(duration),
            "initrd" => timing.initrd = Some(duration),
            "userspace" => timing.userspace = Some(duration),
            // firmware, loader and whatever a later systemd adds: not ours to show.
            _ => {}
        }
        any = true;
    }
    any.then_some(timing)
}

/// Parses systemd's `format_timespan` output: "1min 2.345s", "812ms", "1h 3min".
fn parse_timespan(text: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut words = 0;
    for word in text.split_whitespace() {
        let split = word
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|&at| at > 0)?;
        let (number, unit) = word.split_at(split);
        let seconds_per_unit = match unit {
            "us" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "min" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            _ => return None,
        };
        let number: f64 = number.parse().ok()?;
        let part = Duration::try_from_secs_f64(number * seconds_per_unit).ok()?;
        total = total.checked_add(part)?;
        words += 1;
    }
    (words > 0 && total <= LONGEST_PHASE).then_some(total)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Option<Duration> {
        Some(Duration::from_millis(n))
    }

    #[test]
    fn reads_kernel_initrd_and_userspace_from_the_marker_line() {
        let console = b"[    0.000000] Booting Linux on physical CPU 0x0000000000 [0x610f0000]\r\n\
            <<< NixOS Stage 2 >>>\r\n\
            darwin-vz-nix-boot-timing: Startup finished in 812ms (kernel) + 1.201s (initrd) + 1.954s (userspace) = 3.968s (system running)\r\n\
            [  OK  ] Started Session 1 of User builder.\r\n";
        assert_eq!(
            last_boot_timing(console),
            Some(GuestBootTiming {
                kernel: ms(812),
                initrd: ms(1201),
                userspace: ms(1954),
            })
        );
    }

    #[test]
    fn the_last_marker_line_wins_and_an_unfinished_boot_gives_nothing() {
        let two = b"darwin-vz-nix-boot-timing: Startup finished in 1.000s (kernel) + 2.000s (userspace) = 3.000s\n\
            darwin-vz-nix-boot-timing: Startup finished in 500ms (kernel) + 700ms (initrd) + 900ms (userspace) = 2.100s\n";
        assert_eq!(last_boot_timing(two).unwrap().userspace, ms(900));

        let unfinished = b"darwin-vz-nix-boot-timing: Startup finished in 1.000s (kernel) + 2.000s (userspace) = 3.000s\n\
            darwin-vz-nix-boot-timing: Bootup is not yet finished (org.freedesktop.systemd1.Manager.FinishTimestampMonotonic=0). (system starting)\n";
        assert_eq!(last_boot_timing(unfinished), None);
        assert_eq!(last_boot_timing(b"no marker here\n"), None);
        assert_eq!(last_boot_timing(b""), None);
    }

    #[test]
    fn minutes_firmware_loader_and_missing_phases_parse() {
        // A slow boot on EFI (systemd-analyze on a physical machine).
        let efi = "Startup finished in 7.119s (firmware) + 2.093s (loader) + 2.094s (kernel) + 1min 3.398s (initrd) + 3.321s (userspace) = 1min 18.026s";
        assert_eq!(
            parse_startup_line(efi),
            Some(GuestBootTiming {
                kernel: ms(2094),
                initrd: ms(63_398),
                userspace: ms(3321),
            })
        );
        // No initrd.
        let no_initrd = "Startup finished in 1.523s (kernel) + 4.081s (userspace) = 5.605s";
        assert_eq!(parse_startup_line(no_initrd).unwrap().initrd, None);
        // A container: userspace only.
        let container = "Startup finished in 457ms (userspace) = 457ms";
        assert_eq!(
            parse_startup_line(container),
            Some(GuestBootTiming {
                kernel: None,
                initrd: None,
                userspace: ms(457),
            })
        );
        assert_eq!(
            parse_timespan("1h 2min 3.5s"),
            Some(Duration::from_millis(3_723_500))
        );
        assert_eq!(parse_timespan("850us"), Some(Duration::from_micros(850)));
    }

    #[test]
    fn malformed_or_absurd_figures_are_refused() {
        for line in [
            "Startup finished in",
            "Startup finished in 1.0s (kernel)",
            "Startup finished in 1.0 (kernel) = 1.0s",
            "Startup finished in 1.0s kernel = 1.0s",
            "Startup finished in -1s (kernel) = 1s",
            "Startup finished in 1.0parsecs (kernel) = 1s",
            "Startup finished in 2d 1s (kernel) = 2d",
            "Startup finished in 1e400s (kernel) = 1s",
        ] {
            assert_eq!(parse_startup_line(line), None, "{line}");
        }
        // Invalid UTF-8 around the marker does not matter.
        let mut console = b"\xff\xfe garbage\n\xffdarwin-vz-nix-boot-timing: ".to_vec();
        console.extend_from_slice(b"Startup finished in 1s (kernel) + 2s (userspace) = 3s\n");
        assert_eq!(last_boot_timing(&console).unwrap().kernel, ms(1000));
    }
}
