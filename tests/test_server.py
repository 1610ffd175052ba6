"""`turbo-cluster serve` over two real local nodes on the bundled SmolLM2, driven by the official openai client."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai", reason="the openai client is a test extra (pip install -e .[test])")
pytest.importorskip("fastapi", reason="fastapi is needed by turbo-cluster serve")

KEY = "test-key-123"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_server(*extra, timeout=180.0):
    """A `turbo-cluster serve --local 2 --port 0` process; returns (proc, base_url, stderr lines)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = "import sys; from turbocluster.runtime.cli.main import cluster_main; sys.exit(cluster_main())"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--local", "2", "--port", "0", "--context", "512", *extra],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, start_new_session=True)
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError(f"serve exited with {proc.wait()}: {''.join(lines)[-2000:]}")
        lines.append(line)
        m = re.search(r"serving on (http://\S+)", line)
        if m:
            threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()  # keep the pipe drained
            return proc, m.group(1), lines
    proc.kill()
    raise RuntimeError("serve did not start in time")


def stop_server(proc, sig=signal.SIGTERM, timeout=60.0):
    proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


@pytest.fixture(scope="module")
def server():
    proc, url, lines = start_server("--api-key", KEY, "--workers", "4", "--system", "You are a terse assistant.")
    try:
        yield url, lines
    finally:
        rc = stop_server(proc)
    assert rc == 0, "".join(lines)[-3000:]  # SIGTERM is a clean exit: no abort from live threads at exit


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(client, text, **kw):
    return client.chat.completions.create(model="any", messages=[{"role": "user", "content": text}],
                                          max_tokens=kw.pop("max_tokens", 8), temperature=0, **kw)


def test_models_health_and_key(server, client):
    url, _ = server
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct.Q4_1"]
    with urllib.request.urlopen(url + "/health") as r:
        assert json.load(r)["nodes"] == 2
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url + "/v1/models")
    assert e.value.code == 401
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_chat_stream_and_not_agree(client):
    r = ask(client, "Name a colour.")
    text = r.choices[0].message.content
    assert text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    stream = ask(client, "Name a colour.", stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            pieces.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(pieces) == text  # greedy: the same answer either way
    assert finish == r.choices[0].finish_reason and usage.completion_tokens == r.usage.completion_tokens


def test_completions_stop_and_bad_input(client):
    r = client.completions.create(model="any", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 7"])
    assert r.choices[0].finish_reason == "stop" and " 7" not in r.choices[0].text and "5" in r.choices[0].text
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="any", prompt="x", max_tokens=0)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="any", messages=[{"role": "user", "content": "x"}], top_p=3.0)


def test_concurrent_requests_match_alone(client):
    prompts = ["Count to three.", "What is 2+2?", "Say a fruit."]
    alone = [ask(client, p, max_tokens=6).choices[0].message.content for p in prompts]
    out = [None] * len(prompts)

    def run(i):
        out[i] = ask(client, prompts[i], max_tokens=6).choices[0].message.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert out == alone


def test_second_turn_reuses_kv(server, client):
    msgs = [{"role": "user", "content": "Hi there"}]
    r1 = client.chat.completions.create(model="any", messages=msgs, max_tokens=5, temperature=0)
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content}, {"role": "user", "content": "And?"}]
    r2 = client.chat.completions.create(model="any", messages=msgs, max_tokens=3, temperature=0)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    # the first turn's prompt and answer are in the kept KV: only the new turn (a dozen tokens) is prefilled
    assert cached >= r1.usage.prompt_tokens + r1.usage.completion_tokens - 1
    assert r2.usage.prompt_tokens - cached < 15
    sid = r2.model_extra["session_id"]
    req = urllib.request.Request(server[0] + "/v1/cluster", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req) as r:
        st = json.load(r)
    row = [s for s in st["sessions"] if s["session_id"] == sid][0]
    assert row["kept"] and [x["layers"] for x in row["stages"]] == [p["layers"] for p in st["plan"]]
    assert row["offset"] == row["tokens"] and row["kv_bytes"] > 0
    req = urllib.request.Request(server[0] + f"/v1/sessions/{sid}", method="DELETE", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req) as r:
        assert json.load(r)["deleted"]
    with urllib.request.urlopen(urllib.request.Request(server[0] + "/v1/sessions", headers=req.headers)) as r:
        assert sid not in [s["session_id"] for s in json.load(r)["data"]]


def test_metrics_count_tokens(server, client):
    ask(client, "Hello", max_tokens=3)
    with urllib.request.urlopen(server[0] + "/metrics") as r:
        text = r.read().decode()
    generated = float(re.search(r"^turbo_server_generated_tokens_total (\S+)", text, re.M).group(1))
    assert generated >= 3 and "turbo_server_hop_milliseconds_count" in text
    # the nodes' own metrics, merged: one Forward counter and one positions counter per node
    forwards = re.findall(r'^turbo_node_rpcs_total\{code="OK",method="Forward(?:Stream)?",node="([^"]+)"\} (\S+)', text, re.M)
    positions = re.findall(r'^turbo_node_positions_total\{node="([^"]+)"\} (\S+)', text, re.M)
    assert len({n for n, _ in positions}) == 2 and all(float(v) >= 3 for _, v in positions), text[-2000:]
    assert forwards and all(float(v) >= 1 for _, v in forwards)
    types = [line for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))  # merged into one family each, not one per node


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = "import sys; from turbocluster.runtime.cli.main import cluster_main; sys.exit(cluster_main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)


def test_cli_status_resume_and_drop(server, client):
    url, _ = server
    r = client.completions.create(model="any", prompt="Once upon a time", max_tokens=3, temperature=0)
    sid = r.model_extra["session_id"]
    st = _cli("status", "--server", url, "--api-key", KEY, "--json")
    assert st.returncode == 0, st.stderr
    got = json.loads(st.stdout)
    assert len(got["nodes"]) == 2 and sid in [s["session_id"] for s in got["sessions"]]
    more = _cli("resume", sid, "--server", url, "--api-key", KEY, "--max-tokens", "3")
    assert more.returncode == 0 and more.stdout.strip(), more.stderr
    assert _cli("drop", sid, "--server", url, "--api-key", KEY).returncode == 0
    again = _cli("drop", sid, "--server", url, "--api-key", KEY)
    assert again.returncode == 1 and "HTTP 404" in again.stderr and "Traceback" not in again.stderr


def test_top_k_and_min_p_reach_the_last_nodes_sampler(client):
    """temperature 1 with top_k 1 (or min_p 1) keeps only the argmax: the greedy answer, sampled by the node."""
    greedy = ask(client, "Name three animals.", max_tokens=10).choices[0].message.content
    msgs = [{"role": "user", "content": "Name three animals."}]
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        r = client.chat.completions.create(model="any", messages=msgs, max_tokens=10, temperature=1.0, extra_body=extra)
        assert r.choices[0].message.content == greedy, extra


def test_a_full_queue_answers_503_with_retry_after_and_the_rest_complete():
    proc, url, lines = start_server("--workers", "1", "--queue", "1")
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
        results = [None] * 5

        def run(i):
            try:
                results[i] = ask(c, f"Tell me a story number {i}.", max_tokens=24).choices[0].message.content
            except openai.APIStatusError as e:
                results[i] = (e.status_code, e.response.headers.get("retry-after"))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(results))]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(300)
        busy = [r for r in results if isinstance(r, tuple)]
        done = [r for r in results if isinstance(r, str)]
        assert busy and all(r[0] == 503 and r[1] and int(r[1]) >= 1 for r in busy), results
        assert 2 <= len(done) and all(done), results  # one running, one queued: both answered
        assert ask(c, "Say hi.", max_tokens=4).choices[0].message.content  # free again afterwards
    finally:
        assert stop_server(proc) == 0, "".join(lines)[-3000:]
