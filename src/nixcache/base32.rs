//! Nix's base-32: its own alphabet (no e, o, t, u) and the bytes read
//! from the end, so that `nix-hash --to-base32` and narinfo hashes agree.

const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Characters needed for `len` bytes.
pub fn encoded_len(len: usize) -> usize {
    (len * 8).div_ceil(5)
}

pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let low = bytes[i] >> j;
        let high = match bytes.get(i + 1) {
            Some(next) if j > 3 => next << (8 - j),
            _ => 0,
        };
        out.push(ALPHABET[((low | high) & 0x1f) as usize] as char);
    }
    out
}

/// The `N` bytes `text` encodes; None unless it is exactly their encoding.
pub fn decode<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != encoded_len(N) {
        return None;
    }
    let mut out = [0u8; N];
    for (n, c) in text.bytes().rev().enumerate() {
        let digit = ALPHABET.iter().position(|&a| a == c)? as u16;
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let shifted = digit << j;
        out[i] |= shifted as u8;
        let carry = (shifted >> 8) as u8;
        match out.get_mut(i + 1) {
            Some(next) => *next |= carry,
            None if carry != 0 => return None,
            None => {}
        }
    }
    Some(out)
}

/// Whether `text` is a store path's hash part (20 bytes, 32 characters).
pub fn is_store_hash(text: &str) -> bool {
    decode::<20>(text).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_nix_for_sha256() {
        // `nix-hash --type sha256 --to-base32` of sha256("abc").
        let digest = crate::digest::Digest::of(b"abc");
        let text = encode(digest.as_bytes());
        assert_eq!(text, "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s");
        assert_eq!(decode::<32>(&text), Some(*digest.as_bytes()));
    }

    #[test]
    fn store_hashes_round_trip_and_bad_text_is_refused() {
        let hash = "8cawhh43s54rrnr5cvpiqk0aczy2igmf";
        let bytes = decode::<20>(hash).expect("a store hash");
        assert_eq!(encode(&bytes), hash);
        assert!(!is_store_hash("8cawhh43s54rrnr5cvpiqk0aczy2igme")); // 'e'
        assert!(!is_store_hash("8cawhh43s54rrnr5cvpiqk0aczy2igm"));
        // 52 characters carry 260 bits: a sha256 leaves the top 4 clear.
        assert!(decode::<32>(&format!("z{}", "0".repeat(51))).is_none());
        assert!(decode::<32>(&format!("1{}", "0".repeat(51))).is_some());
        assert!(decode::<32>("").is_none());
    }
}
