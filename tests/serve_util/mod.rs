//! Shared helpers of the `serve` tests: start a real `loracast serve` process on 127.0.0.1
//! (port 0, the address read from its first stdout line), toy-world subject images, polling a
//! job to its end, SSE lines, and SIGTERM.
#![allow(dead_code)]
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use loracast::data::{Split, World};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_loracast");

pub struct Server {
    pub child: Child,
    pub base: String,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    /// `loracast serve --bind 127.0.0.1:0 ARGS…` (toy world), once it listens.
    pub fn start(args: &[&str]) -> Server {
        Self::try_start(args).unwrap_or_else(|e| panic!("serve did not start: {e}"))
    }

    pub fn try_start(args: &[&str]) -> Result<Server, String> {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve");
        if !args.contains(&"--bind") {
            cmd.args(["--bind", "127.0.0.1:0"]);
        }
        let mut child = cmd
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let err_text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        {
            let err_text = err_text.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    err_text.lock().unwrap().push_str(&(line + "\n"));
                }
            });
        }
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.split("listening on http://").nth(1) {
                        let addr = rest.trim_end_matches('/').to_string();
                        let port = addr.rsplit(':').next().unwrap_or("0");
                        return Ok(Server {
                            child,
                            base: format!("http://127.0.0.1:{port}"),
                            stderr: err_text,
                        });
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().ok();
                    std::thread::sleep(Duration::from_millis(200));
                    return Err(format!("exit {status:?}: {}", err_text.lock().unwrap()));
                }
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits (at most 60 s) for the exit.
    pub fn stop(mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("serve did not stop within 60 s after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// `n` PNG views (fresh context and jitter) of one held-out toy-world subject.
pub fn subject_pngs(seed: u64, n: usize) -> Vec<Vec<u8>> {
    let mut world = World::new(seed);
    let identity = world.identity(Split::Heldout);
    (0..n)
        .map(|_| world.view(identity).render().png_bytes().unwrap())
        .collect()
}

pub fn write_pngs(dir: &Path, pngs: &[Vec<u8>]) -> Vec<std::path::PathBuf> {
    pngs.iter()
        .enumerate()
        .map(|(i, b)| {
            let p = dir.join(format!("subject-{i}.png"));
            std::fs::write(&p, b).unwrap();
            p
        })
        .collect()
}

pub fn form(pngs: &[Vec<u8>]) -> reqwest::blocking::multipart::Form {
    let mut form = reqwest::blocking::multipart::Form::new();
    for (i, b) in pngs.iter().enumerate() {
        let part = reqwest::blocking::multipart::Part::bytes(b.clone())
            .file_name(format!("s{i}.png"))
            .mime_str("image/png")
            .unwrap();
        form = form.part("images", part);
    }
    form
}

/// Uploads a subject; returns (status, body).
pub fn upload(s: &Server, pngs: &[Vec<u8>]) -> (u16, Value) {
    let r = client()
        .post(s.url("/api/subjects"))
        .multipart(form(pngs))
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap())
}

pub fn post_json(s: &Server, path: &str, body: &Value) -> (u16, Value) {
    let r = client().post(s.url(path)).json(body).send().unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap())
}

pub fn get_json(s: &Server, path: &str) -> (u16, Value) {
    let r = client().get(s.url(path)).send().unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap())
}

pub fn system(s: &Server) -> Value {
    get_json(s, "/api/system").1
}

/// Polls a job until it is done, failed or canceled (at most 300 s).
pub fn wait_job(s: &Server, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (status, job) = get_json(s, &format!("/api/jobs/{id}"));
        assert_eq!(status, 200, "{job}");
        if matches!(job["state"].as_str(), Some("done" | "error" | "canceled")) {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} did not finish: {job}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls until `pred(job)` holds (at most 300 s).
pub fn wait_until(s: &Server, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (_, job) = get_json(s, &format!("/api/jobs/{id}"));
        if pred(&job) {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {id}: condition never held: {job}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Decoded RGB8 of a PNG: (width, height, pixels).
pub fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let img = image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
        .expect("a PNG")
        .to_rgb8();
    (img.width(), img.height(), img.into_raw())
}

/// Reads an SSE stream in a thread; each `(event, data JSON)` arrives on the channel.
pub fn sse(s: &Server, path: &str) -> mpsc::Receiver<(String, Value)> {
    let resp = reqwest::blocking::Client::builder()
        .timeout(None)
        .build()
        .unwrap()
        .get(s.url(path))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut event = String::new();
        for line in BufReader::new(resp).lines().map_while(Result::ok) {
            if let Some(e) = line.strip_prefix("event: ") {
                event = e.to_string();
            } else if let Some(d) = line.strip_prefix("data: ") {
                if let Ok(v) = serde_json::from_str(d) {
                    if tx.send((event.clone(), v)).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}
