//! Metrics: one OpenTelemetry instrumentation, two exporters. Every instrument comes from
//! [`meter`]; the process's meter provider (installed by `telemetry::init`) has a reader that
//! the probe port's `/metrics` collects on each scrape ([`Scrape::text`], the Prometheus text
//! exposition format) and, when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the metrics-specific
//! variable) is set, a periodic OTLP exporter.
//!
//! Names follow the OpenTelemetry semantic conventions (`rpc.server.duration` in ms); in the
//! Prometheus text they become `rpc_server_duration_milliseconds`, counters get `_total`, and
//! the resource (service, version, instance, host) is the `target_info` series, as the
//! OpenTelemetry-to-Prometheus compatibility rules have it.
use std::fmt::Write as _;
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

pub use opentelemetry::KeyValue;
use opentelemetry::metrics::BoundHistogram;
use opentelemetry::metrics::Meter;
pub use opentelemetry::metrics::{AsyncInstrument, Histogram};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Temporality};
use tonic::codegen::http;

/// The meter every Updraft instrument is made from.
pub fn meter() -> Meter {
    opentelemetry::global::meter("updraft")
}

/// Counts one event of `name` (a counter of the meter) with `attrs`. For rare events (installs,
/// takeovers); a hot path keeps its instrument.
pub fn count(name: &'static str, description: &'static str, attrs: &[KeyValue]) {
    meter().u64_counter(name).with_description(description).build().add(1, attrs);
}

/// What `/metrics` collects from: the process's metrics, on demand.
#[derive(Clone)]
pub struct Scrape(Arc<ManualReader>);

/// The reader the meter provider owns, sharing the one [`Scrape`] collects from.
#[derive(Debug)]
struct Shared(Arc<ManualReader>);

impl MetricReader for Shared {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline)
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

impl Scrape {
    /// Everything measured so far, as Prometheus text.
    pub fn text(&self) -> String {
        let mut rm = ResourceMetrics::default();
        if let Err(e) = self.0.collect(&mut rm) {
            tracing::warn!(error = %e, "cannot collect metrics");
        }
        encode(&rm)
    }
}

/// The process's meter provider: the scrape reader, plus OTLP export when asked for.
pub(crate) fn provider(resource: Resource, otlp: bool) -> (SdkMeterProvider, Scrape) {
    let reader = Arc::new(ManualReader::builder().build());
    let mut builder = SdkMeterProvider::builder().with_resource(resource).with_reader(Shared(reader.clone()));
    if otlp {
        use crate::telemetry::{Protocol, otlp_protocol, with_otlp_tls};
        let exporter = match otlp_protocol("METRICS") {
            Protocol::HttpProtobuf => {
                opentelemetry_otlp::MetricExporter::builder().with_http().build().map_err(|e| e.to_string())
            }
            Protocol::Grpc => with_otlp_tls(opentelemetry_otlp::MetricExporter::builder().with_tonic(), "METRICS")
                .and_then(|b| b.build().map_err(|e| e.to_string())),
        };
        match exporter {
            Ok(exporter) => builder = builder.with_periodic_exporter(exporter),
            Err(e) => eprintln!("warning: OTLP metric exporter could not be built, metrics will not be pushed: {e}"),
        }
    }
    let provider = builder.build();
    opentelemetry::global::set_meter_provider(provider.clone());
    (provider, Scrape(reader))
}

/// A Prometheus metric or label name: letters, digits and `_`, not starting with a digit.
fn prom_name(s: &str) -> String {
    let mut out: String = s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// The name suffix for a unit (UCUM, as OpenTelemetry writes them).
fn unit_suffix(unit: &str) -> &'static str {
    match unit {
        "ms" => "_milliseconds",
        "s" => "_seconds",
        "By" => "_bytes",
        _ => "",
    }
}

fn labels(attrs: &[&KeyValue], extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> = attrs
        .iter()
        .map(|kv| format!("{}=\"{}\"", prom_name(kv.key.as_str()), escape(&kv.value.to_string())))
        .collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() { String::new() } else { format!("{{{}}}", parts.join(",")) }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn number(v: f64) -> String {
    if v.is_infinite() { if v > 0.0 { "+Inf".into() } else { "-Inf".into() } } else { format!("{v}") }
}

/// The Prometheus text exposition (format 0.0.4) of collected metrics.
pub(crate) fn encode(rm: &ResourceMetrics) -> String {
    let mut out = String::new();
    let resource: Vec<KeyValue> = rm.resource().iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())).collect();
    let refs: Vec<&KeyValue> = resource.iter().collect();
    out.push_str("# HELP target_info Target metadata\n# TYPE target_info gauge\n");
    let _ = writeln!(out, "target_info{} 1", labels(&refs, None));
    for scope in rm.scope_metrics() {
        for m in scope.metrics() {
            let base = format!("{}{}", prom_name(m.name()), unit_suffix(m.unit()));
            match m.data() {
                AggregatedMetrics::F64(d) => family(&mut out, &base, m.description(), d, |v| *v),
                AggregatedMetrics::U64(d) => family(&mut out, &base, m.description(), d, |v| *v as f64),
                AggregatedMetrics::I64(d) => family(&mut out, &base, m.description(), d, |v| *v as f64),
            }
        }
    }
    out
}

fn family<T: Copy>(out: &mut String, base: &str, help: &str, data: &MetricData<T>, f: impl Fn(&T) -> f64) {
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    match data {
        MetricData::Sum(sum) => {
            let (name, kind) =
                if sum.is_monotonic() { (format!("{base}_total"), "counter") } else { (base.to_string(), "gauge") };
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for p in sum.data_points() {
                let attrs: Vec<&KeyValue> = p.attributes().collect();
                let _ = writeln!(out, "{name}{} {}", labels(&attrs, None), number(f(&p.value())));
            }
        }
        MetricData::Gauge(g) => {
            let _ = writeln!(out, "# HELP {base} {help}\n# TYPE {base} gauge");
            for p in g.data_points() {
                let attrs: Vec<&KeyValue> = p.attributes().collect();
                let _ = writeln!(out, "{base}{} {}", labels(&attrs, None), number(f(&p.value())));
            }
        }
        MetricData::Histogram(h) => {
            let _ = writeln!(out, "# HELP {base} {help}\n# TYPE {base} histogram");
            for p in h.data_points() {
                let attrs: Vec<&KeyValue> = p.attributes().collect();
                let mut cumulative = 0;
                for (bound, count) in p.bounds().chain([f64::INFINITY]).zip(p.bucket_counts()) {
                    cumulative += count;
                    let le = Some(("le", number(bound)));
                    let _ = writeln!(out, "{base}_bucket{} {cumulative}", labels(&attrs, le));
                }
                let _ = writeln!(out, "{base}_sum{} {}", labels(&attrs, None), number(f(&p.sum())));
                let _ = writeln!(out, "{base}_count{} {}", labels(&attrs, None), p.count());
            }
        }
        MetricData::ExponentialHistogram(_) => {} // none are made here
    }
}

/// The gRPC status an answer's headers carry (every failure does), else OK (an answer that
/// succeeds carries it in its trailers).
pub fn status_of(headers: &http::HeaderMap) -> i64 {
    headers.get("grpc-status").and_then(|v| v.to_str().ok()?.parse::<i64>().ok()).unwrap_or(0)
}

/// The attributes of an RPC measurement, by the OpenTelemetry RPC conventions.
fn rpc_attributes(rpc: Rpc, code: i64) -> [KeyValue; 4] {
    [
        KeyValue::new("rpc.system", "grpc"),
        KeyValue::new("rpc.service", rpc.service),
        KeyValue::new("rpc.method", rpc.method),
        KeyValue::new("rpc.grpc.status_code", code),
    ]
}

/// An RPC duration histogram (`rpc.server.duration` or `rpc.client.duration`) recorded
/// through a handle bound, on first use, to each RPC's attributes with status OK: a bound
/// record goes straight to its series, where a record with attributes hashes all four of them
/// on every call (about 1,950 instructions, `UPDRAFT_BENCH=cost`). The series are the same
/// either way; a call that fails is recorded with its attributes. Clones share the handles.
#[derive(Clone, Debug)]
pub struct RpcDurations(Arc<Durations>);

#[derive(Debug)]
struct Durations {
    histogram: Histogram<f64>,
    /// Indexed by [`Rpc::index`]; each bound the first time its RPC answers OK.
    ok: Box<[OnceLock<BoundHistogram<f64>>]>,
}

impl RpcDurations {
    fn new(histogram: Histogram<f64>) -> Self {
        let ok = (0..=KNOWN_RPCS.len()).map(|_| OnceLock::new()).collect();
        Self(Arc::new(Durations { histogram, ok }))
    }

    /// `rpc.server.duration`: time to answer an incoming call (to its first byte for streams).
    pub fn server() -> Self {
        Self::new(
            meter()
                .f64_histogram("rpc.server.duration")
                .with_unit("ms")
                .with_description("Time to answer an incoming RPC (to its first byte for streams)")
                .build(),
        )
    }

    /// `rpc.client.duration`: time to the answer of an outgoing call (its first byte for
    /// streams).
    pub fn client() -> Self {
        Self::new(
            meter()
                .f64_histogram("rpc.client.duration")
                .with_unit("ms")
                .with_description("Time to the answer of an outgoing RPC (to its first byte for streams)")
                .build(),
        )
    }

    /// Records that `rpc` took `ms` and ended with gRPC status `code`.
    pub fn record(&self, rpc: Rpc, code: i64, ms: f64) {
        let Durations { histogram, ok } = &*self.0;
        match ok.get(usize::from(rpc.index)).filter(|_| code == 0) {
            Some(bound) => bound.get_or_init(|| histogram.bind(&rpc_attributes(rpc, code))).record(ms),
            None => histogram.record(ms, &rpc_attributes(rpc, code)),
        }
    }
}

/// `rpc.server.duration` for every call a tonic server answers, by service, method and gRPC
/// status (the status of an answer that carries it in its headers — every failure does; an
/// answer whose status comes in the trailers is counted as OK when its headers leave, which
/// for a stream is when it starts).
#[derive(Clone)]
pub struct RpcServerLayer {
    duration: RpcDurations,
}

impl Default for RpcServerLayer {
    fn default() -> Self {
        Self { duration: RpcDurations::server() }
    }
}

impl<S> tower_layer::Layer<S> for RpcServerLayer {
    type Service = RpcServer<S>;
    fn layer(&self, inner: S) -> RpcServer<S> {
        RpcServer { inner, duration: self.duration.clone() }
    }
}

#[derive(Clone)]
pub struct RpcServer<S> {
    inner: S,
    duration: RpcDurations,
}

/// What a path names when it is no RPC of this build (OpenTelemetry's name for a method the
/// server does not know): a caller choosing paths cannot add series to a histogram or names
/// to spans.
pub const OTHER: &str = "_OTHER";

/// Services served beside the updraft.v1 API.
const STANDARD_RPCS: [(&str, &str); 3] = [
    ("grpc.health.v1.Health", "Check"),
    ("grpc.health.v1.Health", "Watch"),
    ("grpc.reflection.v1.ServerReflection", "ServerReflectionInfo"),
];

/// An RPC by the names spans and measurements give it: `service/method` (a span's name),
/// the service and the method, all `'static` so naming a call allocates and formats nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rpc {
    pub name: &'static str,
    pub service: &'static str,
    pub method: &'static str,
    /// Its place among the RPCs this build knows, from 1; 0 for [`Rpc::OTHER`].
    pub index: u16,
}

impl Rpc {
    /// What a path that is no RPC of this build is called.
    pub const OTHER: Rpc = Rpc { name: "_OTHER/_OTHER", service: OTHER, method: OTHER, index: 0 };
}

/// Every RPC this build serves or calls, as (`service/method`, service, method), sorted by
/// name for a binary search: the updraft.v1 API's descriptors and the standard services.
static KNOWN_RPCS: std::sync::LazyLock<Vec<(String, String, String)>> = std::sync::LazyLock::new(|| {
    let api = <prost_types::FileDescriptorSet as prost::Message>::decode(updraft_proto::FILE_DESCRIPTOR_SET)
        .expect("the compiled-in descriptors decode");
    let ours = api.file.iter().flat_map(|f| {
        f.service.iter().flat_map(move |s| {
            let service = format!("{}.{}", f.package(), s.name());
            s.method.iter().map(move |m| (service.clone(), m.name().to_string()))
        })
    });
    let standard = STANDARD_RPCS.iter().map(|(s, m)| (s.to_string(), m.to_string()));
    let mut known: Vec<_> = ours.chain(standard).map(|(s, m)| (format!("{s}/{m}"), s, m)).collect();
    known.sort();
    known
});

/// The RPC a gRPC path names (`/updraft.v1.AgentApi/Check`, also behind a proxy's prefix), or
/// [`Rpc::OTHER`] for a path that is no known RPC.
pub fn rpc_of(path: &str) -> Rpc {
    let known: &'static [(String, String, String)] = &KNOWN_RPCS;
    let find = |name: &str| known.binary_search_by(|(n, _, _)| n.as_str().cmp(name)).ok();
    // Nearly every path is `/service/method`; one behind a prefix is found by its tail, from
    // its second-last slash.
    let tail = || match path.rfind('/').and_then(|i| path[..i].rfind('/')) {
        Some(j) => &path[j + 1..],
        None => path,
    };
    match path.strip_prefix('/').and_then(find).or_else(|| find(tail())) {
        Some(i) => Rpc { name: &known[i].0, service: &known[i].1, method: &known[i].2, index: i as u16 + 1 },
        None => Rpc::OTHER,
    }
}

impl<S, B, RB> tonic::codegen::Service<http::Request<B>> for RpcServer<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let rpc = rpc_of(req.uri().path());
        let started = Instant::now();
        let duration = self.duration.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            let code = match &result {
                Ok(resp) => status_of(resp.headers()),
                Err(_) => tonic::Code::Unknown as i64,
            };
            // Polled inside the call's span (tonic's `trace_fn`, `telemetry::server_span`).
            crate::telemetry::record_status(&tracing::Span::current(), code);
            duration.record(rpc, code, started.elapsed().as_secs_f64() * 1000.0);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::metrics::MeterProvider as _;

    #[test]
    fn counters_gauges_and_histograms_in_prometheus_text() {
        let reader = Arc::new(ManualReader::builder().build());
        let resource = Resource::builder_empty().with_attribute(KeyValue::new("service.name", "t")).build();
        let provider = SdkMeterProvider::builder().with_resource(resource).with_reader(Shared(reader.clone())).build();
        let m = provider.meter("test");
        m.u64_counter("updraft.checks").build().add(3, &[KeyValue::new("tier", "site")]);
        m.u64_counter("updraft.wan").with_unit("By").build().add(10, &[]);
        let h = m.f64_histogram("rpc.server.duration").with_unit("ms").with_boundaries(vec![1.0, 10.0]).build();
        h.record(0.5, &[KeyValue::new("rpc.method", "Check")]);
        h.record(5.0, &[KeyValue::new("rpc.method", "Check")]);
        let text = Scrape(reader).text();
        assert!(text.contains("target_info{service_name=\"t\"} 1"), "{text}");
        assert!(text.contains("# TYPE updraft_checks_total counter\nupdraft_checks_total{tier=\"site\"} 3"), "{text}");
        assert!(text.contains("updraft_wan_bytes_total 10"), "{text}");
        for line in [
            "rpc_server_duration_milliseconds_bucket{rpc_method=\"Check\",le=\"1\"} 1",
            "rpc_server_duration_milliseconds_bucket{rpc_method=\"Check\",le=\"10\"} 2",
            "rpc_server_duration_milliseconds_bucket{rpc_method=\"Check\",le=\"+Inf\"} 2",
            "rpc_server_duration_milliseconds_sum{rpc_method=\"Check\"} 5.5",
            "rpc_server_duration_milliseconds_count{rpc_method=\"Check\"} 2",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }

    /// A bound record and a record with attributes land in the same series.
    #[test]
    fn rpc_durations_bound_or_not_are_one_series_per_rpc_and_status() {
        let reader = Arc::new(ManualReader::builder().build());
        let provider = SdkMeterProvider::builder().with_reader(Shared(reader.clone())).build();
        let histogram = provider.meter("test").f64_histogram("rpc.server.duration").with_unit("ms").build();
        let durations = RpcDurations::new(histogram.clone());
        let check = rpc_of("/updraft.v1.AgentApi/Check");
        durations.record(check, 0, 1.0);
        durations.clone().record(check, 0, 2.0);
        histogram.record(4.0, &rpc_attributes(check, 0));
        durations.record(check, 8, 3.0);
        durations.record(rpc_of("/nope"), 0, 5.0);
        let text = Scrape(reader).text();
        // Each series' count, by its labels in any order (a bound series keeps them sorted).
        let counts: Vec<(Vec<&str>, &str)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("rpc_server_duration_milliseconds_count{"))
            .filter_map(|l| l.split_once("} "))
            .map(|(labels, count)| {
                let mut labels: Vec<&str> = labels.split(',').collect();
                labels.sort();
                (labels, count)
            })
            .collect();
        let service = |method: &str| if method == OTHER { OTHER } else { "updraft.v1.AgentApi" };
        for (code, method, count) in [(0, "Check", "3"), (8, "Check", "1"), (0, OTHER, "1")] {
            let (service, code) =
                (format!("rpc_service=\"{}\"", service(method)), format!("rpc_grpc_status_code=\"{code}\""));
            let method = format!("rpc_method=\"{method}\"");
            let mut labels = vec![code.as_str(), method.as_str(), service.as_str(), "rpc_system=\"grpc\""];
            labels.sort();
            assert!(counts.contains(&(labels.clone(), count)), "{labels:?} {count} missing from\n{text}");
        }
        assert_eq!(counts.len(), 3, "{text}");
    }

    #[test]
    fn rpc_paths_name_service_and_method() {
        let names = |path| {
            let rpc = rpc_of(path);
            assert_eq!(rpc.name, format!("{}/{}", rpc.service, rpc.method), "{path}");
            (rpc.service, rpc.method)
        };
        assert_eq!(names("/updraft.v1.AgentApi/Check"), ("updraft.v1.AgentApi", "Check"));
        assert_eq!(names("/updraft/updraft.v1.Admin/ListUpdates"), ("updraft.v1.Admin", "ListUpdates"));
        assert_eq!(names("/a/b/updraft.v1.Admin/ListUpdates"), ("updraft.v1.Admin", "ListUpdates"));
        assert_eq!(names("updraft.v1.Admin/ListUpdates"), ("updraft.v1.Admin", "ListUpdates"));
        assert_eq!(names("/grpc.health.v1.Health/Check"), ("grpc.health.v1.Health", "Check"));
        // Each known RPC has its own index, from 1.
        let mut indexes: Vec<u16> = KNOWN_RPCS.iter().map(|(name, _, _)| rpc_of(name).index).collect();
        indexes.dedup();
        assert_eq!(indexes, (1..=KNOWN_RPCS.len() as u16).collect::<Vec<_>>());
        // A caller's invented paths all count as one.
        for path in ["/updraft.v1.AgentApi/Nope", "/x/y", "/a/b/c/d", "/Check", "", "/", "//", "nope"] {
            assert_eq!(rpc_of(path), Rpc::OTHER, "{path}");
        }
    }
}
