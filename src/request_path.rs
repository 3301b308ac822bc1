//! The path a request is routed by. keygate and the upstream must read a path the same way,
//! or a request matched to one route's rules reaches another route's handler: `/x/../admin`,
//! `/%61dmin`, `//admin` and `/admin;v=1` are all `/admin` to some upstream frameworks.
//! So routes match the path with its percent-encoding decoded (every framework decodes before
//! it routes), and a path whose meaning depends on the upstream — dot segments, empty
//! segments, `;` parameters, an encoded `/`, `\` or `%`, a backslash, a control character —
//! is refused with 400, as Spring Security's `StrictHttpFirewall` refuses them. The path is
//! forwarded as the client sent it.

use std::borrow::Cow;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path has a `.` or `..` segment")]
    DotSegment,
    #[error("the path has an empty segment (`//`)")]
    EmptySegment,
    #[error("the path has a `;` (path parameters)")]
    Parameters,
    #[error("the path has a backslash")]
    Backslash,
    #[error("the path has an encoded `/`, `\\` or `%`")]
    EncodedDelimiter,
    #[error("the path has a control character")]
    ControlCharacter,
    #[error("the path has a `%` not followed by two hex digits")]
    BadEncoding,
    #[error("the path has a letter that some upstreams take for an ASCII one when case is ignored")]
    FoldsToAscii,
}

/// With `[proxy] case_insensitive_paths`: refuses a path with one of the four non-ASCII
/// letters whose case mapping is ASCII (`İ` U+0130, `ı` U+0131, `ſ` U+017F, Kelvin `K`
/// U+212A): Java's `equalsIgnoreCase` and .NET's `OrdinalIgnoreCase` take `/ſecret` for
/// `/secret`, which keygate's ASCII-only folding does not.
pub fn check_case_folding(path: &[u8]) -> Result<(), PathError> {
    let folds = path
        .windows(2)
        .any(|w| matches!(w, [0xC4, 0xB0 | 0xB1] | [0xC5, 0xBF]))
        || path.windows(3).any(|w| w == [0xE2, 0x84, 0xAA]);
    if folds {
        Err(PathError::FoldsToAscii)
    } else {
        Ok(())
    }
}

/// `raw` (a request's path, as sent) decoded, or why it is refused. No allocation unless the
/// path has a `%`; one pass over it unless it has a `%` or a `/` followed by `.` or `/`.
pub fn routing_path(raw: &str) -> Result<Cow<'_, [u8]>, PathError> {
    let bytes = raw.as_bytes();
    // A path without its leading `/` (`*` of `OPTIONS *`) is rare: its segments are checked
    // whole, so `../admin` would be found, should hyper or h2 ever let one through.
    let (mut encoded, mut dot_or_empty) = (false, bytes.first() != Some(&b'/'));
    let mut previous = 0u8;
    for &b in bytes {
        match b {
            b'%' => encoded = true,
            b'.' | b'/' if previous == b'/' => dot_or_empty = true,
            _ => check_byte(b)?,
        }
        previous = b;
    }
    if encoded {
        let path = decode(bytes)?;
        check_segments(&path)?;
        return Ok(Cow::Owned(path));
    }
    if dot_or_empty {
        check_segments(bytes)?;
    }
    Ok(Cow::Borrowed(bytes))
}

#[inline]
fn check_byte(b: u8) -> Result<(), PathError> {
    match b {
        b';' => Err(PathError::Parameters),
        b'\\' => Err(PathError::Backslash),
        0..=0x1f | 0x7f => Err(PathError::ControlCharacter),
        _ => Ok(()),
    }
}

fn decode(bytes: &[u8]) -> Result<Vec<u8>, PathError> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let hex = |at: usize| {
            bytes
                .get(at)
                .and_then(|&c| (c as char).to_digit(16))
                .ok_or(PathError::BadEncoding)
        };
        let b = u8::try_from(hex(i + 1)? * 16 + hex(i + 2)?).map_err(|_| PathError::BadEncoding)?;
        if matches!(b, b'/' | b'\\' | b'%') {
            return Err(PathError::EncodedDelimiter);
        }
        check_byte(b)?;
        out.push(b);
        i += 3;
    }
    Ok(out)
}

/// Segments after the leading `/`: none is `.` or `..`, and none but the last is empty. A path
/// that does not start with `/` (`*` of `OPTIONS *`; hyper lets no other through, and h2 resets
/// a stream whose `:path` is `../admin`, `./x` or `x`, a review found) is checked whole all the
/// same, so `a/.` and `../admin` are as ambiguous as `/a/.` and `/../admin`.
fn check_segments(path: &[u8]) -> Result<(), PathError> {
    let rest = path.strip_prefix(b"/").unwrap_or(path);
    let mut segments = rest.split(|&b| b == b'/').peekable();
    while let Some(segment) = segments.next() {
        match segment {
            b"." | b".." => return Err(PathError::DotSegment),
            b"" if segments.peek().is_some() => return Err(PathError::EmptySegment),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_paths_are_used_as_they_are() {
        for p in [
            "/",
            "/api",
            "/api/",
            "/api/items/7",
            "/a.b/c..d/.e",
            "*",
            "/ünï",
        ] {
            assert!(
                matches!(routing_path(p), Ok(Cow::Borrowed(b)) if b == p.as_bytes()),
                "{p}"
            );
        }
    }

    #[test]
    fn percent_encoding_is_decoded() {
        let decoded = |p| routing_path(p).map(|c| c.into_owned());
        assert_eq!(decoded("/%61dmin/x"), Ok(b"/admin/x".to_vec()));
        assert_eq!(decoded("/a%20b%7E"), Ok(b"/a b~".to_vec()));
        assert_eq!(decoded("/%C3%BC"), Ok("/ü".as_bytes().to_vec()));
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        use PathError::*;
        for (p, why) in [
            ("/x/../admin", DotSegment),
            ("/./admin", DotSegment),
            ("/admin/.", DotSegment),
            ("/admin/..", DotSegment),
            ("/%2e%2E/admin", DotSegment),
            ("/x/%2e./admin", DotSegment),
            ("//admin", EmptySegment),
            ("/admin//x", EmptySegment),
            ("/admin;v=1/x", Parameters),
            ("/admin%3bx", Parameters),
            ("/admin\\x", Backslash),
            ("/admin%2fx", EncodedDelimiter),
            ("/admin%2Fx", EncodedDelimiter),
            ("/admin%5cx", EncodedDelimiter),
            ("/%2561dmin", EncodedDelimiter),
            ("/admin%00", ControlCharacter),
            ("/admin%0a", ControlCharacter),
            ("/admin%", BadEncoding),
            ("/admin%4", BadEncoding),
            ("/admin%zz", BadEncoding),
            // No leading `/` (neither hyper nor h2 passes one but `*`): checked whole.
            ("a/.", DotSegment),
            ("../admin", DotSegment),
            ("./admin", DotSegment),
            ("..", DotSegment),
            (".", DotSegment),
            ("a/../admin", DotSegment),
            ("a//admin", EmptySegment),
        ] {
            assert_eq!(routing_path(p), Err(why), "{p}");
        }
    }

    #[test]
    fn letters_that_fold_to_ascii_are_found() {
        for p in [
            "/\u{17F}ecret",
            "/\u{212A}ey",
            "/\u{131}d",
            "/\u{130}d",
            "/x/\u{17F}",
        ] {
            assert_eq!(
                check_case_folding(p.as_bytes()),
                Err(PathError::FoldsToAscii),
                "{p}"
            );
        }
        for p in ["/secret", "/ünï", "/é/x", "/\u{212B}"] {
            assert_eq!(check_case_folding(p.as_bytes()), Ok(()), "{p}");
        }
        // Exactly the letters outside ASCII whose simple (one-letter) case mapping lands in it;
        // `ß` to `SS` is a full mapping, which char-by-char comparisons do not make.
        let simple_ascii = |m: &mut dyn ExactSizeIterator<Item = char>| {
            m.len() == 1 && m.next().is_some_and(|m| m.is_ascii())
        };
        for c in (0x80..=0x10FFFFu32).filter_map(char::from_u32) {
            // `İ`'s simple lowercase is `i`; Rust gives its full one, `i` and a combining dot.
            let folds = simple_ascii(&mut c.to_lowercase())
                || simple_ascii(&mut c.to_uppercase())
                || c == '\u{130}';
            let mut buf = [0u8; 5];
            buf[0] = b'/';
            let len = 1 + c.encode_utf8(&mut buf[1..]).len();
            assert_eq!(check_case_folding(&buf[..len]).is_err(), folds, "{c:?}");
        }
    }

    proptest! {
        /// Whatever comes in: no panic, and what passes is free of every ambiguity.
        #[test]
        fn what_passes_is_unambiguous(raw in "[/a-z.%;\\\\0-9A-F]{0,24}") {
            if let Ok(path) = routing_path(&raw) {
                let s = String::from_utf8_lossy(&path);
                prop_assert!(!s.contains("//") && !s.contains(';') && !s.contains('\\'), "{}", s);
                prop_assert!(!s.contains("/./") && !s.contains("/../"), "{}", s);
                prop_assert!(!s.ends_with("/.") && !s.ends_with("/.."), "{}", s);
                prop_assert!(s.split('/').all(|seg| seg != "." && seg != ".."), "{}", s);
                prop_assert!(raw.contains('%') || *path == *raw.as_bytes());
            }
        }
    }
}
