"""The FLSL loss terms.

For every student query z (its view's tokens Z, the teacher's tokens Z+):
    m  = softmax(beta_sa * z.Z^T) Z       (mode inside the view, differentiable)
    m+ = softmax(beta_ca * z.Z+^T) Z+     (mode in the teacher view, stop-gradient)
    p_s = softmax(h_s(m) / T_s),  p_t = softmax(h_t(m+) / T_t)
    L1 = mean(2 - 2 cos(z, m)),  L2 = mean(H(p_t, p_s)),  L3 = KL(p_bar || uniform)
    total = upsilon * L1 + eta * L2 + gamma * L3

Tensor legend: b = images, n = tokens, q = queries per image, d = embed dim, k = prototypes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flsl_cli.distributed.ops import all_reduce_sum, world_size


@dataclass(frozen=True)
class LossWeights:
    upsilon: float
    eta: float
    gamma: float


@dataclass(frozen=True)
class StudentView:
    tokens_bnd: torch.Tensor
    query_index_bq: torch.Tensor


def gather_queries(tokens_bnd: torch.Tensor, query_index_bq: torch.Tensor) -> torch.Tensor:
    """The query tokens z: (b, q, d)."""
    index = query_index_bq.unsqueeze(-1).expand(-1, -1, tokens_bnd.shape[-1])
    return tokens_bnd.gather(1, index)


def attention_modes(
    queries_bqd: torch.Tensor, tokens_bnd: torch.Tensor, *, beta: float, fused: bool = False
) -> torch.Tensor:
    """One mean-shift step: the attention-weighted mean of `tokens` for each query, (b, q, d).

    `fused` computes the same softmax(beta z.Z^T) Z with `scaled_dot_product_attention` (keys and
    values both the tokens): equal within fp32 rounding, without materialising the weights where
    the backend has a fused kernel."""
    if fused:
        return F.scaled_dot_product_attention(queries_bqd, tokens_bnd, tokens_bnd, scale=beta)
    weights_bqn = torch.softmax(beta * queries_bqd @ tokens_bnd.transpose(1, 2), dim=-1)
    return weights_bqn @ tokens_bnd


def intra_view_term(queries_bqd: torch.Tensor, modes_bqd: torch.Tensor) -> torch.Tensor:
    """L1: mean over queries of 2 - 2 cos(z, m)."""
    return (2.0 - 2.0 * F.cosine_similarity(queries_bqd, modes_bqd, dim=-1)).mean()


def inter_view_term(teacher_probs_qk: torch.Tensor, student_log_probs_qk: torch.Tensor) -> torch.Tensor:
    """L2: mean over queries of the cross-entropy H(p_t, p_s)."""
    return -(teacher_probs_qk * student_log_probs_qk).sum(dim=-1).mean()


def volume_term(mean_probs_k: torch.Tensor) -> torch.Tensor:
    """L3: KL(p_bar || uniform) = sum_k p_bar log p_bar + log K."""
    return (mean_probs_k * torch.log(mean_probs_k.clamp_min(1e-12))).sum() + math.log(mean_probs_k.numel())


def global_mean_probs(student_probs_qk: torch.Tensor) -> torch.Tensor:
    """p_bar: the mean student prediction over every query of every process.

    The value is the global mean. The gradient flows through this process's own share and is
    scaled by the number of processes, because DistributedDataParallel averages gradients
    over processes: after that average each query's gradient is exactly 1 / (all queries),
    as in a single process holding the whole batch.
    """
    local_sum = student_probs_qk.sum(dim=0)
    count = local_sum.new_full((1,), float(student_probs_qk.shape[0]))
    reduced = all_reduce_sum(torch.cat([local_sum.detach(), count]))  # sums and counts in one collective
    global_sum, global_count = reduced[:-1], reduced[-1]
    scaled = local_sum * world_size()
    return (scaled + (global_sum - scaled).detach()) / global_count


def flsl_loss(
    student_views: list[StudentView],
    teacher_tokens_bnd: torch.Tensor,
    *,
    student_head: nn.Module,
    teacher_head: nn.Module,
    beta_sa: float,
    beta_ca: float,
    student_temp: float,
    teacher_temp: float,
    weights: LossWeights,
    fused_modes: bool = False,
) -> dict[str, torch.Tensor]:
    """All three terms and their weighted total, pooling the queries of every student view.
    `fused_modes` is passed to `attention_modes` (same math, another kernel)."""
    teacher_tokens_bnd = teacher_tokens_bnd.detach().float()
    queries, modes, teacher_modes = [], [], []
    for view in student_views:
        tokens = view.tokens_bnd.float()
        z = gather_queries(tokens, view.query_index_bq)
        queries.append(z.flatten(0, 1))
        modes.append(attention_modes(z, tokens, beta=beta_sa, fused=fused_modes).flatten(0, 1))
        with torch.no_grad():
            teacher_modes.append(
                attention_modes(z.detach(), teacher_tokens_bnd, beta=beta_ca, fused=fused_modes).flatten(0, 1)
            )
    z_qd, m_qd = torch.cat(queries), torch.cat(modes)

    student_log_probs = F.log_softmax(student_head(m_qd).float() / student_temp, dim=-1)
    with torch.no_grad():
        teacher_probs = F.softmax(teacher_head(torch.cat(teacher_modes)).float() / teacher_temp, dim=-1)

    intra = intra_view_term(z_qd, m_qd)
    inter = inter_view_term(teacher_probs, student_log_probs)
    volume = volume_term(global_mean_probs(student_log_probs.exp()))
    total = weights.upsilon * intra + weights.eta * inter + weights.gamma * volume
    return {"loss": total, "intra": intra, "inter": inter, "volume": volume}
