//! Prometheus metrics, in base units, with bounded label sets: route names and outcomes from
//! the configuration, store operation names, never a key, key id or client address (per-key
//! figures belong to usage records). Hot-path counters are resolved once per route and
//! outcome at start-up, so a request costs a few atomic adds, no label lookup.

use crate::auth::verify::VerifyStats;
use crate::error::Outcome;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{
    Counter, Gauge, Histogram as ProtoHistogram, Metric, MetricFamily, MetricType,
};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

pub const OUTCOMES: [Outcome; 13] = [
    Outcome::Forwarded,
    Outcome::NoRoute,
    Outcome::BadRequest,
    Outcome::ClientTimeout,
    Outcome::Unauthenticated,
    Outcome::Forbidden,
    Outcome::StoreUnavailable,
    Outcome::InternalError,
    Outcome::UpstreamError,
    Outcome::ClientClosed,
    Outcome::DrainCutOff,
    Outcome::Overloaded,
    Outcome::UpstreamBadResponse,
];

/// The operation names `store::metered::MeteredStore` reports.
pub const STORE_OPERATIONS: [&str; 17] = [
    "find_by_hash",
    "create",
    "get",
    "update",
    "rotate",
    "delete",
    "list",
    "ping",
    "subscribe",
    "put_member",
    "remove_member",
    "get_member",
    "list_members",
    "append_audit",
    "list_audit",
    "record_usage",
    "usage",
];

/// Request latency buckets: 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

fn outcome_index(o: Outcome) -> usize {
    match o {
        Outcome::Forwarded => 0,
        Outcome::NoRoute => 1,
        Outcome::BadRequest => 2,
        Outcome::ClientTimeout => 3,
        Outcome::Unauthenticated => 4,
        Outcome::Forbidden => 5,
        Outcome::StoreUnavailable => 6,
        Outcome::InternalError => 7,
        Outcome::UpstreamError => 8,
        Outcome::ClientClosed => 9,
        Outcome::DrainCutOff => 10,
        Outcome::Overloaded => 11,
        Outcome::UpstreamBadResponse => 12,
    }
}

struct RouteSeries {
    requests: Vec<IntCounter>,
    duration: Vec<Histogram>,
}

/// The series every proxied request writes: its count and latency by route and outcome, the
/// upstream's latency and the in-flight gauge. Each proxy thread gets its own copy
/// ([`Metrics::request_series`]) and a scrape sums the copies: with one shared copy, every
/// request's dozen atomic adds (a histogram observation is four) pulled the same cache lines
/// from core to core, and `observe_request` was keygate's busiest symbol at 4 threads on 16
/// cores.
pub struct RequestSeries {
    /// One entry per route (in route-table order), then one for "no route".
    routes: Vec<RouteSeries>,
    upstream_duration: HistogramVec,
    pub in_flight: IntGauge,
}

impl RequestSeries {
    /// `route`: index in the route table, `None` when no route matched.
    pub fn observe_request(&self, route: Option<usize>, outcome: Outcome, elapsed: Duration) {
        let series = route
            .and_then(|i| self.routes.get(i))
            .or_else(|| self.routes.last());
        if let Some(s) = series {
            let i = outcome_index(outcome);
            s.requests[i].inc();
            s.duration[i].observe(elapsed.as_secs_f64());
        }
    }

    /// The upstream's latency series, resolved once so a request pays no label lookup.
    pub fn upstream_duration(&self, upstream: &str) -> Histogram {
        self.upstream_duration.with_label_values(&[upstream])
    }
}

/// One copy's metric vectors.
#[derive(Clone)]
struct SeriesVecs {
    requests: IntCounterVec,
    duration: HistogramVec,
    upstream_duration: HistogramVec,
    in_flight: IntGauge,
}

impl SeriesVecs {
    fn new() -> Result<Self, prometheus::Error> {
        Ok(Self {
            requests: IntCounterVec::new(
                Opts::new(
                    "keygate_requests_total",
                    "Proxied requests by route and outcome",
                ),
                &["route", "outcome"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "keygate_request_duration_seconds",
                    "Time from request headers to response headers, by route and outcome",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["route", "outcome"],
            )?,
            upstream_duration: HistogramVec::new(
                HistogramOpts::new(
                    "keygate_upstream_duration_seconds",
                    "Time the upstream took to send response headers",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["upstream"],
            )?,
            in_flight: IntGauge::new("keygate_in_flight_requests", "Requests being handled")?,
        })
    }

    /// Resolves every route and outcome's series: each exists (at zero) from the start, and a
    /// request pays no label lookup.
    fn series(&self, route_names: &[String]) -> RequestSeries {
        let routes = route_names
            .iter()
            .map(String::as_str)
            .chain(std::iter::once("-"))
            .map(|name| RouteSeries {
                requests: OUTCOMES
                    .iter()
                    .map(|o| self.requests.with_label_values(&[name, o.as_str()]))
                    .collect(),
                duration: OUTCOMES
                    .iter()
                    .map(|o| self.duration.with_label_values(&[name, o.as_str()]))
                    .collect(),
            })
            .collect();
        RequestSeries {
            routes,
            upstream_duration: self.upstream_duration.clone(),
            in_flight: self.in_flight.clone(),
        }
    }

    /// The four families, always in this order.
    fn collect(&self) -> Vec<MetricFamily> {
        let mut out = self.requests.collect();
        out.extend(self.duration.collect());
        out.extend(self.upstream_duration.collect());
        out.extend(self.in_flight.collect());
        out
    }
}

/// Exposes the sum of every [`RequestSeries`] copy under the one set of names.
struct SummedSeries {
    /// The copy made at start-up: its descriptions are the collector's.
    first: SeriesVecs,
    /// Every copy, the first included.
    copies: Arc<Mutex<Vec<SeriesVecs>>>,
}

impl Collector for SummedSeries {
    fn desc(&self) -> Vec<&Desc> {
        let f = &self.first;
        let mut d = f.requests.desc();
        d.extend(f.duration.desc());
        d.extend(f.upstream_duration.desc());
        d.extend(f.in_flight.desc());
        d
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let copies = self.copies.lock().unwrap_or_else(PoisonError::into_inner);
        let mut families = copies.iter().map(SeriesVecs::collect);
        let mut sum = families.next().unwrap_or_default();
        for more in families {
            for (into, more) in sum.iter_mut().zip(&more) {
                add_family(into, more);
            }
        }
        sum
    }
}

/// Adds `more`'s series to `into`'s (the same family from another copy: same name, type and
/// buckets), matching series by their labels; a series only `more` has is added as it is.
fn add_family(into: &mut MetricFamily, more: &MetricFamily) {
    let labels = |m: &Metric| -> Vec<(String, String)> {
        m.get_label()
            .iter()
            .map(|l| (l.name().to_owned(), l.value().to_owned()))
            .collect()
    };
    let mut index: HashMap<Vec<(String, String)>, usize> = into
        .get_metric()
        .iter()
        .enumerate()
        .map(|(i, m)| (labels(m), i))
        .collect();
    let kind = into.get_field_type();
    for m in more.get_metric() {
        let key = labels(m);
        let Some(&i) = index.get(&key) else {
            index.insert(key, into.get_metric().len());
            into.mut_metric().push(m.clone());
            continue;
        };
        let target = &mut into.mut_metric()[i];
        match kind {
            MetricType::COUNTER => {
                let mut c = Counter::default();
                c.set_value(target.get_counter().get_value() + m.get_counter().get_value());
                target.set_counter(c);
            }
            MetricType::GAUGE => {
                let mut g = Gauge::default();
                g.set_value(target.get_gauge().get_value() + m.get_gauge().get_value());
                target.set_gauge(g);
            }
            MetricType::HISTOGRAM => {
                let (a, b) = (target.get_histogram(), m.get_histogram());
                let mut h = ProtoHistogram::default();
                h.set_sample_count(a.get_sample_count() + b.get_sample_count());
                h.set_sample_sum(a.get_sample_sum() + b.get_sample_sum());
                h.set_bucket(
                    a.get_bucket()
                        .iter()
                        .zip(b.get_bucket())
                        .map(|(x, y)| {
                            let mut bucket = x.clone();
                            bucket
                                .set_cumulative_count(x.cumulative_count() + y.cumulative_count());
                            bucket
                        })
                        .collect(),
                );
                target.set_histogram(h);
            }
            // The copies hold counters, gauges and histograms only.
            MetricType::SUMMARY | MetricType::UNTYPED => {}
        }
    }
}

pub struct Metrics {
    registry: Registry,
    route_names: Vec<String>,
    /// Every [`RequestSeries`] copy's vectors; the first, made at start-up, stays at zero.
    request_series: Arc<Mutex<Vec<SeriesVecs>>>,
    pub open_connections: IntGauge,
    /// Connections open (or being opened) to each upstream, over every proxy thread: one
    /// process-wide gauge per upstream, moved only when a connection opens or closes.
    upstream_connections: IntGaugeVec,
    /// Request body bytes held by key peeks (`proxy.max_peek_total_bytes` bounds it).
    pub peek_held_bytes: IntGauge,
    store_ops: IntCounterVec,
    store_errors: IntCounterVec,
    store_duration: HistogramVec,
    store_up: IntGauge,
    cache_entries: IntGauge,
    change_feed_up: IntGauge,
    /// Admin changes in force whose audit event could not be stored.
    pub audit_unrecorded: IntCounter,
}

#[derive(Debug, thiserror::Error)]
#[error("metrics registration failed: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    /// `route_names` in route-table order.
    pub fn new(route_names: &[String]) -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let first = SeriesVecs::new()?;
        // Every route and outcome's series exists from the start, whoever asks for copies.
        first.series(route_names);
        let request_series = Arc::new(Mutex::new(vec![first.clone()]));
        let open_connections =
            IntGauge::new("keygate_open_connections", "Open client connections")?;
        let upstream_connections = IntGaugeVec::new(
            Opts::new(
                "keygate_upstream_connections",
                "Connections open or being opened to the upstream, idle ones included; at most \
                 its max_connections",
            ),
            &["upstream"],
        )?;
        let peek_held_bytes = IntGauge::new(
            "keygate_peek_held_bytes",
            "Request body bytes held by API key peeks (read to find a key in the body, not yet \
             forwarded); proxy.max_peek_total_bytes bounds it",
        )?;
        let store_ops = IntCounterVec::new(
            Opts::new("keygate_store_operations_total", "Key store operations"),
            &["operation"],
        )?;
        let store_errors = IntCounterVec::new(
            Opts::new(
                "keygate_store_errors_total",
                "Key store operations that failed (store unreachable or corrupt data)",
            ),
            &["operation"],
        )?;
        let store_duration = HistogramVec::new(
            HistogramOpts::new(
                "keygate_store_operation_duration_seconds",
                "Key store operation latency",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["operation"],
        )?;
        let store_up = IntGauge::new(
            "keygate_store_up",
            "1 when the key store answered the last check, else 0",
        )?;
        let cache_entries =
            IntGauge::new("keygate_auth_cache_entries", "Verified keys in the cache")?;
        let change_feed_up = IntGauge::new(
            "keygate_change_feed_up",
            "1 while the store's change feed is connected; 0: no key is served from the cache, \
             every request asks the store",
        )?;
        let audit_unrecorded = IntCounter::new(
            "keygate_audit_unrecorded_total",
            "Key and team changes that took effect but whose audit event could not be stored",
        )?;
        let build_info = IntGauge::with_opts(
            Opts::new("keygate_build_info", "Build information; always 1")
                .const_label("version", env!("CARGO_PKG_VERSION")),
        )?;
        build_info.set(1);

        // Every series exists from the start (at zero), so dashboards and alerts never see a
        // missing series where "none yet" is meant.
        for op in STORE_OPERATIONS {
            store_ops.with_label_values(&[op]);
            store_errors.with_label_values(&[op]);
            store_duration.with_label_values(&[op]);
        }
        registry.register(Box::new(SummedSeries {
            first,
            copies: request_series.clone(),
        }))?;
        registry.register(Box::new(open_connections.clone()))?;
        registry.register(Box::new(upstream_connections.clone()))?;
        registry.register(Box::new(peek_held_bytes.clone()))?;
        registry.register(Box::new(store_ops.clone()))?;
        registry.register(Box::new(store_errors.clone()))?;
        registry.register(Box::new(store_duration.clone()))?;
        registry.register(Box::new(store_up.clone()))?;
        registry.register(Box::new(cache_entries.clone()))?;
        registry.register(Box::new(change_feed_up.clone()))?;
        registry.register(Box::new(audit_unrecorded.clone()))?;
        registry.register(Box::new(build_info))?;
        registry.register(Box::new(CutOffCollector::new()?))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        Ok(Self {
            registry,
            route_names: route_names.to_vec(),
            request_series,
            open_connections,
            upstream_connections,
            peek_held_bytes,
            store_ops,
            store_errors,
            store_duration,
            store_up,
            cache_entries,
            change_feed_up,
            audit_unrecorded,
        })
    }

    /// Adds the verifier's counters (read at scrape time from its atomics).
    pub fn register_verify_stats(&self, stats: Arc<dyn StatsSource>) -> Result<(), MetricsError> {
        self.registry
            .register(Box::new(VerifyCollector::new(stats)?))?;
        Ok(())
    }

    /// A copy of the request series of its own, for one proxy thread (or the one shared
    /// pool); a scrape reports the sum of all copies.
    pub fn request_series(&self) -> Result<RequestSeries, MetricsError> {
        let vecs = SeriesVecs::new()?;
        self.request_series
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(vecs.clone());
        Ok(vecs.series(&self.route_names))
    }

    /// The upstream's open-connections gauge; its series exists (at zero) once asked for.
    pub fn upstream_connections(&self, upstream: &str) -> IntGauge {
        self.upstream_connections.with_label_values(&[upstream])
    }

    pub fn observe_store(&self, operation: &'static str, elapsed: Duration, failed: bool) {
        self.store_ops.with_label_values(&[operation]).inc();
        if failed {
            self.store_errors.with_label_values(&[operation]).inc();
        }
        self.store_duration
            .with_label_values(&[operation])
            .observe(elapsed.as_secs_f64());
    }

    pub fn set_store_up(&self, up: bool) {
        self.store_up.set(i64::from(up));
    }

    pub fn set_change_feed_up(&self, up: bool) {
        self.change_feed_up.set(i64::from(up));
    }

    pub fn set_cache_entries(&self, n: u64) {
        self.cache_entries.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// Where the verifier's counters come from.
pub trait StatsSource: Send + Sync {
    fn stats(&self) -> &VerifyStats;
}

impl StatsSource for crate::auth::verify::Verifier {
    fn stats(&self) -> &VerifyStats {
        &self.stats
    }
}

struct VerifyCollector {
    source: Arc<dyn StatsSource>,
    descs: Vec<Desc>,
}

const VERIFY_COUNTERS: [(&str, &str); 7] = [
    (
        "keygate_auth_cache_hits_total",
        "Key verifications answered by the cache",
    ),
    (
        "keygate_auth_cache_misses_total",
        "Key verifications that missed the cache",
    ),
    (
        "keygate_auth_cache_negative_hits_total",
        "Unknown keys answered by the negative cache",
    ),
    (
        "keygate_auth_cache_stale_served_total",
        "Keys served from the stale cache while the store could not answer",
    ),
    (
        "keygate_auth_store_lookups_total",
        "Key lookups sent to the store",
    ),
    (
        "keygate_auth_store_errors_total",
        "Key lookups the store could not answer",
    ),
    (
        "keygate_auth_key_records_unreadable_total",
        "Key lookups that found a stored record that could not be decoded",
    ),
];

impl VerifyCollector {
    fn new(source: Arc<dyn StatsSource>) -> Result<Self, prometheus::Error> {
        let descs = VERIFY_COUNTERS
            .iter()
            .map(|(name, help)| {
                Desc::new((*name).into(), (*help).into(), vec![], Default::default())
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { source, descs })
    }
}

impl Collector for VerifyCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let s = self.source.stats();
        let values = [
            s.cache_hits.get(),
            s.cache_misses.get(),
            s.negative_hits.get(),
            s.stale_served.get(),
            s.store_lookups.get(),
            s.store_errors.get(),
            s.unreadable_records.get(),
        ];
        VERIFY_COUNTERS
            .iter()
            .zip(values)
            .filter_map(|((name, help), v)| {
                let c = IntCounter::new(*name, *help).ok()?;
                c.inc_by(v);
                c.collect().into_iter().next()
            })
            .collect()
    }
}

/// `keygate_cut_off_total{reason}`: what the body and write watches cut off
/// ([`crate::idle::CutOff`]), read from their process-wide counts at scrape time.
struct CutOffCollector {
    desc: Desc,
}

const CUT_OFF_NAME: &str = "keygate_cut_off_total";
const CUT_OFF_HELP: &str = "Exchanges and connections cut off because a peer stopped moving: a \
                            body that sent nothing for body_idle_timeout, writes not taken for \
                            send_timeout (client) or body_idle_timeout (upstream)";

impl CutOffCollector {
    fn new() -> Result<Self, prometheus::Error> {
        let desc = Desc::new(
            CUT_OFF_NAME.into(),
            CUT_OFF_HELP.into(),
            vec!["reason".into()],
            Default::default(),
        )?;
        Ok(Self { desc })
    }
}

impl Collector for CutOffCollector {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Ok(counts) = IntCounterVec::new(Opts::new(CUT_OFF_NAME, CUT_OFF_HELP), &["reason"])
        else {
            return Vec::new();
        };
        for reason in crate::idle::CutOff::ALL {
            counts
                .with_label_values(&[reason.label()])
                .inc_by(reason.count());
        }
        counts.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_has_its_own_slot() {
        for (i, o) in OUTCOMES.iter().enumerate() {
            assert_eq!(outcome_index(*o), i, "{o:?}");
        }
    }

    #[test]
    fn exposes_bounded_series_in_text_format() {
        let m = Metrics::new(&["api".into(), "health".into()]).unwrap();
        let series = m.request_series().unwrap();
        series.observe_request(Some(0), Outcome::Forwarded, Duration::from_micros(300));
        series.observe_request(None, Outcome::NoRoute, Duration::from_micros(10));
        m.observe_store("find_by_hash", Duration::from_micros(200), true);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains("keygate_requests_total{outcome=\"forwarded\",route=\"api\"} 1"),
            "{text}"
        );
        assert!(text.contains("keygate_requests_total{outcome=\"no_route\",route=\"-\"} 1"));
        // Every cut-off reason's series, from the start.
        for reason in crate::idle::CutOff::ALL {
            let series = format!("keygate_cut_off_total{{reason=\"{}\"}} ", reason.label());
            assert!(text.contains(&series), "{series} missing");
        }
        assert!(text.contains("keygate_store_errors_total{operation=\"find_by_hash\"} 1"));
        assert!(text.contains("keygate_build_info{version="));
    }

    #[test]
    fn upstream_connections_is_one_gauge_per_upstream() {
        let m = Metrics::new(&["api".into()]).unwrap();
        let open = m.upstream_connections("api");
        m.upstream_connections("billing");
        open.inc();
        open.inc();
        m.upstream_connections("api").dec();
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains("keygate_upstream_connections{upstream=\"api\"} 1"),
            "{text}"
        );
        assert!(text.contains("keygate_upstream_connections{upstream=\"billing\"} 0"));
    }

    /// The value of the series whose line starts with `series` in the text format.
    fn value(text: &str, series: &str) -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"));
        line[series.len()..].trim().parse().unwrap()
    }

    #[test]
    fn a_scrape_sums_the_copies_of_every_thread() {
        let m = Metrics::new(&["api".into()]).unwrap();
        // Before any copy is handed out, every route and outcome is there at zero.
        let text = String::from_utf8(m.render()).unwrap();
        let fwd = "keygate_requests_total{outcome=\"forwarded\",route=\"api\"}";
        assert_eq!(value(&text, fwd), 0.0);
        let copies: Vec<RequestSeries> = (0..3).map(|_| m.request_series().unwrap()).collect();
        for (i, c) in copies.iter().enumerate() {
            for _ in 0..=i {
                c.observe_request(Some(0), Outcome::Forwarded, Duration::from_micros(200));
            }
            c.in_flight.inc();
        }
        copies[1].observe_request(Some(0), Outcome::Forbidden, Duration::from_millis(20));
        copies[2]
            .upstream_duration("billing")
            .observe(Duration::from_millis(3).as_secs_f64());
        let text = String::from_utf8(m.render()).unwrap();
        assert_eq!(value(&text, fwd), 6.0, "1 + 2 + 3");
        let forbidden = "keygate_requests_total{outcome=\"forbidden\",route=\"api\"}";
        assert_eq!(value(&text, forbidden), 1.0);
        assert_eq!(value(&text, "keygate_in_flight_requests"), 3.0);
        let hist = "keygate_request_duration_seconds";
        let labels = "outcome=\"forwarded\",route=\"api\"";
        assert_eq!(value(&text, &format!("{hist}_count{{{labels}}}")), 6.0);
        let sum = value(&text, &format!("{hist}_sum{{{labels}}}"));
        assert!((sum - 0.0012).abs() < 1e-9, "{sum}");
        // 200 µs is over the 100 µs bucket and within the 250 µs one, in every copy.
        assert_eq!(
            value(&text, &format!("{hist}_bucket{{{labels},le=\"0.0001\"}}")),
            0.0
        );
        assert_eq!(
            value(&text, &format!("{hist}_bucket{{{labels},le=\"0.00025\"}}")),
            6.0
        );
        assert_eq!(
            value(&text, &format!("{hist}_bucket{{{labels},le=\"+Inf\"}}")),
            6.0
        );
        // A series only one copy has is reported as it is.
        let up = "keygate_upstream_duration_seconds_count{upstream=\"billing\"}";
        assert_eq!(value(&text, up), 1.0);
        // Each name appears once: one family, not one per copy.
        assert_eq!(text.matches("# TYPE keygate_requests_total ").count(), 1);
    }
}
