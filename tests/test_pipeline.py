"""`retrofit pipeline` (the README's main job) end to end on SmolLM2 and a few ARC-Easy questions: search ->
routers trained with the pipeline's recipe (safety labels, shrink toward the labels, budget calibrated) -> lm-eval
of base, routers and static pruning; a re-run resumes, and a re-run with other training settings is refused."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.data]


def test_pipeline_trains_budgeted_routers_and_resumes(tmp_path, shared_data, smollm2):
    from retrofit.eval.runner import RunExistsError
    from retrofit.pipeline import run_pipeline

    kw = dict(train_examples=6, test_examples=6, simulations=8, seed=0, layer_fraction=0.9)
    s = run_pipeline(tmp_path, **kw)
    rows = {r["run"]: r for r in s["rows"]}
    assert len(rows) == 3 and {"base", "drllm"} <= set(rows), rows
    rep = json.loads((tmp_path / "routers" / "training_report.json").read_text())
    assert rep["config"]["target"] == "safety" and rep["config"]["shrink"] == 0.0
    cal = rep["calibrated"]
    assert cal["layer_fraction"] >= 0.9
    # shrink 0: one static plan, so the layer fraction on the test questions is the calibrated one exactly
    assert rows["drllm"]["layer_fraction"] == pytest.approx(cal["layer_fraction"])
    assert rows["base"]["layer_fraction"] == 1.0
    static = next(r for n, r in rows.items() if n.startswith("static_prune_"))
    assert static["layer_fraction"] == pytest.approx(rows["drllm"]["layer_fraction"], abs=0.5 / 30)
    assert rows["drllm"]["n"] == rows["base"]["n"] == 6
    # a re-run resumes (same numbers), other training settings are refused instead of reusing the routers
    again = run_pipeline(tmp_path, **kw)
    assert again["rows"] == s["rows"]
    with pytest.raises(RunExistsError, match="shrink"):
        run_pipeline(tmp_path, **{**kw, "shrink": 0.5})
