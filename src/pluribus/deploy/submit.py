"""Submit a FedBone or PrivFusion run to a SuperLink that already runs (hosted with :mod:`pluribus.deploy.host`,
nodes joined with :mod:`pluribus.deploy.join`): write the system's Flower App folder, ``flwr run`` it over TLS
(:func:`pluribus.flower_engines.submit_run`) and read what the ServerApp wrote.

The ServerApp runs on the SuperLink's host (Flower's SuperExec starts it there), so the run's outputs (``--out``:
the FedBone run folder, or the PrivFusion hub's fused model and privacy report) are written on that host. Submit
from the SuperLink's host (or give a folder that host and this one share) to have them read back here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pluribus.deploy.address import Address, check_superlink
from pluribus.errors import ConfigError, PluribusError

if TYPE_CHECKING:
    from pluribus.federated.core.config import FedBoneConfig
    from pluribus.federated.flower.run import FlowerRunResult
    from pluribus.fusion.core.config import FusionConfig
    from pluribus.fusion.flower.apps import FlowerFusionResult


def submit_fusion(config: FusionConfig, superlink: Address, *, ca: str | Path | None, num_parties: int,
                  out_dir: str | Path, calib: str | Path | None = None, timeout_s: float = 600.0,
                  step_timeout_s: float = 120.0, poll_s: float = 0.1) -> FlowerFusionResult:
    """Run PrivFusion on the federation at ``superlink`` (its parties joined with their own files): the hub
    writes the fused model and the privacy report into ``out_dir`` on the SuperLink's host; returns them.

    Args:
        config: the fusion settings.
        superlink: the SuperLink's Control API address.
        ca: the CA certificate, or None (plain, loopback only).
        num_parties: how many parties the hub waits for.
        out_dir: where the hub writes its outputs (on the SuperLink's host).
        calib: the hub's calibration data file, or None.
        timeout_s: how long the whole run may take.
        step_timeout_s: how long the hub waits for each step's replies.
        poll_s: how often the run's status is polled.

    Raises:
        ConfigError: ``epsilon`` is infinite (raw weights would reach the hub), or a timeout is not positive.
        PluribusError: the run failed or ran out of time.
    """
    from pluribus.flower_engines import submit_run
    from pluribus.fusion.flower.apps import RESULT_FILE, read_hub_outputs, write_fusion_app

    if not config.private:
        raise ConfigError("epsilon = inf would send raw weights to the hub; the Flower path runs with DP only")
    if timeout_s <= 0 or step_timeout_s <= 0:
        raise ConfigError(f"timeout and step timeout must be > 0, got {timeout_s}, {step_timeout_s}")
    check_superlink(superlink, ca=ca)
    out = Path(out_dir).resolve()
    with tempfile.TemporaryDirectory(prefix="fusion-submit-") as tmp_name:
        tmp = Path(tmp_name)
        write_fusion_app(tmp / "app", config, num_parties=num_parties, out_dir=out, calib=calib,
                         step_timeout_s=step_timeout_s, poll_s=poll_s)
        submit_run(tmp / "app", tmp, str(superlink), out / RESULT_FILE, timeout_s, root_certificates=ca)
    return read_hub_outputs(out)


def submit_fedbone(config: FedBoneConfig, superlink: Address, *, ca: str | Path | None, run_dir: str | Path,
                   timeout_s: float = 600.0, resume: bool = True, poll_s: float = 0.1) -> FlowerRunResult:
    """Train FedBone on the federation at ``superlink`` (one joined SuperNode per client, each with its own
    ``partition-id`` and ``state-dir``): the ServerApp keeps its resumable run folder ``run_dir`` on the
    SuperLink's host (rerunning resumes it); returns the same result as ``run_fedbone_flower``.

    Args:
        config: the FedBone settings.
        superlink: the SuperLink's Control API address.
        ca: the CA certificate, or None (plain, loopback only).
        run_dir: the ServerApp's run folder (on the SuperLink's host).
        timeout_s: how long the whole run may take.
        resume: resume the run folder if it holds an unfinished run.
        poll_s: how often the run's status is polled.

    Raises:
        ConfigError: ``config.algorithm`` is a baseline (the Flower apps run FedBone only), or the timeout is
            not positive.
        PluribusError: the run failed, ran out of time, or its outputs are not on this host.
    """
    import time

    # the result readers of the other engines: a submitted run writes the same files
    from pluribus.federated.flower.run import flower_run_result, read_flower_result
    from pluribus.federated.flower.server_app import RESULT_FILE, write_flower_app
    from pluribus.flower_engines import submit_run, tail
    from pluribus.runs import RunFolder

    if config.algorithm != "fedbone":
        raise ConfigError("the Flower apps run FedBone only; run baselines with `pluribus fed run`")
    if timeout_s <= 0:
        raise ConfigError(f"timeout must be > 0, got {timeout_s}")
    check_superlink(superlink, ca=ca)
    run_path = Path(run_dir).resolve()
    RunFolder(run_path, config, resume=resume)  # ConfigError if it holds another config (or resume=False)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedbone-submit-") as tmp_name:
        tmp = Path(tmp_name)
        write_flower_app(tmp / "app", config, run_dir=run_path, poll_s=poll_s)
        submit_run(tmp / "app", tmp, str(superlink), run_path / RESULT_FILE, timeout_s, root_certificates=ca)
        log_tail = tail(tmp / "flwr_run.log")
    try:
        res = read_flower_result(run_path, log_tail)
    except PluribusError as err:
        raise PluribusError(f"the run ended but its outputs are not in {run_path} on this host (the ServerApp "
                            f"writes them on the SuperLink's host): {err}") from None
    return flower_run_result(config, res, time.perf_counter() - start, run_path)
