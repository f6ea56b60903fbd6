"""Weight initialisation and config-error formatting shared by every model file.

`trunc_normal_init_` follows JAX's `truncated_normal` initialiser rather than
`torch.nn.init.trunc_normal_`: torch truncates a normal of the requested std, which leaves
the result with a *smaller* std; JAX rescales so the truncated distribution itself has the
requested std. The reference HRM uses the JAX convention, and its checkpoints and training
curves assume it.
"""

import math

import torch
from pydantic import ValidationError


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


def config_error_message(err: ValidationError, model_name: str) -> str:
    """One line for all pydantic errors of a model config: '<model_name> config: field: message; ...'.

    An unknown key (pydantic's `extra_forbidden`) reads "unknown key", so a misspelled override is named
    as such; errors of whole-config validators (empty location) carry their own wording.
    """
    parts = []
    for e in err.errors():
        field = ".".join(str(x) for x in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        parts.append(f"{field}: {msg}" if field else msg)
    return f"{model_name} config: " + "; ".join(parts)
