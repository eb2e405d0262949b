"""A real TensorBoard server over a batch-size study, read through its HTTP API."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from tfmbgd.app import study
from tfmbgd.config import TrainConfig

pytestmark = pytest.mark.slow     # a real TensorBoard server over a study

SCALAR_TAGS = ["loss", "accuracy", "grad/norm", "grad/norm/hidden_1/kernel", "grad_var/trace",
               "grad_var/hidden_1/kernel", "grad_var/of_mean", "grad_snr/mean_gsnr",
               "noise_scale/simple", "loss_by/examples_seen", "loss_by/milliseconds", "batch_size"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port, path, body=None, timeout=10):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                     headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@pytest.fixture
def study_dir(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(48) % 3
    x = rng.normal(size=(3, 5))[y] + rng.normal(size=(48, 5))
    np.savez(tmp_path / "d.npz", x_train=x[:40], y_train=y[:40], x_test=x[40:], y_test=y[40:])
    config = TrainConfig(dataset=f"npz:{tmp_path / 'd.npz'}", hidden=(6,), batch_size=8, epochs=2,
                         stats_every=1, log_every=1, elementwise_stats=True, noise_scale_decay=0.5,
                         batch_sizes=(4, None), lr_scaling="sqrt", logdir=str(tmp_path / "logs"))
    study.run(config, verbose=0)
    (path,) = (tmp_path / "logs").iterdir()
    return path


@pytest.fixture
def server(study_dir):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(study_dir), "--host", "127.0.0.1",
         "--port", str(port), "--load_fast=false", "--reload_interval=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                runs = _get(port, "/data/runs", timeout=2)
                if {"b4/train", "bfull/train", "b4", "bfull"} <= set(runs):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("tensorboard did not serve the runs within 90 s")
            time.sleep(0.5)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_tensorboard_serves_runs_tags_histogram_hparams_and_layout(server):
    port = server
    runs = _get(port, "/data/runs")
    assert {"b4/train", "b4/test", "bfull/train", "bfull/test"} <= set(runs)
    scalars = _get(port, "/data/plugin/scalars/tags")
    for run in ("b4/train", "bfull/train"):
        assert set(SCALAR_TAGS) <= set(scalars[run]), sorted(set(SCALAR_TAGS) - set(scalars[run]))
    assert {"loss", "accuracy"} <= set(scalars["b4/test"])
    points = _get(port, "/data/plugin/scalars/scalars?run=b4/train&tag=grad_var/trace")
    assert [p[1] for p in points] == list(range(20)) and all(p[2] > 0 for p in points)
    assert "per_example_grad_norm" in _get(port, "/data/plugin/histograms/tags")["b4/train"]

    experiment = _get(port, "/data/plugin/hparams/experiment", body=b'{"experimentName": ""}')
    assert {h["name"] for h in experiment["hparamInfos"]} == {"batch_size", "learning_rate",
                                                             "reduction", "grad_method"}
    assert {m["name"]["tag"] for m in experiment["metricInfos"]} >= {"final/test_loss",
                                                                     "final/test_accuracy"}
    groups = _get(port, "/data/plugin/hparams/session_groups",
                  body=json.dumps({"experimentName": "", "colParams": [], "startIndex": 0, "sliceSize": 10,
                                   "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS"]}).encode())
    batch_sizes = sorted(g["hparams"]["batch_size"] for g in groups["sessionGroups"])
    assert batch_sizes == [4, 40]

    layout = _get(port, "/data/plugin/custom_scalars/layout")
    titles = [c["title"] for c in layout["category"]]
    assert titles == ["Loss (train and test)", "Norm of the mean gradient",
                      "Variance of the mean gradient, tr(Sigma)/B", "Noise scale and batch size"]
    charts = [chart["title"] for chart in layout["category"][1]["chart"]]
    assert "hidden_1/kernel" in charts
