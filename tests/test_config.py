import re

import pytest

from rag.config import BuildConfig, ConfigError, load_config, save_config


def test_defaults_and_changes(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output: out\npassages:\n  words: 50\n  stride: 40\n")
    cfg = load_config(BuildConfig, path)
    assert cfg.output == "out" and cfg.passages.words == 50 and cfg.passages.stride == 40
    assert cfg.encoder.pooling == "mean"  # untouched default


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("passages:\n  wrods: 50\n")
    with pytest.raises(ConfigError, match=r"passages: unknown key\(s\) wrods"):
        load_config(BuildConfig, path)


def test_overrides_parse_yaml_and_check_types():
    cfg = load_config(BuildConfig, None, ["index.type=hnsw", "index.hnsw_m=16", "encoder.normalize=false"])
    assert cfg.index.type == "hnsw" and cfg.index.hnsw_m == 16 and cfg.encoder.normalize is False
    with pytest.raises(ConfigError, match="index.type"):
        load_config(BuildConfig, None, ["index.type=annoy"])
    with pytest.raises(ConfigError, match="expected int"):
        load_config(BuildConfig, None, ["index.nlist=many"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(BuildConfig, None, ["index.nlist"])


def test_an_override_that_is_no_yaml_value_is_its_text():
    from rag.config import RagConfig

    prompt = "Passage: {title}: {text}\nQuestion: {question}"  # "a: b: c" is no YAML scalar
    cfg = load_config(RagConfig, None, ["index=x", f"generator.prompt_template={prompt}"])
    assert cfg.generator.prompt_template == prompt
    with pytest.raises(ConfigError, match="n_docs"):  # the text then meets the type check
        load_config(RagConfig, None, ["index=x", "n_docs=[3"])


def test_round_trip(tmp_path):
    cfg = load_config(BuildConfig, None, ["corpus.path=x.jsonl", "index.rerank=50"])
    save_config(cfg, tmp_path / "r.yaml")
    assert load_config(BuildConfig, tmp_path / "r.yaml") == cfg


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(BuildConfig, tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(BuildConfig, tmp_path / "bad.yaml")


@pytest.mark.parametrize("override, message", [
    ("n_docs=0", "n_docs: 0 is out of range; it must be >= 1"),
    ("decoding.num_beams=0", "num_beams: 0 is out of range"),
    ("decoding.length_penalty=.nan", "length_penalty: nan is out of range"),
    ("decoding.num_return_sequences=3", "more than num_beams"),
    ("generator.max_target_length=1", "max_target_length"),
])
def test_numeric_settings_are_checked_where_configs_are_parsed(override, message):
    """A value out of range is an error naming the key and the range, never a silent fallback."""
    from rag.config import ConfigError, RagConfig, load_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(RagConfig, None, [override])


def test_out_of_range_settings_of_the_other_stages():
    from rag.config import BuildConfig, ConfigError, TrainConfig, load_config

    with pytest.raises(ConfigError, match="shard_size: 0"):
        load_config(BuildConfig, None, ["index.shard_size=0"])
    with pytest.raises(ConfigError, match="batch_size: 0"):
        load_config(TrainConfig, None, ["batch_size=0"])
    with pytest.raises(ConfigError, match="label_smoothing"):
        load_config(TrainConfig, None, ["label_smoothing=1.5"])


def test_removed_copy_settings_still_load_with_a_warning(caplog):
    """Extractive decoding was removed; configs and saved models that name its settings still load."""
    from rag.config import RagConfig, load_config

    cfg = load_config(RagConfig, None, ["decoding.copy=true", "decoding.max_answer_words=5",
                                        "decoding.copy_sentences=0"])
    assert cfg.decoding.num_beams == 1
    assert "decoding.copy=True is no longer a setting" in caplog.text


def test_a_variable_other_than_rag_cache_is_refused_not_made_a_folder(tmp_path):
    """`--set 'output=${HOME}/x'` once created a folder literally named ${HOME}."""
    from rag.config import BuildConfig, ConfigError, load_config

    with pytest.raises(ConfigError, match=r"config.output: \$\{HOME\} is not expanded"):
        load_config(BuildConfig, None, ["output=${HOME}/x"])
    assert load_config(BuildConfig, None, ["output=${RAG_CACHE}/x"]).output == "${RAG_CACHE}/x"
