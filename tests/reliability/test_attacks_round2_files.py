"""Issue 15, the cases where a file attacks: 6 (memory before validation), 7 (ReDoS),
8 (a FIFO in place of a file), 9 (foreign exceptions: overflow, recursion, huge
headers) and 15 (non-finite weights). Each hostile input is read in a subprocess
limited in address space and CPU time (``resource.setrlimit``) and wall time, and must
end in a peftcore error naming the file and entry."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.subprocess_env import child_env

torch = pytest.importorskip("torch", reason="torch is not installed")
from torch import nn  # noqa: E402

import peftcore  # noqa: E402
from peftcore import AdapterError, ConfigError, LoraConfig  # noqa: E402
from peftcore.io import CONFIG_NAME, METADATA_KEY, WEIGHTS_NAME  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MEMORY_LIMIT = 1536 * 1024 * 1024  # far below the 8 GiB an attack asks for
CPU_SECONDS = 30

LIMITED_CHILD = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))
resource.setrlimit(resource.RLIMIT_CPU, ({cpu}, {cpu}))
start = time.monotonic()
try:
{body}
except BaseException as exc:
    from peftcore.errors import PeftCoreError
    kind = "PEFTCORE" if isinstance(exc, PeftCoreError) else "FOREIGN"
    print(kind, type(exc).__name__, str(exc)[:2000], flush=True)
    print("SECONDS", time.monotonic() - start)
    sys.exit(0)
print("NO ERROR")
"""


def run_limited(body: str, timeout: float = 60) -> str:
    """Run ``body`` (Python, core only) in a child limited in memory and time; return
    its report line (``PEFTCORE <type> <message>``)."""
    code = LIMITED_CHILD.format(memory=MEMORY_LIMIT, cpu=CPU_SECONDS, body=textwrap.indent(textwrap.dedent(body), "    "))
    env = child_env(ROOT, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def saved(tmp_path: Path, **changes: Any) -> Path:
    fields: dict[str, Any] = dict(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False)
    pm = peftcore.get_peft_model(mlp(), LoraConfig(**{**fields, **changes}))
    directory = tmp_path / "adapter"
    pm.save_pretrained(directory)
    return directory


def header_of(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_raw(path: Path, header: dict, data: bytes, sparse_size: int = 0) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text + data)
        if sparse_size:
            handle.truncate(8 + len(text) + sparse_size)  # a hole: nothing on disk


# -- 6. memory before validation --------------------------------------------------------
@pytest.mark.parametrize("entry", ["base_model.model.0.lora_A.weight", "base_model.model.extra.weight"])
def test_case6_a_huge_declared_tensor_is_refused_before_it_is_read(tmp_path: Path, entry: str) -> None:
    directory = saved(tmp_path)
    weights = directory / WEIGHTS_NAME
    header, data = header_of(weights)
    huge = 2**31 * 4
    replaced = header.pop(entry, None)
    end = len(data)
    if replaced is not None:  # the tensor the plan needs, declared 8 GiB over a hole
        data = bytearray(data)
        begin, stop = replaced["data_offsets"]
        del data[begin:stop]
        for value in header.values():
            if isinstance(value, dict) and "data_offsets" in value and value["data_offsets"][0] >= stop:
                value["data_offsets"] = [o - (stop - begin) for o in value["data_offsets"]]
        data, end = bytes(data), len(data)
    header[entry] = {"dtype": "F32", "shape": [2**31], "data_offsets": [end, end + huge]}
    write_raw(weights, header, data, sparse_size=end + huge)
    before = weights.stat().st_size
    report = run_limited(f"""
        from peftcore.io import read_adapter, match_tensors
        files = read_adapter({str(directory)!r})
        match_tensors(files.plan, files.tensors, {str(weights)!r}, strict=True)
    """)
    assert report.startswith("PEFTCORE AdapterError"), report
    assert str(weights) in report and entry in report
    assert weights.stat().st_size == before
    model = mlp()
    with pytest.raises(AdapterError, match="shape|unexpected"):
        peftcore.PeftModel.from_pretrained(model, directory)
    assert not any(hasattr(m, "lora_A") for m in model.modules())


def singa_zip(path: Path, members: dict[str, bytes], attrs: Any = None) -> None:
    payload = io.BytesIO()
    with zipfile.ZipFile(payload, "w", compression=zipfile.ZIP_DEFLATED) as npz:
        for name, raw in members.items():
            npz.writestr(name + ".npy", raw)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("tensor_dict.npz", payload.getvalue())
        if attrs is not None:
            archive.writestr("states_attr.json", attrs if isinstance(attrs, (bytes, str)) else json.dumps(attrs))


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_case6_singa_checkpoints_are_read_within_bounds(tmp_path: Path) -> None:
    pytest.importorskip("peftcore_singa")
    # a member declaring (2**36,) floats over 4 bytes of data
    huge = npy_bytes(np.zeros(1, np.float32)).replace(b"'shape': (1,), }", b"'shape': (68719476736,), }")
    fixed = bytearray(huge)
    fixed[8:10] = struct.pack("<H", len(huge) - 10 - 4)
    singa_zip(tmp_path / "lie.zip", {"fc1.lora_A.default": bytes(fixed)})
    # a zip bomb: 200 MiB of zeros in a few hundred KiB
    singa_zip(tmp_path / "bomb.zip", {"fc1.lora_A.default": b"\0" * (200 * 1024 * 1024)})
    for name, expected in (("lie.zip", "fc1.lora_A.default"), ("bomb.zip", "zip bomb")):
        path = tmp_path / name
        report = run_limited(f"""
            from peftcore_singa.checkpoint import read_singa_states
            states = read_singa_states({str(path)!r})
            for key in states:
                states.spec(key)
                states[key]
        """)
        assert report.startswith("PEFTCORE AdapterError"), report
        assert str(path) in report and expected in report, report
        assert name != "lie.zip" or "needs 274877906944 bytes" in report, report


# -- 7. regular expressions from files are bounded ----------------------------------------
@pytest.mark.parametrize("field", ["target_modules", "rank_pattern"])
def test_case7_a_pathological_regex_in_a_config_file_is_refused_quickly(tmp_path: Path, field: str) -> None:
    directory = saved(tmp_path)
    config = json.loads((directory / CONFIG_NAME).read_text())
    evil = r"([\w.]|[\w.])*Z"
    if field == "target_modules":
        config["target_modules"] = evil
    else:
        config["rank_pattern"] = {evil: 4}
    for where in (directory / CONFIG_NAME,):
        where.write_text(json.dumps(config))
    # the copy saved with the weights is the one used: poison it too
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    weights = directory / WEIGHTS_NAME
    with safe_open(str(weights), "np") as handle:
        metadata = dict(handle.metadata())
    record = json.loads(metadata[METADATA_KEY])
    record["config"] = config
    metadata[METADATA_KEY] = json.dumps(record)
    save_file(load_file(str(weights)), str(weights), metadata=metadata)
    start = time.monotonic()
    report = run_limited(f"""
        from peftcore.convert import convert
        convert({str(directory)!r}, {str(tmp_path / "out")!r}, to="hf")
    """, timeout=30)
    assert time.monotonic() - start < 30
    assert report.startswith("PEFTCORE AdapterError"), report
    assert "exponential" in report and str(directory) in report
    with pytest.raises(ConfigError, match="exponential"):
        LoraConfig(target_modules=evil)


def test_case7_fuzz_every_accepted_regex_matches_quickly() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from peftcore.targeting import check_regex, matches

    atoms = st.sampled_from([r"\w", r"[\w.]", ".", r"\.", "a", "q_proj", r"\d", "(a|b)", "(?:x|y)", "(a|aa)", "[ab]"])
    quant = st.sampled_from(["", "*", "+", "?", "{2,40}"])

    def build(depth: int) -> Any:
        leaf = st.tuples(atoms, quant).map(lambda t: t[0] + t[1])
        if depth == 0:
            return leaf
        group = st.tuples(st.lists(build(depth - 1), min_size=1, max_size=3), quant).map(
            lambda t: "(" + "".join(t[0]) + ")" + t[1]
        )
        alt = st.lists(build(depth - 1), min_size=2, max_size=3).map(lambda xs: "(?:" + "|".join(xs) + ")")
        return st.one_of(leaf, group, alt)

    patterns = st.lists(build(2), min_size=1, max_size=6).map(lambda xs: "".join(xs) + "Z")
    path = "model.layers.10.self_attn.q_proj." + "a" * 60

    @settings(max_examples=80, deadline=None, derandomize=True)
    @given(patterns)
    def check(pattern: str) -> None:
        try:
            check_regex("fuzz", pattern)
        except ConfigError:
            return
        start = time.monotonic()
        matches(path, pattern)
        assert time.monotonic() - start < 1.0, pattern

    check()


# -- 8. only regular files, read with a bound -------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_case8_a_fifo_in_place_of_a_file_is_refused_without_blocking(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    (directory / CONFIG_NAME).unlink()
    os.mkfifo(directory / CONFIG_NAME)
    fifo_plan = tmp_path / "plan.json"
    os.mkfifo(fifo_plan)
    report = run_limited(f"""
        from peftcore.io import read_adapter
        read_adapter({str(directory)!r})
    """, timeout=30)
    assert report.startswith("PEFTCORE AdapterError") and "not a regular file (a FIFO)" in report, report
    report = run_limited(f"""
        from peftcore.convert import convert
        convert({str(directory)!r}, {str(tmp_path / "out")!r}, to="hf")
    """, timeout=30)
    assert report.startswith("PEFTCORE AdapterError") and CONFIG_NAME in report, report
    report = run_limited(f"""
        from peftcore.cli.models import read_plan_file
        read_plan_file({str(fifo_plan)!r})
    """, timeout=30)
    assert report.startswith("PEFTCORE ConfigError") and "FIFO" in report, report
    weights = directory / WEIGHTS_NAME
    weights.unlink()
    os.mkfifo(weights)
    from peftcore.safetensors_reader import read_safetensors

    with pytest.raises(AdapterError, match="not a regular file"):
        read_safetensors(str(weights))


# -- 9. foreign exceptions become peftcore errors --------------------------------------------
@pytest.mark.parametrize("where", ["config", "plan"])
@pytest.mark.parametrize("field", ["lora_alpha", "r"])
def test_case9_huge_numbers_in_a_config_or_plan_are_peftcore_errors(tmp_path: Path, where: str, field: str) -> None:
    directory = saved(tmp_path)
    huge = "1" + "0" * 400
    if where == "config":
        text = (directory / CONFIG_NAME).read_text()
        data = json.loads(text)
        data[field] = 12345
        (directory / CONFIG_NAME).write_text(json.dumps(data).replace("12345", huge))
        from safetensors import safe_open
        from safetensors.numpy import load_file, save_file

        weights = directory / WEIGHTS_NAME
        with safe_open(str(weights), "np") as handle:
            metadata = dict(handle.metadata())
        metadata[METADATA_KEY] = metadata[METADATA_KEY].replace(f'"{field}": ', f'"{field}": {huge}, "_x": ', 1)
        save_file(load_file(str(weights)), str(weights), metadata=metadata)
    else:
        from safetensors import safe_open
        from safetensors.numpy import load_file, save_file

        weights = directory / WEIGHTS_NAME
        with safe_open(str(weights), "np") as handle:
            metadata = dict(handle.metadata())
        record = json.loads(metadata[METADATA_KEY])
        record["plan"]["ops"][1][field] = 12345
        metadata[METADATA_KEY] = json.dumps(record).replace("12345", huge)
        save_file(load_file(str(weights)), str(weights), metadata=metadata)
    with pytest.raises(AdapterError, match="more than 20 digits|not valid JSON|invalid"):
        peftcore.PeftModel.from_pretrained(mlp(), directory)


def test_case9_deep_nesting_and_huge_headers_are_peftcore_errors(tmp_path: Path) -> None:
    from peftcore.cli.models import read_plan_file

    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "plan.json").write_text(deep)
    with pytest.raises(ConfigError, match="plan"):
        read_plan_file(str(tmp_path / "plan.json"))
    with pytest.raises(ConfigError, match="not valid JSON"):
        LoraConfig.from_json('{"r": ' + deep + "}")
    # 1.5M zero-size entries: refused by the tensor count long before 1.5M dicts exist
    count = 1_500_000
    entries = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(count))
    path = tmp_path / "many.safetensors"
    text = ("{" + entries + "}").encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    report = run_limited(f"""
        from peftcore.safetensors_reader import read_safetensors
        read_safetensors({str(path)!r})
    """, timeout=60)
    assert report.startswith("PEFTCORE AdapterError") and str(path) in report, report
    seconds = float(report.split("SECONDS")[1])
    assert seconds < 10, report


def test_case9_singa_attributes_nested_too_deep(tmp_path: Path) -> None:
    pytest.importorskip("peftcore_singa")
    path = tmp_path / "deep.zip"
    singa_zip(path, {"fc1.lora_A.default": npy_bytes(np.zeros((2, 8), np.float32))}, attrs="[" * 50_000 + "]" * 50_000)
    report = run_limited(f"""
        from peftcore_singa.checkpoint import read_singa_states
        read_singa_states({str(path)!r})
    """)
    assert report.startswith("PEFTCORE AdapterError") and str(path) in report, report


# -- 15. non-finite weights are refused on load ---------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e300])
def test_case15_non_finite_or_overflowing_weights_are_refused_by_default(tmp_path: Path, value: float) -> None:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    directory = saved(tmp_path)
    weights = directory / WEIGHTS_NAME
    with safe_open(str(weights), "np") as handle:
        metadata = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    key = "base_model.model.2.lora_B.weight"
    poisoned = tensors[key].astype(np.float64)
    poisoned[0, 0] = value
    tensors[key] = poisoned
    save_file(tensors, str(weights), metadata=metadata)
    model = mlp()
    with pytest.raises(AdapterError, match=rf"{WEIGHTS_NAME}: tensor '{key}'.*allow_non_finite"):
        peftcore.PeftModel.from_pretrained(model, directory)
    assert not any(hasattr(m, "lora_A") for m in model.modules())
    loaded = peftcore.PeftModel.from_pretrained(mlp(), directory, allow_non_finite=True)
    assert not np.isfinite(loaded.export_adapter("default")["2.lora_B"]).all()


def test_case15_values_beyond_a_half_precision_layer_are_refused(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    directory = saved(tmp_path)
    weights = directory / WEIGHTS_NAME
    with safe_open(str(weights), "np") as handle:
        metadata = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    tensors["base_model.model.0.lora_A.weight"][0, 0] = 1e5  # finite in float32, Inf in float16
    save_file(tensors, str(weights), metadata=metadata)
    with pytest.raises(AdapterError, match="beyond the largest float16"):
        peftcore.PeftModel.from_pretrained(mlp().half(), directory)
    peftcore.PeftModel.from_pretrained(mlp(), directory)  # fine for a float32 layer
