//! What every command is given: the provider to talk to and how (the transport flags, turned
//! into a transport only by commands that call a provider), and whether to print JSON.
use std::time::Duration;

use serde::Serialize;
use updraft_runtime::tls::{TlsArgs, Transport};

use crate::cli::Cli;
use crate::rpc::{self, Admin};

pub struct Ctx {
    /// The provider's URL (`--provider`, `UPDRAFT_PROVIDER`, or the local default).
    pub url: String,
    /// How long a connection to it may take (`--connect-timeout`).
    connect_within: Duration,
    tls: TlsArgs,
    /// `--json`: machine-readable output.
    pub json: bool,
}

impl Ctx {
    pub fn new(cli: &Cli) -> Self {
        let default_url = format!("{}://127.0.0.1:8092", if cli.tls.insecure { "http" } else { "https" });
        Self {
            url: cli.provider.clone().unwrap_or(default_url),
            connect_within: Duration::from_secs(cli.connect_timeout),
            tls: cli.tls.clone(),
            json: cli.json,
        }
    }

    pub fn transport(&self) -> anyhow::Result<Transport> {
        Ok(self.tls.transport("admin-cli")?)
    }

    /// A channel to the provider.
    pub async fn channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        rpc::channel(&self.transport()?, &self.url, self.connect_within).await
    }

    /// The provider's Admin service.
    pub async fn admin(&self) -> anyhow::Result<Admin> {
        Ok(rpc::admin(self.channel().await?))
    }

    /// What a failed call to the provider becomes.
    pub fn failed(&self) -> impl Fn(tonic::Status) -> anyhow::Error + '_ {
        rpc::failure(&self.url)
    }

    /// Prints `value` as JSON with `--json`, else as `text` shows it.
    pub fn show<T: Serialize + ?Sized>(&self, value: &T, text: impl FnOnce(&T)) {
        if self.json {
            crate::render::json(value);
        } else {
            text(value);
        }
    }
}
