//! The bare minimum on the wire: one `GET key` on a raw TCP connection, for
//! Redis (RESP) and memcached (ASCII protocol), parsing nothing but the
//! length of the answer. An icache hit is one round trip too; the ratio of
//! the two is what icache adds around it.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Which protocol to speak.
#[derive(Debug, Clone, Copy)]
pub enum Protocol {
    /// RESP: `*2\r\n$3\r\nGET\r\n$N\r\nkey\r\n` → `$LEN\r\n<bytes>\r\n`.
    Redis,
    /// `get key\r\n` → `VALUE key flags LEN\r\n<bytes>\r\nEND\r\n`.
    Memcached,
}

/// One connection, with its `GET` request prepared once.
pub struct RawClient {
    protocol: Protocol,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    line: Vec<u8>,
    value: Vec<u8>,
    get: Vec<u8>,
    /// How many values the prepared request asks for.
    keys: usize,
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

impl RawClient {
    /// Connects to `127.0.0.1:port`, stores `value` under `key` and prepares
    /// the `GET key` that [`get`](Self::get) sends.
    pub fn connect(protocol: Protocol, port: u16, key: &str, value: &[u8]) -> io::Result<Self> {
        Self::connect_many(protocol, port, &[(key.to_owned(), value.to_vec())])
    }

    /// Like [`connect`](Self::connect) for several keys, fetched by one
    /// multi-key request (`MGET k1 k2 …` / `get k1 k2 …`): what a hit asks
    /// for, without icache.
    pub fn connect_many(
        protocol: Protocol,
        port: u16,
        items: &[(String, Vec<u8>)],
    ) -> io::Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        // As every client library does: a request is one small write that
        // must not wait for Nagle.
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let writer = stream.try_clone()?;
        let mut get = match protocol {
            Protocol::Redis if items.len() == 1 => "*2\r\n$3\r\nGET\r\n".to_owned(),
            Protocol::Redis => format!("*{}\r\n$4\r\nMGET\r\n", items.len() + 1),
            Protocol::Memcached => "get".to_owned(),
        };
        for (key, _) in items {
            match protocol {
                Protocol::Redis => get.push_str(&format!("${}\r\n{key}\r\n", key.len())),
                Protocol::Memcached => get.push_str(&format!(" {key}")),
            }
        }
        if let Protocol::Memcached = protocol {
            get.push_str("\r\n");
        }
        let mut client = RawClient {
            protocol,
            // Large enough that a 1 MB answer arrives in a few reads, as in
            // a client library's buffer.
            reader: BufReader::with_capacity(256 * 1024, stream),
            writer,
            line: Vec::with_capacity(128),
            value: Vec::new(),
            get: get.into_bytes(),
            keys: items.len(),
        };
        for (key, value) in items {
            client.set(key, value)?;
        }
        let got = client.get()?;
        let want: usize = items.iter().map(|(_, v)| v.len()).sum();
        if got != want {
            return Err(bad(format!("stored {want} bytes, read back {got}")));
        }
        Ok(client)
    }

    fn set(&mut self, key: &str, value: &[u8]) -> io::Result<()> {
        let mut request = match self.protocol {
            Protocol::Redis => format!(
                "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n",
                key.len(),
                value.len()
            ),
            Protocol::Memcached => format!("set {key} 0 0 {}\r\n", value.len()),
        }
        .into_bytes();
        request.extend_from_slice(value);
        request.extend_from_slice(b"\r\n");
        self.writer.write_all(&request)?;
        self.read_line()?;
        let want: &[u8] = match self.protocol {
            Protocol::Redis => b"+OK\r\n",
            Protocol::Memcached => b"STORED\r\n",
        };
        if self.line != want {
            return Err(bad(format!(
                "SET answered {:?}",
                String::from_utf8_lossy(&self.line)
            )));
        }
        Ok(())
    }

    fn read_line(&mut self) -> io::Result<()> {
        self.line.clear();
        self.reader.read_until(b'\n', &mut self.line)?;
        if !self.line.ends_with(b"\r\n") {
            return Err(bad("connection closed mid-answer"));
        }
        Ok(())
    }

    /// The current line without its `\r\n`, as text.
    fn header(&self) -> io::Result<&str> {
        std::str::from_utf8(&self.line[..self.line.len() - 2])
            .map_err(|_| bad("answer header is not text"))
    }

    /// Reads one value of `len` bytes and its trailing `\r\n`, into a buffer
    /// reused from call to call.
    fn read_value(&mut self, len: usize) -> io::Result<()> {
        self.value.resize(len + 2, 0);
        self.reader.read_exact(&mut self.value)
    }

    /// Sends the prepared request and reads the whole answer; returns the
    /// total length of the values. One write, one round trip, no allocation.
    pub fn get(&mut self) -> io::Result<usize> {
        self.writer.write_all(&self.get)?;
        let mut total = 0;
        match self.protocol {
            Protocol::Redis => {
                if self.keys > 1 {
                    self.read_line()?;
                    let n = self
                        .header()?
                        .strip_prefix('*')
                        .and_then(|n| n.parse().ok());
                    if n != Some(self.keys) {
                        return Err(bad(format!("unexpected answer {:?}", self.header()?)));
                    }
                }
                for _ in 0..self.keys {
                    self.read_line()?;
                    let header = self.header()?;
                    let len: usize = header
                        .strip_prefix('$')
                        .and_then(|n| n.parse().ok())
                        .ok_or_else(|| bad(format!("unexpected answer {header:?}")))?;
                    self.read_value(len)?;
                    total += len;
                }
            }
            Protocol::Memcached => loop {
                self.read_line()?;
                let header = self.header()?;
                if header == "END" {
                    break;
                }
                let len: usize = header
                    .strip_prefix("VALUE ")
                    .and_then(|rest| rest.rsplit(' ').next())
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| bad(format!("unexpected answer {header:?}")))?;
                self.read_value(len)?;
                total += len;
            },
        }
        Ok(total)
    }
}
