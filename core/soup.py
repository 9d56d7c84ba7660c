"""A greedy model soup (Wortsman et al. 2022, "Model soups", recipe 2): the members, fine-tuned from
the same base, sorted by validation score, best first; each joins the average of the weights only
if the average with it scores at least as well on validation. The result is one ordinary model
(the uniform mean of the chosen members' weights), at one model's inference cost.

Members must share one architecture (the same tensors by name and shape: a member with another
head or an unmerged LoRA adapter is refused). Every weight set is measured with the first member's
encoding of the data (its max_length and tokenizer); integer buffers are taken from the best member.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from core.combine import Member, Stage, result_of, write_reports
from core.device import Precision
from core.durable import fsync_path, fsync_tree
from core.engine import RunResult
from core.errors import EngineError
from core.sink import MetricsSink
from core.spec import Task

WEIGHTS = "model.safetensors"


def average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform mean of floating tensors (others: the first state's)."""
    first = states[0]
    return {k: (torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v.clone())
            for k, v in first.items()}


def soup(stage: Stage, members: list[Member], work_dir: Path, sink: MetricsSink) -> RunResult:
    adapter, splits, model = stage.prepare(members[0])
    states = [_weights(m) for m in members]
    reference = states[0]
    for member, state in zip(members[1:], states[1:]):
        if state.keys() != reference.keys() or any(state[k].shape != reference[k].shape for k in reference):
            raise EngineError(f"A soup averages members of one architecture; member {member.index} ({member.job}) has "
                              "other weights (another head or adapter) than member 0.", param="config.ensemble.members")

    def measure(state: dict[str, torch.Tensor], split: str, *, report: bool = False) -> dict[str, Any]:
        _, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise EngineError(f"The members' weights do not fit the model: {unexpected[:3]}", param="config.ensemble")
        if stage.task in (Task.TEXT_CLASSIFICATION, Task.IMAGE_CLASSIFICATION):
            return stage.metrics(stage.outputs(adapter, model, splits[split]), split, report=report)
        return adapter.evaluate(model, splits[split], device=stage.device, precision=Precision("fp32", None),
                                batch_size=32, report=report)

    sign = 1 if stage.maximize else -1
    scores = [float(measure(s, "validation")[stage.metric]) for s in states]
    order = sorted(range(len(members)), key=lambda i: (-sign * scores[i], i))
    chosen, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        value = float(measure(average([states[j] for j in chosen + [i]]), "validation")[stage.metric])
        kept = sign * value >= sign * best
        sink.event(f"Soup: member {members[i].index} {'joins' if kept else 'stays out'} "
                   f"(validation {stage.metric} {value:.4f} against {best:.4f})")
        if kept:
            chosen, best = chosen + [i], value
    souped = average([states[j] for j in chosen])

    def figures(state: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {split: measure(state, split, report=split == "test") for split in ("validation", "test") if split in splits}

    report = {"method": "soup", "metric": stage.metric, "ingredients": [members[j].index for j in chosen],
              "members": [{"member": m.index, "job": m.job, **figures(s)} for m, s in zip(members, states)],
              "ensemble": figures(souped)}
    sink.event(f"Soup of members {', '.join(str(members[j].index) for j in chosen)} of {len(members)}: validation "
               f"{stage.metric}={best:.4f}", data={"ensemble": report["ensemble"], "ingredients": report["ingredients"]})
    out = work_dir / "output" / "model"
    _export(out, members[order[0]].model_dir, souped, stage, report)
    return result_of(out, report)


def _weights(member: Member) -> dict[str, torch.Tensor]:
    path = member.model_dir / WEIGHTS
    if not path.is_file():
        raise EngineError(f"Member {member.index} ({member.job}) has no {WEIGHTS} (a LoRA adapter exported unmerged "
                          "can't join a soup: keep config.lora.merge_on_export on).", param="config.ensemble.members")
    return load_file(str(path))


def _export(out: Path, template: Path, state: dict[str, torch.Tensor], stage: Stage, report: dict[str, Any]) -> None:
    """The best member's folder (config, processor) with the soup's weights, durably in place."""
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(template, tmp, ignore=shutil.ignore_patterns("*.tar", "adapter", WEIGHTS))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
    write_reports(tmp, stage.spec, report)
    fsync_tree(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    fsync_path(out.parent)
