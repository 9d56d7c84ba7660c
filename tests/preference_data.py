"""Preference pairs built from a labelled dataset of ../shared/data, for the DPO slow test and bench.

How: each row of a text,label,label_text CSV (TweetEval emotion: anger, joy, optimism, sadness)
becomes an OpenAI DPO row whose prompt asks for the tweet's emotion in one word; the preferred
answer is the row's label, the non-preferred one another label drawn at random (seeded). A model
that learns the preference learns to name the right emotion, which the base model does only
sometimes, so the held-out preference accuracy has room to rise.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

EMOTION = Path(__file__).resolve().parents[2] / "shared" / "data" / "tweet_eval_emotion"


def label_pairs(csv_path: Path, *, rows: int, seed: int) -> list[dict]:
    """`rows` seeded rows of the CSV as DPO rows (see the module docstring)."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        records = list(csv.DictReader(f))
    rng = random.Random(seed)
    rng.shuffle(records)
    names = sorted({r["label_text"] for r in records})
    question = f"Which emotion does this tweet express: {', '.join(names[:-1])} or {names[-1]}? Answer with one word."
    pairs = []
    for record in records[:rows]:
        wrong = rng.choice([name for name in names if name != record["label_text"]])
        pairs.append({"input": {"messages": [{"role": "user", "content": f"{question}\n\nTweet: {record['text']}"}]},
                      "preferred_output": [{"role": "assistant", "content": record["label_text"]}],
                      "non_preferred_output": [{"role": "assistant", "content": wrong}]})
    return pairs


def write_pairs(path: Path, pairs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    return path
