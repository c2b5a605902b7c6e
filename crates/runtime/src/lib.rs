//! Process glue shared by every Updraft binary: telemetry, shutdown on signals, the host name
//! and default data directories. Nothing domain-specific lives here.
pub mod enroll;
pub mod held;
pub mod logs;
pub mod mdns;
pub mod metrics;
pub mod probe;
pub mod telemetry;
pub mod tls;

use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

pub use probe::Probe;
pub use telemetry::{Telemetry, TracedChannel, traced, traced_under};

/// A token cancelled on SIGINT or SIGTERM, for graceful shutdown.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {}
        }
        tracing::info!("shutdown requested");
        t.cancel();
    });
    token
}

/// Says where a server listens, once bound, on standard output: with `--listen HOST:0` the
/// kernel picks the port, and this line is how a supervisor or a test learns it.
pub fn report_listening(program: &str, addr: std::net::SocketAddr) {
    println!("{program}: listening on {addr}");
}

/// A moment as people read it in a status line: `2026-12-02 18:40:12 UTC` (seconds; UTC, since
/// machines and their administrators are in different zones). Out of range: the raw number.
pub fn utc_text(unix_ms: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix_ms.div_euclid(1000)) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("{unix_ms} ms after 1970"),
    }
}

/// The kernel's host name, or "localhost" when it cannot be read. Asked of the kernel
/// (`gethostname`), not read from `/proc/sys`, which a hardened unit (`ProcSubset=pid`) hides.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is writable for its whole length; the name is NUL-terminated within
    // it on success (truncated names are cut at the buffer's end below).
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let len = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..len]).trim().to_string())
        .filter(|s| ok && !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Default data directory for a component: for root, `/var/lib/updraft/<component>`; for
/// anyone else `$XDG_DATA_HOME/updraft/<component>`, else `~/.local/share/updraft/<component>`,
/// else `/var/lib/updraft/<component>`.
pub fn default_data_dir(component: &str) -> PathBuf {
    // Root runs the system's daemons (under systemd, often with no HOME at all): its commands
    // must find the same directories from a shell.
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from(SYSTEM_DATA_DIR).join(component);
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|s| !s.is_empty()).map(|h| PathBuf::from(h).join(".local/share")));
    match base {
        Some(b) => b.join("updraft").join(component),
        None => PathBuf::from(SYSTEM_DATA_DIR).join(component),
    }
}

/// Where root's (the system's) Updraft data lives.
pub const SYSTEM_DATA_DIR: &str = "/var/lib/updraft";

/// Bytes free for unprivileged use on the file system holding `path` (statvfs).
pub fn free_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Refuses to write `incoming` more bytes under `path` if that would leave less than
/// `reserve` bytes free: a full disk breaks everything else on the machine, so it is refused
/// up front with a message saying how much is missing.
pub fn ensure_room(path: &std::path::Path, incoming: u64, reserve: u64) -> Result<(), String> {
    let free = free_bytes(path).map_err(|e| format!("{}: cannot read free space: {e}", path.display()))?;
    let need = incoming.saturating_add(reserve);
    if free < need {
        return Err(format!(
            "not enough disk space under {}: {incoming} bytes would leave less than the {reserve} bytes kept free \
             ({free} bytes free)",
            path.display()
        ));
    }
    Ok(())
}

/// An address written as std writes it, for what runs on every call (an RPC span's peer, a
/// checking machine's address). An IPv4 address is written digit by digit: std's `Display`
/// goes through the formatting machinery once per octet, a few thousand instructions a call.
pub struct IpText(pub std::net::IpAddr);

impl std::fmt::Display for IpText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let std::net::IpAddr::V4(v4) = self.0 else { return self.0.fmt(f) };
        let (mut buf, mut n) = ([0u8; 15], 0);
        for (i, octet) in v4.octets().into_iter().enumerate() {
            if i > 0 {
                buf[n] = b'.';
                n += 1;
            }
            let digits = [octet / 100, octet / 10 % 10, octet % 10];
            let skip = if octet >= 100 {
                0
            } else if octet >= 10 {
                1
            } else {
                2
            };
            for d in &digits[skip..] {
                buf[n] = b'0' + d;
                n += 1;
            }
        }
        f.write_str(std::str::from_utf8(&buf[..n]).map_err(|_| std::fmt::Error)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_reads_as_std_writes_it() {
        let octets = [0u8, 1, 9, 10, 42, 99, 100, 199, 200, 255];
        for a in octets {
            for b in octets {
                let ip = std::net::IpAddr::from([a, b, 255 - a, 255 - b]);
                assert_eq!(IpText(ip).to_string(), ip.to_string());
            }
        }
        let v6: std::net::IpAddr = "2001:db8::7".parse().unwrap();
        assert_eq!(IpText(v6).to_string(), "2001:db8::7");
    }

    #[test]
    fn the_host_name_is_the_kernels() {
        let proc = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(hostname(), proc.trim());
    }

    #[test]
    fn moments_read_as_utc_to_the_second() {
        assert_eq!(utc_text(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_text(1_796_236_812_999), "2026-12-02 18:40:12 UTC");
        assert!(utc_text(i64::MAX).contains("ms after 1970"));
    }

    #[test]
    fn root_uses_the_system_directory_whatever_its_home() {
        let d = default_data_dir("agent");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(d, std::path::Path::new(SYSTEM_DATA_DIR).join("agent"));
        } else {
            assert!(d.ends_with("updraft/agent"), "{}", d.display());
        }
    }
}
