//! SPDY/3.1 framing, the subset a kubelet speaks: the apiserver of Kubernetes 1.34 and 1.35
//! (and 1.36+ for a node that does not declare WebSockets) streams `exec`, `attach` and
//! `port-forward` to kubelets over it. No maintained Rust crate implements it.
//!
//! [`Codec`] turns bytes into [`Frame`]s and back: every control frame of SPDY/3.1
//! (SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE) and
//! DATA, with header blocks compressed by one zlib stream per direction, primed with the
//! protocol's [`DICTIONARY`]. Sessions, streams and flow control are the caller's.
//!
//! Input is untrusted: frames over a size limit, header blocks that inflate past a limit,
//! truncated or malformed frames and other protocol versions are typed [`Error`]s; a
//! control frame of an unknown type decodes as [`Frame::Unknown`] (the protocol says to
//! ignore it).

mod dictionary;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

pub use dictionary::DICTIONARY;

/// The protocol version spoken.
pub const VERSION: u16 = 3;
/// Bytes of every frame's header.
pub const HEADER_LEN: usize = 8;
/// The largest body a frame can carry (a 24-bit length).
pub const MAX_LENGTH: usize = (1 << 24) - 1;

/// A stream's id (31 bits; odd from the client, even from the server).
pub type StreamId = u32;

/// RST_STREAM status codes.
pub mod rst {
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INVALID_STREAM: u32 = 2;
    pub const REFUSED_STREAM: u32 = 3;
    pub const UNSUPPORTED_VERSION: u32 = 4;
    pub const CANCEL: u32 = 5;
    pub const INTERNAL_ERROR: u32 = 6;
    pub const FLOW_CONTROL_ERROR: u32 = 7;
    pub const STREAM_IN_USE: u32 = 8;
    pub const STREAM_ALREADY_CLOSED: u32 = 9;
    pub const FRAME_TOO_LARGE: u32 = 11;
}

/// GOAWAY status codes.
pub mod goaway {
    pub const OK: u32 = 0;
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INTERNAL_ERROR: u32 = 2;
}

/// SETTINGS ids a kubelet session cares about.
pub mod settings {
    pub const MAX_CONCURRENT_STREAMS: u32 = 4;
    pub const INITIAL_WINDOW_SIZE: u32 = 7;
}

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const SETTINGS: u16 = 4;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const WINDOW_UPDATE: u16 = 9;

const FLAG_FIN: u8 = 0x01;
const FLAG_UNIDIRECTIONAL: u8 = 0x02;
const FLAG_CLEAR_SETTINGS: u8 = 0x01;
const STREAM_ID_MASK: u32 = 0x7fff_ffff;

/// Name/value pairs of a header block, names lowercase. A name with several values is one
/// entry per value here and one NUL-separated value on the wire. Two blocks are equal when
/// they hold the same values for each name, whatever the order of the names.
#[derive(Debug, Clone, Default)]
pub struct Headers(Vec<(String, String)>);

impl PartialEq for Headers {
    fn eq(&self, other: &Self) -> bool {
        fn sorted(h: &Headers) -> Vec<(&str, &str)> {
            let mut v: Vec<(&str, &str)> = h.iter().collect();
            // Stable: the values of one name keep their order.
            v.sort_by_key(|(n, _)| *n);
            v
        }
        sorted(self) == sorted(other)
    }
}

impl Eq for Headers {}

impl Headers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a value for `name` (lowercased, as the protocol requires).
    pub fn add(&mut self, name: &str, value: impl Into<String>) -> &mut Self {
        self.0.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }
}

impl<const N: usize> From<[(&str, &str); N]> for Headers {
    fn from(pairs: [(&str, &str); N]) -> Self {
        let mut h = Headers::new();
        for (n, v) in pairs {
            h.add(n, v);
        }
        h
    }
}

/// One SETTINGS entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    pub flags: u8,
    pub id: u32,
    pub value: u32,
}

/// A frame, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream_id: StreamId,
        associated_to: StreamId,
        /// 0 (highest) to 7.
        priority: u8,
        fin: bool,
        unidirectional: bool,
        headers: Headers,
    },
    SynReply {
        stream_id: StreamId,
        fin: bool,
        headers: Headers,
    },
    RstStream {
        stream_id: StreamId,
        status: u32,
    },
    Settings {
        clear: bool,
        entries: Vec<Setting>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: StreamId,
        status: u32,
    },
    Headers {
        stream_id: StreamId,
        fin: bool,
        headers: Headers,
    },
    WindowUpdate {
        stream_id: StreamId,
        delta: u32,
    },
    Data {
        stream_id: StreamId,
        fin: bool,
        data: Vec<u8>,
    },
    /// A control frame of a type this codec does not know; the protocol says to ignore it.
    Unknown {
        frame_type: u16,
    },
}

/// Why bytes are not a valid frame. Each ends the session (with a GOAWAY where one can
/// still be sent); none is retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("SPDY version {0} is not spoken here (only 3)")]
    UnsupportedVersion(u16),
    #[error("a frame of {length} bytes is over the limit of {limit}")]
    FrameTooLarge { length: usize, limit: usize },
    #[error("{frame} frame: {reason}")]
    Invalid { frame: &'static str, reason: String },
    #[error("header block: {0}")]
    HeaderBlock(String),
}

fn invalid(frame: &'static str, reason: impl Into<String>) -> Error {
    Error::Invalid {
        frame,
        reason: reason.into(),
    }
}

/// Reads and writes the frames of one session (one connection): each direction's header
/// blocks share one zlib stream, so a codec is never shared between connections.
pub struct Codec {
    inflate: Decompress,
    deflate: Compress,
    deflate_primed: bool,
    max_frame: usize,
    max_header_block: usize,
}

impl Default for Codec {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec")
            .field("max_frame", &self.max_frame)
            .field("max_header_block", &self.max_header_block)
            .finish_non_exhaustive()
    }
}

impl Codec {
    /// Frames up to 1 MiB, header blocks up to 64 KiB once inflated: a kubelet session's
    /// frames are far smaller (the apiserver copies streams in 32 KiB pieces).
    pub fn new() -> Self {
        Self::with_limits(1 << 20, 64 << 10)
    }

    pub fn with_limits(max_frame: usize, max_header_block: usize) -> Self {
        Self {
            inflate: Decompress::new(true),
            deflate: Compress::new(Compression::default(), true),
            deflate_primed: false,
            max_frame: max_frame.min(MAX_LENGTH),
            max_header_block,
        }
    }

    /// Takes one frame off the front of `buf`: `Ok(None)` while the frame is incomplete.
    pub fn decode(&mut self, buf: &mut Vec<u8>) -> Result<Option<Frame>, Error> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let length = usize::from(buf[5]) << 16 | usize::from(buf[6]) << 8 | usize::from(buf[7]);
        if length > self.max_frame {
            return Err(Error::FrameTooLarge {
                length,
                limit: self.max_frame,
            });
        }
        if buf.len() < HEADER_LEN + length {
            return Ok(None);
        }
        let frame: Vec<u8> = buf.drain(..HEADER_LEN + length).collect();
        let (head, body) = frame.split_at(HEADER_LEN);
        let flags = head[4];
        if head[0] & 0x80 == 0 {
            return Ok(Some(Frame::Data {
                stream_id: u32_at(head, 0) & STREAM_ID_MASK,
                fin: flags & FLAG_FIN != 0,
                data: body.to_vec(),
            }));
        }
        let version = u16::from_be_bytes([head[0] & 0x7f, head[1]]);
        if version != VERSION {
            return Err(Error::UnsupportedVersion(version));
        }
        let frame_type = u16::from_be_bytes([head[2], head[3]]);
        self.control(frame_type, flags, body).map(Some)
    }

    fn control(&mut self, frame_type: u16, flags: u8, body: &[u8]) -> Result<Frame, Error> {
        let fin = flags & FLAG_FIN != 0;
        Ok(match frame_type {
            SYN_STREAM => {
                at_least("SYN_STREAM", body, 10)?;
                Frame::SynStream {
                    stream_id: stream_id("SYN_STREAM", body)?,
                    associated_to: u32_at(body, 4) & STREAM_ID_MASK,
                    priority: body[8] >> 5,
                    fin,
                    unidirectional: flags & FLAG_UNIDIRECTIONAL != 0,
                    headers: self.read_headers(&body[10..])?,
                }
            }
            SYN_REPLY => {
                at_least("SYN_REPLY", body, 4)?;
                Frame::SynReply {
                    stream_id: stream_id("SYN_REPLY", body)?,
                    fin,
                    headers: self.read_headers(&body[4..])?,
                }
            }
            HEADERS => {
                at_least("HEADERS", body, 4)?;
                Frame::Headers {
                    stream_id: stream_id("HEADERS", body)?,
                    fin,
                    headers: self.read_headers(&body[4..])?,
                }
            }
            RST_STREAM => {
                exactly("RST_STREAM", body, 8)?;
                Frame::RstStream {
                    stream_id: stream_id("RST_STREAM", body)?,
                    status: u32_at(body, 4),
                }
            }
            SETTINGS => settings_frame(flags, body)?,
            PING => {
                exactly("PING", body, 4)?;
                Frame::Ping {
                    id: u32_at(body, 0),
                }
            }
            GOAWAY => {
                exactly("GOAWAY", body, 8)?;
                Frame::GoAway {
                    last_good_stream_id: u32_at(body, 0) & STREAM_ID_MASK,
                    status: u32_at(body, 4),
                }
            }
            WINDOW_UPDATE => {
                exactly("WINDOW_UPDATE", body, 8)?;
                let delta = u32_at(body, 4) & STREAM_ID_MASK;
                if delta == 0 {
                    return Err(invalid("WINDOW_UPDATE", "a window grows by at least 1"));
                }
                Frame::WindowUpdate {
                    stream_id: u32_at(body, 0) & STREAM_ID_MASK,
                    delta,
                }
            }
            other => Frame::Unknown { frame_type: other },
        })
    }

    /// Appends `frame`'s bytes to `out`.
    pub fn encode(&mut self, frame: &Frame, out: &mut Vec<u8>) -> Result<(), Error> {
        let (head, body) = match frame {
            Frame::Data {
                stream_id,
                fin,
                data,
            } => {
                let head = (stream_id & STREAM_ID_MASK).to_be_bytes();
                return self.put(out, head, flag(*fin, FLAG_FIN), data);
            }
            Frame::Unknown { frame_type } => {
                return Err(invalid(
                    "unknown",
                    format!("type {frame_type} cannot be written"),
                ));
            }
            control => self.control_body(control)?,
        };
        let [t0, t1] = head.0.to_be_bytes();
        let [v0, v1] = VERSION.to_be_bytes();
        self.put(out, [v0 | 0x80, v1, t0, t1], head.1, &body)
    }

    /// A control frame's (type, flags) and body.
    fn control_body(&mut self, frame: &Frame) -> Result<((u16, u8), Vec<u8>), Error> {
        let mut body = Vec::new();
        let head = match frame {
            Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                fin,
                unidirectional,
                headers,
            } => {
                body.extend((stream_id & STREAM_ID_MASK).to_be_bytes());
                body.extend((associated_to & STREAM_ID_MASK).to_be_bytes());
                body.extend([(priority & 0x07) << 5, 0]);
                body.extend(self.write_headers(headers)?);
                let flags = flag(*fin, FLAG_FIN) | flag(*unidirectional, FLAG_UNIDIRECTIONAL);
                (SYN_STREAM, flags)
            }
            Frame::SynReply {
                stream_id,
                fin,
                headers,
            }
            | Frame::Headers {
                stream_id,
                fin,
                headers,
            } => {
                body.extend((stream_id & STREAM_ID_MASK).to_be_bytes());
                body.extend(self.write_headers(headers)?);
                let t = if matches!(frame, Frame::SynReply { .. }) {
                    SYN_REPLY
                } else {
                    HEADERS
                };
                (t, flag(*fin, FLAG_FIN))
            }
            Frame::RstStream { stream_id, status } => {
                body.extend((stream_id & STREAM_ID_MASK).to_be_bytes());
                body.extend(status.to_be_bytes());
                (RST_STREAM, 0)
            }
            Frame::Settings { clear, entries } => {
                body.extend(u32_len("SETTINGS", entries.len())?.to_be_bytes());
                for s in entries {
                    body.push(s.flags);
                    body.extend(&(s.id & 0x00ff_ffff).to_be_bytes()[1..]);
                    body.extend(s.value.to_be_bytes());
                }
                (SETTINGS, flag(*clear, FLAG_CLEAR_SETTINGS))
            }
            Frame::Ping { id } => {
                body.extend(id.to_be_bytes());
                (PING, 0)
            }
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                body.extend((last_good_stream_id & STREAM_ID_MASK).to_be_bytes());
                body.extend(status.to_be_bytes());
                (GOAWAY, 0)
            }
            Frame::WindowUpdate { stream_id, delta } => {
                body.extend((stream_id & STREAM_ID_MASK).to_be_bytes());
                body.extend((delta & STREAM_ID_MASK).to_be_bytes());
                (WINDOW_UPDATE, 0)
            }
            Frame::Data { .. } | Frame::Unknown { .. } => {
                return Err(invalid("control", "not a control frame"));
            }
        };
        Ok((head, body))
    }

    /// Writes a frame header (its first four bytes given) with `flags` and `body`.
    fn put(&self, out: &mut Vec<u8>, first: [u8; 4], flags: u8, body: &[u8]) -> Result<(), Error> {
        if body.len() > self.max_frame {
            return Err(Error::FrameTooLarge {
                length: body.len(),
                limit: self.max_frame,
            });
        }
        let [_, l0, l1, l2] = u32_len("frame", body.len())?.to_be_bytes();
        out.extend(first);
        out.extend([flags, l0, l1, l2]);
        out.extend(body);
        Ok(())
    }

    /// Inflates and parses a header block (the shared zlib stream moves on either way).
    fn read_headers(&mut self, compressed: &[u8]) -> Result<Headers, Error> {
        let block = self.inflate_block(compressed)?;
        parse_header_block(&block)
    }

    fn inflate_block(&mut self, input: &[u8]) -> Result<Vec<u8>, Error> {
        let mut out: Vec<u8> = Vec::with_capacity((input.len() * 4).clamp(256, 16 << 10));
        let mut consumed = 0;
        loop {
            if out.len() == out.capacity() {
                if out.len() > self.max_header_block {
                    return Err(Error::HeaderBlock(format!(
                        "inflates past the limit of {} bytes",
                        self.max_header_block
                    )));
                }
                out.reserve(out.len().max(256));
            }
            let (in_before, out_before) = (self.inflate.total_in(), out.len());
            let result =
                self.inflate
                    .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync);
            consumed += usize::try_from(self.inflate.total_in() - in_before).unwrap_or(0);
            match result {
                Ok(Status::StreamEnd) => {
                    return Err(Error::HeaderBlock("the zlib stream ended".into()));
                }
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(DICTIONARY)
                        .map_err(|e| Error::HeaderBlock(format!("dictionary: {e}")))?;
                    continue;
                }
                Err(e) => return Err(Error::HeaderBlock(e.to_string())),
            }
            let progressed = self.inflate.total_in() > in_before || out.len() > out_before;
            if consumed == input.len() && out.len() < out.capacity() {
                break;
            }
            if !progressed && out.len() < out.capacity() {
                return Err(Error::HeaderBlock("truncated".into()));
            }
        }
        if out.len() > self.max_header_block {
            return Err(Error::HeaderBlock(format!(
                "inflates past the limit of {} bytes",
                self.max_header_block
            )));
        }
        Ok(out)
    }

    /// Serializes and deflates a header block (a sync flush ends it, as the protocol asks).
    fn write_headers(&mut self, headers: &Headers) -> Result<Vec<u8>, Error> {
        let block = header_block(headers)?;
        if !self.deflate_primed {
            self.deflate
                .set_dictionary(DICTIONARY)
                .map_err(|e| Error::HeaderBlock(format!("dictionary: {e}")))?;
            self.deflate_primed = true;
        }
        let mut out = Vec::with_capacity(block.len() + 64);
        let mut consumed = 0;
        loop {
            let before = self.deflate.total_in();
            self.deflate
                .compress_vec(&block[consumed..], &mut out, FlushCompress::Sync)
                .map_err(|e| Error::HeaderBlock(e.to_string()))?;
            consumed += usize::try_from(self.deflate.total_in() - before).unwrap_or(0);
            if consumed == block.len() && out.len() < out.capacity() {
                return Ok(out);
            }
            out.reserve(out.capacity().max(64));
        }
    }
}

fn flag(set: bool, bit: u8) -> u8 {
    if set { bit } else { 0 }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u32_len(what: &'static str, n: usize) -> Result<u32, Error> {
    u32::try_from(n).map_err(|_| invalid(what, "too long"))
}

fn at_least(frame: &'static str, body: &[u8], n: usize) -> Result<(), Error> {
    if body.len() < n {
        return Err(invalid(
            frame,
            format!("{} bytes, at least {n} needed", body.len()),
        ));
    }
    Ok(())
}

fn exactly(frame: &'static str, body: &[u8], n: usize) -> Result<(), Error> {
    if body.len() != n {
        return Err(invalid(
            frame,
            format!("{} bytes, {n} expected", body.len()),
        ));
    }
    Ok(())
}

/// The 31-bit stream id at the start of `body`; 0 names no stream.
fn stream_id(frame: &'static str, body: &[u8]) -> Result<StreamId, Error> {
    match u32_at(body, 0) & STREAM_ID_MASK {
        0 => Err(invalid(frame, "stream id 0")),
        id => Ok(id),
    }
}

fn settings_frame(flags: u8, body: &[u8]) -> Result<Frame, Error> {
    at_least("SETTINGS", body, 4)?;
    let count = usize::try_from(u32_at(body, 0)).unwrap_or(usize::MAX);
    if count.checked_mul(8).and_then(|n| n.checked_add(4)) != Some(body.len()) {
        return Err(invalid(
            "SETTINGS",
            format!("{count} entries do not fit {} bytes", body.len()),
        ));
    }
    let entries = body[4..]
        .chunks_exact(8)
        .map(|e| Setting {
            flags: e[0],
            id: u32::from_be_bytes([0, e[1], e[2], e[3]]),
            value: u32_at(e, 4),
        })
        .collect();
    Ok(Frame::Settings {
        clear: flags & FLAG_CLEAR_SETTINGS != 0,
        entries,
    })
}

/// The uncompressed header block: a count, then length-prefixed names and values; one
/// NUL-joined value per name.
fn header_block(headers: &Headers) -> Result<Vec<u8>, Error> {
    let mut names: Vec<&str> = Vec::new();
    for (n, _) in headers.iter() {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    let mut block = Vec::new();
    block.extend(u32_len("header block", names.len())?.to_be_bytes());
    for name in names {
        let value = headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .collect::<Vec<_>>()
            .join("\0");
        if name.is_empty() {
            return Err(Error::HeaderBlock("an empty header name".into()));
        }
        block.extend(u32_len("header name", name.len())?.to_be_bytes());
        block.extend(name.as_bytes());
        block.extend(u32_len("header value", value.len())?.to_be_bytes());
        block.extend(value.as_bytes());
    }
    Ok(block)
}

fn parse_header_block(block: &[u8]) -> Result<Headers, Error> {
    let mut rest = block;
    let mut take = |n: usize| -> Result<&[u8], Error> {
        if rest.len() < n {
            return Err(Error::HeaderBlock("truncated".into()));
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let count = u32_at(take(4)?, 0);
    let mut headers = Headers::new();
    for _ in 0..count {
        let len = u32_at(take(4)?, 0) as usize;
        let name = std::str::from_utf8(take(len)?)
            .map_err(|_| Error::HeaderBlock("a header name is not UTF-8".into()))?
            .to_owned();
        if name.is_empty() {
            return Err(Error::HeaderBlock("an empty header name".into()));
        }
        let len = u32_at(take(4)?, 0) as usize;
        let value = std::str::from_utf8(take(len)?)
            .map_err(|_| Error::HeaderBlock(format!("header {name}: value is not UTF-8")))?;
        for v in value.split('\0') {
            headers.add(&name, v);
        }
    }
    if !rest.is_empty() {
        return Err(Error::HeaderBlock(format!(
            "{} bytes after the last header",
            rest.len()
        )));
    }
    Ok(headers)
}
