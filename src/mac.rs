//! The guest NIC's MAC address: random once, then kept in the state directory so the
//! guest's DHCP lease and network identity stay the same across boots.

use std::fmt;
use std::io::Read;
use std::path::Path;
use std::str::FromStr;

use crate::files;
use crate::state::{StateError, write_file_atomic};

/// Where the address `load_or_create` returns came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MacOrigin {
    Kept,
    Created,
    /// The file held no address (corrupt, or not a plain file); a new one was made.
    ReplacedUnusable,
}

/// What the state file holds.
enum Stored {
    Found(MacAddress),
    Missing,
    Unusable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// A random locally administered unicast address (what VZ generates too).
    pub fn random() -> std::io::Result<MacAddress> {
        let mut bytes = [0u8; 6];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        bytes[0] = (bytes[0] | 0b10) & !0b1;
        Ok(MacAddress(bytes))
    }

    /// Reads the persisted address, if any (never through a symbolic link, at most a
    /// line's worth of bytes).
    pub fn load(path: &Path) -> Option<MacAddress> {
        match MacAddress::read(path) {
            Stored::Found(mac) => Some(mac),
            Stored::Missing | Stored::Unusable => None,
        }
    }

    fn read(path: &Path) -> Stored {
        match files::read_state_file(path, 64) {
            Ok(None) => Stored::Missing,
            Ok(Some(bytes)) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|text| text.trim().parse().ok())
                .map_or(Stored::Unusable, Stored::Found),
            Err(_) => Stored::Unusable,
        }
    }

    /// The persisted address, created on first use. A file that holds no address (or
    /// is not a plain file) is replaced, and the outcome says so.
    pub fn load_or_create(path: &Path) -> Result<(MacAddress, MacOrigin), StateError> {
        let origin = match MacAddress::read(path) {
            Stored::Found(mac) => return Ok((mac, MacOrigin::Kept)),
            Stored::Missing => MacOrigin::Created,
            Stored::Unusable => MacOrigin::ReplacedUnusable,
        };
        let io = |source| StateError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mac = MacAddress::random().map_err(io)?;
        write_file_atomic(path, format!("{mac}\n").as_bytes(), 0o644)?;
        Ok((mac, origin))
    }

    pub fn is_locally_administered_unicast(&self) -> bool {
        self.0[0] & 0b11 == 0b10
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddress {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.split(':').collect();
        let bytes: Vec<u8> = parts
            .iter()
            .filter(|p| p.len() == 2)
            .filter_map(|p| u8::from_str_radix(p, 16).ok())
            .collect();
        match <[u8; 6]>::try_from(bytes) {
            Ok(bytes) if parts.len() == 6 => Ok(MacAddress(bytes)),
            _ => Err(format!(
                "`{text}` is not a MAC address like 0a:1b:2c:3d:4e:5f"
            )),
        }
    }
}

impl serde::Serialize for MacAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_addresses_are_local_unicast_and_round_trip() {
        for _ in 0..32 {
            let mac = MacAddress::random().unwrap();
            assert!(mac.is_locally_administered_unicast(), "{mac}");
            assert_eq!(mac.to_string().parse::<MacAddress>().unwrap(), mac);
        }
        assert!("0a:1b:2c:3d:4e".parse::<MacAddress>().is_err());
        assert!("0a:1b:2c:3d:4e:zz".parse::<MacAddress>().is_err());
    }

    #[test]
    fn the_address_is_stable_once_created() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("mac-address");
        let (first, origin) = MacAddress::load_or_create(&path).unwrap();
        assert_eq!(origin, MacOrigin::Created);
        assert_eq!(
            MacAddress::load_or_create(&path).unwrap(),
            (first, MacOrigin::Kept)
        );
    }

    #[test]
    fn a_corrupt_or_linked_address_file_is_replaced_and_said_so() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("mac-address");
        std::fs::write(&path, "zz:zz\n").unwrap();
        let (mac, origin) = MacAddress::load_or_create(&path).unwrap();
        assert_eq!(origin, MacOrigin::ReplacedUnusable);
        assert_eq!(MacAddress::load(&path), Some(mac));

        let other = tmp.path().join("other");
        std::fs::write(&other, "0a:1b:2c:3d:4e:5f\n").unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&other, &path).unwrap();
        assert_eq!(MacAddress::load(&path), None, "never read through a link");
        let (_, origin) = MacAddress::load_or_create(&path).unwrap();
        assert_eq!(origin, MacOrigin::ReplacedUnusable);
        assert_eq!(
            std::fs::read_to_string(&other).unwrap(),
            "0a:1b:2c:3d:4e:5f\n",
            "the link's target is untouched"
        );
    }
}
