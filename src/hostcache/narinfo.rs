//! What the cache says about a store path: the `.narinfo` text, and the fingerprint
//! its signature covers (Nix's `ValidPathInfo::fingerprint`, src/libstore/path-info.cc).

use super::nix32;

/// The store directory the host's paths live under, as the guest's Nix names them.
pub const STORE_DIR: &str = "/nix/store";

/// A SHA-256 digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sha256(pub [u8; 32]);

impl Sha256 {
    /// `sha256:<nix32>`, as narinfo files and fingerprints write it.
    pub fn to_nix32(&self) -> String {
        format!("sha256:{}", nix32::encode(&self.0))
    }

    /// A hash as Nix's database stores it: `sha256:` and 64 hex digits (or, in
    /// databases of very old Nix versions, 52 base-32 characters).
    pub fn parse_db(text: &str) -> Option<Sha256> {
        let digits = text.strip_prefix("sha256:")?;
        if digits.len() == 64 {
            let mut bytes = [0u8; 32];
            for (byte, pair) in bytes.iter_mut().zip(digits.as_bytes().chunks(2)) {
                let pair = std::str::from_utf8(pair).ok()?;
                *byte = u8::from_str_radix(pair, 16).ok()?;
            }
            Some(Sha256(bytes))
        } else {
            nix32::decode::<32>(digits).map(Sha256)
        }
    }
}

/// Everything a narinfo says about one valid path of the host store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// The full store path, `/nix/store/<hash>-<name>`.
    pub path: String,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    /// Full store paths, sorted.
    pub references: Vec<String>,
    /// The full store path of the derivation that built it, when known.
    pub deriver: Option<String>,
    /// Signatures the host's database holds (e.g. cache.nixos.org's), passed on.
    pub sigs: Vec<String>,
    /// The content address of a content-addressed path.
    pub ca: Option<String>,
}

/// Why a database row cannot become a narinfo.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidInfo(pub String);

impl PathInfo {
    /// Checks every field before any of it is written into a narinfo: a value with a
    /// newline could add lines of its own.
    pub fn check(&self) -> Result<(), InvalidInfo> {
        for path in std::iter::once(&self.path)
            .chain(&self.references)
            .chain(&self.deriver)
        {
            if base_name(path).is_none() {
                return Err(InvalidInfo(format!("{path:?} is not a store path")));
            }
        }
        if self.nar_size == 0 {
            return Err(InvalidInfo(format!("{}: its NAR size is 0", self.path)));
        }
        let plain = |text: &str| !text.is_empty() && text.bytes().all(|b| b.is_ascii_graphic());
        if let Some(sig) = self.sigs.iter().find(|s| !plain(s)) {
            return Err(InvalidInfo(format!("{}: signature {sig:?}", self.path)));
        }
        if let Some(ca) = self.ca.as_deref().filter(|ca| !plain(ca)) {
            return Err(InvalidInfo(format!(
                "{}: content address {ca:?}",
                self.path
            )));
        }
        Ok(())
    }

    /// The 32 characters after the store directory.
    pub fn hash_part(&self) -> &str {
        base_name(&self.path)
            .and_then(|name| name.get(..32))
            .unwrap_or_default()
    }

    /// Where the NAR is, relative to the cache: everything needed to find it again,
    /// so the server keeps no state between a narinfo and its NAR.
    pub fn nar_url(&self) -> String {
        format!(
            "nar/{}-{}.nar",
            self.hash_part(),
            nix32::encode(&self.nar_hash.0)
        )
    }

    /// What a signature covers: `1;<path>;<nar hash>;<nar size>;<references>`.
    pub fn fingerprint(&self) -> String {
        format!(
            "1;{};{};{};{}",
            self.path,
            self.nar_hash.to_nix32(),
            self.nar_size,
            self.references.join(",")
        )
    }

    /// The narinfo text, with `signature` first among the signatures. The NAR is
    /// served uncompressed: it comes from local memory, and compressing would cost
    /// more time than it saves.
    pub fn narinfo(&self, signature: &str) -> String {
        let nar_hash = self.nar_hash.to_nix32();
        let references: Vec<&str> = self
            .references
            .iter()
            .filter_map(|r| base_name(r))
            .collect();
        let mut text = format!(
            "StorePath: {}\nURL: {}\nCompression: none\nFileHash: {nar_hash}\nFileSize: {size}\nNarHash: {nar_hash}\nNarSize: {size}\nReferences: {}\n",
            self.path,
            self.nar_url(),
            references.join(" "),
            size = self.nar_size,
        );
        if let Some(deriver) = self.deriver.as_deref().and_then(base_name) {
            text.push_str(&format!("Deriver: {deriver}\n"));
        }
        for sig in std::iter::once(signature).chain(self.sigs.iter().map(String::as_str)) {
            text.push_str(&format!("Sig: {sig}\n"));
        }
        if let Some(ca) = &self.ca {
            text.push_str(&format!("CA: {ca}\n"));
        }
        text
    }
}

/// `<hash>-<name>` of a store path, when `path` is one: the store directory, 32
/// base-32 characters, a dash, and a name of the characters Nix allows.
pub fn base_name(path: &str) -> Option<&str> {
    let name = path.strip_prefix(STORE_DIR)?.strip_prefix('/')?;
    let (hash, rest) = (name.get(..32)?, name.get(32..)?);
    let rest = rest.strip_prefix('-')?;
    let allowed = |c: u8| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c);
    let ok = nix32::is_hash_part(hash)
        && !rest.is_empty()
        && rest.len() <= 211
        && !rest.starts_with('.')
        && rest.bytes().all(allowed);
    ok.then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> PathInfo {
        PathInfo {
            path: "/nix/store/w6lkdnvvdhy0fnkzj5x6nmjpvx7clvq9-d".into(),
            nar_hash: Sha256::parse_db(
                "sha256:5d146ec9b294df1813f88b90c8c6b67aaa651a664698aef6885034db32c94483",
            )
            .unwrap(),
            nar_size: 1104,
            references: vec![
                "/nix/store/0xhhd6navhszl7igbksjsv5rkf9x4y5s-f1".into(),
                "/nix/store/br89h9wcdlbmljxvy303j16n3yv47fhx-f2".into(),
            ],
            deriver: Some("/nix/store/xxhhd6navhszl7igbksjsv5rkf9x4y5s-d.drv".into()),
            sigs: vec!["cache.nixos.org-1:abc=".into()],
            ca: None,
        }
    }

    #[test]
    fn the_fingerprint_lists_full_reference_paths_and_ends_in_a_semicolon_without_them() {
        let mut info = info();
        assert_eq!(
            info.fingerprint(),
            "1;/nix/store/w6lkdnvvdhy0fnkzj5x6nmjpvx7clvq9-d;sha256:10s4r4rdnd2hi3vax626cqd6baksnv3ci44bz09iipwlnb4nw52x;1104;/nix/store/0xhhd6navhszl7igbksjsv5rkf9x4y5s-f1,/nix/store/br89h9wcdlbmljxvy303j16n3yv47fhx-f2"
        );
        info.references.clear();
        assert!(info.fingerprint().ends_with(";1104;"));
    }

    #[test]
    fn the_narinfo_names_an_uncompressed_nar_that_carries_its_own_hash() {
        let text = info().narinfo("ours-1:sig=");
        assert_eq!(
            text,
            "StorePath: /nix/store/w6lkdnvvdhy0fnkzj5x6nmjpvx7clvq9-d\n\
             URL: nar/w6lkdnvvdhy0fnkzj5x6nmjpvx7clvq9-10s4r4rdnd2hi3vax626cqd6baksnv3ci44bz09iipwlnb4nw52x.nar\n\
             Compression: none\n\
             FileHash: sha256:10s4r4rdnd2hi3vax626cqd6baksnv3ci44bz09iipwlnb4nw52x\n\
             FileSize: 1104\n\
             NarHash: sha256:10s4r4rdnd2hi3vax626cqd6baksnv3ci44bz09iipwlnb4nw52x\n\
             NarSize: 1104\n\
             References: 0xhhd6navhszl7igbksjsv5rkf9x4y5s-f1 br89h9wcdlbmljxvy303j16n3yv47fhx-f2\n\
             Deriver: xxhhd6navhszl7igbksjsv5rkf9x4y5s-d.drv\n\
             Sig: ours-1:sig=\n\
             Sig: cache.nixos.org-1:abc=\n"
        );
    }

    #[test]
    fn values_that_could_add_narinfo_lines_are_refused() {
        let mut bad = info();
        bad.sigs.push("x\nCA: fake".into());
        assert!(bad.check().is_err());
        let mut bad = info();
        bad.references.push("/nix/store/short-x".into());
        assert!(bad.check().is_err());
        let mut bad = info();
        bad.path = "/nix/store/w6lkdnvvdhy0fnkzj5x6nmjpvx7clvq9-d\nNarSize: 1".into();
        assert!(bad.check().is_err());
        assert!(info().check().is_ok());
        assert_eq!(
            base_name("/nix/store/w6lkdnvvdhy0fnkzj5x6nmjpvx7clvq9-.hidden"),
            None
        );
        assert_eq!(base_name("/tmp/w6lkdnvvdhy0fnkzj5x6nmjpvx7clvq9-x"), None);
    }

    #[test]
    fn database_hashes_in_hex_and_base32_parse_alike() {
        let hex = Sha256::parse_db(
            "sha256:5d146ec9b294df1813f88b90c8c6b67aaa651a664698aef6885034db32c94483",
        );
        let b32 = Sha256::parse_db("sha256:10s4r4rdnd2hi3vax626cqd6baksnv3ci44bz09iipwlnb4nw52x");
        assert!(hex.is_some());
        assert_eq!(hex, b32);
        assert_eq!(Sha256::parse_db("md5:00"), None);
        assert_eq!(Sha256::parse_db("sha256:zz"), None);
    }
}
