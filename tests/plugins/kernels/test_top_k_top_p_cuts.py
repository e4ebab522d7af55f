"""The fast samplers' top-k / top-p cuts keep exactly the tokens kernels.torch's filter keeps:
kernels.triton's thresholds (top_k_top_p.py), kernels.cuda's (csrc/sampling.cu, through its
sample_cuts op), each searched for without a sort, and kernels.cpu's, taken among each row's
largest candidates (cpu/sampling.py).

The one difference by design: at a tie on the cut the cuts keep every tied token, where the
reference keeps some of them in sort order; so the expected set is the reference's closed under
ties (every token at least as large as the smallest it keeps). Rows without ties compare as is.
The cuts run wherever their backend runs here (kernels.cuda emulated on the CPU too); the reference
on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from fastgen import SamplingParams
from fastgen.plugins.kernels.torch_ref.sampling import top_k_top_p_filter
from kernel_batches import devices_for, make_backend, target_name, with_emulated_cuda
from kernel_targets import CPU
from sampling_inputs import metadata, random_logits

TEMPERATURES = (0.5, 1.0, 2.0)
TOP_P = (1e-6, 0.5, 0.9, 1.0)
TARGETS = with_emulated_cuda([("triton", d) for d in devices_for("triton")]
                             + [("cuda", d) for d in devices_for("cuda")]) + [("cpu", CPU)]


@pytest.fixture(params=TARGETS, ids=[target_name(t) for t in TARGETS])
def cuts_of(request):
    """(logits, metadata) -> [S] cuts, computed by one implementation on its device."""
    name, device = request.param
    if name == "triton":
        from fastgen.plugins.kernels.triton.top_k_top_p import thresholds

        return device, thresholds
    if name == "cpu":   # plain torch: it needs no build of kernels.cpu's library
        from fastgen.plugins.kernels.cpu.sampling import top_k_top_p_cuts

        return device, top_k_top_p_cuts
    ops = make_backend(name, device).ops
    return device, lambda logits, meta: ops.sample_cuts(logits, meta.temperatures, meta.top_k, meta.top_p)


def rows_of(kind: str, rows: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        # Scale 1: at temperature 0.5 the least likely token still has a mass the reference's
        # float32 cumulative sum resolves, so top_p=1.0 keeps everything there too.
        return torch.randn(rows, vocab, generator=g)
    if kind == "ties":
        return torch.randint(-3, 4, (rows, vocab), generator=g).float()
    # -inf but for a handful of tokens: fewer than top_k, and no mass outside them.
    out = torch.full((rows, vocab), float("-inf"))
    for r in range(rows):
        few = torch.randperm(vocab, generator=g)[:4]
        out[r, few] = torch.randn(4, generator=g)
    return out


def expected_kept(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[S, V] bool: the reference filter's kept tokens, closed under ties at its cut."""
    temps = torch.tensor([p.temperature for p in params])
    scaled = logits / temps[:, None]
    kept = top_k_top_p_filter(scaled, metadata(params)) > float("-inf")
    cut = torch.where(kept, scaled, float("inf")).min(dim=-1, keepdim=True).values
    return (scaled >= cut) & (scaled > float("-inf"))


def cuts_on(cuts_of, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[S] the cuts computed by an implementation on its device, back on the CPU."""
    device, cuts = cuts_of
    return cuts(logits.to(device), metadata(params, device)).cpu()


def kept_by_thresholds(cuts_of, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    temps = torch.tensor([p.temperature for p in params])
    scaled = logits / temps[:, None]
    return (scaled >= cuts_on(cuts_of, logits, params)[:, None]) & (scaled > float("-inf"))


def assert_kept_as_the_reference(cuts_of, logits: torch.Tensor, params: list[SamplingParams]) -> None:
    """Every row keeps exactly the tokens the reference's top-k / top-p rule keeps."""
    got, want = kept_by_thresholds(cuts_of, logits, params), expected_kept(logits, params)
    wrong = [(i, params[i], got[i].sum().item(), want[i].sum().item())
             for i in range(len(params)) if not torch.equal(got[i], want[i])]
    assert not wrong, f"(row, params, kept, expected kept): {wrong}"


@pytest.mark.parametrize("vocab", [37, 1500], ids=lambda v: f"vocab={v}")   # 1500: two tiles
@pytest.mark.parametrize("kind", ["random", "ties", "mostly-inf"])
def test_kept_set_equals_the_reference(cuts_of, kind, vocab):
    params = [SamplingParams(temperature=t, top_k=k, top_p=p)
              for t in TEMPERATURES for k in (0, 1, 5, vocab) for p in TOP_P]
    logits = rows_of(kind, len(params), vocab, seed=vocab)
    assert_kept_as_the_reference(cuts_of, logits, params)


@pytest.mark.parametrize("kind", ["random", "ties", "mostly-inf"])
def test_rows_that_all_take_a_top_k_keep_the_reference_set(cuts_of, kind):
    # Every filtering row has a top-k of at most 50 in 1500 tokens: kernels.triton searches
    # among each row's 50 largest logits only (metadata.top_k_bound). Greedy rows and rows that
    # do not filter sit beside them, as in a served batch.
    vocab = 1500
    params = [SamplingParams(temperature=t, top_k=k, top_p=p)
              for t in TEMPERATURES for k in (1, 5, 50) for p in TOP_P]
    params += [SamplingParams(temperature=0, top_p=0.5), SamplingParams(temperature=0.8)]
    assert metadata(params).top_k_bound == 50
    assert metadata(params + [SamplingParams(temperature=0.7, top_p=0.9)]).top_k_bound is None
    logits = rows_of(kind, len(params), vocab, seed=7)
    assert_kept_as_the_reference(cuts_of, logits, params)


def test_ties_at_the_cut_keep_every_tied_token(cuts_of):
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0, 2.0]])
    kept = kept_by_thresholds(cuts_of, logits, [SamplingParams(temperature=1.0, top_k=2)])
    assert kept[0].tolist() == [True, False, True, True, False, True]


def test_top_p_is_taken_on_the_top_k_renormalised_distribution(cuts_of):
    # Probabilities 0.4, 0.3, 0.2, 0.1. Within the top 2 they are 0.57 and 0.43, so top_p 0.5
    # keeps one token; on the whole row the second token's mass before it (0.4) is under 0.5.
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    kept = kept_by_thresholds(cuts_of, logits, [SamplingParams(temperature=1.0, top_k=2, top_p=0.5)])
    assert kept[0].tolist() == [True, False, False, False]


def test_rows_without_a_cut_and_greedy_rows_get_minus_infinity(cuts_of):
    logits = random_logits(3, 50)
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0, top_k=3),
              SamplingParams(temperature=0.7, top_k=3)]
    cuts = cuts_on(cuts_of, logits, params)
    assert cuts[:2].tolist() == [float("-inf")] * 2
    kept = ((logits[2] / 0.7) >= cuts[2]).nonzero().flatten()
    assert sorted(kept.tolist()) == sorted(logits[2].topk(3).indices.tolist())
