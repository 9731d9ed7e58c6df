//! The live page, driven in a real headless Chromium (Debian's `chromium`) over the
//! DevTools protocol: a session created through the API shows within 2 s without a
//! reload, its end moves it to recent ends with its reason, and a tenant key sees only
//! its tenant. The test writes a screenshot of the page (`SESSIOND_UI_SCREENSHOT`, else
//! the test's temp dir).
//!
//! On PostgreSQL (when configured) the page is served by one instance while the sessions
//! are created and ended through another. Without `chromium` the test is skipped with a
//! message, unless `SESSION_LIFECYCLE_REQUIRE_BROWSER=1` (CI), which makes it a failure.
#![cfg(feature = "sessiond")]

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Cluster, Node};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use session_lifecycle_client::{Client, CreateRequest, EndReasonView};
use tokio_tungstenite::tungstenite::Message;

const OPERATOR: &str = "key-operator";
const ACME: &str = "key-acme";
const GLOBEX: &str = "key-globex";

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A headless Chromium and a DevTools connection to its one page.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    page: Socket,
    next_id: u64,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    /// Starts Chromium; `None` (the test is skipped) when there is none and none is
    /// required.
    async fn launch() -> Option<Browser> {
        let required = std::env::var("SESSION_LIFECYCLE_REQUIRE_BROWSER").as_deref() == Ok("1");
        let binary = ["chromium", "chromium-browser", "google-chrome"]
            .into_iter()
            .find(|b| {
                Command::new(b)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            });
        let Some(binary) = binary else {
            assert!(
                !required,
                "SESSION_LIFECYCLE_REQUIRE_BROWSER=1 but no chromium"
            );
            eprintln!("skipped: no chromium (apt-get install chromium)");
            return None;
        };
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new(binary)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
                "--disable-background-networking",
                "--window-size=1440,1200",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        // Chromium writes the port it chose into the profile.
        let active = profile.path().join("DevToolsActivePort");
        let port = wait_until(Duration::from_secs(30), || async {
            std::fs::read_to_string(&active)
                .ok()
                .and_then(|t| t.lines().next().and_then(|p| p.trim().parse::<u16>().ok()))
        })
        .await
        .expect("chromium's DevTools port");
        let targets: Value = wait_until(Duration::from_secs(10), || async move {
            let list: Value = reqwest::get(format!("http://127.0.0.1:{port}/json/list"))
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            list.as_array()?
                .iter()
                .any(|t| t["type"] == "page")
                .then_some(list)
        })
        .await
        .expect("a page target");
        let url = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("the page's DevTools URL")
            .to_owned();
        let (page, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("DevTools connection");
        let mut browser = Browser {
            child,
            _profile: profile,
            page,
            next_id: 0,
        };
        browser.call("Page.enable", json!({})).await;
        browser.call("Runtime.enable", json!({})).await;
        browser
            .call(
                "Emulation.setDeviceMetricsOverride",
                json!({"width": 1440, "height": 1200, "deviceScaleFactor": 1, "mobile": false}),
            )
            .await;
        Some(browser)
    }

    /// Sends one DevTools command and waits for its answer (events in between are
    /// dropped).
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let message = json!({"id": id, "method": method, "params": params}).to_string();
        self.page
            .send(Message::Text(message.into()))
            .await
            .expect("DevTools send");
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(30), self.page.next())
                .await
                .unwrap_or_else(|_| panic!("{method}: no answer"))
                .expect("DevTools open")
                .expect("DevTools frame");
            let Message::Text(text) = frame else { continue };
            let answer: Value = serde_json::from_str(text.as_str()).expect("DevTools JSON");
            if answer["id"] == id {
                assert!(answer.get("error").is_none(), "{method}: {answer}");
                return answer["result"].clone();
            }
        }
    }

    async fn open(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": "about:blank"}))
            .await;
        self.call("Page.navigate", json!({"url": url})).await;
    }

    /// Opens `url` and waits until the page is live (its snapshot shown, its event stream
    /// open).
    async fn open_live(&mut self, url: &str) {
        self.open(url).await;
        self.wait_for(
            "document.body.dataset.state === 'live'",
            Duration::from_secs(15),
        )
        .await
        .unwrap_or_else(|| panic!("{url}: the page goes live"));
    }

    /// The value of `expression` in the page.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        result["result"]["value"].clone()
    }

    /// How long until `expression` is true in the page (polled every 20 ms), or `None`
    /// past `limit`.
    async fn wait_for(&mut self, expression: &str, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.eval(expression).await == Value::Bool(true) {
                return Some(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    async fn text(&mut self, selector: &str) -> String {
        let value = self
            .eval(&format!(
                "document.querySelector({}).textContent",
                json!(selector)
            ))
            .await;
        value.as_str().unwrap_or_default().to_owned()
    }

    async fn screenshot(&mut self, path: &std::path::Path) {
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await;
        let data = shot["data"].as_str().expect("screenshot data");
        use base64::Engine as _;
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .expect("base64 PNG");
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap();
        eprintln!("screenshot written to {}", path.display());
    }
}

/// The first `Some` of `probe`, polled every 100 ms for up to `limit`.
async fn wait_until<T, F: std::future::Future<Output = Option<T>>>(
    limit: Duration,
    mut probe: impl FnMut() -> F,
) -> Option<T> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(found) = probe().await {
            return Some(found);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

fn tenants_file(dir: &std::path::Path) -> PathBuf {
    let hash = session_lifecycle_http::tenants::hash_key;
    let text = format!(
        "operator_keys_sha256 = [\"{}\"]\n\n\
         [[tenants]]\nname = \"acme\"\napi_key_sha256 = \"{}\"\nmax_concurrent_sessions = 100\nmax_session_secs = 3600\n\n\
         [[tenants]]\nname = \"globex\"\napi_key_sha256 = \"{}\"\nmax_concurrent_sessions = 100\nmax_session_secs = 3600\n",
        hash(OPERATOR),
        hash(ACME),
        hash(GLOBEX)
    );
    let path = dir.join("tenants.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts a session through `client`; its id.
async fn start(client: &Client) -> String {
    client
        .create_session(&CreateRequest::default())
        .await
        .unwrap()
        .session
        .session_id
}

fn row(table: &str, session: &str) -> String {
    format!("document.querySelector('#{table} tr[data-session=\"{session}\"]')")
}

#[tokio::test]
async fn the_live_page_follows_sessions_as_they_start_and_end_and_keeps_tenants_apart() {
    let Some(mut browser) = Browser::launch().await else {
        return;
    };
    // Two instances on PostgreSQL when there is one (the page on one, the calls to the
    // other), else one on SQLite.
    let mut cluster = match Cluster::new(&[]).await {
        Some(cluster) => cluster,
        None => Cluster::sqlite(&[]),
    };
    let tenants = tenants_file(cluster.dir.path());
    cluster.auth = vec!["--tenants".into(), tenants.to_str().unwrap().into()];
    let page_node: Node = cluster.start("a");
    let api_node: Option<Node> = cluster.db.is_some().then(|| cluster.start("b"));
    let api_base = api_node.as_ref().unwrap_or(&page_node).url("");
    let acme = Client::new(&api_base, ACME).unwrap();
    let globex = Client::new(&api_base, GLOBEX).unwrap();
    let nodes = if api_node.is_some() { 2 } else { 1 };

    // The operator sees every tenant, and the nodes.
    browser
        .open_live(&page_node.url(&format!("/ui#key={OPERATOR}")))
        .await;
    assert_eq!(
        browser.eval("location.hash").await,
        "",
        "the key leaves the URL"
    );
    assert!(browser.text("#scope").await.contains("every tenant"));

    let started = acme
        .create_session(&CreateRequest::default())
        .await
        .unwrap();
    let id = started.session.session_id.clone();
    let shown = browser
        .wait_for(
            &format!("!!{}", row("sessions", &id)),
            Duration::from_secs(2),
        )
        .await
        .expect("a new session shows within 2 s, without a reload");
    eprintln!("session shown {shown:?} after its create answered");
    let cells = browser
        .eval(&format!(
            "Array.from({}.cells).map(c => c.textContent)",
            row("sessions", &id)
        ))
        .await;
    assert_eq!(cells[1], "acme", "{cells}");
    let api_id = if api_node.is_some() { "b" } else { "a" };
    assert_eq!(cells[2], api_id, "{cells}");
    assert!(
        cells[6].as_str().unwrap().contains("avatar_process held"),
        "{cells}"
    );
    let other = start(&globex).await;
    browser
        .wait_for(
            &format!("!!{}", row("sessions", &other)),
            Duration::from_secs(2),
        )
        .await
        .expect("another tenant's session shows to the operator");

    let ended = acme.end_session(&id).await.unwrap();
    assert_eq!(ended.end_reason, Some(EndReasonView::Requested));
    let moved = browser
        .wait_for(
            &format!(
                "!{} && {}?.querySelector('[data-reason]')?.dataset.reason === 'requested'",
                row("sessions", &id),
                row("ends", &id)
            ),
            Duration::from_secs(2),
        )
        .await
        .expect("an ended session moves to recent ends with its reason within 2 s");
    eprintln!("end shown {moved:?} after the end answered");
    browser
        .wait_for(
            &format!("document.querySelectorAll('#nodes tr[data-node]').length === {nodes}"),
            Duration::from_secs(15),
        )
        .await
        .expect("every node is listed");
    assert!(browser.text("#nodes").await.contains("alive"));
    assert_eq!(
        browser
            .eval("document.querySelectorAll('#chart rect').length > 0")
            .await,
        true,
        "the chart has a bar for the end"
    );
    let path = std::env::var_os("SESSIOND_UI_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui.png"));
    browser.screenshot(&path).await;

    // A tenant key: its own sessions only, live too; no nodes.
    browser
        .open_live(&page_node.url(&format!("/ui#key={GLOBEX}")))
        .await;
    assert!(browser.text("#scope").await.contains("globex"));
    assert_eq!(
        browser
            .eval(&format!("!!{}", row("sessions", &other)))
            .await,
        true
    );
    assert_eq!(
        browser.eval(&format!("!!{}", row("ends", &id))).await,
        false
    );
    assert_eq!(
        browser
            .eval("document.getElementById('nodes-section').hidden")
            .await,
        true
    );
    let hidden = start(&acme).await;
    let own = start(&globex).await;
    browser
        .wait_for(
            &format!("!!{}", row("sessions", &own)),
            Duration::from_secs(2),
        )
        .await
        .expect("the tenant's new session shows");
    assert_eq!(
        browser
            .eval(&format!("!!{}", row("sessions", &hidden)))
            .await,
        false,
        "another tenant's session never shows"
    );
    let body = browser.text("main").await;
    assert!(!body.contains("acme"), "no trace of another tenant: {body}");

    // A wrong key gets the key form back, with why.
    browser.open(&page_node.url("/ui#key=nope")).await;
    browser
        .wait_for(
            "document.body.dataset.state === 'login'",
            Duration::from_secs(10),
        )
        .await
        .expect("a wrong key is refused");
    assert!(browser.text("#login-error").await.contains("not valid"));

    // A key that could never go in a header (not ASCII) gets the form back too, with why.
    browser.open(&page_node.url("/ui#key=%D0%BA%D0%BB")).await;
    browser
        .wait_for(
            "document.body.dataset.state === 'login'",
            Duration::from_secs(10),
        )
        .await
        .expect("a key that is not ASCII is refused");
    assert!(
        browser
            .text("#login-error")
            .await
            .contains("printable ASCII")
    );

    // `/ui/` leads to the page.
    let resp = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(page_node.url("/ui/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()["location"], "../ui");
    drop(browser);
    drop(api_node);
    drop(page_node);
    cluster.finish().await;
}
