//! Nix's base-32: the alphabet and bit order of store path hashes and of the
//! `sha256:` hashes in `.narinfo` files.
//!
//! It is not RFC 4648 base32: the alphabet leaves out `e`, `o`, `t` and `u`, and the
//! characters are written from the last 5-bit group of the bytes to the first
//! (Nix's `printHash32`, src/libutil/hash.cc).

const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// How many characters `bytes` bytes take.
pub fn encoded_len(bytes: usize) -> usize {
    if bytes == 0 {
        0
    } else {
        (bytes * 8 - 1) / 5 + 1
    }
}

/// `bytes` in Nix's base-32.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let bit = n * 5;
        let (i, j) = (bit / 8, bit % 8);
        let low = bytes.get(i).map_or(0, |b| u16::from(*b) >> j);
        let high = bytes.get(i + 1).map_or(0, |b| u16::from(*b) << (8 - j));
        let index = usize::from((low | high) & 0x1f);
        out.push(char::from(ALPHABET[index]));
    }
    out
}

/// The `N` bytes that `text` encodes; `None` when it is not exactly their encoding
/// (wrong length, a character outside the alphabet, or bits beyond the last byte).
pub fn decode<const N: usize>(text: &str) -> Option<[u8; N]> {
    let text = text.as_bytes();
    if text.len() != encoded_len(N) {
        return None;
    }
    let mut bytes = [0u8; N];
    for (n, c) in text.iter().rev().enumerate() {
        let digit = u16::try_from(ALPHABET.iter().position(|a| a == c)?).ok()?;
        let bit = n * 5;
        let (i, j) = (bit / 8, bit % 8);
        let shifted = digit << j;
        let [low, high] = shifted.to_le_bytes();
        *bytes.get_mut(i)? |= low;
        if high != 0 {
            // Bits past the last byte mean the text is not an encoding of N bytes.
            *bytes.get_mut(i + 1)? |= high;
        }
    }
    Some(bytes)
}

/// True when `text` is a store path hash part: 32 characters of the alphabet.
pub fn is_hash_part(text: &str) -> bool {
    text.len() == encoded_len(20) && text.bytes().all(|c| ALPHABET.contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(text: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    #[test]
    fn encodes_as_nix_hash_to_base32_does() {
        // Expected values printed by Nix 2.8's `nix hash to-base32 sha256:<hex>`.
        let cases = [
            (
                "5d146ec9b294df1813f88b90c8c6b67aaa651a664698aef6885034db32c94483",
                "10s4r4rdnd2hi3vax626cqd6baksnv3ci44bz09iipwlnb4nw52x",
            ),
            (
                "0000000000000000000000000000000000000000000000000000000000000001",
                "0080000000000000000000000000000000000000000000000000",
            ),
            (
                "ff00000000000000000000000000000000000000000000000000000000000000",
                "000000000000000000000000000000000000000000000000007z",
            ),
        ];
        for (hex_text, nix32) in cases {
            assert_eq!(encode(&hex(hex_text)), nix32);
            assert_eq!(decode::<32>(nix32), Some(hex(hex_text)));
        }
        assert_eq!(encoded_len(20), 32);
        assert_eq!(encoded_len(32), 52);
    }

    #[test]
    fn decoding_refuses_what_no_bytes_encode() {
        assert_eq!(
            decode::<32>("e080000000000000000000000000000000000000000000000000"),
            None
        );
        assert_eq!(
            decode::<32>("008000000000000000000000000000000000000000000000000"),
            None
        );
        // 52 characters hold 260 bits: a first digit above 1 sets bits past byte 32.
        assert_eq!(
            decode::<32>("2000000000000000000000000000000000000000000000000000"),
            None
        );
        assert!(is_hash_part("0xhhd6navhszl7igbksjsv5rkf9x4y5s"));
        assert!(!is_hash_part("0xhhd6navhszl7igbksjsv5rkf9x4y5e"));
        assert!(!is_hash_part("0xhhd6navhszl7igbksjsv5rkf9x4y5"));
    }
}
