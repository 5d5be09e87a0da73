"""The one exception type of the project: every error says what went wrong, on which input, and the fix."""


class SynergenError(Exception):
    """Base of every synergen error. Messages name the input (file, key, URL, shard) and what to do next."""


class ManifestError(SynergenError):
    """A source or mixture manifest is invalid: the message names the file, the key and the fix."""


class ShardError(SynergenError):
    """A shard is missing, truncated, corrupt or disagrees with its catalog."""


class ConfigMismatchError(SynergenError):
    """Two things that must agree (catalog vs model config, tokenizer vs catalog) do not; names both."""


def explain_validation(err, model: type, source: str, what: str) -> str:
    """The one formatter of pydantic validation errors: `source: invalid WHAT`, then a line per key, naming the
    key, what is wrong, the value given and the fix (for an unknown key: the valid keys of the model it sits in)."""
    lines = [f"{source}: invalid {what}"]
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        key = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            fields = _fields_at(model, e["loc"][:-1])
            fix = f"remove it or fix its spelling; valid keys here: {', '.join(fields)}" if fields else "remove it"
        elif e["type"] == "missing":
            fix = "add it"
        elif e["type"] in ("literal_error", "enum"):
            fix = f"use one of the allowed values ({e['msg'].split('Input should be ')[-1]})"
        elif e["type"] in ("value_error", "assertion_error"):
            fix = ""  # our validators' messages say the fix themselves
        else:
            fix = "fix the value"
        msg = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        got = "" if e["type"] in ("missing", "value_error", "assertion_error") else f" (got {e.get('input')!r:.80})"
        lines.append(f"  key {key!r}: {msg}{got}" + (f"; fix: {fix}" if fix else ""))
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


def validated(model: type, source: str, what: str, /, **values):
    """`model(**values)`, or ConfigError with `explain_validation`'s lines (for values that come from a CLI)."""
    from pydantic import ValidationError

    try:
        return model(**values)
    except ValidationError as err:
        raise ConfigError(explain_validation(err, model, source, what)) from None
