"""An autoregressive softmax policy small enough to enumerate, with its exact objective and gradient.

The policy writes L tokens from a vocabulary of V (no prompt, no EOS: every sequence has length L,
so verl's response_mask is all ones). It is *tabular*: one logit vector θ[p] ∈ R^V per prefix p, so

    π_θ(y_t | y_<t) = softmax(θ[prefix(y_<t)])[y_t],        log π_θ(y) = Σ_t log π_θ(y_t | y_<t).

There are P = 1 + V + … + V^(L−1) prefixes and N = V^L sequences (V = 4, L = 4: P = 85, N = 256),
so every expectation over sequences is an exact finite sum:

    J(θ) = E_{y∼π_θ}[R(y)] = Σ_y π_θ(y)·R(y),          ∇J(θ) by autograd through that sum.

Simplified on purpose: one prompt, fixed length, tabular logits (no parameter sharing between
prefixes, so ‖∇J‖ and the estimators' variance are those of a tabular learner, not of a transformer).

Used by `isreshape-verl lab --out DIR` (see isreshape_verl.lab.cli).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

REWARD_FAMILIES = ("sparse", "dense", "random")


@dataclass
class SequenceSpace:
    """All V^L sequences, their tokens and the prefix each token is drawn after."""

    vocab: int
    """V, the vocabulary size."""
    length: int
    """L, the number of tokens in every sequence."""
    tokens: torch.Tensor
    """(N, L) int64: token t of sequence n (sequence n is n written in base V, most significant first)."""
    prefix: torch.Tensor
    """(N, L) int64: index in [0, P) of the prefix y_<t that token t of sequence n follows."""

    @property
    def n_sequences(self) -> int:
        return self.tokens.shape[0]

    @property
    def n_prefixes(self) -> int:
        return int(self.prefix.max()) + 1

    @property
    def flat_index(self) -> torch.Tensor:
        """(N, L): index of (prefix, token) in a row-major (P, V) table, for gathering log-probs."""
        return self.prefix * self.vocab + self.tokens


def sequence_space(vocab: int, length: int) -> SequenceSpace:
    """Enumerate the V^L sequences. Prefix index of y_<t: offset_t + code(y_<t), offset_t = (V^t − 1)/(V − 1)."""
    if vocab < 2 or length < 1:
        raise ValueError(f"need vocab >= 2 and length >= 1, got vocab={vocab}, length={length}")
    n = vocab**length
    codes = torch.arange(n)
    powers = vocab ** torch.arange(length - 1, -1, -1)
    tokens = (codes[:, None] // powers[None, :]) % vocab  # (N, L)
    prefix = torch.empty_like(tokens)
    offset = 0
    for t in range(length):
        code = codes // vocab ** (length - t)  # the first t tokens, as a base-V integer
        prefix[:, t] = offset + code
        offset += vocab**t
    return SequenceSpace(vocab, length, tokens, prefix)


def token_log_probs(space: SequenceSpace, logits: torch.Tensor) -> torch.Tensor:
    """log π(y_t | y_<t) for every sequence and position: (N, L). `logits` is (P, V) or (R, P, V) → (R, N, L)."""
    table = torch.log_softmax(logits, dim=-1)
    if table.dim() == 2:
        return table.reshape(-1)[space.flat_index]
    return table.reshape(table.shape[0], -1)[:, space.flat_index]


def sequence_log_probs(space: SequenceSpace, logits: torch.Tensor) -> torch.Tensor:
    """log π(y) = Σ_t log π(y_t | y_<t): (N,) (or (R, N))."""
    return token_log_probs(space, logits).sum(-1)


def objective(space: SequenceSpace, logits: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """J(θ) = Σ_y π_θ(y)·R(y), exactly (differentiable in `logits`)."""
    return (sequence_log_probs(space, logits).exp() * rewards).sum()


def exact_gradient(space: SequenceSpace, logits: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """∇_θ J(θ), (P, V), by autograd through the full sum over the V^L sequences."""
    theta = logits.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(space, theta, rewards), theta)
    return grad


def sequence_kl(space: SequenceSpace, logits_p: torch.Tensor, logits_q: torch.Tensor) -> float:
    """KL(p‖q) = Σ_y p(y)·log(p(y)/q(y)) over whole sequences (divide by L for a per-token figure)."""
    lp, lq = sequence_log_probs(space, logits_p), sequence_log_probs(space, logits_q)
    return float((lp.exp() * (lp - lq)).sum())


def make_rewards(space: SequenceSpace, family: str, generator: torch.Generator, sparse_share: float = 0.05) -> torch.Tensor:
    """R(y) for every sequence, (N,) float64.

    sparse   1 for a random `sparse_share` of the sequences ("correct answers", at least one), else 0.
    dense    share of positions where y matches a random target sequence, in {0, 1/L, …, 1}.
    random   R(y) ~ N(0, 1) i.i.d. per sequence (no structure at all).
    """
    n = space.n_sequences
    if family == "sparse":
        k = max(1, round(sparse_share * n))
        rewards = torch.zeros(n, dtype=torch.float64)
        rewards[torch.randperm(n, generator=generator)[:k]] = 1.0
        return rewards
    if family == "dense":
        target = torch.randint(space.vocab, (space.length,), generator=generator)
        return (space.tokens == target).double().mean(-1)
    if family == "random":
        return torch.randn(n, generator=generator, dtype=torch.float64)
    raise ValueError(f"unknown reward family {family!r}; allowed: {', '.join(REWARD_FAMILIES)}")


def sample_sequences(space: SequenceSpace, logits: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Indices of i.i.d. sequences drawn from the policy with these logits, of the given shape."""
    probs = sequence_log_probs(space, logits.detach()).exp()
    count = 1
    for s in shape:
        count *= s
    return torch.multinomial(probs, count, replacement=True, generator=generator).view(shape)
