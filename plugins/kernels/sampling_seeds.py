"""Per-row seeds for the GPU samplers (kernels.triton, kernels.cuda), whose noise is Philox keyed by
a row's seed: a seeded request draws its row's seed from its own generator, so its tokens do not
depend on its neighbours in the batch; the other rows share one draw from the engine's generator,
each shifted by its row index."""

from __future__ import annotations

import torch

from fastgen.kernels import SamplingMetadata


def row_seeds(meta: SamplingMetadata, rows: int, device: torch.device,
              generator: torch.Generator | None) -> torch.Tensor:
    """[S] int64 Philox seeds in [0, 2^62), drawn on the device (no host sync); zeros when every
    row is greedy, which draws nothing."""
    if meta.all_greedy:
        return torch.zeros(rows, dtype=torch.int64, device=device)

    def draw(gen):
        dev = gen.device if gen is not None else device
        return torch.randint(0, 2**62, (1,), generator=gen, device=dev).to(device)

    base = draw(generator)
    # Unseeded rows share the step's seed but not its stream: the row index shifts each one.
    seeds = base + torch.arange(rows, device=device) * 0x9E3779B9
    seeded = [i for i, g in enumerate(meta.generators) if g is not None]
    if seeded:
        seeds[seeded] = torch.cat([draw(meta.generators[i]) for i in seeded])
    return seeds % 2**62
