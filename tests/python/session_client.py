"""A stock gRPC client, in Python, driving a whole Portcullis session.

Stubs are generated at run time from proto/portcullis.proto with grpcio-tools, exactly as an
application developer in another language would. Exits non-zero (an AssertionError with the
reason) on any mismatch.

usage: session_client.py PROTO_DIR [SOCKET_PATH]

Without SOCKET_PATH the broker is found as every Portcullis client finds it: $PORTCULLIS_RUN_DIR;
else a broker of this user's own ($XDG_RUNTIME_DIR/portcullis, when its socket is there); else
the system broker in /run/portcullis.
"""

import os
import queue
import sys
import tempfile

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_tools import protoc


def generate_stubs(proto_dir, out_dir):
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        os.path.join(proto_dir, "portcullis.proto"),
    ])
    assert rc == 0, f"protoc failed with {rc}"
    sys.path.insert(0, out_dir)


class Session:
    """One bidirectional Session stream: requests in, responses matched by id, events kept."""

    def __init__(self, stub, pb):
        self.pb = pb
        self.requests = queue.Queue()
        self.next_id = 1
        self.events = []
        self.responses = stub.Session(iter(self.requests.get, None))

    def request(self, **kind):
        request_id = self.next_id
        self.next_id += 1
        self.requests.put(self.pb.ClientMessage(request_id=request_id, **kind))
        return request_id

    def response(self, request_id):
        for message in self.responses:
            if message.WhichOneof("kind") == "event":
                self.events.append(message.event)
                continue
            assert message.response.request_id == request_id, (
                f"response for {message.response.request_id}, expected {request_id}")
            return message.response
        raise AssertionError("the session ended early")

    def call(self, **kind):
        return self.response(self.request(**kind))

    def close(self):
        self.requests.put(None)


def default_socket():
    """The gRPC socket, by the rule every Portcullis client follows."""
    run_dir = os.environ.get("PORTCULLIS_RUN_DIR")
    if not run_dir:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        own = os.path.join(xdg, "portcullis") if xdg and os.geteuid() != 0 else None
        run_dir = own if own and os.path.exists(os.path.join(own, "grpc.sock")) else "/run/portcullis"
    return os.path.join(run_dir, "grpc.sock")


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: session_client.py PROTO_DIR [SOCKET_PATH]")
    proto_dir = sys.argv[1]
    socket_path = sys.argv[2] if len(sys.argv) == 3 else default_socket()
    with tempfile.TemporaryDirectory(prefix="portcullis-py-") as out_dir:
        generate_stubs(proto_dir, out_dir)
        run(socket_path)


def run(socket_path):
    import portcullis_pb2 as pb
    import portcullis_pb2_grpc as pb_grpc

    # grpcio puts the socket path in :authority unless told otherwise, and a path is not a valid
    # HTTP/2 authority: name one, as any client of a gRPC Unix socket must.
    channel = grpc.insecure_channel(f"unix://{socket_path}", options=[("grpc.default_authority", "localhost")])
    grpc.channel_ready_future(channel).result(timeout=10)

    # Health and reflection answer, so stock tools (grpcurl, grpc_health_probe) work.
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == health_pb2.HealthCheckResponse.SERVING, health
    broker_health = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="portcullis.v1.Broker"))
    assert broker_health.status == health_pb2.HealthCheckResponse.SERVING, broker_health
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answers[0].list_services_response.service}
    assert "portcullis.v1.Broker" in names, names
    assert "grpc.health.v1.Health" in names, names

    stub = pb_grpc.BrokerStub(channel)
    listed = stub.ListServices(pb.ListServicesRequest())
    assert "sample0" in [s.name for s in listed.services], listed

    session = Session(stub, pb)
    found = session.call(find_services=pb.FindServices(matching=pb.Matching(name="sample0")))
    assert found.status == pb.SUCCESS, found
    assert len(found.found.services) == 1, found
    sample = found.found.services[0]
    assert getattr(sample, "class") == "SampleDevice", sample
    selectors = {m.name: m.selector for m in sample.methods}

    opened = session.call(open_user_client=pb.OpenUserClient(service_id=sample.id, mode=pb.SHARED))
    assert opened.status == pb.SUCCESS, opened
    handle = opened.opened.handle

    added = session.call(call=pb.CallMethod(handle=handle, selector=selectors["add"], scalars=[40, 2]))
    assert added.status == pb.SUCCESS and list(added.call.scalars) == [42], added

    payload = bytes(range(256)) * 4
    echoed = session.call(call=pb.CallMethod(handle=handle, selector=selectors["echo"], struct_in=payload,
                                             struct_out_len=4096))
    assert echoed.status == pb.SUCCESS and echoed.call.struct_out == payload, echoed.status

    # wait_event is asynchronous: its response comes after fire_event's, matched by request id.
    wait_id = session.request(call=pb.CallMethod(handle=handle, selector=selectors["wait_event"], scalars=[10000]))
    fire_id = session.request(call=pb.CallMethod(handle=handle, selector=selectors["fire_event"], scalars=[77]))
    first = session.responses.__next__().response
    second = session.responses.__next__().response
    by_id = {first.request_id: first, second.request_id: second}
    assert by_id[fire_id].status == pb.SUCCESS and list(by_id[fire_id].call.scalars) == [1], by_id[fire_id]
    assert by_id[wait_id].status == pb.SUCCESS and list(by_id[wait_id].call.scalars) == [77], by_id[wait_id]

    # A refusal: a selector the table does not have.
    refused = session.call(call=pb.CallMethod(handle=handle, selector=99))
    assert refused.status == pb.BAD_ARGUMENT, refused
    # reset needs a privilege the policy grants to few (the default policy: root only). Either
    # way the answer is consistent: a refusal is NOT_PRIVILEGED and names its rule.
    denied = session.call(call=pb.CallMethod(handle=handle, selector=selectors["reset"]))
    if denied.status == pb.SUCCESS:
        print("reset: allowed")
    else:
        assert denied.status == pb.NOT_PRIVILEGED and denied.rule, denied
        print(f"reset: refused by rule {denied.rule}")

    closed = session.call(close_user_client=pb.CloseUserClient(handle=handle))
    assert closed.status == pb.SUCCESS, closed
    gone = session.call(call=pb.CallMethod(handle=handle, selector=selectors["add"], scalars=[1, 1]))
    assert gone.status == pb.NOT_OPEN, gone
    session.close()
    channel.close()
    print("python session: ok")


if __name__ == "__main__":
    main()
