"""One request followed through the service by its id: the X-Request-Id a client sends (or the one the server
makes) comes back in the response's header and in an error's body, and names the request in the log lines of
both the ingress and the replica that answered it."""

import glob
import time
import uuid

import pytest

from tests.integration.conftest import APP, EMBEDDER, app_config, ray_logs

pytestmark = pytest.mark.integration
MODEL = "all-MiniLM-L6-v2"
ERROR_KEYS = {"message", "type", "param", "code"}


def unbuffered_logs(config) -> None:
    """Serve's fast path keeps a replica's request-path log lines in a buffer of 1000 records (or until an
    ERROR); one record here, so that the lines can be read while the replicas run."""
    runtime_env = app_config(config).setdefault("runtime_env", {})
    runtime_env.setdefault("env_vars", {})["RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE"] = "1"


@pytest.fixture(scope="module")
def config(serve_app):
    return serve_app(unbuffered_logs)


def lines_naming(rid: str, deployment: str, timeout_s: float = 20) -> list[str]:
    """The log lines of the app's `deployment` replicas that name `rid`, once there are some."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = []
        for path in glob.glob(f"{ray_logs()}/serve/replica_{APP}_{deployment}_*.log"):
            with open(path, errors="replace") as f:
                found += [line for line in f if rid in line]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_an_error_from_the_replica_carries_the_callers_id_in_its_body_header_and_both_logs(config, client):
    rid = f"trace-{uuid.uuid4()}"
    # Too long for the model's 256 tokens, without truncate: the replica finds it when it tokenizes.
    response = client.post("/v1/embeddings", json={"model": MODEL, "input": "word " * 2000, "truncate": False},
                           headers={"X-Request-Id": rid})
    body = response.json()
    assert response.status_code == 400 and response.headers["x-request-id"] == rid
    assert body["request_id"] == rid and set(body) == {"error", "request_id"} and set(body["error"]) == ERROR_KEYS
    [ingress] = [line for line in lines_naming(rid, "Ingress") if "answered" in line]
    assert "400 invalid_request_error" in ingress and "tokens" in ingress
    [replica] = [line for line in lines_naming(rid, EMBEDDER) if "answered" in line]
    assert "InputTooLong" in replica


def test_an_error_the_ingress_answers_alone_carries_the_id_the_server_made(config, client):
    response = client.post("/v1/embeddings", json={"model": "no-such-model", "input": "hi"})
    rid = response.headers["x-request-id"]
    assert response.status_code == 404 and rid and response.json()["request_id"] == rid
    [line] = [line for line in lines_naming(rid, "Ingress") if "answered" in line]
    assert "404 invalid_request_error" in line and "no-such-model" in line
    assert lines_naming(rid, EMBEDDER, timeout_s=0) == []  # never reached a replica


def test_a_route_that_does_not_exist_and_a_body_that_is_not_json_carry_their_ids(config, client):
    missing = client.get("/v1/nothing-here", headers={"X-Request-Id": "rid-missing-route"})
    assert missing.status_code == 404 and missing.json()["request_id"] == "rid-missing-route"
    broken = client.post("/v1/embeddings", content=b"{not json", headers={"X-Request-Id": "rid-broken-json",
                                                                          "Content-Type": "application/json"})
    assert broken.status_code == 400 and broken.json()["request_id"] == "rid-broken-json"
    assert set(broken.json()["error"]) == ERROR_KEYS


def test_a_good_answer_is_not_logged_as_answered(config, client):
    rid = f"fine-{uuid.uuid4()}"
    response = client.post("/v1/embeddings", json={"model": MODEL, "input": "a short text"},
                           headers={"X-Request-Id": rid})
    assert response.status_code == 200 and response.headers["x-request-id"] == rid
    assert "request_id" not in response.json()
    # A failed request sent after it: once its line is in the ingress's log, a line for the first would be too.
    after = client.post("/v1/embeddings", json={"model": "no-such-model", "input": "hi"})
    assert lines_naming(after.headers["x-request-id"], "Ingress")
    assert [line for line in lines_naming(rid, "Ingress", timeout_s=0) if "answered" in line] == []
