//! Malformed and out-of-bounds requests get a clear status; the broker keeps serving.

use portcullis_tests::{
    Broker,
    client::{
        self, OpenMode, Status,
        pb::{self, client_message::Request},
    },
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

async fn assert_still_serving(broker: &Broker) {
    let (session, uc) = broker.open("sample0", OpenMode::Shared).await;
    assert_eq!(
        session.call_named(&uc, "add", &[20, 22], &[]).await.unwrap().scalars,
        vec![42]
    );
}

#[tokio::test]
async fn call_out_of_table_is_bad_argument_and_broker_keeps_serving() {
    let broker = Broker::start();
    let (session, uc) = broker.open("sample0", OpenMode::Shared).await;

    let cases: [(&str, u32, Vec<u64>, Vec<u8>); 6] = [
        ("unknown selector", 6, vec![], vec![]),
        ("huge selector", u32::MAX, vec![], vec![]),
        ("too few scalars", 0, vec![1], vec![]),
        ("too many scalars", 0, vec![1, 2, 3], vec![]),
        ("more scalars than any method", 0, vec![0; 17], vec![]),
        ("struct above the table's max", 1, vec![], vec![0; 4097]),
    ];
    for (what, selector, scalars, struct_in) in cases {
        let err = session
            .call(uc.handle, selector, &scalars, &struct_in, 4096)
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(Status::BadArgument), "{what}: {err}");
    }
    // A struct where none is taken, and an output buffer too small for the reply.
    assert_eq!(
        session.call(uc.handle, 0, &[1, 2], &[0], 0).await.unwrap_err().status(),
        Some(Status::BadArgument)
    );
    assert_eq!(
        session
            .call(uc.handle, 1, &[], &[1, 2, 3], 2)
            .await
            .unwrap_err()
            .status(),
        Some(Status::BadArgument)
    );
    assert_eq!(
        session
            .call(uc.handle + 100, 0, &[1, 2], &[], 0)
            .await
            .unwrap_err()
            .status(),
        Some(Status::NotOpen)
    );
    assert_eq!(
        session.open(u64::MAX, OpenMode::Shared).await.unwrap_err().status(),
        Some(Status::NoDevice)
    );
    // Structural nodes have no driver to open.
    assert_eq!(
        session.open(2, OpenMode::Shared).await.unwrap_err().status(),
        Some(Status::Unsupported)
    );

    // The same session still works, and so do new ones.
    assert_eq!(
        session.call_named(&uc, "add", &[1, 2], &[]).await.unwrap().scalars,
        vec![3]
    );
    assert_still_serving(&broker).await;
}

/// A raw session: messages as the wire carries them, no client-side checks.
async fn raw_session(broker: &Broker) -> (mpsc::Sender<pb::ClientMessage>, tonic::Streaming<pb::ServerMessage>) {
    let channel = client::uds_channel(&broker.socket()).await.unwrap();
    let mut grpc = pb::broker_client::BrokerClient::new(channel).max_encoding_message_size(8 << 20);
    let (tx, rx) = mpsc::channel(16);
    let inbound = grpc.session(ReceiverStream::new(rx)).await.unwrap().into_inner();
    (tx, inbound)
}

async fn response(inbound: &mut tonic::Streaming<pb::ServerMessage>) -> pb::Response {
    loop {
        match inbound.message().await.unwrap().unwrap().kind {
            Some(pb::server_message::Kind::Response(r)) => return r,
            _ => continue,
        }
    }
}

#[tokio::test]
async fn malformed_requests_get_status() {
    let broker = Broker::start();
    let (tx, mut inbound) = raw_session(&broker).await;

    tx.send(pb::ClientMessage {
        request_id: 7,
        request: None,
    })
    .await
    .unwrap();
    let r = response(&mut inbound).await;
    assert_eq!((r.request_id, r.status), (7, pb::StatusCode::ProtocolError as i32));

    let bad_mode = Request::OpenUserClient(pb::OpenUserClient {
        service_id: 3,
        mode: 99,
    });
    tx.send(pb::ClientMessage {
        request_id: 8,
        request: Some(bad_mode),
    })
    .await
    .unwrap();
    assert_eq!(response(&mut inbound).await.status, pb::StatusCode::BadArgument as i32);

    let empty_property = pb::Matching {
        properties: [("model".to_string(), pb::PropertyValue { kind: None })].into(),
        ..Default::default()
    };
    tx.send(pb::ClientMessage {
        request_id: 9,
        request: Some(Request::FindServices(pb::FindServices {
            matching: Some(empty_property),
        })),
    })
    .await
    .unwrap();
    assert_eq!(response(&mut inbound).await.status, pb::StatusCode::BadArgument as i32);

    let subscribe_ghost = Request::Subscribe(pb::Subscribe {
        service_ids: vec![12345],
    });
    tx.send(pb::ClientMessage {
        request_id: 10,
        request: Some(subscribe_ghost),
    })
    .await
    .unwrap();
    assert_eq!(response(&mut inbound).await.status, pb::StatusCode::NoDevice as i32);

    let too_many = Request::Subscribe(pb::Subscribe {
        service_ids: (0..1000).collect(),
    });
    tx.send(pb::ClientMessage {
        request_id: 11,
        request: Some(too_many),
    })
    .await
    .unwrap();
    assert_eq!(response(&mut inbound).await.status, pb::StatusCode::BadArgument as i32);
    assert_still_serving(&broker).await;
}

#[tokio::test]
async fn oversized_message_ends_only_that_stream() {
    let broker = Broker::start();
    let (tx, mut inbound) = raw_session(&broker).await;
    let huge = Request::Call(pb::CallMethod {
        handle: 1,
        selector: 1,
        scalars: vec![],
        struct_in: vec![0; 1 << 20],
        struct_out_len: 0,
    });
    tx.send(pb::ClientMessage {
        request_id: 1,
        request: Some(huge),
    })
    .await
    .unwrap();
    let status = inbound.message().await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status}");
    assert_still_serving(&broker).await;
}
