"""The address guard refuses before connecting: a socket spy fails the test on any non-loopback connect."""

import io
import socket

import pytest
from PIL import Image

from pipeline import netguard
from pipeline.netguard import AddressPolicy, FetchError, fetch


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Any connect to a non-loopback address fails the test: proof that no packet leaves the machine."""
    attempts = []
    real = socket.socket.connect

    def spy(self, address):
        if isinstance(address, tuple) and not (address[0].startswith("127.") or address[0] == "::1"):
            attempts.append(address)
            raise AssertionError(f"connect to non-loopback {address}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", spy)
    yield attempts
    assert not attempts


def _png(root, name="img.png", size=(64, 48)):
    Image.new("RGB", size, "red").save(root / name)
    return name


def _err(url, policy=AddressPolicy(), **kw):
    with pytest.raises(FetchError) as e:
        fetch(url, policy, timeout=2, **kw)
    return e.value


@pytest.mark.parametrize("ip", ["169.254.169.254", "10.0.0.1", "192.168.1.5", "172.16.0.1", "224.0.0.1",
                                "127.0.0.1", "0.0.0.0", "240.0.0.1", "[fe80::1]", "[::ffff:169.254.169.254]"])
def test_refused_addresses_never_connect(ip):
    e = _err(f"http://{ip}/latest/meta-data/")
    assert e.reason == "blocked_address" and not e.retryable


def test_allow_private_network_lifts_private_and_loopback_only():
    allow = AddressPolicy(allow_private_network=True)
    netguard.check_ip("10.0.0.1", allow)
    netguard.check_ip("127.0.0.1", allow)
    for ip in ("169.254.169.254", "fe80::1", "224.0.0.1"):
        with pytest.raises(netguard.BlockedAddress):
            netguard.check_ip(ip, allow)


def test_redirect_to_metadata_or_private_address_is_refused(web):
    name = _png(web.root)
    allow = AddressPolicy(allow_private_network=True)
    assert fetch(web.url(f"files/{name}"), allow)[:4] == b"\x89PNG"
    assert _err(web.url("redirect?to=http://169.254.169.254/latest/meta-data/"), allow).reason == "blocked_address"
    loopback_only = AddressPolicy(allow_networks=("127.0.0.0/8",))
    assert fetch(web.url(f"files/{name}"), loopback_only)[:4] == b"\x89PNG"
    e = _err(web.url("redirect?to=http://10.0.0.1/x.png"), loopback_only)
    assert e.reason == "blocked_address" and "10.0.0.1" in str(e)
    assert _err(web.url("redirect?to=file:///etc/passwd"), allow).reason == "blocked_scheme"


def test_non_http_schemes_are_refused():
    for url in ("file:///etc/passwd", "ftp://127.0.0.1/x", "data:image/png;base64,AAAA"):
        assert _err(url, AddressPolicy(allow_private_network=True)).reason == "blocked_scheme"


def test_bad_responses_get_their_reason(web):
    name = _png(web.root)
    (web.root / "page.html").write_text("<html></html>")
    allow = AddressPolicy(allow_private_network=True)
    cases = {"status/404": ("http_404", False), "status/500": ("http_500", True), "reset": ("connection_reset", True),
             f"truncated/{name}": ("truncated", True), "files/page.html": ("not_image", False),
             f"robots/noai/{name}": ("opted_out", False), f"slow/3/{name}": ("timeout", True)}
    for path, (reason, retryable) in cases.items():
        e = _err(web.url(path), allow) if "slow" not in path else None
        if e is None:
            with pytest.raises(FetchError) as ex:
                fetch(web.url(path), allow, timeout=0.5)
            e = ex.value
        assert (e.reason, e.retryable) == (reason, retryable), path


def test_byte_cap_and_pixel_cap(web):
    name = _png(web.root, size=(300, 300))
    small = AddressPolicy(allow_private_network=True, max_bytes=100)
    assert _err(web.url(f"files/{name}"), small).reason == "byte_cap"
    few = AddressPolicy(allow_private_network=True, max_pixels=300 * 299)
    assert _err(web.url(f"files/{name}"), few).reason == "pixel_cap"


def test_decompression_bomb_is_refused_from_the_header():
    b = io.BytesIO()
    Image.new("1", (20000, 20000)).save(b, "PNG")
    with pytest.raises(FetchError) as e:
        netguard.check_pixels(b.getvalue(), AddressPolicy())
    assert e.value.reason == "pixel_cap"


def test_redact_url_strips_credentials_and_secret_query_values():
    url = ("https://user:hunter2@host.example:8443/a/b.jpg?w=800&X-Amz-Signature=abc123&X-Amz-Credential=AKIAXYZ"
           "&X-Amz-Security-Token=tok&sig=s1g&opaque=" + "Q" * 30 + "#access_token=frag")
    r = netguard.redact_url(url)
    for secret in ("user", "hunter2", "abc123", "AKIAXYZ", "tok", "s1g", "Q" * 30, "frag"):
        assert secret not in r.replace("X-Amz-Security-Token", ""), secret
    assert r.startswith("https://host.example:8443/a/b.jpg?w=800&X-Amz-Signature=REDACTED")
    assert netguard.redact_url(url) == r and netguard.url_hash(url) != netguard.url_hash(url.replace("abc", "abd"))


def test_userinfo_url_is_refused_without_a_request(web):
    name = _png(web.root)
    e = _err(f"http://alice:hunter2@{web.base[7:]}/files/{name}", AddressPolicy(allow_private_network=True))
    assert (e.reason, e.retryable) == ("userinfo", False) and "hunter2" not in str(e)
    assert web.hits[f"/files/{name}"] == 0
    e = _err(web.url(f"redirect?to=http://bob:pw@{web.base[7:]}/files/{name}"), AddressPolicy(allow_private_network=True))
    assert e.reason == "userinfo" and web.hits[f"/files/{name}"] == 0


EVERYTHING = AddressPolicy(allow_private_network=True, allow_networks=("0.0.0.0/0", "::/0"))


@pytest.mark.parametrize("ip", ["[fd00:ec2::254]", "169.254.169.254", "169.254.170.2", "[fe80::a9fe:a9fe]",
                                "[::ffff:169.254.169.254]", "[::ffff:a9fe:a9fe]", "[::169.254.169.254]",
                                "[64:ff9b::169.254.169.254]", "[2002:a9fe:a9fe::1]", "2852039166", "0xa9fea9fe",
                                "0251.0376.0251.0376", "169.254.43518", "100.100.100.200", "168.63.129.16",
                                "192.0.0.192"])
def test_metadata_addresses_refused_in_every_form_whatever_the_flags(ip):
    e = _err(f"http://{ip}/latest/meta-data/", EVERYTHING)
    assert e.reason == "blocked_address" and "metadata" in str(e)


@pytest.mark.parametrize("part", ["status", "headers", "body"])
def test_trickling_server_is_cut_at_the_total_deadline(web, part):
    import time
    name = _png(web.root)
    policy = AddressPolicy(allow_private_network=True, total_timeout=1.5)
    t0 = time.monotonic()
    e = _err(web.url(f"trickle/{part}/{name}"), policy)  # per-operation timeout 2 s: never reached by 0.2 s bytes
    assert (e.reason, e.retryable) == ("timeout", True) and 1.4 < time.monotonic() - t0 < 3.0


def test_worker_hook_returns_img2dataset_contract(web):
    name = _png(web.root)
    netguard.install(AddressPolicy(allow_private_network=False))
    import img2dataset.downloader as dl
    key, stream, err = dl.download_image((7, web.url(f"files/{name}")), 2, "synergen", ["noai"])
    assert key == 7 and stream is None and netguard.parse_error_text(err)[0] == "blocked_address"
    netguard.install(AddressPolicy(allow_private_network=True))
    key, stream, err = dl.download_image((7, web.url(f"files/{name}")), 2, "synergen", ["noai"])
    assert err is None and stream.read()[:4] == b"\x89PNG"


def test_one_watchdog_thread_expires_every_deadline_in_order_and_never_a_closed_one():
    """Download deadlines share one thread per process (a timer thread each cost a shard ~3% of its CPU): each
    expires at its moment, whatever order they were made in, and one closed in time never does."""
    import threading
    import time

    from pipeline.netguard import _Deadline

    before = threading.active_count()
    t0 = time.monotonic()
    deadlines = [_Deadline(s) for s in (0.6, 0.2, 0.4, 0.05)]
    closed = _Deadline(0.3)
    closed.close()
    assert threading.active_count() <= before + 1  # one watchdog at most, not one per deadline
    while not all(d.expired for d in deadlines) and time.monotonic() - t0 < 10:
        time.sleep(0.01)
    assert all(d.expired for d in deadlines) and not closed.expired
    assert time.monotonic() - t0 >= 0.6
    late = _Deadline(30)
    assert not late.expired
    late.close()
