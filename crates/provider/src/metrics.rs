//! The provider's own metrics, read from its state at each collection (see
//! `updraft_runtime::metrics` for the exporters): machines by status, push subscribers, the
//! catalog version and each site's lag behind it, the pair's epoch with whether this process is the active one, the held
//! catalog statement's time to expiry and the store's size.
use std::sync::{Arc, Weak};

use updraft_core::rollout::Phase;
use updraft_runtime::metrics::{KeyValue, meter};

use crate::Shared;
use crate::ops::Ops;

/// Registers the active provider's gauges; `epoch` is the fencing epoch it took over with (0
/// on a database, where every provider is active).
pub fn register(shared: &Arc<Shared>, ops: &Arc<Ops>, epoch: u64) {
    let m = meter();
    let weak: Weak<Ops> = Arc::downgrade(ops);
    m.u64_observable_gauge("updraft.machines")
        .with_unit("{machine}")
        .with_description("Managed machines by status (error, needs-attention, up-to-date, silent)")
        .with_callback(move |o| {
            let Some(ops) = weak.upgrade() else { return };
            match ops.machines_by_status() {
                Ok(counts) => {
                    for (status, n) in counts {
                        o.observe(n, &[KeyValue::new("status", status)]);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot count machines by status"),
            }
        })
        .build();
    let weak: Weak<Shared> = Arc::downgrade(shared);
    m.u64_observable_gauge("updraft.site.catalog.lag")
        .with_unit("{change}")
        .with_description("Catalog changes each site was behind this server when it last reported")
        .with_callback(move |o| {
            let Some(shared) = weak.upgrade() else { return };
            let (Ok(seq), Ok(machines)) = (shared.known_seq(), shared.store.list_machines()) else { return };
            for m in machines.iter().filter(|m| m.is_remote_provider) {
                let site_seq = m.site_stats.as_ref().map_or(0, |s| s.catalog_seq);
                let name = m.info.as_ref().map(|i| i.name.clone()).unwrap_or_default();
                o.observe(seq.saturating_sub(site_seq), &[KeyValue::new("site", name)]);
            }
        })
        .build();
    let weak: Weak<Shared> = Arc::downgrade(shared);
    m.u64_observable_gauge("updraft.push.subscribers")
        .with_unit("{stream}")
        .with_description("Agents and sites holding a push stream open to this server")
        .with_callback(move |o| {
            if let Some(s) = weak.upgrade() {
                o.observe(s.hub.push_subscribers() as u64, &[]);
            }
        })
        .build();
    let weak: Weak<Shared> = Arc::downgrade(shared);
    m.u64_observable_gauge("updraft.catalog.seq")
        .with_description("The catalog version this server has")
        .with_callback(move |o| {
            if let Some(seq) = weak.upgrade().and_then(|s| s.known_seq().ok()) {
                o.observe(seq, &[KeyValue::new("site", "")]);
            }
        })
        .build();
    statement_expiry(shared);
    store_size(shared);
    let weak: Weak<Shared> = Arc::downgrade(shared);
    m.u64_observable_gauge("updraft.rollouts")
        .with_unit("{rollout}")
        .with_description("Rollouts in waves by state (running, halted, reverted)")
        .with_callback(move |o| {
            let Some(rs) = weak.upgrade().and_then(|s| s.store.list_rollouts().ok()) else { return };
            for state in [Phase::Running, Phase::Halted, Phase::Reverted] {
                let n = rs.iter().filter(|r| crate::rollouts::phase(r) == Some(state)).count() as u64;
                o.observe(n, &[KeyValue::new("state", format!("{state:?}").to_lowercase())]);
            }
        })
        .build();
    let name = shared.config.name.clone();
    m.u64_observable_gauge("updraft.pair.active")
        .with_description("1 on the provider that holds the store (every provider of a database)")
        .with_callback(move |o| o.observe(1, &[KeyValue::new("provider", name.clone())]))
        .build();
    let name = shared.config.name.clone();
    m.u64_observable_gauge("updraft.pair.epoch")
        .with_description("The fencing epoch the active provider took over with")
        .with_callback(move |o| o.observe(epoch, &[KeyValue::new("provider", name.clone())]))
        .build();
}

/// `updraft.catalog.statement.expiry`: seconds until the signed catalog statement this server
/// holds expires (agents then refuse its answers); the centre re-signs before half its life, so
/// a falling value means it stopped. Registered by the centre and by sites.
pub fn statement_expiry(shared: &Arc<Shared>) {
    let weak: Weak<Shared> = Arc::downgrade(shared);
    meter()
        .i64_observable_gauge("updraft.catalog.statement.expiry")
        .with_unit("s")
        .with_description("Seconds until the signed catalog statement held here expires")
        .with_callback(move |o| {
            let Some(shared) = weak.upgrade() else { return };
            let held = shared.store.statement().ok().flatten();
            if let Some(expires) = held.and_then(|st| updraft_core::freshness::claimed_expiry(&st.body)) {
                o.observe((expires - crate::now_ms()) / 1000, &[KeyValue::new("server", shared.config.name.clone())]);
            }
        })
        .build();
}

/// `updraft.store.size`: bytes the store takes (its files, or its tables on a database).
/// Registered by the centre and by sites.
pub fn store_size(shared: &Arc<Shared>) {
    let weak: Weak<Shared> = Arc::downgrade(shared);
    meter()
        .u64_observable_gauge("updraft.store.size")
        .with_unit("By")
        .with_description("Bytes the store takes where it is kept")
        .with_callback(move |o| {
            let Some(shared) = weak.upgrade() else { return };
            match shared.store.size_on_disk() {
                Ok(n) => o.observe(n, &[KeyValue::new("server", shared.config.name.clone())]),
                Err(e) => tracing::warn!(error = %e, "cannot measure the store"),
            }
        })
        .build();
}
