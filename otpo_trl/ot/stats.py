"""How far from uniform a completion's token weights are: one set of statistics for the trainer's ``ot/*`` metrics,
the spread tool and the pictures."""

import math
from dataclasses import dataclass

import torch


@dataclass
class TokenWeightStats:
    r"""Statistics of each completion's weights :math:`w_1, \dots, w_n` on its valid tokens (float64, or float32 where
    the device has no float64).

    Attributes
    ----------
    entropy : torch.Tensor, shape (B,)
        The normalised entropy :math:`-\sum_i p_i \log p_i / \log n`, :math:`p = w / \sum_i w_i`: 1 for uniform
        weights (so 1 for a single token), lower as the weights concentrate; NaN without a token or when the weights
        sum to 0.
    max : torch.Tensor, shape (B,)
        The largest weight (NaN without a token).
    mean : torch.Tensor, shape (B,)
        The mean weight, which is each token's weight without OT (the "w/o OT" weights of the same normalisation);
        NaN without a token.
    max_mean : torch.Tensor, shape (B,)
        Largest over mean weight; NaN without a token or when the weights sum to 0.
    max_min : torch.Tensor, shape (B,)
        Largest over smallest weight (inf if one is 0); NaN as ``max_mean``.
    ratio : torch.Tensor, shape (B, L)
        Each token's weight over its completion's mean weight; NaN outside the mask and where ``max_mean`` is.
    """

    entropy: torch.Tensor
    max: torch.Tensor
    mean: torch.Tensor
    max_mean: torch.Tensor
    max_min: torch.Tensor
    ratio: torch.Tensor


def token_weight_stats(
    weights: torch.Tensor, mask: torch.Tensor, *, dtype: torch.dtype | None = None
) -> TokenWeightStats:
    """:class:`TokenWeightStats` of each row of ``weights``.

    Parameters
    ----------
    weights : torch.Tensor, shape (B, L)
        Token weights, >= 0 (as :func:`otpo_trl.ot.ot_token_weights` returns them).
    mask : torch.Tensor, shape (B, L)
        True (or 1) at each completion's tokens; other positions are ignored whatever they hold.
    dtype : torch.dtype, optional
        What they are computed in: float64 by default, float32 on a device without float64 (Apple's MPS). In float32
        the statistics are within 1e-5 (relative) of float64's for completions of up to 100k tokens (the sums of p log p
        and of the weights are the least accurate: about n ulp at worst).

    Examples
    --------
    >>> import torch
    >>> stats = token_weight_stats(torch.tensor([[1.0, 1.0, 1.0, 9.0], [4.0, 1.0, 1.0, 0.0]]),
    ...                            torch.tensor([[True, True, True, False], [True, True, True, False]]))
    >>> [round(x, 3) for x in stats.entropy.tolist()], stats.max_mean.tolist(), stats.max_min.tolist()
    ([1.0, 0.79], [1.0, 2.0], [1.0, 4.0])
    """
    if dtype is None:
        dtype = torch.float32 if weights.device.type == "mps" else torch.float64
    mask = mask.bool()
    w = torch.where(mask, weights.to(dtype), 0)
    n = mask.sum(1).to(dtype)
    total = w.sum(1)
    ok = (n > 0) & (total > 0)
    mean = torch.where(n > 0, total / n.clamp_min(1), math.nan)
    p = w / torch.where(ok, total, 1)[:, None]
    plogp = torch.where(mask & (p > 0), p * p.log(), 0)
    entropy = torch.where(n > 1, -plogp.sum(1) / n.clamp_min(2).log(), 1.0)
    top = torch.where(mask, w, -math.inf).amax(1)
    low = torch.where(mask, w, math.inf).amin(1)
    top = torch.where(n > 0, top, math.nan)
    return TokenWeightStats(
        entropy=torch.where(ok, entropy, math.nan),
        max=top,
        mean=mean,
        max_mean=torch.where(ok, top / mean, math.nan),
        max_min=torch.where(ok, top / low, math.nan),
        ratio=torch.where(mask & ok[:, None], w / mean[:, None], math.nan),
    )
