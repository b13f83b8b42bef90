from pathlib import Path

import pytest
import yaml

from app.config import ConfigError, RefineConfig, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


def _config_classes():
    from app.distill.config import DistillConfig, TuneDistillConfig
    from app.scaling.sweep import ScalingSweepConfig
    from app.serve.config import ServeConfig

    return [("refine.yaml", RefineConfig), ("distill.yaml", DistillConfig), ("tune_distill.yaml", TuneDistillConfig),
            ("scaling.yaml", ScalingSweepConfig), ("serve.yaml", ServeConfig)]


@pytest.mark.parametrize("name,cls", _config_classes())
def test_yaml_mirrors_the_dataclasses(name, cls):
    data = yaml.safe_load((ROOT / "configs" / name).read_text())

    def keys(d, prefix=""):
        out = set()
        for k, v in d.items():
            out.add(prefix + k)
            if isinstance(v, dict):
                out |= keys(v, prefix + k + ".")
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                out |= keys(v[0], prefix + k + "[].")
        return out

    assert keys(data) == keys(to_dict(cls()))
    assert load_config(cls, ROOT / "configs" / name) == cls()


def test_overrides_are_typed_and_applied():
    cfg = load_config(RefineConfig, None, ["dedup.near.threshold=0.9", "heuristics.min_words=null",
                                           "perplexity.enabled=false", "toxicity.enabled=false",
                                           "io.max_doc_bytes=1000"])
    assert cfg.dedup.near.threshold == 0.9
    assert cfg.heuristics.min_words is None
    assert cfg.io.max_doc_bytes == 1000


@pytest.mark.parametrize("override,key", [
    ("dedup.near.treshold=0.9", "dedup.near.treshold"),
    ("nope=1", "nope"),
    ("dedup.near.threshold=abc", "dedup.near.threshold"),
    ("dedup.near.threshold=1.5", "dedup.near.threshold"),
    ("heuristics.enabled=3", "heuristics.enabled"),
    ("io.max_doc_bytes=0", "io.max_doc_bytes"),
    ("heuristics.max_dup_line_frac=2", "heuristics.max_dup_line_frac"),
    ("perplexity.window=middle", "perplexity.window"),
    ("toxicity.variant=spicy", "toxicity.variant"),
    ("decide.max_toxicity=1.5", "decide.max_toxicity"),
    ("decide.max_toxicity=[0.5]", "decide.max_toxicity"),
    ("decide.max_toxicity.spicy=0.5", "decide.max_toxicity.spicy"),
    ("decide.max_toxicity.profanity_check=2", "decide.max_toxicity.profanity_check"),
    ("toxicity.backend=perspective", "toxicity.backend"),
    ("toxicity.chunk_words=0", "toxicity.chunk_words"),
    ("dedup.exact=1", "dedup.exact"),
])
def test_bad_keys_and_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(RefineConfig, None, [override])
    assert str(e.value).startswith(key + ":")


def test_max_toxicity_is_a_threshold_per_backend(tmp_path):
    """Two toxicity models, two scales: one threshold each; a number (or null) still sets them all."""
    assert RefineConfig().decide.max_toxicity == {"detoxify": 0.8, "profanity_check": 0.7}
    one = load_config(RefineConfig, None, ["decide.max_toxicity=0.5"]).decide
    assert one.max_toxicity == {"detoxify": 0.5, "profanity_check": 0.5}
    off = load_config(RefineConfig, None, ["decide.max_toxicity=null"]).decide
    assert off.toxicity_threshold("detoxify") is None and off.toxicity_threshold("profanity_check") is None
    mine = load_config(RefineConfig, None, ["decide.max_toxicity.profanity_check=0.9"]).decide
    assert mine.max_toxicity == {"detoxify": 0.8, "profanity_check": 0.9}  # the other keeps its default
    assert mine.toxicity_threshold("profanity_check") == 0.9 and mine.toxicity_threshold(None) is None
    p = tmp_path / "c.yaml"
    p.write_text("decide:\n  max_toxicity:\n    detoxify: 0.6\n")
    both = load_config(RefineConfig, p, ["decide.max_toxicity.profanity_check=null"]).decide
    assert both.max_toxicity == {"detoxify": 0.6, "profanity_check": None}
    assert yaml.safe_load(yaml.safe_dump(to_dict(load_config(RefineConfig, p))))["decide"]["max_toxicity"] == \
        {"detoxify": 0.6, "profanity_check": 0.7}  # config.yaml carries both


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("dedup:\n  near:\n    num_perm: many\n")
    with pytest.raises(ConfigError, match="dedup.near.num_perm"):
        load_config(RefineConfig, p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(RefineConfig, tmp_path / "missing.yaml")



def test_distill_config_errors_name_the_key():
    from app.distill.config import DistillConfig

    with pytest.raises(ConfigError, match="stages.temperature"):
        load_config(DistillConfig, None, ["stages.temperature=0"])
    with pytest.raises(ConfigError, match="train.strategy"):
        load_config(DistillConfig, None, ["train.strategy=zero3"])


def test_float_in_exponent_form_without_a_dot_is_a_number():
    from app.distill.config import DistillConfig

    assert load_config(DistillConfig, None, ["train.lr=3e-3"]).train.lr == 0.003
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(DistillConfig, None, ["train.lr=fast"])
