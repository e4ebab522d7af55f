"""`fastgen bench kernels --check`: each timed case's outputs against the reference backend's on the
same inputs, at the case's real shape, so a kernel is judged right as well as fast where it is timed.

The conformance tests check every op on small, awkward batches; this checks the shapes the suite
times (long contexts, many sequences, large heads), on the device it times them on. Values must
match within `fastgen.kernels.reference_tolerance`; sampled tokens, which differ between backends
by design, must each lie in its row's kept set under the reference's top-k / top-p rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import make_backend, reference_tolerance
from ..checkpoint import DTYPES
from .kernels import KernelCase


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    summary: str   # one line: how close, or what differs


def check_case(case: KernelCase, reference_cls: type) -> CheckResult:
    """The case's backend against `reference_cls` on the case's device and inputs."""
    actual = case.outputs()
    expected = case.outputs(make_backend(reference_cls, case.device))
    if case.op == "sample":
        return _check_draws(actual["tokens"], actual["kept"])
    atol, rtol = reference_tolerance(DTYPES[case.dtype], on_gpu=case.device.type == "cuda")
    problems, worst = [], 0.0
    for name, want in expected.items():
        got = actual[name]
        if got.shape != want.shape:
            problems.append(f"{name} has shape {tuple(got.shape)}, the reference's {tuple(want.shape)}")
            continue
        got, want = got.float(), want.float()
        close = torch.isclose(got, want, atol=atol, rtol=rtol, equal_nan=True)
        diff = (got - want).abs().nan_to_num(nan=float("inf")).max().item() if got.numel() else 0.0
        worst = max(worst, diff)
        if not close.all():
            problems.append(f"{name}: {int((~close).sum())} of {close.numel()} differ, "
                            f"max |diff| {diff:.3g}")
    tolerance = f"(atol {atol:g}, rtol {rtol:g})"
    if problems:
        return CheckResult(False, f"{'; '.join(problems)} {tolerance}")
    return CheckResult(True, f"max |diff| {worst:.3g} {tolerance}")


def _check_draws(tokens: torch.Tensor, kept: torch.Tensor) -> CheckResult:
    rows = torch.arange(len(tokens), device=tokens.device)
    in_range = (tokens >= 0) & (tokens < kept.shape[1])
    inside = in_range & kept[rows, tokens.clamp(0, kept.shape[1] - 1)]
    outside = (~inside).nonzero().flatten().tolist()
    if outside:
        shown = ", ".join(f"row {r}: token {int(tokens[r])}" for r in outside[:4])
        return CheckResult(False, f"{len(outside)} of {len(tokens)} draws outside their rows' kept "
                                  f"sets ({shown})")
    n = len(tokens)
    return CheckResult(True, f"{n} draw{'s' if n != 1 else ''}, each inside its row's kept set")
