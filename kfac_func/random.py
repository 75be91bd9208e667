r"""Counter-based random numbers from a key tensor (JAX-style): reproducible from the key alone, no
``torch.Generator`` object and no global RNG, so sampling compiles with ``torch.compile`` and gives each
member of a ``vmap`` its own draws from its own key.

A key is an ``int64`` tensor of shape ``(2,)`` holding two 32-bit words. Bits are a hash of
``(key, counter)``: the *lowbias32* integer mixer (Wellons) applied twice, the counter being the element
index; every multiply is split into 16-bit halves so that no ``int64`` product overflows. :func:`split`
derives independent keys, :func:`uniform` / :func:`normal` / :func:`categorical` / :func:`bernoulli`
draw from one. A key must not be reused for two draws that should be independent: split it first.

Models that draw from torch's own RNG (dropout, ``randn_like``) are run by :func:`seeded`: torch's RNG
forked and seeded from :func:`torch_seed` of a key, so that every evaluation with the same key draws the
same numbers and the caller's RNG state is left as it was.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import Tensor

_MASK = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # the counter's stride: consecutive counters land far apart before mixing


def key(seed: int) -> Tensor:
    """A key from an integer seed (any Python int; its low 64 bits are used)."""
    return _mix(torch.tensor([seed & _MASK, (seed >> 32) & _MASK], dtype=torch.int64) ^ torch.tensor([0, 0x5BD1E995]))


def split(k: Tensor, num: int = 2) -> Tensor:
    """``num`` new keys ``(num, 2)`` derived from ``k`` (which should then not be used again)."""
    return _bits(k, 2 * num, stream=1).reshape(num, 2)


def _mul(x: Tensor, c: int) -> Tensor:
    """``x · c mod 2³²`` for ``0 ≤ x < 2³²`` without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK


def _mix(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mul(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul(x, 0x846CA68B)
    return x ^ (x >> 16)


def _bits(k: Tensor, count: int, stream: int = 0) -> Tensor:
    """``count`` 32-bit words (as int64) hashed from ``(k, stream, index)``."""
    index = torch.arange(count, dtype=torch.int64, device=k.device)
    x = _mix(_mul(index, _GOLDEN) ^ k[0] ^ (stream << 31))
    return _mix(x ^ k[1])


def uniform(k: Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform samples in the open interval ``(0, 1)``, 53 random bits each (two words), cast to ``dtype``."""
    count = 1
    for s in shape:
        count *= s
    words = _bits(k, 2 * count).reshape(count, 2)  # sample i uses words 2i, 2i+1: a function of (key, i)
    value = ((words[:, 0] >> 5).double() * 2.0**26 + (words[:, 1] >> 6).double() + 0.5) * 2.0**-53  # (0, 1)
    return value.reshape(shape).to(dtype).clamp(torch.finfo(dtype).tiny, 1 - torch.finfo(dtype).eps / 2)


def normal(k: Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal samples (Box–Muller on two uniforms per sample)."""
    u = uniform(k, (2,) + tuple(shape), torch.float64)
    return ((-2 * u[0].log()).sqrt() * torch.cos(2 * torch.pi * u[1])).to(dtype)


def bernoulli(k: Tensor, p: Tensor) -> Tensor:
    """``1`` with probability ``p`` (elementwise), else ``0``, in ``p``'s dtype."""
    return (uniform(k, tuple(p.shape), torch.float64) < p).to(p.dtype)


CATEGORICAL_ENTRIES = 2**22  # the most float64 cumulative-sum entries :func:`categorical` holds at once (32 MB)


def categorical(k: Tensor, p: Tensor, samples: int) -> Tensor:
    """``(samples, *p.shape[:-1])`` class indices drawn from the probabilities ``p`` (last dim; rows need
    not be normalised; a non-finite entry counts as ½, so that a non-finite output still samples) by inverting the
    cumulative sum, taken in float64 a chunk of rows at a time (a vocabulary-wide output never holds its whole
    float64 copy)."""
    rows = p.reshape(-1, p.shape[-1])
    u = uniform(k, (samples, rows.shape[0]), torch.float64)
    chunk = max(1, CATEGORICAL_ENTRIES // p.shape[-1])
    picks = []
    for i in range(0, rows.shape[0], chunk):
        part = rows[i : i + chunk].to(torch.float64)
        cdf = torch.where(torch.isfinite(part), part, 0.5).cumsum(-1)
        picks.append((cdf < (u[:, i : i + chunk] * cdf[:, -1]).unsqueeze(-1)).sum(-1))
    return torch.cat(picks, 1).clamp_max(p.shape[-1] - 1).reshape((samples,) + tuple(p.shape[:-1]))


def draw_key() -> Tensor:
    """A key drawn from torch's global RNG (for callers that pass none)."""
    return torch.randint(0, _MASK + 1, (2,), dtype=torch.int64)


def torch_seed(k: Tensor) -> int | None:
    """A seed for torch's own RNG from the key ``k`` (its two words as one 64-bit integer; one host read), or
    ``None`` where ``k`` cannot be read on the host: under ``torch.compile`` or batched by ``vmap``."""
    if torch.compiler.is_compiling() or torch._C._functorch.is_batchedtensor(k):
        return None
    high, low = (int(w) for w in k.tolist())
    return (high << 32) | low


@contextlib.contextmanager
def seeded(seed: int | None, tensors: Iterable[Tensor] = ()) -> Iterator[None]:
    """torch's global RNG, of the CPU and of the CUDA devices that hold ``tensors``, forked for the block
    (restored on exit) and seeded with ``seed``: the random ops in the block draw the same numbers at every
    entry with the same seed, and the caller's RNG is left as it was. ``None``: neither forked nor seeded."""
    if seed is None:
        yield
        return
    cuda = sorted({t.device.index for t in tensors if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield
