//! A minimal OpenTelemetry collector: a real OTLP/gRPC trace receiver that keeps every span
//! it is sent, with the service name of the process that sent it.
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use tonic::{Request, Response, Status};

#[derive(Debug, Clone)]
pub struct SpanSeen {
    pub service: String,
    pub name: String,
    pub trace_id: Vec<u8>,
    pub span_id: Vec<u8>,
    pub parent_span_id: Vec<u8>,
    /// `SPAN_KIND_SERVER`, `SPAN_KIND_CLIENT`, …
    pub kind: String,
    /// 0 unset, 1 ok, 2 error.
    pub status: i32,
    /// Its attributes, values as text.
    pub attributes: std::collections::BTreeMap<String, String>,
    /// Its resource's attributes, values as text.
    pub resource: std::collections::BTreeMap<String, String>,
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

#[derive(Clone, Default)]
pub struct Collector {
    pub spans: Arc<Mutex<Vec<SpanSeen>>>,
}

impl Collector {
    /// Serves on a fresh loopback port in a background thread; returns the endpoint URL.
    pub fn spawn(&self) -> String {
        let me = self.clone();
        format!(
            "http://{}",
            crate::serve_in_background(tonic::transport::Server::builder().add_service(TraceServiceServer::new(me)))
        )
    }

    /// Serves over TLS with the certificate and key (PEM files) given; returns the
    /// `https://localhost:PORT` endpoint.
    pub fn spawn_tls(&self, cert: &std::path::Path, key: &std::path::Path) -> String {
        let identity = tonic::transport::Identity::from_pem(std::fs::read(cert).unwrap(), std::fs::read(key).unwrap());
        let mut server = tonic::transport::Server::builder()
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .unwrap();
        let addr = crate::serve_in_background(server.add_service(TraceServiceServer::new(self.clone())));
        format!("https://localhost:{}", addr.rsplit(':').next().unwrap())
    }

    /// Serves OTLP over HTTP with protobuf bodies (`POST /v1/traces`) on a fresh loopback port;
    /// returns the `http://` endpoint.
    pub fn spawn_http(&self) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let me = self.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let me = me.clone();
                std::thread::spawn(move || me.serve_http(conn));
            }
        });
        format!("http://{addr}")
    }

    /// One HTTP/1.1 connection: requests with a Content-Length body, each answered 200.
    fn serve_http(&self, conn: std::net::TcpStream) {
        use prost::Message;
        use std::io::{BufRead, Read, Write};
        let mut out = conn.try_clone().unwrap();
        let mut reader = std::io::BufReader::new(conn);
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let path = line.split_whitespace().nth(1).unwrap_or_default().to_string();
            let mut len = 0;
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 {
                    return;
                }
                if header == "\r\n" {
                    break;
                }
                if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; len];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            if path == "/v1/traces"
                && let Ok(req) = ExportTraceServiceRequest::decode(&body[..])
            {
                self.record(req);
            }
            let answer = ExportTraceServiceResponse { partial_success: None }.encode_to_vec();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\n\r\n",
                answer.len()
            );
            if out.write_all(head.as_bytes()).and_then(|_| out.write_all(&answer)).is_err() {
                return;
            }
        }
    }

    /// Keeps the spans of an export request.
    fn record(&self, request: ExportTraceServiceRequest) {
        let mut seen = self.spans.lock().unwrap();
        for rs in request.resource_spans {
            let resource: std::collections::BTreeMap<String, String> =
                rs.resource.iter().flat_map(|r| &r.attributes).map(|kv| (kv.key.clone(), text(&kv.value))).collect();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let kind = opentelemetry_proto::tonic::trace::v1::span::SpanKind::try_from(s.kind)
                        .map(|k| k.as_str_name().to_string())
                        .unwrap_or_default();
                    seen.push(SpanSeen {
                        service: service.clone(),
                        name: s.name,
                        trace_id: s.trace_id,
                        span_id: s.span_id,
                        parent_span_id: s.parent_span_id,
                        kind,
                        status: s.status.map_or(0, |st| st.code),
                        attributes: s.attributes.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect(),
                        resource: resource.clone(),
                    });
                }
            }
        }
    }

    pub fn snapshot(&self) -> Vec<SpanSeen> {
        self.spans.lock().unwrap().clone()
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.record(request.into_inner());
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}
