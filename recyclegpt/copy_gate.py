"""In-context copying for the recyclable module: an n-gram index proposes, a learned gate decides how much.

The module reads one hidden state and one embedding, so it cannot look a rare word up in the context
(the base does, with its induction heads): a name seen earlier in a passage is lost when its second piece
falls to the module. Here an index over the tokens so far proposes c, the token that followed the latest
earlier occurrence of the longest suffix of the context (up to ``MAX_N`` tokens), and a gate mixes it in:

    q(y) = (1 - a) p_mod(y) + a [y == c],      a = sigmoid(w . f + b)

f: the matched length (one-hot over ``BUCKETS``), log p_mod(c) and log max_y p_mod(y) (each / 10), whether
c is the module's top-1, how often the matched suffix was followed by c (a share), and whether c is in the
module's draft vocabulary. With no match, q = p_mod. w and b (``N_FEATURES`` + 1 numbers) are fitted after
the module is trained (``fit_gate``): they minimise KL(p_base || q) at the module's positions, so the
gate learns when the base itself would copy. Stored with the module (``RecyclableModule.copy_gate``), q is
what decoding drafts from and what evaluation scores; verified decoding stays exact (drafts are drawn
from q, and q is what the acceptance test reads).

This file is the gate's math only: it imports nothing of the package and runs no model. Scoring a base and
its module to fit the gate on (``gate_data``) and the whole fit on an engine (``fit_copy_gate``) are in
``workflows.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MAX_N = 8  # the longest suffix the index matches
BUCKETS = (1, 2, 3, 4, 6, 8)  # matched-length bins [1], [2], [3], [4, 5], [6, 7], [8]
N_INDEX = len(BUCKETS) + 1  # index features: the length bin one-hot, the follower share
N_FEATURES = N_INDEX + 4  # + log p(c), log p(top), c is top-1, c in the draft vocabulary


class CopyIndex:
    """The n-grams (n <= ``max_n``) of a growing token sequence, each with the followers it has had.

    Args:
        tokens: the sequence so far (e.g. a prompt).
        max_n: the longest n-gram indexed and matched (the copy gate's features assume ``MAX_N``).
    """

    def __init__(self, tokens: Sequence[int] = (), max_n: int = MAX_N) -> None:
        self.max_n = max_n
        self.tokens: list[int] = []
        # n-gram -> [position of its latest follower, times followed, {follower: count}]
        self._grams: dict[tuple[int, ...], list] = {}
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append tokens; every n-gram ending just before each new token gets it as a follower."""
        for tok in tokens:
            p, seq = len(self.tokens), self.tokens
            for n in range(1, min(self.max_n, p) + 1):
                entry = self._grams.setdefault(tuple(seq[p - n : p]), [0, 0, {}])
                entry[0], entry[1] = p, entry[1] + 1
                entry[2][tok] = entry[2].get(tok, 0) + 1
            seq.append(tok)

    def latest_follower(self, suffix: Sequence[int] = ()) -> tuple[int, int, float] | None:
        """For the longest tail of ``tokens + suffix`` (at most ``max_n`` tokens) that occurred earlier: its
        length n, the position in ``tokens`` of the token that followed its latest occurrence, and the share
        of its occurrences that token followed; None without a match. ``suffix`` (e.g. drafts not yet
        checked) is matched as context, never indexed."""
        ctx = self.tokens[-self.max_n :] + list(suffix)
        for n in range(min(self.max_n, len(ctx)), 0, -1):
            entry = self._grams.get(tuple(ctx[-n:]))
            if entry is not None:
                return n, entry[0], entry[2][self.tokens[entry[0]]] / entry[1]
        return None

    def propose(self, suffix: Sequence[int] = ()) -> tuple[int, list[float]] | None:
        """The copy candidate for the token after ``tokens + suffix``, and its index features; None
        without a match (``latest_follower``)."""
        found = self.latest_follower(suffix)
        if found is None:
            return None
        n, after, share = found
        onehot = [float(lo <= n < hi) for lo, hi in zip(BUCKETS, (*BUCKETS[1:], MAX_N + 1), strict=True)]
        return self.tokens[after], [*onehot, share]


def sequence_proposals(ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """For every position p of ``ids``, the copy candidate for ids[p+1] given ids[:p+1].

    Returns:
        (candidates (T,) long, -1 where nothing matched; index features (T, ``N_INDEX``)).
    """
    index, found = CopyIndex(), []
    for tok in ids:
        index.extend([tok])
        found.append(index.propose())
    return proposal_tensors(found)


def proposal_tensors(found: Sequence[tuple[int, list[float]] | None], device: torch.device | str | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``CopyIndex.propose`` results as (candidates (N,) long, -1 for none; index features (N, ``N_INDEX``))."""
    cand = torch.tensor([-1 if f is None else f[0] for f in found], dtype=torch.long, device=device)
    feats = torch.tensor([[0.0] * N_INDEX if f is None else f[1] for f in found], device=device)
    return cand, feats.view(-1, N_INDEX)


def gate_features(index_feats: torch.Tensor, logp_c: torch.Tensor, logp_top: torch.Tensor, is_top: torch.Tensor,
                  in_draft: torch.Tensor) -> torch.Tensor:
    """The gate's inputs (N, ``N_FEATURES``) from index features (N, ``N_INDEX``) and the module's numbers (N,)."""
    return torch.cat([index_feats, torch.stack([logp_c.clamp(min=-20) / 10, logp_top / 10, is_top.float(),
                                                in_draft.float()], -1)], -1)


def module_side(logp: torch.Tensor, cand: torch.Tensor, draft_vocab: torch.Tensor | None):
    """log p(c), log p(top), top-1 and whether c is in the draft vocabulary, from log-probs (N, V)."""
    logp_c = logp.gather(-1, cand[:, None])[:, 0]
    logp_top, top = logp.max(-1)
    # a comparison with every id (decoding has a row or a few): torch.isin sorts, 0.4 ms a call with 8,192 ids
    in_draft = (torch.ones_like(cand, dtype=torch.bool) if draft_vocab is None
                else (cand[:, None] == draft_vocab[None, :]).any(-1))
    return logp_c, logp_top, top, in_draft


def gate(weights: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """The copy weight a = sigmoid(w . f + b) for features (N, F); ``weights`` is (F + 1,), b last."""
    return torch.sigmoid(feats @ weights[:-1].to(feats.dtype) + weights[-1].to(feats.dtype))


def mixed_top(a: torch.Tensor, logp_c: torch.Tensor, logp_top: torch.Tensor, cand: torch.Tensor, top: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log(1 - a), log q(c) and argmax q from the copy weight a and the module's log p(c), log p(top), top."""
    keep = torch.log1p(-a)
    q_c = torch.logaddexp(logp_c + keep, a.log())
    return keep, q_c, torch.where(q_c > logp_top + keep, cand, top)


def mix_logits(logits: torch.Tensor, cand: torch.Tensor, index_feats: torch.Tensor, weights: torch.Tensor,
               draft_vocab: torch.Tensor | None = None) -> torch.Tensor:
    """log q (N, V) for the module's logits (N, V) and each row's candidate (N,) (-1: none, log q = log p).

    Decoding drafts from these; they are log-probabilities, so temperature and filters apply as to logits.
    """
    logp = logits.float().log_softmax(-1)
    rows = (cand >= 0).nonzero()[:, 0]
    if rows.numel() == 0:
        return logp
    c, lp = cand[rows], logp[rows]
    logp_c, logp_top, top, in_draft = module_side(lp, c, draft_vocab)
    a = gate(weights, gate_features(index_feats[rows].to(lp), logp_c, logp_top, top == c, in_draft))
    mixed = lp + torch.log1p(-a)[:, None]  # (R, V): (1 - a) p
    mixed.scatter_(1, c[:, None], torch.logaddexp(mixed.gather(1, c[:, None]), a.log()[:, None]))
    logp[rows] = mixed
    return logp


def mix_scores(logits: torch.Tensor, targets: torch.Tensor, cand: torch.Tensor, index_feats: torch.Tensor,
               weights: torch.Tensor, draft_vocab: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-log q(target) and argmax q at each position, without building q: logits (..., V); targets and
    cand (...); index_feats (..., ``N_INDEX``).

    Equal to ``cross_entropy`` / ``argmax`` of ``mix_logits`` (what decoding uses), in a fraction of the memory.
    """
    V = logits.shape[-1]
    lse = logits.float().logsumexp(-1).reshape(-1)
    flat = logits.reshape(-1, V)
    cand, targets = cand.reshape(-1), targets.reshape(-1)
    has = cand >= 0
    c = cand.clamp(min=0)
    logp_c = flat.gather(1, c[:, None])[:, 0].float() - lse
    logp_y = flat.gather(1, targets[:, None])[:, 0].float() - lse
    top_val, top = flat.max(-1)
    logp_top = top_val.float() - lse
    in_draft = torch.ones_like(has) if draft_vocab is None else torch.isin(c, draft_vocab)
    feats = gate_features(index_feats.reshape(-1, N_INDEX).to(lse), logp_c, logp_top, top == c, in_draft)
    a = torch.where(has, gate(weights, feats), torch.zeros_like(lse))
    keep, q_c, q_top = mixed_top(a, logp_c, logp_top, c, top)
    nll = torch.where(has & (targets == c), -q_c, -(logp_y + keep))
    top = torch.where(has, q_top, top)
    return nll.view(logits.shape[:-1]), top.view(logits.shape[:-1])


def fit_gate(index_feats: torch.Tensor, logp_c: torch.Tensor, logp_top: torch.Tensor, is_top: torch.Tensor,
             in_draft: torch.Tensor, base_p_c: torch.Tensor, l2: float = 1e-3) -> torch.Tensor:
    """Fit the gate's weights (``N_FEATURES`` + 1,) at positions that have a candidate.

    Minimises the mean over positions of KL(p_base || q) up to terms free of a, i.e.
    -(1 - p_base(c)) log(1 - a) - p_base(c) log((1 - a) p_mod(c) + a), plus ``l2`` |w|^2 (L-BFGS).

    Args:
        index_feats: (N, ``N_INDEX``) index features of each candidate.
        logp_c, logp_top, is_top, in_draft: (N,) the module's side (see ``gate_features``).
        base_p_c: (N,) the base's probability of the candidate at that position.
    """
    if index_feats.shape[0] == 0:
        raise ValueError("no position with a copy candidate to fit the gate on; give more (or more repetitive) text")
    feats = gate_features(index_feats.float(), logp_c.float(), logp_top.float(), is_top, in_draft)
    p_c, pb = logp_c.float().exp(), base_p_c.float()
    weights = torch.zeros(N_FEATURES + 1, requires_grad=True)
    opt = torch.optim.LBFGS([weights], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        a = gate(weights, feats).clamp(1e-6, 1 - 1e-6)
        loss = -((1 - pb) * torch.log1p(-a) + pb * torch.log((1 - a) * p_c + a)).mean()
        loss = loss + l2 * weights[:-1].square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    out = weights.detach()
    if not bool(out.isfinite().all()):
        raise ValueError("the copy gate's fit diverged (non-finite weights)")
    return out


def window_proposals(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates and index features for the module's slots of token windows (B, T): slot i (the pair
    (h_i, x_{i+1})) proposes x_{i+2}. Returns ((B, T-2), (B, T-2, ``N_INDEX``)), on the windows' device."""
    cands, feats = zip(*(sequence_proposals(row) for row in tokens.tolist()), strict=True)
    return (torch.stack(cands)[:, 1:-1].to(tokens.device), torch.stack(feats)[:, 1:-1].to(tokens.device))
