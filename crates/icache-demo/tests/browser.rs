//! A real browser: headless Chromium, driven through chromedriver with
//! fantoccini, looks at the home page and a user's page (and what their
//! cache panels say each block did), clicks a rating and sees the list change
//! and the block re-rendered because of it. Screenshots of the three pages
//! go to `target/tmp/screenshots/`.
//!
//! Needs Debian's `chromium` and `chromium-driver` (scripts/test.sh installs
//! them). Without them the test skips loudly, except under `CI=true`, where it
//! fails.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{ClientBuilder, Locator};
use icache::ICache;
use icache_demo::testing::Site;

fn find(binary: &str) -> Option<String> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| format!("{d}/{binary}"))
        .find(|p| std::path::Path::new(p).is_file())
}

fn require(binary: &str) -> Option<String> {
    let found = find(binary);
    if found.is_none() {
        let ci = matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"));
        assert!(
            !ci,
            "{binary} is not installed, and CI=true: run scripts/test.sh to install it"
        );
        eprintln!(
            "SKIPPING the browser test: {binary} is not installed; run scripts/test.sh to install it"
        );
    }
    found
}

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the cache panel says each block of the shown page did.
async fn panel_kinds(client: &fantoccini::Client) -> Result<Vec<String>, String> {
    let rows = client
        .find_all(Locator::Css("#blocks tr[data-kind]"))
        .await
        .map_err(|e| e.to_string())?;
    let mut kinds = Vec::new();
    for row in rows {
        kinds.push(
            row.attr("data-kind")
                .await
                .map_err(|e| e.to_string())?
                .unwrap_or_default(),
        );
    }
    Ok(kinds)
}

/// Saves a screenshot of the shown page (a real PNG of some size).
async fn screenshot(client: &fantoccini::Client, name: &str) -> Result<(), String> {
    let png = client.screenshot().await.map_err(|e| e.to_string())?;
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{name}: not a real screenshot ({} bytes)",
        png.len()
    );
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join(name), png).map_err(|e| e.to_string())?;
    eprintln!("screenshot: {}", dir.join(name).display());
    Ok(())
}

#[test]
fn clicking_a_rating_changes_the_list() {
    let (Some(driver_bin), Some(chromium)) = (
        require("chromedriver"),
        find("chromium").or_else(|| require("chromium")),
    ) else {
        return;
    };
    let site = Site::start(ICache::memory());
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let _driver = Driver(
        Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let profile = std::env::temp_dir().join(format!("icache-chromium-{}", std::process::id()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let url = site.url();
    let result: Result<(), String> = rt.block_on(async move {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1280,1000",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .map_err(|e| format!("connect to chromedriver: {e}"))?;
        let run = async {
            client.goto(&url).await.map_err(|e| e.to_string())?;
            client
                .find(Locator::Css("#cached-here"))
                .await
                .map_err(|e| format!("the home page says what is cached: {e}"))?;
            assert_eq!(panel_kinds(&client).await?, ["stored"], "home, first view");
            screenshot(&client, "home.png").await?;
            client
                .goto(&format!("{url}/users/5"))
                .await
                .map_err(|e| e.to_string())?;
            assert_eq!(
                panel_kinds(&client).await?,
                ["stored"],
                "user page, first view"
            );
            // Not a reload: the page has an ETag now (icache_http's layer),
            // so a reload revalidates, gets 304 and shows the browser's own
            // copy, panel included. Another URL of the same block is a new
            // page for the browser and a hit for the block.
            client
                .goto(&format!("{url}/users/5?again=1"))
                .await
                .map_err(|e| e.to_string())?;
            assert_eq!(panel_kinds(&client).await?, ["hit"], "user page, again");
            screenshot(&client, "user.png").await?;
            let items = client
                .find_all(Locator::Css("#personal li"))
                .await
                .map_err(|e| e.to_string())?;
            let n = items.len();
            let last = items.last().ok_or("no movies listed")?;
            let id = last
                .attr("data-movie")
                .await
                .map_err(|e| e.to_string())?
                .ok_or("no data-movie")?;
            let rating = last
                .find(Locator::Css(".rating"))
                .await
                .map_err(|e| e.to_string())?;
            assert_ne!(rating.text().await.map_err(|e| e.to_string())?, "5/5");
            // Click its "5" button: the form posts, the site redirects back.
            last.find(Locator::Css("button.rate-5"))
                .await
                .map_err(|e| e.to_string())?
                .click()
                .await
                .map_err(|e| e.to_string())?;
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let items = client
                    .find_all(Locator::Css("#personal li"))
                    .await
                    .map_err(|e| e.to_string())?;
                let mut pos = None;
                for (i, li) in items.iter().enumerate() {
                    if li.attr("data-movie").await.ok().flatten().as_deref() == Some(id.as_str()) {
                        pos = Some(i);
                        break;
                    }
                }
                if let Some(p) = pos
                    && p < n - 1
                {
                    let li = &items[p];
                    let r = li
                        .find(Locator::Css(".rating"))
                        .await
                        .map_err(|e| e.to_string())?;
                    assert_eq!(r.text().await.map_err(|e| e.to_string())?, "5/5");
                    // What was committed and bumped, and the block that
                    // re-rendered because of it.
                    let notice = client
                        .find(Locator::Css("#rated"))
                        .await
                        .map_err(|e| format!("no rating notice: {e}"))?
                        .text()
                        .await
                        .map_err(|e| e.to_string())?;
                    assert!(
                        notice.contains("5/5") && notice.contains("movies"),
                        "{notice}"
                    );
                    assert_eq!(panel_kinds(&client).await?, ["stored"], "after the rating");
                    client
                        .find(Locator::Css("#blocks tr[data-kind] .invalidated"))
                        .await
                        .map_err(|e| format!("the re-render is not explained: {e}"))?;
                    screenshot(&client, "after-rating.png").await?;
                    return Ok::<(), String>(());
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "movie {id} did not move up (position {pos:?} of {n})"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let out = run.await;
        let _ = client.close().await;
        out
    });
    let _ = std::fs::remove_dir_all(
        std::env::temp_dir().join(format!("icache-chromium-{}", std::process::id())),
    );
    result.expect("browser test");
    assert!(
        site.state.cache().stats().misses >= 2,
        "the list was rendered again after the click"
    );
}
