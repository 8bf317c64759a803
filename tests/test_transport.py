"""kms/transport.py against a scripted server: every way an HTTP/1.1 answer may come, and reuse.

KMS answers with a plain head and a Content-Length, which the transport reads itself; anything
else goes to h11 with the bytes already read. Each case checks the answer and whether the
connection was kept for the next request.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

from kmsagent.kms.transport import AnswerTooLarge, Endpoint, ReadTimeout, Transport, TransportError, request_head

HEADERS = [("host", "kms.test"), ("x-acs-action", "GetSecretValue")]


class ScriptedServer:
    """Answers each request it reads (a head up to CRLFCRLF) with the next scripted bytes;
    `close_after` closes the connection after that answer."""

    def __init__(self, answers: list[bytes], close_after: Callable[[int], bool] = lambda index: False) -> None:
        self.answers = answers
        self.close_after = close_after
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buffer = b""
        async with stream:
            if not self.answers:  # a server that never answers
                await trio.sleep_forever()
            while self.answers:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                self.requests.append(head)
                index = len(self.requests) - 1
                await stream.send_all(self.answers.pop(0))
                if self.close_after(index):
                    return


async def serve(
    nursery: trio.Nursery, answers: list[bytes], **options: Callable[[int], bool]
) -> tuple[ScriptedServer, Endpoint]:
    server = ScriptedServer(answers, **options)
    await nursery.start(server.serve)
    return server, Endpoint.parse("http", f"127.0.0.1:{server.port}")


def transport(read_timeout: float = 5.0) -> Transport:
    timeouts = {"connect_timeout": 5.0, "read_timeout": read_timeout, "write_timeout": 5.0}
    return Transport(ssl_context=None, keepalive_seconds=5.0, max_idle=4, **timeouts)


def plain(body: bytes, status: int = 200, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d OK\r\ncontent-type: application/json\r\n%bContent-Length: %d\r\n\r\n%b" % (
        status,
        extra,
        len(body),
        body,
    )


CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"


@pytest.mark.parametrize(
    ("answer", "body", "kept"),
    [
        (plain(b'{"a": 1}'), b'{"a": 1}', True),
        (plain(b""), b"", True),
        (CHUNKED, b"hello world", True),
        (b"HTTP/1.1 100 Continue\r\n\r\n" + plain(b"after"), b"after", True),
        (plain(b"bye", extra=b"Connection: close\r\n"), b"bye", False),
        (plain(b"bye", extra=b"connection: keep-alive, Close\r\n"), b"bye", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok", False),
        (plain(b"folded", extra=b"x-a: one\r\n  two\r\n"), b"folded", True),  # obs-fold: h11's call
        (plain(b"twice") + b"HTTP/1.1 200 OK\r\n", b"twice", False),  # more than asked for
    ],
    ids=["plain", "empty", "chunked", "interim-100", "close", "close-token", "http-1.0", "obs-fold", "extra-bytes"],
)
async def test_answers_and_reuse(nursery: trio.Nursery, answer: bytes, body: bytes, kept: bool) -> None:
    server, endpoint = await serve(nursery, [answer, plain(b"second")])
    http = transport()
    first = await http.post(endpoint, "/?SecretName=a", HEADERS, limit=1000)
    assert (first.status, bytes(first.body)) == (200, body)
    second = await http.post(endpoint, "/?SecretName=b", HEADERS, limit=1000)
    assert bytes(second.body) == b"second"
    assert server.connections == (1 if kept else 2)
    await http.aclose()


async def test_a_kms_error_keeps_its_status_and_headers(nursery: trio.Nursery) -> None:
    _, endpoint = await serve(nursery, [plain(b'{"Code": "Rejected.Throttling"}', 429, b"X-Acs-Retry-After: 4000\r\n")])
    answer = await transport().post(endpoint, "/", HEADERS, limit=1000)
    assert (answer.status, answer.header(b"x-acs-retry-after"), answer.header(b"nope")) == (429, b"4000", None)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # then closed
        b"this is not HTTP\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        b"",  # closed without a byte
    ],
    ids=["truncated", "not-http", "two-lengths", "no-colon", "nothing"],
)
async def test_what_is_not_a_whole_answer_is_a_transport_error(nursery: trio.Nursery, answer: bytes) -> None:
    _, endpoint = await serve(nursery, [answer], close_after=lambda index: True)
    with pytest.raises(TransportError):
        await transport().post(endpoint, "/", HEADERS, limit=1000)


async def test_a_body_over_the_limit_is_refused_before_it_is_read(nursery: trio.Nursery) -> None:
    _, endpoint = await serve(nursery, [plain(b"x" * 2000), CHUNKED])
    http = transport()
    with pytest.raises(AnswerTooLarge):
        await http.post(endpoint, "/", HEADERS, limit=1000)
    with pytest.raises(AnswerTooLarge):
        await http.post(endpoint, "/", HEADERS, limit=5)  # chunked: counted as it comes


async def test_a_connection_the_server_closed_while_idle_is_not_reused(nursery: trio.Nursery) -> None:
    server, endpoint = await serve(nursery, [plain(b"one"), plain(b"two")], close_after=lambda index: index == 0)
    http = transport()
    assert bytes((await http.post(endpoint, "/", HEADERS, limit=1000)).body) == b"one"
    await trio.sleep(0.05)  # the server's FIN arrives
    assert bytes((await http.post(endpoint, "/", HEADERS, limit=1000)).body) == b"two"
    assert server.connections == 2


async def test_a_silent_server_is_a_read_timeout_and_its_connection_is_dropped(nursery: trio.Nursery) -> None:
    server, endpoint = await serve(nursery, [])
    with pytest.raises(ReadTimeout):
        await transport(read_timeout=0.2).post(endpoint, "/", HEADERS, limit=1000)
    assert server.connections == 1


async def test_the_request_goes_out_as_built() -> None:
    head = request_head("/?SecretName=db%2Fpw", [("host", "kms.test:8443"), ("authorization", "ACS3 x=y,z")])
    assert head == (
        b"POST /?SecretName=db%2Fpw HTTP/1.1\r\nhost: kms.test:8443\r\nauthorization: ACS3 x=y,z\r\n"
        b"content-length: 0\r\n\r\n"
    )
    refused = [
        ("x-acs-security-token", "t0k\r\nx-evil: 1"),
        ("x", " padded-Zq"),
        ("x", "caf\u00e9-Zq"),
        ("a b", "value-Zq"),
    ]
    for name, value in refused:
        with pytest.raises(ValueError, match="cannot be sent as it is") as caught:
            request_head("/", [(name, value)])
        assert value not in str(caught.value)  # a header's value may be a token: never in an error
    with pytest.raises(ValueError, match="not printable ASCII"):
        request_head("/a b", [])
