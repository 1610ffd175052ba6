"""The layer plan: which node holds which contiguous range of layers.

A ``Plan`` is plain data: computed from the nodes' free memory (or measured
speed, when known) and the model's description, printed as a table, sent as
JSON, and applied by the coordinator with one LoadLayers per node. Ranges are
contiguous and in node order, so activations walk node 0 -> node 1 -> ...
"""

import json
from dataclasses import asdict, dataclass, field

from ..cache.config import kv_bytes  # noqa: F401  (re-exported: the plan's size arithmetic)
from ..model.loader import use_float32, weights_bytes  # noqa: F401


class PlanError(ValueError):
    """The model (with its KV for the requested context) does not fit the nodes."""


@dataclass
class NodeSpec:
    name: str
    address: str
    free_bytes: int  # memory budget minus what it already holds
    speed: float = 0.0  # measured layers/s, 0 = unknown (then memory decides)


@dataclass
class Assignment:
    node: str  # NodeSpec.name
    address: str
    start: int  # first layer, inclusive
    end: int  # one past the last layer
    weights_bytes: int = 0
    kv_bytes: int = 0
    free_bytes: int = 0

    @property
    def layers(self):
        return self.end - self.start


@dataclass
class Plan:
    model: str  # name or path, as passed to LoadLayers
    identity: str
    num_layers: int
    context: int  # positions the KV estimate covers
    cache: dict = field(default_factory=dict)  # {"k_bits", "v_bits"}; empty = fp16
    assignments: list = field(default_factory=list)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        d["assignments"] = [Assignment(**a) for a in d.get("assignments", [])]
        return cls(**d)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2)

    def table(self):
        """The plan as a fixed-width text table, one row per node."""
        rows = [("node", "address", "layers", "count", "weights", "kv", "free")]
        for a in self.assignments:
            rows.append(
                (
                    a.node,
                    a.address,
                    f"{a.start}:{a.end}",
                    str(a.layers),
                    _mib(a.weights_bytes),
                    _mib(a.kv_bytes),
                    _mib(a.free_bytes),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        cache = "fp16" if not self.cache.get("k_bits") else f"turbo k{self.cache['k_bits']}/v{self.cache['v_bits']}" + (" key-mean" if self.cache.get("key_mean") else "")
        head = f"plan for {self.model} ({self.num_layers} layers, context {self.context}, KV {cache})"
        return "\n".join([head] + lines)

    def check(self):
        """Every layer exactly once, in order, each node at least one layer."""
        at = 0
        for a in self.assignments:
            if a.start != at or a.end <= a.start:
                raise PlanError(f"node {a.node} has layers {a.start}:{a.end}; expected a non-empty range starting at {at}")
            at = a.end
        if at != self.num_layers:
            raise PlanError(f"plan covers layers 0:{at}, the model has {self.num_layers}")


def _mib(n):
    return f"{n / (1 << 20):.1f} MiB"


def split_counts(n, weights):
    """``n`` layers split in proportion to ``weights`` (largest remainder), each part at least 1."""
    k = len(weights)
    if k == 0:
        raise PlanError("no nodes to plan over")
    if k > n:
        raise PlanError(f"{k} nodes but only {n} layers; every node needs at least one layer")
    if any(w <= 0 for w in weights):
        raise PlanError(f"node weights must be positive, got {weights}")
    total = sum(weights)
    exact = [n * w / total for w in weights]
    counts = [max(1, int(e)) for e in exact]
    while sum(counts) > n:  # the max(1, ...) floors may overshoot
        i = max((j for j in range(k) if counts[j] > 1), key=lambda j: (counts[j] - exact[j], counts[j]))
        counts[i] -= 1
    order = sorted(range(k), key=lambda j: exact[j] - counts[j], reverse=True)
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def make_plan(nodes, desc, context=4096, cache=None, model=""):
    """Contiguous layer ranges in proportion to speed (if all known) or free memory, checked to fit.

    ``desc`` is ``loader.describe(model)``: num_layers, layer_bytes, embed_bytes,
    head_bytes, num_kv_heads, head_dim, identity, name.
    """
    n = desc["num_layers"]
    use_speed = all(s.speed > 0 for s in nodes)
    counts = split_counts(n, [s.speed if use_speed else s.free_bytes for s in nodes])
    plan = Plan(
        model=model or desc.get("name", ""),
        identity=desc.get("identity", ""),
        num_layers=n,
        context=context,
        cache=dict(cache or {}),
    )
    at = 0
    short = []
    for spec, count in zip(nodes, counts):
        start, end = at, at + count
        w = weights_bytes(desc, start, end)
        kv = kv_bytes(count, desc["num_kv_heads"], desc["head_dim"], context, cache, 4 if use_float32() else 2, (start, end), n)  # hook (h/cache): what the node reserves
        plan.assignments.append(Assignment(spec.name, spec.address, start, end, w, kv, spec.free_bytes))
        if w + kv > spec.free_bytes:
            short.append(
                f"node {spec.name} ({spec.address}) needs {_mib(w + kv)} for layers {start}:{end} "
                f"(weights {_mib(w)} + KV {_mib(kv)} at context {context}) but has {_mib(spec.free_bytes)} free: "
                f"short by {_mib(w + kv - spec.free_bytes)}"
            )
        at = end
    if short:
        raise PlanError(
            "the model does not fit: " + "; ".join(short) + ". Add nodes, lower --max-context or use --kv-bits 3"
        )
    plan.check()
    return plan
