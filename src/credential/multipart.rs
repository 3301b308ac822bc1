//! Finds the key field in a `multipart/form-data` body (RFC 7578, framed as RFC 2046 §5.1.1
//! says) fed in arbitrary pieces. It only frames parts and reads the `name` of each part's
//! `Content-Disposition`: the contents of other parts are skipped, never held.
//!
//! Why not multer, which keygate used before: multer builds a new substring searcher and
//! formats the delimiter again on every search, and turns every part's headers into an
//! `http::HeaderMap`. On the harness's 4 KiB four-part POST that was ~50 000 instructions per
//! request, more than the rest of the request path; framing with one searcher built per body
//! costs a tenth of that. multer stays the reference in this module's property tests.

use super::CredentialError;
use super::body::{BodyError, PeekError};
use super::form::{self, Progress};
use memchr::memmem;
use std::borrow::Cow;

/// Part header lines beyond these are refused (multer's limit too).
const MAX_PART_HEADERS: usize = 32;
/// A part's header block longer than this is refused: it is a few short lines in practice.
const MAX_PART_HEADER_BYTES: usize = 8 * 1024;

enum State {
    /// Before the first boundary (an optional preamble, skipped).
    Preamble { at_start: bool },
    /// Right after a boundary: `--` ends the body, anything else starts a part.
    AfterBoundary,
    /// Transport padding (spaces, tabs) up to the line break that starts a part's headers.
    Padding,
    /// A part's header block, up to its empty line; `scanned` bytes held no end yet.
    Headers { scanned: usize },
    /// The first bytes of a part's content: `--boundary` there is refused (Go and Werkzeug
    /// take it for a delimiter, the header block's last CRLF for its line break).
    ContentStart(Option<Vec<u8>>),
    /// A part's content up to the next delimiter; `Some` collects the value of our field.
    Content(Option<Vec<u8>>),
    /// After the close delimiter, with `want_all`: only line breaks and spaces may follow.
    /// Django and PHP read on past the close delimiter and would take a part there.
    Epilogue,
    /// The close delimiter was read, or the key without `want_all`: nothing more is parsed.
    Done,
}

/// Finds the key in a multipart body. It holds at most a part's header block, or the tail of
/// a piece that may begin a delimiter, plus our field's value (capped), never a whole part.
/// With `want_all` it reads to the close delimiter and refuses a second key field; without, it
/// stops once the first key field is complete.
pub struct MultipartScanner<'f> {
    fields: &'f [String],
    want_all: bool,
    /// `\r\n--boundary`: what ends a part's content (and, after a preamble, begins the first).
    delimiter: Vec<u8>,
    /// Searches for `--boundary`: the bytes before each match tell a delimiter (CRLF) from a
    /// line some parsers take for one (a bare LF or CR) and from content (anything else).
    finder: memmem::Finder<'static>,
    /// Bytes fed but not yet parsed.
    pending: Vec<u8>,
    state: State,
    found: Option<String>,
}

impl<'f> MultipartScanner<'f> {
    pub fn new(boundary: &str, fields: &'f [String], want_all: bool) -> Self {
        let mut delimiter = Vec::with_capacity(boundary.len() + 4);
        delimiter.extend_from_slice(b"\r\n--");
        delimiter.extend_from_slice(boundary.as_bytes());
        let finder = memmem::Finder::new(&delimiter[2..]).into_owned();
        Self {
            fields,
            want_all,
            delimiter,
            finder,
            pending: Vec::new(),
            state: State::Preamble { at_start: true },
            found: None,
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) -> Result<Progress, PeekError> {
        if matches!(self.state, State::Done) {
            return Ok(Progress::Done);
        }
        // Parsed in place when nothing is pending (a body that comes in one piece is never
        // copied); only what could not be parsed yet is kept.
        let mut pending = std::mem::take(&mut self.pending);
        let in_place = pending.is_empty();
        if !in_place {
            pending.extend_from_slice(chunk);
        }
        let data: &[u8] = if in_place { chunk } else { &pending };
        let mut pos = 0;
        let result = loop {
            match self.step(&data[pos..]) {
                Ok(Some(used)) => pos += used,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
            if matches!(self.state, State::Done) {
                break Ok(());
            }
        };
        if in_place {
            pending.extend_from_slice(&chunk[pos..]);
        } else {
            pending.drain(..pos);
        }
        self.pending = pending;
        result?;
        Ok(if matches!(self.state, State::Done) {
            Progress::Done
        } else {
            Progress::NeedMore
        })
    }

    /// The body ended. Returns the key, if any; a body that ends before its close delimiter
    /// is malformed (unless the key was complete and nothing more was wanted).
    pub fn finish(self) -> Result<Option<String>, PeekError> {
        match self.state {
            State::Done | State::Epilogue => Ok(self.found),
            // Ended inside the line after the key's field: no `--boundaryX` follows it, as
            // nothing does. (multer gives the key here too.)
            State::AfterBoundary | State::Padding if !self.want_all && self.found.is_some() => {
                Ok(self.found)
            }
            State::Content(_) | State::ContentStart(_) => {
                Err(malformed("a multipart part is truncated"))
            }
            State::Headers { .. } => Err(malformed("a multipart part's headers are truncated")),
            State::Preamble { .. } | State::AfterBoundary | State::Padding => Err(malformed(
                "the multipart body ends early or does not use the boundary of its Content-Type",
            )),
        }
    }

    /// The key, for a caller that stops before the end of the body: only once the line that
    /// closes its field has been read whole (a delimiter cut short is not yet one).
    pub fn into_found(self) -> Option<String> {
        self.found
            .filter(|_| matches!(self.state, State::Done | State::Epilogue))
    }

    /// One step of the state machine over the unparsed bytes: `Some(n)` consumed `n` of them
    /// (or moved to a state that parses them differently), `None` needs more input.
    fn step(&mut self, data: &[u8]) -> Result<Option<usize>, PeekError> {
        let dlen = self.delimiter.len();
        match &mut self.state {
            State::Preamble { at_start } => {
                if *at_start {
                    // The first boundary may open the body without a line break before it.
                    let dash_boundary = &self.delimiter[2..];
                    if data.len() < dash_boundary.len() && dash_boundary.starts_with(data) {
                        return Ok(None);
                    }
                    *at_start = false;
                    if data.starts_with(dash_boundary) {
                        self.state = State::AfterBoundary;
                        return Ok(Some(dash_boundary.len()));
                    }
                }
                // The first `--boundary` must begin a CRLF line. Parsers differ on one that
                // does not (after a bare LF or CR, or inside a line): some start the parts
                // there, others skip it as preamble; the upstream could read a different
                // key from the one checked here, so such a body is refused. What is kept
                // between pieces (`dlen - 1` bytes) always includes the two bytes before a
                // match that begins in it.
                let dash_boundary = &self.delimiter[2..];
                let found = self.finder.find(data);
                let skipped = match found {
                    Some(i) => &data[..i],
                    None => &data[..data.len().saturating_sub(dlen - 1)],
                };
                // Django reads a part in the preamble (`Content-Disposition: …` before the
                // first boundary): only the line breaks and spaces a client may send pass.
                if !skipped.iter().all(|b| b" \t\r\n".contains(b)) {
                    return Err(malformed("the multipart body has a preamble"));
                }
                match found {
                    Some(i) if i >= 2 && &data[i - 2..i] == b"\r\n" => {
                        self.state = State::AfterBoundary;
                        Ok(Some(i + dash_boundary.len()))
                    }
                    Some(_) => Err(malformed(
                        "the multipart boundary appears in the preamble without a CRLF before it",
                    )),
                    None => Ok(nonzero(skipped.len())),
                }
            }
            State::AfterBoundary => {
                if data.len() < 2 {
                    return Ok(None);
                }
                if data.starts_with(b"--") {
                    self.state = if self.want_all {
                        State::Epilogue
                    } else {
                        State::Done
                    };
                    return Ok(Some(2));
                }
                self.state = State::Padding;
                Ok(Some(0))
            }
            State::Padding => {
                let padding = data
                    .iter()
                    .position(|&b| b != b' ' && b != b'\t')
                    .unwrap_or(data.len());
                // Rack 2 does not see a padded delimiter (`--B \r\n`): to it the part before
                // runs on. RFC 2046 allows the padding, no client sends it.
                if padding > 0 {
                    return Err(malformed("a multipart boundary line has trailing spaces"));
                }
                let rest = &data[padding..];
                if rest.len() < 2 {
                    return Ok(None);
                }
                if !rest.starts_with(b"\r\n") {
                    return Err(malformed(
                        "a multipart boundary is not followed by a line break",
                    ));
                }
                // Without `want_all`, reading stops once the key's field is closed by a whole
                // delimiter line: `\r\n--boundaryX` is no delimiter, and some parsers would
                // read it as part of the value.
                self.state = if self.found.is_some() && !self.want_all {
                    State::Done
                } else {
                    State::Headers { scanned: 0 }
                };
                Ok(Some(padding + 2))
            }
            State::Headers { scanned } => {
                if data.len() < 2 {
                    return Ok(None);
                }
                // A part without headers: Werkzeug and Rack skip the empty line and read the
                // content's first lines as the part's headers. RFC 7578 requires a
                // Content-Disposition in every part.
                if data.starts_with(b"\r\n") {
                    return Err(malformed("a multipart part has no headers"));
                }
                let from = scanned.saturating_sub(3);
                let Some(end) = header_block_end(data, from) else {
                    if data.len() > MAX_PART_HEADER_BYTES {
                        return Err(malformed("a multipart part's headers are too long"));
                    }
                    *scanned = data.len();
                    return Ok(None);
                };
                if end > MAX_PART_HEADER_BYTES {
                    return Err(malformed("a multipart part's headers are too long"));
                }
                let ours = self.part_is_ours(&data[..end])?;
                if ours && self.found.is_some() {
                    return Err(CredentialError::Ambiguous("API key body field").into());
                }
                self.state = State::ContentStart(ours.then(Vec::new));
                Ok(Some(end))
            }
            State::ContentStart(_) => {
                let dash_boundary = &self.delimiter[2..];
                if data.len() < dash_boundary.len() && dash_boundary.starts_with(data) {
                    return Ok(None);
                }
                if data.starts_with(dash_boundary) {
                    return Err(malformed(
                        "a multipart part's content starts with the boundary",
                    ));
                }
                if let State::ContentStart(value) = std::mem::replace(&mut self.state, State::Done)
                {
                    self.state = State::Content(value);
                }
                Ok(Some(0))
            }
            State::Content(value) => {
                // `--boundary` after a CRLF is the delimiter. Anywhere else RFC 2046 forbids
                // it in a part, and parsers differ: Werkzeug starts a part after a bare LF or
                // CR, Django wherever `--boundary` appears, mid-line too; a part there would
                // be read upstream and not here: refused. The `dlen - 1` bytes kept between
                // pieces hold the two bytes before a match that begins in them (one at the
                // very start of a part was refused in `ContentStart`).
                let delimiter_at = match self.finder.find(data) {
                    Some(i) if data[..i].ends_with(b"\r\n") => Some(i - 2),
                    Some(_) => {
                        return Err(malformed(
                            "the multipart boundary appears inside a part, not after a CRLF",
                        ));
                    }
                    None => None,
                };
                let (content, used, complete) = match delimiter_at {
                    Some(i) => (&data[..i], i + dlen, true),
                    None => {
                        let safe = data.len().saturating_sub(dlen - 1);
                        (&data[..safe], safe, false)
                    }
                };
                if let Some(value) = value {
                    if value.len() + content.len() > form::MAX_KEY_LEN {
                        return Err(
                            CredentialError::Malformed("API key body field is too long").into()
                        );
                    }
                    value.extend_from_slice(content);
                }
                if !complete {
                    return Ok(nonzero(used));
                }
                if let State::Content(Some(value)) =
                    std::mem::replace(&mut self.state, State::AfterBoundary)
                {
                    let value = String::from_utf8(value)
                        .map_err(|_| malformed("the API key field is not UTF-8"))?;
                    self.found = Some(form::accept_key(value)?);
                }
                Ok(Some(used))
            }
            State::Epilogue => match data
                .iter()
                .position(|b| !matches!(b, b'\r' | b'\n' | b' ' | b'\t'))
            {
                Some(_) => Err(malformed(
                    "the multipart body goes on after its close delimiter",
                )),
                None => Ok(nonzero(data.len())),
            },
            State::Done => Ok(None),
        }
    }

    /// Whether a part (its header block, ending with the empty line) is one of our fields.
    fn part_is_ours(&self, block: &[u8]) -> Result<bool, PeekError> {
        // httparse ends a line at a bare LF; Django and Starlette keep it inside the header's
        // value, and take a `name` after it there.
        if has_bare_line_break(block) {
            return Err(malformed(
                "a multipart part's headers have a line break that is not CRLF",
            ));
        }
        // Rack 2 (Rails up to 7.0) takes the name from `Content-Disposition:[^:]*;\s*name=`
        // anywhere in the block: in another header, in another parameter's quoted value, or
        // the last of several. A block is read only when it has exactly one such `name`, the
        // one parsed below, with no `:` before it in its header's value.
        if names_in_block(block) > 1 {
            return Err(malformed(
                "a multipart part's headers name it more than once",
            ));
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_PART_HEADERS];
        let parsed = match httparse::parse_headers(block, &mut headers) {
            // httparse also ends a block at a bare-LF empty line (`\n\n`), before the CRLF
            // one found here; what follows it would be content to some parsers and headers
            // to others.
            Ok(httparse::Status::Complete((used, parsed))) if used == block.len() => parsed,
            Ok(_) | Err(_) => {
                return Err(malformed("a multipart part has malformed headers"));
            }
        };
        let mut dispositions = parsed
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("content-disposition"));
        // Every part must have a name (RFC 7578): Rack files a nameless one under its
        // `Content-ID`, its filename or its content type, one of which may be a key field.
        let Some(disposition) = dispositions.next() else {
            return Err(malformed("a multipart part has no Content-Disposition"));
        };
        // Parsers disagree on which of two wins; the upstream might read the other one.
        if dispositions.next().is_some() {
            return Err(malformed(
                "a multipart part has more than one Content-Disposition header",
            ));
        }
        let raw = disposition.value;
        let disposition = form_data_disposition(raw)?;
        if disposition.name.is_none() {
            return Err(malformed("a multipart part has no name"));
        }
        // The block has one `;name=` at most (above): it must be this header's.
        let name_at = name_param_at(raw);
        if name_at == raw.len() || raw[..name_at].contains(&b':') {
            return Err(malformed(
                "a multipart part's Content-Disposition is read differently by some parsers",
            ));
        }
        let ours = disposition
            .name
            .as_ref()
            .is_some_and(|name| self.fields.iter().any(|f| f.as_bytes() == &**name));
        if !ours
            && disposition
                .name
                .as_ref()
                .is_some_and(|name| form::is_lookalike(name, self.fields))
        {
            return Err(CredentialError::Ambiguous("API key body field").into());
        }
        // Most frameworks (Flask, Go, PHP) file such a part under uploads, not form values;
        // others (multer) read it as a field. Either way the upstream's key could differ.
        if ours && disposition.file {
            return Err(malformed("the API key field is a file part"));
        }
        if ours && !is_plain_text_part(parsed) {
            return Err(malformed(
                "the API key part has a Content-Type or Content-Transfer-Encoding other than \
                 plain UTF-8 text",
            ));
        }
        Ok(ours)
    }
}

/// Where the first `\r\n\r\n` that lies in `data[from..]` ends. (`memmem::find` built a
/// searcher for it on every call: ~400 instructions per part, callgrind.)
fn header_block_end(data: &[u8], from: usize) -> Option<usize> {
    let tail = data.get(from..)?;
    memchr::memchr_iter(b'\n', tail)
        .map(|i| from + i)
        .find(|&i| i >= from + 3 && data[i - 3..=i] == *b"\r\n\r\n")
        .map(|i| i + 1)
}

/// Whether `block` has a CR not followed by LF, or an LF not preceded by CR. (By line, not by
/// byte: a byte loop cost ~2 000 instructions on the harness's four-part body.)
fn has_bare_line_break(block: &[u8]) -> bool {
    memchr::memchr2_iter(b'\r', b'\n', block).any(|i| match block[i] {
        b'\r' => block.get(i + 1) != Some(&b'\n'),
        _ => i == 0 || block[i - 1] != b'\r',
    })
}

/// How many names Rack 2's `Content-Disposition:[^:]*;\s*name=` (any case) could take from
/// a part's header block: each `;`, optional whitespace, `name=` between a
/// `content-disposition:` anywhere (inside another header's name or value too) and the next
/// `:`. (Not one in a `Content-Type` after it, `application/pdf; name="x.pdf"`, as JavaMail
/// writes: the regular expression cannot cross that header's colon.)
fn names_in_block(block: &[u8]) -> usize {
    const DISPOSITION: &[u8] = b"content-disposition";
    let mut count = 0;
    let mut colons = memchr::memchr_iter(b':', block).peekable();
    while let Some(colon) = colons.next() {
        let named = colon
            .checked_sub(DISPOSITION.len())
            .is_some_and(|at| block[at..colon].eq_ignore_ascii_case(DISPOSITION));
        if named {
            let end = colons.peek().copied().unwrap_or(block.len());
            count += name_params(&block[colon + 1..end]).count();
        }
    }
    count
}

/// Where the first `;…name=` of a Content-Disposition value starts (its length when none).
fn name_param_at(value: &[u8]) -> usize {
    name_params(value).next().unwrap_or(value.len())
}

fn name_params(bytes: &[u8]) -> impl Iterator<Item = usize> + '_ {
    memchr::memchr_iter(b';', bytes).filter(move |&i| {
        let rest = &bytes[i + 1..];
        let spaces = rest
            .iter()
            .take_while(|b| b" \t\r\n\x0b\x0c".contains(b))
            .count();
        rest.get(spaces..spaces + 5)
            .is_some_and(|n| n.eq_ignore_ascii_case(b"name="))
    })
}

/// Whether a key part's own headers leave its value plain text: some parsers decode a part's
/// charset or transfer encoding (busboy, Django), or file a part with a non-text type as an
/// upload (busboy), and the upstream would read another value, or none.
fn is_plain_text_part(headers: &[httparse::Header<'_>]) -> bool {
    headers.iter().all(|h| {
        if h.name.eq_ignore_ascii_case("content-transfer-encoding") {
            let v = h.value.trim_ascii();
            [&b"7bit"[..], b"8bit", b"binary"]
                .iter()
                .any(|e| v.eq_ignore_ascii_case(e))
        } else if h.name.eq_ignore_ascii_case("content-type") {
            let mime =
                h.value[..memchr::memchr(b';', h.value).unwrap_or(h.value.len())].trim_ascii();
            mime.eq_ignore_ascii_case(b"text/plain")
                && match header_param(h.value, b"charset") {
                    Ok(None) => true,
                    // Charsets that read ASCII as ASCII, which a key is (a value that is
                    // not fails as a key): Apache HttpClient writes ISO-8859-1 by default.
                    Ok(Some(c)) => [
                        &b"utf-8"[..],
                        b"utf8",
                        b"us-ascii",
                        b"ascii",
                        b"iso-8859-1",
                        b"latin1",
                        b"iso-8859-15",
                        b"windows-1252",
                        b"cp1252",
                    ]
                    .iter()
                    .any(|e| c.eq_ignore_ascii_case(e)),
                    Err(_) => false,
                }
        } else {
            true
        }
    })
}

fn nonzero(n: usize) -> Option<usize> {
    (n > 0).then_some(n)
}

fn malformed(reason: &'static str) -> PeekError {
    PeekError::Body(BodyError::Malformed(reason))
}

/// RFC 2046 §5.1.1: 1 to 70 characters.
const MAX_BOUNDARY_LEN: usize = 70;

/// The boundary of a `multipart/form-data` `Content-Type` value.
pub fn content_type_boundary(value: &str) -> Result<String, PeekError> {
    // PHP takes the boundary from the first `boundary` anywhere in the value (`xboundary=A;
    // boundary=B` is A to it): another parameter with `boundary` in its name or value could
    // frame the body another way upstream.
    for param in params(value.as_bytes()) {
        let Ok((name, text)) = param else { break };
        let has_boundary = |b: &[u8]| b.windows(8).any(|w| w.eq_ignore_ascii_case(b"boundary"));
        if !name.eq_ignore_ascii_case(b"boundary") && (has_boundary(name) || has_boundary(&text)) {
            return Err(malformed(
                "a Content-Type parameter other than the boundary names a boundary",
            ));
        }
    }
    let boundary = match header_param(value.as_bytes(), b"boundary") {
        // Parsers disagree on which of two boundaries wins; a body read one way here and
        // another way upstream could carry a different key there.
        Err(ParamError::Twice) => {
            return Err(malformed("more than one multipart boundary parameter"));
        }
        Err(ParamError::Invalid) | Ok(None) => {
            return Err(malformed(
                "multipart/form-data without a valid boundary parameter",
            ));
        }
        Ok(Some(boundary)) => boundary,
    };
    if boundary.is_empty() || boundary.len() > MAX_BOUNDARY_LEN {
        return Err(malformed(
            "the multipart boundary must be 1 to 70 characters",
        ));
    }
    // The value came from a header that is valid ASCII, and a quoted pair is one of its bytes.
    String::from_utf8(boundary.into_owned())
        .map_err(|_| malformed("multipart/form-data without a valid boundary parameter"))
}

/// What a part's `Content-Disposition` (`form-data; name="clientKey"`) says of it.
#[derive(Debug, PartialEq, Eq)]
pub struct Disposition<'v> {
    /// The `name` parameter. Names are compared as bytes, so they are not decoded further.
    pub name: Option<Cow<'v, [u8]>>,
    /// Whether it has a `filename` (or `filename*`): an uploaded file.
    pub file: bool,
}

/// Reads a part's `Content-Disposition`. Refused: two `name`s, and an RFC 2231 extended name
/// (`name*=UTF-8''clientKey`, `name*0=…`): RFC 7578 has no use for it, but some parsers decode
/// it, and then a part this one does not take for the key field would be the key upstream.
pub fn form_data_disposition(value: &[u8]) -> Result<Disposition<'_>, PeekError> {
    let invalid = |e| match e {
        ParamError::Twice => malformed("a multipart Content-Disposition has more than one name"),
        ParamError::Invalid => malformed("a multipart Content-Disposition is malformed"),
    };
    // PHP reads `name=` in any `;`-separated piece, the first included: a part whose type is
    // missing or not a token (`name="clientKey"`, `name="clientKey";form-data`) is a key field
    // to PHP, and would be none here (review).
    let kind = trim_end(trim_start(
        &value[..memchr::memchr(b';', value).unwrap_or(value.len())],
    ));
    if kind.is_empty() || !kind.iter().all(|&b| is_tchar(b)) {
        return Err(malformed(
            "a multipart Content-Disposition does not start with its type (form-data)",
        ));
    }
    let mut disposition = Disposition {
        name: None,
        file: false,
    };
    for param in params(value) {
        let (name, text) = param.map_err(invalid)?;
        if name.eq_ignore_ascii_case(b"name") {
            if disposition.name.is_some() {
                return Err(invalid(ParamError::Twice));
            }
            disposition.name = Some(text);
        } else if name.len() > 4 && name[..5].eq_ignore_ascii_case(b"name*") {
            return Err(malformed(
                "a multipart Content-Disposition has an extended (RFC 2231) name",
            ));
        } else if name.len() >= 8 && name[..8].eq_ignore_ascii_case(b"filename") {
            // `filename`, `filename*`, `filename*0`…
            disposition.file = true;
        }
    }
    Ok(disposition)
}

#[derive(Debug, PartialEq, Eq)]
pub enum ParamError {
    /// A quoted string not closed, or an unquoted value with spaces or quotes in it.
    Invalid,
    /// The parameter appears twice.
    Twice,
}

/// The value of the parameter `wanted` (its name compared without case) in a header value
/// of the form `type; a=token; b="quoted \" string"` (RFC 9110 §5.6.6), escapes undone;
/// `None` when it is absent. The parameters after it are still read, so that a second one is
/// found.
pub fn header_param<'v>(
    value: &'v [u8],
    wanted: &[u8],
) -> Result<Option<Cow<'v, [u8]>>, ParamError> {
    let mut found: Option<Cow<'v, [u8]>> = None;
    for param in params(value) {
        let (name, text) = param?;
        if name.eq_ignore_ascii_case(wanted) {
            if found.is_some() {
                return Err(ParamError::Twice);
            }
            found = Some(text);
        }
    }
    Ok(found)
}

/// Whether a header value has an RFC 2231 form (`wanted*`, `wanted*0`…) of one of the
/// parameters `wanted`: some parsers (Django) drop the `*` and let it override the plain one.
pub fn has_extended_param(value: &[u8], wanted: &[&[u8]]) -> Result<bool, ParamError> {
    for param in params(value) {
        let (name, _) = param?;
        if wanted.iter().any(|w| {
            name.len() > w.len() && name[..w.len()].eq_ignore_ascii_case(w) && name[w.len()] == b'*'
        }) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The parameters of a header value `type; a=token; b="quoted \" string"`, in order, as
/// (name, value); a parameter without `=` has an empty value. Ends after an error.
fn params(value: &[u8]) -> Params<'_> {
    let rest = memchr::memchr(b';', value).map_or(&[][..], |i| &value[i + 1..]);
    Params { rest }
}

struct Params<'v> {
    rest: &'v [u8],
}

/// A parameter's name and value.
type Param<'v> = (&'v [u8], Cow<'v, [u8]>);

impl<'v> Iterator for Params<'v> {
    type Item = Result<Param<'v>, ParamError>;

    fn next(&mut self) -> Option<Self::Item> {
        let item = self.read();
        if !matches!(item, Some(Ok(_))) {
            self.rest = &[];
        }
        item
    }
}

impl<'v> Params<'v> {
    fn read(&mut self) -> Option<Result<Param<'v>, ParamError>> {
        let mut rest = trim_start(self.rest);
        // Empty parameters (`a;;b`, a trailing `;`) are skipped.
        while let Some(after) = rest.strip_prefix(b";") {
            rest = trim_start(after);
        }
        if rest.is_empty() {
            return None;
        }
        let name_end = memchr::memchr2(b'=', b';', rest).unwrap_or(rest.len());
        let name = trim_end(&rest[..name_end]);
        rest = &rest[name_end..];
        let text: Cow<'v, [u8]>;
        if let Some(after_eq) = rest.strip_prefix(b"=") {
            let after_eq = trim_start(after_eq);
            if let Some(quoted) = after_eq.strip_prefix(b"\"") {
                // Only these decide what keygate reads; a `filename="C:\path"` (old browsers
                // send one) is framing only, its text unused.
                let (quoted_text, after) = match quoted_string(quoted, is_strict(name)) {
                    Ok(q) => q,
                    Err(e) => return Some(Err(e)),
                };
                text = quoted_text;
                rest = trim_start(after);
                if !rest.is_empty() && rest[0] != b';' {
                    return Some(Err(ParamError::Invalid));
                }
            } else {
                let end = memchr::memchr(b';', after_eq).unwrap_or(after_eq.len());
                let token = trim_end(&after_eq[..end]);
                // PHP takes `'clientKey'` for a quoted `clientKey`.
                if memchr::memchr3(b' ', b'\t', b'"', token).is_some() || token.starts_with(b"'") {
                    return Some(Err(ParamError::Invalid));
                }
                // The values that decide what keygate reads must be tokens (RFC 9110 §5.6.2)
                // when unquoted: PHP ends an unquoted boundary at a `,`, so `boundary=B,C`
                // framed the body on `--B` there and on `--B,C` here (review).
                if is_strict(name) && !token.iter().all(|&b| is_tchar(b)) {
                    return Some(Err(ParamError::Invalid));
                }
                text = Cow::Borrowed(token);
                rest = &after_eq[end..];
            }
        } else {
            text = Cow::Borrowed(&[]);
        }
        self.rest = rest;
        Some(Ok((name, text)))
    }
}

/// Whether a parameter's value decides what keygate reads (the others, `filename` above all,
/// are framing only): its quoting and characters are held to the strictest reading.
fn is_strict(name: &[u8]) -> bool {
    [&b"name"[..], b"boundary", b"charset"]
        .iter()
        .any(|n| name.eq_ignore_ascii_case(n))
}

/// RFC 9110 §5.6.2 `tchar`: the bytes of a token.
fn is_tchar(b: u8) -> bool {
    TCHAR[usize::from(b)]
}

static TCHAR: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        b += 1;
    }
    table
};

/// A quoted string's text (after its opening quote), escapes undone, and what follows its
/// closing quote. Borrowed when it has no escapes, as names almost never do. A backslash
/// before a quote is refused (PHP and Django frame `\"` and `\\"` differently from RFC 9110);
/// `strict`: so is any escape but `\\`. RFC 9110 allows a backslash before any character, but
/// parsers differ on the others (Werkzeug keeps the backslash, Go only drops it before a
/// special character), so `name="client\Key"` could be `clientKey` here and another name
/// upstream.
fn quoted_string(s: &[u8], strict: bool) -> Result<(Cow<'_, [u8]>, &[u8]), ParamError> {
    let mut owned: Option<Vec<u8>> = None;
    let mut start = 0;
    loop {
        let Some(i) = memchr::memchr2(b'"', b'\\', &s[start..]).map(|i| start + i) else {
            return Err(ParamError::Invalid);
        };
        if s[i] == b'"' {
            // `\\"` ends the string here, but PHP and Django read `\"` as an escaped quote
            // whatever comes before it, and so frame the parameters after it differently.
            if i > 0 && s[i - 1] == b'\\' {
                return Err(ParamError::Invalid);
            }
            let text = match owned {
                None => Cow::Borrowed(&s[..i]),
                Some(mut text) => {
                    text.extend_from_slice(&s[start..i]);
                    Cow::Owned(text)
                }
            };
            return Ok((text, &s[i + 1..]));
        }
        // In `strict` parameters any escape but `\\` is refused. In the others (`filename`) an
        // escaped quote is read as every parser tested reads it, and as Go's mime/multipart
        // writes a filename with a quote in it (`say \"hi\".txt`: refused, that upload got 400);
        // only a quote after an escaped backslash, above, is framed differently.
        let Some(&escaped) = s.get(i + 1).filter(|&&c| !strict || c == b'\\') else {
            return Err(ParamError::Invalid);
        };
        let text = owned.get_or_insert_with(Vec::new);
        text.extend_from_slice(&s[start..i]);
        text.push(escaped);
        start = i + 2;
    }
}

fn trim_start(b: &[u8]) -> &[u8] {
    let i = b
        .iter()
        .position(|c| *c != b' ' && *c != b'\t')
        .unwrap_or(b.len());
    &b[i..]
}

fn trim_end(b: &[u8]) -> &[u8] {
    let i = b
        .iter()
        .rposition(|c| *c != b' ' && *c != b'\t')
        .map_or(0, |i| i + 1);
    &b[..i]
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;
    use std::convert::Infallible;

    /// What a parser made of a body, compared by kind (the reasons' texts differ).
    #[derive(Debug, PartialEq, Eq)]
    enum Outcome {
        Key(String),
        NoKey,
        Ambiguous,
        BadKey,
        Malformed,
    }

    fn outcome(r: Result<Option<String>, PeekError>) -> Outcome {
        match r {
            Ok(Some(k)) => Outcome::Key(k),
            Ok(None) => Outcome::NoKey,
            Err(PeekError::Credential(CredentialError::Ambiguous(_))) => Outcome::Ambiguous,
            Err(PeekError::Credential(_)) => Outcome::BadKey,
            Err(PeekError::Body(_)) => Outcome::Malformed,
            Err(PeekError::Busy) => unreachable!("the scanner has no budget"),
        }
    }

    fn fields() -> Vec<String> {
        vec!["clientKey".to_owned()]
    }

    /// The whole body, fed in pieces of `split` bytes, then ended.
    fn scan(body: &[u8], boundary: &str, split: usize, want_all: bool) -> Outcome {
        let fields = fields();
        let mut scanner = MultipartScanner::new(boundary, &fields, want_all);
        for piece in body.chunks(split.max(1)) {
            match scanner.feed(piece) {
                Ok(Progress::Done) => break,
                Ok(Progress::NeedMore) => {}
                Err(e) => return outcome(Err(e)),
            }
        }
        outcome(scanner.finish())
    }

    /// multer, the way keygate used it until it had its own scanner: the reference.
    fn multer_scan(body: &[u8], boundary: &str, split: usize, want_all: bool) -> Outcome {
        let chunks: Vec<Result<Bytes, Infallible>> = body
            .chunks(split.max(1))
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut parts = multer::Multipart::new(futures_util::stream::iter(chunks), boundary);
            let mut found: Option<String> = None;
            loop {
                let field = match parts.next_field().await {
                    Ok(Some(field)) => field,
                    Ok(None) => break,
                    Err(_) => return Outcome::Malformed,
                };
                if field.name() != Some("clientKey") {
                    continue;
                }
                // Where keygate is stricter than multer, on purpose: the key field as a file.
                if field.file_name().is_some() {
                    return Outcome::Malformed;
                }
                if found.is_some() {
                    return Outcome::Ambiguous;
                }
                let Ok(value) = field.bytes().await else {
                    return Outcome::Malformed;
                };
                if value.len() > form::MAX_KEY_LEN {
                    return Outcome::BadKey;
                }
                let Ok(value) = String::from_utf8(value.to_vec()) else {
                    return Outcome::Malformed;
                };
                match form::accept_key(value) {
                    Ok(k) => found = Some(k),
                    Err(e) => return outcome(Err(e)),
                }
                if !want_all {
                    break;
                }
            }
            outcome(Ok(found))
        })
    }

    fn body(boundary: &str, parts: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (disposition, value) in parts {
            out.extend_from_slice(
                format!("--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n").as_bytes(),
            );
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        out
    }

    #[test]
    fn the_key_field_is_found_however_the_body_is_cut() {
        let b = body(
            "XyZ",
            &[
                ("form-data; name=\"page\"", b"2"),
                ("form-data; name=\"clientKey\"", b"kg_1"),
                ("form-data; name=\"file\"; filename=\"a.bin\"", &[0u8; 300]),
            ],
        );
        for split in [1, 2, 3, 5, 7, 64, 4096] {
            for want_all in [false, true] {
                assert_eq!(
                    scan(&b, "XyZ", split, want_all),
                    Outcome::Key("kg_1".into()),
                    "split {split}"
                );
            }
        }
    }

    #[test]
    fn without_want_all_reading_stops_at_the_key() {
        let b = body(
            "XyZ",
            &[
                ("form-data; name=\"clientKey\"", b"kg_1"),
                ("form-data; name=\"file\"", &[7u8; 100]),
            ],
        );
        let fields = fields();
        let mut scanner = MultipartScanner::new("XyZ", &fields, false);
        let end_of_key =
            "--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nkg_1\r\n--XyZ"
                .len();
        assert_eq!(scanner.feed(&b[..end_of_key]).unwrap(), Progress::NeedMore);
        // The delimiter's line must be whole: `--XyZW` would be no delimiter.
        assert_eq!(
            scanner.feed(&b[end_of_key..end_of_key + 1]).unwrap(),
            Progress::NeedMore
        );
        assert_eq!(
            scanner.feed(&b[end_of_key + 1..end_of_key + 2]).unwrap(),
            Progress::Done
        );
        assert_eq!(scanner.into_found().as_deref(), Some("kg_1"));
        // Stopped before that line was whole, the scanner has no key to give.
        let mut scanner = MultipartScanner::new("XyZ", &fields, false);
        assert_eq!(scanner.feed(&b[..end_of_key]).unwrap(), Progress::NeedMore);
        assert_eq!(scanner.into_found(), None);
    }

    /// What real clients write, which the refusals above must let through (review): Apache
    /// HttpClient's text part (ISO-8859-1, 8bit), a JavaMail-style file part with a `name` in
    /// its `Content-Type`, OkHttp's per-part `Content-Length`.
    #[test]
    fn real_clients_parts_are_read() {
        let b = b"--XyZ\r\nContent-Disposition: form-data; name=\"doc\"; filename=\"x.pdf\"\r\nContent-Type: application/pdf; name=\"x.pdf\"\r\nContent-Transfer-Encoding: binary\r\n\r\n%PDF\r\n--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\nContent-Type: text/plain; charset=ISO-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\nkg_6\r\n--XyZ\r\nContent-Disposition: form-data; name=\"n\"\r\nContent-Length: 1\r\n\r\n1\r\n--XyZ--\r\n";
        for split in [1, 5, 4096] {
            assert_eq!(scan(b, "XyZ", split, true), Outcome::Key("kg_6".into()));
        }
    }

    #[test]
    fn parts_are_framed_as_rfc_2046_says() {
        // A preamble of line breaks and spaces, header names in any case, an epilogue of line
        // breaks and spaces.
        let b = b" \r\n\r\n--XyZ\r\nContent-Disposition: form-data; name=page\r\n\r\n2\r\n--XyZ\r\ncontent-disposition: form-data; name=clientKey\r\nContent-Type: text/plain; charset=UTF-8\r\n\r\nkg_2\r\n--XyZ--\r\n \t\r\n";
        for split in [1, 4, 1000] {
            assert_eq!(scan(b, "XyZ", split, true), Outcome::Key("kg_2".into()));
        }
        // An epilogue of text is refused when the body is read whole (below), ignored when the
        // key is taken before it.
        let mut with_text = b.to_vec();
        with_text.extend_from_slice(b"epilogue");
        assert_eq!(
            scan(&with_text, "XyZ", 4, false),
            Outcome::Key("kg_2".into())
        );
        // A preamble ending in a CRLF, even an empty one.
        for split in [1, 3, 100] {
            assert_eq!(
                scan(
                    b"\r\n--XyZ\r\nContent-Disposition: form-data; name=clientKey\r\n\r\nkg_3\r\n--XyZ--",
                    "XyZ",
                    split,
                    true
                ),
                Outcome::Key("kg_3".into())
            );
        }
    }

    /// Bodies that parsers frame or name differently (found in review, each checked against
    /// Werkzeug): the upstream could read another key than the one checked, so all are 400s.
    #[test]
    fn bodies_parsers_disagree_on_are_refused() {
        let cases: &[(&str, &[u8])] = &[
            // A differential review against Django, Werkzeug, Starlette, busboy, Rack 2.2 and
            // PHP: each of these passed with the key A, and some parser read B.
            (
                "a preamble holding a part (Django reads it)",
                b"Content-Disposition: form-data; name=\"clientKey\"\r\n\r\nB\r\n--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nA\r\n--XyZ--",
            ),
            (
                "transport padding (Rack does not see the delimiter)",
                b"--XyZ \r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nA\r\n--XyZ--",
            ),
            (
                "a part without headers whose content looks like headers (Werkzeug, Rack: B)",
                b"--XyZ\r\n\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nB\r\n--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nA\r\n--XyZ--",
            ),
            (
                "a bare LF inside a part's headers (Django, Starlette: the last name)",
                b"--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nA\r\n--XyZ\r\nContent-Disposition: form-data; name=\"x\"\nX: ; name=\"clientKey\"\r\n\r\nB\r\n--XyZ--",
            ),
            (
                "a name inside another parameter's quoted value (Rack: the last)",
                b"--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nA\r\n--XyZ\r\nContent-Disposition: form-data; name=\"x\"; foo=\"a; name=clientKey\"\r\n\r\nB\r\n--XyZ--",
            ),
            (
                "a name in another header (Rack)",
                b"--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nA\r\n--XyZ\r\nX-Content-Disposition: x; name=clientKey\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nB\r\n--XyZ--",
            ),
            (
                "a part without a name, its Content-ID a key field (Rack)",
                b"--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nA\r\n--XyZ\r\nContent-Disposition: form-data\r\nContent-ID: clientKey\r\n\r\nB\r\n--XyZ--",
            ),
            (
                "a part without a name, its filename a key field (Rack)",
                b"--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nA\r\n--XyZ\r\nContent-Disposition: form-data; filename=\"clientKey\"\r\n\r\nB\r\n--XyZ--",
            ),
            (
                "a colon before the name (Rack reads no name there, and files it by filename)",
                b"--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nA\r\n--XyZ\r\nContent-Disposition: form-data; filename=\"a:b\"; name=\"x\"\r\n\r\nB\r\n--XyZ--",
            ),
            (
                "a part without Content-Disposition",
                b"--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nA\r\n--XyZ\r\nContent-Type: text/plain\r\n\r\nB\r\n--XyZ--",
            ),
            (
                "the key part in UTF-16 (busboy decodes it)",
                b"--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\nContent-Type: text/plain; charset=utf-16\r\n\r\nA\r\n--XyZ--",
            ),
            (
                "the key part typed as binary (busboy files it as an upload)",
                b"--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\nContent-Type: application/octet-stream\r\n\r\nA\r\n--XyZ--",
            ),
            (
                "the key part in base64 (Django decodes it)",
                b"--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\nContent-Transfer-Encoding: base64\r\n\r\nA\r\n--XyZ--",
            ),
            (
                "a form framed by bare LFs in the preamble, a CRLF one after it (Werkzeug: B)",
                b"P\n--XyZ\nContent-Disposition: form-data; name=\"clientKey\"\n\nB\n--XyZ--\n\r\n--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nA\r\n--XyZ--\r\n",
            ),
            (
                "the same framed by bare CRs",
                b"P\r--XyZ\rContent-Disposition: form-data; name=\"clientKey\"\r\rB\r--XyZ--\r\r\n--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nA\r\n--XyZ--\r\n",
            ),
            (
                "a boundary inside the first line (multer, Werkzeug: B)",
                b"x--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nB\r\n--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nA\r\n--XyZ--\r\n",
            ),
            (
                "an RFC 2231 name (Werkzeug and Go decode it: B)",
                b"--XyZ\r\nContent-Disposition: form-data; name*=UTF-8''clientKey\r\n\r\nB\r\n--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nA\r\n--XyZ--\r\n",
            ),
            (
                "an RFC 2231 continued name",
                b"--XyZ\r\nContent-Disposition: form-data; NAME*0=client; name*1=Key\r\n\r\nB\r\n--XyZ--\r\n",
            ),
            (
                "a bare-LF empty line inside the part headers (Werkzeug: the rest is content)",
                b"--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\n\nX: a\r\n\r\nA\r\n--XyZ--\r\n",
            ),
            (
                "the key field as a file, then as a field (Werkzeug, Go: B)",
                b"--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"; filename=\"k\"\r\n\r\nA\r\n--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nB\r\n--XyZ--\r\n",
            ),
            (
                "an escape other than \\\" and \\\\ in a name (Werkzeug: no such field)",
                b"--XyZ\r\nContent-Disposition: form-data; name=\"client\\Key\"\r\n\r\nA\r\n--XyZ--\r\n",
            ),
            (
                "a bare-LF delimiter inside another part (Werkzeug starts a part there: B)",
                b"--XyZ\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nv\n--XyZ\nContent-Disposition: form-data; name=\"clientKey\"\n\nB\r\n--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nA\r\n--XyZ--\r\n",
            ),
            (
                "a part whose content starts with the boundary (Go, Werkzeug: a delimiter)",
                b"--XyZ\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nB\r\n--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nA\r\n--XyZ--\r\n",
            ),
            (
                "a quoted parameter ending in an escaped backslash (PHP, Django: an escaped quote)",
                b"--XyZ\r\nContent-Disposition: form-data; name=\"x\"; foo=\"a\\\\\"; bar=\"; name=clientKey; q=\"\r\n\r\nB\r\n--XyZ--\r\n",
            ),
            (
                "a bare-CR delimiter inside another part",
                b"--XyZ\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nv\r--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nB\r\n--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nA\r\n--XyZ--\r\n",
            ),
            (
                "a part after the close delimiter (Django, PHP: B)",
                b"--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nA\r\n--XyZ--\r\n--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nB\r\n--XyZ--\r\n",
            ),
            (
                "a boundary in the middle of a line of another part (Django: B)",
                b"--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nB\r\n--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nA\r\n--XyZ--\r\n",
            ),
            (
                "a single-quoted name (PHP: clientKey, B)",
                b"--XyZ\r\nContent-Disposition: form-data; name='clientKey'\r\n\r\nB\r\n--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nA\r\n--XyZ--\r\n",
            ),
            (
                "the boundary as a prefix of a line in the key's value (Werkzeug: A\\r\\n--XyZW)",
                b"--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nA\r\n--XyZW\r\n--XyZ--\r\n",
            ),
        ];
        for (what, body) in cases {
            for split in [1, 2, 7, 4096] {
                for want_all in [true, false] {
                    // Without `want_all` reading stops once the key's field is closed: what
                    // follows it is not looked at (the body is larger than the peek limit).
                    let key_first = body.starts_with(
                        b"--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nA\r\n",
                    );
                    if !want_all && (what.starts_with("a part after the close") || key_first) {
                        continue;
                    }
                    assert_eq!(
                        scan(body, "XyZ", split, want_all),
                        Outcome::Malformed,
                        "{what}, split {split}, want_all {want_all}"
                    );
                }
            }
        }
        // A look-alike name (PHP, qs and Rails read `clientKey[]` as `clientKey`).
        let b = body(
            "XyZ",
            &[
                ("form-data; name=\"clientKey\"", b"A"),
                ("form-data; name=\"clientKey[]\"", b"B"),
            ],
        );
        assert_eq!(scan(&b, "XyZ", 3, true), Outcome::Ambiguous);
        // A name equal without case (ASP.NET's form collection ignores case).
        let b = body(
            "XyZ",
            &[
                ("form-data; name=\"CLIENTKEY\"", b"B"),
                ("form-data; name=\"clientKey\"", b"A"),
            ],
        );
        assert_eq!(scan(&b, "XyZ", 3, false), Outcome::Ambiguous);
        // A file name with backslashes (old browsers send full Windows paths) is framing
        // only; RFC 2231 continuations are files too.
        let b = body(
            "XyZ",
            &[
                (
                    "form-data; name=\"doc\"; filename=\"C:\\Users\\a.txt\"",
                    b"x -- XyZ y",
                ),
                ("form-data; name=\"clientKey\"", b"kg_5"),
            ],
        );
        for split in [1, 4, 4096] {
            assert_eq!(scan(&b, "XyZ", split, true), Outcome::Key("kg_5".into()));
        }
        assert!(
            form_data_disposition(b"form-data; name=a; filename*0=x; filename*1=y")
                .unwrap()
                .file
        );
        // A file part under another name is only skipped.
        let b = body(
            "XyZ",
            &[
                ("form-data; name=\"doc\"; filename=\"clientKey\"", b"x"),
                ("form-data; name=\"clientKey\"", b"kg_4"),
            ],
        );
        assert_eq!(scan(&b, "XyZ", 3, true), Outcome::Key("kg_4".into()));
    }

    #[test]
    fn refusals() {
        let two = body(
            "XyZ",
            &[
                ("form-data; name=\"clientKey\"", b"a"),
                ("form-data; name=\"clientKey\"", b"b"),
            ],
        );
        assert_eq!(scan(&two, "XyZ", 5, true), Outcome::Ambiguous);
        assert_eq!(scan(&two, "XyZ", 5, false), Outcome::Key("a".into()));
        let cases: &[&[u8]] = &[
            // Cut inside a part, in its headers, before any boundary, before the close.
            b"--XyZ\r\nContent-Disposition: form-data; name=\"page\"\r\n\r\n2",
            b"--XyZ\r\nContent-Disposition: form-data; name=",
            b"no boundary at all",
            b"--XyZ\r\nContent-Disposition: form-data; name=\"page\"\r\n\r\n2\r\n--XyZ",
            // Something other than padding and a line break after a boundary.
            b"--XyZ junk\r\n\r\nv\r\n--XyZ--",
            // Headers that are not headers, two dispositions, two names, an open quote.
            b"--XyZ\r\nContent-Disposition form-data\r\n\r\nv\r\n--XyZ--",
            b"--XyZ\r\nContent-Disposition: form-data; name=a\r\nContent-Disposition: form-data; name=clientKey\r\n\r\nv\r\n--XyZ--",
            b"--XyZ\r\nContent-Disposition: form-data; name=a; name=clientKey\r\n\r\nv\r\n--XyZ--",
            b"--XyZ\r\nContent-Disposition: form-data; name=\"clientKey\r\n\r\nv\r\n--XyZ--",
            // The key not UTF-8.
            b"--XyZ\r\nContent-Disposition: form-data; name=clientKey\r\n\r\n\xff\xfe\r\n--XyZ--",
        ];
        for case in cases {
            for split in [1, 3, 1000] {
                assert_eq!(
                    scan(case, "XyZ", split, true),
                    Outcome::Malformed,
                    "{:?}",
                    String::from_utf8_lossy(case)
                );
            }
        }
        let long = vec![b'k'; form::MAX_KEY_LEN + 1];
        let b = body("XyZ", &[("form-data; name=clientKey", &long)]);
        assert_eq!(scan(&b, "XyZ", 100, true), Outcome::BadKey);
        let b = body("XyZ", &[("form-data; name=clientKey", b"  ")]);
        assert_eq!(scan(&b, "XyZ", 100, true), Outcome::BadKey);
        let mut huge_headers = b"--XyZ\r\nX-Filler: ".to_vec();
        huge_headers.extend(std::iter::repeat_n(b'a', MAX_PART_HEADER_BYTES));
        huge_headers.extend_from_slice(b"\r\n\r\nv\r\n--XyZ--");
        assert_eq!(scan(&huge_headers, "XyZ", 512, true), Outcome::Malformed);
    }

    #[test]
    fn disposition_names() {
        let name = |v: &str| {
            form_data_disposition(v.as_bytes())
                .map(|d| d.name.map(|n| String::from_utf8(n.into_owned()).unwrap()))
        };
        assert_eq!(
            name("form-data; name=\"clientKey\"").unwrap().as_deref(),
            Some("clientKey")
        );
        assert_eq!(
            name("form-data;name=clientKey").unwrap().as_deref(),
            Some("clientKey")
        );
        assert_eq!(
            name("form-data; NAME = \"a b\" ; filename=\"x\"")
                .unwrap()
                .as_deref(),
            Some("a b")
        );
        assert_eq!(
            name("form-data; filename=\"name=x\"; name=\"y\"")
                .unwrap()
                .as_deref(),
            Some("y")
        );
        // A backslash before a quote: PHP and Django frame it differently.
        assert!(name("form-data; name=\"a\\\"b\"").is_err());
        assert_eq!(name("form-data; filename=\"x\"").unwrap(), None);
        assert_eq!(name("form-data").unwrap(), None);
        assert_eq!(name("form-data; name=").unwrap().as_deref(), Some(""));
        assert!(name("form-data; name=\"open").is_err());
        assert!(name("form-data; name=a; Name=b").is_err());
        assert!(name("form-data; name=a b").is_err());
        assert!(name("form-data; name=\"a\\\"").is_err());
        assert!(name("form-data; name=\"a\\\\\"; x=y").is_err());
        assert_eq!(
            name("form-data; name=\"a\\\\b\"; x=\"c\\\\d\"")
                .unwrap()
                .as_deref(),
            Some("a\\b")
        );
        assert!(name("form-data; name=\"a\" b").is_err());
        assert!(name("form-data; name=\"a\\b\"").is_err());
        assert!(name("form-data; name*=UTF-8''a").is_err());
        assert!(name("form-data; Name*1=a").is_err());
        assert_eq!(name("form-data; names=a").unwrap(), None);
        assert_eq!(name("form-data;; name=a;").unwrap().as_deref(), Some("a"));
        // Review: PHP reads `name=` in the first piece too, and these were second key fields
        // there that no key field here.
        for no_type in [
            "name=\"clientKey\"",
            " name=\"clientKey\"",
            "name=clientKey",
            "name=\"clientKey\";form-data",
            "; name=\"clientKey\"",
            "form data; name=a",
            "\"form-data\"; name=a",
        ] {
            assert!(name(no_type).is_err(), "{no_type:?}");
        }
        assert_eq!(name("Form-Data ; name=a").unwrap().as_deref(), Some("a"));
        assert_eq!(name("attachment; name=a").unwrap().as_deref(), Some("a"));
        // An unquoted name is a token; quoted, it may be anything.
        assert!(name("form-data; name=client,Key").is_err());
        assert!(name("form-data; name=a(b)").is_err());
        assert_eq!(
            name("form-data; name=\"a,b\"").unwrap().as_deref(),
            Some("a,b")
        );
        let file = |v: &str| form_data_disposition(v.as_bytes()).unwrap().file;
        // Go's mime/multipart escapes a quote in a filename (review: a false 400).
        assert!(file(
            "form-data; name=\"a\"; filename=\"say \\\"hi\\\".txt\""
        ));
        assert_eq!(
            name("form-data; filename=\"a\\\"; b\"; name=\"x\"")
                .unwrap()
                .as_deref(),
            Some("x")
        );
        // A quote after an escaped backslash ends the string here and not in PHP.
        assert!(name("form-data; name=\"x\"; filename=\"dir\\\\\"").is_err());
        assert!(file("form-data; name=a; filename=\"\""));
        assert!(file("form-data; FILENAME*=UTF-8''x; name=a"));
        assert!(!file("form-data; name=filename"));
    }

    #[test]
    fn content_type_boundaries() {
        let ok = |v: &str| content_type_boundary(v).unwrap();
        assert_eq!(ok("multipart/form-data; boundary=XyZ"), "XyZ");
        assert_eq!(
            ok("multipart/form-data;boundary=\"a b:c\"; charset=utf-8"),
            "a b:c"
        );
        assert_eq!(
            ok("multipart/form-data; charset=utf-8; BOUNDARY = ----x"),
            "----x"
        );
        for bad in [
            "multipart/form-data",
            "multipart/form-data; boundary",
            "multipart/form-data; boundary=",
            "multipart/form-data; boundary=\"\"",
            "multipart/form-data; boundary=\"open",
            "multipart/form-data; boundary=a b",
            "multipart/form-data; boundary=a; Boundary=b",
            // PHP takes the first `boundary` anywhere in the value.
            "multipart/form-data; xboundary=AAA; boundary=BBB",
            "multipart/form-data; boundary=BBB; x-Boundary=AAA",
            "multipart/form-data; charset=\"boundary=AAA\"; boundary=BBB",
            // Review: PHP ends an unquoted boundary at a `,` (frames on `--B`).
            "multipart/form-data; boundary=B,C",
            "multipart/form-data; boundary=a:b",
            "multipart/form-data; boundary=a/b",
            "multipart/form-data; boundary=a=b",
        ] {
            assert!(content_type_boundary(bad).is_err(), "{bad}");
        }
        assert_eq!(ok("multipart/form-data; boundary=\"B,C\""), "B,C");
        let long = format!("multipart/form-data; boundary={}", "x".repeat(71));
        assert!(content_type_boundary(&long).is_err());
        let longest = format!("multipart/form-data; boundary={}", "x".repeat(70));
        assert_eq!(content_type_boundary(&longest).unwrap().len(), 70);
    }

    fn disposition() -> impl Strategy<Value = String> {
        let name = prop_oneof![
            Just("clientKey"),
            Just("page"),
            Just("file"),
            Just("clientKeys"),
            Just("xclientKey")
        ];
        (name, 0..4u8).prop_map(|(n, style)| match style {
            0 => format!("form-data; name=\"{n}\""),
            1 => format!("form-data; name={n}"),
            2 => format!("form-data; filename=\"{n}.bin\"; name=\"{n}\""),
            _ => format!("form-data; name=\"{n}\"; filename=\"data.bin\""),
        })
    }

    proptest! {
        // Against multer on bodies any client could send, whole or cut anywhere, in any
        // pieces: the same key, the same refusal.
        #[test]
        fn agrees_with_multer(
            boundary in "[A-Za-z0-9_-]{1,40}",
            parts in proptest::collection::vec(
                (disposition(), "[a-z0-9 \r\n]{0,120}", Just(""), any::<bool>()), 0..6),
            key in "[A-Za-z0-9_]{0,24}",
            preamble in proptest::option::of("[ \r\n]{0,20}"),
            epilogue in "[a-z\r\n]{0,10}",
            cut in proptest::option::of(any::<prop::sample::Index>()),
            split in 1usize..60,
            want_all: bool,
        ) {
            let mut b = Vec::new();
            if let Some(p) = &preamble {
                b.extend_from_slice(p.as_bytes());
                b.extend_from_slice(b"\r\n");
            }
            for (disposition, value, padding, content_type) in &parts {
                b.extend_from_slice(format!("--{boundary}{padding}\r\nContent-Disposition: {disposition}\r\n").as_bytes());
                if *content_type {
                    b.extend_from_slice(b"content-type: text/plain; charset=utf-8\r\n");
                }
                b.extend_from_slice(b"\r\n");
                if disposition.contains("name=\"clientKey\"") || disposition.ends_with("name=clientKey") {
                    b.extend_from_slice(key.as_bytes());
                } else {
                    b.extend_from_slice(value.as_bytes());
                }
                b.extend_from_slice(b"\r\n");
            }
            b.extend_from_slice(format!("--{boundary}--").as_bytes());
            b.extend_from_slice(epilogue.as_bytes());
            if let Some(cut) = cut {
                b.truncate(cut.index(b.len() + 1));
            }
            let ours = scan(&b, &boundary, split, want_all);
            // multer ignores an epilogue; read whole, one of text is refused here (Django
            // and PHP read parts in it).
            let text_after_close = b
                .windows(boundary.len() + 4)
                .position(|w| w == format!("--{boundary}--").as_bytes())
                .is_some_and(|at| b[at + boundary.len() + 4..].iter().any(|c| !b"\r\n".contains(c)));
            let theirs = multer_scan(&b, &boundary, split, want_all);
            if want_all && text_after_close && matches!(theirs, Outcome::Key(_) | Outcome::NoKey) {
                prop_assert_eq!(ours, Outcome::Malformed);
            } else {
                prop_assert_eq!(ours, theirs);
            }
        }

        #[test]
        fn header_block_ends_are_found_as_memmem_finds_them(
            data in proptest::collection::vec(prop_oneof![
                Just(b'\r'), Just(b'\n'), Just(b'a'), Just(b':')
            ], 0..40),
            from in 0usize..44,
        ) {
            let expected = data
                .get(from..)
                .and_then(|tail| memmem::find(tail, b"\r\n\r\n"))
                .map(|i| from + i + 4);
            prop_assert_eq!(header_block_end(&data, from), expected);
        }

        #[test]
        fn bare_line_breaks_are_found_as_byte_by_byte(
            block in proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'\r'), Just(b'\n')], 0..40),
        ) {
            let naive = block.iter().enumerate().any(|(i, &b)| match b {
                b'\r' => block.get(i + 1) != Some(&b'\n'),
                b'\n' => i == 0 || block[i - 1] != b'\r',
                _ => false,
            });
            prop_assert_eq!(has_bare_line_break(&block), naive);
        }

        #[test]
        fn tchar_is_rfc_9110s(b: u8) {
            let token = b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            prop_assert_eq!(is_tchar(b), token);
        }

        #[test]
        fn never_panics(
            body in proptest::collection::vec(any::<u8>(), 0..2000),
            split in 1usize..100,
            want_all: bool,
        ) {
            let _ = scan(&body, "XyZ", split, want_all);
        }

        #[test]
        fn header_params_never_panic(value in proptest::collection::vec(prop_oneof![
            Just(b';'), Just(b'='), Just(b'"'), Just(b'\\'), Just(b' '), Just(b'n'),
            Just(b'a'), Just(b'm'), Just(b'e'), any::<u8>(),
        ], 0..60)) {
            let _ = header_param(&value, b"name");
        }

        #[test]
        fn never_panics_on_near_multipart(
            pieces in proptest::collection::vec(prop_oneof![
                Just(&b"--XyZ"[..]), Just(&b"\r\n"[..]), Just(&b"--"[..]), Just(&b" "[..]),
                Just(&b"Content-Disposition: form-data; name=\"clientKey\""[..]),
                Just(&b"name=\""[..]), Just(&b"kg_1"[..]), Just(&b";"[..]), Just(&b"\""[..]),
            ], 0..40),
            split in 1usize..20,
            want_all: bool,
        ) {
            let _ = scan(&pieces.concat(), "XyZ", split, want_all);
        }
    }
}
