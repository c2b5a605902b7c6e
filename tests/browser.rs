//! A real headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`;
//! `.ci/run` installs them): for the web console's tests. [`Browser::start`] starts a
//! chromedriver of its own on a free loopback port and opens one session; dropping it ends
//! both.
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};

pub struct Browser {
    pub client: Client,
    _driver: Driver,
}

/// chromedriver in a process group of its own, with the Chromium it starts: dropped, the whole
/// group is killed, so a failed test leaves no browser behind.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-KILL").arg(format!("-{}", self.0.id())).status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port nobody listens on now (chromedriver cannot report one it picked itself).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Browser {
    /// Starts chromedriver and a headless Chromium that accepts the console's certificate (the
    /// test CA's, which the browser does not know) and sends nothing beyond loopback. Fails
    /// loudly when either is missing.
    pub async fn start(log: &std::path::Path) -> Browser {
        let driver = ["chromedriver", "/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|p| Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success()))
            .expect("chromedriver is not installed (Debian: apt-get install chromium chromium-driver)");
        let port = free_port();
        let out = std::fs::File::create(log).unwrap();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut driver = Driver(child);
        let mut caps = serde_json::Map::new();
        caps.insert("acceptInsecureCerts".into(), true.into());
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1366,900", "--no-first-run", "--password-store=basic",
                         // Chromium reaches out to Google's hosts by itself (updates, sync, metrics,
                         // safe browsing). This machine has no network but loopback, and traffic to
                         // anywhere else is flagged: switch it all off, and resolve no name at all
                         // (the console's addresses are loopback IPs).
                         "--disable-background-networking", "--disable-component-update",
                         "--disable-sync", "--disable-quic", "--disable-default-apps",
                         "--disable-domain-reliability", "--disable-client-side-phishing-detection",
                         "--disable-breakpad", "--no-pings", "--metrics-recording-only",
                         "--host-resolver-rules=MAP * ~NOTFOUND"]
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            let last = match ClientBuilder::new(connector).capabilities(caps.clone()).connect(&url).await {
                Ok(client) => return Browser { client, _driver: driver },
                Err(e) => e.to_string(),
            };
            if std::time::Instant::now() > deadline || driver.0.try_wait().ok().flatten().is_some() {
                panic!(
                    "no WebDriver session from chromedriver on port {port}: {last}\n{}",
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
