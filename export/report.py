"""Fold report: what was folded, what was kept and why."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class Folded:
    bn: str
    into: str
    direction: str  # "after": BN follows the layer (output channels); "before": BN feeds it
    layer: str  # layer kind, e.g. "Conv2d", "ConvTranspose" (ONNX op), "Gemm"
    # A fused tritonbn BatchNormAct: only its BN part is folded; what it also computes stays in the graph:
    activation: str | None = None  # e.g. "relu"
    residual: str | None = None  # the added residual (its FX node's name), None when nothing is added


@dataclass
class Skipped:
    bn: str
    reason: str
    action: str = "kept"  # "kept" as eval BN, or "mul_add" (ONNX: per-channel Mul+Add)
    activation: str | None = None  # as in Folded: a BatchNormAct's add and activation, kept after the BN
    residual: str | None = None


@dataclass
class FoldReport:
    form: str  # "module" or "onnx"
    folded: list[Folded] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    bn_before: int | None = None  # BatchNorm modules / nodes before and after folding
    bn_after: int | None = None
    nodes_before: int | None = None  # ONNX node counts (ONNX form only)
    nodes_after: int | None = None

    def fold(self, bn: str, into: str, direction: str, layer: str, activation: str | None = None,
             residual: str | None = None) -> None:
        self.folded.append(Folded(bn, into, direction, layer, activation, residual))

    def skip(self, bn: str, reason: str, action: str = "kept", activation: str | None = None,
             residual: str | None = None) -> None:
        self.skipped.append(Skipped(bn, reason, action, activation, residual))

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def format(self) -> str:
        lines = [f"[{self.form}] folded {len(self.folded)} BatchNorm, kept {len(self.skipped)}"]
        if self.bn_before is not None:
            lines[0] += f"; BatchNorm {self.bn_before} -> {self.bn_after}"
        if self.nodes_before is not None:
            lines[0] += f"; nodes {self.nodes_before} -> {self.nodes_after}"
        for f in self.folded:
            lines.append(f"  folded  {f.bn} -> {f.into} ({f.layer}, BN {f.direction} the layer)"
                         + epilogue_text(f.activation, f.residual))
        for s in self.skipped:
            how = "as Mul+Add" if s.action == "mul_add" else "as eval BN"
            lines.append(f"  kept    {s.bn} {how}{epilogue_text(s.activation, s.residual)}: {s.reason}")
        lines += [f"  warning {w}" for w in self.warnings]
        return "\n".join(lines)

    __str__ = format


def epilogue_text(activation: str | None, residual: str | None) -> str:
    """``", then + 'x' and relu (kept)"``: what a fused BatchNormAct computes after its BN, if anything."""
    parts = ([f"+ '{residual}'"] if residual else []) + ([activation] if activation else [])
    return f", then {' and '.join(parts)} (kept)" if parts else ""
