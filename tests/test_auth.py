import asyncio
import stat
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from turbocluster.runtime.transport import auth

SECRET = "0123456789abcdef" * 4
ECHO = "/test.Echo/Echo"
STREAM = "/test.Echo/Stream"


def echo_handler():
    return grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request),
            "Stream": grpc.stream_stream_rpc_method_handler(lambda requests, context: (r for r in requests)),
        },
    )


@pytest.fixture
def port():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[auth.AuthInterceptor(SECRET)])
    server.add_generic_rpc_handlers([echo_handler()])
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(None).wait()


@pytest.fixture
def channel(port):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch


def status_of(call):
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_authenticated_calls_pass(channel):
    ch = auth.authenticated_channel(channel, SECRET)
    assert ch.unary_unary(ECHO)(b"hello", timeout=5) == b"hello"
    assert list(ch.stream_stream(STREAM)(iter([b"a", b"b"]), timeout=5)) == [b"a", b"b"]


def test_call_without_credential_is_unauthenticated(channel):
    code, details = status_of(lambda: channel.unary_unary(ECHO)(b"x", timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "turbo-auth" in details
    code, _ = status_of(lambda: list(channel.stream_stream(STREAM)(iter([b"a"]), timeout=5)))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_wrong_secret_is_unauthenticated(channel):
    ch = auth.authenticated_channel(channel, "not-the-cluster-secret-at-all")
    code, details = status_of(lambda: ch.unary_unary(ECHO)(b"x", timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "secret" in details


def test_replayed_expired_or_moved_credentials_are_refused(channel):
    echo = channel.unary_unary(ECHO)
    body = auth.body_digest(b"x")
    cred = auth.make_credential(SECRET, ECHO, body=body)
    assert echo(b"x", metadata=[(auth.HEADER, cred)], timeout=5) == b"x"
    code, details = status_of(lambda: echo(b"x", metadata=[(auth.HEADER, cred)], timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "replay" in details

    old = auth.make_credential(SECRET, ECHO, now=time.time() - 120, body=body)
    code, details = status_of(lambda: echo(b"x", metadata=[(auth.HEADER, old)], timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "old" in details

    other = auth.make_credential(SECRET, STREAM, body=body)  # a credential is bound to its method
    code, _ = status_of(lambda: echo(b"x", metadata=[(auth.HEADER, other)], timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_credential_is_bound_to_body_and_target(channel):
    echo = channel.unary_unary(ECHO)
    cred = auth.make_credential(SECRET, ECHO, body=auth.body_digest(b"pay 1"))
    with pytest.raises(grpc.RpcError) as e:
        echo(b"pay 1000", metadata=[(auth.HEADER, cred)], timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert dict(e.value.trailing_metadata())["turbo-reason"] == auth.REASON_BODY
    cred = auth.make_credential(SECRET, ECHO, target="another-node", body=auth.body_digest(b"x"))
    with pytest.raises(grpc.RpcError) as e:
        echo(b"x", metadata=[(auth.HEADER, cred)], timeout=5)
    assert dict(e.value.trailing_metadata())["turbo-reason"] == auth.REASON_TARGET


def test_nonce_cache_is_bounded_and_refuses_when_full():
    now = [1000.0]
    v = auth.Verifier(SECRET, max_skew=30, clock=lambda: now[0], max_nonces=3)
    creds = [auth.make_credential(SECRET, ECHO, now=now[0]) for _ in range(4)]
    assert [v.check(ECHO, [(auth.HEADER, c)])[0] for c in creds[:3]] == [None] * 3
    assert v.check(ECHO, [(auth.HEADER, creds[3])])[0][1] == auth.REASON_BUSY
    assert len(v._nonces) == 3


def test_health_check_needs_no_credential(channel):
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_verifier_bounds_clock_skew_both_ways():
    now = [1000.0]
    v = auth.Verifier(SECRET, max_skew=30, clock=lambda: now[0])
    for delta, ok in ((-29, True), (29, True), (-31, False), (31, False)):
        cred = auth.make_credential(SECRET, ECHO, now=now[0] + delta)
        assert (v.refusal(ECHO, [(auth.HEADER, cred)]) is None) == ok
    assert "must look like" in v.refusal(ECHO, [(auth.HEADER, "v1:1:2:3")])
    assert "must look like" in v.refusal(ECHO, [(auth.HEADER, "v2:1:2:3")])


def test_aio_server_and_client_interceptors():
    async def main():
        server = grpc.aio.server(interceptors=[auth.AioAuthInterceptor(SECRET)])
        server.add_generic_rpc_handlers([echo_handler()])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            target = f"127.0.0.1:{port}"
            async with grpc.aio.insecure_channel(target, interceptors=auth.aio_client_interceptors(SECRET)) as ch:
                assert await ch.unary_unary(ECHO)(b"hi", timeout=5) == b"hi"
                call = ch.stream_stream(STREAM)(iter([b"a", b"b"]), timeout=5)
                assert [r async for r in call] == [b"a", b"b"]
            async with grpc.aio.insecure_channel(target) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await ch.unary_unary(ECHO)(b"hi", timeout=5)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    [r async for r in ch.stream_stream(STREAM)(iter([b"a"]), timeout=5)]
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_secret_file_is_created_private_and_reused(tmp_path, monkeypatch):
    monkeypatch.delenv(auth.ENV_SECRET, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    path = auth.default_secret_path()
    assert path == tmp_path / "config" / "turbo-cluster" / "secret"
    first = auth.load_or_create_secret()
    assert len(bytes.fromhex(first)) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert auth.load_or_create_secret() == first
    assert [p.name for p in path.parent.iterdir()] == ["secret"]


def test_secret_overrides_and_refusals(tmp_path, monkeypatch):
    path = tmp_path / "secret"
    monkeypatch.setenv(auth.ENV_SECRET, "from-the-environment-123")
    assert auth.load_or_create_secret(path) == "from-the-environment-123"
    assert auth.load_or_create_secret(path, value="explicit-value-0123456") == "explicit-value-0123456"
    assert not path.exists()
    with pytest.raises(ValueError, match="at least 16"):
        auth.load_or_create_secret(path, value="short")
    monkeypatch.delenv(auth.ENV_SECRET)
    auth.load_or_create_secret(path)
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="0644"):
        auth.load_or_create_secret(path)


def test_warn_if_exposed():
    assert auth.warn_if_exposed("127.0.0.1", None) is None
    assert auth.warn_if_exposed("[::1]", None) is None
    assert auth.warn_if_exposed("localhost", "") is None
    assert auth.warn_if_exposed("0.0.0.0", SECRET) is None
    assert "without a cluster secret" in auth.warn_if_exposed("0.0.0.0", None)
    assert "without a cluster secret" in auth.warn_if_exposed("mac-mini.local", "")


def test_tls_helpers_name_missing_files(tmp_path):
    (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(FileNotFoundError, match="certificate file .*nope.pem not found"):
        auth.server_credentials(tmp_path / "nope.pem", tmp_path / "key.pem")
    with pytest.raises(FileNotFoundError, match="private key file .*gone.pem not found"):
        auth.server_credentials(tmp_path / "nope.pem", tmp_path / "gone.pem")
    with pytest.raises(FileNotFoundError, match="CA certificate"):
        auth.channel_credentials(tmp_path / "ca.pem")
    with pytest.raises(ValueError, match="both cert and key"):
        auth.channel_credentials(tmp_path / "ca.pem", cert=tmp_path / "c.pem")
