//! A raw HTTP/1.x client over a real socket, for tests that check what reaches a client
//! byte for byte: framing, header values as sent, trailers, and whether a connection is
//! still usable after a response.
//!
//! Included with `#[path = "common/wire.rs"] mod wire;` by the tests that use it.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One response as it arrived.
#[derive(Debug, Clone, PartialEq)]
pub struct Wire {
    pub version: String,
    pub status: u16,
    /// Names lowercased, values as sent (less the spaces around them), in order.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, Vec<u8>)>,
    /// The body was delimited by the connection's close.
    pub close_delimited: bool,
}

impl Wire {
    /// Every value of the header `name` (lowercase), in order.
    pub fn all(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    /// The headers but those named in `names`.
    pub fn without(&self, names: &[&str]) -> Vec<(String, Vec<u8>)> {
        self.headers
            .iter()
            .filter(|(n, _)| !names.contains(&n.as_str()))
            .cloned()
            .collect()
    }

    pub fn is_replay(&self) -> bool {
        self.all("idempotent-replayed") == [b"true".as_slice()]
    }

    /// The transfer codings other than `chunked` (what a client must still decode).
    pub fn codings(&self) -> Vec<String> {
        self.all("transfer-encoding")
            .iter()
            .flat_map(|v| {
                String::from_utf8_lossy(v)
                    .split(',')
                    .map(|c| c.trim().to_ascii_lowercase())
                    .collect::<Vec<_>>()
            })
            .filter(|c| c != "chunked" && !c.is_empty())
            .collect()
    }
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// Header lines (a head less its status line, or a trailer section): names lowercased,
/// values byte for byte less the spaces and tabs around them.
fn header_lines(text: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    for line in text.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or_else(|| format!("not a header line: {:?}", String::from_utf8_lossy(line)))?;
        let name = String::from_utf8_lossy(&line[..colon]).to_ascii_lowercase();
        let mut value = &line[colon + 1..];
        while let [b' ' | b'\t', rest @ ..] = value {
            value = rest;
        }
        while let [rest @ .., b' ' | b'\t'] = value {
            value = rest;
        }
        out.push((name, value.to_vec()));
    }
    Ok(out)
}

/// One whole response at the start of `buf`, and the bytes it took; `None` while it is
/// incomplete. `eof` says the peer closed (a body with no framing ends there). A
/// response framed against HTTP/1.1's rules is an error.
pub fn parse(buf: &[u8], head_request: bool, eof: bool) -> Result<Option<(Wire, usize)>, String> {
    let Some(end) = find(buf, b"\r\n\r\n", 0) else {
        return Ok(None);
    };
    let text = &buf[..end];
    let first_line_end = find(text, b"\r\n", 0).unwrap_or(text.len());
    let status_line = String::from_utf8_lossy(&text[..first_line_end]).into_owned();
    if !(status_line.starts_with("HTTP/1.1 ") || status_line.starts_with("HTTP/1.0 ")) {
        return Err(format!("bad status line {status_line:?}"));
    }
    let status: u16 = status_line[9..12]
        .parse()
        .map_err(|_| format!("bad status line {status_line:?}"))?;
    let mut wire = Wire {
        version: status_line[..8].to_owned(),
        status,
        headers: header_lines(&text[first_line_end..])?,
        body: Vec::new(),
        trailers: Vec::new(),
        close_delimited: false,
    };
    let start = end + 4;
    if head_request || status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(Some((wire, start)));
    }
    let te = wire
        .all("transfer-encoding")
        .iter()
        .map(|v| String::from_utf8_lossy(v).to_ascii_lowercase())
        .collect::<Vec<_>>()
        .join(",");
    if !te.is_empty() {
        if te.rsplit(',').next().map(str::trim) != Some("chunked") {
            return Err(format!("transfer-encoding {te:?} does not end in chunked"));
        }
        let mut at = start;
        loop {
            let Some(line_end) = find(buf, b"\r\n", at) else {
                return Ok(None);
            };
            let size_text = String::from_utf8_lossy(&buf[at..line_end]).into_owned();
            let size_text = size_text.split(';').next().unwrap_or("").trim().to_owned();
            let size = usize::from_str_radix(&size_text, 16)
                .map_err(|_| format!("chunk size {size_text:?}"))?;
            at = line_end + 2;
            if size == 0 {
                // Trailers, up to an empty line.
                let Some(trailer_end) = find(buf, b"\r\n", at) else {
                    return Ok(None);
                };
                if trailer_end == at {
                    return Ok(Some((wire, at + 2)));
                }
                let Some(trailer_end) = find(buf, b"\r\n\r\n", at) else {
                    return Ok(None);
                };
                wire.trailers = header_lines(&buf[at..trailer_end])?;
                return Ok(Some((wire, trailer_end + 4)));
            }
            if buf.len() < at + size + 2 {
                return Ok(None);
            }
            wire.body.extend_from_slice(&buf[at..at + size]);
            if &buf[at + size..at + size + 2] != b"\r\n" {
                return Err("bad end of a chunk".to_owned());
            }
            at += size + 2;
        }
    }
    let lengths = wire.all("content-length");
    if lengths.is_empty() {
        if !eof {
            return Ok(None);
        }
        wire.body = buf[start..].to_vec();
        wire.close_delimited = true;
        return Ok(Some((wire, buf.len())));
    }
    if lengths.len() > 1 {
        return Err(format!("{} content-length fields", lengths.len()));
    }
    let len: usize = std::str::from_utf8(lengths[0])
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| format!("content-length {:?}", lengths))?;
    if buf.len() < start + len {
        return Ok(None);
    }
    wire.body = buf[start..start + len].to_vec();
    Ok(Some((wire, start + len)))
}

/// One keep-alive connection.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buf: Vec::new(),
            eof: false,
        }
    }

    /// Sends `request` and reads exactly one response; what follows it stays buffered
    /// for the next exchange (so a response longer than its framing says breaks the
    /// next one).
    ///
    /// # Panics
    /// Where [`try_exchange`](Self::try_exchange) fails.
    pub async fn exchange(&mut self, request: &[u8], head_request: bool) -> Wire {
        self.try_exchange(request, head_request)
            .await
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// [`exchange`](Self::exchange), failing where the connection closes before a whole
    /// response or the response breaks HTTP/1.1's framing.
    pub async fn try_exchange(
        &mut self,
        request: &[u8],
        head_request: bool,
    ) -> Result<Wire, String> {
        if self.eof {
            return Err("the connection was already closed".to_owned());
        }
        self.stream
            .write_all(request)
            .await
            .map_err(|e| format!("write: {e}"))?;
        loop {
            if let Some((wire, used)) = parse(&self.buf, head_request, self.eof)? {
                self.buf.drain(..used);
                return Ok(wire);
            }
            if self.eof {
                return Err(format!(
                    "the connection closed before a whole response; got {:?}",
                    String::from_utf8_lossy(&self.buf[..self.buf.len().min(2000)])
                ));
            }
            let mut chunk = vec![0; 64 * 1024];
            let n = tokio::time::timeout(Duration::from_secs(20), self.stream.read(&mut chunk))
                .await
                .expect("an answer within 20 s")
                .unwrap_or(0);
            if n == 0 {
                self.eof = true;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}
