//! `hello-world ADDR`: the axum hello-world that `http_load.sh` measures next to
//! `sessiond`, on the same kind of runtime (tokio multi-thread, HTTP/1.1).

use axum::Router;
use axum::routing::get;

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18181".to_owned());
    let app = Router::new().route("/", get(|| async { "Hello, World!" }));
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
    println!("hello-world listening on http://{addr}");
    axum::serve(listener, app).await.expect("serve");
}
