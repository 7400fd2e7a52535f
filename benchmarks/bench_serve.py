"""`rag serve` under load, over loopback, on the embedded default (bounded in requests and time).

    python -m benchmarks.bench_serve [--seconds 30] [--swap-seconds 120] [--overload-seconds 20]

1. Throughput and latency with 1, 4 and 16 concurrent clients against sequential `answer()` in one process.
2. 16 clients for `--swap-seconds` while `index_builder update` adds 100 documents and deletes 50 of a copy of the
   demo index and the server's watch reloads it: failed requests, latency p99 around the swap, and how long until
   an answer cites a new document.
3. Overload: 64 clients against --max-queue 16: how many get 503 and how fast, the server's peak memory, and
   whether it serves normally once the load is gone.
The server is `rag serve` in its own process; clients are threads here. Questions: NQ-open dev, first 200.
"""

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import NQ_DEV, machine, table

NEW_FACT = "{name} is the mayor of {town}, a town on the river {river}."


def post(url: str, body: dict, timeout: float = 300) -> tuple[int, dict, float]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), time.perf_counter() - t
    except urllib.error.HTTPError as e:
        return e.code, {}, time.perf_counter() - t
    except OSError:
        return 0, {}, time.perf_counter() - t


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


class Served:
    def __init__(self, index: Path, *flags):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "rag.cli", "serve", "--set", f"index={index}", "--port",
                                      str(self.port), *flags], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(self.proc.stderr.read().decode()[-2000:]) from None
                time.sleep(0.5)
        raise RuntimeError("server did not start")

    def peak_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


def clients(url: str, questions: list[str], n: int, seconds: float, record: list, stop: threading.Event | None = None):
    """n clients asking in a loop for `seconds` (or until `stop`); each result (start, status, seconds, body)."""
    end = time.perf_counter() + seconds

    def one(c):
        i = c
        while time.perf_counter() < end and not (stop and stop.is_set()):
            start = time.perf_counter()
            status, body, took = post(url + "/answer", {"question": questions[i % len(questions)]})
            record.append((start, status, took, body))
            i += n

    with ThreadPoolExecutor(n) as pool:
        list(pool.map(one, range(n)))


def throughput(index, questions, seconds) -> list[dict]:
    from rag.first_use import load_pipeline

    pipe = load_pipeline(None, (f"index={index}",))
    pipe.answer(questions[0])
    t, n, lat = time.perf_counter(), 0, []
    while time.perf_counter() - t < seconds:
        s = time.perf_counter()
        pipe.answer(questions[n % len(questions)])
        lat.append(time.perf_counter() - s)
        n += 1
    base = n / (time.perf_counter() - t)
    rows = [{"clients": "sequential answer()", "req/s": base, "vs sequential": 1.0, "p50 s": pct(lat, .5),
             "p95 s": pct(lat, .95), "p99 s": pct(lat, .99), "failed": 0}]
    del pipe
    server = Served(index)
    try:
        post(server.url + "/answer", {"question": questions[0]})
        for n in (1, 4, 16):
            rec: list = []
            t = time.perf_counter()
            clients(server.url, questions, n, seconds, rec)
            ok = [r for r in rec if r[1] == 200]
            rate = len(ok) / (time.perf_counter() - t)
            lat = [r[2] for r in ok]
            rows.append({"clients": n, "req/s": rate, "vs sequential": rate / base, "p50 s": pct(lat, .5),
                         "p95 s": pct(lat, .95), "p99 s": pct(lat, .99), "failed": len(rec) - len(ok)})
    finally:
        server.stop()
    return rows


def swap(index, questions, seconds) -> dict:
    from index_builder.update import update

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        docs = [{"id": f"new-{i}", "title": f"Vexmoor {i}", "text": NEW_FACT.format(
            name=f"Zorblat Quinn{i}", town=f"Vexmoor{i}", river=f"Ulm{i}")} for i in range(100)]
        (work / "add.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        from rag.retrieval.index import DenseIndex

        old = DenseIndex.load(index)
        gone = sorted({d.split("#")[0] for d in old.store.column("id", 0, 500)})[:50]
        (work / "delete.txt").write_text("\n".join(gone) + "\n")
        mix = [q for pair in zip(questions, [f"who is the mayor of Vexmoor{i}" for i in range(100)], strict=False)
               for q in pair]
        server = Served(index, "--watch", "0.5")
        rec: list = []
        stop = threading.Event()
        load = threading.Thread(target=clients, args=(server.url, mix, 16, seconds, rec, stop))
        load.start()
        time.sleep(seconds / 4)
        t_update = time.perf_counter()
        update(index, add=str(work / "add.jsonl"), delete=str(work / "delete.txt"), progress=False)
        t_switched = time.perf_counter()
        load.join()
        first_new = min((start + took for start, status, took, body in rec if status == 200 and any(
            p["id"].startswith("new-") for p in body.get("passages", []))), default=None)
        near = [took for start, status, took, _ in rec if status == 200 and t_update - 5 <= start <= t_switched + 10]
        server.stop()
        return {"requests": len(rec), "failed": sum(r[1] != 200 for r in rec), "update s": t_switched - t_update,
                "p99 s around the swap": pct(near, .99), "p99 s overall": pct([r[2] for r in rec if r[1] == 200], .99),
                "first answer citing a new document, s after the switch":
                    None if first_new is None else first_new - t_switched}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def overload(index, questions, seconds) -> dict:
    server = Served(index, "--max-queue", "16")
    try:
        post(server.url + "/answer", {"question": questions[0]})
        rest = server.rss_mib()
        rec: list = []
        clients(server.url, questions, 64, seconds, rec)
        busy = [r[2] for r in rec if r[1] == 503]
        status, _, took = post(server.url + "/answer", {"question": questions[1]})
        return {"requests": len(rec), "200": sum(r[1] == 200 for r in rec), "503": len(busy),
                "other": sum(r[1] not in (200, 503) for r in rec), "503 median s": pct(busy, .5),
                "server RSS MiB at rest": rest, "server peak MiB": server.peak_mib(),
                "after: status, s": f"{status}, {took:.2f}"}
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30, help="per concurrency level")
    ap.add_argument("--swap-seconds", type=float, default=120)
    ap.add_argument("--overload-seconds", type=float, default=20)
    ap.add_argument("--parts", default="throughput,swap,overload")
    args = ap.parse_args()
    from rag.files import expand_path
    from rag.first_use import ensure_index
    from rag.pipeline import load_rag_config
    from rag.qa_data import read_qa

    questions = [e.question for e in read_qa(NQ_DEV)[:200]]
    cfg = load_rag_config(None)
    ensure_index(cfg)
    demo = expand_path(cfg.index)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-index-"))
    index = work / "demo"
    shutil.copytree(demo, index)
    print(f"machine: {machine()}; embedded default, index copy {index}")
    try:
        if "throughput" in args.parts:
            print(table(throughput(index, questions, args.seconds)))
        if "swap" in args.parts:
            print(json.dumps(swap(index, questions, args.swap_seconds), indent=1))
        if "overload" in args.parts:
            print(json.dumps(overload(index, questions, args.overload_seconds), indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
