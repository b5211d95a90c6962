//! `loracast serve` against a real server process on 127.0.0.1 with the toy world (issue #19):
//! subject upload → job → images (and the same image as `loracast generate` for the seed),
//! cache hits without a hypernetwork call, κ sweeps, SSE events, cancel, queue full → 503,
//! every bad input → its status and JSON, the Host/Origin/token guard, graceful shutdown, and
//! `--state-dir` across a restart. Jobs use few steps at the toy's 32×32.
#[path = "serve_util/mod.rs"]
mod util;

use std::time::Duration;

use serde_json::{json, Value};
use util::*;

fn assert_error(status: u16, body: &Value, want: u16, field: Option<&str>, what: &str) {
    assert_eq!(status, want, "{what}: {body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{what}: {body}"
    );
    assert!(
        body.get("field").is_some() && body.get("hint").is_some(),
        "{what}: {body}"
    );
    if let Some(f) = field {
        assert_eq!(body["field"], f, "{what}: {body}");
    }
}

#[test]
fn subject_job_images_events_and_cache_hits() {
    let s = Server::start(&[]);
    let events = sse(&s, "/api/events");
    let (ev, _) = events.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(ev, "ready");

    let pngs = subject_pngs(1, 2);
    let (status, subj) = upload(&s, &pngs);
    assert_eq!(status, 201, "{subj}");
    let id = subj["subject_id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    assert_eq!(subj["images"], 2);
    assert_eq!(subj["cached"], false);
    assert!(subj["lora_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(system(&s)["cache"]["hypernet_calls"], 1);

    // Same images → same id, no hypernetwork call.
    let (status, again) = upload(&s, &pngs);
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["subject_id"], id.as_str());
    assert_eq!(again["cached"], true);
    let sys = system(&s);
    assert_eq!(sys["cache"]["hypernet_calls"], 1, "{sys}");
    assert_eq!(sys["cache"]["hits"], 1, "{sys}");
    assert_eq!(sys["cache"]["entries"], 1, "{sys}");
    // Other images (or another order) → another subject.
    let (_, other) = upload(&s, &[pngs[1].clone(), pngs[0].clone()]);
    assert_ne!(other["subject_id"], id.as_str());
    assert_eq!(system(&s)["cache"]["hypernet_calls"], 2);

    let (status, got) = get_json(&s, &format!("/api/subjects/{id}"));
    assert_eq!(status, 200);
    assert_eq!(got["images"], 2);
    for (format, key) in [("peft", "unet."), ("kohya", "lora_unet_")] {
        let r = client()
            .get(s.url(&format!(
                "/api/subjects/{id}/lora.safetensors?format={format}"
            )))
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let bytes = r.bytes().unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert!(st.names().iter().all(|n| n.starts_with(key)), "{format}");
        assert_eq!(
            st.names().len(),
            2 * 21 + if format == "kohya" { 21 } else { 0 }
        );
    }

    let (status, job) = post_json(
        &s,
        "/api/jobs",
        &json!({"subject_id": id, "prompt": "a sks creature wearing a hat on a sky background",
                "generic_prompt": "a creature wearing a hat on a sky background", "kappa": 1.2,
                "steps": 3, "seed": 11, "count": 2}),
    );
    assert_eq!(status, 202, "{job}");
    assert!(job["position"].as_u64().unwrap() >= 1);
    let jid = job["job_id"].as_str().unwrap().to_string();
    let done = wait_job(&s, &jid);
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["params"]["seed"], 11);
    assert_eq!(done["params"]["kappa"], 1.2);
    assert_eq!(done["params"]["steps"], 3);
    assert_eq!(done["step"], 3);
    let urls = done["images"].as_array().unwrap();
    assert_eq!(urls.len(), 2);
    let mut pixels = Vec::new();
    for url in urls {
        let r = client().get(s.url(url.as_str().unwrap())).send().unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(r.headers()["content-type"], "image/png");
        let bytes = r.bytes().unwrap();
        let (w, h, rgb) = decode_png(&bytes);
        assert_eq!((w, h), (32, 32));
        let meta: Value =
            serde_json::from_str(&loracast::serve::png::read_text(&bytes, "parameters").unwrap())
                .unwrap();
        assert_eq!(meta["job_id"], jid.as_str());
        assert_eq!(meta["seed"], 11);
        assert_eq!(
            meta["prompt"],
            "a sks creature wearing a hat on a sky background"
        );
        pixels.push(rgb);
    }
    assert_ne!(pixels[0], pixels[1], "two images of one batch differ");

    // The event stream told this job's whole story, in order.
    let mut kinds = Vec::new();
    while let Ok((kind, data)) = events.recv_timeout(Duration::from_secs(10)) {
        if data["job_id"] == jid.as_str() {
            kinds.push(kind.clone());
            if kind == "done" {
                assert_eq!(data["images"].as_array().unwrap().len(), 2);
                break;
            }
        }
    }
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("queued"),
        "{kinds:?}"
    );
    assert_eq!(
        kinds.get(1).map(String::as_str),
        Some("started"),
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| *k == "progress").count(),
        3,
        "{kinds:?}"
    );
    assert_eq!(kinds.last().map(String::as_str), Some("done"), "{kinds:?}");

    // A job without a subject runs the base model; the random seed is reported.
    let (status, base) = post_json(
        &s,
        "/api/jobs",
        &json!({"prompt": "a creature", "steps": 2, "seed": -1}),
    );
    assert_eq!(status, 202, "{base}");
    let base = wait_job(&s, base["job_id"].as_str().unwrap());
    assert_eq!(base["state"], "done");
    assert!(base["params"]["seed"].as_u64().is_some());

    let (status, del) = client()
        .delete(s.url(&format!("/api/subjects/{id}")))
        .send()
        .map(|r| (r.status().as_u16(), r.json::<Value>().unwrap()))
        .unwrap();
    assert_eq!(status, 200, "{del}");
    assert_eq!(get_json(&s, &format!("/api/subjects/{id}")).0, 404);
    // The finished job keeps its images.
    assert_eq!(
        client()
            .get(s.url(urls[0].as_str().unwrap()))
            .send()
            .unwrap()
            .status(),
        200
    );
    assert!(s.stop().success());
}

#[test]
fn job_reproduces_cli_generate_and_sweep_rows_kappa() {
    let tmp = tempfile::tempdir().unwrap();
    let pngs = subject_pngs(2, 2);
    let paths = write_pngs(tmp.path(), &pngs);
    let s = Server::start(&[]);
    let (_, subj) = upload(&s, &pngs);
    let id = subj["subject_id"].as_str().unwrap().to_string();
    let prompt = "a sks creature wearing a scarf on a night background";
    let generic = "a creature wearing a scarf on a night background";
    let (_, job) = post_json(
        &s,
        "/api/jobs",
        &json!({"subject_id": id, "prompt": prompt, "generic_prompt": generic, "kappa": 1.5,
                "steps": 4, "seed": 7, "scheduler": "euler-a"}),
    );
    let job = wait_job(&s, job["job_id"].as_str().unwrap());
    assert_eq!(job["state"], "done", "{job}");
    let served = client()
        .get(s.url(job["images"][0].as_str().unwrap()))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    let served_lora = client()
        .get(s.url(&format!("/api/subjects/{id}/lora.safetensors")))
        .send()
        .unwrap()
        .bytes()
        .unwrap();

    // The CLI: personalize the same images, generate with the same parameters.
    let lora = tmp.path().join("lora.safetensors");
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["personalize", "--hypernet", "toy", "--out"])
        .arg(&lora);
    for p in &paths {
        cmd.arg("--image").arg(p);
    }
    assert!(cmd.status().unwrap().success());
    assert_eq!(
        std::fs::read(&lora).unwrap(),
        served_lora.as_ref(),
        "the same LoRA file"
    );
    let out = tmp.path().join("cli.png");
    let st = std::process::Command::new(BIN)
        .args([
            "generate",
            "--base",
            "toy",
            "--prompt",
            prompt,
            "--generic-prompt",
            generic,
        ])
        .args([
            "--kappa",
            "1.5",
            "--steps",
            "4",
            "--seed",
            "7",
            "--scheduler",
            "euler-a",
        ])
        .arg("--lora")
        .arg(&lora)
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        decode_png(&std::fs::read(&out).unwrap()),
        decode_png(&served),
        "serve's job and `loracast generate` give the same pixels for the seed"
    );

    // A κ sweep: one image per κ, one seed; κ 0 and κ 2 differ.
    let (status, sweep) = post_json(
        &s,
        "/api/jobs",
        &json!({"subject_id": id, "prompt": prompt, "generic_prompt": generic,
                "kappas": [0.0, 1.0, 2.0], "steps": 3, "seed": 5}),
    );
    assert_eq!(status, 202, "{sweep}");
    let sweep = wait_job(&s, sweep["job_id"].as_str().unwrap());
    assert_eq!(sweep["state"], "done", "{sweep}");
    assert_eq!(sweep["kind"], "sweep");
    assert_eq!(sweep["total"], 9);
    let imgs: Vec<_> = sweep["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            client()
                .get(s.url(u.as_str().unwrap()))
                .send()
                .unwrap()
                .bytes()
                .unwrap()
        })
        .collect();
    assert_eq!(imgs.len(), 3);
    for (bytes, k) in imgs.iter().zip([0.0, 1.0, 2.0]) {
        let meta: Value =
            serde_json::from_str(&loracast::serve::png::read_text(bytes, "parameters").unwrap())
                .unwrap();
        assert_eq!(meta["kappa"], k);
        assert_eq!(meta["seed"], 5);
    }
    assert_ne!(decode_png(&imgs[0]).2, decode_png(&imgs[2]).2);
    // The sweep's κ = 1 image is the plain job's image at κ = 1.
    let (_, one) = post_json(
        &s,
        "/api/jobs",
        &json!({"subject_id": id, "prompt": prompt, "generic_prompt": generic, "kappa": 1.0,
                "steps": 3, "seed": 5}),
    );
    let one = wait_job(&s, one["job_id"].as_str().unwrap());
    let one = client()
        .get(s.url(one["images"][0].as_str().unwrap()))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert_eq!(decode_png(&one), decode_png(&imgs[1]));
}

#[test]
fn cancel_and_queue_full() {
    let s = Server::start(&["--queue", "2"]);
    let long = json!({"prompt": "a creature", "steps": 150, "width": 64, "height": 64, "seed": 1});
    let (status, a) = post_json(&s, "/api/jobs", &long);
    assert_eq!(status, 202, "{a}");
    let a = a["job_id"].as_str().unwrap().to_string();
    wait_until(&s, &a, |j| {
        j["state"] == "running" && j["step"].as_u64() >= Some(1)
    });
    let mut queued = Vec::new();
    let mut full = None;
    for _ in 0..4 {
        let r = client()
            .post(s.url("/api/jobs"))
            .json(&long)
            .send()
            .unwrap();
        let status = r.status().as_u16();
        let retry = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        let body: Value = r.json().unwrap();
        match status {
            202 => queued.push(body["job_id"].as_str().unwrap().to_string()),
            503 => full = Some((retry, body)),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(queued.len(), 2, "a queue of 2 takes 2 while one runs");
    let (retry, body) = full.expect("a full queue answers 503");
    assert!(retry.unwrap().parse::<u64>().unwrap() >= 1);
    assert_error(503, &body, 503, None, "queue full");
    assert!(system(&s)["jobs"]["rejected_full"].as_u64().unwrap() >= 1);
    assert_eq!(
        get_json(&s, &format!("/api/jobs/{}", queued[1])).1["position"],
        2
    );

    // Cancel a queued job: immediately canceled, never runs.
    let r = client()
        .delete(s.url(&format!("/api/jobs/{}", queued[0])))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        get_json(&s, &format!("/api/jobs/{}", queued[0])).1["state"],
        "canceled"
    );
    assert_eq!(
        get_json(&s, &format!("/api/jobs/{}", queued[1])).1["position"],
        1
    );
    // Cancel the running job: it stops between steps, with no image.
    let r = client()
        .delete(s.url(&format!("/api/jobs/{a}")))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let done = wait_job(&s, &a);
    assert_eq!(done["state"], "canceled", "{done}");
    assert!(done["step"].as_u64().unwrap() < 150, "{done}");
    assert_eq!(done["images"].as_array().unwrap().len(), 0);
    let (status, body) = get_json(&s, &format!("/api/jobs/{a}/images/0.png"));
    assert_error(status, &body, 404, None, "image of a canceled job");
    // The next queued job now runs; cancel it too. A finished job cannot be cancelled.
    let b = &queued[1];
    wait_until(&s, b, |j| j["state"] != "queued");
    client()
        .delete(s.url(&format!("/api/jobs/{b}")))
        .send()
        .unwrap();
    assert_eq!(wait_job(&s, b)["state"], "canceled");
    let r = client()
        .delete(s.url(&format!("/api/jobs/{b}")))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 409);
    assert!(system(&s)["jobs"]["canceled"].as_u64().unwrap() >= 3);
}

#[test]
fn bad_inputs_answer_their_status_as_json() {
    let s = Server::start(&[
        "--max-image-bytes",
        "200000",
        "--max-upload-bytes",
        "300000",
    ]);
    let c = client();
    let pngs = subject_pngs(3, 1);
    let (_, subj) = upload(&s, &pngs);
    let sid = subj["subject_id"].as_str().unwrap().to_string();
    let send = |r: reqwest::blocking::RequestBuilder| {
        let r = r.send().unwrap();
        let st = r.status().as_u16();
        let text = r.text().unwrap();
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("status {st}: not JSON: {text:?}"));
        (st, body)
    };

    // POST /api/jobs
    let (st, b) = send(
        c.post(s.url("/api/jobs"))
            .header("content-type", "text/plain")
            .body("{}"),
    );
    assert_error(st, &b, 415, None, "text/plain job");
    let (st, b) = send(
        c.post(s.url("/api/jobs"))
            .header("content-type", "application/json")
            .body("{\"prompt\": "),
    );
    assert_error(st, &b, 400, None, "broken JSON");
    let big = json!({"prompt": "x".repeat(70_000)});
    let (st, b) = send(c.post(s.url("/api/jobs")).json(&big));
    assert_error(st, &b, 413, None, "JSON over 64 KB");
    let unknown = "0123456789abcdef0123456789abcdef";
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!([1, 2]), 422, ""),
        (json!({"prompt": ""}), 422, "prompt"),
        (json!({"steps": 3}), 422, "prompt"),
        (json!({"prompt": 5}), 422, "prompt"),
        (json!({"prompt": "a", "steps": 0}), 422, "steps"),
        (json!({"prompt": "a", "steps": 100000}), 422, "steps"),
        (json!({"prompt": "a", "steps": "many"}), 422, "steps"),
        (json!({"prompt": "a", "width": 30}), 422, "width"),
        (json!({"prompt": "a", "height": 4096}), 422, "height"),
        (json!({"prompt": "a", "count": 0}), 422, "count"),
        (json!({"prompt": "a", "count": 99}), 422, "count"),
        (json!({"prompt": "a", "seed": -5}), 422, "seed"),
        (json!({"prompt": "a", "seed": 1.5}), 422, "seed"),
        (
            json!({"prompt": "a", "guidance_scale": "high"}),
            422,
            "guidance_scale",
        ),
        (
            json!({"prompt": "a", "scheduler": "nope"}),
            422,
            "scheduler",
        ),
        (json!({"prompt": "a", "colour": "red"}), 422, "colour"),
        (
            json!({"prompt": "a", "generic_prompt": "b"}),
            422,
            "generic_prompt",
        ),
        (
            json!({"prompt": "a", "subject_id": sid, "kappa": 1.0}),
            422,
            "kappa",
        ),
        (
            json!({"prompt": "a", "subject_id": sid, "generic_prompt": "b", "kappa": 3.0}),
            422,
            "kappa",
        ),
        (
            json!({"prompt": "a", "subject_id": sid, "generic_prompt": "b", "kappas": []}),
            422,
            "kappas",
        ),
        (
            json!({"prompt": "a", "subject_id": sid, "generic_prompt": "b", "kappas": [0, 5]}),
            422,
            "kappas",
        ),
        (
            json!({"prompt": "a", "subject_id": sid, "kappas": [0, 1]}),
            422,
            "kappas",
        ),
        (
            json!({"prompt": "a", "subject_id": sid, "generic_prompt": "b", "kappas": [1], "count": 2}),
            422,
            "count",
        ),
        (
            json!({"prompt": "a", "subject_id": unknown}),
            404,
            "subject_id",
        ),
        (
            json!({"prompt": "a", "subject_id": "../../etc/passwd"}),
            404,
            "subject_id",
        ),
    ];
    for (body, want, field) in &cases {
        let (st, b) = send(c.post(s.url("/api/jobs")).json(body));
        let field = (!field.is_empty()).then_some(*field);
        assert_error(st, &b, *want, field, &body.to_string());
    }
    assert_eq!(system(&s)["jobs"]["accepted"], 0, "no bad job was queued");

    // Unknown ids and endpoints, wrong methods, bad query values.
    for path in [
        format!("/api/jobs/{unknown}"),
        "/api/jobs/nope".into(),
        format!("/api/jobs/{unknown}/images/0.png"),
        "/api/subjects/zzz".into(),
        format!("/api/subjects/{unknown}/lora.safetensors"),
        "/api/nothing".into(),
    ] {
        let (st, b) = send(c.get(s.url(&path)));
        assert_error(st, &b, 404, None, &path);
    }
    let (st, b) = send(c.get(s.url(&format!("/api/subjects/{sid}/lora.safetensors?format=ckpt"))));
    assert_error(st, &b, 422, Some("format"), "lora format");
    let (st, b) = send(c.put(s.url("/api/jobs")));
    assert_error(st, &b, 405, None, "PUT /api/jobs");

    // POST /api/subjects
    let (st, b) = send(c.post(s.url("/api/subjects")).json(&json!({"images": []})));
    assert_error(st, &b, 415, None, "JSON upload");
    let empty = reqwest::blocking::multipart::Form::new().text("note", "hi");
    let (st, b) = send(c.post(s.url("/api/subjects")).multipart(empty));
    assert_error(st, &b, 422, Some("note"), "unknown form field");
    let none = reqwest::blocking::multipart::Form::new();
    let (st, b) = send(c.post(s.url("/api/subjects")).multipart(none));
    assert_error(st, &b, 422, Some("images"), "an empty form");
    // What a browser sends for an empty file input: one empty part without a file name.
    let empty_file = reqwest::blocking::multipart::Form::new().part(
        "images",
        reqwest::blocking::multipart::Part::bytes(Vec::new()).file_name(""),
    );
    let (st, b) = send(c.post(s.url("/api/subjects")).multipart(empty_file));
    assert_error(st, &b, 422, Some("images"), "no images");
    let (st, b) = send(
        c.post(s.url("/api/subjects"))
            .multipart(form(&[b"GIF89a....".to_vec()])),
    );
    assert_error(st, &b, 415, Some("images[0]"), "a GIF");
    let mut truncated = pngs[0].clone();
    truncated.truncate(60);
    let (st, b) = send(
        c.post(s.url("/api/subjects"))
            .multipart(form(&[pngs[0].clone(), truncated])),
    );
    assert_error(st, &b, 422, Some("images[1]"), "truncated PNG");
    let tiny = {
        let img = image::RgbImage::new(8, 8);
        let mut buf = std::io::Cursor::new(Vec::new());
        img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
        buf.into_inner()
    };
    let (st, b) = send(c.post(s.url("/api/subjects")).multipart(form(&[tiny])));
    assert_error(st, &b, 422, Some("images[0]"), "8×8 image");
    let seventeen = vec![pngs[0].clone(); 17];
    let (st, b) = send(c.post(s.url("/api/subjects")).multipart(form(&seventeen)));
    assert_error(st, &b, 422, Some("images"), "17 images");
    let mut huge = b"\x89PNG\r\n\x1a\n".to_vec();
    huge.resize(250_000, 0);
    let (st, b) = send(c.post(s.url("/api/subjects")).multipart(form(&[huge])));
    assert_error(
        st,
        &b,
        413,
        Some("images[0]"),
        "image over --max-image-bytes",
    );
    let mut part = b"\x89PNG\r\n\x1a\n".to_vec();
    part.resize(160_000, 0);
    let (st, b) = send(
        c.post(s.url("/api/subjects"))
            .multipart(form(&[part.clone(), part])),
    );
    assert_error(st, &b, 413, None, "upload over --max-upload-bytes");
    assert_eq!(
        system(&s)["cache"]["hypernet_calls"],
        1,
        "only the good upload ran"
    );

    // Response headers.
    for path in ["/", "/api/system", "/api/nothing"] {
        let r = c.get(s.url(path)).send().unwrap();
        let h = r.headers();
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert!(h["content-security-policy"]
            .to_str()
            .unwrap()
            .starts_with("default-src 'self'"));
        assert_eq!(h["x-frame-options"], "DENY");
    }
    // The server still works.
    let (st, _) = post_json(
        &s,
        "/api/jobs",
        &json!({"prompt": "a creature", "steps": 1}),
    );
    assert_eq!(st, 202);
}

#[test]
fn host_origin_and_token_guard() {
    let c = client();
    // DNS rebinding and cross-site requests.
    let s = Server::start(&[]);
    let (st, b) = {
        let r = c
            .get(s.url("/api/system"))
            .header("host", "evil.example:80")
            .send()
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    assert_error(st, &b, 403, None, "foreign Host");
    let job = json!({"prompt": "a creature", "steps": 1});
    let r = c
        .post(s.url("/api/jobs"))
        .header("origin", "http://evil.example")
        .json(&job)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let r = c
        .post(s.url("/api/subjects"))
        .header("sec-fetch-site", "cross-site")
        .multipart(form(&subject_pngs(4, 1)))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let origin = s.base.clone();
    let r = c
        .post(s.url("/api/jobs"))
        .header("origin", origin)
        .json(&job)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 202, "same-origin POST");
    assert_eq!(
        c.get(s.url("/"))
            .header("host", "localhost:1")
            .send()
            .unwrap()
            .status(),
        200
    );
    assert!(s.stop().success());

    // Off loopback without a token: refused at start.
    let out = std::process::Command::new(BIN)
        .args(["serve", "--bind", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--token-file"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");

    // With a token: required everywhere but /api/health, bearer or the page's cookie.
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("token");
    std::fs::write(&file, "s3cret-token-0123456789\n").unwrap();
    std::fs::write(tmp.path().join("short"), "abc").unwrap();
    let bad = Server::try_start(&["--token-file", tmp.path().join("short").to_str().unwrap()]);
    assert!(bad.is_err());
    let s = Server::start(&[
        "--bind",
        "0.0.0.0:0",
        "--token-file",
        file.to_str().unwrap(),
    ]);
    let nc = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    assert_eq!(nc.get(s.url("/api/health")).send().unwrap().status(), 200);
    for path in ["/", "/api/system", "/api/events"] {
        let r = nc.get(s.url(path)).send().unwrap();
        assert_eq!(r.status().as_u16(), 401, "{path}");
        let b: Value = r.json().unwrap();
        assert_error(401, &b, 401, None, path);
    }
    let r = nc
        .get(s.url("/api/system"))
        .bearer_auth("wrong-token-0123456789")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = nc
        .get(s.url("/api/system"))
        .bearer_auth("s3cret-token-0123456789")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = nc.post(s.url("/api/jobs")).json(&job).send().unwrap();
    assert_eq!(r.status().as_u16(), 401, "POST without the token");
    // The page's one-time sign-in: /?token=T sets an HttpOnly cookie and redirects to /.
    let r = nc
        .get(s.url("/?token=s3cret-token-0123456789"))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_string();
    let r = nc
        .get(s.url("/"))
        .header("cookie", pair.clone())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = nc
        .post(s.url("/api/jobs"))
        .header("cookie", pair)
        .json(&job)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let r = nc.get(s.url("/?token=nope")).send().unwrap();
    assert_eq!(r.status().as_u16(), 401);
}

#[test]
fn state_dir_keeps_subjects_and_images_across_a_restart_and_shutdown_writes_nothing_half_done() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let dir_s = dir.to_str().unwrap();
    let pngs = subject_pngs(5, 3);
    let s = Server::start(&["--state-dir", dir_s]);
    let (st, subj) = upload(&s, &pngs);
    assert_eq!(st, 201);
    let id = subj["subject_id"].as_str().unwrap().to_string();
    let (_, job) = post_json(
        &s,
        "/api/jobs",
        &json!({"subject_id": id, "prompt": "a sks creature", "steps": 2, "seed": 3}),
    );
    let jid = job["job_id"].as_str().unwrap().to_string();
    let job = wait_job(&s, &jid);
    let url = job["images"][0].as_str().unwrap().to_string();
    let before = client().get(s.url(&url)).send().unwrap().bytes().unwrap();
    // A long job when SIGTERM arrives: stopped, nothing of it written.
    let (_, long) = post_json(
        &s,
        "/api/jobs",
        &json!({"prompt": "a creature", "steps": 150, "width": 64, "height": 64}),
    );
    let lid = long["job_id"].as_str().unwrap().to_string();
    wait_until(&s, &lid, |j| j["step"].as_u64() >= Some(1));
    assert!(s.stop().success(), "SIGTERM exits cleanly");
    assert!(!dir.join("jobs").join(&lid).join("job.json").exists());
    assert!(!dir.join("jobs").join(&lid).join("0.png").exists());
    // write_atomic's temp files are ".NAME.tmpPID" beside their target.
    let leftovers: Vec<_> = walk(&dir)
        .into_iter()
        .filter(|p| p.rsplit('/').next().is_some_and(|n| n.starts_with('.')))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let s = Server::start(&["--state-dir", dir_s]);
    let (st, again) = upload(&s, &pngs);
    assert_eq!(st, 200, "{again}");
    assert_eq!(again["subject_id"], id.as_str());
    assert_eq!(again["cached"], true);
    assert_eq!(
        system(&s)["cache"]["hypernet_calls"],
        0,
        "no hypernetwork call after restart"
    );
    assert_eq!(get_json(&s, &format!("/api/subjects/{id}")).0, 200);
    let (st, job) = get_json(&s, &format!("/api/jobs/{jid}"));
    assert_eq!(st, 200);
    assert_eq!(job["state"], "done");
    assert_eq!(job["params"]["seed"], 3);
    let after = client().get(s.url(&url)).send().unwrap().bytes().unwrap();
    assert_eq!(before, after, "the same image bytes after the restart");
    assert_eq!(
        get_json(&s, &format!("/api/jobs/{lid}")).0,
        404,
        "the stopped job is gone"
    );
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}
