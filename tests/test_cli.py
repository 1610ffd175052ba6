"""The real CLIs, run as subprocesses: every wrong input is one line saying what to do, before anything heavy starts.

Each case asserts the exit status, that stderr is exactly one line naming the
tool (no traceback), and a phrase of the advice. None of them may start a node
or load weights, so each returns within seconds.
"""

import os
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(tool, *argv, env=None, timeout=60):
    """``turbo-cluster`` / ``turbo-node`` through the installed console script (this checkout first on the path)."""
    script = os.path.join(os.path.dirname(sys.executable), tool)
    cmd = [script] if os.path.exists(script) else [sys.executable, "-m", f"turbocluster.runtime.cli.{tool.split('-')[1]}"]
    full = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    full.pop("TURBO_CLUSTER_SECRET", None)
    full.update(env or {})
    t0 = time.monotonic()
    p = subprocess.run(cmd + list(argv), capture_output=True, text=True, timeout=timeout, env=full)
    return p.returncode, p.stdout, p.stderr, time.monotonic() - t0


def refused(tool, *argv, says, status=2, env=None):
    rc, out, err, seconds = run(tool, *argv, env=env)
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert rc == status, (rc, err)
    assert len(lines) == 1 and lines[0].startswith(f"{tool}: error: "), err
    assert says in lines[0], lines[0]
    return lines[0], seconds


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens once it is closed


@pytest.mark.parametrize("tool", ["turbo-cluster", "turbo-node"])
def test_version(tool):
    from turbocluster import __version__

    rc, out, err, _ = run(tool, "--version")
    assert rc == 0 and out.strip() == f"{tool} {__version__}", (out, err)


CLUSTER_CASES = {
    "path that does not exist": (["generate", "--model", "./no-such-model"], "no such file or directory", 2),
    "directory without config.json": (["generate", "--model", "/tmp"], "has no config.json", 2),
    "hub id without network": (["generate", "--model", "mlx-community/no-such-model-xyz", "--local", "1"], "download it first", 1),
    "node without a port": (["generate", "--nodes", "mac1.local"], "mac1.local:7070", 2),
    "empty raw prompt": (["generate", "--prompt", "", "--no-chat-template"], "give --prompt TEXT", 2),
    "kv bits 9": (["generate", "--kv-bits", "9"], "use one of 2, 3, 4, 5, 6, 7, 8", 2),
    "kv bits 0": (["generate", "--kv-bits", "0"], "leave it out for an fp16 cache", 2),
    "max context below prompt + tokens": (["generate", "--max-context", "5", "--local", "1"], "raise --max-context", 2),
    "negative max tokens": (["generate", "--max-tokens", "-1"], "at least 1", 2),
    "top p 2": (["generate", "--top-p", "2"], "between 0 and 1 (0 = off), got 2", 2),
    "negative temperature": (["generate", "--temp", "-1"], ">= 0", 2),
    "short secret": (["generate", "--nodes", "127.0.0.1:7070"], "at least", 2),
    "plan context 0": (["plan", "--context", "0"], "at least 1", 2),
    "restore a missing file": (["restore", "/no/such/file.tcs"], "is not a file", 2),
    "migrate to an address without port": (["migrate", "--session", "s", "--layers", "0:2", "--to", "mac2.local"], "needs a port", 2),
}


@pytest.mark.parametrize("case", list(CLUSTER_CASES))
def test_turbo_cluster_refuses_wrong_input_in_one_line(case):
    argv, says, status = CLUSTER_CASES[case]
    env = {"TURBO_CLUSTER_SECRET": "short"} if case == "short secret" else None
    _, seconds = refused("turbo-cluster", *argv, says=says, status=status, env=env)
    assert seconds < 30  # nothing heavy started


def test_a_node_that_is_down_is_refused_at_once():
    line, seconds = refused("turbo-cluster", "generate", "--nodes", f"127.0.0.1:{closed_port()}", says="is `turbo-node serve` running there?")
    assert "not reachable" in line and seconds < 10  # no 10 s handshake deadline


def test_restore_of_a_bad_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.tcs"
    bad.write_bytes(os.urandom(4096))
    refused("turbo-cluster", "restore", str(bad), "--local", "1", says="cannot be restored: magic", status=1)


NODE_CASES = {
    "model without layers": (["serve", "--model", "x/y"], "needs --layers START:END"),
    "model path that does not exist": (["serve", "--model", "./nope", "--layers", "0:2"], "no such file or directory"),
    "port out of range": (["serve", "--port", "70000"], "0..65535"),
    "negative ttl": (["serve", "--session-ttl", "-1"], ">= 0 seconds"),
    "bad faults": (["serve", "--faults", "bogus"], "drop:K"),
}


@pytest.mark.parametrize("case", list(NODE_CASES))
def test_turbo_node_refuses_wrong_input_in_one_line(case):
    argv, says = NODE_CASES[case]
    refused("turbo-node", *argv, says=says)


def test_a_second_node_on_a_port_in_use_is_refused():
    from turbocluster.runtime.cluster.cluster import start_local_nodes, stop_local_nodes

    [node] = start_local_nodes(1)
    try:
        port = node.address.rpartition(":")[2]
        refused("turbo-node", "serve", "--host", "127.0.0.1", "--port", port, "--no-advertise", says="already in use")
        assert node.proc.poll() is None  # the first one keeps serving
    finally:
        stop_local_nodes([node])


def test_serve_on_a_network_interface_needs_an_api_key():
    """The HTTP API is secure by default like the nodes: off loopback it needs a key, refused before any node starts."""
    rc, out, err, seconds = run("turbo-cluster", "serve", "--host", "0.0.0.0", "--port", "0", "--local", "1",
                                env={"TURBO_API_KEY": ""})
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("turbo-cluster: error: ") and "--api-key" in lines[0], lines[0]
