//! `add` over the broker's native socket, against a raw `SOCK_SEQPACKET` ping-pong server that
//! answers with the very bytes the broker answers (captured from it first). Both clients run the
//! same code: encode the request frame, send, receive, decode the response frame.

use std::time::{Duration, Instant};

use portcullis_broker::transport::native;
use portcullis_proto::{
    frame::{Body, ClientFrame, Hello, MAX_FRAME, PROTOCOL_VERSION, Request, RequestFrame, ServerFrame, encode},
    layout::AbiId,
};
use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener};

use crate::{Args, client_runtime, core, print_table, server_runtime, summarize};

struct Client {
    conn: UnixSeqpacket,
    buf: Vec<u8>,
}

impl Client {
    async fn round_trip(&mut self, frame: &ClientFrame) -> ServerFrame {
        self.conn.send(&encode(frame).unwrap()).await.unwrap();
        let n = self.conn.recv(&mut self.buf).await.unwrap().bytes_read();
        ServerFrame::decode(&self.buf[..n]).unwrap()
    }
}

fn request(id: u64, request: Request) -> ClientFrame {
    ClientFrame::Request(RequestFrame { id, request })
}

fn add(handle: u64) -> ClientFrame {
    request(
        1,
        Request::Call {
            handle,
            selector: 0,
            scalars: vec![2, 3],
            struct_in: vec![],
            struct_out_len: 0,
        },
    )
}

async fn measure(c: &mut Client, frame: &ClientFrame, iters: usize, samples: &mut Vec<Duration>) {
    for _ in 0..iters {
        let start = Instant::now();
        let r = c.round_trip(frame).await;
        samples.push(start.elapsed());
        let ServerFrame::Response(r) = r else { panic!("{r:?}") };
        assert_eq!(
            r.body,
            Body::Call {
                scalars: vec![5],
                struct_out: vec![]
            }
        );
    }
}

pub(crate) fn run(args: &Args) {
    let dir = tempfile::tempdir().unwrap();
    let broker_socket = dir.path().join("native.sock");
    let raw_socket = dir.path().join("raw.sock");
    let servers = server_runtime();
    let (mut broker, handle) = client_runtime().block_on(async {
        let _guard = servers.enter();
        let listener = native::bind(&broker_socket).unwrap();
        servers.spawn(native::serve(
            core(),
            listener,
            Default::default(),
            std::future::pending(),
        ));
        let mut c = Client {
            conn: UnixSeqpacket::connect(&broker_socket).await.unwrap(),
            buf: vec![0; MAX_FRAME + 1],
        };
        c.round_trip(&ClientFrame::Hello(Hello {
            version: PROTOCOL_VERSION,
            abi: AbiId::native() as u8,
        }))
        .await;
        let found = c
            .round_trip(&request(
                1,
                Request::FindServices {
                    class: String::new(),
                    name: "sample0".into(),
                },
            ))
            .await;
        let ServerFrame::Response(found) = found else { panic!() };
        let Body::Found(found) = found.body else { panic!() };
        let opened = c
            .round_trip(&request(
                1,
                Request::Open {
                    service: found[0].id,
                    exclusive: false,
                },
            ))
            .await;
        let ServerFrame::Response(opened) = opened else {
            panic!()
        };
        let Body::Opened { handle, .. } = opened.body else {
            panic!()
        };
        (c, handle)
    });
    // The peer answers every packet with the broker's own answer to `add`.
    let answer = client_runtime().block_on(async {
        let _guard = servers.enter();
        broker.conn.send(&encode(&add(handle)).unwrap()).await.unwrap();
        let n = broker.conn.recv(&mut broker.buf).await.unwrap().bytes_read();
        broker.buf[..n].to_vec()
    });
    servers.block_on(async {
        serve_raw_peer(UnixSeqpacketListener::bind(&raw_socket).unwrap(), answer);
    });
    let frame = add(handle);
    let (ours, peer) = client_runtime().block_on(async {
        let _guard = servers.enter();
        let mut raw = Client {
            conn: UnixSeqpacket::connect(&raw_socket).await.unwrap(),
            buf: vec![0; MAX_FRAME + 1],
        };
        let (mut b, mut r) = (Vec::new(), Vec::new());
        measure(&mut broker, &frame, args.iters, &mut Vec::new()).await;
        measure(&mut raw, &frame, args.iters, &mut Vec::new()).await;
        for _ in 0..args.rounds {
            measure(&mut broker, &frame, args.iters, &mut b).await;
            measure(&mut raw, &frame, args.iters, &mut r).await;
        }
        (summarize(&mut b), summarize(&mut r))
    });
    print_table(
        "`add` over the native socket: broker vs raw SOCK_SEQPACKET ping-pong of the same bytes",
        args,
        &[
            ("broker `add` (native; policy + dispatch)", &ours),
            ("raw seqpacket ping-pong (tokio)", &peer),
        ],
        "target ≤ 1.3×",
    );
}

/// The raw peer, on the current runtime: answers every packet on every connection with
/// `answer` (the broker's own bytes), doing nothing else.
pub(crate) fn serve_raw_peer(mut raw: UnixSeqpacketListener, answer: Vec<u8>) {
    tokio::spawn(async move {
        while let Ok(conn) = raw.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; MAX_FRAME + 1];
                while let Ok(info) = conn.recv(&mut buf).await {
                    if info.bytes_read() == 0 || conn.send(&answer).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}
