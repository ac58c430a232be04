"""Checks of a job's arguments, declared once at the top of every job.

gin passes whatever the file says: ``steps = "1000"``, ``batch_size = 32.0`` or
``steps = -5`` reach a job unchanged and fail later with a traceback, or worse,
run (``steps = -5`` used to finish "successfully" with an untrained checkpoint).
Every job therefore starts with one declarative call::

    validation.check_args("jobs.train_ar", locals(), where=ctx,
                          steps=POSITIVE_INT, batch_size=POSITIVE_INT, lr=POSITIVE_FLOAT,
                          parallel=choice("auto", "none", "ddp", "fsdp"))

and a bad value becomes one :class:`~arforge.errors.ConfigError` naming the gin
binding, the value received and what is allowed::

    run.gin: jobs.train_ar.steps = -5 is not allowed: it must be a positive integer (1, 2, ...).
    Set it in the gin file or with --bind 'jobs.train_ar.steps = 1000'.

Rules are small objects (:class:`Rule`); ``optional(rule)`` also accepts None.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from arforge.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    """What a value must be: a test, its description for the message and an example value."""

    test: Callable[[Any], bool]
    allowed: str  #: completes "it must be ..."
    example: str  #: a valid gin value for the "what to do" hint

    def __call__(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except Exception:  # a value the test cannot even compare is not allowed
            return False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


POSITIVE_INT = Rule(lambda v: _is_int(v) and v >= 1, "a positive integer (1, 2, ...)", "1000")
NON_NEGATIVE_INT = Rule(lambda v: _is_int(v) and v >= 0, "a non-negative integer (0, 1, 2, ...)", "0")
INT = Rule(_is_int, "an integer", "0")
POSITIVE_FLOAT = Rule(lambda v: _is_real(v) and v > 0, "a positive finite number (e.g. 1e-4)", "1e-4")
NON_NEGATIVE_FLOAT = Rule(lambda v: _is_real(v) and v >= 0, "a finite number >= 0", "0.0")
PROBABILITY = Rule(lambda v: _is_real(v) and 0 <= v <= 1, "a probability in [0, 1]", "0.5")
DECAY = Rule(lambda v: _is_real(v) and 0 < v < 1, "a decay rate strictly between 0 and 1 (e.g. 0.9999)",
             "0.9999")
BOOL = Rule(lambda v: isinstance(v, bool), "True or False", "True")
TEXT = Rule(lambda v: isinstance(v, str) and v != "", "a non-empty string", '"name"')
PATH = Rule(lambda v: isinstance(v, (str, os.PathLike)) and str(v) != "", 'a path (a string such as "out/x")',
            '"path/to/file"')


def _is_compile_backend(v: Any) -> bool:
    if not isinstance(v, str):
        return False
    import torch._dynamo  # late: only when a backend is named

    return v in torch._dynamo.list_backends(exclude_tags=())


def compile_backend_rule() -> Rule:
    """A ``torch.compile`` backend name (``torch._dynamo.list_backends(exclude_tags=())``)."""
    return Rule(_is_compile_backend, 'a torch.compile backend such as "inductor" or "aot_eager" '
                "(torch._dynamo.list_backends(exclude_tags=()) lists them)", '"inductor"')


def at_least(low: int) -> Rule:
    return Rule(lambda v: _is_int(v) and v >= low, f"an integer >= {low}", str(low))


def choice(*options: Any) -> Rule:
    shown = ", ".join(repr(o) for o in options)
    return Rule(lambda v: any(type(v) is type(o) and v == o for o in options), f"one of {shown}",
                _gin_text(options[0]))


def optional(rule: Rule) -> Rule:
    return Rule(lambda v: v is None or rule(v), f"{rule.allowed}, or None", rule.example)


def sequence_of(rule: Rule, *, non_empty: bool = False) -> Rule:
    """A list/tuple whose every item satisfies ``rule`` (a bare string is not a sequence here)."""
    def test(v: Any) -> bool:
        return (isinstance(v, (list, tuple)) and (len(v) > 0 or not non_empty) and all(rule(x) for x in v))
    return Rule(test, f"a{' non-empty' if non_empty else ''} list of {_plural(rule.allowed)}",
                f"[{rule.example}]")


def one_or_many(rule: Rule) -> Rule:
    """A single value, or one per sub-token (a list/tuple)."""
    return Rule(lambda v: rule(v) or sequence_of(rule, non_empty=True)(v),
                f"{rule.allowed}, or a list of them (one per sub-token)", rule.example)


def _plural(allowed: str) -> str:
    text = allowed.split(" (")[0]
    for article in ("a ", "an "):
        if text.startswith(article):
            return text[len(article):] + "s"
    return text


def _gin_text(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f"{value!r} (a string)"
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
        return f"{value!r} (a float; write {int(value)} for a whole number)"
    if callable(value) and not isinstance(value, type):
        return f"{getattr(value, '__name__', type(value).__name__)} (a function: did you mean to call it?)"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_value(binding: str, value: Any, rule: Rule, *, where: Any = None) -> None:
    """Raise :class:`ConfigError` unless ``value`` satisfies ``rule``; ``binding`` is e.g. ``jobs.train_ar.steps``."""
    if rule(value):
        return
    raise ConfigError(f"{where_prefix(where)}{binding} = {_describe(value)} is not allowed: it must be {rule.allowed}. "
                      f"Set it in the gin file or with --bind '{binding} = {rule.example}'.")


def check_args(job: str, values: Mapping[str, Any], *, where: Any = None, **rules: Rule) -> None:
    """Check ``values[name]`` against ``rules[name]`` for every rule, in the order given.

    Args:
        job: the gin name of the job, e.g. ``jobs.train_ar``; bindings are named ``<job>.<arg>``.
        values: the job's arguments (``locals()`` at the top of the job).
        where: the launch file (a path, or a run context whose ``config_file`` is used), for the message.
    """
    for name, rule in rules.items():
        if name not in values:
            raise TypeError(f"check_args: {job} has no argument {name!r}")  # a programming error
        check_value(f"{job}.{name}", values[name], rule, where=where)


def check_labels(labels_min: int, labels_max: int, num_classes: int, *, source: str, what: str = "labels",
                 error: type[Exception] = ConfigError) -> None:
    """Class labels must lie in [0, num_classes): label ``num_classes`` is the CFG null class, never data."""
    if labels_min >= 0 and labels_max < num_classes:
        return
    bad = labels_max if labels_max >= num_classes else labels_min
    null = " (that index is the model's null class for classifier-free guidance)" if bad == num_classes else ""
    raise error(f"{source}: {what} go up to {labels_max} and down to {labels_min}, but the model has "
                      f"num_classes = {num_classes}, so a label must be in 0..{num_classes - 1}; found {bad}{null}. "
                      "Set the model's num_classes to the dataset's number of classes, or fix the labels")


def where_prefix(where: Any) -> str:
    if where is None:
        return ""
    path = where if isinstance(where, (str, os.PathLike)) else getattr(where, "config_file", None)
    return f"{path}: " if path else ""
