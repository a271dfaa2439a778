"""What a log point costs: training time per run at several ``log_every`` on the pipeline's
default data (1,000 MNIST digits at 20x20, 5,000 iterations), and the time MLflow takes to log
those points, to a SQLite store and to an `mlflow server` over HTTP.

Run from the repository root (it works in a temporary folder; the workspace is not touched)::

    python benchmarks/bench_logging.py                 # h25 and h100, log_every 500, 50, 10
    python benchmarks/bench_logging.py --configs h25 --every 500 10

Training is ``nnbp.training.train`` with a callback that keeps the points (what the stage does
besides MLflow); logging replays those points through
``nnbp.tooling.tracking.run.Run.log_point``, one call per point as the stage makes them live,
into a fresh run. Wall seconds of one run each; the load average is printed first (say whether
the machine was quiet).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _prepared(folder: Path):
    """The default data, prepared as the pipeline prepares it (data and prepare stages)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env["NNBP_TRACKING"] = "off"
    for name in ("params.yaml", "dvc.yaml"):  # the stages read them from their folder
        shutil.copy(ROOT / name, folder / name)
    for stage, out in (("data", "data/digits.npz"), ("prepare", "data/prepared")):
        subprocess.run(
            [sys.executable, str(ROOT / "stages" / f"{stage}.py"), "--out", out],
            cwd=folder,
            env=env,
            check=True,
            capture_output=True,
        )
    from nnbp.artifacts import Prepared

    return Prepared.load(folder / "data" / "prepared")


def _server(folder: Path) -> tuple[subprocess.Popen, str]:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            *(str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port)),
            *("--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--workers", "1"),
            *("--artifacts-destination", str(folder / "server-artifacts")),
        ],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for _ in range(480):
        try:
            with opener.open(f"{url}/health", timeout=5):
                return proc, url
        except OSError:
            time.sleep(0.5)
    _stop(proc)
    sys.exit("mlflow server did not start")


def _stop(proc: subprocess.Popen) -> None:
    """The server and its workers (uvicorn, the job runner, its consumers): its process group."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["h25", "h100"])
    parser.add_argument("--every", nargs="+", type=int, default=[500, 50, 10])
    args = parser.parse_args()
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # a run's link per run
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")

    from nnbp import config
    from nnbp.artifacts import Prepared
    from nnbp.tooling.tracking.run import Run
    from nnbp.training import train

    with tempfile.TemporaryDirectory(prefix="nnbp-logging-") as tmp:
        folder = Path(tmp)
        data: Prepared = _prepared(folder)
        os.chdir(folder)
        # Every training first, with no server alive: its workers would take CPU from them.
        trained = []
        for name in args.configs:
            base = config.Training.read(config.read(f"train@{name}"), name)
            for every in args.every:
                training = base.model_copy(update={"log_every": every})
                points: list = []
                started = time.perf_counter()
                train(training, data, points.append, threads="auto")
                trained.append((name, every, points, time.perf_counter() - started))
        server, url = _server(folder)
        stores = {"sqlite": f"sqlite:///{folder / 'mlflow.db'}", "http": url}
        print(f"{'config':<8}{'log_every':>10}{'points':>8}{'train s':>9}", end="")
        print("".join(f"{name + ' log s':>13}" for name in stores))
        try:
            for name, every, points, seconds in trained:
                print(f"{name:<8}{every:>10}{len(points):>8}{seconds:>9.2f}", end="")
                for store in stores.values():
                    os.environ["MLFLOW_TRACKING_URI"] = store
                    with Run.start(name, {"log_every": every}) as run:
                        started = time.perf_counter()
                        for point in points:
                            run.log_point(point)
                        run.flush(600)  # the run's thread sends them: until it has
                        logged = time.perf_counter() - started
                    print(f"{logged:>13.2f}", end="")
                print(flush=True)
        finally:
            _stop(server)


if __name__ == "__main__":
    main()
