//! Baseline 1: the null server. Same HTTP stack, reads the whole body and
//! answers `200 OK` without parsing or persisting anything. It measures the
//! cost of HTTP itself (and of the load generator) on this machine.

use std::net::SocketAddr;

use http_body_util::BodyExt;
use hyper::StatusCode;

use crate::server::{serve, text};

pub async fn run(listen: SocketAddr) -> anyhow::Result<()> {
    serve(
        "null-server",
        listen,
        |req: hyper::Request<hyper::body::Incoming>| async move {
            match req.into_body().collect().await {
                Ok(_) => text(StatusCode::OK, "OK"),
                Err(_) => text(StatusCode::BAD_REQUEST, "could not read body"),
            }
        },
    )
    .await
}
