"""The state schema of ``TurboQuantKVCache``: field names, positions, settings and versions.

``state`` (mlx-lm's protocol, and the container's wire list) is positional;
everything else asks the cache by name: ``state_fields`` / ``from_fields``.
The positions are written here and nowhere else; ``turbo_cache`` re-exports
every name (sessions/container.py reads them from there).
"""

from . import recent

# Version 2 added the float16 sinks and window (``recent.FIELDS``, settings
# ``sinks`` and ``window``); a version 1 state reads as one without them.

STATE_VERSION = 2
STATE_VERSIONS = (1, 2)
STATE_FIELDS_V1 = ("k_packed", "k_scales", "v_packed", "v_scales", "keys", "values", "key_mean", "offset", "meta_state")
STATE_FIELDS = STATE_FIELDS_V1 + recent.FIELDS  # new fields after the old: version 1 positions hold
PACKED_FIELDS = STATE_FIELDS[:4]
FLOAT_FIELDS = STATE_FIELDS[4:6]
RECENT_FIELDS = recent.FIELDS
SETTINGS_V1 = ("k_bits", "v_bits", "quantized_start", "codebook", "rotate_values", "key_mean")
SETTINGS = SETTINGS_V1 + ("sinks", "window")


class CacheStateError(ValueError):
    """A cache state this version cannot read. ``code``: STATE_VERSION or STATE_FIELDS."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def check_state_version(version) -> int:
    """``version`` if this code reads it, else CacheStateError(STATE_VERSION)."""
    if version not in STATE_VERSIONS:
        raise CacheStateError(
            "STATE_VERSION", f"TurboQuantKVCache state version {version!r} is not supported (this build reads {STATE_VERSIONS})"
        )
    return version


def upgrade_state(state, version, meta_state):
    """(state, meta_state, STATE_VERSION): a state of schema ``version`` in today's positions."""
    try:
        fields = named_state(state, version)
    except CacheStateError:
        return state, meta_state, version  # let the checker name what is wrong
    ok = isinstance(meta_state, (list, tuple)) and len(meta_state) == len(SETTINGS_V1)
    return [fields[k] for k in STATE_FIELDS], (tuple(meta_state) + ("0", "0") if ok else meta_state), STATE_VERSION


def state_position(name: str) -> int:
    """Where field ``name`` sits in ``state`` (for error messages about a wire list)."""
    return STATE_FIELDS.index(name)


def named_state(state, version=STATE_VERSION) -> dict:
    """An mlx-lm ``state`` tuple as ``{field: value}`` (``meta_state`` as a tuple of strings).

    A version 1 state comes back in version 2's names: no sinks, no window.
    """
    check_state_version(version)
    names = STATE_FIELDS_V1 if version == 1 else STATE_FIELDS
    if not isinstance(state, (list, tuple)) or len(state) != len(names):
        found = len(state) if isinstance(state, (list, tuple)) else type(state).__name__
        raise CacheStateError("STATE_FIELDS", f"TurboQuantKVCache expects {len(names)} fields {names}, found {found}")
    fields = dict(zip(names, state))
    meta = fields["meta_state"]
    fields["meta_state"] = tuple(meta) if isinstance(meta, list) else meta
    if version == 1:
        fields.update(dict.fromkeys(recent.FIELDS))
        if isinstance(fields["meta_state"], tuple) and len(fields["meta_state"]) == len(SETTINGS_V1):
            fields["meta_state"] += ("0", "0")
    return fields


