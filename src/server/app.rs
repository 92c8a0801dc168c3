//! Starting and stopping the server: binding, the actix app and its routes, model loading in
//! the background, and graceful shutdown on SIGTERM/SIGINT.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Service;
use actix_web::{App, HttpResponse, HttpServer, web};
use futures_util::future::Either;

use super::errors::ApiError;
use super::response_cache::ResponseCache;
use super::{AppState, ReloadSettings, ServerError, admin, health, hosts, openai, page, request, responses, vqa};
use crate::config::{ServerSettings, Settings};
use crate::engine::ModelOptions;
use crate::preprocess::{ImageLimits, MemoryBudget};
use crate::scheduler::{Metrics, Scheduler};

/// Serve `settings` until SIGTERM/SIGINT. Prints `listening on http://ADDR` on stdout once bound.
pub fn run(settings: Settings, reload_settings: ReloadSettings) -> Result<(), ServerError> {
    let server = settings.server.clone();
    let addr = format!("{}:{}", server.host, server.port);
    let listener = TcpListener::bind(&addr).map_err(|error| ServerError::Bind { addr: addr.clone(), error })?;
    let bound = listener.local_addr()?;
    let metrics = Metrics::new();
    let scheduler =
        Scheduler::new(&settings.models, settings.scheduler.clone(), settings.rollout.clone(), metrics.clone());
    let state = web::Data::new(app_state(&server, scheduler.clone(), metrics, reload_settings));
    actix_web::rt::System::new().block_on(serve(listener, bound, server, settings, scheduler, state))
}

fn app_state(
    server: &ServerSettings,
    scheduler: Arc<Scheduler>,
    metrics: Arc<Metrics>,
    reload_settings: ReloadSettings,
) -> AppState {
    AppState {
        scheduler,
        metrics,
        image_limits: ImageLimits {
            max_pixels: server.max_image_pixels,
            max_side: server.max_image_side,
            max_bytes: server.max_image_bytes,
        },
        decoding: request::Decoding {
            budget: Arc::new(MemoryBudget::new(server.image_decode_budget_mb << 20)),
            wait: Duration::from_secs_f64(server.image_decode_wait_s),
        },
        max_images: server.max_images_per_request,
        body_limits: request::BodyLimits {
            max_bytes: server.max_body_bytes,
            timeout: Duration::from_secs_f64(server.body_read_timeout_s),
            in_flight: Arc::new(MemoryBudget::new(server.body_bytes_in_flight_mb << 20)),
        },
        hosts: hosts::AllowedHosts::new(&server.allowed_hosts, &server.host),
        session_header: Some(server.session_header.trim().to_ascii_lowercase()).filter(|h| !h.is_empty()),
        default_max_tokens: server.default_max_tokens,
        default_temperature: server.default_temperature,
        expose_cache_hits: server.expose_cache_hits,
        response_cache: ResponseCache::new(
            server.response_cache_mb << 20,
            Duration::from_secs_f64(server.response_cache_ttl_s),
        )
        .map(Arc::new),
        request_timeout: (server.request_timeout_s > 0.0).then(|| Duration::from_secs_f64(server.request_timeout_s)),
        admin_token: server.admin_token.clone().filter(|t| !t.trim().is_empty()),
        reload_settings,
        remote_images: request::RemoteImages::new(
            &server.remote_image_hosts,
            Duration::from_secs_f64(server.remote_image_timeout_s),
            server.max_image_bytes,
        )
        .map(Arc::new),
    }
}

async fn serve(
    listener: TcpListener,
    bound: SocketAddr,
    server: ServerSettings,
    settings: Settings,
    scheduler: Arc<Scheduler>,
    state: web::Data<AppState>,
) -> Result<(), ServerError> {
    let admin = state.admin_token.is_some();
    let mut http = HttpServer::new(move || {
        let metrics = state.metrics.clone();
        let hosts = state.hosts.clone();
        let mut app = App::new()
            .app_data(state.clone())
            .wrap_fn(move |req, srv| {
                let route = req.match_pattern().unwrap_or_else(|| "unmatched".into());
                let metrics = metrics.clone();
                let outcome = match hosts.refuses(req.request()) {
                    None => Either::Left(srv.call(req)),
                    Some(error) => Either::Right(req.error_response(error)),
                };
                async move {
                    let response = match outcome {
                        Either::Left(response) => response.await?.map_into_boxed_body(),
                        Either::Right(refused) => refused,
                    };
                    metrics.http_requests.with_label_values(&[route.as_str(), response.status().as_str()]).inc();
                    Ok(response)
                }
            })
            .route("/", web::get().to(page::index))
            .route("/page/{file}", web::get().to(page::asset))
            .route("/health", web::get().to(health::health))
            .route("/ready", web::get().to(health::ready))
            .route("/metrics", web::get().to(health::metrics))
            .route("/v1/models", web::get().to(openai::list_models))
            .route("/v1/models/{name}", web::get().to(openai::get_model))
            .route("/v1/models/{name}/examples/{image}", web::get().to(openai::model_example))
            .route("/v1/chat/completions", web::post().to(openai::chat_completions))
            .route("/v1/responses", web::post().to(responses::responses))
            .route("/v1/vqa", web::post().to(vqa::vqa));
        if admin {
            app = app
                .route("/admin/models/{name}/reload", web::post().to(admin::reload))
                .route("/admin/models/{name}/weights", web::put().to(admin::weights))
                .route("/admin/models/{name}/promote", web::post().to(admin::promote))
                .route("/admin/models/{name}/rollback", web::post().to(admin::rollback))
                .route("/admin/models/{name}/shadow", web::put().to(admin::shadow))
                .route("/admin/models/{name}/versions", web::post().to(admin::add_version))
                .route("/admin/models/{name}/versions/{version}", web::delete().to(admin::remove_version));
        }
        app.default_service(web::to(not_found))
    })
    // A client that closes its side is gone: drop its request, which cancels the generation
    // (actix otherwise notices only when it next writes, i.e. never for a non-streaming wait).
    .h1_allow_half_closed(false)
    .disable_signals()
    // Past our own timeout, running requests are ended with a 503 that still has to be written.
    .shutdown_timeout(server.shutdown_timeout_s + RESPONSE_GRACE_S);
    if server.http_workers > 0 {
        http = http.workers(server.http_workers);
    }
    let http = http.listen(listener)?.run();
    let handle = http.handle();
    println!("listening on http://{bound}");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    tracing::info!(%bound, admin, "listening");

    let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel();
    let loader = scheduler.clone();
    std::thread::spawn(move || {
        let result = loader.load_all(|m: &crate::config::ModelSettings| -> ModelOptions { settings.model_options(m) });
        let _ = loaded_tx.send(result);
    });

    let stopper = handle.clone();
    let on_signal = scheduler.clone();
    let delay = Duration::from_secs_f64(server.shutdown_delay_s);
    let timeout = Duration::from_secs(server.shutdown_timeout_s);
    actix_web::rt::spawn(async move {
        let signal = wait_for_signal().await;
        // A load balancer sees /ready fail and stops sending before the listener goes.
        on_signal.begin_draining();
        let delay = if signal == Signal::Terminate { delay } else { Duration::ZERO };
        tracing::info!(delay_s = delay.as_secs_f64(), "draining: /ready answers 503, requests are still served");
        actix_web::rt::time::sleep(delay).await;
        tracing::info!(
            in_flight = on_signal.in_flight(),
            "shutting down: new and queued requests are refused, running ones may finish"
        );
        on_signal.begin_shutdown();
        let ender = on_signal.clone();
        actix_web::rt::spawn(async move {
            actix_web::rt::time::sleep(timeout).await;
            ender.end_running();
        });
        stopper.stop(true).await;
    });

    let failure = Arc::new(std::sync::Mutex::new(None));
    let failed = failure.clone();
    let exit_on_failure = server.exit_on_load_failure;
    actix_web::rt::spawn(async move {
        if let Ok(Err(e)) = loaded_rx.await {
            if !exit_on_failure {
                return;
            }
            *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            handle.stop(false).await;
        }
    });
    http.await?;
    // Nothing decodes once the server says it stopped.
    scheduler.end_running();
    let deadline = std::time::Instant::now() + Duration::from_secs(RESPONSE_GRACE_S);
    while scheduler.running() > 0 && std::time::Instant::now() < deadline {
        actix_web::rt::time::sleep(Duration::from_millis(10)).await;
    }
    if let Some(e) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e.into());
    }
    tracing::info!("stopped");
    Ok(())
}

/// Seconds after `shutdown_timeout_s` for the responses of the requests it ended to be written.
const RESPONSE_GRACE_S: u64 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    /// SIGTERM, as an orchestrator sends it: drain with the delay.
    Terminate,
    /// SIGINT (Ctrl-C): someone at a terminal, no delay.
    Interrupt,
}

async fn wait_for_signal() -> Signal {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => Signal::Terminate,
            _ = int.recv() => Signal::Interrupt,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        Signal::Interrupt
    }
}

async fn not_found(req: actix_web::HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::not_found(format!("no route for {} {}", req.method(), req.path())))
}
