//! Malformed and mutated requests against every route: a hand-written corpus of nasty inputs,
//! then thousands of requests mutated from valid ones with a fixed seed (JSON edits, byte
//! edits, wrong headers, broken multipart). Every answer must be a client error or a success,
//! never a 5xx, a reset connection or a hang, and the server must answer normally after.

use std::time::{Duration, Instant};

use base64::Engine as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use super::{MODEL, Server, agent, config_toml, package_dir, png};

/// One request: route, content type and body.
struct Probe {
    path: &'static str,
    content_type: String,
    body: Vec<u8>,
}

const POST_ROUTES: [&str; 4] =
    ["/v1/chat/completions", "/v1/responses", "/v1/vqa", "/admin/models/idefics3-tiny/reload"];

fn image_url() -> String {
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png(16, 12)))
}

/// Valid requests to mutate, one or more per route.
fn seeds() -> Vec<(&'static str, Value)> {
    let image = json!({"type": "image_url", "image_url": {"url": image_url(), "detail": "low"}});
    vec![
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "max_tokens": 3, "temperature": 0.5, "seed": 1, "stop": ["x"],
                   "messages": [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": [image, {"type": "text", "text": "What?"}]}]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "max_tokens": 3, "n": 2, "logprobs": true, "top_logprobs": 2, "stream": true,
                   "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}},
                   "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "max_tokens": 8, "tool_choice": "required",
                   "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}],
                   "messages": [{"role": "user", "content": "hi"},
                                {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                                {"role": "tool", "tool_call_id": "c", "content": "1"}]}),
        ),
        (
            "/v1/responses",
            json!({"model": MODEL, "max_output_tokens": 3, "instructions": "Short.", "stream": false,
                   "input": [{"role": "user", "content": [{"type": "input_image", "image_url": image_url()}, {"type": "input_text", "text": "What?"}]}]}),
        ),
        ("/v1/vqa", json!({"model": MODEL, "image": image_url(), "question": "What?", "max_tokens": 3})),
    ]
}

/// A JSON value of a random kind, sometimes extreme.
fn random_value(rng: &mut StdRng, depth: usize) -> Value {
    match rng.random_range(0..12) {
        0 => Value::Null,
        1 => json!(rng.random::<bool>()),
        2 => json!(rng.random::<i64>()),
        3 => json!([-1.0, 0.0, 1.0, u64::MAX as f64, 1e308, -1e308, 0.5][rng.random_range(0..7)]),
        4 => json!("x".repeat(rng.random_range(0..5000))),
        5 => json!(
            [
                "",
                "auto",
                "none",
                "required",
                "text",
                "image_url",
                "data:",
                "data:image/png;base64,AAAA",
                "\u{0}",
                "\u{fffd}"
            ][rng.random_range(0..10)]
        ),
        6 if depth < 4 => Value::Array((0..rng.random_range(0..4)).map(|_| random_value(rng, depth + 1)).collect()),
        7 if depth < 4 => {
            let keys = ["type", "text", "url", "role", "content", "name", "schema", "function", "image_url"];
            (0..rng.random_range(0..4))
                .map(|_| (keys[rng.random_range(0..keys.len())].to_string(), random_value(rng, depth + 1)))
                .collect::<serde_json::Map<_, _>>()
                .into()
        }
        _ => json!(rng.random_range(-3..40)),
    }
}

/// Every value in `value`, by path, so one can be picked to edit.
fn paths(value: &Value, at: Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(at.clone());
    match value {
        Value::Object(map) => map.iter().for_each(|(k, v)| paths(v, [at.clone(), vec![k.clone()]].concat(), out)),
        Value::Array(items) => {
            items.iter().enumerate().for_each(|(i, v)| paths(v, [at.clone(), vec![i.to_string()]].concat(), out))
        }
        _ => {}
    }
}

fn pointer(path: &[String]) -> String {
    path.iter().map(|p| format!("/{p}")).collect()
}

/// A valid request with one to three JSON edits (replace, delete, add a field), then maybe a
/// byte edit and a wrong header.
fn mutated(rng: &mut StdRng, seeds: &[(&'static str, Value)]) -> Probe {
    let (path, seed) = &seeds[rng.random_range(0..seeds.len())];
    let mut value = seed.clone();
    for _ in 0..rng.random_range(1..=3) {
        let mut all = Vec::new();
        paths(&value, Vec::new(), &mut all);
        let target = all[rng.random_range(0..all.len())].clone();
        match rng.random_range(0..3) {
            0 => {
                if let Some(slot) = value.pointer_mut(&pointer(&target)) {
                    *slot = random_value(rng, 0);
                }
            }
            1 if !target.is_empty() => {
                let (last, parent) = target.split_last().unwrap();
                match value.pointer_mut(&pointer(parent)) {
                    Some(Value::Object(map)) => {
                        map.remove(last);
                    }
                    Some(Value::Array(items)) => {
                        let i: usize = last.parse().unwrap();
                        if i < items.len() {
                            items.remove(i);
                        }
                    }
                    _ => {}
                }
            }
            _ => {
                if let Some(Value::Object(map)) = value.pointer_mut(&pointer(&target)) {
                    let key = ["n", "stream", "tools", "detail", "max_pixels", "guided_regex", "seed", "extra"]
                        [rng.random_range(0..8)];
                    map.insert(key.to_string(), random_value(rng, 0));
                }
            }
        }
    }
    let mut body = value.to_string().into_bytes();
    match rng.random_range(0..8) {
        0 if !body.is_empty() => body.truncate(rng.random_range(0..body.len())),
        1 if !body.is_empty() => {
            let i = rng.random_range(0..body.len());
            body[i] = rng.random();
        }
        2 => body.splice(0..0, [0xEF, 0xBB, 0xBF]).for_each(drop),
        _ => {}
    }
    let content_type = match rng.random_range(0..10) {
        0 => "text/plain".to_string(),
        1 => "multipart/form-data; boundary=zz".to_string(),
        2 => String::new(),
        _ => "application/json".to_string(),
    };
    Probe { path, content_type, body }
}

/// A multipart body for `/v1/vqa` with random parts, boundaries and truncation.
fn multipart(rng: &mut StdRng) -> Probe {
    let boundary = ["b0undary", "", "a b", "x"][rng.random_range(0..4)];
    let mut body = Vec::new();
    let image = png(rng.random_range(1..40), rng.random_range(1..40));
    let parts: [(&str, &[u8]); 4] =
        [("image", &image), ("question", b"What?"), ("max_tokens", b"2"), ("temperature", b"nan")];
    for _ in 0..rng.random_range(0..5) {
        let (name, data) = parts[rng.random_range(0..parts.len())];
        let filename = if name == "image" { "; filename=\"a.png\"" } else { "" };
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"{filename}\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    if rng.random_range(0..4) == 0 && !body.is_empty() {
        body.truncate(rng.random_range(0..body.len()));
    }
    Probe { path: "/v1/vqa", content_type: format!("multipart/form-data; boundary={boundary}"), body }
}

/// Inputs written by hand: deep nesting, huge numbers, invalid UTF-8, NUL, empty images.
fn corpus() -> Vec<Probe> {
    let json = |path, body: String| Probe { path, content_type: "application/json".into(), body: body.into_bytes() };
    let chat = |content: Value| {
        json!({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": content}]}).to_string()
    };
    let mut probes = vec![
        json("/v1/chat/completions", "[".repeat(100_000)),
        json("/v1/chat/completions", format!("{}{}", "{\"a\":".repeat(5000), "}".repeat(5000))),
        json("/v1/chat/completions", "{\"model\": 1e999999}".into()),
        json("/v1/chat/completions", "{\"max_tokens\": 18446744073709551616}".into()),
        json("/v1/chat/completions", chat(json!("\u{0}\u{0}"))),
        json(
            "/v1/chat/completions",
            chat(json!([{"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}])),
        ),
        json("/v1/chat/completions", chat(json!([{"type": "image_url", "image_url": {"url": "data:;base64,AAAA"}}]))),
        json("/v1/chat/completions", chat(json!([{"type": "image_url", "image_url": "data:image/png;base64,===="}]))),
        json("/v1/chat/completions", chat(json!([{"type": "text", "text": "a".repeat(1 << 20)}]))),
        json("/v1/responses", json!({"input": [], "previous_response_id": "r"}).to_string()),
        json("/v1/responses", json!({"input": {"role": "user"}}).to_string()),
        json("/v1/vqa", json!({"image": "////", "question": ""}).to_string()),
        json("/admin/models/idefics3-tiny/reload", "{}".into()),
    ];
    // Cut off before its closing boundary: the multipart parser used to wait for more.
    let cut = b"--b\r\nContent-Disposition: form-data; name=\"question\"\r\n\r\nWhat?".to_vec();
    probes.push(Probe { path: "/v1/vqa", content_type: "multipart/form-data; boundary=b".into(), body: cut });
    let mut invalid_utf8 = chat(json!("hello")).into_bytes();
    invalid_utf8.splice(30..30, [0xFF, 0xFE, 0xC0]).for_each(drop);
    probes.push(Probe { path: "/v1/chat/completions", content_type: "application/json".into(), body: invalid_utf8 });
    probes
}

fn send(server: &Server, probe: &Probe) -> Result<u16, String> {
    let mut request = agent().post(server.url(probe.path));
    if !probe.content_type.is_empty() {
        request = request.header("Content-Type", &probe.content_type);
    }
    let mut response = request.send(&probe.body[..]).map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    // Read the whole answer (a stream to its end): a hang shows as the agent's timeout.
    response.body_mut().with_config().limit(64 << 20).read_to_vec().map_err(|e| e.to_string())?;
    Ok(status)
}

#[test]
fn malformed_and_fuzzed_requests_never_get_a_5xx_and_the_server_serves_on() {
    let server = Server::start(&config_toml(&package_dir(), "admin_token = \"t\"\nmax_body_bytes = 4000000"));
    let mut rng = StdRng::seed_from_u64(24);
    let seeds = seeds();
    let mut probes = corpus();
    probes.extend((0..4000).map(|_| mutated(&mut rng, &seeds)));
    probes.extend((0..600).map(|_| multipart(&mut rng)));
    for path in POST_ROUTES {
        probes.push(Probe { path, content_type: "application/json".into(), body: Vec::new() });
    }
    let started = Instant::now();
    let mut statuses = std::collections::BTreeMap::new();
    for (i, probe) in probes.iter().enumerate() {
        let status = send(&server, probe).unwrap_or_else(|e| {
            panic!(
                "probe {i} to {} failed ({e}): {}",
                probe.path,
                String::from_utf8_lossy(&probe.body[..probe.body.len().min(300)])
            )
        });
        assert!(
            status < 500,
            "probe {i} to {} got {status}: {}",
            probe.path,
            String::from_utf8_lossy(&probe.body[..probe.body.len().min(300)])
        );
        *statuses.entry(status).or_insert(0) += 1;
    }
    println!("{} probes in {:.1} s: {statuses:?}", probes.len(), started.elapsed().as_secs_f64());
    assert!(statuses.get(&200).is_some_and(|&n| n > 0), "no mutation stayed valid: {statuses:?}");
    assert!(started.elapsed() < Duration::from_secs(600));
    let (status, health) = server.get("/health");
    assert_eq!(status, 200, "{health}");
    let (status, body) = server.post(
        "/v1/chat/completions",
        &json!({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(status, 200, "{body}");
}
