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
        let mut seen = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    seen.push(SpanSeen { service: service.clone(), name: s.name, trace_id: s.trace_id });
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}
