"""OS errors (a full disk, a file-size limit, a file where a folder should be) are one line and exit 2 in every
writer, and nothing already written is lost. A full disk is simulated with a small file-size limit
(RLIMIT_FSIZE, in a child process: Python ignores SIGXFSZ, so a write past the limit fails with EFBIG)."""

import json
import os
import resource
import subprocess
import sys

import pytest

from index_builder.build import build
from rag.retrieval.index import DenseIndex
from tests.conftest import DOCS, build_cfg, write_jsonl


def run_limited(argv: list[str], limit: int) -> subprocess.CompletedProcess:
    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", *argv], preexec_fn=cap, capture_output=True, text=True, env=env,
                          timeout=300)


def one_line(proc: subprocess.CompletedProcess, *words: str) -> None:
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert err and err[-1].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in err[-1], err[-1]


@pytest.fixture
def corpus(tmp_path):
    return write_jsonl(tmp_path / "corpus.jsonl", [{**d, "id": f"{d['id']}{i}"} for i in range(3) for d in DOCS])


def test_a_build_past_the_size_limit_is_one_line_and_resumes(tmp_path, tiny_bert, corpus):
    out = tmp_path / "index"
    args = ["index_builder", "build", "--quiet", "--set", f"output={out}", "--set", f"corpus.path={corpus}",
            "--set", f"encoder.name={tiny_bert}", "--set", "passages.words=12", "--set", "passages.stride=8"]
    one_line(run_limited(args, 3000), "file-size limit")
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())  # no half-written file left behind
    assert run_limited(args, resource.RLIM_INFINITY).returncode == 0  # the same command resumes
    DenseIndex.load(out, verify=True)


@pytest.mark.parametrize("command", ["update", "compact"])
def test_an_update_or_compact_past_the_size_limit_keeps_the_index(tmp_path, tiny_bert, corpus, command):
    out = build(build_cfg(tmp_path, tiny_bert, corpus), progress=False)
    before = json.loads((out / "manifest.json").read_text())
    add = write_jsonl(tmp_path / "add.jsonl", [{"id": f"new{i}", "title": "New", "text": "the river " * 60}
                                               for i in range(20)])
    (tmp_path / "del.txt").write_text("paris0\n")
    args = ["index_builder", "update", "--index", str(out), "--add", str(add), "--delete", str(tmp_path / "del.txt"),
            "--quiet"] if command == "update" else ["index_builder", "compact", str(out)]
    if command == "compact":
        subprocess.run([sys.executable, "-m", "index_builder", "update", "--index", str(out), "--delete",
                        str(tmp_path / "del.txt"), "--quiet"], check=True, capture_output=True)
        before = json.loads((out / "manifest.json").read_text())
    one_line(run_limited(args, 2000), "file-size limit")
    assert json.loads((out / "manifest.json").read_text()) == before
    DenseIndex.load(out, verify=True)
    assert run_limited(args, resource.RLIM_INFINITY).returncode == 0


def test_outputs_that_are_files_are_one_line(tmp_path, tiny_index, tiny_bert, tiny_lms, capsys):
    from eval import qa
    from rag.config import save_config
    from rag.train import main as train_main
    from tests.conftest import rag_config

    cfg = tmp_path / "rag.yaml"
    save_config(rag_config(tiny_index, tiny_bert, tiny_lms["llama"]), cfg)
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "capital of france", "answer": ["paris"]}])
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert qa.main(["--config", str(cfg), "--data", str(data), "--out", str(blocker / "eval"), "--quiet"]) == 2
    assert "a file is where a folder should be" in capsys.readouterr().err
    assert train_main(["--set", f"rag={cfg}", "--set", f"output_dir={blocker}", "--set", f"data.train=[{data}]",
                       "--set", "max_steps=1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "a-file" in err and "Traceback" not in err
