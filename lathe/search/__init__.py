"""Hyperparameter search as a job (`config.search`): the parent job proposes trials with Optuna,
each trial an ordinary job with `parent_job`; the best trial's model is the parent's result.

- `space`: what is searched, the task's default space, a trial's spec, and the check that every
  trial a space can produce is a valid job;
- `study`: Optuna's samplers and pruners on a study rebuilt from our rows (no Optuna storage);
- `requests`: a search request judged before it is stored, and `warm_start_from`'s records;
- `orchestrate`: `advance`, the idempotent step that starts, records and finishes trials.
"""
