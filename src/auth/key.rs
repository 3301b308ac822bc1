//! The API key as a string: how one is minted, how a presented one is checked for shape
//! before anything else sees it, and the hash that is all the store ever keeps.
//!
//! Format: `<prefix>_<secret><checksum>`. The secret is 30 base62 characters (178 bits from
//! the OS generator); the checksum is the CRC32 of `<prefix>_<secret>` written as 6 base62
//! characters, as GitHub's tokens do, so a typo or a truncated paste is refused here, before
//! any cache or store lookup, and secret scanners can recognise a leaked key.
//! This module must never log, format or return the plaintext in an error.

use rand::Rng;
use sha2::{Digest, Sha256};
use std::fmt;

/// Base62 alphabet, digits first so that the checksum encoding is the usual one.
const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// 30 × log2(62) ≈ 178.6 bits of entropy: above the 160 bits we promise.
pub const SECRET_LEN: usize = 30;
/// 62^6 > 2^32, so every CRC32 value has a six-character encoding.
pub const CHECKSUM_LEN: usize = 6;
/// Characters shown to users afterwards as the key's hint.
pub const KEY_START_LEN: usize = 10;
pub const MAX_PREFIX_LEN: usize = 16;

/// Why a presented string is not a keygate key. Carries no part of the string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("the key does not start with the expected prefix")]
    WrongPrefix,
    #[error("the key has the wrong length")]
    WrongLength,
    #[error("the key contains characters outside base62")]
    BadCharacter,
    #[error("the key's checksum does not match")]
    BadChecksum,
}

/// A validated key prefix (`kg` by default): 1 to 16 lowercase letters or digits, so the
/// `_` separator is unambiguous.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPrefix(String);

impl KeyPrefix {
    pub fn new(prefix: &str) -> Result<Self, String> {
        if prefix.is_empty() || prefix.len() > MAX_PREFIX_LEN {
            return Err(format!("must be 1 to {MAX_PREFIX_LEN} characters"));
        }
        if !prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err("must contain only lowercase letters and digits".into());
        }
        Ok(Self(prefix.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Total length of a key with this prefix.
    pub fn key_len(&self) -> usize {
        self.0.len() + 1 + SECRET_LEN + CHECKSUM_LEN
    }
}

impl Default for KeyPrefix {
    fn default() -> Self {
        Self("kg".to_owned())
    }
}

/// A freshly minted key. Its `Debug` hides the value; the only way out is [`NewKey::expose`],
/// used by the create/rotate responses and the CLI that prints it once.
pub struct NewKey {
    value: String,
}

impl NewKey {
    pub fn generate(prefix: &KeyPrefix) -> Self {
        let mut rng = rand::rng();
        let mut value = String::with_capacity(prefix.key_len());
        value.push_str(prefix.as_str());
        value.push('_');
        for _ in 0..SECRET_LEN {
            value.push(ALPHABET[rng.random_range(0..ALPHABET.len())] as char);
        }
        let checksum = crc32fast::hash(value.as_bytes());
        push_base62_fixed(&mut value, checksum);
        Self { value }
    }

    pub fn expose(&self) -> &str {
        &self.value
    }

    pub fn hash(&self) -> KeyHash {
        KeyHash::of(&self.value)
    }

    /// The first characters, kept as the hint users see later.
    pub fn key_start(&self) -> String {
        self.value.chars().take(KEY_START_LEN).collect()
    }
}

impl fmt::Debug for NewKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NewKey(<redacted>)")
    }
}

/// Checks the shape and checksum of a presented key without copying it. Runs on every
/// request, so it allocates nothing.
pub fn check_format(prefix: &KeyPrefix, presented: &str) -> Result<(), KeyFormatError> {
    let bytes = presented.as_bytes();
    let p = prefix.as_str().as_bytes();
    if bytes.len() != prefix.key_len() {
        // A key of another prefix usually has another length too; call it a prefix problem
        // when the prefix is visibly wrong, so the message helps whoever pasted it.
        if !bytes.starts_with(p) || bytes.get(p.len()) != Some(&b'_') {
            return Err(KeyFormatError::WrongPrefix);
        }
        return Err(KeyFormatError::WrongLength);
    }
    if !bytes.starts_with(p) || bytes[p.len()] != b'_' {
        return Err(KeyFormatError::WrongPrefix);
    }
    let body = &bytes[p.len() + 1..];
    if !body.iter().all(u8::is_ascii_alphanumeric) {
        return Err(KeyFormatError::BadCharacter);
    }
    let (signed, checksum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    let mut expected = [0u8; CHECKSUM_LEN];
    encode_base62_fixed(crc32fast::hash(signed), &mut expected);
    if checksum != expected {
        return Err(KeyFormatError::BadChecksum);
    }
    Ok(())
}

fn encode_base62_fixed(mut n: u32, out: &mut [u8; CHECKSUM_LEN]) {
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
}

fn push_base62_fixed(s: &mut String, n: u32) {
    let mut buf = [0u8; CHECKSUM_LEN];
    encode_base62_fixed(n, &mut buf);
    for b in buf {
        s.push(b as char);
    }
}

/// SHA-256 of the whole key string: the only form in which a key is stored, cached or looked
/// up. Its `Debug`/`Display` is hex, which is safe to log (it cannot be reversed).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    pub fn of(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({})", self.to_hex())
    }
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Random identifier for a key record (`apk_` + 20 base62 characters): not sequential, so
/// ids leak nothing about how many keys exist.
pub fn new_key_id() -> String {
    let mut rng = rand::rng();
    let mut id = String::with_capacity(24);
    id.push_str("apk_");
    for _ in 0..20 {
        id.push(ALPHABET[rng.random_range(0..ALPHABET.len())] as char);
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kg() -> KeyPrefix {
        KeyPrefix::default()
    }

    #[test]
    fn generated_keys_pass_their_own_check() {
        for _ in 0..200 {
            let key = NewKey::generate(&kg());
            assert_eq!(check_format(&kg(), key.expose()), Ok(()));
            assert_eq!(key.expose().len(), kg().key_len());
            assert!(key.expose().starts_with("kg_"));
        }
    }

    #[test]
    fn debug_never_shows_the_key() {
        let key = NewKey::generate(&kg());
        assert!(!format!("{key:?}").contains(&key.expose()[3..]));
    }

    #[test]
    fn key_start_is_the_first_ten_characters() {
        let key = NewKey::generate(&kg());
        assert_eq!(key.key_start(), &key.expose()[..10]);
    }

    #[test]
    fn other_prefix_is_refused() {
        let key = NewKey::generate(&KeyPrefix::new("live").unwrap());
        assert_eq!(
            check_format(&kg(), key.expose()),
            Err(KeyFormatError::WrongPrefix)
        );
    }

    #[test]
    fn prefix_rules() {
        assert!(KeyPrefix::new("").is_err());
        assert!(KeyPrefix::new("a_b").is_err());
        assert!(KeyPrefix::new("ABC").is_err());
        assert!(KeyPrefix::new("abcdefghijklmnopq").is_err());
        assert!(KeyPrefix::new("sk2").is_ok());
    }

    #[test]
    fn hash_hex_round_trips() {
        let h = KeyHash::of("anything");
        assert_eq!(KeyHash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(KeyHash::from_hex("zz"), None);
    }

    #[test]
    fn ids_are_distinct_and_shaped() {
        let a = new_key_id();
        let b = new_key_id();
        assert_ne!(a, b);
        assert!(a.starts_with("apk_") && a.len() == 24);
    }

    proptest! {
        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,80}") {
            let _ = check_format(&kg(), &s);
        }

        #[test]
        fn any_single_character_change_is_caught(pos in 3usize..39, c in "[0-9A-Za-z]") {
            let key = NewKey::generate(&kg());
            let mut bytes = key.expose().as_bytes().to_vec();
            let replacement = c.as_bytes()[0];
            prop_assume!(bytes[pos] != replacement);
            bytes[pos] = replacement;
            let changed = String::from_utf8(bytes).unwrap();
            prop_assert_eq!(check_format(&kg(), &changed), Err(KeyFormatError::BadChecksum));
        }

        #[test]
        fn any_truncation_is_caught(cut in 0usize..39) {
            let key = NewKey::generate(&kg());
            prop_assert!(check_format(&kg(), &key.expose()[..cut]).is_err());
        }

        #[test]
        fn non_base62_is_caught(pos in 3usize..39, c in "[^0-9A-Za-z]") {
            let key = NewKey::generate(&kg());
            let mut s: Vec<char> = key.expose().chars().collect();
            s[pos] = c.chars().next().unwrap();
            let changed: String = s.into_iter().collect();
            prop_assert!(check_format(&kg(), &changed).is_err());
        }
    }
}
