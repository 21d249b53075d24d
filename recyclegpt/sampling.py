"""Pure sampling helpers: logits -> probabilities -> tokens, with an explicit ``torch.Generator``.

Greedy decoding is ``temperature == 0``. The same seed gives the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class SamplingError(ValueError):
    """A sampling option is out of range."""


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen from a distribution.

    Attributes:
        temperature: 0 for greedy (argmax), else logits are divided by it; must be >= 0.
        top_k: keep only the k most likely tokens; 0 keeps all.
        top_p: keep the smallest set of tokens whose probability reaches top_p; in (0, 1].
        repetition_penalty: >= 1 ... divides positive (multiplies negative) logits of tokens already
            in the context (the CTRL rule); 1 disables it.
        seed: seed for the sampling generator; None draws a fresh one.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise SamplingError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise SamplingError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise tokens marked in ``seen`` (B, V bool): positive logits / penalty, negative * penalty."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to -inf (B, V)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class Sampler:
    """Turns logits into the distribution decoding samples from, and samples it.

    Args:
        cfg: sampling options.
        device: where the generator lives.
    """

    def __init__(self, cfg: SamplingConfig, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.generator = torch.Generator(device=device)
        if cfg.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(cfg.seed)

    def probs(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """Distribution (B, V) in float32 after penalty, temperature and filtering.

        For greedy decoding it is one-hot at the argmax: the token ``token`` picks without building it.
        """
        logits = self._penalised(logits, seen)
        if self.cfg.greedy:
            return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        logits = filter_top_k_top_p(logits / self.cfg.temperature, self.cfg.top_k, self.cfg.top_p)
        return logits.softmax(-1)

    def token(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """One token per row (B,) from logits: ``choose(probs(logits, seen))``, but greedy decoding
        takes the argmax of the penalised logits without building the one-hot distribution (two
        passes over the vocabulary fewer, a few percent of a small model's step)."""
        if not self.cfg.greedy:
            return self.choose(self.probs(logits, seen))
        return self._penalised(logits, seen).argmax(-1)

    def _penalised(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """Logits in float32 with the repetition penalty applied to the tokens in ``seen``."""
        logits = logits.float()
        return logits if seen is None else apply_repetition_penalty(logits, seen, self.cfg.repetition_penalty)

    def choose(self, probs: torch.Tensor) -> torch.Tensor:
        """One token per row (B,) from probabilities (B, V)."""
        if self.cfg.greedy:
            return probs.argmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    def uniform(self, n: int) -> torch.Tensor:
        """n uniform draws in [0, 1) from the sampler's generator."""
        return torch.rand(n, generator=self.generator, device=self.generator.device)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) per row (B, V): what to sample after a draft from q is rejected under p.

    Where p <= q everywhere (only possible when p == q up to rounding) it falls back to p.
    """
    r = (p - q).clamp_min(0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp_min(1e-30), p)


def accept_draft(p: torch.Tensor, q: torch.Tensor, tokens: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Speculative-sampling test per row: keep draft ``tokens`` (B,) drawn from q iff u < p(x) / q(x).

    With this test and ``residual_distribution`` on rejection, the kept token is distributed exactly
    as p (Leviathan et al. 2023; Chen et al. 2023).
    """
    px = p.gather(-1, tokens[:, None]).squeeze(-1)
    qx = q.gather(-1, tokens[:, None]).squeeze(-1)
    return u * qx < px
