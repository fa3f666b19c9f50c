//! The HTTP side door every process has: `/healthz` (the process runs), `/readyz` (it can
//! serve), and Prometheus `/metrics`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Why a started process can no longer serve (a broker whose disk failed); asked by `/readyz`.
pub type Fault = Box<dyn Fn() -> Option<String> + Send + Sync>;

/// What the HTTP endpoints report.
pub struct HealthState {
    /// Metrics of the process, once it has them.
    registry: OnceLock<Registry>,
    /// Set once the process can serve requests.
    pub ready: AtomicBool,
    /// A condition that makes the process unready whatever `ready` says.
    fault: OnceLock<Fault>,
}

impl HealthState {
    /// A not-yet-ready state with the given metrics and, if any, a fault to check.
    pub fn new(registry: Registry, fault: Option<Fault>) -> Arc<HealthState> {
        let state = HealthState::starting();
        state.started(registry, fault);
        state
    }

    /// A state for a process still starting (a broker recovering its store): alive and not
    /// ready, with no metrics yet. Served from the start, so that a liveness probe does not
    /// kill a long recovery.
    pub fn starting() -> Arc<HealthState> {
        Arc::new(HealthState {
            registry: OnceLock::new(),
            ready: AtomicBool::new(false),
            fault: OnceLock::new(),
        })
    }

    /// Gives a started process's metrics and fault check to the endpoints (first call wins).
    pub fn started(&self, registry: Registry, fault: Option<Fault>) {
        let _ = self.registry.set(registry);
        if let Some(f) = fault {
            let _ = self.fault.set(f);
        }
    }
}

fn respond(state: &HealthState, path: &str) -> Response<Full<Bytes>> {
    let (status, body, ctype) = match path {
        "/healthz" => (StatusCode::OK, "ok\n".to_string(), "text/plain"),
        "/readyz" => match state.fault.get().and_then(|f| f()) {
            Some(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
                "text/plain",
            ),
            None if state.ready.load(Ordering::Acquire) => {
                (StatusCode::OK, "ready\n".to_string(), "text/plain")
            }
            None => (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready\n".to_string(),
                "text/plain",
            ),
        },
        "/metrics" => {
            let mut out = String::new();
            let empty = Registry::default();
            let registry = state.registry.get().unwrap_or(&empty);
            match prometheus_client::encoding::text::encode(&mut out, registry) {
                Ok(()) => (
                    StatusCode::OK,
                    out,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("encoding metrics failed: {e}\n"),
                    "text/plain",
                ),
            }
        }
        _ => (
            StatusCode::NOT_FOUND,
            "not found\n".to_string(),
            "text/plain",
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Binds the HTTP port; fails early (at start-up) if it is taken.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    crate::net::bind(addr).await
}

/// Serves the endpoints until `shutdown` fires.
pub async fn serve(listener: TcpListener, state: Arc<HealthState>, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, say: the error repeats until one is freed, and
                // trying again at once would spin a core.
                tracing::warn!(error = %e, "http accept failed");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
                }
                continue;
            }
        };
        let st = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let st = st.clone();
                async move { Ok::<_, Infallible>(respond(&st, req.uri().path())) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        });
    }
}
