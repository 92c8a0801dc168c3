//! The HTTP server end to end: the built binary on a loopback port, a real HTTP client.
//!
//! Expected tokens come from `reference.json` (transformers/PyTorch) and from `vlmserve ask`.
//! Every server is started by its test and stopped by it (killed on drop).

mod common;
#[path = "http/fuzz.rs"]
mod fuzz;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

const MODEL: &str = "idefics3-tiny";

fn fixture_dir() -> PathBuf {
    common::root().join("tests/fixtures/idefics3-tiny")
}

fn package_dir() -> PathBuf {
    fixture_dir().join("package")
}

fn image_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixture_dir().join(name)).unwrap()
}

fn data_url(bytes: &[u8]) -> String {
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .proxy(None)
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// A running `vlmserve serve`; killed when dropped.
struct Server {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

/// A config with the fixture model (or `package`) and `extra` TOML appended.
fn config_toml(package: &Path, extra: &str) -> String {
    format!(
        "[[models]]\nname = \"{MODEL}\"\npath = {:?}\n\n[server]\nhttp_workers = 2\n{extra}\n",
        package.display().to_string()
    )
}

impl Server {
    fn start(toml: &str) -> Server {
        let server = Self::spawn(toml);
        server.wait_ready();
        server
    }

    fn spawn(toml: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(&config, toml).unwrap();
        let mut child = common::vlmserve()
            .args(["serve", "--port", "0", "--host", "127.0.0.1", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        let base = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(base) => base,
            Err(_) => {
                let _ = child.kill();
                panic!("server did not print its address; status {:?}", child.wait());
            }
        };
        Server { child, base, _dir: dir }
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Ok(r) = agent().get(self.url("/ready")).call()
                && r.status() == 200
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("server not ready within 120 s");
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }

    /// POST JSON; returns status, headers of interest and the body as JSON (or a string).
    /// A chat completion request whose response the caller reads as it arrives (streaming).
    fn chat_response(&self, request: &Value) -> ureq::http::Response<ureq::Body> {
        agent()
            .post(self.url("/v1/chat/completions"))
            .header("Content-Type", "application/json")
            .send(request.to_string())
            .unwrap()
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, _, body) = self.post_raw(path, &body.to_string(), "application/json", &[]);
        (status, body)
    }

    fn post_raw(
        &self,
        path: &str,
        body: &str,
        content_type: &str,
        headers: &[(&str, &str)],
    ) -> (u16, Option<String>, Value) {
        let mut request = agent().post(self.url(path)).header("Content-Type", content_type);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let mut response = request.send(body).unwrap();
        let status = response.status().as_u16();
        let retry = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
        let text = response.body_mut().read_to_string().unwrap();
        (status, retry, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    fn get(&self, path: &str) -> (u16, String) {
        let mut response = agent().get(self.url(path)).call().unwrap();
        (response.status().as_u16(), response.body_mut().read_to_string().unwrap())
    }

    /// A counter or gauge from /metrics, summed over series whose labels contain `labels`.
    fn metric(&self, name: &str, labels: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .filter(|l| {
                l.starts_with(name)
                    && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' '))
                    && l.contains(labels)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Poll `/metrics` until `name{labels}` satisfies `done`; fails with `what` after `deadline`.
    fn wait_for_metric(&self, name: &str, labels: &str, done: impl Fn(f64) -> bool, deadline: Instant, what: &str) {
        while !done(self.metric(name, labels)) {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status once the process ends, failing the test if that takes over `within`.
    fn wait_for_exit(&mut self, within: Duration, what: &str) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn user_with_images(images: &[Vec<u8>], text: &str) -> Value {
    let mut content: Vec<Value> =
        images.iter().map(|b| json!({"type": "image_url", "image_url": {"url": data_url(b)}})).collect();
    content.push(json!({"type": "text", "text": text}));
    json!({"role": "user", "content": content})
}

fn greedy(messages: Value, max_tokens: usize) -> Value {
    json!({"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": max_tokens, "return_token_ids": true})
}

fn token_ids(body: &Value) -> Vec<u32> {
    body["choices"][0]["token_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"))
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn text(body: &Value) -> String {
    body["choices"][0]["message"]["content"].as_str().unwrap_or_else(|| panic!("{body}")).to_string()
}

fn assert_error(status: u16, body: &Value, expect_status: u16, expect_code: &str) {
    assert_eq!(status, expect_status, "{body}");
    let error = &body["error"];
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(error["type"].is_string(), "{body}");
    assert!(error.get("param").is_some(), "{body}");
    assert_eq!(error["code"], expect_code, "{body}");
}

/// `vlmserve ask --json` on the same inputs.
fn ask(images: &[&str], prompt: &str, max_tokens: usize) -> Value {
    let mut command = common::vlmserve();
    command.args(["ask", "--model"]).arg(package_dir()).args(["--max-new-tokens", &max_tokens.to_string(), "--json"]);
    for image in images {
        command.arg("--image").arg(fixture_dir().join(image));
    }
    let output = command.arg(prompt).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Read an SSE response to the end: the `data:` payloads in order.
fn read_events(reader: impl Read) -> Vec<String> {
    BufReader::new(reader)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

fn stream_text(events: &[String]) -> (String, Option<String>, Option<Value>) {
    let mut text = String::new();
    let mut finish = None;
    let mut usage = None;
    for event in events.iter().filter(|e| *e != "[DONE]") {
        let chunk: Value = serde_json::from_str(event).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk", "{chunk}");
        if let Some(choice) = chunk["choices"].get(0) {
            text.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
            if let Some(f) = choice["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
        if !chunk["usage"].is_null() {
            usage = Some(chunk["usage"].clone());
        }
    }
    (text, finish, usage)
}

#[test]
fn chat_matches_reference_and_ask_with_one_and_two_images() {
    let reference = &common::references()[0];
    let server = Server::start(&config_toml(&package_dir(), ""));
    for name in ["one_image", "two_images", "text_only"] {
        let case = reference.cases.iter().find(|c| c.name == name).unwrap();
        let images: Vec<Vec<u8>> = case.images.iter().map(|p| image_bytes(p)).collect();
        let question = case.messages[0]["content"].as_array().unwrap().iter().find_map(|p| p["text"].as_str()).unwrap();
        let message = if images.is_empty() {
            json!({"role": "user", "content": question})
        } else {
            user_with_images(&images, question)
        };
        let (status, body) = server.post("/v1/chat/completions", &greedy(json!([message]), reference.max_new_tokens));
        assert_eq!(status, 200, "{body}");
        assert_eq!(token_ids(&body), case.generated_ids, "{name}: tokens differ from transformers");
        assert_eq!(body["usage"]["prompt_tokens"], case.input_ids.len(), "{name}");
        assert_eq!(body["usage"]["completion_tokens"], case.generated_ids.len(), "{name}");
        assert_eq!(body["object"], "chat.completion");
        if name != "text_only" {
            let cli =
                ask(&case.images.iter().map(String::as_str).collect::<Vec<_>>(), question, reference.max_new_tokens);
            assert_eq!(text(&body), cli["text"].as_str().unwrap(), "{name}: text differs from `vlmserve ask`");
            assert_eq!(json!(token_ids(&body)), cli["token_ids"], "{name}");
            assert_eq!(body["choices"][0]["finish_reason"], cli["finish_reason"], "{name}");
        }
    }
}

#[test]
fn streaming_concatenates_to_the_non_streaming_text() {
    let server = Server::start(&config_toml(&package_dir(), ""));
    let images = vec![image_bytes("images/two_images_0.png"), image_bytes("images/two_images_1.png")];
    let messages = json!([{"role": "system", "content": "Answer briefly."}, user_with_images(&images, "Compare these two images.")]);
    let (status, whole) = server.post("/v1/chat/completions", &greedy(messages.clone(), 40));
    assert_eq!(status, 200, "{whole}");
    let mut request = greedy(messages, 40);
    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    let response = server.chat_response(&request);
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("content-type").unwrap().to_str().unwrap().starts_with("text/event-stream"));
    let events = read_events(response.into_body().into_reader());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let (streamed, finish, usage) = stream_text(&events);
    assert_eq!(streamed, text(&whole));
    assert_eq!(finish.as_deref(), whole["choices"][0]["finish_reason"].as_str());
    let usage = usage.unwrap();
    assert_eq!(usage, whole["usage"]);
    // The sample's last chunk carries the server's timings, as the whole answer's choice does.
    let last = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find(|c| !c["choices"][0]["finish_reason"].is_null())
        .unwrap();
    for timings in [&last["choices"][0]["timings"], &whole["choices"][0]["timings"]] {
        let steps = usage["completion_tokens"].as_u64().unwrap() - 1;
        assert_eq!(timings["decode_steps"], steps, "{timings}");
        for stage in ["prefill_s", "time_to_first_token_s", "decode_s", "decode_tokens_per_second"] {
            assert!(timings[stage].as_f64().unwrap() > 0.0, "{stage}: {timings}");
        }
        assert!(timings["image_decode_s"].as_f64().unwrap() >= 0.0, "{timings}");
    }
    // The stream came second: its images' features came from the cache.
    assert!(whole["choices"][0]["timings"]["vision_s"].as_f64().unwrap() > 0.0);
    assert_eq!(last["choices"][0]["timings"]["vision_s"], 0.0);
}

/// Text-only, one-image and two-image requests of different lengths and token budgets.
fn mixed_requests(n: usize) -> Vec<Value> {
    let one = image_bytes("images/one_image_0.png");
    let tiny = image_bytes("images/tiny_image_0.png");
    (0..n)
        .map(|i| {
            let question = format!("Question number {i}: what is here?{}", " Look closely.".repeat(i % 4));
            let message = match i % 3 {
                0 => json!({"role": "user", "content": question}),
                1 => user_with_images(std::slice::from_ref(&one), &question),
                _ => user_with_images(&[tiny.clone(), one.clone()], &question),
            };
            greedy(json!([message]), 12 + i)
        })
        .collect()
}

fn post_all(server: &Server, requests: &[Value]) -> Vec<(u16, Value)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = requests.iter().map(|r| s.spawn(|| server.post("/v1/chat/completions", r))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Mean sequences per decode step since `before` (sum, count) of the batch-size histogram.
fn mean_batch_since(server: &Server, before: (f64, f64)) -> f64 {
    let sum = server.metric("vlmserve_batch_size_sum", "") - before.0;
    let count = server.metric("vlmserve_batch_size_count", "") - before.1;
    sum / count
}

fn batch_histogram(server: &Server) -> (f64, f64) {
    (server.metric("vlmserve_batch_size_sum", ""), server.metric("vlmserve_batch_size_count", ""))
}

#[test]
fn concurrent_requests_each_equal_their_sequential_result() {
    // One worker, so concurrent requests must share its decode steps; small prefill chunks, so
    // the long image prompts are prefilled between other requests' decode steps.
    let server = Server::start(&config_toml(
        &package_dir(),
        "[scheduler]\nconcurrency = 1\nmax_batch_size = 8\nprefill_chunk_tokens = 96\nqueue_size = 16\n",
    ));
    let requests = mixed_requests(16);
    let sequential: Vec<Value> = requests
        .iter()
        .map(|r| {
            let (status, body) = server.post("/v1/chat/completions", r);
            assert_eq!(status, 200, "{body}");
            body
        })
        .collect();
    let before = batch_histogram(&server);
    // A streaming client that leaves after two tokens, in the middle of the batch.
    let leaver = json!({
        "model": MODEL, "messages": [{"role": "user", "content": "Go on."}], "temperature": 0,
        "max_tokens": 500, "ignore_eos": true, "stream": true,
    });
    let concurrent = std::thread::scope(|s| {
        let leaving = s.spawn(|| {
            let mut reader = BufReader::new(server.chat_response(&leaver).into_body().into_reader());
            let mut line = String::new();
            for _ in 0..4 {
                line.clear();
                reader.read_line(&mut line).unwrap();
            }
        });
        let answers = post_all(&server, &requests);
        leaving.join().unwrap();
        answers
    });
    for (i, ((status, body), expected)) in concurrent.iter().zip(&sequential).enumerate() {
        assert_eq!(*status, 200, "request {i}: {body}");
        assert_eq!(token_ids(body), token_ids(expected), "request {i}");
        assert_eq!(text(body), text(expected), "request {i}");
    }
    let mean = mean_batch_since(&server, before);
    assert!(mean > 2.0, "concurrent requests should share decode steps (mean batch {mean:.2})");
    let deadline = Instant::now() + Duration::from_secs(30);
    server.wait_for_metric(
        "vlmserve_requests_finished_total",
        "reason=\"cancelled\"",
        |v| v >= 1.0,
        deadline,
        "the client that left was not cancelled",
    );
    assert_eq!(server.metric("vlmserve_kv_cache_bytes", ""), 0.0, "an idle worker holds no cache");
    assert!(server.metric("vlmserve_batch_step_duration_seconds_count", "phase=\"prefill\"") > 0.0);
}

#[test]
fn requests_beyond_the_kv_budget_wait_instead_of_failing() {
    // A budget smaller than any request: each runs alone, the others wait in the queue.
    let server = Server::start(&config_toml(
        &package_dir(),
        "[scheduler]\nconcurrency = 1\nmax_batch_size = 8\nmax_kv_bytes = 1\nqueue_size = 16\n",
    ));
    let requests = mixed_requests(4);
    let answers = post_all(&server, &requests);
    for (i, (status, body)) in answers.iter().enumerate() {
        assert_eq!(*status, 200, "request {i}: {body}");
        assert_eq!(body["usage"]["completion_tokens"], 12 + i, "{body}");
    }
    let steps = server.metric("vlmserve_batch_size_count", "");
    let single = server.metric("vlmserve_batch_size_bucket", "le=\"1\"");
    assert!(steps > 0.0 && single == steps, "{single} of {steps} steps had one sequence");
}

/// A PNG of `width` x `height` (black).
fn png(width: u32, height: u32) -> Vec<u8> {
    let image = image::RgbImage::new(width, height);
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// What a web page or a slow client could do: a request naming another host (DNS rebinding)
/// is 403, a POST that is not JSON (a browser's cross-origin "simple" request) is 415, a body
/// not sent in time is 408, and a data URL of another type is 400; the server serves on.
#[test]
fn cross_site_requests_and_slow_bodies_are_refused() {
    let extra = "body_read_timeout_s = 1\nmax_body_bytes = 1000000\nbody_bytes_in_flight_mb = 1";
    let server = Server::start(&config_toml(&package_dir(), extra));
    let hello = json!({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let raw = |head: &str, body: &str| {
        let mut stream = TcpStream::connect(server.addr()).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(stream, "{head}Content-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
        let mut response = String::new();
        let _ = std::io::Read::read_to_string(&mut stream, &mut response);
        response
    };
    let rebound = raw(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: attacker.example:8080\r\nContent-Type: application/json\r\n",
        &hello,
    );
    assert!(rebound.starts_with("HTTP/1.1 403"), "{rebound}");
    assert!(rebound.contains("host_not_allowed"), "{rebound}");
    let models = raw("GET /v1/models HTTP/1.1\r\nHost: attacker.example\r\n", "");
    assert!(models.starts_with("HTTP/1.1 403"), "the listing names folders: {models}");
    let local =
        raw("POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n", &hello);
    assert!(local.starts_with("HTTP/1.1 200"), "{local}");

    for content_type in ["text/plain", "application/x-www-form-urlencoded"] {
        for path in ["/v1/chat/completions", "/v1/responses", "/v1/vqa"] {
            let (s, _, b) = server.post_raw(path, &hello, content_type, &[]);
            assert_error(s, &b, 415, "unsupported_media_type");
        }
    }
    let (s, _, b) = server.post_raw("/v1/chat/completions", &hello, "application/json; charset=utf-8", &[]);
    assert_eq!(s, 200, "{b}");

    // Half a body, then nothing: 408 after body_read_timeout_s, not a held connection.
    let mut stream = TcpStream::connect(server.addr()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let started = Instant::now();
    write!(stream, "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}", hello.len(), &hello[..10]).unwrap();
    let mut head = String::new();
    let _ = BufReader::new(&stream).read_line(&mut head);
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());

    // A large body being read holds its declared size of the bodies budget (1 MiB here): another
    // large one is refused at once (429) rather than read beside it; small ones pass.
    let mut slow = TcpStream::connect(server.addr()).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(slow, "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 900000\r\n\r\n{{").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let big = format!("{{\"model\": \"{MODEL}\", \"pad\": \"{}\"}}", "x".repeat(300_000));
    let (s, retry, b) = server.post_raw("/v1/chat/completions", &big, "application/json", &[]);
    assert_error(s, &b, 429, "overloaded");
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(server.post("/v1/chat/completions", &serde_json::from_str(&hello).unwrap()).0, 200);
    let mut head = String::new();
    let _ = BufReader::new(&slow).read_line(&mut head);
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    let (s, _, b) = server.post_raw("/v1/chat/completions", &big, "application/json", &[]);
    assert_error(s, &b, 400, "invalid_json");

    let text_url = json!({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGVsbG8="}}]}]});
    let (s, b) = server.post("/v1/chat/completions", &text_url);
    assert_error(s, &b, 400, "invalid_image_url");
    assert_eq!(b["error"]["param"], "messages[0].content[0].image_url");
    let (s, b) = server.post("/v1/chat/completions", &serde_json::from_str(&hello).unwrap());
    assert_eq!(s, 200, "{b}");
}

#[test]
fn bad_inputs_get_their_status_and_error_body() {
    let extra = "max_body_bytes = 2000000\nmax_images_per_request = 3\nmax_image_side = 1000\nmax_image_pixels = 500000\n\
                 image_decode_budget_mb = 1\n";
    let server = Server::start(&config_toml(&package_dir(), extra));
    let post = |body: &str| {
        let (status, _, body) = server.post_raw("/v1/chat/completions", body, "application/json", &[]);
        (status, body)
    };
    let chat =
        |content: Value| json!({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": content}]});
    let image_part = |url: String| json!({"type": "image_url", "image_url": {"url": url}});

    let (s, b) = post("{\"model\": ");
    assert_error(s, &b, 400, "invalid_json");
    let (s, b) = post("");
    assert_error(s, &b, 400, "invalid_request");
    let (s, b) = post(&json!({"model": MODEL}).to_string());
    assert_error(s, &b, 400, "invalid_json");
    let (s, b) = post(&json!({"model": MODEL, "messages": "hi"}).to_string());
    assert_error(s, &b, 400, "invalid_json");
    let (s, b) = post(&json!({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}).to_string());
    assert_error(s, &b, 400, "invalid_request");
    let (s, b) = post(&chat(json!([image_part("data:image/png;base64,@@not-base64@@".into())])).to_string());
    assert_error(s, &b, 400, "invalid_base64");
    let (s, b) = post(&chat(json!([image_part(data_url(b"this is not an image at all"))])).to_string());
    assert_error(s, &b, 400, "invalid_image");
    let mut truncated = image_bytes("images/one_image_0.png");
    truncated.truncate(truncated.len() / 2);
    let (s, b) = post(&chat(json!([image_part(data_url(&truncated))])).to_string());
    assert_error(s, &b, 400, "invalid_image");
    let (s, b) = post(&chat(json!([image_part("https://example.com/cat.png".into())])).to_string());
    assert_error(s, &b, 400, "remote_images_disabled");
    // n from 1 to max_batch_size: its samples decode as rows of one batch.
    for n in [0, 100] {
        let mut samples = chat(json!("hi"));
        samples["n"] = json!(n);
        let (s, b) = post(&samples.to_string());
        assert_error(s, &b, 400, "invalid_request");
        assert_eq!(b["error"]["param"], "n");
    }
    let mut hot = chat(json!("hi"));
    hot["temperature"] = json!(-1.0);
    let (s, b) = post(&hot.to_string());
    assert_error(s, &b, 400, "invalid_parameter");
    let mut long = chat(json!("hi"));
    long["max_tokens"] = json!(5000);
    let (s, b) = post(&long.to_string());
    assert_error(s, &b, 400, "context_length_exceeded");
    // Near 2^64: prompt + max_tokens must not wrap past the context checks.
    long["max_tokens"] = json!(u64::MAX - 1);
    let (s, b) = post(&long.to_string());
    assert_error(s, &b, 400, "context_length_exceeded");
    let big_text = "word ".repeat(3000);
    let (s, b) = post(&chat(json!(big_text)).to_string());
    assert_error(s, &b, 400, "context_length_exceeded");
    // Far over the context in bytes: refused before it is tokenized, saying so.
    let huge_text = "word ".repeat(200_000);
    let (s, b) = post(&chat(json!(huge_text)).to_string());
    assert_error(s, &b, 400, "context_length_exceeded");
    assert!(b["error"]["message"].as_str().unwrap().contains("bytes"), "{b}");

    // Over the limits: 413, the image checked from its header.
    let (s, b) = post(&chat(json!([image_part(data_url(&png(1200, 8)))])).to_string());
    assert_error(s, &b, 413, "image_too_large");
    let (s, b) = post(&chat(json!([image_part(data_url(&png(900, 900)))])).to_string());
    assert_error(s, &b, 413, "image_too_large");
    // Within every size limit, but its decoded pixels (500 x 500 x 9 bytes) are over the
    // server's decode budget: refused from the header, before decoding.
    let (s, b) = post(&chat(json!([image_part(data_url(&png(500, 500)))])).to_string());
    assert_error(s, &b, 413, "image_too_large");
    assert!(b["error"]["message"].as_str().unwrap().contains("decode budget"), "{b}");
    let small = image_part(data_url(&png(8, 8)));
    let (s, b) = post(&chat(json!([small.clone(), small.clone(), small.clone(), small])).to_string());
    assert_error(s, &b, 413, "too_many_images");
    // A body declared over the limit is refused from its Content-Length, before it is read.
    let mut stream = TcpStream::connect(server.addr()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(stream, "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 3000000\r\n\r\n{{\"model\"").unwrap();
    let mut head = String::new();
    let _ = BufReader::new(&stream).read_line(&mut head);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    // A body that turns out to be over the limit while read.
    let huge = format!("{{\"model\": \"{MODEL}\", \"messages\": [], \"pad\": \"{}\"}}", "x".repeat(2_100_000));
    let result =
        agent().post(server.url("/v1/chat/completions")).header("Content-Type", "application/json").send(&huge[..]);
    if let Ok(mut response) = result {
        assert_eq!(response.status(), 413);
        let body: Value = serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "body_too_large");
    }

    // Unknown model and route: 404.
    let mut unknown = chat(json!("hi"));
    unknown["model"] = json!("no-such-model");
    let (s, b) = post(&unknown.to_string());
    assert_error(s, &b, 404, "model_not_found");
    let (s, b) = server.post("/v1/nothing", &json!({}));
    assert_error(s, &b, 404, "not_found");
    let (s, body) = server.get("/v1/models/no-such-model");
    assert_eq!(s, 404, "{body}");

    // VQA's own checks.
    let (s, b) = server.post("/v1/vqa", &json!({"image": base64::engine::general_purpose::STANDARD.encode(png(8, 8))}));
    assert_error(s, &b, 400, "invalid_request");
    let (s, b) = server.post("/v1/vqa", &json!({"image": "%%%", "question": "what?"}));
    assert_error(s, &b, 400, "invalid_base64");

    // Nothing above broke the server, and nothing was a 500.
    let (s, b) = post(&chat(json!("still there?")).to_string());
    assert_eq!(s, 200, "{b}");
    assert_eq!(server.metric("vlmserve_http_requests_total", "status=\"500\""), 0.0);
}

#[test]
fn a_model_that_failed_to_load_is_not_ready_503() {
    let broken = tempfile::tempdir().unwrap();
    let toml = format!(
        "{}\n[[models]]\nname = \"broken\"\npath = {:?}\n",
        config_toml(&package_dir(), "exit_on_load_failure = false"),
        broken.path().display().to_string()
    );
    let server = Server::spawn(&toml);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, body) = server.get("/v1/models");
        let models: Value = serde_json::from_str(&body).unwrap();
        let states: Vec<&str> =
            models["data"].as_array().unwrap().iter().map(|m| m["state"].as_str().unwrap()).collect();
        if states.iter().all(|s| *s != "loading") {
            // Listed in configuration order.
            assert_eq!(states, ["ready", "failed"], "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "models still loading: {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, body) = server.get("/ready");
    assert_eq!(status, 503, "{body}");
    let (s, b) = server
        .post("/v1/chat/completions", &json!({"model": "broken", "messages": [{"role": "user", "content": "hi"}]}));
    assert_error(s, &b, 503, "model_not_ready");
    let (s, b) = server.post("/v1/chat/completions", &greedy(json!([{"role": "user", "content": "hi"}]), 3));
    assert_eq!(s, 200, "{b}");
    assert_eq!(server.get("/health").0, 200);
}

#[test]
fn a_full_queue_answers_429_at_once_and_accepted_requests_complete() {
    let server = Server::start(&config_toml(
        &package_dir(),
        "[scheduler]\nconcurrency = 1\nmax_batch_size = 1\nqueue_size = 2\nretry_after_s = 2\n",
    ));
    let long = json!({"model": MODEL, "messages": [{"role": "user", "content": "Count."}], "temperature": 0, "max_tokens": 1500, "ignore_eos": true});
    // All ten leave together, so the burst arrives well within one generation.
    let barrier = std::sync::Barrier::new(10);
    let results: Vec<(u16, Option<String>, Value, Duration)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..10)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let start = Instant::now();
                    let (status, retry, body) =
                        server.post_raw("/v1/chat/completions", &long.to_string(), "application/json", &[]);
                    (status, retry, body, start.elapsed())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok: Vec<_> = results.iter().filter(|r| r.0 == 200).collect();
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert_eq!(ok.len() + refused.len(), 10, "{:?}", results.iter().map(|r| (r.0, &r.2)).collect::<Vec<_>>());
    assert!(!refused.is_empty() && ok.len() <= 3 && !ok.is_empty(), "ok {} refused {}", ok.len(), refused.len());
    for (_, retry, body, _) in &refused {
        assert_eq!(retry.as_deref(), Some("2"));
        assert_error(429, body, 429, "overloaded");
    }
    for (_, _, body, _) in &ok {
        assert_eq!(body["usage"]["completion_tokens"], 1500, "{body}");
    }
    // Refusals do not wait for the running generations.
    let slowest_refusal = refused.iter().map(|r| r.3).max().unwrap();
    let fastest_success = ok.iter().map(|r| r.3).min().unwrap();
    assert!(slowest_refusal < fastest_success, "{slowest_refusal:?} vs {fastest_success:?}");
    assert!(server.metric("vlmserve_requests_rejected_total", "queue_full") >= refused.len() as f64);
}

/// Send a chat request on a raw connection, so the test can close it without reading.
fn send_raw_chat(server: &Server, request: &Value) -> TcpStream {
    let body = request.to_string();
    let mut stream = TcpStream::connect(server.addr()).unwrap();
    write!(
        stream,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    stream
}

#[test]
fn a_client_that_disconnects_mid_stream_stops_its_generation() {
    let server = Server::start(&config_toml(&package_dir(), ""));
    let max_tokens = 2000;
    let request = json!({
        "model": MODEL, "messages": [{"role": "user", "content": "Go on."}], "temperature": 0,
        "max_tokens": max_tokens, "ignore_eos": true, "stream": true,
    });
    let before_tokens = server.metric("vlmserve_generation_tokens_total", "");
    let stream = send_raw_chat(&server, &request);
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    let mut content_chunks = 0;
    while content_chunks < 2 {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "stream ended early");
        if line.starts_with("data: ") && line.contains("\"content\":\"") && !line.contains("\"content\":\"\"") {
            content_chunks += 1;
        }
    }
    stream.shutdown(std::net::Shutdown::Both).unwrap();
    drop(reader);
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(30);
    server.wait_for_metric(
        "vlmserve_requests_finished_total",
        "reason=\"cancelled\"",
        |v| v >= 1.0,
        deadline,
        "generation was not cancelled",
    );
    let generated = server.metric("vlmserve_generation_tokens_total", "") - before_tokens;
    assert!(generated < max_tokens as f64, "generated {generated} tokens after the client left");
    server.wait_for_metric(
        "vlmserve_num_requests_running",
        "",
        |v| v == 0.0,
        deadline,
        "the cancelled request still runs",
    );

    // The same for a non-streaming request: nothing is written until the end, so the server
    // must notice the closed connection by itself.
    let request = json!({
        "model": MODEL, "messages": [{"role": "user", "content": "Go on."}], "temperature": 0,
        "max_tokens": max_tokens, "ignore_eos": true,
    });
    let before_tokens = server.metric("vlmserve_generation_tokens_total", "");
    let stream = send_raw_chat(&server, &request);
    let deadline = Instant::now() + Duration::from_secs(30);
    server.wait_for_metric("vlmserve_num_requests_running", "", |v| v >= 1.0, deadline, "generation did not start");
    drop(stream);
    server.wait_for_metric(
        "vlmserve_requests_finished_total",
        "reason=\"cancelled\"",
        |v| v >= 2.0,
        deadline,
        "non-streaming generation was not cancelled",
    );
    let generated = server.metric("vlmserve_generation_tokens_total", "") - before_tokens;
    assert!(generated < max_tokens as f64, "generated {generated} tokens after the client left");
}

#[test]
fn a_client_that_leaves_while_its_images_are_encoded_is_withdrawn_before_its_first_token() {
    // One tile per step: the leaving request's 68 tiles stay in the encoder for many of the
    // other stream's steps.
    let server = Server::start(&config_toml(&package_dir(), "[scheduler]\nvision_tiles_per_step = 1\n"));
    let stream_request = json!({
        "model": MODEL, "messages": [{"role": "user", "content": "Go on."}], "temperature": 0,
        "max_tokens": 600, "ignore_eos": true, "return_token_ids": true,
    });
    let (status, alone) = server.post("/v1/chat/completions", &stream_request);
    assert_eq!(status, 200, "{alone}");
    let prompt_before = server.metric("vlmserve_prompt_tokens_total", "");
    let reported_before = server.metric("vlmserve_stage_duration_seconds_count", "prefill");

    let beside = std::thread::scope(|s| {
        let beside = s.spawn(|| server.post("/v1/chat/completions", &stream_request));
        let deadline = Instant::now() + Duration::from_secs(30);
        server.wait_for_metric(
            "vlmserve_num_requests_running",
            "",
            |v| v >= 1.0,
            deadline,
            "the first stream did not start",
        );
        // Four 17-tile images (64-pixel tiles, longest edge 256).
        let image = image_bytes("images/large_nonsquare_0.png");
        let images = vec![image; 4];
        let leaving = send_raw_chat(&server, &greedy(json!([user_with_images(&images, "Describe them.")]), 16));
        // In the batch (counted as running from admission) means its tiles are being encoded.
        server.wait_for_metric(
            "vlmserve_num_requests_running",
            "",
            |v| v >= 2.0,
            deadline,
            "the request with images was not admitted",
        );
        drop(leaving);
        server.wait_for_metric(
            "vlmserve_requests_finished_total",
            "reason=\"cancelled\"",
            |v| v >= 1.0,
            deadline,
            "the request whose client left was not cancelled",
        );
        beside.join().unwrap()
    });
    let (status, beside) = beside;
    assert_eq!(status, 200, "{beside}");
    assert_eq!(token_ids(&beside), token_ids(&alone), "the stream beside it changed");
    // Withdrawn before its first token (alone, its 969-token prompt takes ~0.1 s to reach one):
    // it reported no stages and no prompt tokens, so the only ones counted are the other stream's.
    let prompt = server.metric("vlmserve_prompt_tokens_total", "") - prompt_before;
    assert_eq!(prompt, alone["usage"]["prompt_tokens"].as_f64().unwrap(), "the leaving request was served to its end");
    let reported = server.metric("vlmserve_stage_duration_seconds_count", "prefill") - reported_before;
    assert_eq!(reported, 1.0, "stages reported by requests other than the stream beside it");
    // The gauges fall when the worker drops a finished job, just after its last event is sent.
    let deadline = Instant::now() + Duration::from_secs(5);
    server.wait_for_metric("vlmserve_num_requests_running", "", |v| v == 0.0, deadline, "a request still running");
    server.wait_for_metric(
        "vlmserve_kv_cache_bytes",
        "",
        |v| v == 0.0,
        deadline,
        "the leaving request's cache was kept",
    );
    let image = image_bytes("images/one_image_0.png");
    let (status, after) =
        server.post("/v1/chat/completions", &greedy(json!([user_with_images(&[image], "What is it?")]), 8));
    assert_eq!(status, 200, "{after}");
}

#[test]
fn a_request_past_its_deadline_ends_with_504() {
    // With the response cache on: an answer cut by its deadline is never kept.
    let server = Server::start(&config_toml(&package_dir(), "request_timeout_s = 0.3\nresponse_cache_mb = 4"));
    let long = json!({"model": MODEL, "messages": [{"role": "user", "content": "Go on."}], "temperature": 0, "max_tokens": 2000, "ignore_eos": true});
    for _ in 0..2 {
        let start = Instant::now();
        let (status, body) = server.post("/v1/chat/completions", &long);
        assert_error(status, &body, 504, "deadline_exceeded");
        assert!(start.elapsed() < Duration::from_secs(20));
    }
    assert_eq!(server.metric("vlmserve_response_cache_lookups_total", "result=\"miss\""), 2.0);
    assert_eq!(server.metric("vlmserve_response_cache_lookups_total", "result=\"hit\""), 0.0);
    let mut streaming = long.clone();
    streaming["stream"] = json!(true);
    let response = server.chat_response(&streaming);
    assert_eq!(response.status(), 200);
    let events = read_events(response.into_body().into_reader());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let error: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], "deadline_exceeded", "{error}");
    assert!(server.metric("vlmserve_requests_finished_total", "reason=\"deadline\"") >= 2.0);
    assert_eq!(server.get("/health").0, 200);
}

/// POST JSON; the status, the `x-vlmserve-cache` header and the body (SSE events when
/// streamed, as a JSON array of their payloads).
fn post_cached(server: &Server, path: &str, body: &Value) -> (u16, Option<String>, Value) {
    let mut response =
        agent().post(server.url(path)).header("Content-Type", "application/json").send(body.to_string()).unwrap();
    let status = response.status().as_u16();
    let cache = response.headers().get("x-vlmserve-cache").map(|v| v.to_str().unwrap().to_string());
    let text = response.body_mut().read_to_string().unwrap();
    let body = if body["stream"] == json!(true) {
        json!(read_events(text.as_bytes()))
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, cache, body)
}

/// A body without what differs between two answers to the same request: ids, times, and the
/// decoding of the request's own images (a replay repeats the answer's other timings).
fn without_ids(body: &Value) -> Value {
    match body {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "id" | "created" | "created_at" | "item_id" | "image_decode_s"))
                .map(|(k, v)| (k.clone(), without_ids(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_ids).collect()),
        // SSE payloads are JSON text.
        Value::String(s) => serde_json::from_str::<Value>(s)
            .ok()
            .filter(Value::is_object)
            .map_or_else(|| body.clone(), |v| without_ids(&v)),
        other => other.clone(),
    }
}

#[test]
fn identical_deterministic_requests_are_answered_from_the_response_cache() {
    let server = Server::start(&config_toml(
        &package_dir(),
        "response_cache_mb = 4\nexpose_cache_hits = true\nadmin_token = \"secret-token\"",
    ));
    let image = image_bytes("images/one_image_0.png");
    let request = greedy(json!([user_with_images(std::slice::from_ref(&image), "What is in the image?")]), 12);
    let chat = |body: &Value| post_cached(&server, "/v1/chat/completions", body);
    let lookups =
        |result: &str| server.metric("vlmserve_response_cache_lookups_total", &format!("result=\"{result}\""));

    let (status, miss, first) = chat(&request);
    assert_eq!((status, miss.as_deref()), (200, Some("miss")), "{first}");
    assert!(server.metric("vlmserve_response_cache_bytes", "") > 0.0);
    let (status, hit, second) = chat(&request);
    assert_eq!((status, hit.as_deref()), (200, Some("hit")), "{second}");
    assert_ne!(first["id"], second["id"]);
    assert_eq!(without_ids(&second), without_ids(&first), "a hit's body is the answer's, usage included");
    assert_eq!((lookups("miss"), lookups("hit")), (1.0, 1.0));

    // A stored answer streams as the live one did: the same chunks, in the same order.
    let mut streamed = greedy(json!([user_with_images(std::slice::from_ref(&image), "Describe the image.")]), 12);
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (_, live_cache, live) = chat(&streamed);
    let (_, replay_cache, replay) = chat(&streamed);
    assert_eq!((live_cache.as_deref(), replay_cache.as_deref()), (Some("miss"), Some("hit")));
    assert_eq!(without_ids(&replay), without_ids(&live));
    assert!(live.as_array().unwrap().len() > 4, "{live}");
    // The first request's answer, stored whole, streams too.
    let mut first_streamed = request.clone();
    first_streamed["stream"] = json!(true);
    let (_, cache, events) = chat(&first_streamed);
    assert_eq!(cache.as_deref(), Some("hit"));
    let events: Vec<String> = events.as_array().unwrap().iter().map(|e| e.as_str().unwrap().to_string()).collect();
    assert_eq!(stream_text(&events).0, text(&first));

    // Any parameter, prompt or image changed: a miss.
    let changed = [
        ("max_tokens", json!(11)),
        ("stop", json!(["zzz"])),
        ("logprobs", json!(true)),
        ("n", json!(2)),
        ("repetition_penalty", json!(1.1)),
        ("response_format", json!({"type": "json_object"})),
    ];
    let cached_tokens = |body: &Value| body["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    for (param, value) in changed {
        let mut other = request.clone();
        other[param] = value;
        let (status, cache, body) = chat(&other);
        assert_eq!((status, cache.as_deref()), (200, Some("miss")), "{param}: {body}");
        // Generated anew, from the prefix the first request left.
        assert!(cached_tokens(&body) > 0, "{param}: {body}");
    }
    let other_image = image_bytes("images/two_images_0.png");
    let mut other = request.clone();
    other["messages"] = json!([user_with_images(&[other_image], "What is in the image?")]);
    assert_eq!(chat(&other).1.as_deref(), Some("miss"), "another picture");
    other["messages"][0]["content"][0]["image_url"]["detail"] = json!("low");
    assert_eq!(chat(&other).1.as_deref(), Some("miss"), "another budget");

    // Sampled: reproducible with a seed only.
    let mut sampled = request.clone();
    sampled["temperature"] = json!(0.8);
    let (status, cache, body) = chat(&sampled);
    assert_eq!((status, cache), (200, None), "{body}");
    assert_eq!(chat(&sampled).1, None, "nothing is stored for a sampled request without a seed");
    sampled["seed"] = json!(7);
    let (_, cache, seeded) = chat(&sampled);
    let (_, cache_again, seeded_again) = chat(&sampled);
    assert_eq!((cache.as_deref(), cache_again.as_deref()), (Some("miss"), Some("hit")));
    assert_eq!(without_ids(&seeded_again), without_ids(&seeded));

    // The other generating endpoints share the cache's rules.
    let b64 = base64::engine::general_purpose::STANDARD.encode(&image);
    let vqa = json!({"image": b64, "question": "What?", "max_tokens": 4, "temperature": 0});
    let (_, cache, vqa_first) = post_cached(&server, "/v1/vqa", &vqa);
    let (_, cache_again, vqa_second) = post_cached(&server, "/v1/vqa", &vqa);
    assert_eq!((cache.as_deref(), cache_again.as_deref()), (Some("miss"), Some("hit")));
    assert_eq!(vqa_first["answer"], vqa_second["answer"]);
    let responses = json!({"model": MODEL, "input": "Hello?", "max_output_tokens": 4, "temperature": 0});
    let (_, cache, _) = post_cached(&server, "/v1/responses", &responses);
    let (_, cache_again, _) = post_cached(&server, "/v1/responses", &responses);
    assert_eq!((cache.as_deref(), cache_again.as_deref()), (Some("miss"), Some("hit")));

    // A reload is a new version: its answers are its own.
    let (status, _, body) = server.post_raw(
        &format!("/admin/models/{MODEL}/reload"),
        "",
        "application/json",
        &[("Authorization", "Bearer secret-token")],
    );
    assert_eq!(status, 200, "{body}");
    let (status, cache, reloaded) = chat(&request);
    assert_eq!((status, cache.as_deref()), (200, Some("miss")), "{reloaded}");
    assert_eq!(cached_tokens(&reloaded), 0, "no prefix block or feature of the old version serves the new one");
    assert_eq!(text(&reloaded), text(&first), "the same files answer the same");
}

/// A conversation's next turn reuses the keys and values of the turn before (prefix cache on
/// by default); `cached_tokens` says how many when cache hits are exposed.
#[test]
fn a_follow_up_turn_reports_its_reused_prompt_tokens() {
    let server = Server::start(&config_toml(&package_dir(), "expose_cache_hits = true"));
    let image = image_bytes("images/one_image_0.png");
    let question = user_with_images(std::slice::from_ref(&image), "What is in the image?");
    let hit_tokens = || server.metric("vlmserve_prefix_cache_hit_tokens_total", "");
    let (hits_before, tokens_before) =
        (server.metric("vlmserve_prefix_cache_lookups_total", "result=\"hit\""), hit_tokens());
    let (status, first) = server.post("/v1/chat/completions", &greedy(json!([question.clone()]), 12));
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0, "{first}");
    let answer = json!({"role": "assistant", "content": text(&first)});
    let follow_up = json!({"role": "user", "content": "And what colour is it?"});
    let (status, second) = server.post("/v1/chat/completions", &greedy(json!([question, answer, follow_up]), 12));
    assert_eq!(status, 200, "{second}");
    let first_prompt = first["usage"]["prompt_tokens"].as_u64().unwrap();
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    let prompt = second["usage"]["prompt_tokens"].as_u64().unwrap();
    // The first turn's whole 32-token blocks at least (its answer may add one), never the
    // whole prompt; cached_tokens adds image tokens past them whose features were cached.
    let reused = hit_tokens() - tokens_before;
    assert!(reused >= (first_prompt / 32 * 32) as f64 && reused % 32.0 == 0.0, "{reused} of {first_prompt}");
    assert!(cached as f64 >= reused && cached < prompt, "{cached} of {prompt}, {reused} reused");
    assert_eq!(server.metric("vlmserve_prefix_cache_lookups_total", "result=\"hit\"") - hits_before, 1.0);
    assert!(server.metric("vlmserve_prefix_cache_bytes", "") > 0.0);
    // The image was encoded once; the second turn found it in the reused blocks or the
    // feature cache, neither of which is a feature-cache miss.
    assert_eq!(server.metric("vlmserve_image_feature_cache_lookups_total", "result=\"miss\""), 1.0);
}

/// `server.expose_cache_hits = true` opts in to the cache-hit field (one user, or trusted ones).
#[test]
fn vqa_reports_cache_hits_only_when_configured() {
    // The prefix cache off: it would hold the whole prompt the second time.
    let server =
        Server::start(&config_toml(&package_dir(), "expose_cache_hits = true\n[scheduler]\nprefix_cache_mb = 0"));
    let b64 = base64::engine::general_purpose::STANDARD.encode(image_bytes("images/one_image_0.png"));
    let ask = || server.post("/v1/vqa", &json!({"image": b64, "question": "What?", "max_tokens": 2, "temperature": 0}));
    let ((s1, first), (s2, second)) = (ask(), ask());
    assert_eq!((s1, s2), (200, 200), "{first} {second}");
    assert_eq!(
        (&first["timings"]["vision_cache_hit"], &second["timings"]["vision_cache_hit"]),
        (&json!(false), &json!(true))
    );
    // OpenAI's cached_tokens: the image tokens whose features the cache held.
    let details = |answer: &Value| answer["usage"]["prompt_tokens_details"].clone();
    let image_tokens = details(&first)["image_tokens"].as_u64().unwrap();
    assert!(image_tokens > 0);
    assert_eq!(details(&first), json!({"image_tokens": image_tokens, "cached_tokens": 0}));
    assert_eq!(details(&second), json!({"image_tokens": image_tokens, "cached_tokens": image_tokens}));
}

#[test]
fn vqa_answers_json_and_multipart_like_chat() {
    let server = Server::start(&config_toml(&package_dir(), ""));
    let image = image_bytes("images/one_image_0.png");
    let question = "What is in the image?";
    let (status, chat) = server
        .post("/v1/chat/completions", &greedy(json!([user_with_images(std::slice::from_ref(&image), question)]), 10));
    assert_eq!(status, 200, "{chat}");
    let b64 = base64::engine::general_purpose::STANDARD.encode(&image);
    let (status, answer) =
        server.post("/v1/vqa", &json!({"image": b64, "question": question, "max_tokens": 10, "temperature": 0}));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["answer"], chat["choices"][0]["message"]["content"]);
    assert_eq!(answer["model"], MODEL);
    assert_eq!(answer["usage"], chat["usage"]);
    for key in ["image_decode_s", "preprocess_s", "vision_s", "prefill_s", "decode_s"] {
        assert!(answer["timings"][key].is_number(), "{key}: {answer}");
    }
    // The feature cache is shared: by default no answer says whether it held this image.
    assert!(answer["timings"].get("vision_cache_hit").is_none(), "{answer}");
    let (status, answer_url) = server
        .post("/v1/vqa", &json!({"image": data_url(&image), "question": question, "max_tokens": 10, "temperature": 0}));
    assert_eq!(status, 200, "{answer_url}");
    assert_eq!(answer_url["answer"], answer["answer"]);

    let boundary = "vlmserve-test-boundary";
    let mut body = Vec::new();
    for (name, value) in [("question", question), ("max_tokens", "10"), ("temperature", "0")] {
        write!(body, "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").unwrap();
    }
    write!(body, "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n").unwrap();
    body.extend_from_slice(&image);
    write!(body, "\r\n--{boundary}--\r\n").unwrap();
    let mut response = agent()
        .post(server.url("/v1/vqa"))
        .header("Content-Type", format!("multipart/form-data; boundary={boundary}"))
        .send(&body[..])
        .unwrap();
    let text = response.body_mut().read_to_string().unwrap();
    assert_eq!(response.status(), 200, "{text}");
    let multipart: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(multipart["answer"], answer["answer"]);

    // Cut off before its closing boundary (the parser used to wait for the rest forever).
    let cut = &body[..body.len() - format!("--{boundary}--\r\n").len()];
    let (status, _, error) = server.post_raw(
        "/v1/vqa",
        &String::from_utf8_lossy(cut),
        &format!("multipart/form-data; boundary={boundary}"),
        &[],
    );
    assert_error(status, &error, 400, "invalid_multipart");
}

#[test]
fn health_models_and_metrics() {
    let server = Server::start(&config_toml(&package_dir(), ""));
    assert_eq!(server.get("/health").0, 200);
    let (status, ready) = server.get("/ready");
    assert_eq!(status, 200, "{ready}");
    let (status, models) = server.get("/v1/models");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    let model = &models["data"][0];
    assert_eq!(
        (model["id"].as_str(), model["object"].as_str(), model["state"].as_str()),
        (Some(MODEL), Some("model"), Some("ready"))
    );
    assert_eq!(model["precision"], "fp32");
    assert_eq!(model["providers"], json!(["cpu"]));
    assert_eq!(model["root"].as_str(), Some(package_dir().to_str().unwrap()));
    let (status, one) = server.get(&format!("/v1/models/{MODEL}"));
    assert_eq!(status, 200, "{one}");
    let image = image_bytes("images/tiny_image_0.png");
    let request = greedy(json!([user_with_images(&[image], "Colour?")]), 5);
    let (status, first) = server.post("/v1/chat/completions", &request);
    assert_eq!(status, 200, "{first}");
    // The same image again: its features come from the cache, and the answer is the same.
    let (status, again) = server.post("/v1/chat/completions", &request);
    assert_eq!(status, 200, "{again}");
    assert_eq!(token_ids(&again), token_ids(&first));
    let lookups = "vlmserve_image_feature_cache_lookups_total";
    assert_eq!(server.metric(lookups, "result=\"miss\""), 1.0);
    assert_eq!(server.metric(lookups, "result=\"hit\""), 1.0);
    assert!(server.metric("vlmserve_image_feature_cache_bytes", "") > 0.0);
    let (status, metrics) = server.get("/metrics");
    assert_eq!(status, 200);
    for name in [
        "vlmserve_http_requests_total{route=\"/v1/chat/completions\",status=\"200\"}",
        "vlmserve_num_requests_waiting",
        "vlmserve_num_requests_running",
        "vlmserve_time_to_first_token_seconds_bucket",
        "vlmserve_inter_token_latency_seconds_bucket",
        "vlmserve_request_queue_duration_seconds_bucket",
        "vlmserve_generation_tokens_total",
        "stage=\"image_decode\"",
        "stage=\"preprocess\"",
        "stage=\"vision_encoder\"",
        "stage=\"prefill\"",
        "stage=\"decode\"",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics:\n{metrics}");
    }
    // Admin routes are off without a token.
    let (s, b) = server.post(&format!("/admin/models/{MODEL}/reload"), &json!({}));
    assert_error(s, &b, 404, "not_found");
}

#[test]
fn the_question_page_is_served_from_the_binary_without_external_resources() {
    let server = Server::start(&config_toml(&package_dir(), ""));
    let mut page = agent().get(server.url("/")).call().unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let html = page.body_mut().read_to_string().unwrap();
    assert!(html.contains(r#"<script src="/page/app.js">"#) && html.contains(r#"href="/page/style.css""#), "{html}");
    for (path, content_type, must_contain) in [
        ("/page/app.js", "text/javascript; charset=utf-8", "/v1/chat/completions"),
        ("/page/style.css", "text/css; charset=utf-8", "#answer"),
    ] {
        let mut response = agent().get(server.url(path)).call().unwrap();
        assert_eq!(response.status().as_u16(), 200, "{path}");
        assert_eq!(response.headers()["content-type"], content_type, "{path}");
        let body = response.body_mut().read_to_string().unwrap();
        assert!(body.contains(must_contain), "{path} lacks {must_contain}");
        for text in [&html, &body] {
            assert!(!text.contains("http://") && !text.contains("https://") && !text.contains("@import"), "{path}");
        }
    }
    let (status, body) = server.get("/page/secrets.toml");
    assert_error(status, &serde_json::from_str(&body).unwrap(), 404, "not_found");
}

/// The default model's card: what it knows and example pictures, listed with the model and
/// served from its package; only the card's own files are served.
#[test]
fn the_default_model_lists_its_card_and_serves_its_examples() {
    let package = common::root().join("models/shapes-vlm/package");
    let server = Server::start(&config_toml(&package, ""));
    let (status, body) = server.get(&format!("/v1/models/{MODEL}"));
    assert_eq!(status, 200, "{body}");
    let model: Value = serde_json::from_str(&body).unwrap();
    let card = &model["card"];
    assert!(card["about"].as_str().unwrap().contains("circles, squares, triangles and stars"), "{card}");
    let examples = card["examples"].as_array().unwrap();
    let answers = std::collections::HashMap::from([
        ("square-and-circle.png", "blue"),
        ("triangle.png", "triangle"),
        ("three-shapes.png", "3"),
        ("left-or-right.png", "right"),
        ("describe.jpg", "a purple star"),
    ]);
    assert_eq!(examples.len(), answers.len(), "{card}");
    for example in examples {
        let url = example["image"].as_str().unwrap();
        assert!(url.starts_with(&format!("/v1/models/{MODEL}/examples/")), "{url}");
        let mut response = agent().get(server.url(url)).call().unwrap();
        assert_eq!(response.status().as_u16(), 200, "{url}");
        let content_type = response.headers()["content-type"].to_str().unwrap().to_string();
        let bytes = response.body_mut().read_to_vec().unwrap();
        let file = url.rsplit('/').next().unwrap();
        assert_eq!(bytes, std::fs::read(package.join("examples").join(file)).unwrap(), "{url}");
        let expected = if file.ends_with(".png") { "image/png" } else { "image/jpeg" };
        assert_eq!(content_type, expected, "{url}");
        // The examples are what the model answers: each as a person would ask it on the page.
        let question = example["question"].as_str().unwrap();
        let (status, body) =
            server.post("/v1/chat/completions", &greedy(json!([user_with_images(&[bytes], question)]), 32));
        assert_eq!(status, 200, "{body}");
        assert_eq!(text(&body).trim(), answers[file], "{file}: {question}");
    }
    for path in [
        "/v1/models/idefics3-tiny/examples/card.json",
        "/v1/models/idefics3-tiny/examples/..%2Fcard.json",
        "/v1/models/idefics3-tiny/examples/missing.png",
    ] {
        let (status, body) = server.get(path);
        assert_error(status, &serde_json::from_str(&body).unwrap(), 404, "not_found");
    }
    let (status, body) = server.get("/v1/models/nope/examples/describe.jpg");
    assert_error(status, &serde_json::from_str(&body).unwrap(), 404, "model_not_found");
}

/// Replace `name` atomically (write beside it, then rename).
fn replace_file(dir: &Path, name: &str, contents: &[u8]) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

#[test]
fn reload_under_load_swaps_atomically_and_survives_corrupt_files() {
    let work = tempfile::tempdir().unwrap();
    let package = work.path().join("package");
    common::copy_dir(&package_dir(), &package);
    let server = Server::start(&config_toml(
        &package,
        // One sequence at a time: this test tells versions apart by answers, and a batched
        // answer need not equal a lone one bit for bit in reduced precision.
        "admin_token = \"secret-token\"\n[scheduler]\nconcurrency = 1\nmax_batch_size = 1\nqueue_size = 64\n",
    ));
    let reload = |token: &str| {
        let (status, _, body) = server.post_raw(
            &format!("/admin/models/{MODEL}/reload"),
            "",
            "application/json",
            &[("Authorization", &format!("Bearer {token}"))],
        );
        (status, body)
    };
    let (s, b) = reload("wrong");
    assert_error(s, &b, 401, "invalid_api_key");
    // The scheme is case-insensitive: a lowercase one with the right token gets past the check.
    let (s, _, b) = server.post_raw(
        "/admin/models/nope/reload",
        "",
        "application/json",
        &[("Authorization", "bearer secret-token")],
    );
    assert_error(s, &b, 404, "model_not_found");

    let image = image_bytes("images/one_image_0.png");
    // A prompt on which the fixture's int8 graphs leave fp32's greedy path at the second token
    // (blockwise int8 keeps fp32's answer to "What is in the image?" for 32 tokens).
    let request = greedy(json!([user_with_images(std::slice::from_ref(&image), "Describe the image.")]), 16);
    let (status, before) = server.post("/v1/chat/completions", &request);
    assert_eq!(status, 200, "{before}");
    let before = token_ids(&before);

    // The int8 graphs under the fp32 names: new files, same package otherwise.
    let onnx = package.join("onnx");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (answers, reloaded) = std::thread::scope(|s| {
        let clients: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    let mut answers = Vec::new();
                    for _ in 0..200 {
                        if stop.load(std::sync::atomic::Ordering::SeqCst) {
                            break;
                        }
                        let (status, body) = server.post("/v1/chat/completions", &request);
                        assert_eq!(status, 200, "a request failed during reload: {body}");
                        answers.push(token_ids(&body));
                    }
                    answers
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        for graph in ["vision_encoder", "embed_tokens", "decoder_model_merged"] {
            let int8 = std::fs::read(onnx.join(format!("{graph}_int8.onnx"))).unwrap();
            replace_file(&onnx, &format!("{graph}.onnx"), &int8);
        }
        let reloaded = reload("secret-token");
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let answers: Vec<Vec<Vec<u32>>> = clients.into_iter().map(|c| c.join().unwrap()).collect();
        (answers, reloaded)
    });
    assert_eq!(reloaded.0, 200, "{}", reloaded.1);
    assert_eq!(reloaded.1["revision"], 2);
    let (status, after) = server.post("/v1/chat/completions", &request);
    assert_eq!(status, 200, "{after}");
    let after = token_ids(&after);
    assert_ne!(after, before, "answers after the reload should come from the new (int8) files");
    for answer in answers.iter().flatten() {
        assert!(*answer == before || *answer == after, "an answer from neither version: {answer:?}");
    }

    // Corrupt files: the reload fails with the load error and the current version keeps serving.
    replace_file(&onnx, "decoder_model_merged.onnx", b"this is not an onnx graph");
    let (s, b) = reload("secret-token");
    assert_error(s, &b, 422, "model_load_failed");
    let (status, still) = server.post("/v1/chat/completions", &request);
    assert_eq!(status, 200, "{still}");
    assert_eq!(token_ids(&still), after);
    let (_, models) = server.get("/v1/models");
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["state"], "ready");
    assert_eq!(models["data"][0]["revision"], 2);
    assert!(models["data"][0]["last_error"].is_string());
    assert_eq!(server.metric("vlmserve_model_reloads_total", "result=\"failed\""), 1.0);
    assert_eq!(server.get("/ready").0, 200);
}

#[test]
fn sigterm_lets_requests_in_flight_finish_then_exits() {
    let mut server = Server::start(&config_toml(&package_dir(), "shutdown_timeout_s = 20"));
    let request = json!({
        "model": MODEL, "messages": [{"role": "user", "content": "Go on."}], "temperature": 0,
        "max_tokens": 1500, "ignore_eos": true, "stream": true,
    });
    let response = server.chat_response(&request);
    assert_eq!(response.status(), 200);
    let mut reader = BufReader::new(response.into_body().into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    assert!(first.starts_with("data: "), "{first}");
    let killed = Command::new("kill").args(["-TERM", &server.pid().to_string()]).status().unwrap();
    assert!(killed.success());
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    let events: Vec<String> = std::iter::once(first.trim_end().trim_start_matches("data: ").to_string())
        .chain(rest.lines().filter_map(|l| l.strip_prefix("data: ").map(str::to_string)))
        .collect();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let (_, finish, _) = stream_text(&events);
    assert_eq!(finish.as_deref(), Some("length"));
    let status = server.wait_for_exit(Duration::from_secs(30), "server did not exit after SIGTERM");
    assert!(status.success(), "{status:?}");
}

/// SIGTERM starts a drain a load balancer can follow: `/ready` is 503 at once while requests
/// are still served for `shutdown_delay_s`; then queued requests are refused with 503 (a stream
/// that has no token yet has sent no status either) and running ones end (here at once:
/// `shutdown_timeout_s = 0`) with an error event or their finish, then `[DONE]`; then the server
/// exits cleanly.
#[test]
fn sigterm_drains_then_ends_every_request_cleanly() {
    let extra = "shutdown_delay_s = 2\nshutdown_timeout_s = 0\n\n[scheduler]\nconcurrency = 1\nmax_batch_size = 1\nqueue_size = 32\n";
    let mut server = Server::start(&config_toml(&package_dir(), extra));
    let killed = Command::new("kill").args(["-TERM", &server.pid().to_string()]).status().unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(1);
    while server.get("/ready").0 != 503 {
        assert!(Instant::now() < deadline, "/ready still 200 after SIGTERM");
    }
    let short = json!({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]});
    let (status, body) = server.post("/v1/chat/completions", &short);
    assert_eq!(status, 200, "requests are served during the delay: {body}");

    // More work than the delay leaves: one stream runs at a time, the others wait in the queue.
    let long = json!({
        "model": MODEL, "messages": [{"role": "user", "content": "Go on."}], "temperature": 0,
        "max_tokens": 1900, "ignore_eos": true, "stream": true,
    });
    let outcomes: Vec<String> = std::thread::scope(|scope| {
        let streams: Vec<_> = (0..24)
            .map(|_| {
                scope.spawn(|| {
                    let response = server.chat_response(&long);
                    let status = response.status().as_u16();
                    let mut text = String::new();
                    BufReader::new(response.into_body().into_reader()).read_to_string(&mut text).unwrap();
                    if status != 200 {
                        let body: Value = serde_json::from_str(&text).unwrap();
                        return format!("{status} {}", body["error"]["code"].as_str().unwrap_or("none"));
                    }
                    let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
                    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
                    let last: Value = serde_json::from_str(events[events.len() - 2]).unwrap();
                    match last["error"]["code"].as_str() {
                        Some(code) => code.to_string(),
                        None => last["choices"][0]["finish_reason"].as_str().unwrap_or("none").to_string(),
                    }
                })
            })
            .collect();
        streams.into_iter().map(|s| s.join().unwrap()).collect()
    });
    let known = ["length", "shutting_down", "503 shutting_down"];
    assert!(outcomes.iter().all(|o| known.contains(&o.as_str())), "{outcomes:?}");
    // Queued streams had no token yet: a status a proxy can retry elsewhere, not a 200 stream.
    assert!(outcomes.iter().any(|o| o == "503 shutting_down"), "none was refused: {outcomes:?}");
    // The running one was ended mid-stream (shutdown_timeout_s = 0), after its first tokens.
    assert!(outcomes.iter().any(|o| o == "shutting_down"), "none was ended: {outcomes:?}");
    let status = server.wait_for_exit(Duration::from_secs(30), "server did not exit after the drain");
    assert!(status.success(), "{status:?}");
}

/// At the default verbosity a client's malformed HTTP is its own 400, not an ERROR line in the
/// server's log (actix logs it so); the server's own info lines still come.
#[test]
fn malformed_http_is_not_logged_as_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, config_toml(&package_dir(), "shutdown_delay_s = 0")).unwrap();
    let log = dir.path().join("stderr.log");
    let mut child = common::vlmserve()
        .args(["serve", "--port", "0", "--host", "127.0.0.1", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on http://").unwrap_or_else(|| panic!("{line}")).to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    while agent().get(format!("http://{addr}/ready")).call().map(|r| r.status().as_u16()).ok() != Some(200) {
        assert!(Instant::now() < deadline, "not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    for garbage in ["GARBAGE / HTTP/9.9\r\n\r\n", "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: x\r\n\r\n"] {
        let mut stream = TcpStream::connect(&addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        stream.write_all(garbage.as_bytes()).unwrap();
        let mut head = String::new();
        let _ = BufReader::new(&stream).read_line(&mut head);
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    }
    let hello = json!({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]});
    let response = agent()
        .post(format!("http://{addr}/v1/chat/completions"))
        .header("Content-Type", "application/json")
        .send(hello.to_string())
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("ERROR"), "{text}");
    assert!(text.contains("generation finished"), "{text}");
}

#[test]
fn a_model_that_fails_to_load_at_start_stops_the_server() {
    let broken = tempfile::tempdir().unwrap();
    let mut server = Server::spawn(&config_toml(broken.path(), ""));
    let status = server.wait_for_exit(Duration::from_secs(60), "server kept running without its model");
    assert!(!status.success(), "{status:?}");
}

#[test]
fn a_configuration_error_names_the_key_and_exits_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[server]\nprot = 8080\n").unwrap();
    let output = common::vlmserve().args(["serve", "--port", "0", "--config"]).arg(&config).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("prot"), "{stderr}");
    assert!(!String::from_utf8_lossy(&output.stdout).contains("listening"));
}

/// A loopback HTTP server for remote-image tests: `/one.png`, `/big.png` (over the limit),
/// `/slow.png` (answers after 3 s), `/redirect` (302 to /one.png), anything else 404.
/// Stops when `stop` is set (bounded: at most 60 s).
fn image_host<'a>(stop: &'a std::sync::atomic::AtomicBool, image: &'a [u8]) -> (String, impl FnOnce() + Send + 'a) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    listener.set_nonblocking(true).unwrap();
    let serve = move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !stop.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < deadline {
            let Ok((mut stream, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            stream.set_nonblocking(false).unwrap();
            let image = image.to_vec();
            std::thread::spawn(move || {
                let mut head = String::new();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                while reader.read_line(&mut head).is_ok_and(|n| n > 2) {}
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                let (status, body, extra) = match path.as_str() {
                    "/one.png" => ("200 OK", image, ""),
                    "/big.png" => ("200 OK", vec![0u8; 400_000], ""),
                    "/slow.png" => {
                        std::thread::sleep(Duration::from_secs(3));
                        ("200 OK", image, "")
                    }
                    "/redirect" => ("302 Found", Vec::new(), "Location: /one.png\r\n"),
                    _ => ("404 Not Found", Vec::new(), ""),
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(&body);
            });
        }
    };
    (addr, serve)
}

#[test]
fn remote_image_urls_from_allowed_hosts_only() {
    let extra = "remote_image_hosts = [\"127.0.0.1\"]\nremote_image_timeout_s = 1.0\nmax_image_bytes = 300000\n";
    let server = Server::start(&config_toml(&package_dir(), extra));
    let image = image_bytes("images/one_image_0.png");
    assert!(image.len() < 300_000);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (host, serve) = image_host(&stop, &image);
    std::thread::scope(|s| {
        s.spawn(serve);
        let ask = |url: String| {
            let content = json!([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is in the image?"}]);
            server.post("/v1/chat/completions", &greedy(json!([{"role": "user", "content": content}]), 8))
        };
        let (status, local) = ask(data_url(&image));
        assert_eq!(status, 200, "{local}");
        let (status, remote) = ask(format!("http://{host}/one.png"));
        assert_eq!(status, 200, "{remote}");
        assert_eq!(token_ids(&remote), token_ids(&local));
        let port = host.rsplit(':').next().unwrap();
        let (s, b) = ask(format!("http://localhost:{port}/one.png"));
        assert_error(s, &b, 400, "image_host_not_allowed");
        let (s, b) = ask(format!("http://{host}/missing.png"));
        assert_error(s, &b, 400, "image_fetch_failed");
        let (s, b) = ask(format!("http://{host}/redirect"));
        assert_error(s, &b, 400, "image_fetch_failed");
        let (s, b) = ask(format!("http://{host}/big.png"));
        assert_error(s, &b, 413, "image_too_large");
        let start = Instant::now();
        let (s, b) = ask(format!("http://{host}/slow.png"));
        assert_error(s, &b, 400, "image_fetch_failed");
        assert!(start.elapsed() < Duration::from_millis(2900), "the time limit was not applied");
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    });
}

/// A Qwen2.5-VL server: answers equal PyTorch's, `detail` and `max_pixels` bound what an image
/// costs (the server's processor settings cap them from above), an image beyond the cap is
/// resized down, and one beyond the hard pixel limit is refused with 413.
#[test]
fn qwen2_vl_serves_with_per_image_budgets() {
    let fixture = common::root().join("tests/fixtures/qwen2.5-vl-tiny");
    let reference = common::references().into_iter().find(|r| r.dir == fixture).unwrap();
    // The fixture allows 32 image tokens; `detail: low` 8 here.
    let toml = format!(
        "[[models]]\nname = \"qwen\"\npath = {:?}\n[models.processor]\nlow_detail_max_pixels = 6272\n\n\
         [server]\nhttp_workers = 2\nmax_image_side = 4000\nmax_image_pixels = 4000000\n",
        fixture.join("package").display().to_string()
    );
    let server = Server::start(&toml);
    let chat = |image_url: Value, max_tokens: usize| {
        let content =
            json!([{"type": "image_url", "image_url": image_url}, {"type": "text", "text": "What is in the image?"}]);
        let body =
            json!({"model": "qwen", "max_tokens": max_tokens, "messages": [{"role": "user", "content": content}]});
        server.post("/v1/chat/completions", &body)
    };

    // Token for token PyTorch's answer, from the fixture's image file.
    let case = reference.cases.iter().find(|c| c.name == "one_image").unwrap();
    let one_image = data_url(&std::fs::read(fixture.join(&case.images[0])).unwrap());
    let (status, body) = chat(json!({"url": one_image}), 24);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["prompt_tokens"], case.input_ids.len(), "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], case.generated_text, "{body}");

    // A 1600x1200 image is resized to the server's 32 tokens (not refused), `low` to at most 8,
    // `max_pixels` to what it names; each answer comes back.
    let large = data_url(&png(1600, 1200));
    let prompt_tokens = |image_url: Value| {
        let (status, body) = chat(image_url, 2);
        assert_eq!(status, 200, "{body}");
        assert!(body["choices"][0]["message"]["content"].is_string(), "{body}");
        body["usage"]["prompt_tokens"].as_u64().unwrap()
    };
    let high = prompt_tokens(json!({"url": large, "detail": "high"}));
    let auto = prompt_tokens(json!({"url": large}));
    let low = prompt_tokens(json!({"url": large, "detail": "low"}));
    let capped = prompt_tokens(json!({"url": large, "max_pixels": 12 * 28 * 28}));
    let beyond_cap = prompt_tokens(json!({"url": large, "max_pixels": 100_000_000}));
    let text_tokens = high - 24; // smart_resize: 1600x1200 in 32 tokens' worth is 168x112, 24 tokens
    assert_eq!((auto, beyond_cap), (high, high));
    assert_eq!(low - text_tokens, 6, "56x84 pixels");
    assert_eq!(capped - text_tokens, 12, "112x84 pixels");

    // Over the hard pixel limit: 413; a bad budget: 400 naming the field.
    let (s, b) = chat(json!({"url": data_url(&png(2100, 2000))}), 2);
    assert_error(s, &b, 413, "image_too_large");
    let (s, b) = chat(json!({"url": large, "detail": "tiny"}), 2);
    assert_error(s, &b, 400, "invalid_request");
    assert_eq!(b["error"]["param"], "messages[0].content[0].image_url.detail");
    // A strip beyond the processor's aspect ratio limit is a clear 400.
    let (s, b) = chat(json!({"url": data_url(&png(3000, 10))}), 2);
    assert_error(s, &b, 400, "invalid_image");
}

/// Two versions of the fixture model, `stable` and `candidate`, at `weights`.
fn versions_toml(weights: (u32, u32), extra: &str) -> String {
    let path = format!("{:?}", package_dir().display().to_string());
    format!(
        "[[models]]\nname = \"{MODEL}\"\nversion = \"stable\"\nweight = {}\npath = {path}\n\n\
         [[models]]\nname = \"{MODEL}\"\nversion = \"candidate\"\nweight = {}\npath = {path}\n\n\
         [server]\nhttp_workers = 2\nadmin_token = \"secret-token\"\n{extra}\n",
        weights.0, weights.1
    )
}

impl Server {
    /// The version that answered a one-token chat completion for `model`, with `headers`
    /// (and the body's `user` when given), checking the response names it alike throughout.
    fn version_answering(&self, model: &str, user: Option<&str>, headers: &[(&str, &str)]) -> String {
        let mut body = json!({"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]});
        if let Some(user) = user {
            body["user"] = json!(user);
        }
        let mut request = agent().post(self.url("/v1/chat/completions")).header("Content-Type", "application/json");
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let mut response = request.send(body.to_string()).unwrap();
        let header = response.headers().get("x-vlmserve-model-version").map(|v| v.to_str().unwrap().to_string());
        let answer: Value = serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap();
        assert_eq!(response.status(), 200, "{answer}");
        let version = header.unwrap_or_else(|| panic!("no version header: {answer}"));
        assert_eq!(answer["system_fingerprint"], json!(version), "{answer}");
        assert_eq!(answer["model"], json!(model), "the model as asked for: {answer}");
        version
    }

    /// An admin call: PUT for weights and shadow shares, POST for the others.
    fn admin(&self, path: &str, body: &Value) -> (u16, Value) {
        let url = self.url(path);
        let put = path.ends_with("/weights") || path.ends_with("/shadow");
        let request = if put { agent().put(url) } else { agent().post(url) };
        let response = request
            .header("Content-Type", "application/json")
            .header("Authorization", "Bearer secret-token")
            .send(body.to_string())
            .unwrap();
        status_and_json(response)
    }

    fn admin_delete(&self, path: &str) -> (u16, Value) {
        let response = agent().delete(self.url(path)).header("Authorization", "Bearer secret-token").call().unwrap();
        status_and_json(response)
    }
}

fn status_and_json(mut response: ureq::http::Response<ureq::Body>) -> (u16, Value) {
    let status = response.status().as_u16();
    (status, serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap())
}

/// A model with versions: unkeyed requests split by weight (within a 99.9% binomial bound), a
/// session key (header or `user`) always lands on one version, a weight change moves only the
/// keys that must move, `model@version` pins; versions are promoted, added from files (corrupt
/// ones refused), rolled back and removed.
#[test]
fn versions_split_requests_by_weight_and_keep_each_session_on_one() {
    let server = Server::start(&versions_toml((90, 10), ""));
    let candidate = (0..2000).filter(|_| server.version_answering(MODEL, None, &[]) == "candidate").count();
    // 200 expected; 3.29 standard deviations (13.4) either side.
    assert!((156..=244).contains(&candidate), "{candidate} of 2000 on the candidate at 10%");

    let keys: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
    let by_header = |key: &str| server.version_answering(MODEL, None, &[("x-session-id", key)]);
    let before: Vec<String> = keys.iter().map(|k| by_header(k)).collect();
    for (key, version) in keys.iter().zip(&before) {
        assert_eq!(&by_header(key), version, "{key} moved without a weight change");
        assert_eq!(&server.version_answering(MODEL, Some(key), &[]), version, "the user field keys alike");
    }
    let (status, listed) = server.admin(&format!("/admin/models/{MODEL}/weights"), &json!({"candidate": 20}));
    assert_eq!(status, 200, "{listed}");
    let weights: Vec<(Value, Value)> =
        listed["versions"].as_array().unwrap().iter().map(|v| (v["version"].clone(), v["weight"].clone())).collect();
    assert_eq!(weights, [(json!("stable"), json!(90)), (json!("candidate"), json!(20))]);
    let after: Vec<String> = keys.iter().map(|k| by_header(k)).collect();
    let moved: Vec<(&String, &String)> = before.iter().zip(&after).filter(|(b, a)| b != a).collect();
    assert!(moved.iter().all(|(b, a)| (b.as_str(), a.as_str()) == ("stable", "candidate")), "{moved:?}");
    assert!(!moved.is_empty() && moved.len() < 40, "{} of 200 moved from 10/100 to 20/110", moved.len());

    // Pinned: every request, whatever its key or the weights.
    for key in keys.iter().take(20) {
        assert_eq!(server.version_answering(&format!("{MODEL}@candidate"), Some(key), &[]), "candidate");
    }
    let (status, body) = server.post(
        "/v1/chat/completions",
        &json!({"model": format!("{MODEL}@nope"), "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_error(status, &body, 404, "model_not_found");

    // Listing and metrics show each version with its weight.
    let (_, models) = server.get("/v1/models");
    let models: Value = serde_json::from_str(&models).unwrap();
    let [model] = models["data"].as_array().unwrap().as_slice() else { panic!("{models}") };
    assert_eq!((&model["id"], &model["state"]), (&json!(MODEL), &json!("ready")), "{model}");
    assert_eq!(model["versions"][1]["id"], format!("{MODEL}@candidate"));
    assert!(model["versions"][1]["requests"]["length"].as_u64().unwrap() > 100, "{model}");
    assert_eq!(server.metric("vlmserve_model_version_weight", "version=\"candidate\""), 20.0);

    // Bad weight changes change nothing.
    let weights_path = format!("/admin/models/{MODEL}/weights");
    let (status, body) = server.admin(&weights_path, &json!({"nope": 5}));
    assert_error(status, &body, 404, "version_not_found");
    let (status, body) = server.admin(&weights_path, &json!({"stable": 0, "candidate": 0}));
    assert_error(status, &body, 400, "invalid_weights");
    let (status, body) = server.admin(&weights_path, &json!({"stable": "ten"}));
    assert_eq!(status, 400, "{body}");
    assert_eq!(server.metric("vlmserve_model_version_weight", "version=\"stable\""), 90.0);

    // Promotion: the candidate takes everything and the stable version is gone.
    let (status, body) = server.admin(&format!("/admin/models/{MODEL}/promote"), &json!({"version": "candidate"}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(versions_listed(&body), [("candidate".to_string(), 100)]);
    assert!(keys.iter().take(50).all(|k| by_header(k) == "candidate"));
    // The only version left taking requests can be neither rolled back nor removed.
    let rollback = format!("/admin/models/{MODEL}/rollback");
    let (status, body) = server.admin(&rollback, &json!({"version": "candidate"}));
    assert_error(status, &body, 400, "invalid_weights");
    let (status, body) = server.admin_delete(&format!("/admin/models/{MODEL}/versions/candidate"));
    assert_error(status, &body, 400, "invalid_weights");

    // Added from files: it answers once loaded, with its weight.
    let versions = format!("/admin/models/{MODEL}/versions");
    let entry = |version: &str, path: &Path, weight: u32| json!({"version": version, "path": path, "weight": weight, "precision": "fp32"});
    let (status, body) = server.admin(&versions, &entry("stable", &package_dir(), 90));
    assert_eq!(status, 201, "{body}");
    assert_eq!(versions_listed(&body), [("candidate".to_string(), 100), ("stable".to_string(), 90)]);
    assert_eq!(server.version_answering(&format!("{MODEL}@stable"), None, &[]), "stable");
    let (status, body) = server.admin(&versions, &entry("stable", &package_dir(), 10));
    assert_error(status, &body, 409, "version_exists");
    // Corrupt files are refused when added, and nothing changes.
    let corrupt = tempfile::tempdir().unwrap();
    common::copy_dir(&package_dir(), corrupt.path());
    replace_file(&corrupt.path().join("onnx"), "decoder_model_merged.onnx", b"not a graph");
    let (status, body) = server.admin(&versions, &entry("broken", corrupt.path(), 50));
    assert_error(status, &body, 422, "model_load_failed");
    let (_, listed) = server.get(&format!("/v1/models/{MODEL}"));
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(versions_listed(&listed), [("candidate".to_string(), 100), ("stable".to_string(), 90)]);
    let (status, body) = server.admin(&versions, &json!({"path": package_dir(), "weight": 5}));
    assert_error(status, &body, 400, "invalid_request");
    let (status, body) = server.admin(&versions, &json!({"version": "x", "path": package_dir(), "wieght": 5}));
    assert_error(status, &body, 400, "invalid_request");
    assert!(body["error"]["message"].as_str().unwrap().contains("wieght"), "the key is named: {body}");

    // Rollback: no more requests, unloaded (pinned requests get 503), listed with its reason.
    let (status, body) = server.admin(&rollback, &json!({"version": "candidate"}));
    assert_eq!(status, 200, "{body}");
    assert!(keys.iter().take(50).all(|k| by_header(k) == "stable"));
    let candidate = &body["versions"][0];
    assert_eq!((&candidate["state"], &candidate["weight"]), (&json!("unloaded"), &json!(0)), "{body}");
    assert_eq!(candidate["rollback"]["gate"], "admin", "{body}");
    let (status, body) = server.post(
        "/v1/chat/completions",
        &json!({"model": format!("{MODEL}@candidate"), "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_error(status, &body, 503, "model_unloaded");
    let (status, _) = server.get("/ready");
    assert_eq!(status, 200, "an unloaded version does not make the server unready");
    // A reload brings it back without traffic; weights give it some.
    let (status, body) = server.admin(&format!("/admin/models/{MODEL}@candidate/reload"), &json!({}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(server.version_answering(&format!("{MODEL}@candidate"), None, &[]), "candidate");
    assert!(keys.iter().take(20).all(|k| by_header(k) == "stable"));

    // Removed: gone from the listing and the metrics.
    let (status, body) = server.admin_delete(&format!("/admin/models/{MODEL}/versions/candidate"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(versions_listed(&body), [("stable".to_string(), 90)]);
    assert!(!server.get("/metrics").1.contains("version=\"candidate\""));
    let (status, body) = server.post(
        "/v1/chat/completions",
        &json!({"model": format!("{MODEL}@candidate"), "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_error(status, &body, 404, "model_not_found");
}

/// `(version, weight)` of a model as `/v1/models` lists it.
fn versions_listed(model: &Value) -> Vec<(String, u64)> {
    let versions = model["versions"].as_array().unwrap_or_else(|| panic!("no versions: {model}"));
    versions.iter().map(|v| (v["version"].as_str().unwrap().to_string(), v["weight"].as_u64().unwrap())).collect()
}

/// Weight changes, promotions, additions and rollbacks while 8 clients stream: every stream
/// completes.
#[test]
fn weight_changes_under_streaming_load_lose_no_request() {
    let server = Server::start(&versions_toml((50, 50), ""));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let stream = json!({
        "model": MODEL, "messages": [{"role": "user", "content": "Go on."}], "temperature": 0,
        "max_tokens": 24, "ignore_eos": true, "stream": true,
    });
    let (completed, changes) = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = 0;
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        let response = server.chat_response(&stream);
                        assert_eq!(response.status(), 200);
                        let events = read_events(response.into_body().into_reader());
                        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
                        let (_, finish, _) = stream_text(&events);
                        assert_eq!(finish.as_deref(), Some("length"), "{events:?}");
                        done += 1;
                    }
                    done
                })
            })
            .collect();
        let weights = format!("/admin/models/{MODEL}/weights");
        // Each round removes and unloads each version once while streams run on it.
        let steps = [
            (weights.clone(), json!({"stable": 90, "candidate": 10}), 200),
            (format!("/admin/models/{MODEL}/promote"), json!({"version": "candidate"}), 200),
            (
                format!("/admin/models/{MODEL}/versions"),
                json!({"version": "stable", "path": package_dir(), "weight": 100}),
                201,
            ),
            (format!("/admin/models/{MODEL}/rollback"), json!({"version": "candidate"}), 200),
            (format!("/admin/models/{MODEL}@candidate/reload"), json!({}), 200),
            (weights, json!({"stable": 50, "candidate": 50}), 200),
        ];
        let mut changes = 0;
        for _round in 0..3 {
            for (path, body, expected) in &steps {
                let (status, answer) = server.admin(path, body);
                assert_eq!(status, *expected, "{path}: {answer}");
                changes += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        (clients.into_iter().map(|c| c.join().unwrap()).sum::<usize>(), changes)
    });
    assert!(completed >= 16 && changes == 18, "{completed} streams, {changes} changes");
    assert_eq!(server.metric("vlmserve_requests_finished_total", "reason=\"error\""), 0.0);
}

/// Shadow copies: a version with the same files agrees on every greedy answer; one with other
/// files (another family's random weights) disagrees and the agreement gate takes its shadow
/// share away, with the reason listed; the client is answered by the stable version throughout.
#[test]
fn shadows_are_compared_and_a_disagreeing_one_is_rolled_back() {
    let path = format!("{:?}", package_dir().display().to_string());
    let server = Server::start(&format!(
        "[[models]]\nname = \"{MODEL}\"\nversion = \"stable\"\npath = {path}\n\n\
         [[models]]\nname = \"{MODEL}\"\nversion = \"candidate\"\nweight = 0\nshadow = 100\npath = {path}\n\n\
         [[models]]\nname = \"plain\"\npath = {path}\n\n\
         [server]\nhttp_workers = 2\nadmin_token = \"secret-token\"\n\
         [rollout]\nmin_requests = 4\ncheck_interval_s = 0.05\n"
    ));
    let image = image_bytes("images/one_image_0.png");
    let ask = |question: &str, temperature: f64| {
        let mut request = greedy(json!([user_with_images(std::slice::from_ref(&image), question)]), 8);
        request["temperature"] = json!(temperature);
        let (status, body) = server.post("/v1/chat/completions", &request);
        assert_eq!((status, &body["system_fingerprint"]), (200, &json!("stable")), "{body}");
    };
    let questions = ["What color?", "What shape?", "Describe it.", "How many?", "Where?", "Is it red?"];
    for question in questions {
        ask(question, 0.0);
    }
    ask("Anything.", 1.0);
    let deadline = Instant::now() + Duration::from_secs(60);
    let candidate = format!("model=\"{MODEL}@candidate\"");
    server.wait_for_metric(
        "vlmserve_shadow_requests_total",
        &candidate,
        |n| n >= 7.0,
        deadline,
        "every shadow copy is counted",
    );
    let listed = |version: &str| {
        let (_, body) = server.get(&format!("/v1/models/{MODEL}"));
        let body: Value = serde_json::from_str(&body).unwrap();
        let versions = body["versions"].as_array().unwrap().clone();
        versions.into_iter().find(|v| v["version"] == version).unwrap_or_else(|| panic!("{body}"))
    };
    let shadow = listed("candidate");
    assert_eq!(shadow["shadow"]["results"], json!({"agreed": 6, "uncompared": 1}), "{shadow}");
    assert_eq!(shadow["window"]["shadow_agreement"], json!(1.0), "{shadow}");
    assert_eq!(shadow["window"]["requests"], json!(7), "the copies ran on the shadow: {shadow}");
    assert_eq!(shadow["rollback"], Value::Null);

    let other = fixture_dir().parent().unwrap().join("qwen2-vl-tiny/package");
    let (status, body) = server.admin(
        &format!("/admin/models/{MODEL}/versions"),
        &json!({"version": "other", "path": other, "weight": 0, "shadow": 100}),
    );
    assert_eq!(status, 201, "{body}");
    // A version added at run time is listed with its model's others, each name once.
    let (_, all) = server.get("/v1/models");
    let all: Value = serde_json::from_str(&all).unwrap();
    let ids: Vec<&str> = all["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [MODEL, "plain"], "{all}");
    assert_eq!(all["data"][0]["versions"].as_array().unwrap().len(), 3, "{all}");
    // Bad shadow shares and additions change nothing.
    let shadow_path = format!("/admin/models/{MODEL}/shadow");
    let (status, body) = server.admin(&shadow_path, &json!({"candidate": 101}));
    assert_error(status, &body, 400, "invalid_weights");
    let (status, body) = server.admin(&shadow_path, &json!({"nope": 5}));
    assert_error(status, &body, 404, "version_not_found");
    let (status, body) = server.admin("/admin/models/plain/versions", &json!({"version": "b", "path": package_dir()}));
    assert_error(status, &body, 409, "model_has_no_versions");
    let (status, body) = server.admin("/admin/models/nope/versions", &json!({"version": "b", "path": package_dir()}));
    assert_error(status, &body, 404, "model_not_found");
    let (status, body) = server.admin(&format!("/admin/models/{MODEL}/versions"), &json!(["not", "an", "entry"]));
    assert_error(status, &body, 400, "invalid_request");
    assert_eq!(listed("candidate")["shadow"]["percent"], 100);
    for question in questions {
        ask(question, 0.0);
    }
    let rolled_back = || server.metric("vlmserve_rollbacks_total", &format!("model=\"{MODEL}@other\""));
    while rolled_back() == 0.0 {
        assert!(Instant::now() < deadline, "the disagreeing shadow is not rolled back: {}", listed("other"));
        std::thread::sleep(Duration::from_millis(10));
    }
    let other = listed("other");
    assert_eq!(other["shadow"]["percent"], 0, "{other}");
    assert_eq!(other["rollback"]["gate"], "shadow_agreement", "{other}");
    assert!(other["rollback"]["reason"].as_str().unwrap().contains("below 90.0%"), "{other}");
    assert!(other["shadow"]["results"]["disagreed"].as_u64().unwrap() >= 4, "{other}");
    let shadow = listed("candidate");
    assert_eq!((&shadow["shadow"]["percent"], &shadow["rollback"]), (&json!(100), &Value::Null), "{shadow}");
    assert_eq!(server.metric("vlmserve_model_version_shadow_percent", "version=\"other\""), 0.0);
}

/// `vlmserve eval --url` scores a served version through the API as local `eval` scores the
/// same files, item for item; `--min-accuracy` fails the command below its threshold.
#[test]
fn eval_through_the_api_matches_local_eval() {
    let package = common::root().join("models/shapes-vlm/package");
    let path = format!("{:?}", package.display().to_string());
    let server = Server::start(&format!(
        "[[models]]\nname = \"shapes\"\nversion = \"stable\"\npath = {path}\n\n\
         [[models]]\nname = \"shapes\"\nversion = \"candidate\"\nweight = 0\nprecision = \"int8\"\npath = {path}\n\n\
         [server]\nhttp_workers = 2\n"
    ));
    let eval = |data: &Path, args: &[&str]| {
        let out = common::vlmserve().arg("eval").arg("--data").arg(data).arg("--json").args(args).output().unwrap();
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (out.status.success(), report, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let data = common::root().join("tests/fixtures/eval-small/eval.jsonl");
    let url = server.url("");
    let (ok, remote, stderr) = eval(&data, &["--url", &url, "--model", "shapes@candidate", "--min-accuracy", "0.9"]);
    assert!(ok, "{stderr}");
    let (ok, local, stderr) = eval(&data, &["--model", package.to_str().unwrap(), "--precision", "int8"]);
    assert!(ok, "{stderr}");
    let items = |report: &Value| -> Vec<(Value, Value, Value)> {
        let predictions = report["predictions"].as_array().unwrap();
        predictions
            .iter()
            .map(|p| (p["line"].clone(), p["prediction"].clone(), p["generated_tokens"].clone()))
            .collect()
    };
    assert_eq!(items(&remote), items(&local));
    assert_eq!(items(&remote).len(), 20);
    for key in ["vqa", "caption", "per_kind", "failed"] {
        assert_eq!(remote[key], local[key], "{key}");
    }
    assert_eq!(remote["answered_by"], json!(["candidate"]), "the pinned version answered");

    // A set the model gets wrong: below the threshold, the command fails and says why.
    let work = tempfile::tempdir().unwrap();
    let wrong: String = std::fs::read_to_string(&data)
        .unwrap()
        .lines()
        .take(4)
        .map(|line| {
            let mut item: Value = serde_json::from_str(line).unwrap();
            item["image"] = json!(data.parent().unwrap().join(item["image"].as_str().unwrap()));
            item["answers"] = json!(["no such answer"]);
            format!("{item}\n")
        })
        .collect();
    std::fs::write(work.path().join("wrong.jsonl"), wrong).unwrap();
    let (ok, report, stderr) =
        eval(&work.path().join("wrong.jsonl"), &["--url", &url, "--model", "shapes", "--min-accuracy", "0.5"]);
    assert!(!ok && stderr.contains("VQA accuracy 0.00% is below --min-accuracy 50.00%"), "{stderr}");
    assert_eq!(report["vqa"]["accuracy"], json!(0.0), "the report is written all the same");
    let (ok, _, stderr) = eval(&data, &["--url", &url, "--model", "shapes", "--min-accuracy", "85"]);
    assert!(!ok && stderr.contains("85 is not a fraction from 0 to 1"), "{stderr}");
}
