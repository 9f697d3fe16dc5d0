"""The annotate client keeps its requests in flight on a keep-alive pool sized to the concurrency."""

import ssl

import pytest

from craft.annotate.backends import OpenAIBackend
from craft.annotate.run import AnnotateConfig, main
from craft.data.demo import DemoConfig, generate
from tests.annotate_server import ScriptedServer


@pytest.fixture(scope="module")
def cxr48(tmp_path_factory):
    ds = tmp_path_factory.mktemp("ds") / "demo-cxr"
    generate(DemoConfig(modality="cxr", n=48, seed=0, resolution=32), ds)
    return ds


def test_requests_reuse_one_connection_per_slot(cxr48, tmp_path):
    with ScriptedServer(latency_s=0.05) as srv:
        accepted = []
        real = srv.httpd.process_request
        srv.httpd.process_request = lambda req, addr: accepted.append(addr) or real(req, addr)
        cfg = AnnotateConfig(backend="openai", model="m", base_url=srv.base_url, concurrency=6, progress=False)
        summary = main(cfg, cxr48, tmp_path / "out")
    assert summary["done"] == 48 and len(srv.seen) == 48
    assert srv.max_in_flight == 6  # the pool lets every slot have a request in flight
    assert len(accepted) <= 6  # keep-alive: 48 requests over at most one connection per slot


def _ssl_context(backend: OpenAIBackend) -> ssl.SSLContext:
    return backend._client._transport._pool._ssl_context


def test_plain_http_skips_the_ca_bundle_and_https_verifies():
    plain = OpenAIBackend(model="m", base_url="http://127.0.0.1:9/v1")
    secure = OpenAIBackend(model="m", base_url="https://api.example.com/v1")
    try:
        ctx = _ssl_context(plain)
        assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname  # fails closed, never unverified
        assert ctx.cert_store_stats()["x509_ca"] == 0
        sctx = _ssl_context(secure)
        assert sctx.verify_mode == ssl.CERT_REQUIRED and sctx.cert_store_stats()["x509_ca"] > 0
    finally:
        plain.close()
        secure.close()
