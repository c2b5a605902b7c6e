//! A real headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`;
//! `.ci/run` installs them): for the web console's tests. [`Browser::start`] starts a
//! chromedriver of its own, with the Chromium it starts, inside a network namespace that has
//! only a loopback, and opens one session; dropping it ends both and removes the namespace.
//!
//! Why a namespace: Chromium reaches for the outside by itself, whatever flags it is given — it
//! was seen sending DNS queries to public resolvers (8.8.8.8, 8.8.4.4) and probing an IPv6
//! address of Google's at start-up. Traffic beyond loopback is never allowed here, so the browser
//! gets a network where nothing can leave: the console's addresses are relayed into it, each at
//! the same address it has outside (so the URLs, and the console's same-origin checks, are
//! those a person would see), and the test reaches chromedriver through a relay the other way.
use std::fs::File;
use std::io::ErrorKind;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};

use crate::netns;

pub struct Browser {
    pub client: Client,
    _driver: Driver,
    _net: Confined,
}

/// chromedriver in a process group of its own, with the Chromium it starts: dropped, the whole
/// group is killed, so a failed test leaves no browser behind.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        crate::signal(self.0.id(), libc::SIGKILL, true);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A network namespace with nothing but a loopback, and the relays across its border. Dropped,
/// the relays stop and the namespace is deleted.
struct Confined {
    name: String,
    ns: Arc<File>,
    stop: Arc<AtomicBool>,
}

impl Confined {
    fn new() -> Confined {
        netns::remove_stale();
        let name = netns::fresh_name("br");
        netns::ip(&["netns", "add", &name]);
        netns::ip(&["-n", &name, "link", "set", "lo", "up"]);
        let ns = Arc::new(File::open(format!("/run/netns/{name}")).expect("the namespace just added"));
        Confined { name, ns, stop: Arc::new(AtomicBool::new(false)) }
    }

    /// A command that runs inside the namespace.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Makes `addr` on the machine's loopback reachable at the same address inside.
    fn expose(&self, addr: SocketAddr) {
        let listener = inside(&self.ns, move || TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("cannot listen on {addr} inside the browser's namespace: {e}"));
        relay(listener, self.stop.clone(), move || TcpStream::connect(addr));
    }

    /// A port on the machine's loopback that leads to `port` on the namespace's.
    fn reach(&self, port: u16) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let local = listener.local_addr().unwrap().port();
        let ns = self.ns.clone();
        relay(listener, self.stop.clone(), move || inside(&ns, move || TcpStream::connect(("127.0.0.1", port))));
        local
    }
}

impl Drop for Confined {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// Runs `f` on a thread of its own inside the namespace `ns`: what it binds or connects stays
/// there, whichever thread uses it later.
fn inside<T: Send + 'static>(ns: &Arc<File>, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.clone();
    std::thread::spawn(move || {
        // SAFETY: setns(2) on this short-lived thread only, with a namespace file kept open.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns into the browser's namespace: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("the thread in the browser's namespace")
}

/// Accepts on `listener` until `stop`, piping each connection to one that `connect` opens.
fn relay(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    connect: impl Fn() -> std::io::Result<TcpStream> + Send + 'static,
) {
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((conn, _)) => {
                    let _ = conn.set_nonblocking(false);
                    if let Ok(far) = connect() {
                        pipe(conn, far);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
                Err(_) => break,
            }
        }
    });
}

/// Copies bytes both ways between `a` and `b` until each side has said all it has to say.
fn pipe(a: TcpStream, b: TcpStream) {
    let one_way = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Write);
        });
    };
    let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    one_way(a, b2);
    one_way(b, a2);
}

impl Browser {
    /// Starts chromedriver and a headless Chromium, confined to a namespace of its own that can
    /// reach `sites` (loopback addresses, at the same address inside) and nothing else, and that
    /// accepts the console's certificate (the test CA's, which the browser does not know). Fails
    /// loudly when either program is missing.
    pub async fn start(log: &std::path::Path, sites: &[SocketAddr]) -> Browser {
        let driver = ["chromedriver", "/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|p| Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success()))
            .expect("chromedriver is not installed (Debian: apt-get install chromium chromium-driver)");
        let net = Confined::new();
        for site in sites {
            net.expose(*site);
        }
        // The namespace is this browser's alone: chromedriver's usual port is free there.
        let inner_port = 9515;
        let out = File::create(log).unwrap();
        let child = net
            .command(driver)
            .arg(format!("--port={inner_port}"))
            .process_group(0)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut driver = Driver(child);
        let port = net.reach(inner_port);
        let mut caps = serde_json::Map::new();
        caps.insert("acceptInsecureCerts".into(), true.into());
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1366,900", "--no-first-run", "--password-store=basic",
                         // Less for the browser to try: its namespace is what keeps it in.
                         "--disable-background-networking", "--disable-component-update",
                         "--disable-sync", "--disable-quic", "--disable-default-apps",
                         "--disable-domain-reliability", "--no-pings"]
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            let last = match ClientBuilder::new(connector).capabilities(caps.clone()).connect(&url).await {
                Ok(client) => return Browser { client, _driver: driver, _net: net },
                Err(e) => e.to_string(),
            };
            if std::time::Instant::now() > deadline || driver.0.try_wait().ok().flatten().is_some() {
                panic!(
                    "no WebDriver session from chromedriver (port {inner_port} in {}, {port} here): {last}\n{}",
                    net.name,
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits for an element, then returns it.
    pub async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(Duration::from_secs(30))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css:?} on the page: {e}"))
    }

    /// The page's visible text (empty while a page is being replaced by the next).
    pub async fn text(&self) -> String {
        match self.client.find(Locator::Css("body")).await {
            Ok(body) => body.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Waits until the page's text contains `what`; returns the text.
    pub async fn wait_text(&self, what: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let text = self.text().await;
            if text.contains(what) {
                return text;
            }
            if std::time::Instant::now() > deadline {
                panic!("the page never said {what:?}; it says:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A PNG screenshot of the window, saved to `path`; panics on a blank page (a PNG of one
    /// colour compresses to a few hundred bytes).
    pub async fn screenshot(&self, path: &std::path::Path) {
        let png = self.client.screenshot().await.unwrap();
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        assert!(png.len() > 8_000, "{}: {} bytes: the page looks blank", path.display(), png.len());
        std::fs::write(path, png).unwrap();
    }
}
