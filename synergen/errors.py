"""The one exception type of the project: every error says what went wrong, on which input, and the fix."""


class SynergenError(Exception):
    """Base of every synergen error. Messages name the input (file, key, URL, shard) and what to do next."""


class ManifestError(SynergenError):
    """A source or mixture manifest is invalid: the message names the file, the key and the fix."""


class ShardError(SynergenError):
    """A shard is missing, truncated, corrupt or disagrees with its catalog."""


class ConfigMismatchError(SynergenError):
    """Two things that must agree (catalog vs model config, tokenizer vs catalog) do not; names both."""
