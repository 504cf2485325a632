"""A party's privacy budget holds across releases, runs, commands and kill -9; the hub learns nothing outside
the ledger; a release no mechanism could produce is excluded; every party that released stays in the report."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import Message, RecordDict
from flwr.serverapp import ServerApp

from pluribus.cli import main
from pluribus.errors import ConfigError, DataError
from pluribus.flower_engines import InProcessGrid, in_process_node_id, run_server_app_inprocess
from pluribus.fusion import MLP, FusionConfig
from pluribus.fusion.core.models import train_model
from pluribus.fusion.flower import apps as flower_apps
from pluribus.fusion.flower.apps import PartyFiles, make_party_app, reply_leaks, run_fusion_inprocess
from pluribus.fusion.flower.party_files import save_party_data, save_party_model
from pluribus.fusion.privacy.accounting import PrivacyLedger, Release
from pluribus.fusion.privacy.odometer import (
    DEFAULT_BUDGET,
    BudgetExhausted,
    PrivacyOdometer,
    check_budget,
    model_digest,
)

REFUSAL = re.compile(r"party refused at step (hello|release|align|average): "
                     r"(budget-exhausted|already-released|not-own-release|party-error)$")


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.as_tensor(x[:400]).float() / 16, torch.as_tensor(y[:400])


def _parties(root: Path, digits, n: int = 3, *, budget: float | None = None) -> list[PartyFiles]:
    """``n`` parties, each with its own folder (model, data, state), trained on disjoint rows."""
    x, y = digits
    out = []
    for k in range(n):
        torch.manual_seed(k)
        idx = torch.arange(k * 100, (k + 1) * 100)
        folder = root / f"p{k}"
        model = save_party_model(folder / "model.safetensors",
                                 train_model(MLP(64, (12,), 10), x[idx], y[idx], epochs=2, seed=k), party=f"p{k}")
        data = save_party_data(folder / "data.safetensors", x[idx], y[idx])
        out.append(PartyFiles(f"p{k}", model, data, budget=budget))
    return out


def _ledger(eps: float, *, mechanism: str = "hybrid", nm: float | None = None) -> PrivacyLedger:
    led = PrivacyLedger("p0")
    led.record(Release("weights", "weights", mechanism, eps, 0.0 if nm is None else 1e-5, 100, noise_multiplier=nm))
    return led


# ---- the odometer itself --------------------------------------------------------------------------------------

def test_odometer_composes_refuses_past_the_budget_and_never_decreases(tmp_path: Path) -> None:
    odo = PrivacyOdometer(tmp_path, "a" * 64, party="p0", budget=10.0)
    assert odo.spent().releases == 0
    assert odo.debit(_ledger(4.0), run="1").per_scalar_epsilon == 4.0
    assert odo.debit(_ledger(4.0), run="2").per_scalar_epsilon == 8.0
    before = odo.path.read_bytes()
    with pytest.raises(BudgetExhausted, match=r"would spend epsilon 12 per weight scalar.*spent 8 in 2 releases.*budget of 10"):
        odo.debit(_ledger(4.0), run="3")
    assert odo.path.read_bytes() == before  # a refusal records nothing
    assert odo.debit(_ledger(2.0), run="4").per_scalar_epsilon == 10.0  # exactly at the budget is allowed
    again = PrivacyOdometer(tmp_path, "a" * 64, party="p0", budget=10.0)  # a new process reads the same total
    assert again.spent().releases == 3 and again.spent().per_scalar_epsilon == 10.0
    # a larger budget later lets the party go on; what was spent stays spent
    more = PrivacyOdometer(tmp_path, "a" * 64, party="p0", budget=20.0)
    assert more.debit(_ledger(1.0), run="5").per_scalar_epsilon == 11.0


def test_gaussian_releases_compose_tighter_by_rdp(tmp_path: Path) -> None:
    odo = PrivacyOdometer(tmp_path, "b" * 64, party="p0", budget=1000.0)
    for run in range(30):
        spent = odo.debit(_ledger(1.0, mechanism="gaussian", nm=4.0), run=str(run))
    assert spent.per_scalar_epsilon == 30.0
    assert spent.per_scalar_epsilon_rdp is not None and spent.per_scalar_epsilon_rdp < 30.0
    assert spent.budget_epsilon == spent.per_scalar_epsilon_rdp


@pytest.mark.parametrize("budget", [0, -1.0, float("nan"), float("inf"), "abc", None, True])
def test_a_budget_must_be_a_finite_positive_number(budget: object) -> None:
    with pytest.raises(ConfigError, match="budget must be a"):
        check_budget(budget)


def test_a_corrupt_odometer_or_one_of_another_model_is_refused(tmp_path: Path) -> None:
    odo = PrivacyOdometer(tmp_path, "c" * 64, party="p0")
    odo.debit(_ledger(1.0), run="1")
    other = PrivacyOdometer(tmp_path, "d" * 64, party="p0")
    other.path.write_bytes(odo.path.read_bytes())  # another model's odometer under this model's name
    with pytest.raises(DataError, match="belongs to another model"):
        other.spent()
    with pytest.raises(DataError, match="belongs to another party"):
        PrivacyOdometer(tmp_path, "c" * 64, party="p9").spent()
    odo.path.write_text('{"format": "pluribus.privfusion.odometer/1", "model": "' + "c" * 64
                        + '", "party": "p0", "releases": [{"per_scalar": [-5, 0]}]}')
    with pytest.raises(DataError, match="malformed release rows"):
        odo.debit(_ledger(1.0), run="2")
    odo.path.write_text("{not json")
    with pytest.raises(DataError, match="malformed JSON"):
        odo.spent()


def test_a_debit_survives_kill_9(tmp_path: Path) -> None:
    """Write-ahead: the debit is on disk before any noise is drawn; a party killed right after it has spent."""
    code = (f"import os, signal; from pluribus.fusion.privacy.odometer import PrivacyOdometer; "
            f"from pluribus.fusion.privacy.accounting import PrivacyLedger, Release; "
            f"led = PrivacyLedger('p0'); led.record(Release('weights', 'weights', 'hybrid', 6.0, 0.0, 10)); "
            f"PrivacyOdometer({str(tmp_path)!r}, 'e' * 64, party='p0', budget=10).debit(led, run='x'); "
            f"os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    odo = PrivacyOdometer(tmp_path, "e" * 64, party="p0", budget=10.0)
    assert odo.spent().per_scalar_epsilon == 6.0
    with pytest.raises(BudgetExhausted):
        odo.debit(_ledger(6.0), run="y")


# ---- the party enforces it on Flower ---------------------------------------------------------------------------

def test_budget_is_enforced_across_runs_and_reported_with_totals(tmp_path: Path, digits) -> None:
    parties = _parties(tmp_path, digits, budget=6.0)
    cfg = FusionConfig(epsilon=4.0)
    first = run_fusion_inprocess(parties, cfg, out_dir=tmp_path / "run1")
    assert first.parties == ["p0", "p1", "p2"]
    assert [(led.party, led.status, led.spent["per_scalar_epsilon"]) for led in first.ledgers] == [
        ("p0", "fused", 4.0), ("p1", "fused", 4.0), ("p2", "fused", 4.0)]
    report = (tmp_path / "run1" / "privacy.md").read_text()
    assert "every release of the same model" in report and "| p0 | fused | 4 | 1 | 4 | 0 | " in report
    assert "| 6 |" in report.split("every release of the same model")[1]
    # a second run would take every party to 8 > 6: each refuses before drawing noise; the run cannot fuse
    with pytest.raises(Exception, match="fusion needs at least 2 parties"):
        run_fusion_inprocess(parties, cfg, out_dir=tmp_path / "run2")
    privacy = json.loads((tmp_path / "run2" / "privacy.json").read_text())
    assert [(p["party"], p["status"]) for p in privacy["parties"]] == [
        ("p0", "refused: budget-exhausted"), ("p1", "refused: budget-exhausted"), ("p2", "refused: budget-exhausted")]
    for party in parties:  # nothing more was spent by the refused run
        odo = PrivacyOdometer(party.state, model_digest(MLP(64, (12,), 10).state_dict()), party=party.name)
        files = list(party.state.glob("privacy_odometer-*.json"))
        assert len(files) == 1 and len(json.loads(files[0].read_text())["releases"]) == 1, odo
    # a smaller release still fits: 4 + 2 = 6
    third = run_fusion_inprocess(parties, FusionConfig(epsilon=2.0), out_dir=tmp_path / "run3")
    assert [led.spent["per_scalar_epsilon"] for led in third.ledgers] == [6.0, 6.0, 6.0]


def test_a_hub_asking_again_gets_no_second_release(tmp_path: Path, digits) -> None:
    parties = _parties(tmp_path, digits, 2, budget=100.0)
    cfg = FusionConfig(epsilon=1.0)
    grid = InProcessGrid(make_party_app(cfg), 2, node_configs=[p.node_config(k) for k, p in enumerate(parties)])
    replies: list[Message] = []
    greedy = ServerApp()

    @greedy.main()
    def ask_50_times(grid_, context) -> None:
        node = in_process_node_id(0)
        for _ in range(50):
            content = flower_apps._content(architecture={"kind": "mlp", "in_features": 64, "hidden": [12],
                                                         "num_classes": 10})
            replies.extend(grid_.send_and_receive([Message(content, node, "query.release", group_id="release")]))

    run_server_app_inprocess(greedy, grid)
    ok = [r for r in replies if not r.has_error()]
    refused = [r for r in replies if r.has_error()]
    assert len(ok) == 1 and len(refused) == 49
    assert {r.error.reason for r in refused} == {"party refused at step release: already-released"}
    (odo,) = parties[0].state.glob("privacy_odometer-*.json")
    assert len(json.loads(odo.read_text())["releases"]) == 1  # one release, one debit


class TamperingGrid(InProcessGrid):
    """Changes node ``victim``'s release reply with ``tamper`` (a compromised channel, or a lying party)."""

    def __init__(self, *args, victim: int, tamper, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.victim, self.tamper = victim, tamper

    def _answer(self, msg: Message) -> Message:
        reply = super()._answer(msg)
        if msg.metadata.message_type == "query.release" and msg.metadata.dst_node_id == self.victim:
            arrays, meta = flower_apps._read(reply.content)
            reply = Message(flower_apps._content({k: self.tamper(v) for k, v in arrays.items()}, **meta),
                            reply_to=msg)
        return reply


@pytest.mark.parametrize("name, tamper, reason", [
    ("scaled", lambda v: v * 1e30, "not outputs of the agreed hybrid mechanism"),
    ("off the lattice", lambda v: v + 1e-4, "not outputs of the agreed hybrid mechanism"),
    ("past the output bound", lambda v: v + 100.0, "not outputs of the agreed hybrid mechanism"),
    ("another dtype", lambda v: v.double(), "has dtype torch.float64, expected torch.float32"),
    ("not finite", lambda v: v * float("nan"), "non-finite"),
])
def test_a_release_no_mechanism_could_produce_is_excluded_and_reported(tmp_path: Path, digits, name, tamper,
                                                                       reason) -> None:
    parties = _parties(tmp_path, digits, 3, budget=100.0)
    cfg = FusionConfig(epsilon=2.0)
    grid = TamperingGrid(make_party_app(cfg), 3, node_configs=[p.node_config(k) for k, p in enumerate(parties)],
                         victim=in_process_node_id(1), tamper=tamper)
    res = run_fusion_inprocess(parties, cfg, grid=grid, out_dir=tmp_path / "hub")
    assert res.parties == ["p0", "p2"], name
    (exc,) = res.excluded
    assert (exc.party, exc.step) == ("p1", "release") and reason in exc.reason, exc.reason
    privacy = json.loads((tmp_path / "hub" / "privacy.json").read_text())
    status = {p["party"]: p["status"] for p in privacy["parties"]}
    assert status["p0"] == status["p2"] == "fused"
    assert status["p1"].startswith("excluded after release at release:")  # it released: it stays in the report
    assert next(p for p in privacy["parties"] if p["party"] == "p1")["per_scalar"]["epsilon"] == 2.0


def test_an_untampered_release_passes_the_output_set_check(tmp_path: Path, digits) -> None:
    parties = _parties(tmp_path, digits, 2, budget=100.0)
    for mech in ("laplace", "gaussian", "duchi", "piecewise", "hybrid"):
        res = run_fusion_inprocess(parties, FusionConfig(epsilon=3.0, mechanism=mech))
        assert res.parties == ["p0", "p1"] and not res.excluded, (mech, res.excluded)


class RecordingGrid(InProcessGrid):
    """Every reply the hub receives, errors included."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.replies: list[Message] = []

    def pull_messages(self, message_ids):
        got = list(super().pull_messages(message_ids))
        self.replies += got
        return got


def test_the_hub_receives_only_public_or_ledgered_fields_even_in_a_failing_run(tmp_path: Path, digits) -> None:
    parties = _parties(tmp_path, digits, 4, budget=5.0)
    # p2's data file is broken (a party error); p3 has spent its budget already (a refusal)
    parties[2].data.write_bytes(b"not a safetensors file")
    run_fusion_inprocess(parties[3:] + parties[:1], FusionConfig(epsilon=4.0), out_dir=tmp_path / "warmup")
    cfg = FusionConfig(epsilon=4.0, noise_seed=11)
    grid = RecordingGrid(make_party_app(cfg), 4, node_configs=[p.node_config(k) for k, p in enumerate(parties)])
    with pytest.raises(Exception, match="fusion needs at least 2 parties"):  # only p1 can still release
        run_fusion_inprocess(parties, cfg, grid=grid, out_dir=tmp_path / "hub")
    assert grid.replies
    assert [leak for reply in grid.replies for leak in reply_leaks(reply)] == []
    secrets = [str(tmp_path), "safetensors", "shape", "rows", "seed=11", "seed 11"]  # paths, data details, the seed
    for reply in grid.replies:
        text = reply.error.reason if reply.has_error() else json.dumps(flower_apps._read(reply.content)[1])
        assert not any(s in text for s in secrets), text
    reasons = [r.error.reason for r in grid.replies if r.has_error()]
    assert all(REFUSAL.fullmatch(r) for r in reasons) and len(reasons) >= 2  # p2 party-error, p3 budget
    privacy = json.loads((tmp_path / "hub" / "privacy.json").read_text())
    status = {p["party"]: p["status"] for p in privacy["parties"]}
    assert status["p3"] == "refused: budget-exhausted"
    assert status["p0"] == "refused: budget-exhausted"  # it released in the warm-up run: 4 + 4 > 5
    assert status["p1"].startswith("excluded after release")  # released, then the run stopped
    noise = next(p for p in privacy["parties"] if p["party"] == "p1")["noise"]
    assert "NOT PRIVATE" in noise and "fingerprint" in noise


def test_reply_leaks_sees_extra_fields_arrays_and_error_text() -> None:
    from flwr.app import Error

    request = Message(RecordDict(), 2, "query.release", group_id="release")
    leaky = Message(flower_apps._content({"params/w": torch.zeros(2), "rows": torch.zeros(1)}, party="p0",
                                         ledger={"party": "p0", "path": "/data/p0.safetensors"}, private=True,
                                         n_rows=120), reply_to=request)
    assert reply_leaks(leaky) == ["query.release: field 'n_rows'", "query.release: array 'rows'",
                                  "query.release: ledger field 'path'"]
    text = Message(Error(code=2, reason="DataError: /data/p0.safetensors has 120 rows"), reply_to=request)
    assert reply_leaks(text) == ["query.release: error text 'DataError: /data/p0.safetensors has 120 rows'"]
    fixed = Message(Error(code=2, reason="party refused at step release: budget-exhausted"), reply_to=request)
    assert reply_leaks(fixed) == []


# ---- the command line -------------------------------------------------------------------------------------------

def test_budget_exhaustion_across_two_commands(tmp_path: Path, digits, capsys) -> None:
    parties = _parties(tmp_path, digits, 2)
    args = ["fuse", "flower", *[a for p in parties for a in ("--party", f"{p.name}={p.model.parent}")],
            "--epsilon", "4", "--budget", "6"]
    assert main([*args, "--out", str(tmp_path / "run1")]) == 0
    out = capsys.readouterr().out
    assert "p0: epsilon 4 per weight scalar in this release; 4 spent on this model in 1 releases (budget 6)" in out
    assert main([*args, "--out", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err
    assert "budget-exhausted" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    privacy = json.loads((tmp_path / "run2" / "privacy.json").read_text())
    assert {p["status"] for p in privacy["parties"]} == {"refused: budget-exhausted"}


def test_fuse_run_releases_each_party_once_and_keeps_its_odometer_across_force(tmp_path: Path, capsys) -> None:
    args = ["fuse", "run", "--dataset", "digits", "--parties", "2", "--epsilon", "4", "--out", str(tmp_path / "r"),
            "--budget", "10", "--threads", "1"]
    cfg = tmp_path / "small.toml"
    cfg.write_text("hidden = [8]\nepochs = 1\n[adapter]\nepochs = 1\n")
    assert main([*args, "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "party0: epsilon 4 per weight scalar in this release; 4 spent on this model in 1 releases (budget 10)" in out
    assert main([*args, "--config", str(cfg), "--force"]) == 0  # the same models again: 8 of 10
    assert "8 spent on this model in 2 releases" in capsys.readouterr().out
    assert main([*args, "--config", str(cfg), "--force"]) == 2  # 12 > 10
    err = capsys.readouterr().err
    assert "past its budget of 10" in err and len(err.strip().splitlines()) == 1
    (odometer,) = (tmp_path / "r" / "party-state" / "party0").glob("privacy_odometer-*.json")
    odometer.write_text("{broken")  # a corrupt odometer: one line naming it, nothing released
    assert main([*args, "--config", str(cfg), "--force", "--budget", "100"]) == 2
    err = capsys.readouterr().err
    assert odometer.name in err and "malformed JSON" in err and len(err.strip().splitlines()) == 1


def test_seeded_noise_warns_on_stderr_and_cannot_claim_privacy(tmp_path: Path, digits, capsys) -> None:
    parties = _parties(tmp_path, digits, 2, budget=100.0)
    args = ["fuse", "flower", *[a for p in parties for a in ("--party", f"{p.name}={p.model.parent}")]]
    assert main([*args, "--noise-seed", "3", "--out", str(tmp_path / "seeded")]) == 0
    err = capsys.readouterr().err
    assert err.count("NOT PRIVATE") >= 2  # at the start and at the end of the command
    privacy = (tmp_path / "seeded" / "privacy.json").read_text()
    assert "seed fingerprint" in privacy and "noise_seed=3" not in privacy
    assert main([*args, "--noise-seed", "3", "--private", "--out", str(tmp_path / "claimed")]) == 2
    err = capsys.readouterr().err
    assert "--private: a noise seed" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "claimed").exists()


@pytest.mark.parametrize("budget, message", [("0", "--budget must be a finite number > 0"),
                                             ("nan", "'nan' is not a number"),
                                             ("-3", "--budget must be a finite number > 0")])
def test_bad_budget_exits_2_with_one_line(tmp_path: Path, digits, capsys, budget: str, message: str) -> None:
    parties = _parties(tmp_path, digits, 2)
    args = ["fuse", "flower", *[a for p in parties for a in ("--party", f"{p.name}={p.model.parent}")]]
    assert main([*args, "--budget", budget, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists() and not list(tmp_path.rglob("privacy_odometer-*.json"))


def test_default_budget_is_documented() -> None:
    assert DEFAULT_BUDGET == 16.0 and math.isfinite(DEFAULT_BUDGET)
    text = (Path(__file__).resolve().parents[2] / "docs" / "privacy.md").read_text()
    assert "default budget" in text.lower() and "16" in text
