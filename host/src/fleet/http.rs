//! The admin HTTP listener (`serve --admin ADDR`), for orchestrators and
//! monitoring. HTTP/1.1, `GET` (or `HEAD`) only:
//!
//! | path | 200 when | body |
//! |---|---|---|
//! | `/livez` | the process runs and its service (if any) answers and has not stopped | `ok`, or why not (503) |
//! | `/readyz` | serving and accepting: not draining, not handing off, has a service | `ready`, or the state (503) |
//! | `/metrics` | always | Prometheus text format ([`super::metrics`]) |
//!
//! A liveness failure means "restart this process"; readiness failure
//! means "send it no new work". A host waiting for a service is alive and
//! not ready.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::{State, health, metrics};

/// Serves the admin endpoints until the process exits.
pub async fn serve(listener: TcpListener) {
    loop {
        let (stream, _) = crate::net::accept_retrying(&listener, "admin listener").await;
        tokio::spawn(async move {
            let service = hyper::service::service_fn(answer);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("admin connection: {e}");
            }
        });
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are served here\n".into(),
        );
        r.headers_mut()
            .insert(hyper::header::ALLOW, "GET, HEAD".parse().expect("header"));
        return Ok(r);
    }
    let (state, status) = health().state().await;
    let response = match request.uri().path() {
        "/livez" => match &state {
            State::Failed(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
            _ => text(StatusCode::OK, "ok\n".into()),
        },
        "/readyz" => match &state {
            State::Ready => text(StatusCode::OK, "ready\n".into()),
            other => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {}\n", other.describe()),
            ),
        },
        "/metrics" => {
            let mut r = text(StatusCode::OK, metrics::render(state, status));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
                    .parse()
                    .expect("header"),
            );
            r
        }
        other => text(
            StatusCode::NOT_FOUND,
            format!("no {other} here: /livez, /readyz and /metrics are\n"),
        ),
    };
    Ok(response)
}
