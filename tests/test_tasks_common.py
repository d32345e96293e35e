"""Stage cache keys: a stage is recomputed exactly when something it reads changed."""

from types import SimpleNamespace

import pytest

from minitron.config import CompressConfig
from tasks.common import STAGE_FIELDS, stage_cache_key


def key(stage: str, config: CompressConfig, **inputs) -> str:
    context = SimpleNamespace(task=SimpleNamespace(name=stage))
    return stage_cache_key(context, {"config": config, "ctx": object(), **inputs})


def test_importance_ignores_fields_it_does_not_read():
    base = CompressConfig(name="a")
    teacher = {"uri": "s3://b/x/correct-teacher"}
    k = key("importance", base, teacher=teacher)
    assert k == key("importance", base.model_copy(update={"distill_tokens": "99M", "eval_limit": 3}), teacher=teacher)
    assert k != key("importance", base.model_copy(update={"calib_samples": 7}), teacher=teacher)
    assert k != key("importance", base, teacher={"uri": "s3://b/y/correct-teacher"})  # another upstream result
    assert k != key("importance", base.model_copy(update={"name": "b"}), teacher=teacher)  # a new name: fresh
    assert k != key("distill", base, teacher=teacher)


def test_distill_reads_its_budget_and_the_optimiser():
    base = CompressConfig(name="a")
    k = key("distill", base, teacher={"uri": "t"}, student={"uri": "s"})
    assert k != key("distill", base.model_copy(update={"distill_tokens": "20M"}), teacher={"uri": "t"},
                    student={"uri": "s"})
    assert k != key("distill", base.model_copy(update={"lr": 3e-4}), teacher={"uri": "t"}, student={"uri": "s"})
    assert k == key("distill", base.model_copy(update={"correction_tokens": "5M"}), teacher={"uri": "t"},
                    student={"uri": "s"})


@pytest.mark.parametrize("stage", sorted(STAGE_FIELDS))
def test_stage_fields_are_config_fields(stage):
    assert set(STAGE_FIELDS[stage]) <= set(CompressConfig.model_fields)


def test_every_stage_task_has_fields():
    from tasks.correct import correct_teacher
    from tasks.distill import distill_student
    from tasks.evaluate import evaluate_models
    from tasks.importance import score_importance
    from tasks.search import distill_candidate, plan_candidates, prune_to_shape, select_architecture

    tasks = (correct_teacher, distill_student, evaluate_models, score_importance, distill_candidate,
             prune_to_shape, plan_candidates, select_architecture)
    assert {t.name for t in tasks} == set(STAGE_FIELDS)


def test_task_runs_are_named_after_stage_and_candidate():
    from tasks.common import task_run_label

    shape = {"layers": 3, "hidden": 64, "ffn": 64, "heads": 4, "kv_heads": 2, "head_dim": 16}
    row = {"index": 1, "name": "c001-L3-h64-f64-q4-kv2", "shape": shape, "drop": [1, 1]}
    assert task_run_label("distill-candidate", {"row": row, "config": None, "number": 2}) == \
        "distill-candidate L3-H64-F64-A4-KV2 drop 2-2 r2"
    assert task_run_label("search-candidates", {"target": 72_600_000}) == "search-candidates 72.60M"
    assert task_run_label("prune", {"shape": shape, "drop": None}) == "prune L3-H64-F64-A4-KV2"
    assert task_run_label("importance", {"teacher": {"uri": "x"}}) == "importance"
