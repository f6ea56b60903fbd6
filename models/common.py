"""Weight initialisation, the config base class and the puzzle-prefix length shared by every model file.

`trunc_normal_init_` follows JAX's `truncated_normal` initialiser rather than
`torch.nn.init.trunc_normal_`: torch truncates a normal of the requested std, which leaves
the result with a *smaller* std; JAX rescales so the truncated distribution itself has the
requested std. The reference HRM uses the JAX convention, and its checkpoints and training
curves assume it.
"""

import math
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator


def _truncated_standard_normal_variance(lower: float, upper: float) -> float:
    """Variance of a standard normal truncated to [lower, upper] (textbook closed form)."""
    pdf = lambda x: math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    z = cdf(upper) - cdf(lower)
    return 1 + (lower * pdf(lower) - upper * pdf(upper)) / z - ((pdf(lower) - pdf(upper)) / z) ** 2


def trunc_normal_init_(tensor: torch.Tensor, std: float = 1.0, lower: float = -2.0, upper: float = 2.0) -> torch.Tensor:
    """Fill `tensor` in place with a truncated normal of standard deviation `std`, bounds in units of std.

    Inverse-CDF sampling: uniform in [erf(lower/√2), erf(upper/√2)], then erfinv, scaled by √2·c
    where c = std / sqrt(variance of the truncated standard normal), so that the final std is `std`.
    The arithmetic runs in the tensor's own dtype, as the reference does (it matters only for
    bit-exact reproduction of bfloat16 buffers such as H_init/L_init).
    """
    with torch.no_grad():
        if std == 0:
            tensor.zero_()
            return tensor
        c = std / math.sqrt(_truncated_standard_normal_variance(lower, upper))
        tensor.uniform_(math.erf(lower / math.sqrt(2)), math.erf(upper / math.sqrt(2)))
        tensor.erfinv_()
        tensor.mul_(math.sqrt(2) * c)
        tensor.clip_(lower * c, upper * c)
    return tensor


# ---------------------------------------------------------------------------------- model configs

# Keys a model config may receive besides its own fields: what the launcher adds (training/build.py) and the
# `arch` section's own `name` and `loss` (dropped by the launcher, but kept by callers passing the whole section).
LAUNCHER_KEYS = frozenset({"causal", "name", "loss"})


class ModelConfig(BaseModel):
    """Base of the models' pydantic configs: an unknown key (a misspelled `+arch.<key>=...`) is an error, and
    `forward_dtype` must name a torch dtype.

    The launcher passes the whole `arch` section (minus `name` and `loss`) plus its own keys; those of
    `LAUNCHER_KEYS` that a model does not declare are dropped, every other unknown key is refused.
    """

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_launcher_keys(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        if values.get("causal") and "causal" not in cls.model_fields:  # a model without a causal mode
            raise ValueError(f"causal={values['causal']!r}: this model attends bidirectionally only")
        return {k: v for k, v in values.items() if k in cls.model_fields or k not in LAUNCHER_KEYS}

    @field_validator("forward_dtype", check_fields=False)  # every model has one; the base declares none
    @classmethod
    def _check_forward_dtype(cls, v: str) -> str:
        if not isinstance(getattr(torch, v, None), torch.dtype):
            raise ValueError(f"{v!r} is not a torch dtype name (e.g. 'bfloat16', 'float32')")
        return v


def puzzle_prefix_len(puzzle_emb_ndim: int, hidden_size: int) -> int:
    """Rows the puzzle embedding takes as a sequence prefix: ceil(puzzle_emb_ndim / hidden_size), 0 without one."""
    return -(puzzle_emb_ndim // -hidden_size)


def build_model_config(config_cls: type[BaseModel], values: dict[str, Any], model_name: str):
    """Validate `values` into `config_cls`; every problem becomes one ValueError line naming the `arch` key."""
    try:
        return config_cls(**values)
    except ValidationError as err:
        parts = []
        for e in err.errors():
            key = ".".join(str(x) for x in e["loc"])
            if e["type"] == "extra_forbidden":
                parts.append(f"unknown key 'arch.{key}' ({model_name} has no such config field)")
            elif e["type"] == "missing":
                parts.append(f"key 'arch.{key}' is required")
            else:
                msg = e["msg"].removeprefix("Value error, ")
                parts.append(f"arch.{key}: {msg}" if key else msg)
        raise ValueError(f"{model_name} config: " + "; ".join(parts)) from None
