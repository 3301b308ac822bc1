//! The pure half of keys in request bodies: which body kind a `Content-Type` names, an
//! incremental `application/x-www-form-urlencoded` scanner, and the JSON top-level field
//! lookup. No I/O here, so property tests can drive every function directly; the reading,
//! limits and replay are in [`super::body`].

use super::CredentialError;
use super::body::{BodyError, PeekError};
use http::HeaderMap;
use http::header::{CONTENT_ENCODING, CONTENT_TYPE};
use std::ops::Range;

/// Longest key value taken from a body. Real keys are about 40 characters; the cap keeps a
/// hostile "key" field from becoming a large allocation or a long store lookup.
pub const MAX_KEY_LEN: usize = 1024;

/// Longest field name worth decoding; longer names cannot be one of ours (config caps them
/// at 256 bytes, and percent-encoding at most triples that).
const MAX_NAME_LEN: usize = 3 * 256;

/// What kind of body carries the key, as far as the `Content-Type` tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyKind {
    Urlencoded,
    Multipart { boundary: String },
    Json,
}

/// The body kind to parse, or `None` when the body is not one the enabled sources read (then
/// it is not read at all). A `Content-Type` that claims a form but cannot be parsed is an
/// error, not a pass: the upstream would not parse it either.
pub fn body_kind(
    headers: &HeaderMap,
    form: bool,
    json: bool,
) -> Result<Option<BodyKind>, PeekError> {
    let mut values = headers.get_all(CONTENT_TYPE).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(malformed("more than one Content-Type header"));
    }
    let text = value
        .to_str()
        .map_err(|_| malformed("the Content-Type header is not ASCII"))?;
    let media = text.split(';').next().unwrap_or("").trim();
    let is_json = media.eq_ignore_ascii_case("application/json")
        || (media.len() > 5
            && media.is_char_boundary(media.len() - 5)
            && media[media.len() - 5..].eq_ignore_ascii_case("+json"));
    let kind = if form && media.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        BodyKind::Urlencoded
    } else if form && media.eq_ignore_ascii_case("multipart/form-data") {
        let boundary = super::multipart::content_type_boundary(text)?;
        BodyKind::Multipart { boundary }
    } else if json && is_json {
        BodyKind::Json
    } else {
        return Ok(None);
    };
    Ok(Some(kind))
}

/// Why a body keygate would read for a key must not be read, though its `Content-Type` is one
/// of ours: the bytes here must be the text the upstream reads. Frameworks decode other
/// charsets (UTF-7 hides `"clientKey":"B"` in what reads here as a plain string), take an
/// RFC 2231 `charset*` or `boundary*` over the plain one (Django), and inflate compressed
/// bodies; the key they find could be another one. Charsets that are ASCII in its range
/// (Latin-1, windows-1252) read the same: field names are ASCII, and so are keys.
pub fn unreadable_reason(headers: &HeaderMap) -> Option<&'static str> {
    let text = headers.get(CONTENT_TYPE)?.to_str().ok()?.as_bytes();
    match super::multipart::header_param(text, b"charset") {
        Ok(None) => {}
        Ok(Some(charset))
            if [
                &b"utf-8"[..],
                b"utf8",
                b"us-ascii",
                b"ascii",
                b"iso-8859-1",
                b"latin1",
                b"windows-1252",
            ]
            .iter()
            .any(|c| charset.eq_ignore_ascii_case(c)) => {}
        Ok(Some(_)) => {
            return Some(
                "a body carrying the API key must be UTF-8 (the Content-Type names another charset)",
            );
        }
        Err(_) => return Some("the Content-Type has a malformed charset parameter"),
    }
    if super::multipart::has_extended_param(text, &[b"charset", b"boundary"]).unwrap_or(true) {
        return Some("the Content-Type has an RFC 2231 charset* or boundary* parameter");
    }
    for encoding in headers.get_all(CONTENT_ENCODING) {
        let identity = encoding.to_str().is_ok_and(|e| {
            e.split(',')
                .all(|e| e.trim().eq_ignore_ascii_case("identity"))
        });
        if !identity {
            return Some("a body carrying the API key cannot have a Content-Encoding");
        }
    }
    None
}

/// Whether `name` is not one of `fields` but some framework files it under one: ASP.NET
/// ignores case (as [`same_without_case`] does), PHP drops
/// leading spaces, cuts a name at a NUL, turns ` ` and `.` (and a `[` never closed) into `_`,
/// and reads `name[…]` as an array called `name`, as qs (Express) and Rails do. Such a field
/// next to the real one would give the upstream another key than the one checked.
/// Rack 2 (Rails up to 7.0) and qs also skip leading brackets and end the name at the next
/// one (`[clientKey]`, `clientKey]`).
pub fn is_lookalike(name: &[u8], fields: &[String]) -> bool {
    // Letters, digits, `_` and `-` are changed by none of the readings below (most names, on
    // the multipart path ~500 instructions each, callgrind): only case can make such a name
    // another parser's key field.
    if name
        .iter()
        .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
    {
        return fields
            .iter()
            .any(|f| f.as_bytes() == name || same_without_case(name, f));
    }
    lookalike(name, fields, false)
}

/// [`is_lookalike`] for a name known only by a prefix (`truncated`): what follows it is
/// unknown, so a `[` counts as closed, and a name that runs to the end of the prefix is a
/// look-alike when a field starts with it (PHP drops any number of leading spaces, Rack any
/// number of leading brackets, so the real name may begin just past the prefix).
fn lookalike(name: &[u8], fields: &[String], truncated: bool) -> bool {
    let matches = |base: &[u8], open: bool| {
        fields.iter().any(|f| {
            if open {
                f.as_bytes().starts_with(base)
            } else {
                f.as_bytes() == base
            }
        })
    };
    // PHP.
    let mut php = name;
    while let [b' ', rest @ ..] = php {
        php = rest;
    }
    let mut php_open = truncated;
    if let Some(nul) = memchr::memchr(0, php) {
        php = &php[..nul];
        php_open = false;
    }
    let mut base: Vec<u8> = Vec::with_capacity(php.len());
    for (i, &c) in php.iter().enumerate() {
        match c {
            b'[' if truncated || memchr::memchr(b']', &php[i..]).is_some() => {
                php_open = false;
                break;
            }
            b' ' | b'.' | b'[' => base.push(b'_'),
            c => base.push(c),
        }
    }
    // Rack 2 and qs.
    let rack = name
        .iter()
        .position(|&c| c != b'[' && c != b']')
        .map_or(&[][..], |i| &name[i..]);
    let rack_end = rack.iter().position(|&c| c == b'[' || c == b']');
    let rack_open = truncated && rack_end.is_none();
    // Django strips a multipart part's name (Python's `str.strip`: whitespace at either end,
    // Unicode's or, decoded as Latin-1, NBSP and NEL).
    let django = django_stripped(name, truncated);
    matches(&base, php_open)
        || matches(&rack[..rack_end.unwrap_or(rack.len())], rack_open)
        || (django.len() != name.len() && matches(django, truncated))
        || std::str::from_utf8(name).is_ok_and(|n| {
            let n = if truncated {
                n.trim_start_matches(is_python_space)
            } else {
                n.trim_matches(is_python_space)
            };
            n.len() != name.len() && matches(n.as_bytes(), truncated)
        })
        || (!truncated && fields.iter().any(|f| same_without_case(name, f)))
}

/// What Python's `str.isspace` holds for a character: Unicode's white space and the four
/// separators `\x1c`–`\x1f`.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

/// `name` without the bytes Python strips from it decoded as Latin-1, at the start (and, when
/// the whole name is known, at the end).
fn django_stripped(name: &[u8], truncated: bool) -> &[u8] {
    let space = |b: &u8| matches!(b, b'\t'..=b'\r' | 0x1c..=0x20 | 0x85 | 0xa0);
    let start = name.iter().position(|b| !space(b)).unwrap_or(name.len());
    let name = &name[start..];
    if truncated {
        return name;
    }
    let end = name.iter().rposition(|b| !space(b)).map_or(0, |i| i + 1);
    &name[..end]
}

/// ASP.NET's form and query collections, like Go's encoding/json, match names without case:
/// `CLIENTKEY` next to `clientKey` would be a second key field to it.
fn same_without_case(name: &[u8], field: &str) -> bool {
    if name.is_ascii() && field.is_ascii() {
        return name.eq_ignore_ascii_case(field.as_bytes());
    }
    std::str::from_utf8(name).is_ok_and(|name| folds_to(name, field))
}

/// Whether a query string has a parameter named like one of `fields` (or a look-alike): with
/// the key in the body, some frameworks (Flask's `request.values`, Rails' `params`) would let
/// the query's value win.
pub fn query_names_a_field(query: &str, fields: &[String]) -> bool {
    query.split(['&', ';']).any(|pair| {
        let name = pair.split('=').next().unwrap_or("");
        !name.is_empty()
            && decode_strict(name.as_bytes()).is_some_and(|n| {
                fields.iter().any(|f| f.as_bytes() == n.as_slice()) || is_lookalike(&n, fields)
            })
    })
}

fn malformed(reason: &'static str) -> PeekError {
    PeekError::Body(BodyError::Malformed(reason))
}

/// Checks a decoded key value the way header values are checked: trimmed of ASCII spaces and
/// tabs (not of other Unicode spaces, which would leave a different value upstream), not
/// empty, not absurdly long. An empty or oversized value is a malformed *key* (401), like in
/// headers.
pub fn accept_key(value: String) -> Result<String, PeekError> {
    let trimmed = value.trim_matches([' ', '\t']);
    if trimmed.is_empty() {
        return Err(CredentialError::Malformed("empty API key body field").into());
    }
    if trimmed.len() > MAX_KEY_LEN {
        return Err(CredentialError::Malformed("API key body field is too long").into());
    }
    Ok(if trimmed.len() == value.len() {
        value
    } else {
        trimmed.to_owned()
    })
}

/// A key found in an urlencoded body, with where its `name=value` pair was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundKey {
    pub value: String,
    /// Stream offsets of the pair, without separators.
    pub pair: Range<u64>,
    /// Whether a `&` follows the pair (it is not the body's last).
    pub followed_by_amp: bool,
}

impl FoundKey {
    /// The bytes to remove so the body reads as if the pair had never been there: the pair
    /// and the `&` after it, or, for the last pair, the `&` before it.
    pub fn strip_range(&self) -> Range<u64> {
        if self.followed_by_amp {
            self.pair.start..self.pair.end + 1
        } else if self.pair.start > 0 {
            self.pair.start - 1..self.pair.end
        } else {
            self.pair.clone()
        }
    }
}

/// Whether the scanner wants more input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    NeedMore,
    /// The key field is complete and nothing more needs reading.
    Done,
}

enum State {
    /// Reading a field name (still percent-encoded).
    Name(Vec<u8>),
    /// Reading the value of one of our fields.
    KeyValue(Vec<u8>),
    /// Inside a pair that is not ours: everything up to the next `&` is skipped unread, but
    /// for a `;`.
    Skip,
    /// After a `;` in a pair that is not ours, the name that older parsers (Go before 1.17,
    /// Django before 3.2, Python before 3.9.2) split a pair there for: `page=1;clientKey=B`
    /// is a second key field to them.
    ShadowName(Vec<u8>),
}

/// Finds the key in an `application/x-www-form-urlencoded` body fed in arbitrary pieces. It
/// holds only the pair being read (capped), never the body. With `want_all`, it reads to the
/// end and refuses a second key field; without, it stops once the first key field is complete.
pub struct UrlencodedScanner<'f> {
    fields: &'f [String],
    want_all: bool,
    /// Stream offset of the next byte fed.
    pos: u64,
    pair_start: u64,
    state: State,
    found: Option<FoundKey>,
    done: bool,
}

impl<'f> UrlencodedScanner<'f> {
    pub fn new(fields: &'f [String], want_all: bool) -> Self {
        Self {
            fields,
            want_all,
            pos: 0,
            pair_start: 0,
            state: State::Name(Vec::new()),
            found: None,
            done: false,
        }
    }

    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<Progress, PeekError> {
        while !chunk.is_empty() && !self.done {
            let used = match &mut self.state {
                State::Name(name) => match memchr::memchr3(b'=', b'&', b';', chunk) {
                    // Too long to be one of ours: skipping to the next `&` (or `;`, see
                    // `Skip`) is right whether or not the pair has a value. The name held
                    // has no `;`: one would have ended it.
                    Some(i) if name.len() + i > MAX_NAME_LEN => {
                        long_name(self.fields, name, chunk)?;
                        self.state = State::Skip;
                        0
                    }
                    // A name with a `;` is no field of ours, but older parsers split the
                    // pair there: each part is checked as they would read it.
                    Some(i) if chunk[i] == b';' => {
                        name.extend_from_slice(&chunk[..i]);
                        let first = std::mem::take(name);
                        self.refuse_shadow_key(&first)?;
                        self.pos += (i + 1) as u64;
                        self.state = State::ShadowName(Vec::new());
                        i + 1
                    }
                    Some(i) => {
                        name.extend_from_slice(&chunk[..i]);
                        let raw = std::mem::take(name);
                        let ours = self.name_is_ours(&raw)?;
                        if chunk[i] == b'=' {
                            self.state = if ours {
                                State::KeyValue(Vec::new())
                            } else {
                                State::Skip
                            };
                            self.pos += (i + 1) as u64;
                        } else {
                            // A bare `clientKey` with no `=`: ours, with an empty value.
                            self.pos += i as u64;
                            if ours {
                                self.end_key_pair(Vec::new(), true)?;
                            }
                            self.next_pair();
                        }
                        i + 1
                    }
                    None if name.len() + chunk.len() > MAX_NAME_LEN => {
                        long_name(self.fields, name, chunk)?;
                        self.state = State::Skip;
                        0
                    }
                    None => {
                        name.extend_from_slice(chunk);
                        self.pos += chunk.len() as u64;
                        chunk.len()
                    }
                },
                State::KeyValue(value) => {
                    let end = memchr::memchr(b'&', chunk);
                    let piece = &chunk[..end.unwrap_or(chunk.len())];
                    // Percent-encoding triples a character at most.
                    if value.len() + piece.len() > 3 * MAX_KEY_LEN {
                        return Err(
                            CredentialError::Malformed("API key body field is too long").into()
                        );
                    }
                    value.extend_from_slice(piece);
                    self.pos += piece.len() as u64;
                    match end {
                        Some(i) => {
                            let value = std::mem::take(value);
                            self.end_key_pair(value, true)?;
                            self.next_pair();
                            i + 1
                        }
                        None => chunk.len(),
                    }
                }
                State::Skip => match memchr::memchr2(b'&', b';', chunk) {
                    Some(i) if chunk[i] == b'&' => {
                        self.pos += i as u64;
                        self.next_pair();
                        i + 1
                    }
                    Some(i) => {
                        self.pos += (i + 1) as u64;
                        self.state = State::ShadowName(Vec::new());
                        i + 1
                    }
                    None => {
                        self.pos += chunk.len() as u64;
                        chunk.len()
                    }
                },
                State::ShadowName(name) => match memchr::memchr3(b'=', b'&', b';', chunk) {
                    Some(i) if name.len() + i > MAX_NAME_LEN => {
                        long_name(self.fields, name, chunk)?;
                        self.state = State::Skip;
                        0
                    }
                    Some(i) => {
                        name.extend_from_slice(&chunk[..i]);
                        let name = std::mem::take(name);
                        self.refuse_shadow_key(&name)?;
                        match chunk[i] {
                            b'&' => {
                                self.pos += i as u64;
                                self.next_pair();
                            }
                            b';' => self.pos += (i + 1) as u64,
                            _ => {
                                self.pos += (i + 1) as u64;
                                self.state = State::Skip;
                            }
                        }
                        i + 1
                    }
                    None if name.len() + chunk.len() > MAX_NAME_LEN => {
                        long_name(self.fields, name, chunk)?;
                        self.state = State::Skip;
                        0
                    }
                    None => {
                        name.extend_from_slice(chunk);
                        self.pos += chunk.len() as u64;
                        chunk.len()
                    }
                },
            };
            chunk = &chunk[used..];
        }
        Ok(if self.done {
            Progress::Done
        } else {
            Progress::NeedMore
        })
    }

    /// The body ended: the pair being read is complete. Returns the key, if any.
    pub fn finish(mut self) -> Result<Option<FoundKey>, PeekError> {
        if !self.done {
            match std::mem::replace(&mut self.state, State::Skip) {
                State::Name(name) => {
                    if self.name_is_ours(&name)? {
                        self.end_key_pair(Vec::new(), false)?;
                    }
                }
                State::KeyValue(value) => self.end_key_pair(value, false)?,
                State::ShadowName(name) => self.refuse_shadow_key(&name)?,
                State::Skip => {}
            }
        }
        Ok(self.found)
    }

    /// The key found so far, for a caller that stops before the end of the body (the pair
    /// being read then is incomplete and is not looked at).
    pub fn into_found(self) -> Option<FoundKey> {
        self.found
    }

    fn name_is_ours(&self, raw: &[u8]) -> Result<bool, PeekError> {
        if raw.is_empty() {
            return Ok(false);
        }
        let name = decode_strict(raw)
            .ok_or_else(|| malformed("invalid percent-encoding in a form field name"))?;
        if self.fields.iter().any(|f| f.as_bytes() == name.as_slice()) {
            return Ok(true);
        }
        if is_lookalike(&name, self.fields) {
            return Err(CredentialError::Ambiguous("API key body field").into());
        }
        Ok(false)
    }

    /// A name after a `;` (see [`State::ShadowName`]) that names a key field, or looks like
    /// one, is a second key to older parsers.
    fn refuse_shadow_key(&self, raw: &[u8]) -> Result<(), PeekError> {
        let Some(name) = decode_strict(raw) else {
            return Ok(());
        };
        if self.fields.iter().any(|f| f.as_bytes() == name.as_slice())
            || is_lookalike(&name, self.fields)
        {
            return Err(CredentialError::Ambiguous("API key body field").into());
        }
        Ok(())
    }

    /// A pair of ours ends at `self.pos` (the `&` or the end of the body).
    fn end_key_pair(&mut self, raw: Vec<u8>, followed_by_amp: bool) -> Result<(), PeekError> {
        if self.found.is_some() {
            return Err(CredentialError::Ambiguous("API key body field").into());
        }
        let bytes = decode_strict(&raw)
            .ok_or_else(|| malformed("invalid percent-encoding in the API key field"))?;
        let value =
            String::from_utf8(bytes).map_err(|_| malformed("the API key field is not UTF-8"))?;
        let value = accept_key(value)?;
        self.found = Some(FoundKey {
            value,
            pair: self.pair_start..self.pos,
            followed_by_amp,
        });
        if !self.want_all && followed_by_amp {
            self.done = true;
        }
        Ok(())
    }

    /// Moves past the `&` at `self.pos`.
    fn next_pair(&mut self) {
        self.pos += 1;
        self.pair_start = self.pos;
        self.state = State::Name(Vec::new());
    }
}

/// A name too long to be one of ours (`name`, then `more` of it) may still be filed under
/// one (PHP drops any number of leading spaces and cuts at a NUL): judged by its first
/// `MAX_NAME_LEN` bytes.
fn long_name(fields: &[String], name: &[u8], more: &[u8]) -> Result<(), PeekError> {
    let mut prefix = name.to_vec();
    prefix.extend_from_slice(
        &more[..more
            .len()
            .min(MAX_NAME_LEN + 1 - name.len().min(MAX_NAME_LEN))],
    );
    // An escape cut in two at the end is left out.
    let cut = match memchr::memrchr(b'%', &prefix) {
        Some(p) if prefix.len() - p < 3 => p,
        _ => prefix.len(),
    };
    let decoded = decode_strict(&prefix[..cut])
        .ok_or_else(|| malformed("invalid percent-encoding in a form field name"))?;
    if lookalike(&decoded, fields, true) {
        return Err(CredentialError::Ambiguous("API key body field").into());
    }
    Ok(())
}

/// Form decoding (`+` is a space, `%XX` a byte) that refuses a `%` not followed by two hex
/// digits instead of passing it through as lenient decoders do: a key must mean one thing.
/// `None`: a bad escape.
pub fn decode_strict(raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = raw.get(i + 1).and_then(|h| hex(*h))?;
                let lo = raw.get(i + 2).and_then(|h| hex(*h))?;
                out.push(hi << 4 | lo);
                i += 2;
            }
            _ => out.push(b),
        }
        i += 1;
    }
    Some(out)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Finds the key among the top-level fields of a whole JSON body. Not an object: no key.
/// Two key fields: ambiguous. A key field that is not a string: malformed.
pub fn json_key(body: &[u8], fields: &[String]) -> Result<Option<String>, PeekError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let found = serde::Deserializer::deserialize_any(&mut de, TopLevel { fields })
        .and_then(|found| de.end().map(|()| found))
        .map_err(|_| malformed("the body is not valid JSON"))?;
    found?.map(accept_key).transpose()
}

/// Whether two names are equal after simple case folding (as Go's `strings.EqualFold`).
fn folds_to(a: &str, b: &str) -> bool {
    let fold = |c: char| match c {
        'ſ' => 's',
        c => c.to_lowercase().next().unwrap_or(c),
    };
    a.chars().map(fold).eq(b.chars().map(fold))
}

struct TopLevel<'f> {
    fields: &'f [String],
}

impl<'de> serde::de::Visitor<'de> for TopLevel<'_> {
    /// Syntax errors are the deserializer's; the inner result is about the key.
    type Value = Result<Option<String>, PeekError>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found: Option<String> = None;
        let mut problem: Option<PeekError> = None;
        // Read to the end even after a problem, so a syntax error later still wins (400
        // either way, but the reason stays accurate).
        while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if !self.fields.iter().any(|f| *f == name) {
                // Go's encoding/json (and ASP.NET) match names without case, Unicode's
                // simple folding included (the Kelvin sign is a `k`).
                if self.fields.iter().any(|f| folds_to(&name, f)) {
                    problem.get_or_insert(CredentialError::Ambiguous("API key body field").into());
                }
                map.next_value::<serde::de::IgnoredAny>()?;
                continue;
            }
            match map.next_value::<serde_json::Value>()? {
                serde_json::Value::String(s) if found.is_none() => found = Some(s),
                serde_json::Value::String(_) => {
                    problem.get_or_insert(CredentialError::Ambiguous("API key body field").into());
                }
                _ => {
                    problem.get_or_insert(malformed(
                        "the API key field of the JSON body is not a string",
                    ));
                }
            }
        }
        Ok(match problem {
            Some(p) => Err(p),
            None => Ok(found),
        })
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(Ok(None))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Ok(None))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Ok(None))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Ok(None))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Ok(None))
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Ok(None))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Ok(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fields() -> Vec<String> {
        vec!["clientKey".into(), "api_key".into()]
    }

    fn kind(ct: &str) -> Result<Option<BodyKind>, PeekError> {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, ct.parse().unwrap());
        body_kind(&h, true, true)
    }

    fn scan(body: &[u8], split: usize, want_all: bool) -> Result<Option<FoundKey>, PeekError> {
        let f = fields();
        let mut s = UrlencodedScanner::new(&f, want_all);
        for piece in body.chunks(split.max(1)) {
            if s.feed(piece)? == Progress::Done {
                return Ok(s.into_found());
            }
        }
        s.finish()
    }

    fn key_of(body: &str) -> Result<Option<String>, PeekError> {
        scan(body.as_bytes(), usize::MAX, true).map(|f| f.map(|f| f.value))
    }

    /// Go before 1.17, Django before 3.2 and Python before 3.9.2 also split pairs at `;`.
    #[test]
    fn a_key_field_after_a_semicolon_is_a_second_key() {
        for body in [
            "page=1;clientKey=B&clientKey=A",
            "clientKey=A&page=1;clientKey=B",
            "clientKey=A&page=1;x=2;clientKey=B",
            "a;clientKey=B&clientKey=A",
            "page=1;clientKey&clientKey=A",
            "page=1;CLIENTKEY=B&clientKey=A",
            "page=1;client%4Bey[]=B&clientKey=A",
        ] {
            for split in [1, 2, 5, usize::MAX] {
                assert!(
                    matches!(
                        scan(body.as_bytes(), split, true),
                        Err(PeekError::Credential(CredentialError::Ambiguous(_)))
                    ),
                    "{body} split {split}"
                );
            }
        }
        // However a long first name arrives (review: one past `MAX_NAME_LEN` in pieces hid
        // the `;`).
        for filler in [MAX_NAME_LEN - 8, MAX_NAME_LEN, MAX_NAME_LEN + 8] {
            for shape in [
                "{x};clientKey=B&clientKey=A",
                "clientKey=A&{x};clientKey=B",
                "a={x};clientKey=B&clientKey=A",
            ] {
                let body = shape.replace("{x}", &"x".repeat(filler));
                for split in [1, 2, 5, 767, usize::MAX] {
                    assert!(
                        matches!(
                            scan(body.as_bytes(), split, true),
                            Err(PeekError::Credential(CredentialError::Ambiguous(_)))
                        ),
                        "{filler} {shape} split {split}"
                    );
                }
            }
        }
        for body in ["note=a;b=c;d&clientKey=A", "x=;;&clientKey=A&y=1;z"] {
            for split in [1, 3, usize::MAX] {
                let found = scan(body.as_bytes(), split, true).unwrap();
                assert_eq!(found.map(|f| f.value).as_deref(), Some("A"), "{body}");
            }
        }
    }

    #[test]
    fn content_types() {
        assert_eq!(
            kind("application/x-www-form-urlencoded; charset=UTF-8").unwrap(),
            Some(BodyKind::Urlencoded)
        );
        assert_eq!(
            kind("Multipart/Form-Data; boundary=\"a b:c\"").unwrap(),
            Some(BodyKind::Multipart {
                boundary: "a b:c".into()
            })
        );
        assert_eq!(
            kind("multipart/form-data; boundary=----x").unwrap(),
            Some(BodyKind::Multipart {
                boundary: "----x".into()
            })
        );
        assert_eq!(kind("application/json").unwrap(), Some(BodyKind::Json));
        assert_eq!(
            kind("application/vnd.api+json").unwrap(),
            Some(BodyKind::Json)
        );
        assert_eq!(kind("text/plain").unwrap(), None);
        assert_eq!(kind("multipart/mixed; boundary=x").unwrap(), None);
        for bad in [
            "multipart/form-data",
            "multipart/form-data; boundary=",
            "multipart/form-data; boundary=\"\"",
            "multipart/form-data; boundary=a; Boundary=b",
            &format!("multipart/form-data; boundary={}", "x".repeat(71)),
        ] {
            assert!(
                matches!(kind(bad), Err(PeekError::Body(BodyError::Malformed(_)))),
                "{bad}"
            );
        }
        let mut h = HeaderMap::new();
        h.append(CONTENT_TYPE, "application/json".parse().unwrap());
        h.append(CONTENT_TYPE, "text/plain".parse().unwrap());
        assert!(body_kind(&h, true, true).is_err());
        // Only the enabled sources read bodies.
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, "application/json".parse().unwrap());
        assert_eq!(body_kind(&h, true, false).unwrap(), None);
        assert_eq!(body_kind(&HeaderMap::new(), true, true).unwrap(), None);
    }

    #[test]
    fn urlencoded_key_anywhere_and_decoded() {
        assert_eq!(key_of("clientKey=k1").unwrap().as_deref(), Some("k1"));
        assert_eq!(
            key_of("page=2&perPage=10&clientKey=kg_a%5Fb&x")
                .unwrap()
                .as_deref(),
            Some("kg_a_b")
        );
        assert_eq!(key_of("api_key=k+2&").unwrap().as_deref(), Some("k 2"));
        assert_eq!(key_of("client%4Bey=k3").unwrap().as_deref(), Some("k3"));
        // ASP.NET reads names without case (Unicode's simple folding: the Kelvin sign is a k).
        for body in [
            "clientkey=k&other=1",
            "clientKey=A&CLIENTKEY=B",
            "CLIENTKEY=B&clientKey=A",
            "client%E2%84%AAey=B&clientKey=A",
        ] {
            assert!(
                matches!(
                    key_of(body),
                    Err(PeekError::Credential(CredentialError::Ambiguous(_)))
                ),
                "{body}"
            );
        }
        assert_eq!(key_of("").unwrap(), None);
        assert_eq!(key_of("&&=&").unwrap(), None);
        // Values that are not ours are not decoded, so lenient clients still pass.
        assert_eq!(
            key_of("note=100%&clientKey=k4").unwrap().as_deref(),
            Some("k4")
        );
    }

    #[test]
    fn urlencoded_refusals() {
        let body_err = |b: &str| matches!(key_of(b), Err(PeekError::Body(BodyError::Malformed(_))));
        assert!(body_err("clientKey=%zz"));
        assert!(body_err("clientKey=abc%4"));
        assert!(body_err("clientKey=%FF%FE"));
        assert!(body_err("a%g1=1&clientKey=k"));
        assert!(matches!(
            key_of("clientKey=a&clientKey=b"),
            Err(PeekError::Credential(CredentialError::Ambiguous(_)))
        ));
        assert!(matches!(
            key_of("clientKey=a&api_key=b"),
            Err(PeekError::Credential(CredentialError::Ambiguous(_)))
        ));
        for empty in [
            "clientKey=",
            "clientKey",
            "a=1&clientKey&b=2",
            "clientKey=+%20",
        ] {
            assert!(
                matches!(
                    key_of(empty),
                    Err(PeekError::Credential(CredentialError::Malformed(_)))
                ),
                "{empty}"
            );
        }
        let long = format!("clientKey={}", "k".repeat(MAX_KEY_LEN + 1));
        assert!(matches!(
            key_of(&long),
            Err(PeekError::Credential(CredentialError::Malformed(_)))
        ));
    }

    #[test]
    fn without_want_all_the_first_key_wins_and_reading_stops() {
        let f = fields();
        let mut s = UrlencodedScanner::new(&f, false);
        assert_eq!(s.feed(b"a=1&clientKey=k").unwrap(), Progress::NeedMore);
        assert_eq!(s.feed(b"1&clientKey=k2&rest").unwrap(), Progress::Done);
        assert_eq!(s.into_found().unwrap().value, "k1");
        // Stopping early never reports a key whose value may continue.
        let mut s = UrlencodedScanner::new(&f, false);
        assert_eq!(s.feed(b"clientKey=partial").unwrap(), Progress::NeedMore);
        assert_eq!(s.into_found(), None);
    }

    #[test]
    fn strip_ranges_remove_exactly_one_pair() {
        for (body, expected) in [
            ("a=1&clientKey=k&b=2", "a=1&b=2"),
            ("clientKey=k&b=2", "b=2"),
            ("a=1&clientKey=k", "a=1"),
            ("clientKey=k", ""),
        ] {
            let found = key_of(body).unwrap();
            let f = scan(body.as_bytes(), usize::MAX, true).unwrap().unwrap();
            assert_eq!(found.as_deref(), Some("k"));
            let r = f.strip_range();
            let mut out = body.as_bytes()[..r.start as usize].to_vec();
            out.extend_from_slice(&body.as_bytes()[r.end as usize..]);
            assert_eq!(String::from_utf8(out).unwrap(), expected, "{body}");
        }
    }

    #[test]
    fn json_top_level_string_field() {
        let f = fields();
        let k = |b: &str| json_key(b.as_bytes(), &f);
        assert_eq!(
            k(r#"{"page":2,"nested":{"clientKey":"no"},"clientKey":"k1"}"#).unwrap(),
            Some("k1".into())
        );
        assert_eq!(k(r#"{"api_key":"k\u0032"}"#).unwrap(), Some("k2".into()));
        assert_eq!(k(r#"[{"clientKey":"k"}]"#).unwrap(), None);
        assert_eq!(k(r#""clientKey""#).unwrap(), None);
        assert_eq!(k("{}").unwrap(), None);
        assert!(matches!(
            k(r#"{"clientKey":1}"#),
            Err(PeekError::Body(BodyError::Malformed(_)))
        ));
        assert!(matches!(
            k(r#"{"clientKey":"a","clientKey":"b"}"#),
            Err(PeekError::Credential(CredentialError::Ambiguous(_)))
        ));
        assert!(matches!(
            k(r#"{"clientKey":"a""#),
            Err(PeekError::Body(BodyError::Malformed(_)))
        ));
        assert!(matches!(
            k(r#"{"clientKey":"a"} x"#),
            Err(PeekError::Body(BodyError::Malformed(_)))
        ));
        // Deep nesting is skipped, not recursed into (no stack overflow).
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert_eq!(k(&deep(100_000)).unwrap(), None);
        assert_eq!(
            k(&format!(r#"{{"a":{},"clientKey":"k"}}"#, deep(100_000))).unwrap(),
            Some("k".into())
        );
        assert!(k(&format!(r#"{{"clientKey":{}}}"#, deep(100_000))).is_err());
    }

    /// Bodies a framework reads another key from than the one found here (found in review,
    /// each checked against the framework named): refused, not guessed.
    #[test]
    fn what_frameworks_read_differently_is_refused() {
        let ambiguous = |r: Result<Option<String>, PeekError>| {
            matches!(r, Err(PeekError::Credential(CredentialError::Ambiguous(_))))
        };
        for body in [
            "clientKey=A&+clientKey=B",       // PHP drops leading spaces
            "clientKey=A&clientKey%00junk=B", // PHP cuts at a NUL
            "clientKey=A&clientKey[]=B",      // PHP, qs, Rails: an array named clientKey
            "clientKey%5B0%5D=B&clientKey=A", // the same, encoded, first
            "api_key=A&api.key=B",            // PHP: `.` is `_`
            "api_key=A&api+key=B",            // PHP: ` ` is `_`
            "api_key=A&api[key=B",            // PHP: an unclosed `[` is `_`
        ] {
            assert!(
                ambiguous(scan(body.as_bytes(), 3, true).map(|f| f.map(|f| f.value))),
                "{body}"
            );
        }
        // A stream stops at the first key field (README: "Two keys"); a look-alike before it
        // is still seen.
        assert!(ambiguous(
            scan(b"clientKey%5B0%5D=B&clientKey=A", 3, false).map(|f| f.map(|f| f.value))
        ));
        // Not look-alikes: other names that merely contain the field's.
        assert_eq!(
            key_of("clientKeys=x&xclientKey=y&client_Key=z&clientKey=A")
                .unwrap()
                .as_deref(),
            Some("A")
        );
        assert!(!is_lookalike(b"clientKey_", &fields()));
        assert!(is_lookalike(b"  clientKey[a][b]", &fields()));
        // Django strips a multipart part's name: whitespace at either end, Python's.
        for name in [
            &b"clientKey "[..],
            b"\tclientKey",
            b"clientKey\t",
            b"clientKey\x0c",
            b"clientKey\x1f",
            b"\xa0clientKey",
            "clientKey\u{3000}".as_bytes(),
        ] {
            assert!(is_lookalike(name, &fields()), "{name:?}");
        }
        assert!(!is_lookalike(b"client Key", &fields()));

        // Unicode spaces are part of the value (the upstream keeps them), ASCII ones are not.
        assert_eq!(key_of("clientKey=+A%09").unwrap().as_deref(), Some("A"));
        assert_eq!(
            key_of("clientKey=A%E2%80%83").unwrap().as_deref(),
            Some("A\u{2003}")
        );

        // JSON names equal without case (Go's encoding/json, ASP.NET).
        let f = fields();
        for body in [
            r#"{"clientKey":"A","CLIENTKEY":"B"}"#,
            r#"{"clientkey":"B","clientKey":"A"}"#,
            r#"{"clientKey":"A","client\u212aey":"B"}"#,
            r#"{"api_key":"A","API_KEY":"B"}"#,
        ] {
            assert!(ambiguous(json_key(body.as_bytes(), &f)), "{body}");
        }
        assert!(folds_to("ſKey", "skey") && folds_to("\u{212a}", "k") && !folds_to("ke", "key"));
        assert_eq!(
            json_key(br#"{"clientKeys":"x","clientKey":"A"}"#, &f)
                .unwrap()
                .as_deref(),
            Some("A")
        );

        // A query parameter of the same name.
        assert!(query_names_a_field("a=1&clientKey=B", &f));
        assert!(query_names_a_field("client%4Bey=B", &f));
        assert!(query_names_a_field("x=1;api.key=B", &f));
        assert!(query_names_a_field("clientKey", &f));
        assert!(!query_names_a_field("page=2&key=x&clientKeys=1", &f));
    }

    #[test]
    fn charsets_and_encodings_other_than_plain_utf8_are_not_read() {
        let reason = |ct: &str, enc: Option<&str>| {
            let mut h = HeaderMap::new();
            h.insert(CONTENT_TYPE, ct.parse().unwrap());
            if let Some(enc) = enc {
                h.append(CONTENT_ENCODING, enc.parse().unwrap());
            }
            unreadable_reason(&h)
        };
        for ct in [
            "application/json; charset=utf-7",
            "application/x-www-form-urlencoded; charset=\"UTF-7\"",
            "multipart/form-data; boundary=XyZ; charset=utf-16",
            "application/json; charset=utf-8; charset=utf-7",
            "application/json; charset=\"open",
            // Django takes these over the plain parameters.
            "application/x-www-form-urlencoded; charset=utf-8; charset*=utf-7",
            "multipart/form-data; boundary=b1; boundary*=b2",
            "multipart/form-data; boundary=b1; BOUNDARY*0=b2",
        ] {
            assert!(reason(ct, None).is_some(), "{ct}");
        }
        for ct in [
            "application/json; charset=UTF-8",
            "application/json;charset=\"utf8\"",
            "application/x-www-form-urlencoded; charset=us-ascii",
            "application/x-www-form-urlencoded; charset=ISO-8859-1",
            "multipart/form-data; boundary=b1; charsets=x",
        ] {
            assert_eq!(reason(ct, None), None, "{ct}");
        }
        assert!(reason("application/x-www-form-urlencoded", Some("gzip")).is_some());
        assert!(reason("application/json", Some("identity, br")).is_some());
        assert_eq!(reason("application/json", Some("Identity")), None);
        // The kind is still told (the caller decides): a charset does not change it.
        assert_eq!(
            kind("application/json; charset=utf-7").unwrap(),
            Some(BodyKind::Json)
        );
    }

    #[test]
    fn long_and_bracketed_names_are_judged_too() {
        let ambiguous = |body: Vec<u8>| {
            matches!(
                scan(&body, 7, true),
                Err(PeekError::Credential(CredentialError::Ambiguous(_)))
            )
        };
        // `head`, `fill` repeated `n` times, then `tail`.
        let long = |head: &[u8], fill: u8, n: usize, tail: &[u8]| {
            let mut b = head.to_vec();
            b.extend(std::iter::repeat_n(fill, n));
            b.extend_from_slice(tail);
            b
        };
        // PHP cuts at the NUL, or drops any number of leading spaces: past the name cap.
        assert!(ambiguous(long(
            b"clientKey=A&clientKey%00",
            b'x',
            800,
            b"=B"
        )));
        assert!(ambiguous(long(b"clientKey=A&", b'+', 769, b"clientKey=B")));
        // Spaces or brackets up to the cap, then the start of a field name.
        assert!(ambiguous(long(b"clientKey=A&", b'+', 765, b"clientKey=B")));
        assert!(ambiguous(long(b"clientKey=A&", b'[', 765, b"clientKey]=B")));
        // A bad escape in a long name is as malformed as in a short one.
        assert!(matches!(
            scan(
                &long(b"clientKey=A&clientKey%00%zz", b'x', 800, b"=B"),
                7,
                true
            ),
            Err(PeekError::Body(BodyError::Malformed(_)))
        ));
        assert!(
            scan(&long(b"clientKey=A&", b'y', 800, b"=B"), 7, true)
                .unwrap()
                .is_some()
        );
        // Rack 2 (Rails up to 7.0) and qs: leading brackets skipped, the name ends at one.
        for name in ["[clientKey]", "]clientKey", "clientKey]", "[[clientKey]]]"] {
            assert!(is_lookalike(name.as_bytes(), &fields()), "{name}");
            assert!(
                ambiguous(format!("clientKey=A&{name}=B").into_bytes()),
                "{name}"
            );
        }
        assert!(query_names_a_field("%5BclientKey%5D=B", &fields()));
        // A key keeps CR and LF: trimmed of spaces and tabs only.
        assert_eq!(
            key_of("clientKey=A%0D%0A").unwrap().as_deref(),
            Some("A\r\n")
        );
    }

    fn pair_strategy() -> impl Strategy<Value = (String, String)> {
        ("[a-zA-Z_]{1,8}", "[a-zA-Z0-9%+._=-]{0,12}").prop_filter("not a key field", |(n, _)| {
            n != "clientKey" && n != "api_key"
        })
    }

    proptest! {
        /// The shortcut for plain names answers as the full rules do.
        #[test]
        fn plain_names_are_look_alikes_exactly_when_the_rules_say(
            name in "[a-zA-Z0-9_-]{0,12}|(?i:clientkey|api_key)",
        ) {
            prop_assert_eq!(
                is_lookalike(name.as_bytes(), &fields()),
                lookalike(name.as_bytes(), &fields(), false)
            );
        }

        #[test]
        fn scanner_never_panics(body in proptest::collection::vec(any::<u8>(), 0..400), split in 1usize..50, want_all: bool) {
            let _ = scan(&body, split, want_all);
        }

        /// Names around the 768-byte cap, made of what the look-alike rules look at.
        #[test]
        fn long_names_never_panic(
            name in proptest::collection::vec(prop_oneof![
                Just(b'+'), Just(b'['), Just(b']'), Just(b'%'), Just(b'0'), Just(b'.'),
                Just(b'c'), Just(b'K'), Just(b'x'),
            ], 700..900),
            tail in prop_oneof![Just(&b"clientKey=B"[..]), Just(&b"=B"[..]), Just(&b""[..])],
            split in 1usize..300,
            want_all: bool,
        ) {
            let mut body = b"clientKey=A&".to_vec();
            body.extend_from_slice(&name);
            body.extend_from_slice(tail);
            let _ = scan(&body, split, want_all);
        }

        #[test]
        fn key_is_found_wherever_it_is_and_however_the_body_is_cut(
            before in proptest::collection::vec(pair_strategy(), 0..20),
            after in proptest::collection::vec(pair_strategy(), 0..20),
            key in "[a-zA-Z0-9_]{1,40}",
            split in 1usize..64,
            want_all: bool,
        ) {
            let enc = |(n, v): &(String, String)| format!("{n}={}", v.replace('%', "%25").replace('=', "%3D").replace('+', "%2B"));
            let mut pairs: Vec<String> = before.iter().map(enc).collect();
            pairs.push(format!("clientKey={key}"));
            pairs.extend(after.iter().map(enc));
            let body = pairs.join("&");
            let found = scan(body.as_bytes(), split, want_all).unwrap().unwrap();
            prop_assert_eq!(&found.value, &key);
            let r = found.strip_range();
            let mut stripped = body.as_bytes()[..r.start as usize].to_vec();
            stripped.extend_from_slice(&body.as_bytes()[r.end as usize..]);
            let mut expected: Vec<String> = before.iter().map(enc).collect();
            expected.extend(after.iter().map(enc));
            prop_assert_eq!(String::from_utf8(stripped).unwrap(), expected.join("&"));
        }

        #[test]
        fn non_utf8_or_bad_escapes_in_the_key_are_refused(bytes in proptest::collection::vec(128u8..=255, 1..8)) {
            let enc: String = bytes.iter().map(|b| format!("%{b:02X}")).collect();
            let body = format!("clientKey={enc}");
            let r = scan(body.as_bytes(), 3, true);
            if std::str::from_utf8(&bytes).is_err() {
                prop_assert!(matches!(r, Err(PeekError::Body(BodyError::Malformed(_)))));
            }
        }

        #[test]
        fn json_never_panics(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = json_key(&body, &fields());
        }
    }
}
