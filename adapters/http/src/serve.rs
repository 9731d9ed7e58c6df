//! Serving a router on a TCP listener, with graceful shutdown: what `axum::serve` does,
//! with hyper's own header limits set well above the service's, so that a request over
//! the service's limits gets its JSON error (`431 headers_too_large`, see
//! [`headers_too_large`](crate::input::headers_too_large)) rather than hyper's bare 431.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

/// Most header fields hyper itself reads before it answers a bare 431: well above
/// [`MAX_HEADERS`](crate::input::MAX_HEADERS).
const HYPER_MAX_HEADERS: usize = 1024;
/// Most bytes hyper buffers for a request head before it answers a bare 431: well above
/// [`MAX_HEADER_BYTES`](crate::input::MAX_HEADER_BYTES).
const HYPER_MAX_BUF: usize = 1 << 20;

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting, lets each
/// connection finish its request in flight (a graceful close), and returns once all are
/// closed. An accept that fails (out of file descriptors, say) is retried after a pause.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let (stop, stopped) = watch::channel(false);
    let connections = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let mut stopped = stopped.clone();
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .max_headers(HYPER_MAX_HEADERS)
                .max_buf_size(HYPER_MAX_BUF);
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            let stopping = async {
                let _ = stopped.wait_for(|s| *s).await;
            };
            tokio::select! {
                _ = connection.as_mut() => return,
                () = stopping => {}
            }
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        });
    }
    let _ = stop.send(true);
    connections.close();
    connections.wait().await;
    Ok(())
}
