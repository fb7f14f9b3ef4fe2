//! `add` over the broker's gRPC session on a Unix socket, against a bare tonic echo server on a
//! Unix socket answering the same bidirectional stream with a response of the same shape and
//! size, doing no policy check and no dispatch. Both clients run the same code.

use std::{path::Path, pin::Pin, time::Duration, time::Instant};

use portcullis_broker::transport::grpc;
use portcullis_proto::pb::{self, client_message::Request, server_message::Kind};
use tokio::{net::UnixListener, sync::mpsc};
use tokio_stream::{Stream, wrappers::ReceiverStream};

use crate::{Args, client_runtime, core, print_table, server_runtime, summarize};

#[allow(missing_docs, clippy::all, clippy::pedantic)]
mod echo_pb {
    include!("generated/portcullis.bench.rs");
}

use echo_pb::{
    echo_client::EchoClient,
    echo_server::{Echo, EchoServer},
};

pub(crate) struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, tonic::Status>> + Send>>;

    async fn session(
        &self,
        req: tonic::Request<tonic::Streaming<pb::ClientMessage>>,
    ) -> Result<tonic::Response<Self::SessionStream>, tonic::Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                let scalars = match m.request {
                    Some(Request::Call(c)) => vec![c.scalars.iter().fold(0u64, |a, b| a.wrapping_add(*b))],
                    _ => vec![],
                };
                let result = Some(pb::response::Result::Call(pb::CallResult {
                    scalars,
                    struct_out: vec![],
                }));
                let response = pb::Response {
                    request_id: m.request_id,
                    result,
                    ..Default::default()
                };
                if tx
                    .send(Ok(pb::ServerMessage {
                        kind: Some(Kind::Response(response)),
                    }))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One ping-pong stream: send a message, wait for its response.
pub(crate) struct PingPong {
    tx: mpsc::Sender<pb::ClientMessage>,
    inbound: tonic::Streaming<pb::ServerMessage>,
    next_id: u64,
}

impl PingPong {
    async fn round_trip(&mut self, request: Request) -> pb::Response {
        self.next_id += 1;
        self.tx
            .send(pb::ClientMessage {
                request_id: self.next_id,
                request: Some(request),
            })
            .await
            .unwrap();
        loop {
            if let Some(Kind::Response(r)) = self.inbound.message().await.unwrap().unwrap().kind {
                assert_eq!(r.request_id, self.next_id);
                return r;
            }
        }
    }
}

pub(crate) async fn broker_stream(socket: &Path) -> (PingPong, u64) {
    let channel = portcullis_client::uds_channel(socket).await.unwrap();
    let (tx, rx) = mpsc::channel(16);
    let inbound = pb::broker_client::BrokerClient::new(channel)
        .session(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut s = PingPong {
        tx,
        inbound,
        next_id: 0,
    };
    let matching = pb::Matching {
        name: "sample0".into(),
        ..Default::default()
    };
    let found = s
        .round_trip(Request::FindServices(pb::FindServices {
            matching: Some(matching),
        }))
        .await;
    let Some(pb::response::Result::Found(found)) = found.result else {
        panic!("find: {found:?}")
    };
    let open = pb::OpenUserClient {
        service_id: found.services[0].id,
        mode: pb::OpenMode::Shared.into(),
    };
    let opened = s.round_trip(Request::OpenUserClient(open)).await;
    let Some(pb::response::Result::Opened(opened)) = opened.result else {
        panic!("open: {opened:?}")
    };
    (s, opened.handle)
}

pub(crate) async fn echo_stream(socket: &Path) -> PingPong {
    let channel = portcullis_client::uds_channel(socket).await.unwrap();
    let (tx, rx) = mpsc::channel(16);
    let inbound = EchoClient::new(channel)
        .session(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    PingPong {
        tx,
        inbound,
        next_id: 0,
    }
}

pub(crate) async fn measure(s: &mut PingPong, handle: u64, iters: usize, samples: &mut Vec<Duration>) {
    for i in 0..iters as u64 {
        let start = Instant::now();
        let call = pb::CallMethod {
            handle,
            selector: 0,
            scalars: vec![i, 1],
            struct_in: vec![],
            struct_out_len: 0,
        };
        let r = s.round_trip(Request::Call(call)).await;
        samples.push(start.elapsed());
        let Some(pb::response::Result::Call(out)) = r.result else {
            panic!("call: {r:?}")
        };
        assert_eq!(out.scalars, [i + 1]);
    }
}

/// Starts the broker's gRPC server and the bare tonic echo server on `servers`; returns their
/// sockets.
pub(crate) fn start(servers: &tokio::runtime::Runtime, dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let broker_socket = dir.join("broker.sock");
    let echo_socket = dir.join("echo.sock");
    servers.block_on(async {
        let listener = grpc::bind(&broker_socket).await.unwrap();
        tokio::spawn(grpc::serve(core(), listener, std::future::pending()));
        tokio::spawn(echo_server(UnixListener::bind(&echo_socket).unwrap()));
    });
    (broker_socket, echo_socket)
}

/// The bare tonic echo server, with tonic's defaults, on `listener`.
async fn echo_server(listener: UnixListener) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(EchoServer::new(EchoService))
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
        .await
}

/// Serves the bare tonic echo server on `socket` until killed (the bench re-executed with
/// `--echo-grpc SOCKET`: the gRPC peer whose memory the scale bench reads).
pub(crate) fn serve_echo(socket: &Path) {
    server_runtime()
        .block_on(async { echo_server(UnixListener::bind(socket).unwrap()).await })
        .unwrap();
}

pub(crate) fn run(args: &Args) {
    let dir = tempfile::tempdir().unwrap();
    let servers = server_runtime();
    let (broker_socket, echo_socket) = start(&servers, dir.path());
    let (broker, echo) = client_runtime().block_on(async {
        let (mut broker, handle) = broker_stream(&broker_socket).await;
        let mut echo = echo_stream(&echo_socket).await;
        let (mut b, mut e) = (Vec::new(), Vec::new());
        measure(&mut broker, handle, args.iters, &mut Vec::new()).await; // warm-up
        measure(&mut echo, 0, args.iters, &mut Vec::new()).await;
        for _ in 0..args.rounds {
            measure(&mut broker, handle, args.iters, &mut b).await;
            measure(&mut echo, 0, args.iters, &mut e).await;
        }
        (summarize(&mut b), summarize(&mut e))
    });
    print_table(
        "`add` over gRPC (Unix socket): broker vs bare tonic echo",
        args,
        &[
            ("broker `add` (gRPC session; policy + dispatch)", &broker),
            ("bare tonic echo (same messages)", &echo),
        ],
        "target ≤ 1.3×",
    );
}
