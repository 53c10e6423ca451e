//! The control socket's client side, used by `wasmhost swap`, `status` and
//! `rollback`.

use std::path::Path;

use anyhow::{Context, Result, bail};
use tokio::net::UnixStream;

use super::protocol::{self, Request, RequestFrame, Response, ResponseFrame, VERSION};

/// Sends one request and returns the response. A `Response::Error` is
/// returned as it is, for the caller to report. A request that reached a
/// host process just as it handed its service over is sent again.
pub async fn request(socket: &Path, request: Request) -> Result<Response> {
    for _ in 0..3 {
        match request_once(socket, request.clone()).await? {
            Response::Moved => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            response => return Ok(response),
        }
    }
    bail!(
        "the service at {} kept moving between host processes; try again",
        socket.display()
    )
}

async fn request_once(socket: &Path, request: Request) -> Result<Response> {
    let mut stream = match UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "no wasmhost service is listening on {}: start one with `wasmhost serve --name NAME ...`, \
             or pass the same --name / --control as the service",
            socket.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => bail!(
            "the control socket {} is stale (its service has exited)",
            socket.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot connect to {}", socket.display())),
    };
    protocol::write_frame(
        &mut stream,
        &RequestFrame {
            version: VERSION,
            request,
        },
    )
    .await?;
    let frame: ResponseFrame = protocol::read_frame(&mut stream)
        .await
        .with_context(|| format!("no valid reply from {}", socket.display()))?;
    Ok(frame.response)
}
