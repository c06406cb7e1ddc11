"""Issue 23 (reliability round 3), class 4: the matching work of a config from a file is
bounded. ``target_modules``/``exclude_modules``/``modules_to_save`` lists are looked up
in sets, ``rank_pattern``/``alpha_pattern`` literal keys in tables and their regular
expressions compiled once (``peftcore.pattern_keys``); what would still need more than
``MAX_MATCH_WORK`` steps is refused. Hostile configs are loaded in a subprocess limited
in memory and CPU time, as the round-2 file attacks are."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest

from peftcore import ConfigError
from peftcore.io import CONFIG_NAME, WEIGHTS_NAME
from peftcore.pattern_keys import MAX_MATCH_WORK, MAX_REGEX_KEYS, PatternKeys
from tests.reliability.test_attacks_round2_files import run_limited

LAYERS = 10


def naive_first_match(keys: list[str], path: str) -> Optional[str]:
    """HF PEFT's rule, as written in its ``get_pattern_key``: the first key in order."""
    return next((key for key in keys if re.fullmatch(rf"(.*\.)?(?:{key})", path)), None)


def test_class4_pattern_tables_match_exactly_like_the_regex_rule() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    component = st.text("ab_-0", min_size=1, max_size=3)
    paths = st.lists(st.lists(component, min_size=1, max_size=4).map(".".join), min_size=1, max_size=6)
    literal_piece = st.sampled_from(["a", "b", "_", "-", "0", ".", r"\.", r"\-", "ab", "a.b", "q_proj"])
    regex_piece = st.sampled_from(["a*", "(a|b)", "[ab]", r"\d", "b?", ".*", r"\w+"])
    key = st.lists(st.one_of(literal_piece, literal_piece, regex_piece), min_size=1, max_size=4).map("".join)

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(st.lists(key, min_size=1, max_size=12, unique=True), paths)
    def check(keys: list[str], layer_paths: list[str]) -> None:
        found = PatternKeys(keys, "rank_pattern").first_matches(layer_paths)
        for path in layer_paths:
            assert found[path] == naive_first_match(keys, path), (keys, path)

    check()
    # the forms real configs use
    keys = ["model.layers.1.self_attn.q_proj", r"model\.layers\.2\.mlp\.up_proj", "v_proj", r"layers\.[0-3]\.self_attn\.k_proj", "q.proj"]
    paths = [f"model.layers.{i}.{m}" for i in range(5) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj")]
    found = PatternKeys(keys, "rank_pattern").first_matches(paths)
    assert found == {path: naive_first_match(keys, path) for path in paths}
    assert found["model.layers.3.self_attn.q_proj"] == "q.proj"  # a bare dot matches any character


def hostile_config(tmp_path: Path, **fields: Any) -> Path:
    """An HF-style adapter (no stored plan: the config is planned on load) for
    ``LAYERS`` linear layers, with ``fields`` merged into its config; its tensors (zeros)
    are those the config plans, when it can be planned."""
    from safetensors.numpy import save_file

    from peftcore.errors import PeftCoreError
    from peftcore.graph import LayerNode, ModelGraph
    from peftcore.io import _hf_key
    from peftcore.registry import PeftRegistry

    directory = tmp_path / "adapter"
    directory.mkdir()
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": [str(i) for i in range(LAYERS)], **fields}
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    graph = ModelGraph(tuple(
        LayerNode(str(i), "linear", in_features=8, out_features=8, has_bias=True, params={"weight": (8, 8), "bias": (8,)})
        for i in range(LAYERS)
    ))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the unmatched modules_to_save entries
            specs = PeftRegistry.config_from_dict(config).plan(graph).tensor_specs()
    except PeftCoreError:  # refused: the test checks that loading refuses it too
        specs = {}
    tensors = {_hf_key(spec): np.zeros(spec.shape, np.float32) for spec in specs.values()}
    save_file(tensors or {"base_model.model.0.lora_A.weight": np.zeros((2, 8), np.float32)}, str(directory / WEIGHTS_NAME))
    return directory


LOAD = """
    import torch
    from torch import nn
    import peftcore
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range({layers})])
    pm = peftcore.PeftModel.from_pretrained(model, {directory!r})
    print("LOADED", sorted({{op.r for op in pm.plans["default"].ops if op.op == "lora"}}), flush=True)
"""


@pytest.mark.parametrize("shape", ["plain_names", "dotted_paths", "escaped_paths"])
def test_class4_twelve_thousand_pattern_keys_and_a_long_target_list_load_within_a_cpu_limit(
    tmp_path: Path, shape: str
) -> None:
    # issue 23's attack: 12,000 rank_pattern keys kept from_pretrained busy > 30 s on 10 layers
    names = {
        "plain_names": lambda i: f"proj_{i}",
        "dotted_paths": lambda i: f"model.layers.{i}.self_attn.q_proj",
        "escaped_paths": lambda i: re.escape(f"model.layers.{i}.mlp.up_proj"),
    }[shape]
    keys = {names(i): 3 for i in range(12_000)}
    keys["7"] = 5  # one real match, last in order
    directory = hostile_config(
        tmp_path, rank_pattern=keys, alpha_pattern=dict(keys), target_modules=[f"t{i}" for i in range(50_000)] + ["7"],
        modules_to_save=[f"m{i}" for i in range(20_000)] + ["3"],
    )
    assert (directory / CONFIG_NAME).stat().st_size > 220_000
    report = run_limited(LOAD.format(layers=LAYERS, directory=str(directory)), timeout=120)
    assert report.startswith("LOADED [5]"), report


def test_class4_too_many_regular_expression_keys_are_refused_quickly(tmp_path: Path) -> None:
    keys = {rf"blocks\.{i}\.(q|k)v?": 4 for i in range(MAX_REGEX_KEYS + 1)}
    directory = hostile_config(tmp_path, rank_pattern=keys)
    report = run_limited(LOAD.format(layers=LAYERS, directory=str(directory)), timeout=60)
    assert report.startswith("PEFTCORE AdapterError"), report
    assert f"rank_pattern has {MAX_REGEX_KEYS + 1} keys that are regular expressions" in report
    assert str(directory) in report
    with pytest.raises(ConfigError, match="regular expressions; at most"):
        from peftcore import LoraConfig

        LoraConfig(alpha_pattern=keys)


def test_class4_matching_work_over_the_bound_is_refused_before_it_is_done(tmp_path: Path) -> None:
    # every key is literal, but each has its own set of wildcard positions: no table can
    # serve two of them, so each layer is probed once per key (C(40, 3) = 9,880 keys)
    width = 40
    keys = {}
    for i in range(width):
        for j in range(i + 1, width):
            for k in range(j + 1, width):
                chars = ["0"] * width
                chars[i] = chars[j] = chars[k] = "."
                keys["".join(chars)] = 2
    layers = MAX_MATCH_WORK // len(keys) + 1
    from peftcore.graph import LayerNode, ModelGraph
    from peftcore.methods.lora import LoraConfig

    graph = ModelGraph(tuple(
        LayerNode(f"{i:0{width}d}", "linear", in_features=4, out_features=4, params={"weight": (4, 4)})
        for i in range(layers)
    ))
    config = LoraConfig(target_modules=[n.path for n in graph], rank_pattern=keys)
    with pytest.raises(ConfigError, match=rf"rank_pattern: matching its {len(keys)} keys against {layers} layers needs"):
        config.plan(graph)
    # the same keys on a model a tenth the size are matched, and exactly
    small = ModelGraph(graph.layers[: layers // 10])
    plan = config.plan(small)
    # a path matches a key when its non-zero digits sit at the key's wildcards: these have at most 3
    assert {op.r for op in plan.ops if op.op == "lora"} == {2}


def test_class4_a_long_target_list_matching_nothing_fails_fast_with_a_short_message(tmp_path: Path) -> None:
    names = [f"proj_{i}" for i in range(100_000)]
    directory = hostile_config(tmp_path, target_modules=names)
    report = run_limited(LOAD.format(layers=LAYERS, directory=str(directory)), timeout=60)
    assert report.startswith("PEFTCORE TargetNotFoundError"), report
    assert "and 99990 more" in report and len(report) < 2_000, report
