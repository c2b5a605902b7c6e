//! Simulated machines for the push herd: many distinct machines, each on its own plaintext
//! connection (as real agents have one each), sending one check at the same moment. Used by
//! the end-to-end herd test (every check answered) and the benchmark (how fast).
use std::time::{Duration, Instant};

use tonic::transport::Endpoint;
use updraft_proto::v1::agent_api_client::AgentApiClient;
use updraft_proto::v1::{CheckRequest, CheckResponse, MachineInfo};

/// How one simulated machine's check went, and how long it took.
pub struct Answer {
    pub result: Result<CheckResponse, String>,
    pub took: Duration,
}

/// Connects `n` machines named `PREFIX-0` .. to `url` (all connected before any checks), then
/// has them all check at once; `meanwhile` runs while the herd is being answered. Each check
/// may take up to `timeout`.
pub async fn check_all<F: Future>(
    url: &str,
    n: usize,
    prefix: &str,
    timeout: Duration,
    meanwhile: F,
) -> (Vec<Answer>, F::Output) {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let ep = Endpoint::from_shared(url.to_string()).expect("a URL");
        let ch = updraft_runtime::tls::connect_within(ep, timeout).await.expect("connected");
        clients.push(AgentApiClient::new(ch));
    }
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            let name = format!("{prefix}-{i}");
            tokio::spawn(async move {
                let start = Instant::now();
                let req = CheckRequest {
                    machine: Some(MachineInfo { name, ..Default::default() }),
                    manual: false,
                    statement_digest: vec![],
                };
                let result = match tokio::time::timeout(timeout, c.check(req)).await {
                    Ok(Ok(r)) => Ok(r.into_inner()),
                    Ok(Err(status)) => Err(status.to_string()),
                    Err(_) => Err(format!("no answer within {timeout:?}")),
                };
                Answer { result, took: start.elapsed() }
            })
        })
        .collect();
    let during = meanwhile.await;
    let mut answers = Vec::with_capacity(n);
    for t in tasks {
        answers.push(t.await.expect("a check task"));
    }
    (answers, during)
}
