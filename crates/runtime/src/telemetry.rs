//! Tracing and OpenTelemetry: log output driven by `RUST_LOG`, OTLP span export when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces-specific variable) is set, the meter provider
//! (see `metrics`), one resource for both (service name, version, instance id, host name), and
//! W3C trace-context propagation across gRPC calls in both directions.
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::codegen::http;
use tracing::{Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::metrics::Rpc;

/// Holds the exporter so it can be flushed on exit.
#[must_use = "call shutdown() before exit so buffered spans are exported"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    meters: opentelemetry_sdk::metrics::SdkMeterProvider,
    scrape: crate::metrics::Scrape,
}

/// True when the standard OTLP variables ask for span export.
pub fn otlp_requested() -> bool {
    any_set(&["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"])
}

/// True when the standard OTLP variables ask for metric export.
pub fn otlp_metrics_requested() -> bool {
    any_set(&["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"])
}

/// TLS for an `https://` collector: the system's roots, and the CA in
/// `OTEL_EXPORTER_OTLP_CERTIFICATE` (PEM) when given. `None` for a plain `http://` one.
pub fn otlp_tls(signal: &str) -> Result<Option<tonic::transport::ClientTlsConfig>, String> {
    let endpoint = std::env::var(format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"))
        .ok()
        .filter(|e| !e.is_empty())
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
        .unwrap_or_default();
    if !endpoint.starts_with("https://") {
        return Ok(None);
    }
    let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
    let ca = std::env::var(format!("OTEL_EXPORTER_OTLP_{signal}_CERTIFICATE"))
        .ok()
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_CERTIFICATE").ok())
        .filter(|p| !p.is_empty());
    if let Some(path) = ca {
        let pem = std::fs::read(&path).map_err(|e| format!("OTEL_EXPORTER_OTLP_CERTIFICATE {path}: {e}"))?;
        tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
    }
    Ok(Some(tls))
}

/// `builder` with TLS for an `https://` collector of `signal` (`TRACES`, `METRICS`).
pub(crate) fn with_otlp_tls<B: opentelemetry_otlp::WithTonicConfig>(builder: B, signal: &str) -> Result<B, String> {
    Ok(match otlp_tls(signal)? {
        Some(tls) => builder.with_tls_config(tls),
        None => builder,
    })
}

/// How OTLP is sent: gRPC (the default) or HTTP with protobuf bodies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Protocol {
    Grpc,
    HttpProtobuf,
}

/// The protocol `OTEL_EXPORTER_OTLP_{signal}_PROTOCOL` or `OTEL_EXPORTER_OTLP_PROTOCOL` asks
/// for; anything else is said once, and gRPC used. HTTP goes to `http://` collectors only.
pub(crate) fn otlp_protocol(signal: &str) -> Protocol {
    let var = format!("OTEL_EXPORTER_OTLP_{signal}_PROTOCOL");
    let (var, value) = match std::env::var(&var) {
        Ok(v) if !v.is_empty() => (var, v),
        _ => (
            "OTEL_EXPORTER_OTLP_PROTOCOL".to_string(),
            std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or_default(),
        ),
    };
    match value.to_ascii_lowercase().as_str() {
        "" | "grpc" => Protocol::Grpc,
        "http/protobuf" => {
            if otlp_tls(signal).is_ok_and(|tls| tls.is_some()) {
                eprintln!(
                    "warning: {var}=http/protobuf: this build sends OTLP over HTTP to http:// collectors only; using grpc"
                );
                return Protocol::Grpc;
            }
            Protocol::HttpProtobuf
        }
        _ => {
            eprintln!("warning: {var}={value}: supported are grpc and http/protobuf; using grpc");
            Protocol::Grpc
        }
    }
}

fn any_set(vars: &[&str]) -> bool {
    vars.iter().any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}

/// What every span and metric of this process says about where it comes from: the service
/// (`OTEL_SERVICE_NAME` wins over `service_name`), its version, this process, this host.
fn resource(service_name: &'static str) -> opentelemetry_sdk::Resource {
    use opentelemetry::KeyValue;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service_name);
    }
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let instance = format!("{}-{}-{started}", crate::hostname(), std::process::id());
    resource
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", instance),
            KeyValue::new("host.name", crate::hostname()),
        ])
        .build()
}

/// Installs the global subscriber. Must run inside a tokio runtime (the OTLP exporter spawns
/// on it). Logs go to stderr, as `logs` says, so program output on stdout stays
/// machine-readable.
pub fn init(service_name: &'static str, logs: &crate::logs::LogArgs) -> Telemetry {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: log files and journald should get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let json = logs.format == crate::logs::LogFormat::Json;
    let text = (!json).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_ansi(ansi)
            .fmt_fields(crate::logs::TextFields)
    });
    let json_lines = json.then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .event_format(crate::logs::JsonLines)
            .fmt_fields(crate::logs::NoSpanFields)
    });
    let mut provider = None;
    let resource = resource(service_name);
    let (meters, scrape) = crate::metrics::provider(resource.clone(), otlp_metrics_requested());
    let otel_layer = if otlp_requested() {
        let exporter = match otlp_protocol("TRACES") {
            Protocol::HttpProtobuf => {
                opentelemetry_otlp::SpanExporter::builder().with_http().build().map_err(|e| e.to_string())
            }
            Protocol::Grpc => with_otlp_tls(opentelemetry_otlp::SpanExporter::builder().with_tonic(), "TRACES")
                .and_then(|b| b.build().map_err(|e| e.to_string())),
        };
        match exporter {
            Ok(exporter) => {
                let p = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
                let tracer = p.tracer("updraft");
                opentelemetry::global::set_tracer_provider(p.clone());
                provider = Some(p);
                Some(tracing_opentelemetry::layer().with_tracer(tracer))
            }
            Err(e) => {
                eprintln!("warning: OTLP exporter could not be built, spans will not be exported: {e}");
                None
            }
        }
    } else if json {
        // Spans get trace and span ids for the JSON lines, though none are exported.
        let p = SdkTracerProvider::builder().with_resource(resource).build();
        let tracer = p.tracer("updraft");
        provider = Some(p);
        Some(tracing_opentelemetry::layer().with_tracer(tracer))
    } else {
        None
    };
    // `try_init` so tests that start several components in one process do not panic.
    // Long-lived task spans stay out of traces (see `task`).
    let otel_layer = otel_layer.map(|l| {
        tracing_subscriber::Layer::with_filter(
            l,
            tracing_subscriber::filter::filter_fn(|m| !(m.is_span() && m.name() == "task")),
        )
    });
    let _ = tracing_subscriber::registry().with(filter).with(text).with(json_lines).with(otel_layer).try_init();
    Telemetry { provider, meters, scrape }
}

impl Telemetry {
    /// Flushes and stops the exporter. The SDK blocks the calling thread, so this runs on the
    /// blocking pool rather than stalling a runtime worker.
    pub async fn shutdown(self) {
        let (provider, meters) = (self.provider, self.meters);
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(p) = provider {
                let _ = p.force_flush();
                let _ = p.shutdown();
            }
            let _ = meters.shutdown();
        })
        .await;
    }

    /// What the probe port's `/metrics` serves.
    pub fn scrape(&self) -> crate::metrics::Scrape {
        self.scrape.clone()
    }
}

/// The W3C trace-context header that makes a call part of its caller's trace.
const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// The span of a long-lived task (a loop that runs as long as the process: a follower, a
/// heartbeat, a scrubber), for its log lines: `task{task=NAME detail=…}`. It is never an
/// OpenTelemetry span (`init` filters spans named `task` out of the exporter), so a loop's
/// work is not one trace that grows for ever: each call or unit of work it starts is a trace
/// of its own.
pub fn task(name: &'static str, detail: impl std::fmt::Display) -> Span {
    tracing::info_span!("task", task = name, detail = %detail)
}

/// The span for one incoming RPC, named and described by the OpenTelemetry RPC conventions
/// (`updraft.v1.AgentApi/Check`; `rpc.system`, `rpc.service`, `rpc.method`, `server.address`,
/// `network.peer.address`; `rpc.grpc.status_code` and, when not OK, status Error, recorded by
/// `metrics::RpcServerLayer` once answered), a child of the caller's trace when the request
/// carries a `traceparent`. Pass to `tonic::transport::Server::builder().trace_fn(..)`.
pub fn server_span(req: &http::Request<()>) -> Span {
    let rpc = crate::metrics::rpc_of(req.uri().path());
    let peer =
        req.extensions().get::<tonic::transport::server::TcpConnectInfo>().and_then(|i| i.remote_addr()).or_else(
            || {
                req.extensions()
                    .get::<crate::tls::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
                    .and_then(|i| i.get_ref().remote_addr())
            },
        );
    let host = req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok());
    let host = host.or_else(|| req.uri().authority().map(|a| a.as_str())).unwrap_or_default();
    let (address, port) = split_host_port(host);
    let span = rpc_span("server", rpc, address, port, peer.map(|p| p.ip()));
    // Most calls carry no trace context; the propagator would look for it by parsing names.
    if req.headers().contains_key(TRACEPARENT) {
        let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(req.headers())));
        let _ = span.set_parent(parent);
    }
    span
}

/// The fields of an RPC span that only a trace needs: a log line written inside the call
/// leaves them out (`logs::TextFields`) and keeps the call (`otel.name`) and the peer, so they
/// are not formatted per call when nothing is logged. (The status is recorded as the call is
/// answered, after the lines a handler logs.)
pub(crate) const RPC_TRACE_ONLY_FIELDS: [&str; 8] = [
    "otel.kind",
    "otel.status_code",
    "rpc.system",
    "rpc.service",
    "rpc.method",
    "rpc.grpc.status_code",
    "server.address",
    "server.port",
];

/// A span for one RPC (`kind` is `server` or `client`), by the OpenTelemetry RPC conventions,
/// with the peer's address where known (a server's caller); its status is recorded later.
fn rpc_span(kind: &'static str, rpc: Rpc, address: &str, port: u16, peer: Option<std::net::IpAddr>) -> Span {
    tracing::info_span!(
        "rpc",
        otel.name = %rpc.name,
        otel.kind = kind,
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = %rpc.service,
        rpc.method = %rpc.method,
        rpc.grpc.status_code = tracing::field::Empty,
        server.address = %address,
        server.port = port,
        network.peer.address = peer.map(|ip| tracing::field::display(crate::IpText(ip))),
    )
}

/// `host:port` (or `[v6]:port`, or a bare host) as host and port (0 when none).
fn split_host_port(s: &str) -> (&str, u16) {
    match s.rsplit_once(':') {
        Some((h, p))
            if !h.is_empty() && p.chars().all(|c| c.is_ascii_digit()) && (!h.contains(':') || h.ends_with(']')) =>
        {
            (h.trim_start_matches('[').trim_end_matches(']'), p.parse().unwrap_or(0))
        }
        _ => (s, 0),
    }
}

/// Records an answered call's gRPC status on `span` (a server or client span made here):
/// the code, and status Error unless it is OK.
pub fn record_status(span: &Span, code: i64) {
    span.record("rpc.grpc.status_code", code);
    if code != 0 {
        span.record("otel.status_code", "ERROR");
    }
}

/// Client interceptor: puts the current span's context into the outgoing request.
pub fn inject(mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    let cx = Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MetadataInjector(req.metadata_mut()))
    });
    Ok(req)
}

/// The type of the interceptor above, for naming client types.
pub type InjectFn = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (http::HeaderName::from_bytes(key.as_bytes()), http::HeaderValue::from_str(&value)) {
            self.0.insert(k, v);
        }
    }
}

/// A client channel whose every request carries the caller's trace context and, for a
/// provider behind a reverse proxy, the proxy's path prefix (`/updraft` turns
/// `/updraft.v1.AgentApi/Check` into `/updraft/updraft.v1.AgentApi/Check`).
#[derive(Clone, Debug)]
pub struct TracedChannel {
    inner: tonic::transport::Channel,
    prefix: Option<std::sync::Arc<str>>,
    duration: crate::metrics::RpcDurations,
    /// The server's host and port, for the client spans' `server.address` / `server.port`.
    server: Option<(std::sync::Arc<str>, u16)>,
}

impl TracedChannel {
    /// Names the server this channel reaches (`https://host:port/...`) in its client spans.
    pub fn with_server(mut self, url: &str) -> Self {
        if let Ok(uri) = url.parse::<http::Uri>()
            && let Some(host) = uri.host()
        {
            let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
            self.server = Some((host.trim_start_matches('[').trim_end_matches(']').into(), port));
        }
        self
    }
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for TracedChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        tonic::codegen::Service::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        // A client span per call, child of the caller's, whose context the server continues.
        let rpc = crate::metrics::rpc_of(req.uri().path());
        let (address, port) = match &self.server {
            Some((host, port)) => (&**host, *port),
            None => split_host_port(req.uri().authority().map(|a| a.as_str()).unwrap_or_default()),
        };
        let span = rpc_span("client", rpc, address, port, None);
        let cx = span.context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut HeaderInjector(req.headers_mut()))
        });
        if let Some(prefix) = &self.prefix {
            *req.uri_mut() = prefixed(req.uri(), prefix);
        }
        let fut = tonic::codegen::Service::call(&mut self.inner, req);
        let duration = self.duration.clone();
        let started = std::time::Instant::now();
        Box::pin(async move {
            let result = fut.instrument(span.clone()).await;
            let code = match &result {
                Ok(resp) => crate::metrics::status_of(resp.headers()),
                Err(_) => tonic::Code::Unavailable as i64,
            };
            record_status(&span, code);
            duration.record(rpc, code, started.elapsed().as_secs_f64() * 1000.0);
            result
        })
    }
}

/// `uri` with `prefix` put in front of its path.
fn prefixed(uri: &http::Uri, prefix: &str) -> http::Uri {
    let pq = uri.path_and_query().map(|pq| pq.as_str()).unwrap_or("/");
    let mut parts = uri.clone().into_parts();
    match format!("{prefix}{pq}").parse() {
        Ok(p) => {
            parts.path_and_query = Some(p);
            http::Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
        }
        Err(_) => uri.clone(),
    }
}

pub fn traced(channel: tonic::transport::Channel) -> TracedChannel {
    TracedChannel { inner: channel, prefix: None, duration: crate::metrics::RpcDurations::client(), server: None }
}

/// A traced channel to a provider whose URL has a path (behind a reverse proxy): every RPC's
/// path is put under it. An empty path or `/` means none.
pub fn traced_under(channel: tonic::transport::Channel, path: &str) -> TracedChannel {
    let path = path.trim_end_matches('/');
    let prefix = (!path.is_empty()).then(|| path.into());
    TracedChannel { inner: channel, prefix, duration: crate::metrics::RpcDurations::client(), server: None }
}

/// The current span's context as a W3C `traceparent` value (empty when not sampled or when no
/// exporter is configured), for carrying a trace through a queue.
pub fn current_traceparent() -> String {
    let cx = Span::current().context();
    let mut carrier = std::collections::HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    carrier.remove(TRACEPARENT.as_str()).unwrap_or_default()
}

/// Makes `span` a child of the trace named by a stored `traceparent`, if any.
pub fn adopt_traceparent(span: &Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    let carrier: std::collections::HashMap<String, String> =
        [(TRACEPARENT.as_str().to_string(), traceparent.to_string())].into_iter().collect();
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
    let _ = span.set_parent(cx);
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefixes_keep_scheme_authority_and_query() {
        let u: super::http::Uri = "http://gw:443/updraft.v1.AgentApi/Check".parse().unwrap();
        assert_eq!(super::prefixed(&u, "/updraft").to_string(), "http://gw:443/updraft/updraft.v1.AgentApi/Check");
        let u: super::http::Uri = "/a/B?x=1".parse().unwrap();
        assert_eq!(super::prefixed(&u, "/p/q").to_string(), "/p/q/a/B?x=1");
    }

    /// What a text log line says about the call it was written in: the call and the peer, none
    /// of the fields kept for traces, and no stray space for a field left out.
    #[test]
    fn a_log_line_in_a_call_names_the_call_and_peer_only() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Lines(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let out = lines.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(move || out.clone())
            .with_ansi(false)
            .without_time()
            .with_target(false)
            .fmt_fields(crate::logs::TextFields);
        let subscriber = tracing_subscriber::layer::SubscriberExt::with(tracing_subscriber::registry(), layer);
        let long = "x".repeat(300);
        tracing::subscriber::with_default(subscriber, || {
            let peer = Some(std::net::IpAddr::from([10, 0, 0, 7]));
            let check = crate::metrics::rpc_of("/updraft.v1.AgentApi/Check");
            let span = super::rpc_span("server", check, "prov.example", 4443, peer);
            super::record_status(&span, 0);
            span.in_scope(|| tracing::warn!(machine = "m-1", "refused"));
            super::record_status(&span, 5);
            let error = std::io::Error::other("disk full");
            let error: &(dyn std::error::Error + 'static) = &error;
            span.in_scope(|| tracing::warn!(r#type = 3, error, "refused \x1b[31magain"));
            // A field too long to stage keeps its place among the short ones.
            tracing::info_span!("task", a = 1, detail = %long, z = "end").in_scope(|| tracing::warn!(k = 2, "long"));
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text,
            format!(
                " WARN rpc{{otel.name=updraft.v1.AgentApi/Check network.peer.address=10.0.0.7}}: refused machine=\"m-1\"\n \
                 WARN rpc{{otel.name=updraft.v1.AgentApi/Check network.peer.address=10.0.0.7}}: refused \\x1b[31magain \
                 type=3 error=disk full\n \
                 WARN task{{a=1 detail={long} z=\"end\"}}: long k=2\n"
            )
        );
    }
}
