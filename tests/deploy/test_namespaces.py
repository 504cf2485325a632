"""Evidence on separate hosts (issue 22 §3), opt-in: the SuperLink and each SuperNode in its own Linux network
namespace (`ip netns`), each with its own address in a private /24 (10.213.77.0/24, on a bridge inside the
SuperLink's namespace: it exists only inside this machine; the root namespace gets no address in it), joined
by virtual links (veth pairs). TLS and SuperNode authentication are on; certificates come from the helper;
every node is started with `pluribus federation join` naming only its own data file, model file and state
folder. The PrivFusion run, submitted with `pluribus fuse flower --superlink` from the SuperLink's namespace,
must give the in-process engine's fused tensors exactly under a seeded (reproducible, NOT private) noise, and
the FedBone run (`pluribus fed flower --superlink`, each client given only its institution's data file) the
in-process engine's server model tensor for tensor. An unregistered node and an insecure node, each from a
namespace of its own, are refused.

Run as root with PLURIBUS_FLOWER_DEPLOYMENT=1 (`pytest tests/deploy -m ray`); without the rights to create
namespaces it skips and says so. Namespaces, links and processes are removed in ``finally``; every wait has a
deadline and the whole run a hard limit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("PLURIBUS_FLOWER_DEPLOYMENT") != "1",
                       reason="namespace deployment test is opt-in: set PLURIBUS_FLOWER_DEPLOYMENT=1"),
]

SUBNET = "10.213.77"  # a private /24 that lives only on the bridge inside the SuperLink's namespace
PORT = 9093
READY = "stop with Ctrl-C or kill"
HARD_LIMIT_S = 900


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Namespaces:
    """Network namespaces and links made by this test (names carry this process's id), removed by ``close``."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.names: list[str] = []

    def add(self, role: str) -> str:
        name = f"plrb{self.tag}{role}"
        _ip("netns", "add", name)
        self.names.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def hub(self) -> str:
        """The SuperLink's namespace, with a bridge holding .1 of the /24."""
        ns = self.add("sl")
        _ip("-n", ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", ns, "addr", "add", f"{SUBNET}.1/24", "dev", "br0")
        _ip("-n", ns, "link", "set", "br0", "up")
        return ns

    def host(self, hub: str, k: int) -> tuple[str, str]:
        """A host namespace linked to the hub's bridge by a veth pair; its address is .(10 + k)."""
        ns = self.add(f"n{k}")
        here, there = f"pv{self.tag}a{k}"[-15:], f"pv{self.tag}b{k}"[-15:]
        _ip("link", "add", here, "type", "veth", "peer", "name", there)
        _ip("link", "set", here, "netns", ns)
        _ip("link", "set", there, "netns", hub)
        _ip("-n", hub, "link", "set", there, "master", "br0")
        _ip("-n", hub, "link", "set", there, "up")
        address = f"{SUBNET}.{10 + k}"
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", here)
        _ip("-n", ns, "link", "set", here, "up")
        return ns, address

    def close(self) -> None:
        for name in reversed(self.names):  # deleting a namespace deletes its links (veth pairs go in pairs)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30, check=False)


@pytest.fixture()
def namespaces() -> Iterator[Namespaces]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (`ip netns`); not available here")
    spaces = Namespaces(str(os.getpid() % 100000))
    try:
        spaces.add("probe")
    except (subprocess.CalledProcessError, OSError) as err:
        spaces.close()
        pytest.skip(f"cannot create a network namespace here: {getattr(err, 'stderr', b'') or err!r}")
    try:
        yield spaces
    finally:
        spaces.close()
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
        assert f"plrb{spaces.tag}" not in left, left


def _parties(root: Path) -> list:
    from pluribus.data.images import load_digits_images
    from pluribus.fusion.core.models import MLP, train_model
    from pluribus.fusion.flower.apps import PartyFiles
    from pluribus.fusion.flower.party_files import save_party_data, save_party_model

    x, y = load_digits_images()
    x, y = torch.as_tensor(x[:300]).reshape(300, -1).float(), torch.as_tensor(y[:300])
    out = []
    for k in range(2):
        torch.manual_seed(k)
        idx = torch.arange(k * 150, (k + 1) * 150)
        own = root / f"institution{k}"  # each institution's own folder: its model, its data
        save_party_model(own / "model.safetensors", train_model(MLP(64, (16,), 10), x[idx], y[idx], epochs=2))
        save_party_data(own / "data.safetensors", x[idx], y[idx])
        out.append(PartyFiles(f"inst{k}", own / "model.safetensors", own / "data.safetensors"))
    return out


class Federation:
    """A SuperLink in its namespace (TLS + node auth, `pluribus federation host`), ``hosts`` host namespaces
    linked to it, one registered node key per institution (the last host is the intruder's: its key is never
    registered); services stopped by SIGTERM (as `kill PID`), every wait bounded."""

    def __init__(self, spaces: Namespaces, root: Path, institutions: int) -> None:
        from pluribus.deploy.certs import make_node_key, make_test_certificates

        self.start = time.monotonic()
        self.root = root
        self.pluribus = str(Path(sys.executable).parent / "pluribus")
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PLURIBUS_PROGRESS": "0",
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
                    "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
        self.hub = spaces.hub()
        self.hosts = [spaces.host(self.hub, k) for k in range(institutions + 1)]
        self.superlink = f"{SUBNET}.1:{PORT}"
        self.certs = root / "coordinator" / "certs"
        make_test_certificates(self.certs, [f"{SUBNET}.1"])
        self.ca = self.certs / "test-ca.crt"
        self.keys = [make_node_key(root / f"institution{k}" / "keys", f"inst{k}") for k in range(institutions)]
        self.intruder_key = make_node_key(root / "intruder" / "keys", "intruder")
        self.services: list[subprocess.Popen[bytes]] = []
        self.nodes: dict[int, subprocess.Popen[bytes]] = {}
        self.link_log = root / "coordinator" / "superlink-state" / "superlink.log"

    def _argv(self, ns: str, *args: str) -> list[str]:
        return ["ip", "netns", "exec", ns, self.pluribus, *args]

    def service(self, ns: str, log: Path, *args: str) -> subprocess.Popen[bytes]:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as fh:
            proc = subprocess.Popen(self._argv(ns, *args), env=self.env, stdout=fh, stderr=subprocess.STDOUT)
        self.services.append(proc)
        deadline = time.monotonic() + 120
        while READY not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        return proc

    def command(self, ns: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        left = HARD_LIMIT_S - (time.monotonic() - self.start)
        return subprocess.run(self._argv(ns, *args), env=self.env, capture_output=True, text=True,
                              timeout=max(1.0, min(timeout, left)), check=False)

    def host_and_register(self) -> None:
        self.service(self.hub, self.root / "coordinator" / "host.log", "federation", "host", "--address",
                     self.superlink, "--certs", str(self.certs), "--state-dir",
                     str(self.root / "coordinator" / "superlink-state"))
        for key in self.keys:
            done = self.command(self.hub, "federation", "register", str(key.public), "--superlink", self.superlink,
                                "--root-certificates", str(self.ca))
            assert done.returncode == 0, done.stderr

    def join(self, k: int, *node_args: str) -> None:
        """Institution k's node, from its own namespace, with its own key and the given files."""
        if k in self.nodes:  # a key serves one node at a time: stop the institution's earlier node first
            stop(self.nodes.pop(k))
        own = self.root / f"institution{k}"
        self.nodes[k] = self.service(self.hosts[k][0], own / f"join-{len(self.services)}.log", "federation", "join",
                                     "--superlink", self.superlink, "--root-certificates", str(self.ca), "--key",
                                     str(self.keys[k].private), "--partition-id", str(k), *node_args)

    def fleet_peers(self) -> set[str]:
        return set(re.findall(r"(\d+\.\d+\.\d+\.\d+):\d+ - \"POST /v1/fleet", self.link_log.read_text()))

    def accepted(self) -> set[str]:
        return set(re.findall(r"Activated node_id=(\d+)", self.link_log.read_text()))

    def close(self) -> None:
        for proc in reversed(self.services):
            stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a pluribus service (it stops Flower's processes it started), SIGKILL if it does not end in 40 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def test_privfusion_across_namespaces_equals_in_process(namespaces: Namespaces, tmp_path: Path) -> None:
    from pluribus.fusion.core.config import FusionConfig
    from pluribus.fusion.flower.apps import PartyFiles, run_fusion_flower
    from pluribus.io import load_tensors

    parties = _parties(tmp_path)
    fed = Federation(namespaces, tmp_path, institutions=2)
    out = tmp_path / "coordinator" / "runs" / "fused"
    try:
        fed.host_and_register()
        for k, party in enumerate(parties):
            fed.join(k, "--state-dir", str(tmp_path / f"institution{k}" / "state"), "--party-name", party.name,
                     "--model-file", str(party.model), "--data-file", str(party.data))
        # the intruder, from its own namespace: a key nobody registered, then no TLS at all
        intruder = fed.hosts[-1][0]
        refused = fed.command(intruder, "federation", "join", "--superlink", fed.superlink, "--root-certificates",
                              str(fed.ca), "--key", str(fed.intruder_key.private), "--state-dir",
                              str(tmp_path / "intruder" / "state"), "--partition-id", "2")
        assert refused.returncode == 2 and "not registered" in refused.stderr, refused.stderr
        insecure = fed.command(intruder, "federation", "join", "--superlink", fed.superlink, "--insecure",
                               "--state-dir", str(tmp_path / "intruder" / "state2"), "--partition-id", "2")
        assert insecure.returncode == 2 and "requires TLS" in insecure.stderr, insecure.stderr
        # Flower's own insecure SuperNode, past pluribus's check: the SuperLink never accepts it
        raw_log = tmp_path / "intruder" / "raw-insecure.log"
        with open(raw_log, "wb") as fh:
            raw = subprocess.Popen(["ip", "netns", "exec", intruder, "flower-supernode", "--insecure", "--superlink",
                                    fed.superlink, "--node-config", "partition-id=2"], env=fed.env, stdout=fh,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            time.sleep(10)
            assert raw.poll() is None and "SuperNode ID" not in raw_log.read_text(errors="replace")
        finally:
            os.killpg(raw.pid, signal.SIGTERM)
            raw.wait(timeout=30)
        # the run, submitted on the coordinator
        done = fed.command(fed.hub, "fuse", "flower", "--superlink", fed.superlink, "--root-certificates",
                           str(fed.ca), "--parties", "2", "--out", str(out), "--epsilon", "4", "--noise-seed", "7",
                           "--timeout", "420", "--step-timeout", "180", timeout=480)
        assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
        assert "fused 2 parties: inst0, inst1; left out: none" in done.stdout, done.stdout
    finally:
        fed.close()
    # the same parties, the same seed, on the in-process engine: the same fused tensors, tensor for tensor
    cfg = FusionConfig(epsilon=4.0, noise_seed=7)
    ref = run_fusion_flower([PartyFiles(p.name, p.model, p.data, state_dir=tmp_path / "ref" / p.name) for p in parties],
                            cfg, engine="inprocess", out_dir=tmp_path / "ref" / "out")
    fused = load_tensors(out / "fused.safetensors")
    ref_fused = load_tensors(tmp_path / "ref" / "out" / "fused.safetensors")
    assert sorted(fused) == sorted(ref_fused)
    assert all(torch.equal(fused[k], ref_fused[k]) for k in fused)
    result = json.loads((out / "fusion_flower.json").read_text())
    assert result["digest"] == ref.digest and result["holders"] == ["inst0", "inst1"]
    for k in range(2):  # each party's own fused copy and odometer stayed in its own state folder
        assert (tmp_path / f"institution{k}" / "state" / "fused.safetensors").is_file()
    assert {f"{SUBNET}.10", f"{SUBNET}.11"} <= fed.fleet_peers(), fed.fleet_peers()  # from their own hosts
    assert len(fed.accepted()) == 2, fed.accepted()  # the two registered institutions, nobody else
    print(f"PrivFusion across namespaces: {time.monotonic() - fed.start:.0f} s; fleet requests from "
          f"{sorted(fed.fleet_peers())}; nodes accepted: {len(fed.accepted())}; digest {result['digest'][:16]}; "
          f"{len(fused)} fused tensors equal the in-process engine's")


def test_fedbone_across_namespaces_equals_in_process(namespaces: Namespaces, tmp_path: Path) -> None:
    """FedBone, each namespace's client given only its institution's own data file (issue 22 §1), the server's
    config naming no data: the server model equals the in-process engine's tensor for tensor."""
    import numpy as np

    from pluribus.config import save_config
    from pluribus.data.synthetic import make_synthetic_users
    from pluribus.federated import FedBoneConfig, ModelConfig
    from pluribus.federated.core.runtime import FedBoneServer
    from pluribus.federated.flower.run import run_fedbone_flower
    from pluribus.federated.flower.server_app import SERVER_STATE_FILE
    from pluribus.federated.studies.tasks import save_institution_files
    from pluribus.io import load_tensors

    tasks = ("price_sensitive", "segment")
    cfg = FedBoneConfig(suite="features", tasks=tasks, steps=2, batch_size=8, seed=2, eval_every=0,
                        model=ModelConfig(dim=16, depth=1, heads=2, adapter_hidden=16))
    ds = make_synthetic_users(60, seed=3)
    tokens = torch.randn(ds.n_users, 3, 5, generator=torch.Generator().manual_seed(0))
    partition = np.random.default_rng(1).integers(0, len(tasks), size=ds.n_users)
    files = []
    for k, f in enumerate(save_institution_files(tmp_path / "prepared", tokens, ds, tasks, seed=2,
                                                 partition=partition)):
        own = tmp_path / f"institution{k}" / "mine.safetensors"  # each file only in its institution's folder
        own.parent.mkdir(parents=True, exist_ok=True)
        files.append(Path(shutil.move(str(f), own)))
    server_config = save_config(cfg, tmp_path / "coordinator" / "fedbone.toml")  # no data, no path
    assert "features_path" not in server_config.read_text() or 'features_path = ""' in server_config.read_text()
    fed = Federation(namespaces, tmp_path, institutions=2)
    run = tmp_path / "coordinator" / "runs" / "fedbone"
    try:
        fed.host_and_register()
        for k, f in enumerate(files):
            fed.join(k, "--state-dir", str(tmp_path / f"institution{k}" / "state"), "--data-file", str(f))
        done = fed.command(fed.hub, "fed", "flower", "--config", str(server_config), "--superlink", fed.superlink,
                           "--root-certificates", str(fed.ca), "--out", str(run), "--timeout-s", "600", timeout=660)
        assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
        printed = json.loads(done.stdout)
        assert printed["faults"] == 0 and printed["steps_done"] == 2, printed
    finally:
        fed.close()
    ref = run_fedbone_flower(cfg, engine="inprocess", progress=False, data_files=files)
    server = FedBoneServer(cfg)
    server.load_state_tensors(load_tensors(run / SERVER_STATE_FILE))
    got, want = server.model.state_dict(), ref.general_model.state_dict()
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in got)
    assert {f"{SUBNET}.10", f"{SUBNET}.11"} <= fed.fleet_peers() and len(fed.accepted()) == 2
    print(f"FedBone across namespaces: {time.monotonic() - fed.start:.0f} s; fleet requests from "
          f"{sorted(fed.fleet_peers())}; {len(got)} server tensors equal the in-process engine's")
