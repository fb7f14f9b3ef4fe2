//! Native protocol frames: one postcard-encoded frame per `SOCK_SEQPACKET` packet.
//! `docs/PROTOCOL.md` specifies them to the byte.
//!
//! Wire types are flat (no recursion: postcard has no depth limit). Decoding is strict: a
//! frame larger than [`MAX_FRAME`], one with bytes after its end, or one that is not in
//! canonical encoding (a varint with redundant continuation bytes, say) is refused.

use serde::{Deserialize, Serialize};

use crate::limits;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame either side sends: the largest struct plus room for the rest.
pub const MAX_FRAME: usize = limits::MAX_STRUCT as usize + 4096;

/// Frames a client sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientFrame {
    /// First frame of every connection (tag 0).
    Hello(Hello),
    /// A request (tag 1).
    Request(RequestFrame),
}

/// The client's greeting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The client's struct-layout ABI, by wire number (see `layout::AbiId`).
    pub abi: u8,
}

/// A request with the id its response will carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestFrame {
    /// Chosen by the client; echoed in the response.
    pub id: u64,
    /// What is asked.
    pub request: Request,
}

/// Requests (the session core's commands).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Services matching a class and a name (empty matches any) that the task may see (tag 0).
    FindServices {
        /// Exact class, or empty.
        class: String,
        /// Exact name, or empty.
        name: String,
    },
    /// Admission and open (tag 1).
    Open {
        /// Service id.
        service: u64,
        /// Exclusive rather than shared.
        exclusive: bool,
    },
    /// Close a user client (tag 2).
    Close {
        /// Its handle.
        handle: u64,
    },
    /// Call a method (tag 3).
    Call {
        /// User client handle.
        handle: u64,
        /// Method selector.
        selector: u32,
        /// Scalar inputs.
        scalars: Vec<u64>,
        /// Struct input in the client's ABI (as bytes: the same encoding as a sequence of
        /// `u8`, decoded at once rather than byte by byte).
        #[serde(with = "serde_bytes")]
        struct_in: Vec<u8>,
        /// Most struct output bytes accepted.
        struct_out_len: u32,
    },
    /// Interest notifications (tag 4).
    Subscribe {
        /// Service ids; empty for every visible service.
        services: Vec<u64>,
    },
    /// Map a driver memory type (tag 5); the descriptor comes with the response (`SCM_RIGHTS`).
    MapMemory {
        /// User client handle.
        handle: u64,
        /// Memory type id.
        memory_type: u32,
    },
    /// Upgrade to the shared-memory ring (tag 6; see `ring`): the response carries the memfd
    /// and two doorbells (a socket that wakes the broker, a pipe that wakes the client) as `SCM_RIGHTS`. Only over the socket, at most once per session.
    EnableRing {
        /// Submission ring bytes (0: the default).
        sq_size: u32,
        /// Completion ring bytes (0: the default).
        cq_size: u32,
    },
    /// IOServiceAddMatchingNotification (tag 7): be told when a service with this class and
    /// name (empty matches any) whose text properties equal these is published or terminated,
    /// among those the task may see. The response is `Found`: the matching services there are
    /// now. At most 16 per session.
    WatchMatching {
        /// Exact class, or empty.
        class: String,
        /// Exact name, or empty.
        name: String,
        /// Text properties that must be equal.
        properties: Vec<(String, String)>,
    },
}

/// Frames the broker sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerFrame {
    /// The answer to `Hello` (tag 0).
    Welcome {
        /// [`PROTOCOL_VERSION`].
        version: u32,
        /// The broker's own ABI (wire number), for information.
        abi: u8,
    },
    /// The answer to a request (tag 1).
    Response(ResponseFrame),
    /// An event (tag 2).
    Event(Event),
    /// The broker ends the session; this is its last frame (tag 3).
    Goodbye {
        /// Status number.
        status: u32,
        /// Why.
        reason: String,
    },
}

/// A response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseFrame {
    /// The request's id.
    pub id: u64,
    /// Status number (`Status`).
    pub status: u32,
    /// Why, when not successful; else empty.
    pub message: String,
    /// The deciding policy rule of a policy refusal; else empty.
    pub rule: String,
    /// The result; `None` unless successful.
    pub body: Body,
}

/// A response's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// No result (refusals, close, subscribe) (tag 0).
    None,
    /// Matching services (tag 1).
    Found(Vec<ServiceSummary>),
    /// A user client (tag 2).
    Opened {
        /// Its handle.
        handle: u64,
        /// Its service.
        service: u64,
    },
    /// A method's outputs (tag 3).
    Call {
        /// Scalar outputs.
        scalars: Vec<u64>,
        /// Struct output in the client's ABI (as bytes, like `struct_in`).
        #[serde(with = "serde_bytes")]
        struct_out: Vec<u8>,
    },
    /// Memory to map (tag 4): exactly one file descriptor travels in the same packet as
    /// `SCM_RIGHTS` ancillary data.
    Mapped {
        /// Memory type id.
        memory_type: u32,
        /// Size in bytes.
        size: u64,
        /// Whether the descriptor allows writing.
        writable: bool,
    },
    /// The ring is ready (tag 5): three descriptors travel in the same packet as `SCM_RIGHTS`,
    /// in this order: the memfd to map (`ring::HEADER_SIZE + sq_size + cq_size` bytes), the
    /// eventfd that wakes the broker, the eventfd that wakes the client.
    Ring {
        /// Submission ring bytes.
        sq_size: u32,
        /// Completion ring bytes.
        cq_size: u32,
    },
}

/// A service as discovery shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSummary {
    /// Id.
    pub id: u64,
    /// Parent id (0 for the root).
    pub parent: u64,
    /// Name.
    pub name: String,
    /// Class.
    pub class: String,
}

/// Events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A service was published (tag 0).
    Published(ServiceSummary),
    /// A service was terminated (tag 1).
    Terminated {
        /// Its id.
        service: u64,
        /// Its name.
        name: String,
    },
    /// A driver notification (tag 2).
    Notification {
        /// The service.
        service: u64,
        /// Kind.
        kind: String,
        /// Value.
        value: u64,
        /// Detail.
        detail: String,
    },
    /// The broker closed a user client (tag 3).
    UserClientClosed {
        /// Its handle.
        handle: u64,
        /// Status number.
        status: u32,
        /// Why.
        reason: String,
    },
    /// This many events were dropped because the client did not keep up (tag 4).
    Lost {
        /// How many.
        count: u64,
    },
    /// The machine is going to sleep: calls wait for wake from now on (tag 5;
    /// kIOMessageSystemWillSleep).
    WillSleep,
    /// The machine has woken: the devices are back (tag 6; kIOMessageSystemHasPoweredOn).
    HasWoken,
}

/// A frame refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {max}-byte limit", max = MAX_FRAME)]
    TooLarge(usize),
    /// Not a frame: truncated, an unknown tag, a bad varint, a bad bool, invalid UTF-8…
    #[error("undecodable frame: {0}")]
    Decode(String),
    /// Bytes after the frame's end.
    #[error("{0} bytes after the end of the frame")]
    Trailing(usize),
    /// Decodable, but not in canonical encoding (e.g. an overlong varint).
    #[error("frame is not canonically encoded")]
    NonCanonical,
}

fn decode<'a, T: Deserialize<'a> + Serialize>(bytes: &'a [u8]) -> Result<T, FrameError> {
    if bytes.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(bytes.len()));
    }
    let (frame, rest): (T, _) = postcard::take_from_bytes(bytes).map_err(|e| FrameError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Trailing(rest.len()));
    }
    // Canonical form: the frame must be exactly what encoding it gives. This refuses redundant
    // varint bytes, which postcard itself accepts.
    if !postcard::serialize_with_flavor(&frame, Same { expected: bytes }).unwrap_or(false) {
        return Err(FrameError::NonCanonical);
    }
    Ok(frame)
}

/// A postcard output that stores nothing: it compares what is encoded with `expected` as it
/// goes, and ends at the first difference. (Re-encoding into a buffer and comparing cost a
/// third of a small frame's decoding.)
struct Same<'a> {
    expected: &'a [u8],
}

impl postcard::ser_flavors::Flavor for Same<'_> {
    /// Whether the encoding was exactly `expected`.
    type Output = bool;

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        // Varints and tags come a few bytes at a time: a loop beats a call to `memcmp` there.
        let same = |head: &[u8]| {
            if data.len() <= 16 {
                head.iter().zip(data).all(|(a, b)| a == b)
            } else {
                head == data
            }
        };
        match self.expected.split_at_checked(data.len()) {
            Some((head, rest)) if same(head) => {
                self.expected = rest;
                Ok(())
            }
            _ => Err(postcard::Error::SerializeBufferFull),
        }
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        match self.expected.split_first() {
            Some((&byte, rest)) if byte == data => {
                self.expected = rest;
                Ok(())
            }
            _ => Err(postcard::Error::SerializeBufferFull),
        }
    }

    fn finalize(self) -> postcard::Result<bool> {
        Ok(self.expected.is_empty())
    }
}

/// Encodes a frame; `None` only if it would exceed [`MAX_FRAME`] (a bug on the sending side).
pub fn encode<T: Serialize>(frame: &T) -> Option<Vec<u8>> {
    postcard::to_stdvec(frame).ok().filter(|b| b.len() <= MAX_FRAME)
}

/// Encodes a frame into `buf` without allocating; `None` if it does not fit `buf` or would
/// exceed [`MAX_FRAME`] (a `buf` of `MAX_FRAME` bytes takes every frame [`encode`] takes).
pub fn encode_to<'a, T: Serialize>(frame: &T, buf: &'a mut [u8]) -> Option<&'a [u8]> {
    postcard::to_slice(frame, buf)
        .ok()
        .map(|b| &*b)
        .filter(|b| b.len() <= MAX_FRAME)
}

impl ClientFrame {
    /// Decodes a client frame strictly.
    pub fn decode(bytes: &[u8]) -> Result<ClientFrame, FrameError> {
        decode(bytes)
    }
}

impl ServerFrame {
    /// Decodes a server frame strictly.
    pub fn decode(bytes: &[u8]) -> Result<ServerFrame, FrameError> {
        decode(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call() -> ClientFrame {
        ClientFrame::Request(RequestFrame {
            id: 300,
            request: Request::Call {
                handle: 1,
                selector: 0,
                scalars: vec![2, 3],
                struct_in: vec![],
                struct_out_len: 0,
            },
        })
    }

    #[test]
    fn frame_bytes_are_as_documented() {
        // Hello { version 1, abi 12 (m68k) }: tag 0, varint 1, byte 12.
        assert_eq!(
            encode(&ClientFrame::Hello(Hello { version: 1, abi: 12 })).unwrap(),
            [0, 1, 12]
        );
        // Request tag 1, id 300 = varint [0xac, 0x02], Call tag 3, handle 1, selector 0,
        // scalars [2, 3], struct_in [], struct_out_len 0.
        assert_eq!(encode(&call()).unwrap(), [1, 0xac, 0x02, 3, 1, 0, 2, 2, 3, 0, 0]);
        let ok = ServerFrame::Response(ResponseFrame {
            id: 300,
            status: 0,
            message: String::new(),
            rule: String::new(),
            body: Body::Call {
                scalars: vec![5],
                struct_out: vec![],
            },
        });
        assert_eq!(encode(&ok).unwrap(), [1, 0xac, 0x02, 0, 0, 0, 3, 1, 5, 0]);
        // Struct bytes: a varint length, then the bytes as they are (what C clients write).
        let with_struct = ClientFrame::Request(RequestFrame {
            id: 1,
            request: Request::Call {
                handle: 1,
                selector: 4,
                scalars: vec![],
                struct_in: vec![0xaa, 0x80, 0xff],
                struct_out_len: 200,
            },
        });
        let bytes = [1, 1, 3, 1, 4, 0, 3, 0xaa, 0x80, 0xff, 0xc8, 0x01];
        assert_eq!(encode(&with_struct).unwrap(), bytes);
        assert_eq!(ClientFrame::decode(&bytes).unwrap(), with_struct);
        let out = ServerFrame::Response(ResponseFrame {
            id: 1,
            status: 0,
            message: String::new(),
            rule: String::new(),
            body: Body::Call {
                scalars: vec![],
                struct_out: vec![0x80, 0x01],
            },
        });
        assert_eq!(encode(&out).unwrap(), [1, 1, 0, 0, 0, 3, 0, 2, 0x80, 0x01]);
    }

    #[test]
    fn frame_roundtrips() {
        let bytes = encode(&call()).unwrap();
        assert_eq!(ClientFrame::decode(&bytes).unwrap(), call());
    }

    #[test]
    fn frame_truncated_is_refused() {
        let bytes = encode(&call()).unwrap();
        for n in 0..bytes.len() {
            assert!(
                matches!(ClientFrame::decode(&bytes[..n]), Err(FrameError::Decode(_))),
                "prefix of {n}"
            );
        }
    }

    #[test]
    fn frame_trailing_bytes_are_refused() {
        let mut bytes = encode(&call()).unwrap();
        bytes.push(0);
        assert_eq!(ClientFrame::decode(&bytes), Err(FrameError::Trailing(1)));
    }

    #[test]
    fn frame_unknown_kind_is_refused() {
        assert!(matches!(ClientFrame::decode(&[2, 0]), Err(FrameError::Decode(_))));
        assert!(matches!(ClientFrame::decode(&[1, 1, 9]), Err(FrameError::Decode(_))));
    }

    #[test]
    fn frame_non_canonical_varint_is_refused() {
        // Hello with version encoded as [0x81, 0x00] (= 1, with a redundant byte).
        assert_eq!(ClientFrame::decode(&[0, 0x81, 0x00, 0]), Err(FrameError::NonCanonical));
        // An overlong u32 varint (6 bytes) does not decode at all.
        assert!(matches!(
            ClientFrame::decode(&[0, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01, 0]),
            Err(FrameError::Decode(_))
        ));
    }

    #[test]
    fn frame_canonical_check_covers_long_fields() {
        let frame = |struct_in: Vec<u8>| {
            ClientFrame::Request(RequestFrame {
                id: 7,
                request: Request::Call {
                    handle: 1,
                    selector: 2,
                    scalars: vec![u64::MAX, 0, 1 << 40],
                    struct_in,
                    struct_out_len: 70_000,
                },
            })
        };
        let long = frame((0..=255).collect());
        let bytes = encode(&long).unwrap();
        assert_eq!(ClientFrame::decode(&bytes).unwrap(), long);
        // The struct's length (256 = [0x80, 0x02]) with a redundant byte: [0x80, 0x82, 0x00].
        let at = bytes.windows(2).position(|w| w == [0x80, 0x02]).unwrap();
        let mut padded = bytes[..at].to_vec();
        padded.extend_from_slice(&[0x80, 0x82, 0x00]);
        padded.extend_from_slice(&bytes[at + 2..]);
        assert_eq!(ClientFrame::decode(&padded), Err(FrameError::NonCanonical));
        // Every single-byte change either fails to decode or decodes to a frame that encodes
        // to exactly the changed bytes.
        for i in 0..bytes.len() {
            let mut changed = bytes.clone();
            changed[i] ^= 0x41;
            if let Ok(f) = ClientFrame::decode(&changed) {
                assert_eq!(encode(&f).unwrap(), changed, "byte {i}");
            }
        }
    }

    #[test]
    fn encode_to_matches_encode_and_refuses_short_buffers() {
        let mut buf = [0u8; 64];
        assert_eq!(encode_to(&call(), &mut buf).unwrap(), encode(&call()).unwrap());
        assert_eq!(encode_to(&call(), &mut buf[..4]), None);
        let huge = ServerFrame::Response(ResponseFrame {
            id: 1,
            status: 0,
            message: String::new(),
            rule: String::new(),
            body: Body::Call {
                scalars: vec![],
                struct_out: vec![0; MAX_FRAME],
            },
        });
        assert_eq!(encode_to(&huge, &mut vec![0; MAX_FRAME * 2]), None);
    }

    #[test]
    fn frame_bad_bool_is_refused() {
        // Request{id 1, Open{service 3, exclusive = 2}}.
        assert!(matches!(
            ClientFrame::decode(&[1, 1, 1, 3, 2]),
            Err(FrameError::Decode(_))
        ));
        assert!(ClientFrame::decode(&[1, 1, 1, 3, 1]).is_ok());
    }

    #[test]
    fn frame_oversized_is_refused_before_decoding() {
        assert_eq!(
            ClientFrame::decode(&vec![0; MAX_FRAME + 1]),
            Err(FrameError::TooLarge(MAX_FRAME + 1))
        );
    }

    #[test]
    fn frame_huge_claimed_length_does_not_allocate() {
        // Call with scalars claiming u32::MAX elements but no bytes behind them.
        let bytes = [1, 1, 3, 1, 0, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(matches!(ClientFrame::decode(&bytes), Err(FrameError::Decode(_))));
    }
}
