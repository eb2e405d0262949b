"""Serve a real batch-size study in TensorBoard and photograph its dashboards.

    apt-get install chromium          # Debian's package; not needed by the tests or CI
    python docs/make_pictures.py      # ~2 minutes: writes docs/*.png

Runs `train.py --batch_sizes=1,8,32,128,full` into a temporary directory, starts
`tensorboard` on 127.0.0.1 at a free port, takes headless Chromium screenshots of the
scalars, custom-scalars and HParams dashboards, and stops the server. Then the same for
two runs with Cockpit's economy set at a good and a too-large learning rate: alpha and
the gradient tests, and the element histograms.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = {  # file -> TensorBoard URL fragment
    "scalars.png": "#scalars&tagFilter=%5Eloss",
    "custom_scalars.png": "#custom_scalars",
    "hparams.png": "#hparams",
}
COCKPIT_PAGES = {
    "cockpit.png": "#scalars&tagFilter=%5E(step%2Falpha%7Cgrad_test%2F)",
    "grad_hist.png": "#histograms&tagFilter=grad_hist",
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_runs(port, expected, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=2) as r:
                if len(json.loads(r.read())) >= expected:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit("tensorboard did not serve the study in time")


def screenshot(chromium, url, path, profile):
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", f"--user-data-dir={profile}", "--hide-scrollbars",
                    "--window-size=1400,1000", "--virtual-time-budget=20000", f"--screenshot={path}", url],
                   check=True, timeout=120, capture_output=True)


def photograph(chromium, logdir, pages, expected, work):
    """Serves `logdir` in TensorBoard and writes a screenshot of each of `pages`."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", logdir,
                               "--host", "127.0.0.1", "--port", str(port), "--load_fast=false"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_runs(port, expected=expected)
        for name, fragment in pages.items():
            screenshot(chromium, f"http://127.0.0.1:{port}/{fragment}", os.path.join(ROOT, "docs", name),
                       os.path.join(work, "profile"))
            print("wrote", os.path.join("docs", name))
    finally:
        server.terminate()
        server.wait(timeout=10)


def main():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("chromium is not installed: apt-get install chromium")
    work = tempfile.mkdtemp(prefix="tfmbgd-pictures-")
    train = [sys.executable, os.path.join(ROOT, "train.py")]
    try:
        study_dir = os.path.join(work, "study")
        subprocess.run(train + ["--batch_sizes=1,8,32,128,full", "--epochs=3", "--stats_every=5",
                                "--log_every=5", f"--logdir={study_dir}"], check=True)
        (study,) = os.listdir(study_dir)
        photograph(chromium, os.path.join(study_dir, study), PAGES, 15, work)
        cockpit_dir = os.path.join(work, "cockpit")
        for lr in ("0.1", "1.0"):
            subprocess.run(train + ["--instruments=economy", f"--learning_rate={lr}", "--epochs=3",
                                    "--stats_every=2", f"--logdir={cockpit_dir}"], check=True)
        photograph(chromium, cockpit_dir, COCKPIT_PAGES, 2, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
