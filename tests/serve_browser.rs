//! The `serve` page in a real browser (issue #19): headless Chromium from Debian's `chromium` +
//! `chromium-driver` packages (`scripts/setup-browser.sh`, which `.ci/run` calls), driven over
//! WebDriver with `fantoccini`. It uploads two images, generates and watches the progress,
//! sees the images, moves κ with the keyboard and runs a sweep, downloads the LoRA, checks the
//! layout at 400 px, and takes a screenshot (`target/serve-browser/serve.png`; with
//! `LORACAST_UPDATE_SCREENSHOT=1` also `docs/serve.png`). chromedriver is started here on a
//! free loopback port and killed at the end. Without chromium the test fails, naming the
//! setup script.
#[path = "serve_util/mod.rs"]
mod util;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use util::*;

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// chromedriver on a free 127.0.0.1 port, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start(bin: &Path) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn js(c: &Client, script: &str) -> Value {
    c.execute(script, vec![]).await.expect("script")
}

/// Polls a script until it returns a truthy value (at most `secs`).
async fn until(c: &Client, what: &str, script: &str, secs: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let v = js(c, script).await;
        let truthy =
            !matches!(&v, Value::Null | Value::Bool(false)) && v != json!(0) && v != json!("");
        if truthy {
            return v;
        }
        if Instant::now() > deadline {
            let err = js(c, "return document.getElementById('error').textContent").await;
            panic!("timed out waiting for {what} (page error: {err})");
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

async fn set_value(c: &Client, id: &str, value: &str) {
    let e = c.find(Locator::Id(id)).await.unwrap();
    e.clear().await.unwrap();
    e.send_keys(value).await.unwrap();
}

#[test]
fn page_uploads_generates_sweeps_and_downloads_in_chromium() {
    let (Some(chromium), Some(driver)) = (
        on_path("chromium").or_else(|| on_path("chromium-browser")),
        on_path("chromedriver"),
    ) else {
        panic!(
            "the browser test needs Debian's chromium and chromium-driver: run scripts/setup-browser.sh (as root, or with sudo)"
        );
    };
    let tmp = tempfile::tempdir().unwrap();
    let downloads = tmp.path().join("downloads");
    std::fs::create_dir_all(&downloads).unwrap();
    let files = write_pngs(tmp.path(), &subject_pngs(7, 2));
    let server = Server::start(&[]);
    let driver = Driver::start(&driver);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let shot = rt.block_on(drive(&server, &driver, &chromium, &files, &downloads));
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/serve-browser");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("serve.png"), &shot).unwrap();
    if std::env::var_os("LORACAST_UPDATE_SCREENSHOT").is_some() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/serve.png");
        std::fs::write(docs, &shot).unwrap();
    }
    drop(driver);
    // Both jobs ran on the server (and nothing failed).
    let sys = system(&server);
    assert_eq!(sys["jobs"]["done"], 2, "{sys}");
    assert_eq!(sys["cache"]["hypernet_calls"], 1, "{sys}");
    assert!(server.stop().success());
}

async fn drive(
    server: &Server,
    driver: &Driver,
    chromium: &Path,
    files: &[PathBuf],
    downloads: &Path,
) -> Vec<u8> {
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium.display().to_string(),
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1000,1000", "--no-first-run", "--disable-extensions"],
            "prefs": {
                "download.default_directory": downloads.display().to_string(),
                "download.prompt_for_download": false,
            },
        },
    });
    let caps = caps.as_object().unwrap().clone();
    let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a WebDriver session");
    c.goto(&server.url("/")).await.unwrap();
    until(
        &c,
        "the models line",
        "return document.getElementById('models').textContent.includes('hypernetwork')",
        30,
    )
    .await;
    // The generic prompt is the prompt without the subject token.
    let generic = js(&c, "return document.getElementById('generic').value").await;
    assert_eq!(
        generic,
        "a creature wearing a hat on a sky background, small, in the center"
    );

    // 1. Upload two images: thumbnails, then the subject's LoRA.
    let paths: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    let input = c.find(Locator::Id("files")).await.unwrap();
    input.send_keys(&paths.join("\n")).await.unwrap();
    until(
        &c,
        "two thumbnails",
        "return document.querySelectorAll('#thumbs img').length === 2",
        10,
    )
    .await;
    let text = until(&c, "the subject", "const t = document.getElementById('subject-text').textContent; return t.includes('LoRA in') && t", 30).await;
    assert!(text.as_str().unwrap().contains("2 image(s)"), "{text}");

    // 2. Generate (30 steps, to watch the progress).
    c.find(Locator::Css("#advanced summary"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    set_value(&c, "steps", "30").await;
    set_value(&c, "seed", "42").await;
    c.find(Locator::Id("generate"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let progress = until(
        &c,
        "progress of the job",
        "const s = document.querySelector('.job .state'); return s && /^step [0-9]+\\/30$/.test(s.textContent) && s.textContent",
        60,
    )
    .await;
    assert!(
        progress.as_str().unwrap().starts_with("step "),
        "{progress}"
    );
    until(
        &c,
        "the image",
        "const i = document.querySelector('.job[data-state=done] .gallery img'); return i && i.complete && i.naturalWidth === 32",
        120,
    )
    .await;
    let meta = js(
        &c,
        "return document.querySelector('.job .meta').textContent",
    )
    .await;
    assert!(meta.as_str().unwrap().contains("seed 42"), "{meta}");

    // 3. Move κ with the keyboard (left = subject: κ up), then a κ sweep.
    let kappa = c.find(Locator::Id("kappa")).await.unwrap();
    kappa.click().await.unwrap();
    let left: String = std::iter::repeat_n('\u{e012}', 3).collect();
    kappa.send_keys(&left).await.unwrap();
    let shown = js(
        &c,
        "return document.getElementById('kappa-out').textContent",
    )
    .await;
    assert_eq!(shown, "1.3", "three steps left of κ 1 towards the subject");
    set_value(&c, "steps", "6").await;
    c.find(Locator::Id("sweep"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(
        &c,
        "the sweep's row",
        "const j = document.querySelector('.job[data-state=done]'); const imgs = j ? j.querySelectorAll('.gallery img') : []; return imgs.length === 5 && [...imgs].every(i => i.complete && i.naturalWidth === 32)",
        180,
    )
    .await;
    let captions = js(&c, "return [...document.querySelector('.job').querySelectorAll('figcaption')].map(f => f.textContent)").await;
    assert_eq!(captions, json!(["κ 0", "κ 0.5", "κ 1", "κ 1.5", "κ 2"]));
    assert_eq!(
        js(&c, "return document.querySelectorAll('.job').length").await,
        2
    );

    // 4. Download the LoRA (diffusers format).
    c.find(Locator::Id("lora-peft"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let file = loop {
        let done: Vec<PathBuf> = std::fs::read_dir(downloads)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        if let Some(f) = done.into_iter().next() {
            break f;
        }
        assert!(
            Instant::now() < deadline,
            "the LoRA download did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.names().iter().all(|n| n.starts_with("unet.")));
    assert!(file
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .ends_with("-peft.safetensors"));

    // 5. An error is readable: a bad size, shown in the page, focus on the field.
    js(&c, "const w = document.getElementById('width'); w.append(new Option('30', '30')); w.value = '30'; return 1").await;
    c.find(Locator::Id("generate"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let err = until(
        &c,
        "the error",
        "const e = document.getElementById('error'); return !e.hidden && e.textContent",
        10,
    )
    .await;
    assert!(err.as_str().unwrap().contains("multiple of 8"), "{err}");
    assert_eq!(js(&c, "return document.activeElement.id").await, "width");
    js(&c, "const w = document.getElementById('width'); w.value = '32'; w.querySelector('option[value=\"30\"]').remove(); document.getElementById('error').hidden = true; return 1").await;

    // 6. 400 px wide: nothing overflows sideways.
    js(&c, "document.getElementById('advanced').open = false; document.activeElement.blur(); window.scrollTo(0, 0); return 1").await;
    c.set_window_size(1000, 1250).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let shot = c.screenshot().await.unwrap();
    c.set_window_size(400, 900).await.unwrap();
    let fits = until(&c, "a 400 px layout", "return window.innerWidth <= 400 && document.documentElement.scrollWidth <= window.innerWidth", 10).await;
    assert_eq!(fits, true);
    c.close().await.unwrap();
    shot
}
