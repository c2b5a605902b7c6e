//! Log lines: text for people (the default), or one JSON object a line for log pipelines
//! (`--log-format json`, `UPDRAFT_LOG_FORMAT=json`), carrying the OpenTelemetry `trace_id`
//! and `span_id` of the span the line was written in, so a log line finds its trace.
use std::fmt::{self, Write as _};

use arrayvec::ArrayString;
use opentelemetry::trace::TraceContextExt as _;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber, span};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::field::{RecordFields, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
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

/// The text log's fields: tracing's default format (`name=value`, the message bare), without
/// the fields an RPC span carries for traces only (`telemetry::RPC_TRACE_ONLY_FIELDS`). A
/// span's fields are formatted when it opens, logged or not, so what is left out here is work
/// saved on every call, and a line written inside a call reads
/// `rpc{otel.name=updraft.v1.AgentApi/Check network.peer.address=10.0.0.7}: …`.
pub struct TextFields;

impl<'w> FormatFields<'w> for TextFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = LogWorthy::new(writer, true);
        fields.record(&mut visitor);
        visitor.finish()
    }

    fn add_fields(&self, current: &'w mut FormattedFields<Self>, fields: &span::Record<'_>) -> fmt::Result {
        // A space before the first field written, not before every recorded one: a status
        // recorded for traces only adds nothing.
        let is_empty = current.fields.is_empty();
        let mut visitor = LogWorthy::new(current.as_writer(), is_empty);
        fields.record(&mut visitor);
        visitor.finish()
    }
}

/// Writes the fields worth a log line as tracing's `DefaultVisitor` does. A plain `name=value`
/// (no colours, not the message, not an error) is written here directly: the same text
/// without the styled three-argument `write!` per field, a thousand instructions each, paid
/// for every span opened. Plain fields are gathered on the stack and reach the writer in one
/// piece, so a span's text (a `String` starting empty) grows once rather than at every few
/// bytes. Everything else goes to `DefaultVisitor` (colours, the message's escaping of
/// terminal control sequences, an error's sources).
struct LogWorthy<'a> {
    writer: Writer<'a>,
    /// Plain fields not yet written, always whole ones.
    staged: ArrayString<STAGED>,
    is_empty: bool,
    result: fmt::Result,
}

/// Room for the plain fields of a span such as an RPC's, written out in one piece; a longer
/// field goes straight to the writer.
const STAGED: usize = 192;

impl<'a> LogWorthy<'a> {
    fn new(writer: Writer<'a>, is_empty: bool) -> Self {
        LogWorthy { writer, staged: ArrayString::new(), is_empty, result: Ok(()) }
    }

    /// Writes out what is staged.
    fn flush(&mut self) {
        if !self.staged.is_empty() {
            if self.result.is_ok() {
                self.result = self.writer.write_str(&self.staged);
            }
            self.staged.clear();
        }
    }

    fn finish(mut self) -> fmt::Result {
        self.flush();
        self.result
    }

    fn wanted(&self, field: &Field) -> bool {
        let name = field.name();
        // `log.` fields are a forwarded `log` record's metadata, shown by the event's header.
        self.result.is_ok() && !name.starts_with("log.") && !crate::telemetry::RPC_TRACE_ONLY_FIELDS.contains(&name)
    }

    fn plain(&self, field: &Field) -> bool {
        !self.writer.has_ansi_escapes() && field.name() != "message"
    }

    /// The field written by tracing's own visitor, after the plain ones before it.
    fn default_visitor(&mut self, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        self.flush();
        if self.result.is_err() {
            return;
        }
        let mut visitor = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut visitor);
        self.result = visitor.finish();
        self.is_empty = false;
    }

    fn write_plain(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let name = field.name();
        let name = name.strip_prefix("r#").unwrap_or(name);
        let pad = if self.is_empty { "" } else { " " };
        self.is_empty = false;
        let whole = self.staged.len();
        let staged = [pad, name, "="]
            .into_iter()
            .try_for_each(|s| self.staged.try_push_str(s).map_err(|_| fmt::Error))
            .and_then(|()| write!(self.staged, "{value:?}"));
        if staged.is_err() {
            // Too long to stage: what was staged, then this field, straight to the writer.
            self.staged.truncate(whole);
            self.flush();
            if self.result.is_ok() {
                self.result = write!(self.writer, "{pad}{name}={value:?}");
            }
        }
    }
}

impl Visit for LogWorthy<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if !self.wanted(field) {
            return;
        }
        if self.plain(field) {
            self.write_plain(field, &value);
        } else {
            self.default_visitor(|v| v.record_str(field, value));
        }
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.wanted(field) {
            self.default_visitor(|v| v.record_error(field, value));
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !self.wanted(field) {
            return;
        }
        if self.plain(field) {
            self.write_plain(field, value);
        } else {
            self.default_visitor(|v| v.record_debug(field, value));
        }
    }
}

/// For JSON lines, which name the span a line was written in but not its fields: a span's
/// fields are not formatted at all.
pub struct NoSpanFields;

impl<'w> FormatFields<'w> for NoSpanFields {
    fn format_fields<R: RecordFields>(&self, _: Writer<'w>, _: R) -> fmt::Result {
        Ok(())
    }

    fn add_fields(&self, _: &'w mut FormattedFields<Self>, _: &span::Record<'_>) -> fmt::Result {
        Ok(())
    }
}
