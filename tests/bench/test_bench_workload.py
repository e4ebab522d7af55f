"""Benchmark workloads: the same seed gives the same requests; lengths follow the distribution."""

from __future__ import annotations

import numpy as np
import pytest

from fastgen.bench.runner import Poisson
from fastgen.bench.workload import (PRESETS, WorkloadShape, WorkloadSpec, allowed_token_ids,
                                    make_workload)
from fastgen.errors import ConfigError

IDS = np.arange(3, 1000)


def test_the_same_seed_makes_the_same_workload():
    spec = WorkloadSpec(WorkloadShape(50, 10), num_requests=20, seed=7)
    assert make_workload(spec, IDS, 4096) == make_workload(spec, IDS, 4096)
    other = make_workload(WorkloadSpec(WorkloadShape(50, 10), num_requests=20, seed=8), IDS, 4096)
    assert other != make_workload(spec, IDS, 4096)


@pytest.mark.parametrize("shape", [WorkloadShape(520, 12), WorkloadShape(240, 26)])
def test_lengths_are_normal_with_30_percent_spread(shape):
    requests = make_workload(WorkloadSpec(shape, num_requests=3000, seed=1), IDS, 100_000)
    for lengths, mean in (([r.prompt_len for r in requests], shape.prompt_mean),
                          ([r.max_tokens for r in requests], shape.gen_mean)):
        lengths = np.array(lengths)
        assert abs(lengths.mean() - mean) < 0.03 * mean
        assert 0.27 * mean < lengths.std() < 0.33 * mean
        assert lengths.min() >= 1


def test_lengths_are_clipped_to_the_model():
    requests = make_workload(WorkloadSpec(WorkloadShape(100, 40), num_requests=200), IDS, 64)
    assert all(1 <= r.prompt_len <= 63 for r in requests)
    assert all(1 <= r.max_tokens and r.prompt_len + r.max_tokens <= 64 for r in requests)
    assert max(r.prompt_len for r in requests) == 63


def test_prompts_use_only_allowed_ids():
    class Tokenizer:
        all_special_ids = [0, 1, 2]
        added_tokens_decoder = {9: "<extra>"}

        def __len__(self):
            return 12

    allowed = allowed_token_ids(Tokenizer(), vocab_size=20)   # ids 12..19 are not in the tokenizer
    assert allowed.tolist() == [3, 4, 5, 6, 7, 8, 10, 11]
    requests = make_workload(WorkloadSpec(WorkloadShape(30, 2), num_requests=10), allowed, 1000)
    assert {t for r in requests for t in r.prompt_token_ids} <= set(allowed.tolist())


def test_bad_specs_are_refused():
    with pytest.raises(ConfigError):
        WorkloadSpec(WorkloadShape(0, 10), num_requests=1)
    with pytest.raises(ConfigError):
        WorkloadSpec(WorkloadShape(10, 10), num_requests=0)


def test_the_cpu_preset_keeps_the_paper_ratios():
    paper, cpu = PRESETS["paper"], PRESETS["cpu"]
    for big, small in zip(paper.shapes, cpu.shapes):
        assert big.prompt_mean / small.prompt_mean == pytest.approx(5, rel=0.02)
        assert big.gen_mean / small.gen_mean == pytest.approx(5, rel=0.02)


def test_poisson_arrivals_are_seeded_with_the_given_mean_rate():
    offsets = Poisson(rate=4.0, seed=3).arrival_offsets(4000)
    assert offsets == Poisson(rate=4.0, seed=3).arrival_offsets(4000)
    assert offsets[0] == 0 and all(b >= a for a, b in zip(offsets, offsets[1:]))
    assert offsets[-1] / 3999 == pytest.approx(0.25, rel=0.05)
