//! A proxy that loses a response after the server sent it: the failure a retrying client
//! must survive without doing the work twice.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the first response is lost.
#[derive(Debug, Clone, Copy)]
pub enum Cut {
    /// The client's connection is reset (RST) once the server has answered.
    Reset,
    /// The client's connection is closed (FIN) once the server has answered.
    Closed,
    /// The head and the first bytes of the body are passed on, then the connection closes.
    MidBody,
}

/// A proxy on a free loopback port in front of `upstream` (`http://host:port`) that
/// loses the first response as `cut` says. Later connections pass through whole. Returns
/// the proxy's URL.
pub async fn losing_proxy(upstream: &str, cut: Cut) -> String {
    let upstream = upstream.trim_start_matches("http://").to_owned();
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the proxy");
    let addr = listener.local_addr().expect("proxy address");
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(&upstream).await else {
                continue;
            };
            if std::mem::take(&mut first) {
                tokio::spawn(lose_response(client, server, cut));
            } else {
                tokio::spawn(async move {
                    let (mut client, mut server) = (client, server);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        }
    });
    format!("http://{addr}")
}

async fn lose_response(mut client: TcpStream, mut server: TcpStream, cut: Cut) {
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    let forward = tokio::io::copy(&mut client_read, &mut server_write);
    let lose = async {
        // The whole head and what came with it: the server has committed and answered.
        let mut response = vec![0; 64 * 1024];
        let mut read = 0;
        while !response[..read].windows(4).any(|w| w == b"\r\n\r\n") {
            match server_read.read(&mut response[read..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
        let head = response[..read]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(read, |at| at + 4);
        if let Cut::MidBody = cut {
            let keep = (head + 3).min(read.saturating_sub(1));
            let _ = client_write.write_all(&response[..keep]).await;
            let _ = client_write.shutdown().await;
        }
    };
    tokio::select! {
        _ = forward => {}
        () = lose => {}
    }
    match cut {
        // Closed with nothing unread and linger zero: the peer sees a reset.
        Cut::Reset => {
            let _ = client.set_zero_linger();
        }
        Cut::Closed | Cut::MidBody => {
            let _ = client.shutdown().await;
        }
    }
}
