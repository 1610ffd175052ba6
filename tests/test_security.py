"""Attacks on real loopback nodes (gRPC servers, zeroconf, the CLI): each must be refused.

The probes live in scripts/attack.py (so they also run against a fresh set of
nodes from the command line); here each is run and its refusal checked: the
status code and the reason in trailing metadata, not just "an error".
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from turbocluster.runtime.transport import auth

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("attack", ROOT / "scripts" / "attack.py")
attack = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(attack)

EXPECTED = {  # probe -> (code, reason in the detail or None)
    "no_credential": ("UNAUTHENTICATED", auth.REASON_MISSING),
    "no_credential_handshake": ("UNAUTHENTICATED", auth.REASON_MISSING),
    "wrong_secret": ("UNAUTHENTICATED", auth.REASON_MAC),
    "body_tampering": ("UNAUTHENTICATED", auth.REASON_BODY),
    "replay_same_node": ("UNAUTHENTICATED", auth.REASON_REPLAY),
    "replay_other_node": ("UNAUTHENTICATED", auth.REASON_TARGET),
    "stale_credential": ("UNAUTHENTICATED", auth.REASON_SKEW),
    "rogue_node_no_secret": ("UNAUTHENTICATED", None),
    "rogue_node_other_secret": ("UNAUTHENTICATED", auth.REASON_MAC),
    "model_path_traversal": ("INVALID_ARGUMENT", None),
    "model_absolute_path": ("INVALID_ARGUMENT", None),
    "model_symlink_escape": ("INVALID_ARGUMENT", None),
    "model_hub_id": ("INVALID_ARGUMENT", None),
    "model_exists_leak": ("INVALID_ARGUMENT", None),
    "exposed_without_secret": ("EXIT", None),
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_model_dirs):
    models = tmp_path_factory.mktemp("models")
    shutil.copytree(tiny_model_dirs["qwen3"], models / "tiny")  # a real copy: a link out would be an escape
    lab = attack.Lab(models_dir=str(models))
    yield lab
    lab.close()


def test_every_probe_is_listed():
    assert set(attack.PROBES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_attack_is_refused(lab, name, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))  # no operator's secret file makes 0.0.0.0 legal
    monkeypatch.delenv(auth.ENV_SECRET, raising=False)
    [result] = attack.run_probes(lab, [name])
    code, reason = EXPECTED[name]
    assert result["refused"] and result["held"], result
    assert result["code"] == code, result
    if reason:
        assert f"[{reason}]" in result["detail"], result


def test_allowed_model_loads_with_the_secret(lab):
    """The same node serves the cluster: a model under --models-dir loads over an authenticated connection."""
    from turbocluster.runtime.model import loader

    desc = loader.describe(os.path.join(lab.models_dir, "tiny"))
    c = attack.NodeClient(lab.a[1], desc["identity"], secret=lab.secret, will_load=True, timeout=10)
    try:
        info = c.load("tiny", 0, 1)
        assert info.layer_end == 1
        assert c.node_id == lab.a[0].node_id
    finally:
        c.close()


def test_rogue_advertiser_on_zeroconf_is_not_used(tiny_model_dirs):
    """A node advertised with zeroconf but without the secret is refused by the coordinator; the real one is used."""
    from turbocluster.runtime.cluster.cluster import Cluster
    from turbocluster.runtime.transport import discovery

    lab = attack.Lab()
    handles = []
    try:
        for tag, node in (("real", lab.a), ("rogue", lab.rogue)):
            port = int(node[1].rsplit(":", 1)[1])
            handles.append(discovery.advertise(f"sec-{tag}-{node[0].node_id}", "127.0.0.1", port, {"node_id": node[0].node_id}))
        lines = []
        cluster = Cluster.connect(
            tiny_model_dirs["qwen3"], discover_timeout=1.5, interfaces=["127.0.0.1"], log=lines.append, secret=lab.secret,
        )
        try:
            used = {c.address for c in cluster.clients}
            assert lab.a[1] in used and lab.rogue[1] not in used
            assert any(lab.rogue[1] in line and "did not prove" in line for line in lines), lines
        finally:
            for c in cluster.clients:
                c.close()
    finally:
        for h in handles:
            discovery.withdraw(h)
        lab.close()


def test_exposed_cli_node_without_secret_is_a_one_line_error(tmp_path):
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    env.pop(auth.ENV_SECRET, None)
    env.pop(auth.ENV_SECRET_FILE, None)
    p = subprocess.run(
        [sys.executable, "-m", "turbocluster.runtime.cli.node", "serve", "--host", "0.0.0.0", "--port", "0", "--no-advertise"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "turbo-node secret" in lines[0] and "Traceback" not in p.stderr, p.stderr


def test_secret_command_then_default_file_is_read(tmp_path, monkeypatch):
    from turbocluster.runtime.cli import secret as secret_cli

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv(auth.ENV_SECRET, raising=False)
    monkeypatch.delenv(auth.ENV_SECRET_FILE, raising=False)
    assert auth.find_secret() is None  # loopback stays zero-config: nothing is created behind the user's back
    assert secret_cli.run(type("A", (), {"secret_file": None, "force": False})()) == 0
    path = auth.default_secret_path()
    assert path.stat().st_mode & 0o777 == 0o600
    assert auth.find_secret() == path.read_text().strip()
    assert auth.exposure_error("0.0.0.0", auth.find_secret()) is None
    other = tmp_path / "elsewhere"
    other.write_text("x" * 40)
    other.chmod(0o644)
    monkeypatch.setenv(auth.ENV_SECRET_FILE, str(other))
    with pytest.raises(PermissionError, match="chmod 600"):
        auth.find_secret()
    other.chmod(0o600)
    assert auth.find_secret() == "x" * 40
