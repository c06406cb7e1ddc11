"""Issue 23, classes 1 and 2: every file a save touches goes through one writer that works
relative to the opened save directory, and every read is bounded.

The symlink-swap race is attacked by a real concurrent process (``swap_attacker.py``)
over a bounded loop of saves; hostile files are read in subprocesses limited in address
space and CPU time (``run_limited``, as for round 2) or, where only a hang is feared, in
a subprocess with a wall-clock timeout.
"""

from __future__ import annotations

import ast
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from tests.reliability.test_attacks_round2_files import ROOT, run_limited
from tests.subprocess_env import child_env

torch = pytest.importorskip("torch", reason="torch is not installed")

import peftcore  # noqa: E402
from peftcore import AdapterError, LoraConfig  # noqa: E402
from peftcore.convert import convert  # noqa: E402
from peftcore.io import CONFIG_NAME, WEIGHTS_NAME, match_tensors, read_adapter  # noqa: E402
from peftcore.save_dir import SaveDirectory  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(os, "O_NOFOLLOW") or sys.platform == "win32", reason="POSIX only")

ATTACKER = Path(__file__).with_name("swap_attacker.py")
CARD = "README.md"
SECRET = b"the outside file: must never change\n"
SAVES = 30

MODEL = """
import torch, peftcore
from peftcore import LoraConfig
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
pm = peftcore.get_peft_model(model, LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
"""


def base_model() -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def two_adapters() -> Any:
    pm = peftcore.get_peft_model(base_model(), LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    pm.add_adapter("b", LoraConfig(r=3, target_modules=["2"], init_lora_weights=False))
    return pm


def outside_file(tmp_path: Path) -> Path:
    path = tmp_path / "outside" / "secret.txt"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    os.chmod(path, 0o600)
    return path


def assert_untouched(outside: Path) -> None:
    assert outside.read_bytes() == SECRET
    assert stat.S_IMODE(os.stat(outside).st_mode) == 0o600


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# -- 1. the model card: a link or a FIFO at README.md ---------------------------------------
def test_class1_a_readme_symlink_to_an_outside_file_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    outside = outside_file(tmp_path)
    save = tmp_path / "save"
    save.mkdir()
    os.symlink(outside, save / CARD)
    with pytest.raises(AdapterError, match=rf"{save / CARD}: the model card is a symbolic link; refusing to read it"):
        two_adapters().save_pretrained(save)
    assert_untouched(outside)
    assert listing(save) == [CARD] and os.path.islink(save / CARD)


def test_class1_a_readme_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    save = tmp_path / "save"
    save.mkdir()
    os.mkfifo(save / CARD)
    start = time.monotonic()
    report = run_limited(MODEL + f"pm.save_pretrained({str(save)!r})\n", timeout=60)
    assert report.startswith("PEFTCORE AdapterError"), report
    assert str(save / CARD) in report and "FIFO" in report, report
    assert time.monotonic() - start < 60
    assert listing(save) == [CARD] and stat.S_ISFIFO(os.lstat(save / CARD).st_mode)


@pytest.mark.parametrize("where", [CARD, CONFIG_NAME, f"b/{WEIGHTS_NAME}"])
def test_class1_a_hard_link_to_an_outside_file_is_replaced_not_written_through(tmp_path: Path, where: str) -> None:
    """A name sharing its inode with an outside file: the save renames a new file over
    the name, so the outside file keeps its bytes and mode (an in-place write would not)."""
    outside = outside_file(tmp_path)
    save = tmp_path / "save"
    (save / "b").mkdir(parents=True)
    os.link(outside, save / where)
    two_adapters().save_pretrained(save)
    assert_untouched(outside)
    assert os.stat(outside).st_nlink == 1 and (save / where).read_bytes() != SECRET


def test_class2_a_card_that_is_not_utf8_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    save = tmp_path / "save"
    save.mkdir()
    (save / CARD).write_bytes(b"\xff\xfe not text")
    with pytest.raises(AdapterError, match=rf"{save / CARD}: the model card is not UTF-8 text"):
        two_adapters().save_pretrained(save)
    assert listing(save) == [CARD]


@pytest.mark.parametrize("where", [CONFIG_NAME, WEIGHTS_NAME, f"b/{CONFIG_NAME}", f"b/{WEIGHTS_NAME}"])
@pytest.mark.parametrize("kind", ["symlink", "fifo", "folder"])
def test_class1_an_adapter_file_name_that_is_not_a_regular_file_is_refused(tmp_path: Path, where: str, kind: str) -> None:
    outside = outside_file(tmp_path)
    save = tmp_path / "save"
    (save / "b").mkdir(parents=True)
    target = save / where
    if kind == "symlink":
        os.symlink(outside, target)
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    before = {p: sorted(os.listdir(save / p)) for p in (".", "b")}
    with pytest.raises(AdapterError, match=rf"{target}: is (a symbolic link|a FIFO|a directory).*refusing to replace"):
        two_adapters().save_pretrained(save)
    assert_untouched(outside)
    assert {p: sorted(os.listdir(save / p)) for p in (".", "b")} == before


def test_class1_the_cli_convert_refuses_a_link_at_its_output(tmp_path: Path) -> None:
    """``peftcore convert --to hf --force`` (a real process): a link at the weights name
    in DEST is an error on one line, exit status 2, and the outside file is unchanged."""
    outside = outside_file(tmp_path)
    source, out = tmp_path / "source", tmp_path / "hf"
    two_adapters().save_pretrained(source)
    out.mkdir()
    os.symlink(outside, out / WEIGHTS_NAME)
    done = subprocess.run(
        [sys.executable, "-m", "peftcore", "convert", str(source), str(out), "--to", "hf", "--force"],
        capture_output=True, text=True, env=child_env(ROOT), timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{out / WEIGHTS_NAME}: is a symbolic link" in done.stderr, done.stderr
    assert_untouched(outside)
    assert listing(out) == [WEIGHTS_NAME]


def test_class1_a_save_directory_that_is_a_link_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "link")
    with pytest.raises(AdapterError, match=r"link: the folder is a symbolic link"):
        two_adapters().save_pretrained(tmp_path / "link")
    assert listing(real) == []


# -- 1. subfolders: created and entered relative to the save directory ----------------------
def test_class1_a_subfolder_swapped_for_a_link_after_the_check_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The attacker acts in the window that round 2 left open: right after the check."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save = tmp_path / "save"
    (save / "b").mkdir(parents=True)
    real_check = SaveDirectory.check_subfolder

    def check_then_swap(self: SaveDirectory, name: str) -> None:
        real_check(self, name)
        if name == "b" and not os.path.islink(save / "b"):
            os.rename(save / "b", tmp_path / "moved")
            os.symlink(elsewhere, save / "b")

    monkeypatch.setattr(SaveDirectory, "check_subfolder", check_then_swap)
    with pytest.raises(AdapterError, match=rf"{save / 'b'}: the folder is a symbolic link"):
        two_adapters().save_pretrained(save)
    assert listing(elsewhere) == []
    assert listing(save) == ["b"]  # default's files and the card were not written either


def test_class1_a_failed_save_leaves_the_previous_files_and_no_new_subfolder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import peftcore.io

    save = tmp_path / "save"
    pm = two_adapters()
    pm.save_pretrained(save, selected_adapters=["default"])
    before = {name: (save / name).read_bytes() for name in listing(save)}
    real_bytes = peftcore.io.safetensors_buffers
    calls = []

    def fails_for_the_second_adapter(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:  # after b's folder was made and default's files were staged
            raise OSError(28, "No space left on device")
        return real_bytes(*args)

    monkeypatch.setattr(peftcore.io, "safetensors_buffers", fails_for_the_second_adapter)
    with pytest.raises(OSError, match="No space"):
        pm.save_pretrained(save)
    assert len(calls) == 2
    assert {name: (save / name).read_bytes() for name in listing(save)} == before  # no b/, no temp file


@pytest.mark.parametrize("hard_links", [True, False])
def test_class1_a_save_that_fails_at_a_rename_puts_every_file_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hard_links: bool
) -> None:
    """All or nothing on disk: the last rename (the card) fails, so the adapter files
    already renamed, in both folders, get their previous versions back, with their modes
    (from hard links, or from copies where the file system has none)."""
    save = tmp_path / "save"
    old = two_adapters()
    old.save_pretrained(save)
    os.chmod(save / "b" / WEIGHTS_NAME, 0o640)
    names = [CONFIG_NAME, WEIGHTS_NAME, CARD, f"b/{CONFIG_NAME}", f"b/{WEIGHTS_NAME}"]
    before = {name: ((save / name).read_bytes(), os.stat(save / name).st_mode) for name in names}
    new = peftcore.get_peft_model(base_model(), LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    new.add_adapter("b", LoraConfig(r=1, target_modules=["0"], init_lora_weights=False))
    real_replace, real_link = os.replace, os.link

    def card_rename_fails(src: Any, dst: Any, **dir_fds: Any) -> None:
        if str(dst) == CARD and str(src).startswith(f".{CARD}."):
            raise OSError(5, "Input/output error")
        real_replace(src, dst, **dir_fds)

    def no_hard_links(*args: Any, **kwargs: Any) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "replace", card_rename_fails)
    if not hard_links:
        monkeypatch.setattr(os, "link", no_hard_links)
    with pytest.raises(OSError, match="Input/output"):
        new.save_pretrained(save)
    monkeypatch.setattr(os, "replace", real_replace)
    monkeypatch.setattr(os, "link", real_link)
    assert {name: ((save / name).read_bytes(), os.stat(save / name).st_mode) for name in names} == before
    assert listing(save) == sorted([CONFIG_NAME, WEIGHTS_NAME, CARD, "b"])  # no temporary file or backup left
    assert listing(save / "b") == sorted([CONFIG_NAME, WEIGHTS_NAME])


# -- 1. the temporary-file swap race, attacked by a real concurrent process -----------------
def run_attacked(
    tmp_path: Path,
    mode: str,
    target: Path,
    folders: list[Path],
    save: Callable[[], None],
    check: Callable[[], None],
    check_landed: Callable[[], None] = lambda: None,
) -> tuple[int, int, int]:
    """``SAVES`` saves while ``swap_attacker.py`` attacks ``folders`` with links to
    ``target``: ``check()`` after each, ``check_landed()`` after each that returned;
    returns (saves that landed, saves refused with an AdapterError, swaps made)."""
    stop, report = tmp_path / f"stop-{mode}", tmp_path / f"report-{mode}"
    attacker = subprocess.Popen(
        [sys.executable, str(ATTACKER), mode, str(target), str(stop), str(report), *map(str, folders)],
        env=child_env(ROOT),
    )
    landed = refused = 0
    try:
        time.sleep(0.2)  # let it start polling
        for _ in range(SAVES):
            try:
                save()
                check_landed()
                landed += 1
            except AdapterError as exc:
                expected = ("while the save ran", "symbolic link", "cannot open the folder")
                assert any(words in str(exc) for words in expected), exc
                refused += 1
            check()
            for folder in folders:  # a save never leaves a link (or anything odd) at a name it writes
                for name in (CONFIG_NAME, WEIGHTS_NAME, CARD):
                    if os.path.lexists(folder / name):
                        assert stat.S_ISREG(os.lstat(folder / name).st_mode), f"{folder / name} after a save"
    finally:
        stop.touch()
        attacker.wait(timeout=30)
    return landed, refused, int(report.read_text())


def test_class1_swapping_temporary_files_for_links_never_writes_outside_save_pretrained(tmp_path: Path) -> None:
    outside = outside_file(tmp_path)
    save = tmp_path / "save"
    pm = two_adapters()
    pm.save_pretrained(save)  # the attacker then watches both folders
    expected = {name: pm.export_adapter(name) for name in ("default", "b")}

    def holds_the_saved_adapters() -> None:  # a save that returned has landed whole
        for name, folder in (("default", save), ("b", save / "b")):
            files = read_adapter(str(folder))
            assert files.plan == pm.plans[name]
            for key, value in match_tensors(files.plan, files.tensors, str(folder)).items():
                np.testing.assert_array_equal(value, expected[name][key])

    landed, refused, swaps = run_attacked(
        tmp_path, "temp", outside, [save, save / "b"], lambda: pm.save_pretrained(save),
        lambda: assert_untouched(outside), holds_the_saved_adapters,
    )
    print(f"save_pretrained under attack: {landed} landed, {refused} refused, {swaps} swaps")
    assert swaps > 0, "the attacker never caught a temporary file: the race was not exercised"
    assert landed + refused == SAVES


def test_class1_swapping_temporary_files_for_links_never_writes_outside_convert_to_hf(tmp_path: Path) -> None:
    outside = outside_file(tmp_path)
    source, out = tmp_path / "source", tmp_path / "hf"
    two_adapters().save_pretrained(source)
    convert(source, out, to="hf")
    expected = (out / CONFIG_NAME).read_bytes(), (out / WEIGHTS_NAME).read_bytes()

    def holds_the_converted_adapter() -> None:
        assert ((out / CONFIG_NAME).read_bytes(), (out / WEIGHTS_NAME).read_bytes()) == expected

    landed, refused, swaps = run_attacked(
        tmp_path, "temp", outside, [out], lambda: convert(source, out, to="hf", overwrite=True),
        lambda: assert_untouched(outside), holds_the_converted_adapter,
    )
    print(f"convert --to hf under attack: {landed} landed, {refused} refused, {swaps} swaps")
    assert swaps > 0, "the attacker never caught a temporary file: the race was not exercised"
    assert landed + refused == SAVES


def test_class1_swapping_a_subfolder_for_a_link_never_writes_outside(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save = tmp_path / "save"
    pm = two_adapters()

    def nothing_elsewhere() -> None:
        assert listing(elsewhere) == []

    landed, refused, swaps = run_attacked(
        tmp_path, "folder", elsewhere, [save], lambda: pm.save_pretrained(save), nothing_elsewhere
    )
    print(f"subfolder swap: {landed} landed, {refused} refused, {swaps} swaps")
    assert swaps > 0, "the attacker never swapped the subfolder"


# -- 2. every read is bounded -------------------------------------------------------------
def test_class2_a_sparse_4_gib_readme_is_refused_before_any_file_is_written(tmp_path: Path) -> None:
    save = tmp_path / "save"
    save.mkdir()
    card = save / CARD
    card.write_bytes(b"---\nlicense: mit\n---\n")
    os.truncate(card, 4 * 1024**3)  # a hole: nothing on disk
    report = run_limited(MODEL + f"pm.save_pretrained({str(save)!r})\n", timeout=60)
    assert report.startswith("PEFTCORE AdapterError"), report
    assert str(card) in report and "4294967296 bytes" in report, report
    assert float(report.split("SECONDS")[1]) < 10, report
    assert listing(save) == [CARD] and card.stat().st_size == 4 * 1024**3


@pytest.mark.parametrize("name", [CONFIG_NAME, "--config", "--plan"])
def test_class2_a_sparse_4_gib_config_is_refused_before_it_is_read(tmp_path: Path, name: str) -> None:
    saved = tmp_path / "adapter"
    two_adapters().save_pretrained(saved)
    path = saved / CONFIG_NAME if name == CONFIG_NAME else tmp_path / "given.json"
    path.write_bytes(b"{}")
    os.truncate(path, 4 * 1024**3)
    reader = {
        CONFIG_NAME: f"from peftcore.io import read_adapter\nread_adapter({str(saved)!r})",
        "--config": "from peftcore.cli.models import build_config\nimport argparse\n"
        f"build_config(argparse.Namespace(config={str(path)!r}, set=None, method=None))",
        "--plan": f"from peftcore.cli.models import read_plan_file\nread_plan_file({str(path)!r})",
    }[name]
    report = run_limited(reader, timeout=60)
    assert report.startswith(("PEFTCORE AdapterError", "PEFTCORE ConfigError")), report
    assert "4294967296 bytes" in report and str(path) in report, report


def test_class2_a_config_linked_to_a_device_is_refused(tmp_path: Path) -> None:
    saved = tmp_path / "adapter"
    two_adapters().save_pretrained(saved)
    (saved / CONFIG_NAME).unlink()
    os.symlink("/dev/zero", saved / CONFIG_NAME)  # a link is followed on load (the HF cache), a device is not read
    report = run_limited(f"from peftcore.io import read_adapter\nread_adapter({str(saved)!r})", timeout=60)
    assert report.startswith("PEFTCORE AdapterError") and "character device" in report, report


# -- the rule itself: nothing outside the reader and the writer touches a file -------------
FILE_CALLS = {
    "open", "os.open", "io.open", "os.fdopen", "os.chmod", "os.makedirs", "os.mkdir", "os.replace", "os.rename",
    "os.link", "os.unlink", "os.remove", "shutil.copyfile", "save_file", "json.dump", "json.load", "np.save",
    "np.savez", "np.load", "torch.save", "torch.load",
}
FILE_METHODS = {"write_text", "write_bytes", "read_text", "read_bytes", "mkdir", "touch", "unlink", "rename"}
ALLOWED = {
    "peftcore/safe_files.py", "peftcore/save_dir.py",
    # torch.load/torch.save on bytes in memory: the reader reads the .bin, the writer writes it
    "peftcore/torch_weights.py",
}


def _called(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return f"{func.value.id}.{func.attr}" if isinstance(func.value, ast.Name) else f"?.{func.attr}"
    return ""


def test_class1_and_2_every_file_is_read_and_written_through_the_one_reader_and_writer() -> None:
    offenders = []
    for package in (
        "peftcore", "backends/torch/peftcore_torch", "backends/singa/peftcore_singa", "examples/peftcore-ia3/peftcore_ia3",
        "examples/peftcore-jax/peftcore_jax",
    ):
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative in ALLOWED:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.Call):
                    continue
                called = _called(node)
                if called in FILE_CALLS or called.split(".")[-1] in FILE_METHODS:
                    offenders.append(f"{relative}:{node.lineno}: {called}")
    assert offenders == [], "file access outside peftcore.safe_files / peftcore.save_dir:\n" + "\n".join(offenders)
