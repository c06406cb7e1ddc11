"""No transformers deprecation noise from peftcore: prompt tuning, prefix tuning and
P-tuning read and pass the key/value cache under the name the installed transformers
uses, so a model run (and ``generate``) logs no "past_key_values ... deprecated" line.
Each check runs in a fresh interpreter (transformers logs such a line once per process)
under a handler that fails on any deprecation record, as HF PEFT's test config does."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.subprocess_env import child_env

pytest.importorskip("torch")
pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import logging, sys, warnings
    import torch, peftcore
    from tests.integration import tiny

    class FailOnDeprecation(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if "deprecat" in message.lower():
                print("NOISE:", message)
                sys.exit(3)

    logging.getLogger("transformers").addHandler(FailOnDeprecation())
    warnings.simplefilter("error", FutureWarning)
    method, build, task = sys.argv[1], getattr(tiny, sys.argv[2]), sys.argv[3]
    configs = {
        "prompt": peftcore.PromptTuningConfig, "prefix": peftcore.PrefixTuningConfig,
        "p_tuning": peftcore.PromptEncoderConfig,
    }
    model = peftcore.get_peft_model(build(), configs[method](num_virtual_tokens=3, task_type=task))
    ids = tiny.random_ids(2, 4)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "SEQ_2_SEQ_LM":
        model(**inputs, decoder_input_ids=ids)
    else:
        model(**inputs)
    if task != "SEQ_CLS":
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    print("quiet")
    """
)


@pytest.mark.parametrize("method", ["prompt", "prefix", "p_tuning"])
@pytest.mark.parametrize("build, task", [("bert_cls", "SEQ_CLS"), ("llama_lm", "CAUSAL_LM"), ("t5_lm", "SEQ_2_SEQ_LM")])
def test_prompt_methods_log_no_deprecation(method, build, task):
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, method, build, task], cwd=ROOT, env=child_env(ROOT),
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("quiet"), done.stdout[-1000:] + done.stderr[-2000:]
    assert "deprecated" not in done.stderr.lower(), done.stderr[-2000:]
