"""The one exception type of the project: every error says what went wrong, on which input, and the fix."""

from __future__ import annotations

from typing import Mapping


class SynergenError(Exception):
    """Base of every synergen error. Messages name the input (file, key, URL, shard) and what to do next."""


class ManifestError(SynergenError):
    """A source or mixture manifest is invalid: the message names the file, the key and the fix."""


class ShardError(SynergenError):
    """A shard is missing, truncated, corrupt or disagrees with its catalog."""


class ConfigMismatchError(SynergenError):
    """Two things that must agree (catalog vs model config, tokenizer vs catalog) do not; names both."""


def explain_validation(err, model: type, source: str, what: str, flags: Mapping[str, str] | None = None) -> str:
    """The one formatter of pydantic validation errors: `source: invalid WHAT`, then a line per key, naming the
    key, what is wrong, the value given and the fix (for an unknown key: the valid keys of the model it sits in).

    `flags` maps a key's dotted path (`quality.min_psnr_db`) to the command-line flag that set it (`--min-psnr-db`):
    values that came from a CLI are named by their flag, values from a file by their key."""
    flags = flags or {}
    lines = [f"{source}: invalid {what}"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        name = f"key {key!r}"
        for n in range(len(e["loc"]), 0, -1):  # an item of a list option is named by the option's flag
            flag = flags.get(".".join(str(p) for p in e["loc"][:n]))
            if flag:
                name = flag
                break
        if e["type"] == "extra_forbidden":
            fields = _fields_at(model, e["loc"][:-1])
            fix = f"remove it or fix its spelling; valid keys here: {', '.join(fields)}" if fields else "remove it"
        elif e["type"] == "missing":
            fix = "add it"
        elif e["type"] in ("literal_error", "enum"):
            fix = f"use one of the allowed values ({e['msg'].split('Input should be ')[-1]})"
        elif e["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            fix = f"give a number {e['msg'].removeprefix('Input should be ')}"
        elif e["type"] in ("value_error", "assertion_error"):
            fix = ""  # our validators' messages say the fix themselves
        else:
            fix = "fix the value"
        msg = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        got = "" if e["type"] in ("missing", "value_error", "assertion_error") else f" (got {e.get('input')!r:.80})"
        lines.append(f"  {name}: {msg}{got}" + (f"; fix: {fix}" if fix else ""))
    return "\n".join(lines)


def _fields_at(model: type, loc: tuple) -> list[str]:
    """The field names of the (nested) pydantic model at `loc`, or [] where the path leaves models."""
    import typing

    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            continue  # a list index or dict key: stay on the item's model
        ann = field.annotation
        candidates = [ann, *typing.get_args(ann)]
        for arg in list(candidates):
            candidates.extend(typing.get_args(arg))
        model = next((c for c in candidates if isinstance(c, type) and hasattr(c, "model_fields")), None)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


class ConfigError(SynergenError):
    """Options given on the command line or to a job do not validate: names each option and the fix."""


def validated(model: type, source: str, what: str, /, flags: Mapping[str, str] | None = None, **values):
    """`model(**values)`, or ConfigError with `explain_validation`'s lines (values from a CLI or a caller; `flags`
    names the CLI flag of each key, as in `explain_validation`)."""
    from pydantic import ValidationError

    try:
        return model(**values)
    except ValidationError as err:
        raise ConfigError(explain_validation(err, model, source, what, flags)) from None
