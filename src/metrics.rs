//! Prometheus metrics, in base units, with bounded label sets: route names and outcomes from
//! the configuration, store operation names, never a key, key id or client address (per-key
//! figures belong to usage records). Hot-path counters are resolved once per route and
//! outcome at start-up, so a request costs a few atomic adds, no label lookup.

use crate::auth::verify::VerifyStats;
use crate::error::Outcome;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub const OUTCOMES: [Outcome; 8] = [
    Outcome::Forwarded,
    Outcome::NoRoute,
    Outcome::BadRequest,
    Outcome::ClientTimeout,
    Outcome::Unauthenticated,
    Outcome::Forbidden,
    Outcome::StoreUnavailable,
    Outcome::UpstreamError,
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
        Outcome::UpstreamError => 7,
    }
}

struct RouteSeries {
    requests: Vec<IntCounter>,
    duration: Vec<Histogram>,
}

pub struct Metrics {
    registry: Registry,
    /// One entry per route (in route-table order), then one for "no route".
    routes: Vec<RouteSeries>,
    upstream_duration: HistogramVec,
    pub in_flight: IntGauge,
    pub open_connections: IntGauge,
    store_ops: IntCounterVec,
    store_errors: IntCounterVec,
    store_duration: HistogramVec,
    store_up: IntGauge,
    cache_entries: IntGauge,
}

#[derive(Debug, thiserror::Error)]
#[error("metrics registration failed: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    /// `route_names` in route-table order.
    pub fn new(route_names: &[String]) -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "keygate_requests_total",
                "Proxied requests by route and outcome",
            ),
            &["route", "outcome"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "keygate_request_duration_seconds",
                "Time from request headers to response headers, by route and outcome",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "outcome"],
        )?;
        let mut routes = Vec::new();
        for name in route_names
            .iter()
            .map(String::as_str)
            .chain(std::iter::once("-"))
        {
            routes.push(RouteSeries {
                requests: OUTCOMES
                    .iter()
                    .map(|o| requests.with_label_values(&[name, o.as_str()]))
                    .collect(),
                duration: OUTCOMES
                    .iter()
                    .map(|o| duration.with_label_values(&[name, o.as_str()]))
                    .collect(),
            });
        }
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "keygate_upstream_duration_seconds",
                "Time the upstream took to send response headers",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["upstream"],
        )?;
        let in_flight = IntGauge::new("keygate_in_flight_requests", "Requests being handled")?;
        let open_connections =
            IntGauge::new("keygate_open_connections", "Open client connections")?;
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
        registry.register(Box::new(requests))?;
        registry.register(Box::new(duration))?;
        registry.register(Box::new(upstream_duration.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(open_connections.clone()))?;
        registry.register(Box::new(store_ops.clone()))?;
        registry.register(Box::new(store_errors.clone()))?;
        registry.register(Box::new(store_duration.clone()))?;
        registry.register(Box::new(store_up.clone()))?;
        registry.register(Box::new(cache_entries.clone()))?;
        registry.register(Box::new(build_info))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        Ok(Self {
            registry,
            routes,
            upstream_duration,
            in_flight,
            open_connections,
            store_ops,
            store_errors,
            store_duration,
            store_up,
            cache_entries,
        })
    }

    /// Adds the verifier's counters (read at scrape time from its atomics).
    pub fn register_verify_stats(&self, stats: Arc<dyn StatsSource>) -> Result<(), MetricsError> {
        self.registry
            .register(Box::new(VerifyCollector::new(stats)?))?;
        Ok(())
    }

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

const VERIFY_COUNTERS: [(&str, &str); 6] = [
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
            s.cache_hits.load(Ordering::Relaxed),
            s.cache_misses.load(Ordering::Relaxed),
            s.negative_hits.load(Ordering::Relaxed),
            s.stale_served.load(Ordering::Relaxed),
            s.store_lookups.load(Ordering::Relaxed),
            s.store_errors.load(Ordering::Relaxed),
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
        m.observe_request(Some(0), Outcome::Forwarded, Duration::from_micros(300));
        m.observe_request(None, Outcome::NoRoute, Duration::from_micros(10));
        m.observe_store("find_by_hash", Duration::from_micros(200), true);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains("keygate_requests_total{outcome=\"forwarded\",route=\"api\"} 1"),
            "{text}"
        );
        assert!(text.contains("keygate_requests_total{outcome=\"no_route\",route=\"-\"} 1"));
        assert!(text.contains("keygate_store_errors_total{operation=\"find_by_hash\"} 1"));
        assert!(text.contains("keygate_build_info{version="));
    }
}
