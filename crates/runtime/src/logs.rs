//! Log lines: text for people (the default), or one JSON object a line for log pipelines
//! (`--log-format json`, `UPDRAFT_LOG_FORMAT=json`), carrying the OpenTelemetry `trace_id`
//! and `span_id` of the span the line was written in, so a log line finds its trace.
use std::fmt;

use opentelemetry::trace::TraceContextExt as _;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// How log lines are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The log flag, shared by every program.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LogArgs {
    /// Log lines as text (the default) or as one JSON object a line with `trace_id` and
    /// `span_id` (for log pipelines). Logs go to standard error; `RUST_LOG` sets the level.
    #[arg(long = "log-format", env = "UPDRAFT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub format: LogFormat,
}

/// Writes each event as one JSON object: `timestamp`, `level`, `target`, `message`, the
/// event's fields, the innermost `span`, and `trace_id` / `span_id` inside a span.
pub struct JsonLines;

struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_string(), Value::from(format!("{value:?}")));
    }
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut map = Map::new();
        let now = time::OffsetDateTime::now_utc();
        let timestamp = now.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        map.insert("timestamp".into(), Value::from(timestamp));
        map.insert("level".into(), Value::from(event.metadata().level().as_str()));
        map.insert("target".into(), Value::from(event.metadata().target()));
        event.record(&mut Fields(&mut map));
        if let Some(span) = ctx.lookup_current() {
            map.insert("span".into(), Value::from(span.name()));
        }
        let cx = tracing::Span::current().context();
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            map.insert("trace_id".into(), Value::from(sc.trace_id().to_string()));
            map.insert("span_id".into(), Value::from(sc.span_id().to_string()));
        }
        writeln!(writer, "{}", Value::Object(map))
    }
}
