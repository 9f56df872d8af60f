"""OTPO's token weights: :func:`ot_token_weights` (cost, scale, solve, marginals, normalise), the "w/o OT" weights
(:func:`uniform_token_weights`) and SamPO's down-sampling (:func:`sampo_token_weights`)."""

import warnings
from dataclasses import dataclass

import torch

from .pot_reference import pot_pair_plan
from .settings import checked_setting
from .solve import solve_batch


@dataclass
class OTInfo:
    """Diagnostics of :func:`ot_token_weights`; see its ``Returns``."""

    plan: torch.Tensor | None
    plan_mass: torch.Tensor
    n_iter: int
    fallback: torch.Tensor
    cost_spread: torch.Tensor | None = None


def _normalize(wc, wr, n, m, normalization):
    """Rescale each pair's weights (B, L) to the target sums; rows that sum to 0 (empty pairs) stay 0."""
    if normalization == "none":
        return wc, wr
    n, m = n.to(wc.dtype), m.to(wc.dtype)
    tc = tr = {"min": torch.minimum(n, m), "mean": (n + m) / 2, "max": torch.maximum(n, m)}.get(normalization)
    if normalization == "length":
        tc, tr = n, m
    out = []
    for w, target in ((wc, tc), (wr, tr)):
        total = w.sum(1)
        out.append(w * torch.where(total > 0, target / torch.where(total > 0, total, 1), 0)[:, None])
    return out


def _returned_info(raw: OTInfo, mc, mr) -> OTInfo:
    """The diagnostics as returned, from a solver's (whose ``plan_mass`` is the plans' sums): float32, the mass per
    token of the shorter side, 0 for the fallback pairs."""
    fallback = raw.fallback
    mass = torch.where(fallback, 0, raw.plan_mass / torch.minimum(mc.sum(1), mr.sum(1)).clamp_min(1)).float()
    plan = raw.plan.float().to(mc.device) if raw.plan is not None else None
    spread = torch.where(fallback, 0, raw.cost_spread).float()
    return OTInfo(plan=plan, plan_mass=mass, n_iter=raw.n_iter, fallback=fallback, cost_spread=spread)


def _batched_weights(hc, hr, mc, mr, *, normalization, need_plan, **solve_args):
    """All pairs on the states' device, within the memory budget (:func:`otpo_trl.ot.solve.solve_batch`): (B, Tc) and
    (B, Tr) weights in the solver's dtype and the raw diagnostics (``plan_mass`` the plans' sums)."""
    solution = solve_batch(hc, hr, mc, mr, need_plan=need_plan, **solve_args)
    wc, wr = solution.chosen, solution.rejected
    if normalization == "none":  # the marginals themselves, which may underflow
        scale = solution.log_scale.exp()[:, None]
        wc, wr = wc * scale, wr * scale
    # Normalised in the compact layout, before scattering, so that padding cannot reorder the sums.
    n, m = mc.sum(1), mr.sum(1)
    width = (int(n.max()) if len(n) else 0), (int(m.max()) if len(m) else 0)
    wc[:, : width[0]], wr[:, : width[1]] = _normalize(wc[:, : width[0]], wr[:, : width[1]], n, m, normalization)
    oc, orr = solution.orders
    wc, wr = wc.new_zeros(wc.shape).scatter_(1, oc, wc), wr.new_zeros(wr.shape).scatter_(1, orr, wr)
    full = None
    if need_plan:
        B, Tc, Tr = solution.plan.shape
        full = solution.plan.new_zeros(B, Tc, Tr).scatter_(1, oc[..., None].expand(-1, -1, Tr), solution.plan)
        full = full.new_zeros(B, Tc, Tr).scatter_(2, orr[:, None, :].expand(-1, Tc, -1), full)
    info = OTInfo(
        plan=full,
        plan_mass=solution.mass,
        n_iter=solution.n_iter,
        fallback=solution.fallback,
        cost_spread=solution.cost_spread,
    )
    return wc, wr, info


def _pot_weights(hc, hr, mc, mr, *, reg, reg_m, cost, cost_scale, normalization, max_iter, tol, need_plan):
    """The reference: :func:`pot_pair_plan` once per pair, float64 on the CPU; returns as :func:`_batched_weights`."""
    (B, Tc), Tr = mc.shape, mr.shape[1]
    wc, wr = torch.zeros(B, Tc, dtype=torch.float64), torch.zeros(B, Tr, dtype=torch.float64)
    mass, fallback = torch.zeros(B, dtype=torch.float64), torch.zeros(B, dtype=torch.bool)
    full = torch.zeros(B, Tc, Tr, dtype=torch.float64) if need_plan else None
    spread = torch.zeros(B, dtype=torch.float64)
    n_iter = 0
    for k in range(B):
        ic, ir = mc[k].nonzero().squeeze(1), mr[k].nonzero().squeeze(1)
        if len(ic) == 0 or len(ir) == 0:
            continue
        x, y = hc[k, ic].double().cpu(), hr[k, ir].double().cpu()
        ic, ir = ic.cpu(), ir.cpu()
        counts = torch.tensor([len(ic)]), torch.tensor([len(ir)])
        pair = pot_pair_plan(x, y, reg=reg, reg_m=reg_m, cost=cost, cost_scale=cost_scale, max_iter=max_iter, tol=tol)
        if pair.plan is None:
            fallback[k] = True
            wc[k, ic], wr[k, ir] = _normalize(*(x.new_ones(1, len(i)) for i in (ic, ir)), *counts, normalization)
            continue
        P = pair.plan
        spread[k], n_iter = pair.cost_spread, max(n_iter, pair.n_iter)
        wc[k, ic], wr[k, ir] = (w[0] for w in _normalize(P.sum(1)[None], P.sum(0)[None], *counts, normalization))
        mass[k] = P.sum()
        if need_plan:
            full[k, ic[:, None], ir[None, :]] = P
    device = hc.device
    info = OTInfo(
        plan=full,
        plan_mass=mass.to(device),
        n_iter=n_iter,
        fallback=fallback.to(device),
        cost_spread=spread.to(device),
    )
    return wc.to(device), wr.to(device), info


def _checked_masks(chosen_mask, rejected_mask):
    if chosen_mask.dim() != 2 or rejected_mask.dim() != 2 or len(chosen_mask) != len(rejected_mask):
        shapes = f"{tuple(chosen_mask.shape)}, {tuple(rejected_mask.shape)}"
        raise ValueError(f"`chosen_mask` (B, Tc) and `rejected_mask` (B, Tr) got {shapes}.")
    return chosen_mask.detach() != 0, rejected_mask.detach().to(chosen_mask.device) != 0


def _checked_generator(generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"`generator` must be a torch.Generator or None, got {generator!r}.")
    return generator


def uniform_token_weights(
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    normalization: str = "min",
    return_info: bool = False,
    return_plan: bool = True,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, OTInfo]:
    r"""The paper's "w/o OT" ablation: 1 per valid token, then the same normalisation as :func:`ot_token_weights`.

    With ``normalization="min"`` each side sums to :math:`\min(n, m)`: the shorter completion's tokens weigh 1, the
    longer one's :math:`\min(n, m) / n`. With "length" or "none" every token weighs 1 (DPO).

    Parameters
    ----------
    chosen_mask : torch.Tensor, shape (B, Tc)
        True (or 1) at the chosen completion's tokens.
    rejected_mask : torch.Tensor, shape (B, Tr)
        Same for the rejected completions.
    normalization, return_info, return_plan
        As in :func:`ot_token_weights`.

    Returns
    -------
    chosen_weights : torch.Tensor, shape (B, Tc), float32
    rejected_weights : torch.Tensor, shape (B, Tr), float32
        0 at masked positions and for pairs with an empty side.
    info : OTInfo, only if ``return_info``
        ``plan`` the constant coupling :math:`\min(n, m) / (n m)` of mass :math:`\min(n, m)` (whose marginals are
        these weights under "min"), so ``plan_mass`` 1; ``n_iter`` 0, no fallback, ``cost_spread`` 0.

    Examples
    --------
    >>> import torch
    >>> chosen_mask = torch.tensor([[True, True, False]])
    >>> rejected_mask = torch.tensor([[True, True, True, True]])
    >>> uniform_token_weights(chosen_mask, rejected_mask)
    (tensor([[1., 1., 0.]]), tensor([[0.5000, 0.5000, 0.5000, 0.5000]]))
    """
    checked_setting("normalization", normalization)
    mc, mr = _checked_masks(chosen_mask, rejected_mask)
    wc, wr, info = _selected_weights(
        mc, mr, mc, mr, normalization=normalization, need_plan=return_info and return_plan
    )
    return (wc.float(), wr.float(), _returned_info(info, mc, mr)) if return_info else (wc.float(), wr.float())


def sampo_token_weights(
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    normalization: str = "min",
    generator: torch.Generator | None = None,
    return_info: bool = False,
    return_plan: bool = True,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, OTInfo]:
    r"""SamPO's down-sampling [1]_ as token weights: 1 on :math:`\min(n, m)` tokens of each side, 0 elsewhere.

    Each side keeps :math:`\min(n, m)` of its valid tokens, drawn uniformly without replacement (the shorter side
    keeps all of its tokens), then the weights are normalised as :func:`ot_token_weights` does; with
    ``normalization="min"`` they already sum to :math:`\min(n, m)` and stay 1 and 0. Weighting a completion's
    per-token log-ratios :math:`\log \pi_\theta / \pi_\mathrm{ref}` by them sums those log-ratios over the sampled
    tokens: DPO's implicit reward down-sampled to the same number of tokens on both sides, which removes its
    dependence on the length difference.

    Which tokens are drawn follows ``generator`` (torch's global generator when ``None``); a trainer draws afresh every
    step, once per batch, and applies the same weights to the policy's and the reference's log-probs. The paper
    defines the down-sampled reward with the same sampled tokens in :math:`\pi_\theta` and :math:`\pi_\mathrm{ref}`;
    the official code (``get_batch_logps(..., len_norm=True)`` in ``dpo_trainer.py`` of LuJunru/SamPO) draws the
    longer side's tokens with ``torch.multinomial(mask, min(n, m), replacement=False)``, uniformly without
    replacement as here, but inside each forward, so that its policy and its reference (or its precomputed reference
    log-probs) sum over two independent draws. Here one draw serves both, as the paper writes it.

    Parameters
    ----------
    chosen_mask : torch.Tensor, shape (B, Tc)
        True (or 1) at the chosen completion's tokens.
    rejected_mask : torch.Tensor, shape (B, Tr)
        Same for the rejected completions.
    normalization : {"min", "mean", "max", "length", "none"}, optional
        As in :func:`ot_token_weights`: the target sums use the full lengths n and m.
    generator : torch.Generator, optional
        The source of the draw: the same generator state gives the same tokens. On any device: the draw is made on
        the generator's device and moved to the masks'.
    return_info, return_plan
        As in :func:`ot_token_weights`.

    Returns
    -------
    chosen_weights : torch.Tensor, shape (B, Tc), float32
    rejected_weights : torch.Tensor, shape (B, Tr), float32
        0 at masked and unsampled positions and for pairs with an empty side.
    info : OTInfo, only if ``return_info``
        ``plan`` the constant coupling :math:`1 / \min(n, m)` between the sampled tokens (whose marginals are these
        weights under "min"), so ``plan_mass`` 1; ``n_iter`` 0, no fallback, ``cost_spread`` 0.

    References
    ----------
    .. [1] Lu et al., "Eliminating Biased Length Reliance of Direct Preference Optimization via Down-Sampled KL
       Divergence", EMNLP 2024, arXiv:2406.10957.

    Examples
    --------
    >>> import torch
    >>> chosen_mask = torch.tensor([[True, True, False]])
    >>> rejected_mask = torch.tensor([[True, True, True, True]])
    >>> wc, wr = sampo_token_weights(chosen_mask, rejected_mask, generator=torch.Generator().manual_seed(0))
    >>> wc, int(wr.sum()), sorted(set(wr.flatten().tolist()))
    (tensor([[1., 1., 0.]]), 2, [0.0, 1.0])
    """
    checked_setting("normalization", normalization)
    mc, mr = _checked_masks(chosen_mask, rejected_mask)
    generator = _checked_generator(generator)
    need_plan = return_info and return_plan
    wc, wr, info = _sampo_weights(mc, mr, normalization=normalization, generator=generator, need_plan=need_plan)
    return (wc.float(), wr.float(), _returned_info(info, mc, mr)) if return_info else (wc.float(), wr.float())


def _sampled(mask, count, generator):
    """(B, T) bool: ``count`` (B,) positions of each row of ``mask`` drawn uniformly without replacement."""
    keys = torch.rand(mask.shape, generator=generator, device=mask.device if generator is None else generator.device)
    keys = torch.where(mask, keys.to(mask.device), 2.0)  # masked positions sort last
    rank = torch.empty_like(mask, dtype=torch.long).scatter_(
        1, keys.argsort(1), torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    )
    return rank < count[:, None]  # ties between keys are ranked in order: exactly `count` positions


def _sampo_weights(mc, mr, *, normalization, generator, need_plan):
    """:func:`sampo_token_weights` on bool masks; returns as :func:`_batched_weights`."""
    low = torch.minimum(mc.sum(1), mr.sum(1))
    sc, sr = _sampled(mc, low, generator), _sampled(mr, low, generator)  # both drawn, whichever is shorter
    return _selected_weights(mc, mr, sc, sr, normalization=normalization, need_plan=need_plan)


def _selected_weights(mc, mr, sc, sr, *, normalization, need_plan):
    """1 on the selected tokens ``sc`` (B, Tc), ``sr`` (B, Tr) of the valid ones ``mc``, ``mr``, normalised to the
    valid lengths' targets; as a plan, the constant coupling of the selected tokens with mass min(selected).
    Returns as :func:`_batched_weights`."""
    n, m = mc.sum(1), mr.sum(1)
    kc, kr = sc.sum(1), sr.sum(1)
    nonempty = (n > 0) & (m > 0)
    wc, wr = (mask & nonempty[:, None] for mask in (sc, sr))
    wc, wr = _normalize(wc.double(), wr.double(), n, m, normalization)
    low = torch.minimum(kc, kr).double()
    mass = torch.where(nonempty, low, 0)
    plan = None
    if need_plan:
        value = torch.where(nonempty, low / (kc * kr).clamp_min(1), 0)[:, None, None]
        plan = (sc[:, :, None] & sr[:, None, :]) * value
    info = OTInfo(
        plan=plan, plan_mass=mass, n_iter=0, fallback=torch.zeros_like(nonempty), cost_spread=torch.zeros_like(mass)
    )
    return wc, wr, info


def ot_token_weights(
    chosen_hidden: torch.Tensor,
    rejected_hidden: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    reg: float = 1.0,
    reg_m: float = 0.2,
    cost: str = "euclidean",
    cost_scale: str = "official",
    normalization: str = "min",
    weighting: str = "ot",
    solver: str = "batched",
    max_iter: int = 1000,
    tol: float = 1e-6,
    generator: torch.Generator | None = None,
    memory_budget: float | str = "auto",
    return_info: bool = False,
    return_plan: bool = True,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, OTInfo]:
    r"""OTPO token weights: marginals of an entropic unbalanced OT plan between each chosen and rejected completion.

    For a pair with valid chosen hidden states :math:`x_1, \dots, x_n` and rejected ones :math:`y_1, \dots, y_m`,
    the cost is :math:`M_{ij} = (c(x_i, y_j) + 10^{-6} - o) / D`, scaled per pair as ``cost_scale`` says
    (:func:`otpo_trl.ot.costs.cost_scaling`); under "official", the official code's, :math:`o = 0` and

    .. math::
        D = \max\Big(1,\; \max\big(\max_{ij} c(x_i, y_j),\; \max_i c(x_i, 0),\; \max_j c(0, y_j)\big) + 10^{-6}\Big).

    Then

    .. math::
        P^\star = \operatorname*{arg\,min}_{P \in \mathbb{R}_+^{n \times m}} \langle P, M \rangle
            + \varepsilon \sum_{ij} P_{ij} (\log P_{ij} - 1)
            + \tau \, \mathrm{KL}(P \mathbf{1}_m \,\|\, \mathbf{1}_n)
            + \tau \, \mathrm{KL}(P^\top \mathbf{1}_n \,\|\, \mathbf{1}_m)

    as ``ot.unbalanced.sinkhorn_unbalanced(1_n, 1_m, M, reg, reg_m, reg_type="entropy")`` solves it, by the
    Sinkhorn-Knopp scaling iterations [2]_ :math:`u \leftarrow (\mathbf{1}_n / K v)^{\phi}`,
    :math:`v \leftarrow (\mathbf{1}_m / K^\top u)^{\phi}`, :math:`K = e^{-M / \varepsilon}`,
    :math:`\phi = \tau / (\tau + \varepsilon)`, :math:`P^\star = \mathrm{diag}(u) K \mathrm{diag}(v)` (see
    :mod:`otpo_trl.ot.sinkhorn`). Chosen token :math:`i` is weighted by :math:`(P^\star \mathbf{1}_m)_i`, rejected
    token :math:`j` by :math:`(P^{\star\top} \mathbf{1}_n)_j`, each side rescaled to a target sum [1]_. With the "min"
    target both sides are divided by the same :math:`\sum_{ij} P^\star_{ij} / \min(n, m)` (the official code's
    ``scaled_coeff``).

    How far from uniform the weights can be: at the fixed point, a chosen token's mass is
    :math:`r_i = (K v)_i^{1 - \phi}`, so within one completion

    .. math::
        \max_i r_i / \min_i r_i \le \exp\big(\Delta / (\varepsilon + \tau)\big), \qquad
        \Delta = \max_j \big(\max_i M_{ij} - \min_i M_{ij}\big)

    (the rejected side likewise, with rows; ``info.cost_spread`` is the larger of the two :math:`\Delta`). The
    normalisation leaves the ratio unchanged. Under "official", :math:`\Delta` is the states' spread relative to
    their norms: a component shared by every state (as real hidden states have) makes it small, and the weights stay
    close to uniform at the paper's :math:`\varepsilon`, by an amount that depends on the model. "minmax" makes the
    costs' range 1 in every pair (and the weights invariant to a shift or a rescaling of all states), so that
    :math:`\varepsilon` and :math:`\tau` alone bound how far apart the weights may be, whatever the model
    (:math:`e^{1 / (\varepsilon + \tau)}`: 2.3 at the defaults, 28 at :math:`\varepsilon = 0.1`). A constant added to
    every cost of a pair rescales its plan and leaves the normalised weights unchanged, so "minmax" is in effect
    a division by the range of the costs.

    Parameters
    ----------
    chosen_hidden : torch.Tensor, shape (B, Tc, H)
        Hidden states of the chosen completions (any float dtype; computed in float32, float64 if given float64,
        with autocast disabled whatever the caller's autocast state).
    rejected_hidden : torch.Tensor, shape (B, Tr, H)
        Hidden states of the rejected completions.
    chosen_mask : torch.Tensor, shape (B, Tc)
        True (or 1) at the chosen completion's tokens: any subset of positions. Other positions are never read.
    rejected_mask : torch.Tensor, shape (B, Tr)
        Same for the rejected completions.
    reg : float, optional
        Entropic regularisation :math:`\varepsilon > 0`; larger spreads the plan towards uniform weights.
    reg_m : float, optional
        Marginal KL penalty :math:`\tau > 0`.
    cost : {"euclidean", "sqeuclidean", "cosine"}, optional
        :math:`c(x, y)` = :math:`\|x - y\|_2` (official code), :math:`\|x - y\|_2^2` (paper) or
        :math:`1 - \cos(x, y)`.
    cost_scale : {"official", "pair", "none", "minmax"}, optional
        "official" reproduces the official code, under which the paper's :math:`\varepsilon` were tuned; it depends on
        the states' norms, so a large component shared by all states shrinks the costs. "pair" divides by the largest
        cost of the valid entries; "none" keeps the raw costs, which then set the scale of :math:`\varepsilon` (with
        ``normalization="none"`` the raw marginals may underflow to 0). "minmax" rescales each pair's costs to [0, 1],
        so that :math:`\varepsilon` means the same for every model (see the bound above).
    normalization : {"min", "mean", "max", "length", "none"}, optional
        Target sum of each side's weights: :math:`\min(n, m)`, :math:`(n + m) / 2`, :math:`\max(n, m)`, each side's
        own length (:math:`n`, :math:`m`), or none (raw plan marginals).
    weighting : {"ot", "uniform", "sampo"}, optional
        "ot": the plan's marginals. "uniform": :func:`uniform_token_weights`, 1 per token before the same
        normalisation, the paper's "w/o OT" ablation (with "length" or "none" it is DPO). "sampo":
        :func:`sampo_token_weights`, 1 on min(n, m) tokens of each side drawn at random (SamPO's down-sampling),
        before the same normalisation. With "uniform" and "sampo" no OT problem is solved and the states are not
        read.
    solver : {"batched", "online", "pot"}, optional
        "batched": the pairs together on the hidden states' device, in groups within ``memory_budget``, each pair's
        kernel one stored :math:`n \times m` matrix; multiplicative updates, or stabilised ones with absorption [3]_
        (the same iterates) when :math:`\max M / \varepsilon` could underflow :math:`K`. A pair that alone exceeds
        the budget is solved "online". "online": the same iterates in the log domain without any :math:`n \times m`
        matrix, the costs recomputed from the states at every pass (:math:`2 n m H` flops a pass, two passes an
        iteration; :mod:`otpo_trl.ot.geometry`). "pot": POT once per pair in float64 on the CPU
        (:mod:`otpo_trl.ot.pot_reference`).
    max_iter : int, optional
        Maximum number of Sinkhorn iterations.
    tol : float, optional
        POT's ``stopThr``: a pair stops once the mean of the relative changes of :math:`u` and :math:`v`,
        :math:`\max|u - u'| / \max(\max|u|, \max|u'|, 1)`, is below it.
    generator : torch.Generator, optional
        With ``weighting="sampo"``, the source of the random draw (``None``: torch's global generator); see
        :func:`sampo_token_weights`. Not used by the other weightings.
    memory_budget : float or "auto", optional
        GiB of extra memory the OT step may use (:mod:`otpo_trl.ot.solve`): "auto" is a quarter of the GPU's free
        memory, or 2 GiB on a CPU. The weights do not depend on it.
    return_info : bool, optional
        Also return an :class:`OTInfo`.
    return_plan : bool, optional
        With ``return_info``, fill ``info.plan``; ``False`` leaves it ``None`` and spares the (B, Tc, Tr) scatter
        (the trainer needs only the diagnostics).

    Returns
    -------
    chosen_weights : torch.Tensor, shape (B, Tc), float32
    rejected_weights : torch.Tensor, shape (B, Tr), float32
        Detached, on the input device, 0 at masked positions and for pairs with an empty side. Pairs whose hidden
        states or costs are not finite get uniform weights (1 per valid token, then normalised).
    info : OTInfo, only if ``return_info``
        ``plan`` (B, Tc, Tr) float32, the plan at the input positions (0 elsewhere); ``plan_mass`` (B,)
        :math:`\sum_{ij} P^\star_{ij} / \min(n, m)` (0 for empty or fallback pairs); ``n_iter`` (int) iterations run;
        ``fallback`` (B,) bool, the pairs given uniform weights; ``cost_spread`` (B,) float32, the :math:`\Delta` of
        the bound above (0 for empty or fallback pairs). With ``weighting="uniform"`` or ``"sampo"``: see
        :func:`uniform_token_weights`, :func:`sampo_token_weights`.

    References
    ----------
    .. [1] Li et al., "Optimal Transport-Based Token Weighting scheme for Enhanced Preference Optimization",
       arXiv:2505.18720, 2025.
    .. [2] Chizat, Peyré, Schmitzer, Vialard, "Scaling algorithms for unbalanced optimal transport problems",
       Mathematics of Computation, 2018.
    .. [3] Schmitzer, "Stabilized sparse scaling algorithms for entropy regularized transport problems",
       SIAM Journal on Scientific Computing, 2019.

    Examples
    --------
    Two chosen tokens and three rejected ones (the first chosen position is padding, never read): the rejected token
    far from both chosen ones gets the least weight, and each side sums to min(n, m) = 2.

    >>> import torch
    >>> chosen = torch.tensor([[[9.0, 9.0], [0.0, 0.0], [1.0, 0.0]]])
    >>> rejected = torch.tensor([[[0.0, 0.1], [1.0, 0.1], [4.0, 4.0]]])
    >>> chosen_mask = torch.tensor([[False, True, True]])
    >>> rejected_mask = torch.tensor([[True, True, True]])
    >>> wc, wr = ot_token_weights(chosen, rejected, chosen_mask, rejected_mask, reg=0.1, cost_scale="pair")
    >>> wc.round(decimals=2)
    tensor([[0.0000, 0.9900, 1.0100]])
    >>> wr.round(decimals=2)
    tensor([[0.9700, 0.9700, 0.0600]])
    >>> round(float(wc.sum()), 4), round(float(wr.sum()), 4)
    (2.0, 2.0)
    """
    reg, reg_m, tol = (checked_setting(name, value) for name, value in (("reg", reg), ("reg_m", reg_m), ("tol", tol)))
    max_iter = checked_setting("max_iter", max_iter)
    memory_budget = checked_setting("memory_budget", memory_budget)
    for name, val in (
        ("cost", cost),
        ("cost_scale", cost_scale),
        ("normalization", normalization),
        ("weighting", weighting),
        ("solver", solver),
    ):
        checked_setting(name, val)
    generator = _checked_generator(generator)
    for side, h, mask in (("chosen", chosen_hidden, chosen_mask), ("rejected", rejected_hidden, rejected_mask)):
        if h.dim() != 3 or tuple(mask.shape) != tuple(h.shape[:2]):
            raise ValueError(
                f"`{side}_hidden` (B, T, H) and `{side}_mask` (B, T) got {tuple(h.shape)}, {tuple(mask.shape)}."
            )
    for dim, what in ((0, "batch sizes"), (2, "hidden sizes")):
        if chosen_hidden.shape[dim] != rejected_hidden.shape[dim]:
            shapes = f"`chosen_hidden` {tuple(chosen_hidden.shape)}, `rejected_hidden` {tuple(rejected_hidden.shape)}"
            raise ValueError(f"{what} differ: {shapes}.")

    device = chosen_hidden.device
    hc, hr = chosen_hidden.detach(), rejected_hidden.detach().to(device)
    mc, mr = chosen_mask.detach().to(device) != 0, rejected_mask.detach().to(device) != 0
    need_plan = return_info and return_plan
    if weighting == "uniform":
        wc, wr, info = _selected_weights(mc, mr, mc, mr, normalization=normalization, need_plan=need_plan)
    elif weighting == "sampo":
        wc, wr, info = _sampo_weights(mc, mr, normalization=normalization, generator=generator, need_plan=need_plan)
    else:
        kwargs = {"reg": reg, "reg_m": reg_m, "cost": cost, "cost_scale": cost_scale, "normalization": normalization}
        kwargs |= {"max_iter": max_iter, "tol": tol, "need_plan": need_plan}
        # Trainers call this inside the model's forward, under mixed-precision autocast: without this, the cost
        # matmuls and Sinkhorn products would silently run in bf16/fp16. The solver's own dtype (fp32, fp64) is used.
        with torch.autocast(device_type=device.type, enabled=False):
            if solver == "pot":
                wc, wr, info = _pot_weights(hc, hr, mc, mr, **kwargs)
            else:
                wc, wr, info = _batched_weights(hc, hr, mc, mr, solver=solver, memory_budget=memory_budget, **kwargs)

    wc, wr = wc.float(), wr.float()
    if bool(info.fallback.any()):
        warnings.warn(
            f"OT weights: {int(info.fallback.sum())} pair(s) with non-finite hidden states or costs get uniform "
            "weights.",
            stacklevel=2,
        )
    if not return_info:
        return wc, wr
    return wc, wr, _returned_info(info, mc, mr)
