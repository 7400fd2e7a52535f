"""`rag serve` on a real uvicorn server over loopback, with tiny models; the page in a real headless Chromium."""

import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from rag.pipeline import RagPipeline  # noqa: E402
from rag.serve import ServeSettings, create_app  # noqa: E402
from tests.conftest import DOCS, rag_config, write_jsonl  # noqa: E402

QUESTIONS = ["capital of france", "who wrote the novel", "the moon rocket", "capital of england",
             "a composer in vienna", "the ocean with coral", "the wall in berlin", "tower bridge river"]


@pytest.fixture(scope="module")
def index(tmp_path_factory, tiny_bert):
    from index_builder.build import build
    from rag.config import BuildConfig, load_config

    root = tmp_path_factory.mktemp("serve")
    corpus = write_jsonl(root / "corpus.jsonl", DOCS)
    return build(load_config(BuildConfig, None, [f"output={root / 'index'}", f"corpus.path={corpus}",
                                                 f"encoder.name={tiny_bert}", "passages.words=12",
                                                 "passages.stride=8"]), progress=False)


@pytest.fixture(scope="module")
def pipe(index, tiny_bert, tiny_lms):
    return RagPipeline.load(rag_config(index, tiny_bert, tiny_lms["llama"]))


class Server:
    def __init__(self, app, **config):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app_worker = app.state.worker
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error",
                                                    **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def call(self, path, body=None, raw: bytes | None = None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                text = r.read().decode()
                return r.status, (json.loads(text) if r.headers.get_content_type() == "application/json" else text), \
                    {k.lower(): v for k, v in r.headers.items()}
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read().decode()), {k.lower(): v for k, v in e.headers.items()}

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def serve(pipe):
    servers = []

    def start(**settings):
        servers.append(Server(create_app(pipe, ServeSettings(**settings))))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def test_concurrent_requests_are_batched_and_answer_as_single_calls(serve, pipe):
    server = serve(max_batch=8, max_wait_ms=300)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda q: server.call("/answer", {"question": q}), QUESTIONS))
    assert all(status == 200 for status, _, _ in got), got
    for q, (_, body, _) in zip(QUESTIONS, got, strict=True):
        single = pipe.answer(q)
        assert body["question"] == q and body["text"] == single.text
        assert [p["id"] for p in body["passages"]] == [p.id for p in single.passages]
        assert body["supported"] == single.supported and body["token_posteriors"] is not None
    _, metrics, _ = server.call("/metrics")
    batches = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line.startswith("rag_batch")}
    assert batches["rag_batch_size_count"] < len(QUESTIONS)  # fewer batches than requests: they were gathered
    assert batches["rag_batch_size_sum"] == len(QUESTIONS)
    assert 'rag_requests_total{endpoint="/answer",status="200"} 8' in metrics


def test_options_and_retrieve(serve, pipe):
    server = serve()
    status, body, _ = server.call("/answer", {"question": "capital of france", "mode": "sequence", "n_docs": 2,
                                              "num_beams": 2})
    assert status == 200 and body["mode"] == "sequence" and len(body["passages"]) == 2
    assert body["text"] == pipe.answer("capital of france", mode="sequence", n_docs=2,
                                       decoding={"num_beams": 2}).text
    status, body, _ = server.call("/retrieve", {"question": "capital of france", "k": 4})
    assert status == 200 and [h["id"] for h in body["passages"]] == \
        [h.id for h in pipe.retrieve("capital of france", 4)[0]]
    status, info, _ = server.call("/info")
    assert info["passages"] == len(pipe.model.retriever.index) and info["serve"]["max_batch"] == 8
    assert server.call("/healthz")[1]["status"] == "ok"
    status, page, _ = server.call("/")
    assert status == 200 and "<form" in page and "heatmap" in page and "http" not in page.split("<script>")[1]


@pytest.mark.parametrize("body, status, words", [
    ({"question": "x", "config": "/etc/passwd"}, 422, "config"),
    ({"question": "x", "index": "../other"}, 422, "index"),
    ({"question": ""}, 422, "question"),
    ({"question": "x" * 5000}, 422, "question"),
    ({"question": "x", "n_docs": 0}, 422, "n_docs"),
    ({"question": "x", "num_beams": -1}, 422, "num_beams"),
    ({"question": "x", "mode": "both"}, 422, "mode"),
    ({"question": 3}, 422, "question"),
    ({}, 422, "question"),
])
def test_bad_input_is_a_4xx_with_one_line(serve, body, status, words):
    server = serve()
    got, answer, _ = server.call("/answer", body)
    assert got == status and words in answer["error"] and "\n" not in answer["error"], answer


def test_body_limits(serve):
    server = serve()
    status, body, _ = server.call("/answer", raw=b'{"question": "' + b"x" * 20_000 + b'"}')
    assert status == 413 and "bytes" in body["error"]
    status, body, _ = server.call("/answer", raw=b"{not json")
    assert status == 422 and "\n" not in body["error"]


@pytest.fixture
def slow(pipe, monkeypatch):
    """answer_batch takes 0.4 s more: a model that falls behind."""
    real = pipe.answer_batch

    def slow_batch(*args, **kwargs):
        time.sleep(0.4)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipe, "answer_batch", slow_batch)


def test_a_full_queue_answers_503_at_once_and_recovers(serve, slow):
    server = serve(max_batch=1, max_wait_ms=0, max_queue=2)
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda q: server.call("/answer", {"question": q}), QUESTIONS + QUESTIONS[:4]))
    codes = [status for status, _, _ in got]
    assert 503 in codes and 200 in codes and set(codes) <= {200, 503}
    busy = next(headers for status, _, headers in got if status == 503)
    assert busy.get("retry-after") == "1"
    assert server.call("/answer", {"question": "capital of france"})[0] == 200  # load gone: served again


def test_a_request_past_its_timeout_is_504(serve, slow):
    server = serve(max_batch=1, max_wait_ms=0, timeout_s=0.1)
    status, body, _ = server.call("/answer", {"question": "capital of france"})
    assert status == 504 and "within" in body["error"]


def test_reload_and_watch_pick_up_an_update_without_failing_a_request(tmp_path, tiny_bert, tiny_lms, index):
    from index_builder.update import update

    folder = tmp_path / "index"
    shutil.copytree(index, folder)
    pipe = RagPipeline.load(rag_config(folder, tiny_bert, tiny_lms["llama"]))
    server = Server(create_app(pipe, ServeSettings(watch_s=0.1)))
    try:
        assert server.call("/healthz")[1]["generation"] == 0
        add = write_jsonl(tmp_path / "add.jsonl", [{"id": "rome", "title": "Rome", "text": "Rome is the capital "
                                                                                            "of Italy on the Tiber."}])
        stop, codes = threading.Event(), []

        def load():
            while not stop.is_set():
                codes.append(server.call("/answer", {"question": "capital of italy"})[0])

        with ThreadPoolExecutor(3) as pool:
            for _ in range(3):
                pool.submit(load)
            update(folder, add=add, progress=False)
            deadline = time.time() + 30
            while server.call("/healthz")[1]["generation"] != 1 and time.time() < deadline:  # the watch
                time.sleep(0.05)
            time.sleep(0.3)
            stop.set()
        assert server.call("/healthz")[1]["generation"] == 1
        assert codes and set(codes) == {200}  # the swap failed no request
        hits = server.call("/retrieve", {"question": "capital of italy", "k": 20})[1]["passages"]
        assert "rome#0" in [h["id"] for h in hits]
        assert server.call("/reload", raw=b"")[1] == {"generation": 1}  # explicit reload: same generation, no error
    finally:
        server.stop()


def test_cli_help_and_bad_options(capsys):
    from rag.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for option in ("--host", "--port", "--max-batch", "--max-wait-ms", "--max-queue", "--timeout", "--watch",
                   "127.0.0.1"):
        assert option in out
    assert main(["serve", "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="no Chromium/ChromeDriver (apt install chromium "
                                                            "chromium-driver)")
def test_the_page_in_a_real_browser(serve):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = serve()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        browser.get(server.url + "/")
        browser.find_element(By.ID, "question").send_keys("capital of france")
        browser.find_element(By.ID, "mode").send_keys("RAG-token")
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "out").is_displayed())
        assert browser.find_element(By.ID, "support").text
        rows = browser.find_elements(By.CSS_SELECTOR, "#passages tbody tr")
        assert len(rows) == 3
        cells = browser.find_elements(By.CSS_SELECTOR, "#heatmap td.cell")
        assert cells and all("rgba" in c.get_attribute("style") for c in cells)
        assert "error" not in browser.find_element(By.ID, "status").text
    finally:
        browser.quit()


# -- a browser tab and other clients the server must not trust (docs/failure-behaviour.md) ----------------------


def raw(server, head: str, body: bytes = b"", timeout: float = 30) -> tuple[int, dict | str]:
    """Send bytes as they are (any Host, chunked bodies) and read the status and body."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode(errors="replace")


def post(path: str, body: bytes, host="127.0.0.1", **headers) -> str:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", "Connection: close",
             *(f"{k.replace('_', '-')}: {v}" for k, v in headers.items())]
    if "Transfer_Encoding" not in headers:
        lines.append(f"Content-Length: {len(body)}")
    return "\n".join(lines) + "\n"


ASK = json.dumps({"question": "capital of france"}).encode()


@pytest.mark.parametrize("host, status", [("127.0.0.1", 200), ("localhost:8000", 200), ("[::1]:80", 200),
                                          ("evil.example", 421), ("attacker.test:8000", 421), ("", 421)])
def test_only_allowed_host_names_are_answered(serve, host, status):
    """DNS rebinding: a page under the attacker's name resolving to 127.0.0.1 once read /info (paths) and asked."""
    server = serve()
    got, body = raw(server, f"GET /info HTTP/1.1\nHost: {host}\nConnection: close\n")
    assert got == status, body
    got, _ = raw(server, post("/answer", ASK, host=host, Content_Type="application/json"), ASK)
    assert got == status


def test_allow_host_adds_a_name(serve):
    server = serve(allow_hosts=("rag.internal",))
    assert raw(server, "GET /healthz HTTP/1.1\nHost: rag.internal:8000\nConnection: close\n")[0] == 200
    got, _ = raw(server, post("/answer", ASK, host="rag.internal", Content_Type="application/json",
                              Origin="http://rag.internal:8000"), ASK)
    assert got == 200


@pytest.mark.parametrize("origin, content_type, status", [
    ("https://evil.example", "application/json", 403),
    ("null", "application/json", 403),
    ("http://127.0.0.1:1234", "application/json", 200),  # the server's own page (another port: still loopback)
    (None, "application/json", 200),  # no browser: curl, scripts
    (None, "text/plain", 415),  # what a cross-site "simple" request can send without a preflight
    (None, "application/x-www-form-urlencoded", 415),
])
def test_posts_need_an_allowed_origin_and_json(serve, origin, content_type, status):
    server = serve()
    headers = {"Content_Type": content_type, **({"Origin": origin} if origin else {})}
    for path, body in (("/answer", ASK), ("/reload", b"")):
        got, answer = raw(server, post(path, body, **headers), body)
        assert got == status, (path, answer)
        if status != 200:
            assert "\n" not in answer["error"]


def test_chunked_bodies_are_bounded_like_sized_ones(serve):
    """A 40 MiB chunked body was once read whole."""
    server = serve()
    chunk = b"x" * 8192  # three chunks cross the 16 KiB limit; the server answers without reading on
    body = b"".join(b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(3))
    got, answer = raw(server, post("/answer", b"", Content_Type="application/json", Transfer_Encoding="chunked"),
                      body)
    assert got == 413 and "bytes" in answer["error"]
    small = b'{"question": "capital of france"}'
    got, _ = raw(server, post("/answer", b"", Content_Type="application/json", Transfer_Encoding="chunked"),
                 b"%x\r\n" % len(small) + small + b"\r\n0\r\n\r\n")
    assert got == 200


def test_metrics_label_routes_never_raw_paths(serve):
    """One odd path once broke every later scrape, and 3,000 404 paths made 3,006 series."""
    server = serve()
    for i in range(50):
        raw(server, f"GET /nope{i}%22%7D%0A HTTP/1.1\nHost: 127.0.0.1\nConnection: close\n")
    _, text, _ = server.call("/metrics")
    series = [line for line in text.splitlines() if line.startswith("rag_requests_total{")]
    assert 'rag_requests_total{endpoint="(other)",status="404"} 50' in series
    assert not any("nope" in line for line in text.splitlines()) and len(series) <= 3


def test_reloads_are_coalesced_and_do_not_bypass_the_queue(serve, pipe, monkeypatch):
    """400 concurrent reloads were once queued against a limit of 16."""
    calls, gate = [], threading.Event()
    real = pipe.reload_index

    def slow_reload(*args, **kwargs):
        calls.append(1)
        gate.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipe, "reload_index", slow_reload)
    server = serve(max_queue=4)
    with ThreadPoolExecutor(40) as pool:
        futures = [pool.submit(server.call, "/reload", None, b"") for _ in range(40)]
        time.sleep(1.0)
        assert server.app_worker.waiting <= 2  # the running reload and one pending, whoever asked
        gate.set()
        got = [f.result() for f in futures]
    assert all(status == 200 for status, _, _ in got) and len(calls) <= 3


def test_a_slow_client_is_cut_off_after_the_header_timeout(pipe):
    from rag.serve.guard import header_timeout_protocol

    app = create_app(pipe, ServeSettings())
    server = Server(app, http=header_timeout_protocol(0.5))
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never finished
            t = time.monotonic()
            assert s.recv(100) == b"" and time.monotonic() - t < 5  # closed by the server
        assert server.call("/healthz")[0] == 200  # a whole request on a new connection is served
    finally:
        server.stop()


def test_a_blank_question_fails_only_itself(serve):
    server = serve(max_batch=8, max_wait_ms=300)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda q: server.call("/answer", {"question": q}), ["capital of france", "   ",
                                                                               "the moon rocket", "\t\n"]))
    assert [g[0] for g in got] == [200, 422, 200, 422] and "blank" in got[1][1]["error"]


def test_a_nan_score_is_null_not_a_500(serve, pipe, monkeypatch):
    import dataclasses

    real = pipe.answer_batch
    monkeypatch.setattr(pipe, "answer_batch", lambda *a, **k: [dataclasses.replace(x, score=float("nan"))
                                                               for x in real(*a, **k)])
    status, body, _ = serve().call("/answer", {"question": "capital of france"})
    assert status == 200 and body["score"] is None


def test_healthz_reports_a_dead_worker(serve):
    server = serve()
    worker = server.app_worker
    worker.jobs.put(None)  # not a Job: the worker's error path; it must live on
    time.sleep(0.2)
    assert worker.alive and server.call("/healthz")[0] == 200
    worker.thread = threading.Thread(target=lambda: None)  # a thread that is not running
    status, body, _ = server.call("/healthz")
    assert status == 503 and "worker" in body["error"]


def test_the_watch_survives_a_reload_that_fails(tmp_path, tiny_bert, tiny_lms, index, caplog):
    import json as _json

    folder = tmp_path / "index"
    shutil.copytree(index, folder)
    pipe = RagPipeline.load(rag_config(folder, tiny_bert, tiny_lms["llama"]))
    server = Server(create_app(pipe, ServeSettings(watch_s=0.05)))
    try:
        manifest = _json.loads((folder / "manifest.json").read_text())
        manifest["generation"] = 7
        manifest["files"]["index.faiss"]["bytes"] += 1  # a generation that cannot load
        (folder / "manifest.json").write_text(_json.dumps(manifest))
        time.sleep(0.5)
        assert server.call("/answer", {"question": "capital of france"})[0] == 200
        assert server.call("/healthz")[1]["generation"] == 0
        assert any("could not be loaded" in r.message for r in caplog.records)
        manifest["files"]["index.faiss"]["bytes"] -= 1
        manifest["generation"] = 8
        (folder / "manifest.json").write_text(_json.dumps(manifest))
        deadline = time.time() + 10
        while server.call("/healthz")[1]["generation"] != 8 and time.time() < deadline:
            time.sleep(0.05)
        assert server.call("/healthz")[1]["generation"] == 8  # the watch lived on
    finally:
        server.stop()


@pytest.mark.parametrize("args, words", [
    (["--port", "70000"], "--port must be between 1 and 65535"),
    (["--timeout", "nan"], "--timeout must be a finite number"),
    (["--max-wait-ms", "inf"], "--max-wait-ms must be a finite number"),
    (["--watch", "-1"], "--watch must be"),
    (["--max-queue", "0"], "--max-queue must be >= 1"),
])
def test_bad_serve_options_are_one_line(capsys, args, words):
    from rag.cli import main

    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_port_in_use_is_one_line(capsys):
    from rag.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["serve", "--port", str(s.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on 127.0.0.1" in err and "Traceback" not in err
