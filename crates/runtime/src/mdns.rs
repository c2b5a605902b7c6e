//! mDNS for Updraft providers: announcing one (`_updraft._tcp` with its discovery key, role and
//! site in TXT records) and browsing for them. A daemon is only ever created when an admin has
//! turned discovery on (providers) or the machine is configured to browse (agents): mDNS joins
//! every interface, so nothing here runs by default.
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};

pub const SERVICE_TYPE: &str = "_updraft._tcp.local.";

/// What a provider announces about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    pub name: String,
    pub key: String,
    /// `local` or `remote`.
    pub role: String,
    pub site: String,
    pub port: u16,
    /// The address it listens on; None (a wildcard listen) announces every address it has.
    pub ip: Option<IpAddr>,
    pub tls: bool,
}

/// A registered announcement; [`Announcer::stop`] says goodbye on the network.
pub struct Announcer {
    daemon: ServiceDaemon,
    fullname: String,
}

impl Announcer {
    pub fn start(a: &Announcement) -> Result<Self, String> {
        let daemon = ServiceDaemon::new().map_err(|e| format!("cannot start mDNS: {e}"))?;
        let host = format!("{}.local.", crate::hostname());
        let mut props = HashMap::new();
        props.insert("key".to_string(), a.key.clone());
        props.insert("role".to_string(), a.role.clone());
        props.insert("site".to_string(), a.site.clone());
        props.insert("tls".to_string(), if a.tls { "1" } else { "0" }.to_string());
        let info = match a.ip {
            Some(ip) => ServiceInfo::new(SERVICE_TYPE, &a.name, &host, ip, a.port, props),
            None => ServiceInfo::new(SERVICE_TYPE, &a.name, &host, "", a.port, props).map(|i| i.enable_addr_auto()),
        }
        .map_err(|e| format!("bad mDNS announcement for {}: {e}", a.name))?;
        let fullname = info.get_fullname().to_string();
        daemon.register(info).map_err(|e| format!("cannot announce {}: {e}", a.name))?;
        Ok(Self { daemon, fullname })
    }

    pub fn stop(self) {
        if let Ok(rx) = self.daemon.unregister(&self.fullname) {
            let _ = rx.recv_timeout(Duration::from_secs(1));
        }
        let _ = self.daemon.shutdown();
    }
}

/// A provider seen on the network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// The mDNS full name, unique per announcement.
    pub fullname: String,
    pub name: String,
    pub url: String,
    pub key: String,
    pub role: String,
    pub site: String,
}

pub enum Seen {
    Up(Found),
    Gone { fullname: String },
}

/// Browses for providers until dropped.
pub struct Browser {
    daemon: ServiceDaemon,
    events: mdns_sd::Receiver<ServiceEvent>,
}

impl Browser {
    pub fn start() -> Result<Self, String> {
        let daemon = ServiceDaemon::new().map_err(|e| format!("cannot start mDNS: {e}"))?;
        let events = daemon.browse(SERVICE_TYPE).map_err(|e| format!("cannot browse mDNS: {e}"))?;
        Ok(Self { daemon, events })
    }

    /// The next provider that appeared or went away; None once the daemon has stopped.
    pub async fn next(&self) -> Option<Seen> {
        loop {
            match self.events.recv_async().await.ok()? {
                ServiceEvent::ServiceResolved(s) => {
                    // Prefer IPv4: the first answer may carry only an IPv6 link-local address,
                    // which needs a scope to be usable.
                    let ip = s
                        .get_addresses_v4()
                        .into_iter()
                        .min()
                        .map(IpAddr::V4)
                        .or_else(|| s.get_addresses().iter().map(|a| a.to_ip_addr()).find(|a| !is_link_local(a)));
                    let Some(ip) = ip else { continue };
                    let prop = |k: &str| s.get_property_val_str(k).unwrap_or_default().to_string();
                    let scheme = if prop("tls") == "1" { "https" } else { "http" };
                    let host = match ip {
                        IpAddr::V4(v4) => v4.to_string(),
                        IpAddr::V6(v6) => format!("[{v6}]"),
                    };
                    let name = s.get_fullname().strip_suffix(&format!(".{SERVICE_TYPE}")).unwrap_or(s.get_fullname());
                    return Some(Seen::Up(Found {
                        fullname: s.get_fullname().to_string(),
                        name: name.to_string(),
                        url: format!("{scheme}://{host}:{}", s.get_port()),
                        key: prop("key"),
                        role: prop("role"),
                        site: prop("site"),
                    }));
                }
                ServiceEvent::ServiceRemoved(_, fullname) => return Some(Seen::Gone { fullname }),
                _ => {}
            }
        }
    }
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.daemon.shutdown();
    }
}
