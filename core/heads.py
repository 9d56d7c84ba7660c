"""A classification head of our own in place of the model's final linear layer, and its rebuild.

`replace_head` puts a `ClassifierHead` (MLP, batch norm, dropout) where the head's last Linear was
and records what it did in `config.lathe_head`, so that `restore_head` rebuilds it on a model loaded
from an exported folder.
"""

from __future__ import annotations

import torch
from torch import nn

from core.errors import EngineError
from core.layers import layer_map
from core.spec import HeadConfig

DEFAULT_HEAD_DROPOUT = 0.1

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}


class _BatchNorm(nn.BatchNorm1d):
    """BatchNorm1d that normalises a one-row training batch with its running statistics.

    A batch of one has no variance, so torch refuses it in training mode; the last batch of an
    epoch can be that small, and a job must not fail on it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                            training=False, eps=self.eps)
        return super().forward(x)


class ClassifierHead(nn.Module):
    """[Dropout -> Linear -> (BatchNorm1d) -> activation] per hidden size, then Dropout -> Linear.

    Takes (batch, features) or (batch, seq, features): the leading dimensions are flattened so that
    batch norm normalises each feature over all rows (tokens, for token classification).
    """

    def __init__(
        self,
        in_features: int,
        num_outputs: int,
        *,
        hidden_sizes: list[int] | tuple[int, ...] = (),
        activation: str = "gelu",
        batch_norm: bool = False,
        dropout: float = DEFAULT_HEAD_DROPOUT,
        fixed_dropout: bool = False,
    ):
        super().__init__()
        self.fixed_dropout = fixed_dropout  # set by config.head.dropout: apply_dropout leaves it alone
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden_sizes:
            layers += [nn.Dropout(dropout), nn.Linear(width, size)]
            if batch_norm:
                layers.append(_BatchNorm(size))
            layers.append(ACTIVATIONS[activation]())
            width = size
        layers += [nn.Dropout(dropout), nn.Linear(width, num_outputs)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.layers(x.reshape(-1, x.shape[-1]))
        return rows.reshape(*x.shape[:-1], rows.shape[-1])


def replace_head(
    model: torch.nn.Module, config: HeadConfig, *, num_outputs: int, classifier_dropout: float | None
) -> None:
    """Put a ClassifierHead in place of the final linear layer of the model's head.

    The new module keeps the attribute name (BERT's `classifier`, Llama's `score`, the Linear inside
    ResNet's `classifier` Sequential), so the model's forward calls it unchanged. What was done is
    recorded in `model.config.lathe_head` for `restore_head`. type "default" changes nothing.

    Args:
        model: a transformers classification model (not wrapped by peft).
        config: the job's config.head.
        num_outputs: classes, labels or tags (1 for regression).
        classifier_dropout: config.dropout.classifier; the head's dropout when config.dropout is None
            (else DEFAULT_HEAD_DROPOUT).

    Raises:
        EngineError: param config.head.type when the model has no linear head to replace.
    """
    if config.type == "default":
        return
    dropout = config.dropout if config.dropout is not None else classifier_dropout
    _install_head(model, config, num_outputs=num_outputs, dropout=dropout)
    model.config.lathe_head = config.model_dump()


def restore_head(model: torch.nn.Module) -> None:
    """Rebuild the ClassifierHead recorded in `model.config.lathe_head` (nothing when absent).

    For a model loaded from an exported folder: from_pretrained builds the architecture's own head
    (and warns that the ClassifierHead's weights do not fit it); after this call the folder's state
    dict loads exactly, e.g. `model.load_state_dict(safetensors.torch.load_file(dir / "model.safetensors"))`.
    """
    recorded = getattr(model.config, "lathe_head", None)
    if not recorded:
        return
    config = HeadConfig.model_validate(recorded)
    _, _, linear = final_head_linear(model)
    # apply_dropout wrote config.dropout.classifier to classifier_dropout: the head trained with it.
    dropout = config.dropout if config.dropout is not None else getattr(model.config, "classifier_dropout", None)
    _install_head(model, config, num_outputs=linear.out_features, dropout=dropout)


def _install_head(model: torch.nn.Module, config: HeadConfig, *, num_outputs: int, dropout: float | None) -> None:
    parent, attr, linear = final_head_linear(model)
    head = ClassifierHead(
        linear.in_features,
        num_outputs,
        hidden_sizes=config.hidden_sizes,
        activation=config.activation,
        batch_norm=config.batch_norm,
        dropout=dropout if dropout is not None else DEFAULT_HEAD_DROPOUT,
        fixed_dropout=config.dropout is not None,
    )
    setattr(parent, attr, head.to(device=linear.weight.device, dtype=linear.weight.dtype))


def final_head_linear(model: torch.nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """(parent module, attribute, the Linear) of the last linear layer among the head's modules."""
    head_modules = {name.rsplit(".", 1)[0] for name in layer_map(model).head}
    found: tuple[nn.Module, str, nn.Linear] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name in head_modules:
            parent_name, _, attr = name.rpartition(".")
            found = (model.get_submodule(parent_name), attr, module)
    if found is None:
        raise EngineError(
            f"{type(model).__name__} has no linear classification head to replace; use head.type default.",
            param="config.head.type",
        )
    return found


def head_module_names(model: torch.nn.Module) -> list[str]:
    """Top-level modules holding the head's parameters (BERT: ["classifier"])."""
    return list(dict.fromkeys(name.split(".", 1)[0] for name in layer_map(model).head))

