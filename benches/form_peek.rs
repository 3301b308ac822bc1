//! The body peek for keys in request bodies (`credential::body::peek`): multipart and
//! urlencoded bodies of 4 KiB and 1 MiB, with the key first and with the key after a large
//! part. The body arrives in 16 KiB frames with a known length, as a `Content-Length` upload
//! does through hyper. Key-first cases run with the default settings (64 KiB limit: a larger
//! body is read only up to the key); key-after cases raise the limit to 2 MiB so the key after
//! a 1 MiB part can be reached (the body is then read whole).

#![allow(clippy::unwrap_used)] // benchmark set-up: a panic is a broken bench

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use keygate::config::{BodyKeyConfig, KeySource};
use keygate::credential::body::peek;
use keygate::credential::budget::PeekBudget;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

const FRAME: usize = 16 * 1024;
const KEY: &str = "kg_X22qN7r2lAXzdA9OZwnLyimvHZQ00J4YC1io";

/// A client body already in memory: frames of `FRAME` bytes and an exact length.
struct Frames {
    frames: VecDeque<Bytes>,
    len: u64,
}

impl Frames {
    fn new(body: &Bytes) -> Self {
        let frames = (0..body.len())
            .step_by(FRAME)
            .map(|at| body.slice(at..(at + FRAME).min(body.len())))
            .collect();
        Self {
            frames,
            len: body.len() as u64,
        }
    }
}

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.frames.pop_front().map(|b| Ok(Frame::data(b))))
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len)
    }
}

fn multipart(filler: usize, key_first: bool) -> Bytes {
    let key = format!("--b\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\n{KEY}\r\n");
    let file = format!(
        "--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\r\n{}\r\n",
        "x".repeat(filler)
    );
    let (a, b) = if key_first { (key, file) } else { (file, key) };
    Bytes::from(format!("{a}{b}--b--\r\n"))
}

fn urlencoded(filler: usize, key_first: bool) -> Bytes {
    let key = format!("clientKey={KEY}");
    let data = format!("data={}", "x".repeat(filler));
    let (a, b) = if key_first { (key, data) } else { (data, key) };
    Bytes::from(format!("{a}&{b}"))
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let default_cfg = BodyKeyConfig::default();
    let large_cfg = BodyKeyConfig {
        max_peek_bytes: 2 * 1024 * 1024,
        peek_timeout: Duration::from_secs(10),
        ..BodyKeyConfig::default()
    };
    let sources = [KeySource::Form];
    let mut group = c.benchmark_group("form_peek");
    for (kind, content_type) in [
        ("multipart", "multipart/form-data; boundary=b"),
        ("urlencoded", "application/x-www-form-urlencoded"),
    ] {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        for (size_name, filler) in [("4KiB", 4096 - 200), ("1MiB", 1024 * 1024 - 200)] {
            for key_first in [true, false] {
                let body = match kind {
                    "multipart" => multipart(filler, key_first),
                    _ => urlencoded(filler, key_first),
                };
                let (place, cfg) = if key_first {
                    ("key_first", &default_cfg)
                } else {
                    ("key_after_part", &large_cfg)
                };
                let budget = PeekBudget::unlimited();
                group.throughput(Throughput::Bytes(body.len() as u64));
                group.bench_with_input(
                    BenchmarkId::new(format!("{kind}_{size_name}"), place),
                    &body,
                    |b, body| {
                        b.to_async(&rt).iter(|| async {
                            // Charged as in the gateway (the count, not a limit).
                            let p = peek(cfg, &sources, &headers, Frames::new(body), &budget)
                                .await
                                .unwrap();
                            assert!(p.key.is_some());
                            p
                        })
                    },
                );
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
