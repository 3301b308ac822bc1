//! Keys in request bodies: read the body only until the key field is complete, keep every
//! byte read, and hand back a [`Replay`] body that yields those same bytes and then the rest
//! of the stream, so the upstream receives exactly what the client sent.
//!
//! How much is read: at most `max_peek_bytes` are given to the parser; the key field (with the
//! delimiter that ends it) must be complete within them. A body whose exact length is known
//! and fits within the limit is read to its end, so a second key field there is refused as
//! ambiguous; a longer or chunked body stops at the first key field, so a large upload after
//! the key is never waited for. Memory is the limit plus at most one frame, whatever the body
//! size and however it is cut: frames under [`COPY_BELOW`] (the small chunks of a chunked body)
//! are copied together into blocks, so they cost neither a slot each nor the network read they
//! were sliced from; larger frames are kept as read.
//!
//! Every byte kept is charged to the process-wide [`PeekBudget`] (`proxy.max_peek_total_bytes`)
//! until the replay hands it upstream or is dropped; a peek whose next frame does not fit is
//! refused ([`PeekError::Busy`]).

use super::CredentialError;
use super::budget::{Charge, PeekBudget};
use super::form::{self, BodyKind, Progress, UrlencodedScanner};
use super::multipart::MultipartScanner;
use crate::config::{BodyKeyConfig, KeySource};
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, header::CONTENT_LENGTH};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use std::collections::VecDeque;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// The body could not be used to find a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Bad framing or encoding (boundary, truncated part, percent-encoding, non-UTF-8 key,
    /// invalid JSON). The reason is a fixed text, never a piece of the body.
    #[error("the request body is malformed: {0}")]
    Malformed(&'static str),
    /// The key field was not complete within the route's `max_peek_bytes`.
    #[error("no API key within the first {0} bytes of the body")]
    NotWithinLimit(usize),
    /// The client did not send enough of the body within the route's `peek_timeout`.
    #[error("the client did not send the body in time")]
    Timeout,
    /// The client's body failed mid-way (connection closed, bad chunked encoding).
    #[error("the request body could not be read")]
    Unreadable,
    /// `strip_form_field` is on and the urlencoded body does not end within `max_peek_bytes`:
    /// a second key field could follow the stripped one, and would then be the only one the
    /// upstream sees.
    #[error(
        "the body does not end within the first {0} bytes, so its key field cannot be stripped"
    )]
    TooLongToStrip(usize),
}

/// A body peek failed either on the key (empty, ambiguous: the same answers as for headers)
/// or on the body itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PeekError {
    #[error(transparent)]
    Credential(#[from] CredentialError),
    #[error(transparent)]
    Body(#[from] BodyError),
    /// The bytes the peek would keep do not fit in the process-wide peek budget.
    #[error("the body peek budget is exhausted")]
    Busy,
}

/// A key found in the body.
#[derive(Debug)]
pub struct BodyKey {
    pub value: String,
    pub source: KeySource,
    /// Stream offsets to remove to strip the key field (urlencoded bodies only).
    pub strip: Option<Range<u64>>,
}

/// What a peek learned, and the body to forward in place of the original.
pub struct Peeked<B> {
    pub key: Option<BodyKey>,
    /// No key, and the limit was reached before the body ended (a key may lie beyond it).
    pub limit_reached: bool,
    /// Not read, though its `Content-Type` is one of ours, and why ([`form::unreadable_reason`]):
    /// the answer when no header source has a key either.
    pub unreadable: Option<&'static str>,
    pub body: Replay<B>,
}

/// Looks for the key in `body` as `sources` (the route's body sources) and `headers` allow.
/// A body that no enabled source reads is not touched. The bytes kept are charged to `budget`
/// for as long as the returned replay holds them.
pub async fn peek<B>(
    cfg: &BodyKeyConfig,
    sources: &[KeySource],
    headers: &HeaderMap,
    body: B,
    budget: &Arc<PeekBudget>,
) -> Result<Peeked<B>, PeekError>
where
    B: Body<Data = Bytes> + Unpin + Send,
{
    let form = sources.contains(&KeySource::Form);
    let json = sources.contains(&KeySource::Json);
    let untouched = |body| Peeked {
        key: None,
        limit_reached: false,
        unreadable: None,
        body: Replay::untouched(body),
    };
    let Some(kind) = form::body_kind(headers, form, json)? else {
        return Ok(untouched(body));
    };
    if body.is_end_stream() {
        return Ok(untouched(body));
    }
    if let Some(reason) = form::unreadable_reason(headers) {
        return Ok(Peeked {
            unreadable: Some(reason),
            ..untouched(body)
        });
    }
    let exact = body.size_hint().exact();
    let limit = cfg.max_peek_bytes;
    if kind == BodyKind::Json && exact.is_some_and(|n| n > limit as u64) {
        // JSON is read whole: a body declared larger than the limit cannot pass.
        return Ok(Peeked {
            key: None,
            limit_reached: true,
            unreadable: None,
            body: Replay::untouched(body),
        });
    }
    // Stripping removes one key field: the body must be read to its end (within the limit)
    // to know there is no other.
    let strip_whole = cfg.strip_form_field && kind == BodyKind::Urlencoded;
    let want_all = strip_whole || exact.is_some_and(|n| n <= limit as u64);
    let mut tap = Tap::new(body, limit, Charge::new(budget));
    let found = match tokio::time::timeout(
        cfg.peek_timeout,
        find(&mut tap, &kind, &cfg.fields, want_all),
    )
    .await
    {
        Ok(found) => found,
        Err(_) => return Err(BodyError::Timeout.into()),
    };
    // Refused whatever was found: the bytes read so far are dropped with the tap.
    if tap.exhausted {
        return Err(PeekError::Busy);
    }
    // A failed read may have ended the stream early: never forward a cut body as whole.
    if tap.failed {
        return Err(BodyError::Unreadable.into());
    }
    let found = found?;
    if strip_whole && found.is_some() && !tap.ended {
        return Err(BodyError::TooLongToStrip(limit).into());
    }
    let limit_reached = found.is_none() && tap.limit_hit;
    let key = found.map(|(value, strip)| BodyKey {
        value,
        source: if kind == BodyKind::Json {
            KeySource::Json
        } else {
            KeySource::Form
        },
        strip,
    });
    Ok(Peeked {
        key,
        limit_reached,
        unreadable: None,
        body: tap.into_replay(),
    })
}

/// Runs the parser for `kind` over the tap. `Ok(None)`: no key in what was read.
async fn find<B>(
    tap: &mut Tap<B>,
    kind: &BodyKind,
    fields: &[String],
    want_all: bool,
) -> Result<Option<(String, Option<Range<u64>>)>, PeekError>
where
    B: Body<Data = Bytes> + Unpin + Send,
{
    match kind {
        BodyKind::Urlencoded => {
            let mut scanner = UrlencodedScanner::new(fields, want_all);
            while let Some(chunk) = tap.next_chunk().await {
                if scanner.feed(&chunk)? == Progress::Done {
                    break;
                }
            }
            let found = if tap.ended {
                scanner.finish()?
            } else {
                scanner.into_found()
            };
            Ok(found.map(|f| {
                let strip = f.strip_range();
                (f.value, Some(strip))
            }))
        }
        BodyKind::Multipart { boundary } => {
            let mut scanner = MultipartScanner::new(boundary, fields, want_all);
            while let Some(chunk) = tap.next_chunk().await {
                if scanner.feed(&chunk)? == Progress::Done {
                    break;
                }
            }
            // Cut by the limit (or a failed read, refused by the caller): what was read is
            // a prefix, not a malformed body.
            let found = if tap.ended {
                scanner.finish()?
            } else {
                scanner.into_found()
            };
            Ok(found.map(|v| (v, None)))
        }
        BodyKind::Json => {
            // A copy of what is kept, charged as well while it lives.
            let mut whole = BytesMut::new();
            let mut copy = tap.kept.charge.sibling();
            while let Some(chunk) = tap.next_chunk().await {
                if copy.add(chunk.len()).is_err() {
                    tap.exhausted = true;
                    return Ok(None);
                }
                whole.extend_from_slice(&chunk);
            }
            if !tap.ended {
                return Ok(None);
            }
            Ok(form::json_key(&whole, fields)?.map(|v| (v, None)))
        }
    }
}

/// Data frames shorter than this are copied into [`Kept`]'s blocks rather than kept as read.
/// hyper hands a chunked body over one frame per chunk, each a slice of its read buffer: kept
/// as they are, 1-byte chunks would cost a slot and a hold on that buffer per byte. Frames this
/// large are few within the limit and are kept without a copy.
const COPY_BELOW: usize = 16 * 1024;

/// The size of each block small frames are copied into.
const BLOCK: usize = 16 * 1024;

/// The bytes read during the peek, in order, for the replay. Framing is per hop, so only the
/// bytes and their order are kept: frames of [`COPY_BELOW`] or more as read, smaller ones
/// copied together into blocks of [`BLOCK`] bytes (the very first frame is kept as read, so a
/// body of one small frame is not copied). Pieces: at most one per 8 KiB kept, plus two.
struct Kept {
    pieces: VecDeque<Bytes>,
    /// Small frames copied after `pieces`; its spare room is the rest of the current block.
    tail: BytesMut,
    /// The bytes kept, charged to the peek budget.
    charge: Charge,
}

impl Kept {
    fn new(charge: Charge) -> Self {
        Self {
            pieces: VecDeque::new(),
            tail: BytesMut::new(),
            charge,
        }
    }

    /// Keeps `data` when the budget has room for it.
    fn keep(&mut self, data: Bytes) -> Result<(), super::budget::Exhausted> {
        self.charge.add(data.len())?;
        self.push(data);
        Ok(())
    }

    fn push(&mut self, data: Bytes) {
        if data.len() >= COPY_BELOW {
            self.seal();
            self.pieces.push_back(data);
            return;
        }
        if self.tail.is_empty() {
            match self.pieces.back() {
                None => {
                    self.pieces.push_back(data);
                    return;
                }
                // Only the first frame is a small piece kept as read (a sealed tail is followed
                // by a large frame): a second small frame copies it too.
                Some(first) if first.len() < COPY_BELOW => {
                    if let Some(first) = self.pieces.pop_back() {
                        self.copy(&first);
                    }
                }
                Some(_) => {}
            }
        }
        self.copy(&data);
    }

    /// Appends `data` to the tail, filling each block before starting the next.
    fn copy(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.tail.len() == self.tail.capacity() {
                self.seal();
                self.tail = BytesMut::with_capacity(BLOCK);
            }
            let n = data.len().min(self.tail.capacity() - self.tail.len());
            self.tail.extend_from_slice(&data[..n]);
            data = &data[n..];
        }
    }

    /// Ends the tail as a piece; the rest of its block stays the tail's room.
    fn seal(&mut self) {
        if !self.tail.is_empty() {
            self.pieces.push_back(self.tail.split().freeze());
        }
    }

    fn into_pieces(mut self) -> (VecDeque<Bytes>, Charge) {
        self.seal();
        (self.pieces, self.charge)
    }
}

/// Reads the client's body frame by frame, records every frame's bytes for the replay
/// ([`Kept`]), and gives the parser at most `limit` bytes. Reaching the limit, the end, or a read failure all look like
/// the end to the parser; the flags tell them apart afterwards.
struct Tap<B> {
    body: B,
    kept: Kept,
    trailers: Option<HeaderMap>,
    /// Bytes given to the parser.
    fed: usize,
    limit: usize,
    /// The body is longer than the limit.
    limit_hit: bool,
    /// The body's real end was read.
    ended: bool,
    failed: bool,
    /// A frame did not fit in the peek budget; nothing more is read.
    exhausted: bool,
}

impl<B> Tap<B>
where
    B: Body<Data = Bytes> + Unpin + Send,
{
    fn new(body: B, limit: usize, charge: Charge) -> Self {
        Self {
            body,
            kept: Kept::new(charge),
            trailers: None,
            fed: 0,
            limit,
            limit_hit: false,
            ended: false,
            failed: false,
            exhausted: false,
        }
    }

    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            if self.ended || self.failed || self.limit_hit || self.exhausted {
                return None;
            }
            let frame = match self.body.frame().await {
                None => {
                    self.ended = true;
                    return None;
                }
                Some(Err(_)) => {
                    self.failed = true;
                    return None;
                }
                Some(Ok(frame)) => frame,
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        self.trailers.get_or_insert_with(HeaderMap::new).extend(t);
                    }
                    continue;
                }
            };
            if data.is_empty() {
                continue;
            }
            if self.kept.keep(data.clone()).is_err() {
                self.exhausted = true;
                return None;
            }
            let room = self.limit - self.fed;
            if data.len() > room {
                self.limit_hit = true;
                if room == 0 {
                    return None;
                }
                self.fed = self.limit;
                return Some(data.slice(..room));
            }
            self.fed += data.len();
            return Some(data);
        }
    }

    fn into_replay(self) -> Replay<B> {
        let (prefix, charge) = self.kept.into_pieces();
        Replay {
            prefix,
            charge,
            trailers: self.trailers,
            rest: if self.ended { None } else { Some(self.body) },
        }
    }
}

/// The bytes read during the peek, then the rest of the client's body, unchanged.
pub struct Replay<B> {
    prefix: VecDeque<Bytes>,
    /// The prefix's bytes against the peek budget: given back as they are handed on, the rest
    /// when the replay is dropped.
    charge: Charge,
    /// Trailers seen during the peek (the body had ended then).
    trailers: Option<HeaderMap>,
    /// `None` once the client's body has ended.
    rest: Option<B>,
}

impl<B: Body<Data = Bytes> + Unpin> Replay<B> {
    pub fn untouched(body: B) -> Self {
        Self {
            prefix: VecDeque::new(),
            charge: Charge::default(),
            trailers: None,
            rest: Some(body),
        }
    }

    /// The original body when nothing was read from it, so the caller can forward it as is;
    /// otherwise the replay, boxed (callers keep it behind a box anyway).
    pub fn into_untouched(self) -> Result<B, Box<Self>> {
        match self {
            Replay {
                prefix,
                trailers: None,
                rest: Some(body),
                ..
            } if prefix.is_empty() => Ok(body),
            other => Err(Box::new(other)),
        }
    }

    fn prefix_len(&self) -> u64 {
        self.prefix.iter().map(|b| b.len() as u64).sum()
    }

    /// Removes the stream bytes in `range` from the replayed prefix; returns how many were
    /// removed (0 when the range is not wholly inside the prefix, which the scanner never
    /// produces).
    pub fn remove(&mut self, range: Range<u64>) -> u64 {
        let len = self.prefix_len();
        if range.start > range.end || range.end > len {
            return 0;
        }
        let mut whole = BytesMut::with_capacity(len as usize);
        for b in self.prefix.drain(..) {
            whole.extend_from_slice(&b);
        }
        // Both bounds are within `whole`, checked above.
        let (start, end) = (range.start as usize, range.end as usize);
        let tail = whole.split_off(end);
        whole.truncate(start);
        whole.extend_from_slice(&tail);
        if !whole.is_empty() {
            self.prefix.push_back(whole.freeze());
        }
        range.end - range.start
    }
}

impl<B> Body for Replay<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if let Some(data) = this.prefix.pop_front() {
            if this.prefix.is_empty() {
                // All of it (a stripped field leaves the charge above the prefix).
                this.charge.release(usize::MAX);
            } else {
                this.charge.release(data.len());
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(rest) = this.rest.as_mut() {
            match Pin::new(rest).poll_frame(cx) {
                Poll::Ready(None) => this.rest = None,
                other => return other,
            }
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty()
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let prefix = self.prefix_len();
        match &self.rest {
            // Exact, hyper would send it with a `Content-Length`, and so without the trailers,
            // which only chunked encoding carries (review: a body read to its end for the key
            // lost its trailers).
            None if self.trailers.is_none() => SizeHint::with_exact(prefix),
            None => {
                let mut hint = SizeHint::new();
                hint.set_lower(prefix);
                hint
            }
            Some(rest) => crate::proxy::read_ahead::after_prefix(prefix, &rest.size_hint()),
        }
    }
}

/// Strips the key field found at `range` from the replayed body and fixes `Content-Length`.
pub fn strip_field<B: Body<Data = Bytes> + Unpin>(
    body: &mut Replay<B>,
    headers: &mut HeaderMap,
    range: Range<u64>,
) {
    let removed = body.remove(range);
    if removed == 0 {
        return;
    }
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(n.saturating_sub(removed)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::CONTENT_TYPE;
    use proptest::prelude::*;
    use std::convert::Infallible;
    use std::time::Duration;

    /// A client body: given pieces, optionally an exact length, optionally a failure or a
    /// stall after the pieces.
    struct Client {
        pieces: VecDeque<Bytes>,
        exact: Option<u64>,
        then: Then,
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Then {
        End,
        Fail,
        Stall,
    }

    impl Client {
        fn new(body: &[u8], split: usize, exact: bool) -> Self {
            Self::cut(body, &[split], exact)
        }

        /// `body` in pieces of the sizes in `sizes`, taken in turn and over again.
        fn cut(body: &[u8], sizes: &[usize], exact: bool) -> Self {
            let mut pieces = VecDeque::new();
            let mut rest = body;
            for size in sizes.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (piece, after) = rest.split_at((*size).clamp(1, rest.len()));
                pieces.push_back(Bytes::copy_from_slice(piece));
                rest = after;
            }
            Self {
                pieces,
                exact: exact.then_some(body.len() as u64),
                then: Then::End,
            }
        }
    }

    impl Body for Client {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            let this = self.get_mut();
            match this.pieces.pop_front() {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                None => match this.then {
                    Then::End => Poll::Ready(None),
                    Then::Fail => Poll::Ready(Some(Err(std::io::Error::other("reset")))),
                    Then::Stall => Poll::Pending,
                },
            }
        }
        fn size_hint(&self) -> SizeHint {
            self.exact.map_or_else(SizeHint::new, SizeHint::with_exact)
        }
    }

    fn cfg(limit: usize) -> BodyKeyConfig {
        BodyKeyConfig {
            max_peek_bytes: limit,
            peek_timeout: Duration::from_millis(200),
            ..BodyKeyConfig::default()
        }
    }

    fn headers(ct: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, ct.parse().unwrap());
        h
    }

    const MP: &str = "multipart/form-data; boundary=XyZ";

    fn multipart(parts: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in parts {
            out.extend_from_slice(
                format!("--XyZ\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n")
                    .as_bytes(),
            );
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"--XyZ--\r\n");
        out
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    async fn collect<B: Body<Data = Bytes> + Unpin>(body: B) -> Vec<u8>
    where
        B::Error: std::fmt::Debug,
    {
        body.collect().await.unwrap().to_bytes().to_vec()
    }

    fn run(
        ct: &str,
        client: Client,
        limit: usize,
    ) -> Result<(Option<String>, bool, Vec<u8>), PeekError> {
        rt().block_on(async {
            let p = peek(
                &cfg(limit),
                &[KeySource::Form, KeySource::Json],
                &headers(ct),
                client,
                &PeekBudget::unlimited(),
            )
            .await?;
            let forwarded = collect(p.body).await;
            Ok((p.key.map(|k| k.value), p.limit_reached, forwarded))
        })
    }

    #[test]
    fn multipart_key_first_before_a_large_part_reads_only_the_start() {
        let big = vec![7u8; 1 << 20];
        let body = multipart(&[("clientKey", b"kg_1"), ("page", b"2"), ("file", &big)]);
        let client = Client::new(&body, 8192, true);
        rt().block_on(async {
            let p = peek(
                &cfg(65536),
                &[KeySource::Form],
                &headers(MP),
                client,
                &PeekBudget::unlimited(),
            )
            .await
            .unwrap();
            assert_eq!(p.key.as_ref().unwrap().value, "kg_1");
            assert_eq!(p.key.as_ref().unwrap().source, KeySource::Form);
            assert!(
                p.body.prefix_len() <= 65536 + 8192,
                "{}",
                p.body.prefix_len()
            );
            assert_eq!(collect(p.body).await, body);
        });
    }

    #[test]
    fn multipart_key_after_a_part_within_the_limit() {
        let part = vec![b'x'; 40_000];
        let body = multipart(&[("file", &part), ("clientKey", b"kg_2")]);
        let (key, _, fwd) = run(MP, Client::new(&body, 1000, false), 65536).unwrap();
        assert_eq!(key.as_deref(), Some("kg_2"));
        assert_eq!(fwd, body);
        // Beyond the limit: not found, and said so.
        let (key, limit, fwd) = run(MP, Client::new(&body, 1000, false), 16384).unwrap();
        assert_eq!((key, limit), (None, true));
        assert_eq!(fwd, body);
    }

    #[test]
    fn small_bodies_are_read_whole_and_two_keys_are_refused() {
        let body = multipart(&[("clientKey", b"a"), ("clientKey", b"b")]);
        assert!(matches!(
            run(MP, Client::new(&body, 7, true), 65536),
            Err(PeekError::Credential(CredentialError::Ambiguous(_)))
        ));
        // Unknown length: the first key wins and the rest is not waited for.
        let (key, _, fwd) = run(MP, Client::new(&body, 7, false), 65536).unwrap();
        assert_eq!(key.as_deref(), Some("a"));
        assert_eq!(fwd, body);
        let form = b"clientKey=a&clientKey=b";
        assert!(matches!(
            run(
                "application/x-www-form-urlencoded",
                Client::new(form, 3, true),
                65536
            ),
            Err(PeekError::Credential(CredentialError::Ambiguous(_)))
        ));
    }

    #[test]
    fn malformed_multipart_is_refused() {
        let body = multipart(&[("clientKey", b"a")]);
        let cut = &body[..body.len() - 12];
        assert!(matches!(
            run(MP, Client::new(cut, 5, true), 65536),
            Err(PeekError::Body(BodyError::Malformed(_)))
        ));
        let wrong = run(
            "multipart/form-data; boundary=Other",
            Client::new(&body, 5, true),
            65536,
        );
        assert!(matches!(
            wrong,
            Err(PeekError::Body(BodyError::Malformed(_)))
        ));
        let bad_headers = b"--XyZ\r\nContent-Disposition form-data\r\n\r\nv\r\n--XyZ--\r\n";
        assert!(matches!(
            run(MP, Client::new(bad_headers, 5, true), 65536),
            Err(PeekError::Body(BodyError::Malformed(_)))
        ));
        let not_utf8 = multipart(&[("clientKey", &[0xff, 0xfe])]);
        assert!(matches!(
            run(MP, Client::new(&not_utf8, 5, true), 65536),
            Err(PeekError::Body(BodyError::Malformed(_)))
        ));
    }

    #[test]
    fn urlencoded_limit_is_exact_whatever_the_pieces() {
        let mut body = vec![b'a'; 2000];
        body.extend_from_slice(b"&clientKey=kg_3&b=1");
        let end_of_key = 2000 + "&clientKey=kg_3&".len();
        for split in [1, 7, 500, 5000] {
            let (key, _, fwd) = run(
                "application/x-www-form-urlencoded",
                Client::new(&body, split, false),
                end_of_key,
            )
            .unwrap();
            assert_eq!(key.as_deref(), Some("kg_3"), "split {split}");
            assert_eq!(fwd, body);
            let (key, limit, fwd) = run(
                "application/x-www-form-urlencoded",
                Client::new(&body, split, false),
                end_of_key - 1,
            )
            .unwrap();
            assert_eq!((key, limit), (None, true), "split {split}");
            assert_eq!(fwd, body);
        }
    }

    #[test]
    fn one_byte_frames_are_kept_in_a_few_pieces() {
        // A chunked body of 1-byte chunks: hyper hands each over as its own frame, a slice of
        // its read buffer. The peek must not keep a piece (and a read buffer) per byte.
        let body: Vec<u8> = (0..65536u32).map(|i| b'a' + (i % 26) as u8).collect();
        rt().block_on(async {
            let p = peek(
                &cfg(65536),
                &[KeySource::Form],
                &headers("application/x-www-form-urlencoded"),
                Client::new(&body, 1, false),
                &PeekBudget::unlimited(),
            )
            .await
            .unwrap();
            assert!(p.key.is_none());
            assert!(p.body.prefix.len() <= 32, "{} pieces", p.body.prefix.len());
            assert_eq!(p.body.prefix_len(), 65536);
            assert_eq!(collect(p.body).await, body);
        });
        // Past the limit too, with the key found and stripped.
        let mut body = body;
        body.extend_from_slice(b"&clientKey=kg_1b&z=1");
        rt().block_on(async {
            let mut h = headers("application/x-www-form-urlencoded");
            let p = peek(
                &BodyKeyConfig {
                    strip_form_field: true,
                    ..cfg(1 << 20)
                },
                &[KeySource::Form],
                &h,
                Client::new(&body, 1, false),
                &PeekBudget::unlimited(),
            )
            .await
            .unwrap();
            let key = p.key.unwrap();
            assert_eq!(key.value, "kg_1b");
            assert!(p.body.prefix.len() <= 32, "{} pieces", p.body.prefix.len());
            let mut replay = p.body;
            strip_field(&mut replay, &mut h, key.strip.unwrap());
            assert_eq!(collect(replay).await, [&body[..65536], b"&z=1"].concat());
        });
    }

    #[test]
    fn mixed_frames_keep_large_ones_as_read() {
        // Small frames are copied together; large ones are kept as they came.
        let body = vec![b'x'; 3 * COPY_BELOW + 10];
        let sizes = [1, COPY_BELOW, 3, 5, COPY_BELOW + 1];
        rt().block_on(async {
            let p = peek(
                &cfg(1 << 20),
                &[KeySource::Form],
                &headers("application/x-www-form-urlencoded"),
                Client::cut(&body, &sizes, false),
                &PeekBudget::unlimited(),
            )
            .await
            .unwrap();
            let lens: Vec<usize> = p.body.prefix.iter().map(Bytes::len).collect();
            // 1 | 16384 | 3+5 | 16385 | 1+... (the rest, copied)
            assert_eq!(lens[..4], [1, COPY_BELOW, 8, COPY_BELOW + 1]);
            assert_eq!(collect(p.body).await, body);
        });
    }

    #[test]
    fn stripping_removes_the_field_and_fixes_the_length() {
        let body = b"page=2&clientKey=kg_4&perPage=10";
        rt().block_on(async {
            let mut h = headers("application/x-www-form-urlencoded");
            h.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
            let p = peek(
                &cfg(65536),
                &[KeySource::Form],
                &h,
                Client::new(body, 4, true),
                &PeekBudget::unlimited(),
            )
            .await
            .unwrap();
            let key = p.key.unwrap();
            let mut replay = p.body;
            strip_field(&mut replay, &mut h, key.strip.unwrap());
            assert_eq!(h[CONTENT_LENGTH], "17");
            assert_eq!(replay.size_hint().exact(), Some(17));
            assert_eq!(collect(replay).await, b"page=2&perPage=10");
        });
    }

    #[test]
    fn other_bodies_are_not_touched() {
        rt().block_on(async {
            let p = peek(
                &cfg(65536),
                &[KeySource::Form],
                &headers("application/json"),
                Client::new(b"{\"clientKey\":\"k\"}", 3, true),
                &PeekBudget::unlimited(),
            )
            .await
            .unwrap();
            assert!(p.key.is_none());
            assert!(p.body.into_untouched().is_ok());
        });
    }

    #[test]
    fn json_is_read_whole_within_the_limit() {
        let body = br#"{"page":2,"clientKey":"kg_5"}"#;
        let (key, _, fwd) = run("application/json", Client::new(body, 4, false), 65536).unwrap();
        assert_eq!(key.as_deref(), Some("kg_5"));
        assert_eq!(fwd, body);
        let big = format!(r#"{{"clientKey":"kg_5","pad":"{}"}}"#, "x".repeat(3000));
        let (key, limit, fwd) = run(
            "application/json",
            Client::new(big.as_bytes(), 100, false),
            1024,
        )
        .unwrap();
        assert_eq!((key, limit), (None, true));
        assert_eq!(fwd, big.as_bytes());
    }

    #[test]
    fn a_failing_or_stalling_client_is_refused() {
        let mut c = Client::new(b"clientKey=kg_6", 3, false);
        c.then = Then::Fail;
        assert_eq!(
            run("application/x-www-form-urlencoded", c, 65536).unwrap_err(),
            PeekError::Body(BodyError::Unreadable)
        );
        let mut c = Client::new(b"page=1&client", 3, false);
        c.then = Then::Stall;
        assert_eq!(
            run("application/x-www-form-urlencoded", c, 65536).unwrap_err(),
            PeekError::Body(BodyError::Timeout)
        );
    }

    #[test]
    fn trailers_seen_during_the_peek_are_replayed() {
        struct WithTrailers(Option<Frame<Bytes>>, Option<Frame<Bytes>>);
        impl Body for WithTrailers {
            type Data = Bytes;
            type Error = Infallible;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
                Poll::Ready(self.0.take().or_else(|| self.1.take()).map(Ok))
            }
        }
        let mut t = HeaderMap::new();
        t.insert("x-checksum", "1".parse().unwrap());
        let body = WithTrailers(
            Some(Frame::data(Bytes::from_static(b"clientKey=kg_7"))),
            Some(Frame::trailers(t)),
        );
        rt().block_on(async {
            let p = peek(
                &cfg(65536),
                &[KeySource::Form],
                &headers("application/x-www-form-urlencoded"),
                body,
                &PeekBudget::unlimited(),
            )
            .await
            .unwrap();
            assert_eq!(p.key.unwrap().value, "kg_7");
            // Not exact: hyper would send an exact body with a length, which has no trailers.
            assert_eq!(p.body.size_hint().exact(), None);
            let all = p.body.collect().await.unwrap();
            assert_eq!(all.trailers().unwrap()["x-checksum"], "1");
            assert_eq!(all.to_bytes(), "clientKey=kg_7");
        });
    }

    proptest! {
        // Whatever the body, the cut and the limit: no panic, and whatever was read is
        // forwarded byte for byte.
        #[test]
        fn forwarded_bytes_are_the_received_bytes(
            body in proptest::collection::vec(any::<u8>(), 0..3000),
            split in 1usize..300,
            limit in 1024usize..4096,
            exact: bool,
            ct in prop_oneof![
                Just("application/x-www-form-urlencoded"),
                Just(MP),
                Just("application/json"),
            ],
        ) {
            if let Ok((_, _, fwd)) = run(ct, Client::new(&body, split, exact), limit) {
                prop_assert_eq!(fwd, body);
            }
        }

        #[test]
        fn multipart_key_is_found_in_any_position(
            before in 0usize..6,
            after in 0usize..6,
            size in 0usize..2000,
            split in 1usize..700,
            key in "[a-zA-Z0-9_]{1,40}",
        ) {
            let filler = vec![b'-'; size];
            let mut parts: Vec<(&str, &[u8])> = vec![("field", &filler[..]); before];
            parts.push(("clientKey", key.as_bytes()));
            parts.extend(std::iter::repeat_n(("field", &filler[..]), after));
            let body = multipart(&parts);
            let (found, _, fwd) = run(MP, Client::new(&body, split, false), 1 << 20).unwrap();
            prop_assert_eq!(found, Some(key));
            prop_assert_eq!(fwd, body);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        // However the body is cut into frames (1-byte chunks, large frames, a mix), the
        // replay is the same bytes, and stripping removes exactly the key field.
        #[test]
        fn any_split_replays_the_same_bytes(
            len in 0usize..40_000,
            seed: u8,
            sizes in proptest::collection::vec(
                prop_oneof![1usize..8, 1usize..2000, 15_000usize..20_000],
                1..12,
            ),
            exact: bool,
            key_at in proptest::option::of(0usize..40_000),
        ) {
            let filler: Vec<u8> = (0..len)
                .map(|i| b'a' + ((i as u8).wrapping_mul(7) ^ seed) % 26)
                .collect();
            let (body, stripped) = match key_at {
                Some(at) => {
                    let at = at.min(len);
                    let (a, b) = filler.split_at(at);
                    let body = [a, b"&clientKey=kg_p&", b].concat();
                    let stripped = [a, b"&", b].concat();
                    (body, Some(stripped))
                }
                None => (filler, None),
            };
            let ct = "application/x-www-form-urlencoded";
            let (found, _, fwd) =
                run(ct, Client::cut(&body, &sizes, exact), 1 << 20).unwrap();
            prop_assert_eq!(found.is_some(), key_at.is_some());
            prop_assert_eq!(&fwd, &body);
            let Some(stripped) = stripped else {
                return Ok(());
            };
            let fwd = rt().block_on(async {
                let mut h = headers(ct);
                let p = peek(
                    &BodyKeyConfig {
                        strip_form_field: true,
                        ..cfg(1 << 20)
                    },
                    &[KeySource::Form],
                    &h,
                    Client::cut(&body, &sizes, exact),
                    &PeekBudget::unlimited(),
                )
                .await
                .unwrap();
                let mut replay = p.body;
                strip_field(&mut replay, &mut h, p.key.unwrap().strip.unwrap());
                collect(replay).await
            });
            prop_assert_eq!(fwd, stripped);
        }
    }

    const FORM: &str = "application/x-www-form-urlencoded";

    /// A peek of `body` (sent `chunk` bytes at a time) on a form route, charged to `budget`.
    async fn form_peek(
        body: &[u8],
        chunk: usize,
        budget: &Arc<PeekBudget>,
    ) -> Result<Peeked<Client>, PeekError> {
        peek(
            &cfg(65536),
            &[KeySource::Form],
            &headers(FORM),
            Client::new(body, chunk, false),
            budget,
        )
        .await
    }

    #[test]
    fn the_bytes_kept_are_charged_until_the_replay_hands_them_on() {
        rt().block_on(async {
            let budget = PeekBudget::new(1 << 20, None);
            let body = b"a=1&clientKey=kg_1&b=2".to_vec();
            let p = form_peek(&body, 5, &budget).await.unwrap();
            assert_eq!(p.key.unwrap().value, "kg_1");
            assert_eq!(budget.held() as u64, p.body.prefix_len());
            assert!(budget.held() > 0);
            assert_eq!(collect(p.body).await, body);
            assert_eq!(budget.held(), 0);
        });
    }

    #[test]
    fn a_peek_over_the_budget_is_refused_as_busy_and_gives_back_what_it_read() {
        rt().block_on(async {
            let budget = PeekBudget::new(4096, None);
            let mut other = Charge::new(&budget);
            other.add(4000).unwrap();
            let mut body = b"pad=".to_vec();
            body.extend(std::iter::repeat_n(b'x', 300));
            body.extend_from_slice(b"&clientKey=kg_1");
            let err = form_peek(&body, 50, &budget).await.err();
            assert_eq!(err, Some(PeekError::Busy));
            assert_eq!(budget.held(), 4000);
            drop(other);
            // With room again, the same request passes.
            let p = form_peek(&body, 50, &budget).await.unwrap();
            assert_eq!(p.key.unwrap().value, "kg_1");
        });
    }

    #[test]
    fn a_json_peek_charges_its_copy_too() {
        rt().block_on(async {
            let body = br#"{"clientKey":"kg_1","pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;
            // Room for the body once, not for the body and its copy.
            let budget = PeekBudget::new(body.len() + body.len() / 2, None);
            let err = peek(
                &cfg(65536),
                &[KeySource::Json],
                &headers("application/json"),
                Client::new(body, 10, true),
                &budget,
            )
            .await
            .err();
            assert_eq!(err, Some(PeekError::Busy));
            assert_eq!(budget.held(), 0);
        });
    }

    #[test]
    fn a_peek_dropped_midway_gives_back_its_bytes() {
        rt().block_on(async {
            let budget = PeekBudget::new(1 << 20, None);
            // The key never comes: the peek waits on the stalled client.
            let mut client = Client::new(b"pad=xxxxxxxxxx&more=yyyy", 4, false);
            client.then = Then::Stall;
            let headers = headers(FORM);
            let cfg = BodyKeyConfig {
                peek_timeout: Duration::from_secs(60),
                ..cfg(65536)
            };
            let sources = [KeySource::Form];
            let fut = peek(&cfg, &sources, &headers, client, &budget);
            let mut fut = Box::pin(fut);
            let waited = tokio::time::timeout(Duration::from_millis(50), fut.as_mut()).await;
            assert!(waited.is_err(), "still waiting for the key");
            assert!(budget.held() > 0);
            // The client went away: hyper drops the request's future.
            drop(fut);
            assert_eq!(budget.held(), 0);
        });
    }
}
