//! The baseline for the echo benchmark: a plain tokio echo server, the way
//! one would write it natively. Prints `listening on ADDR` on stderr.
//!
//! `echo-native [ADDR] [THREADS]`: THREADS worker threads (default: one per
//! core, tokio's default).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn main() -> anyhow::Result<()> {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = std::env::args().nth(2) {
        rt.worker_threads(threads.parse()?);
    }
    rt.enable_all().build()?.block_on(serve())
}

async fn serve() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = TcpListener::bind(&addr).await?;
    eprintln!("listening on {}", listener.local_addr()?);
    loop {
        let (mut conn, _) = listener.accept().await?;
        let _ = conn.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8 * 1024];
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if conn.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}
