"""Hyperparameter search as a job (`config.search`): the parent job proposes trials with Optuna,
each trial an ordinary job with `parent_job`; the best trial's model is the parent's result.

- `space`: what is searched, the task's default space, a trial's spec, and the check that every
  trial a space can produce is a valid job;
- `study`: Optuna's samplers and pruners on a study rebuilt from our rows (no Optuna storage);
- `orchestrate`: `advance`, the idempotent step that starts, records and finishes trials;
- `warm`: `config.search.warm_start_from`, an earlier search's finished trials.
"""
