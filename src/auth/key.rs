//! The API key as a string: how one is minted, how a presented one is checked for shape
//! before anything else sees it, and the hash that is all the store ever keeps.
//!
//! Format: `<prefix>_<tag><secret><checksum>`. The tag is a 4-character base62 *slot tag*
//! ([`SlotTag`]): every store entry that one write must change atomically carries it, so that
//! on Redis Cluster they share one hash slot, and the presented key says which slot to read
//! without any lookup. Keys of a team share the team's tag (derived from the team id), keys
//! without a team get a random one. The tag is not secret (it is part of `key_start` too). The
//! secret is 30 base62 characters (178 bits from the OS generator); the checksum is the CRC32
//! of everything before it written as 6 base62 characters, as GitHub's tokens do, so a typo or a
//! truncated paste is refused here, before any cache or store lookup, and secret scanners can
//! recognise a leaked key.
//! This module must never log, format or return the plaintext in an error.

use rand::Rng;
use sha2::{Digest, Sha256};
use std::fmt;

/// Base62 alphabet, digits first so that the checksum encoding is the usual one.
const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Characters of the slot tag. 62^4 ≈ 14.8 million tags spread evenly over Redis Cluster's
/// 16 384 slots.
pub const TAG_LEN: usize = 4;
/// 30 × log2(62) ≈ 178.6 bits of entropy: above the 160 bits we promise. The tag adds none
/// (it is derived from the team or public in `key_start`) and is not counted.
pub const SECRET_LEN: usize = 30;
/// 62^6 > 2^32, so every CRC32 value has a six-character encoding.
pub const CHECKSUM_LEN: usize = 6;
/// Characters shown to users afterwards as the key's hint.
pub const KEY_START_LEN: usize = 10;
pub const MAX_PREFIX_LEN: usize = 16;
/// `apk_`: the start of every key id.
pub const KEY_ID_PREFIX: &str = "apk_";
/// Random characters of a key id after its tag: 16 × log2(62) ≈ 95 bits, so ids never clash.
const KEY_ID_RANDOM_LEN: usize = 16;
/// Bytes of a [`KeyHash`]: the tag, then SHA-256.
pub const HASH_LEN: usize = TAG_LEN + 32;
/// Length of [`KeyHash::digest_hex`].
pub const DIGEST_HEX_LEN: usize = 2 * (HASH_LEN - TAG_LEN);

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

/// Four base62 characters naming the storage slot of a key, its id and (for team keys) its
/// team's entries. On Redis they go inside `{…}` in every key name, so Redis Cluster puts all
/// of one key's entries, and all of one team's, in one hash slot.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotTag([u8; TAG_LEN]);

impl SlotTag {
    /// A random tag, for keys without a team: they spread over the whole cluster.
    pub fn random() -> Self {
        let mut rng = rand::rng();
        let mut tag = [0u8; TAG_LEN];
        for c in &mut tag {
            *c = ALPHABET[rng.random_range(0..ALPHABET.len())];
        }
        Self(tag)
    }

    /// The tag of every key of `team_id`: the first 4 base62 digits of SHA-256 of the id, so
    /// every process derives it alone, and the team's keys, key-id set and members share a slot
    /// (the team limit is checked and taken in one atomic script).
    pub fn for_team(team_id: &str) -> Self {
        Self::from_digest(&Sha256::digest(team_id.as_bytes()).into())
    }

    fn from_digest(digest: &[u8; 32]) -> Self {
        let mut n = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
        let mut tag = [0u8; TAG_LEN];
        for c in &mut tag {
            *c = ALPHABET[(n % 62) as usize];
            n /= 62;
        }
        Self(tag)
    }

    /// The tag of a key id (`apk_<tag><random>`); `None` when `id` is not shaped like one
    /// (then no store entry can exist for it).
    pub fn of_key_id(id: &str) -> Option<Self> {
        let rest = id.strip_prefix(KEY_ID_PREFIX)?;
        Self::from_bytes(rest.as_bytes().get(..TAG_LEN)?)
    }

    /// The tag of a presented key: the characters after the prefix's `_`. `None` when there is
    /// no `_` or they are not base62.
    pub fn of_key(key: &str) -> Option<Self> {
        // Bytes: `split_once` costs ~100 instructions more, on every request (callgrind).
        let key = key.as_bytes();
        let rest = &key[key.iter().position(|&b| b == b'_')? + 1..];
        Self::from_bytes(rest.get(..TAG_LEN)?)
    }

    /// Four base62 bytes, else `None`.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let tag: [u8; TAG_LEN] = bytes.try_into().ok()?;
        tag.iter()
            .all(u8::is_ascii_alphanumeric)
            .then_some(Self(tag))
    }

    pub fn as_str(&self) -> &str {
        // Only ever built from ASCII alphanumerics (see the constructors).
        std::str::from_utf8(&self.0).unwrap_or("0000")
    }
}

impl fmt::Debug for SlotTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SlotTag({})", self.as_str())
    }
}

impl fmt::Display for SlotTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
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
        self.0.len() + 1 + TAG_LEN + SECRET_LEN + CHECKSUM_LEN
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
    /// A new key in slot `tag`: the team's tag, a random one, or (rotation) the key's own.
    pub fn generate(prefix: &KeyPrefix, tag: SlotTag) -> Self {
        let mut rng = rand::rng();
        let mut value = String::with_capacity(prefix.key_len());
        value.push_str(prefix.as_str());
        value.push('_');
        value.push_str(tag.as_str());
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
/// request, so it allocates nothing. The tag is base62 like the rest of the body and covered
/// by the checksum; which tag it is does not matter here.
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

/// The key's slot tag followed by SHA-256 of the whole key string: the only form in which a
/// key is stored, cached or looked up. The tag rides along so that a store can find the entry
/// from the hash alone (on Redis, the slot is in the entry's name); it is not secret. Its
/// `Debug`/`Display` is hex, which is safe to log (the digest cannot be reversed).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyHash(pub [u8; HASH_LEN]);

impl KeyHash {
    /// The hash of `key`. A well-formed key (one that passed [`check_format`]) gives its own
    /// tag; any other string a tag derived from its digest, so this never fails.
    pub fn of(key: &str) -> Self {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let tag = SlotTag::of_key(key).unwrap_or_else(|| SlotTag::from_digest(&digest));
        let mut out = [0u8; HASH_LEN];
        out[..TAG_LEN].copy_from_slice(&tag.0);
        out[TAG_LEN..].copy_from_slice(&digest);
        Self(out)
    }

    /// The slot tag of the key this is the hash of.
    pub fn tag(&self) -> SlotTag {
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&self.0[..TAG_LEN]);
        // `from_hex` only accepts base62 tags and `of` only makes them, so this holds.
        SlotTag::from_bytes(&tag).unwrap_or(SlotTag(*b"0000"))
    }

    /// SHA-256 of the key, in hex (without the tag).
    pub fn digest_hex(&self) -> String {
        let mut out = String::with_capacity(DIGEST_HEX_LEN);
        self.push_digest_hex(&mut out);
        out
    }

    /// [`KeyHash::digest_hex`] appended to `out`, without a string of its own.
    pub fn push_digest_hex(&self, out: &mut String) {
        let mut hex = [0u8; DIGEST_HEX_LEN];
        // Both lengths are fixed by the types and hex digits are ASCII: neither step can fail.
        if hex::encode_to_slice(&self.0[TAG_LEN..], &mut hex).is_ok()
            && let Ok(hex) = std::str::from_utf8(&hex)
        {
            out.push_str(hex);
        }
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The inverse of [`KeyHash::to_hex`]; `None` for anything else, including a tag that is
    /// not base62.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; HASH_LEN];
        hex::decode_to_slice(s, &mut out).ok()?;
        SlotTag::from_bytes(&out[..TAG_LEN])?;
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

/// Random identifier for a key record in slot `tag` (`apk_<tag>` + 16 random base62
/// characters): not sequential, so ids leak nothing about how many keys exist, and a store can
/// tell the slot of an id without a lookup.
pub fn new_key_id(tag: SlotTag) -> String {
    let mut rng = rand::rng();
    let mut id = String::with_capacity(KEY_ID_PREFIX.len() + TAG_LEN + KEY_ID_RANDOM_LEN);
    id.push_str(KEY_ID_PREFIX);
    id.push_str(tag.as_str());
    for _ in 0..KEY_ID_RANDOM_LEN {
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
            let key = NewKey::generate(&kg(), SlotTag::random());
            assert_eq!(check_format(&kg(), key.expose()), Ok(()));
            assert_eq!(key.expose().len(), kg().key_len());
            assert!(key.expose().starts_with("kg_"));
        }
    }

    #[test]
    fn debug_never_shows_the_key() {
        let key = NewKey::generate(&kg(), SlotTag::random());
        assert!(!format!("{key:?}").contains(&key.expose()[3..]));
    }

    #[test]
    fn key_start_is_the_first_ten_characters() {
        let key = NewKey::generate(&kg(), SlotTag::random());
        assert_eq!(key.key_start(), &key.expose()[..10]);
    }

    #[test]
    fn other_prefix_is_refused() {
        let key = NewKey::generate(&KeyPrefix::new("live").unwrap(), SlotTag::random());
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
        assert_eq!(h.digest_hex(), h.to_hex()[2 * TAG_LEN..]);
        assert_eq!(h.digest_hex().len(), DIGEST_HEX_LEN);
        assert_eq!(KeyHash::from_hex("zz"), None);
    }

    #[test]
    fn ids_are_distinct_and_shaped() {
        let tag = SlotTag::random();
        let a = new_key_id(tag);
        let b = new_key_id(tag);
        assert_ne!(a, b);
        assert!(a.starts_with("apk_") && a.len() == 24);
        assert_eq!(SlotTag::of_key_id(&a), Some(tag));
        assert_eq!(SlotTag::of_key_id("apk_"), None);
        assert_eq!(SlotTag::of_key_id("apk_a-cd1234"), None);
        assert_eq!(SlotTag::of_key_id("key_abcd1234"), None);
    }

    #[test]
    fn the_key_carries_its_tag_into_its_hash_and_start() {
        let tag = SlotTag::for_team("acme");
        let key = NewKey::generate(&kg(), tag);
        assert_eq!(&key.expose()[3..7], tag.as_str());
        assert_eq!(SlotTag::of_key(key.expose()), Some(tag));
        assert_eq!(key.hash().tag(), tag);
        assert_eq!(&key.key_start()[3..7], tag.as_str());
        // The digest part is SHA-256 of the whole key.
        let digest = hex::encode(Sha256::digest(key.expose().as_bytes()));
        assert_eq!(key.hash().digest_hex(), digest);
        assert_eq!(
            key.hash().to_hex(),
            format!("{}{digest}", hex::encode(tag.as_str()))
        );
    }

    #[test]
    fn team_tags_are_stable_base62_and_spread() {
        assert_eq!(SlotTag::for_team("acme"), SlotTag::for_team("acme"));
        let tags: std::collections::BTreeSet<SlotTag> = (0..200)
            .map(|i| SlotTag::for_team(&format!("team-{i}")))
            .collect();
        assert!(tags.len() > 190, "team tags collide too often");
        for t in tags {
            assert!(t.as_str().bytes().all(|b| b.is_ascii_alphanumeric()));
            assert_eq!(t.as_str().len(), TAG_LEN);
        }
    }

    #[test]
    fn a_hash_of_a_non_key_still_has_a_tag_and_round_trips() {
        let h = KeyHash::of("not a key at all");
        assert!(SlotTag::from_bytes(h.tag().as_str().as_bytes()).is_some());
        assert_eq!(KeyHash::from_hex(&h.to_hex()), Some(h));
        // A tag that is not base62 is not a hash we made.
        let bad = format!("{}{}", hex::encode([0u8; 4]), h.digest_hex());
        assert_eq!(KeyHash::from_hex(&bad), None);
    }

    proptest! {
        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,80}") {
            let _ = check_format(&kg(), &s);
            let _ = KeyHash::of(&s);
        }

        /// The tag is inside the checksum: a key moved to another slot by hand is refused.
        #[test]
        fn a_changed_tag_is_caught(pos in 3usize..7, c in "[0-9A-Za-z]") {
            let key = NewKey::generate(&kg(), SlotTag::for_team("acme"));
            let mut bytes = key.expose().as_bytes().to_vec();
            let replacement = c.as_bytes()[0];
            prop_assume!(bytes[pos] != replacement);
            bytes[pos] = replacement;
            let changed = String::from_utf8(bytes).unwrap();
            prop_assert_eq!(check_format(&kg(), &changed), Err(KeyFormatError::BadChecksum));
        }

        #[test]
        fn any_single_character_change_is_caught(pos in 3usize..43, c in "[0-9A-Za-z]") {
            let key = NewKey::generate(&kg(), SlotTag::random());
            let mut bytes = key.expose().as_bytes().to_vec();
            let replacement = c.as_bytes()[0];
            prop_assume!(bytes[pos] != replacement);
            bytes[pos] = replacement;
            let changed = String::from_utf8(bytes).unwrap();
            prop_assert_eq!(check_format(&kg(), &changed), Err(KeyFormatError::BadChecksum));
        }

        #[test]
        fn any_truncation_is_caught(cut in 0usize..43) {
            let key = NewKey::generate(&kg(), SlotTag::random());
            prop_assert!(check_format(&kg(), &key.expose()[..cut]).is_err());
        }

        #[test]
        fn non_base62_is_caught(pos in 3usize..43, c in "[^0-9A-Za-z]") {
            let key = NewKey::generate(&kg(), SlotTag::random());
            let mut s: Vec<char> = key.expose().chars().collect();
            s[pos] = c.chars().next().unwrap();
            let changed: String = s.into_iter().collect();
            prop_assert!(check_format(&kg(), &changed).is_err());
        }
    }
}
