//! A static HTTP/1.1 file server with single-range `Range` support and keep-alive: what nginx
//! does for a published snapshot directory (a bucket), nothing more. For the examples.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;

/// Serves `root` on a fresh port of 127.0.0.1 in the background; returns its address.
pub async fn start(root: PathBuf) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            // As nginx does (tcp_nodelay on): a response's last segment does not wait for an ACK.
            let _ = sock.set_nodelay(true);
            let root = root.clone();
            tokio::spawn(async move {
                let _ = serve_conn(sock, &root).await;
            });
        }
    });
    Ok(addr)
}

async fn serve_conn(sock: tokio::net::TcpStream, root: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    use tokio::io::AsyncBufReadExt;
    let mut sock = tokio::io::BufReader::new(sock);
    let mut buf = vec![0u8; 256 << 10];
    let mut head = Vec::new();
    loop {
        head.clear();
        while !head.ends_with(b"\r\n\r\n") {
            if sock.read_until(b'\n', &mut head).await? == 0 {
                return Ok(());
            }
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
        let range = text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            let (a, b) = k
                .eq_ignore_ascii_case("range")
                .then_some(v.trim().strip_prefix("bytes=")?)?
                .split_once('-')?;
            Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?))
        });
        let relative = path.trim_start_matches('/');
        let opened = if relative.split('/').any(|p| p == "..") {
            Err(std::io::Error::other("outside the root"))
        } else {
            std::fs::File::open(root.join(relative))
        };
        let Ok(file) = opened else {
            sock.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                .await?;
            continue;
        };
        let size = file.metadata()?.len();
        let (start, end, status, extra) = match range {
            Some((a, b)) if a <= b && b < size => (
                a,
                b + 1,
                "206 Partial Content",
                format!("Content-Range: bytes {a}-{b}/{size}\r\n"),
            ),
            _ => (0, size, "200 OK", String::new()),
        };
        let header = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{extra}\r\n",
            end - start
        );
        sock.write_all(header.as_bytes()).await?;
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            file.read_exact_at(&mut buf[..n], at)?;
            sock.write_all(&buf[..n]).await?;
            at += n as u64;
        }
    }
}
