"""attllm-serve with a bearer token, a tiny queue and an LLM provider (the scripted local OpenAI-protocol server).

One server per module; the LLM's behaviour is switched per test (answer, slow past the deadline, an error that
echoes the key), and neither any answer nor the server's log may ever hold the API key.
"""

import concurrent.futures
import json
import threading

import httpx
import pytest

from attllm_jax.data.dataset import list_images
from attllm_jax.data.synthetic import SyntheticConfig
from attllm_jax.evaluation.demo import prepare_demo
from tests.llm_server import LLMServer, error_reply, text_reply
from tests.serve_helpers import running_server

# one worker runs the whole module: its server fixture (about 20 s) is then started once, not once per worker
pytestmark = pytest.mark.xdist_group("serve_guarded")

SMALL = SyntheticConfig(num_streets=2, street_length_m=60.0, db_spacing_m=10.0, num_queries=4, max_query_shift_m=12.0)
KEY = "sk-test-7f3a9c2e5b1d4068a0c1e2f3"
TOKEN = "serve-token-4c1e9b7a"
POINTS = json.dumps([{"center": [0.3, 0.4], "weight": 1.5, "reasoning": "sign"}, {"center": [0.7, 0.2], "weight": 0.5}])
TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def llm():
    mode = {"kind": "points"}
    lock = threading.Lock()

    def respond(seen):
        with lock:
            kind = mode["kind"]
        if kind == "slow":
            return text_reply(seen, POINTS, delay_s=TIMEOUT_S + 4)
        if kind == "error":
            return error_reply(seen, 500, message=f"upstream failed for key {KEY}")
        return text_reply(seen, POINTS)

    with LLMServer(respond) as server:
        server.mode = mode
        yield server


@pytest.fixture(scope="module")
def setup(tmp_path_factory, llm):
    root = tmp_path_factory.mktemp("serve_guarded")
    benchmark, _ = prepare_demo(root / "cache", SMALL)
    (root / "token").write_text(TOKEN + "\n")
    args = ["--database_folder", str(benchmark.database), "--output_dir", str(root / "out"), "--image_size", "64"]
    args += ["--token_file", str(root / "token"), "--max_batch", "2", "--max_queue", "1", "--max_wait_ms", "400"]
    args += ["--provider", "openai", "--llm_model", "qwen-vl", "--base_url", llm.url + "/v1"]
    args += ["--attention_timeout", str(TIMEOUT_S), "--warmup", "384x288"]
    with running_server(args, root / "server", env={"OPENAI_API_KEY": KEY}) as server:
        yield {"server": server, "benchmark": benchmark, "root": root, "photo": list_images(benchmark.queries)[0]}


def post(setup, data=None, token=TOKEN, timeout=120) -> httpx.Response:
    photo = setup["benchmark"].queries / setup["photo"]
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    files = {"image": ("p.jpg", photo.read_bytes(), "image/jpeg")}
    return httpx.post(f"{setup['server'].url}/v1/localize", files=files, data=data or {}, headers=headers, timeout=120)


def assert_no_key(setup, *responses: httpx.Response) -> None:
    for response in responses:
        assert KEY not in response.text and KEY not in str(response.headers)
    assert KEY not in setup["server"].log()
    assert KEY not in (setup["root"] / "out" / "serve.log").read_text()


def test_a_missing_or_wrong_token_gets_401_and_the_right_one_an_answer(setup):
    for token in (None, "wrong-token", TOKEN + "x"):
        response = post(setup, token=token)
        assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(f"{setup['server'].url}/v1/info", timeout=10).status_code == 401
    assert httpx.get(f"{setup['server'].url}/v1/health", timeout=10).status_code == 200
    info = httpx.get(f"{setup['server'].url}/v1/info", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert info.status_code == 200 and info.json()["attention_provider"] == "openai"
    assert TOKEN not in info.text
    assert post(setup).status_code == 200


def test_auto_attention_applies_the_llm_answer_and_the_key_is_sent_but_never_shown(setup, llm):
    llm.mode["kind"] = "points"
    before = len(llm.seen)
    response = post(setup, {"attention": "auto", "alpha": "0.5"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["attention"]["kind"] == "points" and body["alpha"] == 0.5
    assert [p["center"] for p in body["attention"]["points"]] == [[0.3, 0.4], [0.7, 0.2]]
    plain = post(setup).json()
    assert [m["score"] for m in body["matches"]] != [m["score"] for m in plain["matches"]]  # the blend changed them
    assert len(llm.seen) == before + 1 and llm.seen[-1].image_bytes  # the framed photo was sent
    assert llm.seen[-1].headers["authorization"] == f"Bearer {KEY}"
    assert_no_key(setup, response)


@pytest.mark.parametrize("kind", ["slow", "error"])
def test_a_provider_timeout_or_error_gives_the_plain_answer_flagged_unavailable(setup, llm, kind):
    llm.mode["kind"] = kind
    try:
        response = post(setup, {"attention": "auto"})
    finally:
        llm.mode["kind"] = "points"
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["attention"]["kind"] == "unavailable" and body["attention"]["error"]
    assert body["alpha"] == 0.0
    assert body["timings_ms"]["attention"] < (TIMEOUT_S + 2) * 1000
    plain = post(setup).json()
    assert [m["score"] for m in body["matches"]] == [m["score"] for m in plain["matches"]]
    assert_no_key(setup, response)


def test_a_full_queue_answers_503_with_retry_after_and_the_service_goes_on(setup):
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: post(setup), range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503}, statuses
    for response in responses:
        if response.status_code == 503:
            assert response.json()["error"]["code"] == "queue_full"
            assert int(response.headers["retry-after"]) >= 1
    assert post(setup).status_code == 200
