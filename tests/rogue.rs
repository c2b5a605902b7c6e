//! A rogue provider: a real gRPC server that offers whatever package bytes it is given under
//! whatever name, attaches whatever (replayed) catalog statement it was given, can stream
//! endless data, and records what agents report. Used to check that the agent, not the
//! provider, is the last line of defence. Also a rogue site ([`RogueSite`]) that passes genuine
//! answers on after rewriting whatever it likes in them.
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use updraft_proto::v1::agent_api_client::AgentApiClient;
use updraft_proto::v1::agent_api_server::{AgentApi, AgentApiServer};
use updraft_proto::v1::{
    ActionKind, Activity, BlobRequest, CheckRequest, CheckResponse, Chunk, Offer, PushEvent, PushKind, ReportRequest,
    ReportResponse, SignedStatement, SubscribeRequest, Update,
};

#[derive(Clone)]
pub struct Rogue {
    pub update: Update,
    pub bytes: Arc<Vec<u8>>,
    pub reports: Arc<Mutex<Vec<Activity>>>,
    /// A genuine statement captured earlier, replayed with every answer.
    pub statement: Option<SignedStatement>,
    /// A genuine machine proof captured with it (see `CheckResponse.machine_proof`).
    pub machine_proof: Vec<u8>,
    /// Downloads never end (more bytes than any catalog lists).
    pub endless: bool,
}

impl Rogue {
    /// Offers `bytes` as `product` `version` (GA) to every machine that asks.
    pub fn new(product: &str, version: &str, bytes: Vec<u8>) -> Rogue {
        let mut h = updraft_core::hash::ContentHasher::new();
        h.update(&bytes);
        let update = Update {
            id: format!("{product}-{version}-rogue"),
            product: product.into(),
            version: version.into(),
            size: bytes.len() as u64,
            content_hash: h.finish(),
            state: 2,
            install_type: 1,
            ..Default::default()
        };
        Rogue {
            update,
            bytes: Arc::new(bytes),
            reports: Arc::default(),
            statement: None,
            machine_proof: vec![],
            endless: false,
        }
    }

    /// Offers a genuine catalog record (its id, hash and size) instead of one made up.
    pub fn offering(mut self, update: Update) -> Rogue {
        self.update = update;
        self
    }

    pub fn replaying(mut self, statement: SignedStatement) -> Rogue {
        self.statement = Some(statement);
        self
    }

    /// Replays the statement and machine proof of a genuine answer.
    pub fn replaying_answer(mut self, answer: &CheckResponse) -> Rogue {
        self.statement = answer.statement.clone();
        self.machine_proof = answer.machine_proof.clone();
        self
    }

    pub fn endless(mut self) -> Rogue {
        self.endless = true;
        self
    }

    /// Serves on a fresh loopback port in a background thread with its own runtime, with a
    /// provider certificate from the world's CA (it can pass for a provider; it cannot sign).
    pub fn spawn(self, w: &crate::World) -> String {
        w.serve(w.server("rogue").add_service(AgentApiServer::new(self)))
    }
}

type S<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Keeps what an agent reports, for the test to read.
fn keep(reports: &Mutex<Vec<Activity>>, r: ReportRequest) -> ReportResponse {
    let n = r.activities.len() as u32;
    reports.lock().unwrap().extend(r.activities);
    ReportResponse { accepted: n }
}

#[tonic::async_trait]
impl AgentApi for Rogue {
    async fn check(&self, _r: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(CheckResponse {
            catalog_seq: 1,
            offers: vec![Offer {
                action: ActionKind::Install as i32,
                update: Some(self.update.clone()),
                ..Default::default()
            }],
            min_check_interval_secs: 3600,
            max_check_interval_secs: 3600,
            served_by: "rogue".into(),
            policy: None,
            statement: self.statement.clone(),
            machine_proof: self.machine_proof.clone(),
        }))
    }
    type DownloadStream = S<Chunk>;
    async fn download(&self, r: Request<BlobRequest>) -> Result<Response<S<Chunk>>, Status> {
        let off = r.into_inner().offset as usize;
        if self.endless {
            let chunks = futures::stream::iter(0u64..).map(move |i| {
                Ok(Chunk { offset: off as u64 + i * 65536, data: vec![0u8; 65536].into(), total_size: u64::MAX })
            });
            return Ok(Response::new(Box::pin(chunks)));
        }
        let data = self.bytes[off.min(self.bytes.len())..].to_vec();
        let chunk = Chunk { offset: off as u64, data: data.into(), total_size: self.bytes.len() as u64 };
        Ok(Response::new(Box::pin(futures::stream::iter([Ok(chunk)]))))
    }
    async fn report(&self, r: Request<ReportRequest>) -> Result<Response<ReportResponse>, Status> {
        Ok(Response::new(keep(&self.reports, r.into_inner())))
    }
    type SubscribeStream = S<PushEvent>;
    async fn subscribe(&self, _r: Request<SubscribeRequest>) -> Result<Response<S<PushEvent>>, Status> {
        let hello = PushEvent { kind: PushKind::Hello as i32, catalog_seq: 1, ..Default::default() };
        Ok(Response::new(Box::pin(futures::stream::iter([Ok(hello)]).chain(futures::stream::pending()))))
    }
}

/// What a rogue site does to each genuine answer before its agent sees it.
pub type Tamper = Arc<dyn Fn(&mut CheckResponse) + Send + Sync>;

/// A rogue site: it holds genuine credentials, passes each check on to a genuine provider and
/// changes the answer with `tamper` before the agent sees it — everything but the centre's
/// signature and the machine's proof is the rogue's to rewrite (a real stolen site computes
/// the same statement and proof from its replica). Downloads pass through untouched; after
/// the first push event it forges a high-priority push. It counts the checks it answers and
/// keeps what agents report.
#[derive(Clone)]
pub struct RogueSite {
    upstream: tonic::transport::Endpoint,
    tamper: Tamper,
    /// A high-priority push for this update id is forged after the hello.
    pub forged_push: Option<String>,
    pub checks: Arc<std::sync::atomic::AtomicUsize>,
    pub reports: Arc<Mutex<Vec<Activity>>>,
}

impl RogueSite {
    /// Passes checks to `upstream` (reached with the certificate of the machine it fronts).
    pub fn new(upstream: tonic::transport::Endpoint, tamper: Tamper) -> RogueSite {
        RogueSite { upstream, tamper, forged_push: None, checks: Arc::default(), reports: Arc::default() }
    }

    pub fn spawn(self, w: &crate::World) -> String {
        w.serve(w.server("rogue-site").add_service(AgentApiServer::new(self)))
    }

    async fn client(&self) -> Result<AgentApiClient<tonic::transport::Channel>, Status> {
        let ch = crate::channel(self.upstream.clone()).await.map_err(Status::unavailable)?;
        Ok(AgentApiClient::new(ch))
    }
}

#[tonic::async_trait]
impl AgentApi for RogueSite {
    async fn check(&self, r: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let mut answer = self.client().await?.check(r.into_inner()).await?.into_inner();
        (self.tamper)(&mut answer);
        self.checks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(Response::new(answer))
    }
    type DownloadStream = S<Chunk>;
    async fn download(&self, r: Request<BlobRequest>) -> Result<Response<S<Chunk>>, Status> {
        let stream = self.client().await?.download(r.into_inner()).await?.into_inner();
        Ok(Response::new(Box::pin(stream)))
    }
    async fn report(&self, r: Request<ReportRequest>) -> Result<Response<ReportResponse>, Status> {
        Ok(Response::new(keep(&self.reports, r.into_inner())))
    }
    type SubscribeStream = S<PushEvent>;
    async fn subscribe(&self, _r: Request<SubscribeRequest>) -> Result<Response<S<PushEvent>>, Status> {
        let hello = PushEvent { kind: PushKind::Hello as i32, catalog_seq: 1, ..Default::default() };
        let mut events = vec![Ok(hello)];
        if let Some(id) = &self.forged_push {
            let push = PushEvent {
                kind: PushKind::HighPriority as i32,
                catalog_seq: u64::MAX / 2,
                update_id: id.clone(),
                product: crate::product_of_id(id).to_string(),
                ..Default::default()
            };
            events.push(Ok(push));
        }
        Ok(Response::new(Box::pin(futures::stream::iter(events).chain(futures::stream::pending()))))
    }
}
