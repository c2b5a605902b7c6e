//! The command-line grammar of admin-cli.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "admin-cli", version, about = "Administer an Updraft fleet: keys, packages, updates, machines")]
pub struct Cli {
    /// Provider to talk to (default https://127.0.0.1:8092, or http:// with --insecure).
    #[arg(long, global = true, env = "UPDRAFT_PROVIDER")]
    pub provider: Option<String>,
    /// Seconds to wait for the provider to take the connection, TLS and HTTP/2 handshakes
    /// included, before giving up with exit status 6 (a provider far away or under load may need more).
    #[arg(long, global = true, env = "UPDRAFT_CONNECT_TIMEOUT", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub connect_timeout: u64,
    #[command(flatten)]
    pub tls: updraft_runtime::tls::TlsArgs,
    /// Machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Release signing keys.
    #[command(subcommand)]
    Key(KeyCmd),
    /// The private CA for mutual TLS, and certificates for providers, sites, agents and admins.
    #[command(subcommand)]
    Pki(PkiCmd),
    /// Build signed packages.
    #[command(subcommand)]
    Package(PackageCmd),
    /// The update catalog.
    #[command(subcommand)]
    Update(UpdateCmd),
    /// Managed machines.
    #[command(subcommand)]
    Machine(MachineCmd),
    /// Rollouts in waves.
    #[command(subcommand)]
    Rollout(RolloutCmd),
    /// Version caps per product line.
    #[command(subcommand, name = "product-line")]
    ProductLine(ProductLineCmd),
    /// Give a product to the machines of a group (or one machine) that do not have it yet;
    /// `deploy list` shows what is deployed where. Machines are only ever offered the products
    /// they have, the ones deployed to them, their pins and related installs.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Deploy {
        #[command(subcommand)]
        cmd: Option<DeployCmd>,
        #[command(flatten)]
        target: DeployTarget,
    },
    /// Stop giving a product to a group or machine (nothing is uninstalled: machines that took
    /// it keep it and its updates; mark an update `remove` to take it away).
    Undeploy {
        #[command(flatten)]
        target: DeployTarget,
    },
    /// Folders the provider imports packages from.
    #[command(subcommand)]
    Watch(WatchCmd),
    /// The activity log (`activity clear` empties it).
    Activity {
        #[command(subcommand)]
        cmd: Option<ActivityCmd>,
        #[command(flatten)]
        filter: ActivityFilter,
    },
    /// Remote (site) providers: WAN bytes, cache hits, upstream connection.
    #[command(subcommand)]
    Site(SiteCmd),
    /// Groups of machines and their update policy.
    #[command(subcommand)]
    Group(GroupCmd),
    /// Provider servers: the switchover pair, and the providers groups can assign.
    #[command(subcommand)]
    Provider(ProviderCmd),
    /// Whether providers announce themselves on mDNS (off by default).
    #[command(subcommand)]
    Discovery(DiscoveryCmd),
    /// Who may use the admin API (the names in their admin certificates) and how.
    #[command(subcommand)]
    User(UserCmd),
    /// The append-only, hash-chained log of every admin change and every refusal.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// The fleet by status: error, needs-attention, up-to-date.
    Report {
        #[command(subcommand)]
        cmd: Option<ReportCmd>,
        #[command(flatten)]
        since: Since,
    },
    /// Shell completions for admin-cli (e.g. `admin-cli completions bash > /etc/bash_completion.d/admin-cli`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Man pages for admin-cli and each of its commands.
    Man {
        /// Directory to write them to.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Which activity entries to show.
#[derive(Args)]
pub struct ActivityFilter {
    /// Only this machine's.
    #[arg(long)]
    pub machine: Option<String>,
    /// Only this update's.
    #[arg(long)]
    pub update: Option<String>,
    #[command(flatten)]
    pub since: Since,
    /// At most this many, newest first.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
}

#[derive(Subcommand)]
pub enum KeyCmd {
    /// Write a new ed25519 release key pair: PREFIX.key (0600) and PREFIX.pub.
    Generate {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum PkiCmd {
    /// Create the CA in DIR (ca.crt, and ca.key readable by you only).
    Init {
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// The CA's name.
        #[arg(long, default_value = "Updraft CA")]
        name: String,
    },
    /// Issue a certificate for NAME (a machine, provider, site or administrator): DIR/NAME.crt
    /// and DIR/NAME.key.
    Issue {
        name: String,
        /// provider, remote-provider, agent or admin.
        #[arg(long)]
        role: String,
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// Host names and IP addresses a provider or site is reached at (default: NAME,
        /// localhost, 127.0.0.1).
        #[arg(long, value_delimiter = ',')]
        san: Vec<String>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365, conflicts_with = "lifetime")]
        days: u32,
        /// How long the certificate is valid, instead of --days (`12h`, `90d`, `30s`).
        #[arg(long, value_parser = updraft_core::when::parse_span)]
        lifetime: Option<std::time::Duration>,
    },
    /// Rotate the CA in DIR (on the provider's host, its --pki-dir), one step at a time, each
    /// step after every host has renewed once since the last (a third of a certificate's life;
    /// `pki list` shows the CA of each certificate): --introduce a new CA (trusted everywhere,
    /// issuing nothing), --promote it (it issues; the old stays trusted), --retire the old one.
    #[command(group = clap::ArgGroup::new("step").required(true).multiple(false))]
    Rotate {
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        #[arg(long, group = "step")]
        introduce: bool,
        #[arg(long, group = "step")]
        promote: bool,
        #[arg(long, group = "step")]
        retire: bool,
        /// The new CA's name (with --introduce).
        #[arg(long, default_value = "Updraft CA")]
        name: String,
    },
    /// A join token for enrollment (`agent enroll --token T`, `remote-provider enroll`): the
    /// provider holding the CA (`--pki-dir`) signs the certificate of whoever presents it.
    Token {
        /// agent or remote-provider.
        #[arg(long, default_value = "agent")]
        role: String,
        /// The only name it admits (default: the enrolling host names itself).
        #[arg(long)]
        name: Option<String>,
        /// Machines enrolled with it join this group.
        #[arg(long)]
        group: Option<String>,
        /// How many hosts may use it (a named token: one).
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// How long it stays valid (`24h`, `7d`).
        #[arg(long, default_value = "24h", value_parser = updraft_core::when::parse_span)]
        expires: std::time::Duration,
    },
    /// Every certificate the provider issued (name, role, serial, expiry, last use, revoked),
    /// the enrollment requests waiting for approval and the join tokens still valid.
    List {
        /// Also certificates that have expired (kept 30 days).
        #[arg(long)]
        expired: bool,
    },
    /// Sign the certificate a host asked for without a token (see `pki list`); the host
    /// collects it with its next request.
    Approve { name: String },
    /// Revoke a certificate by serial, or every current certificate of a name: refused at the
    /// provider and at every site within one catalog round, open connections closed.
    Revoke { name_or_serial: String },
}

#[derive(Subcommand)]
pub enum PackageCmd {
    /// Pack a directory into a signed package.
    Build(Box<BuildArgs>),
    /// Show a package's manifest and check its signature.
    Inspect {
        file: PathBuf,
        /// Public key to verify against.
        #[arg(long)]
        key: Option<PathBuf>,
    },
}

#[derive(Args)]
pub struct BuildArgs {
    #[arg(long)]
    pub product: String,
    /// MM.mm.PP.BB
    #[arg(long)]
    pub version: String,
    /// Directory whose contents become the installed product.
    #[arg(long)]
    pub from: PathBuf,
    /// Release secret key (PREFIX.key).
    #[arg(long)]
    pub key: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// install (full release), patch or es (hotfix).
    #[arg(long, default_value = "install")]
    pub install_type: String,
    #[arg(long, default_value = "")]
    pub product_line: String,
    #[arg(long, default_value = "")]
    pub upgrade_code: String,
    #[arg(long, default_value = "")]
    pub product_code: String,
    /// For an ES (--install-type es): the patch version it sits on (default: the patch with
    /// the ES's MM.mm.PP).
    #[arg(long)]
    pub requires: Option<String>,
    #[arg(long, default_value = "")]
    pub release_label: String,
    #[arg(long, default_value = "")]
    pub patch_label: String,
    #[arg(long, default_value = "")]
    pub doc_url: String,
    /// Install property KEY=VALUE (repeatable).
    #[arg(long = "property")]
    pub properties: Vec<String>,
    /// Product installed together with this one (repeatable).
    #[arg(long = "related")]
    pub related: Vec<String>,
    /// Hook run from the staged tree before anything is stopped (a file of the package).
    #[arg(long)]
    pub pre_install: Option<String>,
    /// Hook that stops the application before the swap.
    #[arg(long)]
    pub stop_hook: Option<String>,
    /// Hook run from the new tree right after the swap.
    #[arg(long)]
    pub post_install: Option<String>,
    /// Hook that starts the application after the swap.
    #[arg(long)]
    pub start_hook: Option<String>,
    /// Health check run after the swap; failing swaps the previous version back.
    #[arg(long)]
    pub health_check: Option<String>,
    /// Health as a process: one of this name must run, and keep running for --health-window.
    #[arg(long)]
    pub health_process: Option<String>,
    /// Seconds the health process must stay up.
    #[arg(long, default_value_t = 0)]
    pub health_window: u32,
    /// After the install proved healthy, how long agents keep watching it (the health check
    /// repeated, the health process up and not restarting) before reporting it verified, e.g.
    /// `10m` (the default), `30s`, `0s` (verified at once); a failure inside it swaps back.
    #[arg(long, value_parser = updraft_core::when::parse_span)]
    pub verify_window: Option<std::time::Duration>,
    /// Seconds each hook may take (default 60).
    #[arg(long, default_value_t = 0)]
    pub hook_timeout: u32,
    /// The install waits while a process of this name runs (repeatable).
    #[arg(long = "process")]
    pub processes: Vec<String>,
    /// The install waits while this file exists on the machine (absolute path).
    #[arg(long)]
    pub lock_file: Option<String>,
    /// The application's data, relative to its directory (repeatable, e.g. `var/`): left out
    /// of the package and carried into every new version on the machine.
    #[arg(long = "data-dir", value_parser = relative_path)]
    pub data: Vec<String>,
    /// A file the machine may change (repeatable, e.g. `etc/app.conf`): shipped as the default
    /// for a first install, then the machine's copy is kept.
    #[arg(long = "keep-file", value_parser = relative_path)]
    pub keep: Vec<String>,
    /// Earlier versions each machine keeps to go back to with `agent restore` (1-10).
    #[arg(long = "backup", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10))]
    pub backups: u32,
    /// now, or restart: install only when the agent next starts.
    #[arg(long, default_value = "now", value_parser = ["now", "restart"])]
    pub apply_at: String,
}

#[derive(Subcommand)]
pub enum UpdateCmd {
    /// Import a package into the catalog (state pre-approval); prints its id.
    Add { file: PathBuf },
    /// List the catalog (warns when a release has more than one GA patch).
    List {
        #[arg(long)]
        product_line: Option<String>,
        #[arg(long)]
        product: Option<String>,
        #[arg(long)]
        state: Option<String>,
        /// Group rows by a column: release, product, product-line, state, type.
        #[arg(long, value_parser = ["release", "product", "product-line", "state", "type"])]
        group_by: Option<String>,
    },
    /// Show one update in full.
    Show { id: String },
    /// Set the state of one or more updates: ID... pre-approval|ga|inactive|remove.
    State {
        #[arg(required = true, num_args = 2.., value_name = "ID... STATE")]
        args: Vec<String>,
        /// With ga on a patch: mark older GA patches of the same release inactive.
        #[arg(long)]
        retire_older: bool,
    },
    /// Have sites fetch these updates' content now, before they are GA (--off to stop).
    Prestage {
        #[arg(required = true)]
        ids: Vec<String>,
        #[arg(long)]
        off: bool,
    },
    /// Delete updates from the provider (refused while machines depend on them, unless --force).
    Delete {
        #[arg(required = true)]
        ids: Vec<String>,
        #[arg(long)]
        force: bool,
    },
    /// Installing or updating these updates' product also installs PRODUCT.
    Relate {
        #[arg(required = true)]
        ids: Vec<String>,
        #[arg(long = "installs", required = true)]
        installs: Vec<String>,
    },
    /// Remove related installs (all of them unless --installs names some).
    Unrelate {
        #[arg(required = true)]
        ids: Vec<String>,
        #[arg(long = "installs")]
        installs: Vec<String>,
    },
    /// Mark or unmark high priority: ID... high|normal.
    Priority {
        #[arg(required = true, num_args = 2.., value_name = "ID... high|normal")]
        args: Vec<String>,
    },
}

#[derive(Args)]
pub struct DeployTarget {
    #[arg(required = true)]
    pub product: Option<String>,
    #[arg(long, conflicts_with = "machine", required_unless_present = "machine")]
    pub group: Option<String>,
    #[arg(long)]
    pub machine: Option<String>,
}

#[derive(Subcommand)]
pub enum DeployCmd {
    /// What is deployed to which group or machine.
    List {
        #[arg(long)]
        product: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum MachineCmd {
    /// List machines, optionally filtered by a name or address substring, or by group.
    List {
        #[arg(long)]
        filter: Option<String>,
        #[arg(long)]
        group: Option<String>,
    },
    /// One machine: group, effective settings, products (installed vs available), activity.
    Show { name: String },
    /// Fix a product's version on machines; they converge to it, up or down.
    Pin {
        #[arg(required = true)]
        machines: Vec<String>,
        #[arg(long)]
        product: String,
        #[arg(long)]
        version: String,
    },
    /// Let machines follow GA updates of a product again.
    Unpin {
        #[arg(required = true)]
        machines: Vec<String>,
        #[arg(long)]
        product: String,
    },
    /// Set a machine's role: workstation, server or site (`agent`: what its agent's
    /// configuration says). Product lines capped with --follow-role keep other roles at or
    /// below the lowest version their machines of that role run.
    Role { machine: String, role: String },
    /// Decommission a machine: its record, pins, group, role and the deployments naming it go
    /// (its activity stays). If it checks in again it comes back as a new machine.
    Forget { machine: String },
}

/// Only what happened since a date (`--since 2026-11-01`) or in a recent span (`--last 2w`).
#[derive(Args, Default)]
pub struct Since {
    /// A date, YYYY-MM-DD (UTC).
    #[arg(long, conflicts_with = "last")]
    pub since: Option<String>,
    /// A span back from now: a number and s, m (minutes), h, d, w, mo (30 days) or y, e.g.
    /// 90m, 2w, 6mo.
    #[arg(long)]
    pub last: Option<String>,
}

impl Since {
    /// Milliseconds since the epoch where the span starts; 0 (everything) when neither is given.
    pub fn unix_ms(&self) -> anyhow::Result<i64> {
        if let Some(d) = &self.since {
            return updraft_core::when::parse_date(d).map_err(|e| anyhow::anyhow!("--since: {e}"));
        }
        if let Some(l) = &self.last {
            let span = updraft_core::when::parse_span(l).map_err(|e| anyhow::anyhow!("--last: {e}"))?;
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
            return Ok(now.saturating_sub(span).as_millis() as i64);
        }
        Ok(0)
    }
}

#[derive(Subcommand)]
pub enum ActivityCmd {
    /// Remove activity entries (all, or one machine's).
    Clear {
        #[arg(long)]
        machine: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum ReportCmd {
    /// One machine's notes, last contact and installed products.
    Show { name: String },
}

#[derive(Args, Default)]
pub struct GroupSettingsArgs {
    /// automatic, download, notify or manual.
    #[arg(long)]
    pub mode: Option<String>,
    /// every-day or sunday..saturday.
    #[arg(long)]
    pub day: Option<String>,
    /// Install hour 0-23 (machine's local time), or any.
    #[arg(long)]
    pub hour: Option<String>,
    /// Assigned providers in order of preference (comma-separated URLs; empty string clears).
    #[arg(long, value_delimiter = ',', num_args = 0..)]
    pub providers: Option<Vec<String>>,
    /// Automatic mode: download ahead of the install window (true), or wait for it (false,
    /// the default: the install time is when machines download and install).
    #[arg(long)]
    pub download_early: Option<bool>,
}

#[derive(Subcommand)]
pub enum GroupCmd {
    /// Create a group.
    Create {
        name: String,
        #[command(flatten)]
        settings: GroupSettingsArgs,
    },
    /// Change a group's settings (the default group's too).
    Set {
        name: String,
        #[command(flatten)]
        settings: GroupSettingsArgs,
    },
    /// Remove a group; its machines return to the default group.
    Remove {
        name: String,
    },
    List,
    Show {
        name: String,
    },
    /// Move machines into a group, from wherever they were.
    Assign {
        group: String,
        #[arg(required = true)]
        machines: Vec<String>,
    },
    /// Return machines to the default group.
    Unassign {
        #[arg(required = true)]
        machines: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum ProviderCmd {
    /// The providers started on this store: which one is active, which are standby.
    Pair,
    /// Whether this provider serves (gRPC health): NOT_SERVING on a standby, a provider
    /// stopping, or one cut off from its database. Exits 3 when not serving.
    Health,
    /// Add (or change) a provider server that groups can assign with `group set --providers NAME`.
    Add {
        name: String,
        /// Host name or IP address agents use.
        #[arg(long)]
        address: String,
        #[arg(long, default_value_t = 8092)]
        port: u32,
        /// Agents connect with TLS (https).
        #[arg(long)]
        tls: bool,
        /// Path prefix when the provider is behind a reverse proxy, e.g. /updraft.
        #[arg(long, default_value = "")]
        path: String,
    },
    /// Remove a provider server (refused while a group assigns it).
    Remove { name: String },
    /// Show the provider servers.
    List,
}

#[derive(Subcommand)]
pub enum UserCmd {
    /// Authorize NAME (the name in their admin certificate), or change their role.
    Add {
        name: String,
        /// admin (may change things) or viewer (may only look).
        #[arg(long, default_value = "viewer")]
        role: String,
    },
    /// Take NAME's authorization away (the last admin cannot be removed).
    Remove {
        name: String,
    },
    List,
    /// Set the password NAME signs in to the web console with (stored as an Argon2 hash).
    /// The password is read from standard input (its first line), never from the command line.
    Passwd {
        name: String,
        /// Read the password from standard input (required: a password on the command line
        /// would show in the process list and the shell's history).
        #[arg(long, required_unless_present = "clear")]
        password_stdin: bool,
        /// Clear NAME's password instead (they can then use admin-cli only).
        #[arg(long, conflicts_with = "password_stdin")]
        clear: bool,
    },
}

#[derive(Subcommand)]
pub enum AuditCmd {
    /// Show the log, oldest first.
    List {
        /// Only entries after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many (0: all).
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// Fetch the whole log and check its hash chain here, independently of the provider.
    Verify,
}

#[derive(Subcommand)]
pub enum DiscoveryCmd {
    /// Local and remote providers announce themselves with KEY; agents with that key find them.
    On {
        #[arg(long, default_value = "Production")]
        key: String,
    },
    /// Stop announcing.
    Off,
    /// Show the setting.
    Status,
}

#[derive(Subcommand)]
pub enum RolloutCmd {
    /// Before anything happens: how many machines would take the update (were it approved
    /// now) in each wave and at each site, and the WAN bytes each site would fetch.
    Preview {
        /// The update id.
        id: String,
        /// Only this group's machines.
        #[arg(long)]
        group: Option<String>,
        /// Cumulative shares, e.g. 1%,10%,50%,100%.
        #[arg(long, default_value = "1%,10%,50%,100%")]
        waves: String,
    },
    /// Approve an update in waves: each machine's wave is fixed by a hash of its name and the
    /// update (the same on every tier); the next wave opens only when the open ones have the
    /// verified share, no more than the failed share, and the wave's wait has passed. A wave
    /// that fails more halts the rollout by itself.
    Start {
        /// The update id.
        id: String,
        /// Cumulative shares, e.g. 1%,10%,50%,100%.
        #[arg(long, default_value = "1%,10%,50%,100%")]
        waves: String,
        /// Only this group's machines take part (the others are not offered it).
        #[arg(long)]
        group: Option<String>,
        /// The share of the open waves' machines that must be verified before the next opens.
        #[arg(long, default_value = "95%")]
        min_verified: String,
        /// The share of the open waves' machines that may fail before the rollout halts.
        #[arg(long, default_value = "2%")]
        max_failed: String,
        /// The least time a wave stays before the next opens (`30m`, `2h`, `0s`).
        #[arg(long, default_value = "30m")]
        wave_wait: String,
    },
    /// Each wave's machines: installed, verified, failed, rolled back, waiting; and what the
    /// rollout does next. Without an id: every rollout.
    Status {
        /// The update id.
        id: Option<String>,
    },
    /// Continue a halted rollout after a human decision.
    Resume {
        /// The update id.
        id: String,
        /// The machines that failed so far no longer count against the gate.
        #[arg(long)]
        ack_failures: bool,
    },
    /// Withdraw the update: the machines that took it go back to their previous version (the
    /// removal path); no machine is offered it any more.
    Revert {
        /// The update id.
        id: String,
    },
}

#[derive(Subcommand)]
pub enum SiteCmd {
    /// Every site as the central provider last heard from it.
    List,
    /// Ask the provider named by --provider (a site) for its own status.
    Status,
}

#[derive(Subcommand)]
pub enum ProductLineCmd {
    /// Offer nothing above VERSION for this product line; with --follow-role server, machines
    /// of other roles get nothing above the lowest version any server runs (recomputed as
    /// servers report).
    Cap {
        line: String,
        #[arg(required_unless_present = "follow_role")]
        version: Option<String>,
        #[arg(long)]
        follow_role: Option<String>,
    },
    /// Lift a product line's cap.
    Uncap { line: String },
    /// Show the caps.
    List,
}

#[derive(Subcommand)]
pub enum WatchCmd {
    /// Watch a folder on the provider's machine (--auto: import in the background).
    Add {
        dir: PathBuf,
        #[arg(long)]
        auto: bool,
    },
    /// Show watched folders.
    List,
    /// Stop watching a folder.
    Remove { dir: PathBuf },
    /// Files waiting in watched folders.
    Pending { dir: Option<PathBuf> },
    /// Import waiting files (all files of manual folders when none are named).
    Import { files: Vec<PathBuf> },
}

/// A path inside the product's directory as the package names it: `var/` is `var`.
fn relative_path(s: &str) -> Result<String, String> {
    let p = s.trim_end_matches('/');
    updraft_core::package::validate_path(p).map(|_| p.to_string()).map_err(|e| e.to_string())
}
