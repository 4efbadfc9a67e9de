"""The /playground page's routes: open without a key, own-origin only, no secrets, and only the public API."""

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serve.http.app import create_app
from serve.http.auth import add_key
from serve.settings import ApiLimits, AuthSettings
from tests.unit.test_api import FakeBackend

STATIC = Path(__file__).resolve().parents[2] / "serve" / "http" / "static" / "playground"


@pytest.fixture
def keyed(tmp_path):
    """An app with API keys on: (client, key)."""
    path = tmp_path / "keys.yaml"
    key = add_key(path, "alice", requests_per_s=1000, images_per_min=1e6)
    return TestClient(create_app(ApiLimits(), FakeBackend(), auth=AuthSettings(api_keys_file=path))), key


def test_page_and_assets_load_without_a_key_while_the_api_needs_one(keyed):
    client, key = keyed
    page = client.get("/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<base href="/">' in page.text and "{{BASE}}" not in page.text
    for name, kind in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        asset = client.get(f"/playground/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
    assert client.get("/v1/status").status_code == 401
    assert client.get("/v1/status", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert key not in page.text


def test_only_listed_assets_are_served(keyed):
    client, _ = keyed
    for name in ("index.html", "..%2Fplayground.py", "nothing.js"):
        response = client.get(f"/playground/{name}")
        assert response.status_code == 404 and response.json()["error"]["type"] == "not_found"


def test_the_page_allows_only_its_own_scripts_and_sets_no_cors(keyed):
    client, _ = keyed
    response = client.get("/playground", headers={"Origin": "https://elsewhere.example"})
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "unsafe-inline" not in policy
    assert "access-control-allow-origin" not in response.headers
    html = (STATIC / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "no inline scripts"
    assert not re.search(r"\son[a-z]+=", html), "no inline event handlers"
    assert not re.search(r"https?://", html + (STATIC / "playground.css").read_text()), "nothing from another origin"


def test_the_page_is_served_under_a_route_prefix(tmp_path):
    client = TestClient(create_app(ApiLimits(), FakeBackend()), root_path="/chaos")
    assert '<base href="/chaos/">' in client.get("/playground").text


def test_the_script_calls_only_the_public_api_with_relative_paths():
    script = (STATIC / "playground.js").read_text()
    assert "http://" not in script and "https://" not in script
    paths = set(re.findall(r"api\([`\"]([a-z0-9/]+?)(?:/\$|[?`\"])", script))
    assert paths == {"v1/jobs", "readyz", "v1/status", "v1/models"}, paths
    assert len(re.findall(r"\bfetch\(\w", script)) == 1, "every call goes through api(), which adds the key"
    assert "localStorage.setItem(KEY_STORAGE" not in script and "sessionStorage.setItem(KEY_STORAGE" in script
