"""How tokens are drawn: ``SamplingConfig``, the one place sampling settings are checked.

A model saves its image sampling defaults with it (``MLLMConfig.sampling``), so this module sits below the
model and imports nothing of the package. The sampler (``mllm.sample``) reads these settings; the command
lines and the web app pass their flags through ``check_sampling`` (each setting alone, before a model loads)
and build the whole config afterwards, whose check adds the rules between settings.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

DECODINGS = ("autoregressive", "jacobi")
DRAFT_INITS = ("last", "uniform")


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # logits are divided by it; 0 = greedy (argmax)
    top_k: int = 0  # keep only the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose mass reaches top_p; 1 = off
    cfg_scale: float = 4.0  # image guidance s in u + s (c - u); 1 = conditional logits only
    seed: int | None = None  # seeds a private generator when none is passed; None = torch's global RNG
    # How image codes are decoded: "autoregressive", one LLM forward per code; "jacobi", speculative Jacobi
    # decoding (Teng et al., 2024): each forward runs a window of draft codes and keeps those the speculative-
    # sampling rule accepts, so the codes have exactly the autoregressive distribution (other random draws, so
    # a seed gives other images than autoregressive decoding). Text is always autoregressive.
    decoding: str = "autoregressive"
    window: int = 16  # jacobi: codes fed per forward (accepted codes not yet cached, then drafts); <= the image's
    # jacobi: what a draft is drawn from at a code no forward has reached yet: "last", the farthest distribution
    # the latest forward computed (neighbouring codes are alike: on the demo model 6.6 forwards per 36-code image
    # against 10.2 with "uniform"), or "uniform" over the K codes
    draft_init: str = "last"
    # jacobi: a draft x is kept with probability min(1, lenience * p(x) / q(x)). 1 = exact; above 1 keeps more
    # drafts (fewer forwards) and moves the images' distribution toward the drafts' (lossy; docs/benchmarks.md)
    lenience: float = 1.0

    def __post_init__(self) -> None:
        check_sampling(dataclasses.asdict(self))
        if self.lenience != 1 and self.decoding != "jacobi":
            raise ValueError(f"lenience={self.lenience} relaxes decoding 'jacobi'; decoding is {self.decoding!r}")
        self.top_k, self.window = int(self.top_k), int(self.window)  # a whole float (a web form's 4.0) counts


def answer_sampling(**overrides) -> SamplingConfig:
    """How answers (text) are sampled unless told otherwise: greedy; guidance is for images only."""
    return dataclasses.replace(SamplingConfig(temperature=0.0, cfg_scale=1.0), **overrides)


def check_sampling(values: Mapping[str, Any], names: Mapping[str, str] | None = None) -> None:
    """Raise ``ValueError`` (one line) for the first of ``values`` (``SamplingConfig`` fields, any of them) that
    no ``SamplingConfig`` takes, naming it as ``names`` does (e.g. ``{"top_p": "--top-p"}``), else by its field."""
    for field, value in values.items():
        problem = _problem(field, value)
        if problem:
            raise ValueError(f"{(names or {}).get(field, field)} {problem}")


def flag_settings(args: Mapping[str, Any], flags: Mapping[str, str]) -> dict[str, Any]:
    """The settings a command line gave: ``args`` (``vars`` of parsed arguments) of the ``flags`` (argument name ->
    ``SamplingConfig`` field) that are not None, as fields, each checked (an error names it as ``--top-p``)."""
    given = {field: args[flag] for flag, field in flags.items() if args[flag] is not None}
    check_sampling(given, names={field: f"--{flag.replace('_', '-')}" for flag, field in flags.items()})
    return given


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _problem(field: str, value: Any) -> str | None:
    """What is wrong with one setting, or None."""
    if field == "seed":
        return None if value is None or (isinstance(value, int) and not isinstance(value, bool)) else \
            f"must be a whole number or None, got {value!r}"
    if field in ("decoding", "draft_init"):
        choices = DECODINGS if field == "decoding" else DRAFT_INITS
        return None if value in choices else f"must be one of {', '.join(choices)}, got {value!r}"
    if field not in ("temperature", "top_k", "top_p", "cfg_scale", "window", "lenience"):
        raise TypeError(f"SamplingConfig has no setting {field!r}")
    if not _number(value):
        return f"must be a finite number, got {value}"
    if field in ("top_k", "window") and value != int(value):
        return f"must be a whole number, got {value}"
    if field == "temperature" and value < 0:
        return f"must be >= 0 (0 = greedy), got {value}"
    if field == "top_k" and value < 0:
        return f"must be >= 0 (0 = off), got {value}"
    if field == "top_p" and not 0 < value <= 1:
        return f"must be in (0, 1], got {value}"
    if field == "cfg_scale" and value < 0:
        return f"must be >= 0 (1 = no guidance), got {value}"
    if field == "window" and value < 1:
        return f"must be >= 1 (codes per forward with decoding 'jacobi'), got {value}"
    if field == "lenience" and value < 1:
        return f"must be >= 1 (1 = exact), got {value}"
    return None
