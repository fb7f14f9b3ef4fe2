//! Entry points of the broker's fuzz targets in `fuzz/` (hidden: not part of the API). Each runs
//! against an in-process broker (the embedded configuration: the virtual bus and `sample0`) and
//! panics when an invariant breaks, which libFuzzer reports as a crash.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::{
    collections::BTreeSet,
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    time::Duration,
};

use portcullis_policy::{Policy, Source};
use portcullis_proto::{Status, layout::AbiId, layout::Schema, pb};
use prost::Message;

use crate::{
    config::Config,
    registry::{Matching, OpenMode, Service},
    session::{Command, Core, PeerIdentity, Refusal, Reply, Session, Started, Stats},
    transport::grpc,
};

type Pending = Pin<Box<dyn Future<Output = Result<Reply, Refusal>> + Send>>;

/// The policy the session fuzzers run under: root may do everything; two users most things,
/// one of them never `fire_event`; nobody may only read.
const POLICY: &str = r#"
[[principal]]
name = "root"
uid = [0]

[[principal]]
name = "users"
uid = [1000, 1001]

[[principal]]
name = "user-1001"
uid = [1001]

[[principal]]
name = "nobody"
uid = [65534]

[[rule]]
id = "use"
effect = "allow"
principals = ["root", "users"]
service = { class = "SampleDevice" }
methods = ["add", "echo", "get_info", "wait_event", "fire_event", "transform_record", "checksum_dma"]
open = "exclusive"
memory = ["registers", "dma"]
args.add.a = { max = 1000000 }

[[rule]]
id = "admin"
effect = "allow"
principals = ["root"]
service = { class = "SampleDevice" }
methods = ["reset"]
privileges = ["sample.admin"]

[[rule]]
id = "no-fire"
effect = "forbid"
principals = ["user-1001"]
methods = ["fire_event"]

[[rule]]
id = "nobody-reads"
effect = "allow"
principals = ["nobody"]
service = { class = "SampleDevice" }
methods = ["get_info"]
memory = ["registers"]
"#;

/// The uids of the (up to four) clients.
const UIDS: [u32; 4] = [0, 1000, 1001, 65534];

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

/// One input at a time: the leak checks read process-wide counts.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// One in-process broker for the whole fuzzing process (every input ends all its sessions).
fn core() -> &'static Arc<Core> {
    static CORE: OnceLock<Arc<Core>> = OnceLock::new();
    CORE.get_or_init(|| {
        let policy = Policy::parse_checked(
            &[Source {
                origin: "fuzz policy",
                text: POLICY,
            }],
            Some(&crate::drivers::catalog()),
        )
        .expect("the fuzz policy loads");
        let core = Core::new(policy);
        crate::bus::publish(&core, &Config::load(None).expect("embedded config")).expect("the sample device");
        core
    })
}

fn sample(core: &Core) -> Arc<Service> {
    core.registry().find(&Matching::name("sample0")).pop().expect("sample0")
}

fn peer(uid: u32) -> Arc<PeerIdentity> {
    Arc::new(PeerIdentity::from_peer_cred(uid, uid, None, None, Default::default()).expect("an identity without a pid"))
}

/// Polls a pending call once (it may complete, or stay pending and be dropped by the caller).
async fn poll_once(pending: &mut Pending) -> bool {
    tokio::time::timeout(Duration::ZERO, pending).await.is_ok()
}

/// Nothing is left of any client.
fn assert_nothing_held(stats: Stats) {
    assert_eq!(
        stats,
        Stats {
            services: stats.services,
            open_fds: stats.open_fds,
            threads: stats.threads,
            rss_bytes: stats.rss_bytes,
            ..Stats::default()
        },
        "objects left behind after every client disconnected"
    );
}

/// `ring_records`: arbitrary bytes as a client's submission ring — the first four bytes are
/// the published tail, the rest the ring's contents — served by the broker's ring worker as it
/// serves a real one. The worker either serves every record or ends the ring with a reason;
/// every completion it writes decodes; nothing of the session remains afterwards. Returns the
/// completions.
pub fn ring_records(data: &[u8]) -> Vec<portcullis_proto::frame::ServerFrame> {
    let _serial = serial();
    let core = core();
    let _runtime = runtime().enter();
    let session = Session::new(core.clone(), peer(0), AbiId::native());
    let completions = crate::transport::native::fuzz_ring(core, session, data);
    drop(_runtime);
    // Asynchronous calls the records started end (Aborted) now that their session is gone.
    runtime().block_on(async {
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
    });
    let frames = completions
        .iter()
        .map(|frame| portcullis_proto::frame::ServerFrame::decode(frame).expect("a completion that decodes"))
        .collect();
    assert_nothing_held(core.stats());
    frames
}

/// `grpc_request`: arbitrary bytes → length-delimited protobuf `ClientMessage`s → the session
/// core, as the gRPC transport hands them over. Every response must encode; when the session
/// ends, nothing it held may remain. Returns the responses given at once.
pub fn grpc_request(data: &[u8]) -> Vec<pb::ServerMessage> {
    let _serial = serial();
    let core = core();
    let mut responses = Vec::new();
    runtime().block_on(async {
        let mut session = Session::new(core.clone(), peer(0), AbiId::native());
        let mut buf = data;
        let mut pending: Vec<Pending> = Vec::new();
        while let Ok(message) = pb::ClientMessage::decode_length_delimited(&mut buf) {
            let id = message.request_id;
            let started = match grpc::command(message.request) {
                Ok(command) => session.execute(command),
                Err(refusal) => Started::Now(Err(refusal)),
            };
            match started {
                Started::Now(result) => {
                    let response = grpc::response(id, result);
                    let _ = response.encode_to_vec();
                    responses.push(response);
                }
                Started::Later(mut later) => {
                    if !poll_once(&mut later).await {
                        pending.push(later);
                    }
                }
            }
            if pending.len() > 64 {
                break;
            }
        }
        drop(pending);
        drop(session);
    });
    assert_nothing_held(core.stats());
    responses
}

/// One step of `session_ops`.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Op {
    /// Client `client % 4` connects (a new session), if it is not connected.
    Connect {
        /// Which client.
        client: u8,
    },
    /// The client disconnects: its session ends.
    Disconnect {
        /// Which client.
        client: u8,
    },
    /// The client looks for services.
    Find {
        /// Which client.
        client: u8,
    },
    /// The client opens sample0.
    Open {
        /// Which client.
        client: u8,
        /// Exclusively.
        exclusive: bool,
    },
    /// The client calls a selector on one of its user clients (or on a handle it never had).
    Call {
        /// Which client.
        client: u8,
        /// Which of its user clients.
        user_client: u8,
        /// Any selector.
        selector: u8,
        /// Any scalars.
        scalars: Vec<u64>,
        /// Any struct input.
        struct_in: Vec<u8>,
        /// Any output capacity.
        struct_out_len: u16,
    },
    /// The client maps a memory type of one of its user clients.
    Map {
        /// Which client.
        client: u8,
        /// Which of its user clients.
        user_client: u8,
        /// Any memory type.
        memory_type: u8,
    },
    /// The client closes one of its user clients.
    Close {
        /// Which client.
        client: u8,
        /// Which of its user clients.
        user_client: u8,
    },
    /// Pending calls get a chance to complete.
    Poll,
}

/// One connected client of `session_ops`.
struct Client {
    session: Session,
    /// Open user clients: handle and whether exclusive.
    handles: Vec<(u64, bool)>,
    pending: Vec<Pending>,
}

/// What policy refused, by uid and request: it must stay refused (the policy does not change).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Refused {
    Open(u32),
    Call(u32, u32),
    Map(u32, u32),
}

fn policy_refusal(result: &Result<Reply, Refusal>) -> bool {
    matches!(result, Err(r) if r.rule.is_some() && r.status != Status::RateLimited)
}

/// `session_ops`: up to four clients connect, open (shared or exclusive), call any selector with
/// any arguments, map, close and disconnect, in any order. After every step: exclusive means one
/// holder, and the registry holds exactly the opens the clients hold; a request policy refused
/// stays refused; once every client has gone, nothing is left (sessions, user clients and their
/// grants, mappings, pending calls, opens, driver waiters).
pub fn session_ops(ops: &[Op]) {
    let _serial = serial();
    let core = core();
    let service = sample(core);
    runtime().block_on(async {
        let mut clients: [Option<Client>; 4] = [None, None, None, None];
        let mut refused: BTreeSet<Refused> = BTreeSet::new();
        for op in ops.iter().take(256) {
            step(core, &service, &mut clients, &mut refused, op).await;
            let held: usize = clients.iter().flatten().map(|c| c.handles.len()).sum();
            let exclusive: usize = clients
                .iter()
                .flatten()
                .map(|c| c.handles.iter().filter(|(_, x)| *x).count())
                .sum();
            assert_eq!(
                service.opens_held(),
                held,
                "the registry and the clients disagree on opens"
            );
            assert!(exclusive <= 1, "two exclusive holders");
            if exclusive == 1 {
                assert_eq!(held, 1, "an exclusive open shared with another");
                assert!(service.held_exclusively());
            }
        }
        for client in &mut clients {
            *client = None;
        }
    });
    assert_nothing_held(core.stats());
}

async fn step(
    core: &Arc<Core>,
    service: &Arc<Service>,
    clients: &mut [Option<Client>; 4],
    refused: &mut BTreeSet<Refused>,
    op: &Op,
) {
    let slot = |c: u8| usize::from(c) % 4;
    match op {
        Op::Connect { client } => {
            let i = slot(*client);
            if clients[i].is_none() {
                clients[i] = Some(Client {
                    session: Session::new(core.clone(), peer(UIDS[i]), AbiId::native()),
                    handles: Vec::new(),
                    pending: Vec::new(),
                });
            }
        }
        Op::Disconnect { client } => clients[slot(*client)] = None,
        Op::Find { client } => {
            if let Some(c) = &mut clients[slot(*client)] {
                let _ = c.session.execute(Command::FindServices(Matching::default()));
            }
        }
        Op::Open { client, exclusive } => {
            let i = slot(*client);
            let Some(c) = &mut clients[i] else { return };
            let mode = if *exclusive {
                OpenMode::Exclusive
            } else {
                OpenMode::Shared
            };
            let Started::Now(result) = c.session.execute(Command::Open {
                service: service.id(),
                mode,
            }) else {
                panic!("open is never asynchronous")
            };
            let key = Refused::Open(UIDS[i]);
            if !*exclusive {
                assert!(
                    !refused.contains(&key) || result.is_err(),
                    "uid {} was refused an open by policy, then admitted",
                    UIDS[i]
                );
                if policy_refusal(&result) {
                    refused.insert(key);
                }
            }
            match result {
                Ok(Reply::Opened { handle, .. }) => c.handles.push((handle, *exclusive)),
                Ok(other) => panic!("open answered {other:?}"),
                Err(_) => {}
            }
        }
        Op::Call {
            client,
            user_client,
            selector,
            scalars,
            struct_in,
            struct_out_len,
        } => {
            let i = slot(*client);
            let Some(c) = &mut clients[i] else { return };
            let handle = pick(&c.handles, *user_client);
            let started = c.session.execute(Command::Call {
                handle,
                selector: u32::from(*selector),
                scalars: scalars.iter().copied().take(8).collect(),
                struct_in: struct_in.clone(),
                struct_out_len: u32::from(*struct_out_len),
            });
            let known = c.handles.iter().any(|(h, _)| *h == handle);
            let key = Refused::Call(UIDS[i], u32::from(*selector));
            match started {
                Started::Now(result) => {
                    if known && refused.contains(&key) {
                        assert!(
                            result.is_err(),
                            "uid {} selector {selector}: refused by policy, then allowed",
                            UIDS[i]
                        );
                    }
                    // Only a refusal of the method itself is remembered: without arguments, no
                    // argument constraint can be what refused it.
                    if known && policy_refusal(&result) && scalars.is_empty() && struct_in.is_empty() {
                        refused.insert(key);
                    }
                }
                Started::Later(mut later) => {
                    assert!(
                        !refused.contains(&key),
                        "uid {} selector {selector}: refused, then started",
                        UIDS[i]
                    );
                    if !poll_once(&mut later).await && c.pending.len() < 32 {
                        c.pending.push(later);
                    }
                }
            }
        }
        Op::Map {
            client,
            user_client,
            memory_type,
        } => {
            let i = slot(*client);
            let Some(c) = &mut clients[i] else { return };
            let handle = pick(&c.handles, *user_client);
            let known = c.handles.iter().any(|(h, _)| *h == handle);
            let Started::Now(result) = c.session.execute(Command::MapMemory {
                handle,
                memory_type: u32::from(*memory_type),
            }) else {
                panic!("map is never asynchronous")
            };
            let key = Refused::Map(UIDS[i], u32::from(*memory_type));
            if known && refused.contains(&key) {
                assert!(
                    result.is_err(),
                    "uid {} memory {memory_type}: refused by policy, then mapped",
                    UIDS[i]
                );
            }
            if known && policy_refusal(&result) {
                refused.insert(key);
            }
        }
        Op::Close { client, user_client } => {
            let Some(c) = &mut clients[slot(*client)] else { return };
            let handle = pick(&c.handles, *user_client);
            let _ = c.session.execute(Command::Close { handle });
            c.handles.retain(|(h, _)| *h != handle);
        }
        Op::Poll => {
            for c in clients.iter_mut().flatten() {
                let mut still = Vec::new();
                for mut p in c.pending.drain(..) {
                    if !poll_once(&mut p).await {
                        still.push(p);
                    }
                }
                c.pending = still;
            }
        }
    }
}

/// One of the client's handles, or (past the end) one it never had.
fn pick(handles: &[(u64, bool)], which: u8) -> u64 {
    handles
        .get(usize::from(which))
        .map_or(u64::from(which) + 1000, |(h, _)| *h)
}

fn sample_schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| Schema::from_toml(crate::drivers::sample::LAYOUTS).expect("the sample layouts"))
}

/// `layout_translate` over the sample driver's real struct descriptions.
pub fn layout_translate(data: &[u8]) {
    portcullis_proto::fuzzing::layout_translate(sample_schema(), data);
}

/// `layout_differential` over the sample driver's `sample_record`.
pub fn layout_differential(record: &portcullis_proto::fuzzing::SampleRecord) {
    portcullis_proto::fuzzing::layout_differential(sample_schema(), record);
}

/// The `uevent` fuzz target: any bytes as a netlink uevent message. Parsing never panics, and a
/// message that parses encodes back to exactly its own bytes (nothing is dropped or invented).
pub fn uevent(data: &[u8]) {
    if let Ok(event) = crate::bus::uevent::parse(data) {
        assert_eq!(event.encode(), data, "a parsed uevent re-encodes to its bytes");
        assert_eq!(crate::bus::uevent::parse(&event.encode()), Ok(event));
    }
}

/// The `helper_request` fuzz target: any bytes as a message to the privileged helper (and as
/// its answer). Decoding never panics; a request that decodes encodes back to the same
/// request; the helper, granting nothing (no configuration, no personality), answers every
/// request but `Status` with a refusal, and never hands back a descriptor.
pub fn helper_request(data: &[u8]) {
    use crate::sandbox::{
        helper::{Grants, handle},
        protocol::{Request, Response, decode, encode},
    };
    let _ = decode::<Response>(data);
    let Some(request) = decode::<Request>(data) else {
        return;
    };
    assert_eq!(
        encode(&request).and_then(|b| decode::<Request>(&b)),
        Some(request.clone())
    );
    // A test-only build would make the call; the decoder is what is fuzzed here.
    if matches!(request, Request::Forbidden { .. }) {
        return;
    }
    let status = matches!(request, Request::Status);
    let (response, fd) = handle(&Grants::default(), request, None);
    assert!(fd.is_none(), "nothing is opened for a helper that grants nothing");
    match response {
        Response::Status(_) => assert!(status),
        Response::Refused(_) => assert!(!status),
        other => panic!("granted with no grant: {other:?}"),
    }
}

/// The `personality` fuzz target: any text as a `drivers.d` file. Loading never panics; a set
/// that loads holds unique ids in order, every error is located in the file, and every
/// personality's passive matching runs on a nub's worth of properties the text also chooses.
pub fn personality(data: &[u8]) {
    let text = String::from_utf8_lossy(data).into_owned();
    let lines = text.lines().count().max(1);
    match crate::registry::personality::Personalities::parse(&[("fuzz.toml".into(), text.clone())]) {
        Ok(set) => {
            let ids: Vec<&str> = set.all().iter().map(|p| p.id.as_str()).collect();
            assert!(ids.windows(2).all(|w| w.first() < w.get(1)), "ids sorted and unique");
            let nub: portcullis_proto::property::Properties = text
                .lines()
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        portcullis_proto::property::PropValue::Text(v.to_string()),
                    )
                })
                .collect();
            for p in set.all() {
                let _ = p.passive(&nub);
            }
        }
        Err(errors) => {
            assert!(!errors.is_empty());
            for e in errors {
                assert!(e.line <= lines + 1, "{e} is past the end of a {lines}-line file");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn personality_entry_point_takes_any_text() {
        super::personality(b"[[personality]]\nid = \"org.a.b\"\nversion = \"1\"\ndriver = \"block\"\nprovider_class = \"BlockNub\"\nprobe_score = 1\nmatch = { devtype = \"disk\" }\ndevtype:disk\n");
        super::personality(b"");
        super::personality(&[0xff; 300]);
        super::personality(b"[[personality]]\n[[personality]]\nid = 3");
    }

    #[test]
    fn uevent_entry_point_takes_any_bytes() {
        super::uevent(b"change@/devices/virtual/block/loop0\0ACTION=change\0DEVPATH=/devices/virtual/block/loop0\0SUBSYSTEM=block\0SEQNUM=1\0");
        super::uevent(b"");
        super::uevent(&[0xff; 5000]);
        super::uevent(b"add@/\0\0\0");
    }

    use super::*;

    #[test]
    fn fuzzing_session_ops_leave_nothing_behind() {
        session_ops(&[
            Op::Connect { client: 1 },
            Op::Connect { client: 3 },
            Op::Open {
                client: 1,
                exclusive: false,
            },
            Op::Open {
                client: 3,
                exclusive: true,
            },
            Op::Map {
                client: 1,
                user_client: 0,
                memory_type: 1,
            },
            Op::Call {
                client: 1,
                user_client: 0,
                selector: 3,
                scalars: vec![10_000],
                struct_in: vec![],
                struct_out_len: 0,
            },
            Op::Call {
                client: 3,
                user_client: 0,
                selector: 5,
                scalars: vec![],
                struct_in: vec![],
                struct_out_len: 0,
            },
            Op::Poll,
            Op::Disconnect { client: 1 },
        ]);
        let _serial = serial();
        assert_eq!(core().stats().user_clients, 0);
    }

    #[test]
    fn fuzzing_ring_records_serves_real_records_and_survives_garbage() {
        use portcullis_proto::frame::{ClientFrame, Request, RequestFrame, ServerFrame, encode};
        let mut ring = Vec::new();
        let mut tail = 0u32;
        for (id, request) in [
            Request::FindServices {
                class: String::new(),
                name: "sample0".into(),
            },
            Request::Open {
                service: sample(core()).id().0,
                exclusive: false,
            },
            Request::Call {
                handle: 1,
                selector: 0,
                scalars: vec![2, 3],
                struct_in: vec![],
                struct_out_len: 0,
            },
            Request::Call {
                handle: 1,
                selector: 3,
                scalars: vec![60_000],
                struct_in: vec![],
                struct_out_len: 0,
            },
        ]
        .into_iter()
        .enumerate()
        {
            let payload = encode(&ClientFrame::Request(RequestFrame { id: id as u64, request })).unwrap();
            ring.extend_from_slice(&portcullis_proto::ring::header(payload.len() as u32));
            ring.extend_from_slice(&payload);
            ring.resize(ring.len().next_multiple_of(8), 0);
            tail = ring.len() as u32;
        }
        let mut data = tail.to_ne_bytes().to_vec();
        data.extend_from_slice(&ring);
        // find, open, add answer at once; wait_event is pending when the ring goes away.
        let frames = super::ring_records(&data);
        assert_eq!(frames.len(), 3, "{frames:#?}");
        assert!(
            matches!(&frames[2], ServerFrame::Response(r) if r.body == portcullis_proto::frame::Body::Call { scalars: vec![5], struct_out: vec![] }),
            "{frames:#?}"
        );
        // Garbage: a tail past the ring, and a record that is not a frame.
        assert!(matches!(
            super::ring_records(&[0xff, 0xff, 0xff, 0x7f, 1, 2, 3]).as_slice(),
            [ServerFrame::Goodbye { .. }]
        ));
        let mut junk = 16u32.to_ne_bytes().to_vec();
        junk.extend_from_slice(&[5, 0, 0, 0, 0, 0, 0, 0, 9, 9, 9, 9, 9, 0, 0, 0]);
        // The worker ends the ring with a Goodbye in the completion ring.
        assert!(matches!(
            super::ring_records(&junk).as_slice(),
            [ServerFrame::Goodbye { .. }]
        ));
    }

    #[test]
    fn fuzzing_grpc_request_takes_real_messages() {
        let mut bytes = Vec::new();
        for request in [
            pb::client_message::Request::OpenUserClient(pb::OpenUserClient {
                service_id: sample(core()).id().0,
                mode: pb::OpenMode::Shared as i32,
            }),
            pb::client_message::Request::Call(pb::CallMethod {
                handle: 1,
                selector: 0,
                scalars: vec![2, 3],
                struct_in: vec![],
                struct_out_len: 0,
            }),
        ] {
            pb::ClientMessage {
                request_id: 1,
                request: Some(request),
            }
            .encode_length_delimited(&mut bytes)
            .unwrap();
        }
        let responses = grpc_request(&bytes);
        let results: Vec<_> = responses
            .into_iter()
            .map(|m| match m.kind {
                Some(pb::server_message::Kind::Response(r)) => (r.status, r.result),
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(
            matches!(&results[..], [
                (0, Some(pb::response::Result::Opened(opened))),
                (0, Some(pb::response::Result::Call(call))),
            ] if opened.handle == 1 && call.scalars == [5]),
            "the broker served the real messages: {results:?}"
        );
    }
}
