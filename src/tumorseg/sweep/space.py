"""A sweep's search space: Hydra's override grammar -> Optuna distributions, and back.

``hydra.sweeper.params`` (and sweep overrides on the command line) are written in Hydra's
override grammar: ``choice(8,16)`` or ``8,16`` (categorical), ``range(1,5)`` (int),
``interval(a,b)`` (float), with tags ``log`` and ``int``. :func:`search_space` turns them into
Optuna distributions, :func:`sampled_override` turns a sampled value back into an override.

The baseline trial runs the config as given; :func:`baseline_params` finds the config's own
values of the searched keys and whether each lies in its distribution (:func:`_fitting`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Quote, QuotedString, Transformer
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)


def param_lines(params: Mapping[str, Any]) -> list[str]:
    """``hydra.sweeper.params`` (key -> grammar text or plain value) as override lines."""
    return [f"{k}={v if isinstance(v, str) else Transformer.str(v)}" for k, v in params.items()]


def distribution(override: Override) -> BaseDistribution:
    """``choice``/``a,b`` -> categorical, ``range`` -> int (or categorical for floats),
    ``interval`` -> float, with tags ``log`` and ``int``."""
    value = override.value()
    if override.is_choice_sweep():
        # str, int, float, bool stay; lists and dicts become their override text ("[8,16]")
        return CategoricalDistribution(list(override.sweep_iterator(Transformer.encode)))
    if override.is_range_sweep():
        values = list(override.sweep_iterator())
        if values and value.step > 0 and all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=int(value.step))
        return CategoricalDistribution(values)
    if override.is_interval_sweep():
        use_log = "log" in value.tags
        if "int" in value.tags:
            return IntDistribution(int(value.start), int(value.end), log=use_log)
        return FloatDistribution(value.start, value.end, log=use_log)
    raise HydraException(f"{override.input_line}: not a sweep Optuna can sample")


def search_space(overrides: Iterable[Override]) -> tuple[dict[str, BaseDistribution], list[str]]:
    """Distributions of the sweep overrides by key; the other overrides as fixed strings. A
    later override of a key replaces an earlier one (the command line wins over ``params``)."""
    by_key = {o.get_key_element(): o for o in overrides}
    space = {k: distribution(o) for k, o in by_key.items() if o.is_sweep_override()}
    fixed = [o.input_line for o in by_key.values() if not o.is_sweep_override()]
    return space, fixed


def sampled_override(key: str, value: Any) -> str:
    """A sampled value as an override. Strings go in as written in the search space, so the
    choice ``"[8,16,32]"`` sets a list."""
    if isinstance(value, float):
        return f"{key}={value!r}"
    return f"{key}={value}" if isinstance(value, str) else f"{key}={Transformer.str(value)}"


def render(value: Any) -> str:
    """``value`` in override grammar, strings always quoted (a name like ``2024`` stays a str)."""
    if isinstance(value, str):
        return QuotedString(text=value, quote=Quote.single).with_quotes()
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{render(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(render(v) for v in value) + "]"
    return Transformer.str(value)


# --- config values in the space: the baseline's params ---------------------------------------

_MISFIT = object()


def _fitting(dist: BaseDistribution, value: Any) -> Any:
    """``value`` as a param of ``dist`` (for a categorical: the matching choice, which may be
    the override text of a list), else ``_MISFIT``."""
    if isinstance(dist, CategoricalDistribution):
        for choice in dist.choices:
            if isinstance(choice, bool) == isinstance(value, bool) and choice == value:
                return choice
            if isinstance(choice, str) and not isinstance(value, str) and value is not None:
                try:
                    parsed = OverridesParser.create().parse_override(f"k={choice}").value()
                except Exception:
                    continue
                if parsed == value:
                    return choice
        return _MISFIT
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _MISFIT
    if isinstance(dist, IntDistribution):
        if not float(value).is_integer():
            return _MISFIT
        value = int(value)
    else:
        value = float(value)
    return value if dist._contains(dist.to_internal_repr(value)) else _MISFIT


def baseline_params(
    config: DictConfig, space: Mapping[str, BaseDistribution]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The config's own values of the searched keys (a config group's: its chosen option):
    those that lie in their distribution (recorded as the baseline's params), and those that do
    not (run, but not recorded)."""
    choices = OmegaConf.select(config, "hydra.runtime.choices", default=None) or {}
    fits, misfits = {}, {}
    for key, dist in space.items():
        name = key.lstrip("+~")
        try:
            if name in choices:
                value = choices[name]
            else:
                value = OmegaConf.select(config, name, default=None)
                if isinstance(value, (DictConfig, ListConfig)):
                    value = OmegaConf.to_container(value, resolve=True)
        except Exception:  # an interpolation that resolves in the job only
            value = None
        fitted = _fitting(dist, value)
        if fitted is _MISFIT:
            misfits[key] = value
        else:
            fits[key] = fitted
    return fits, misfits
